"""The card lifecycle through the registry: every transition, loss reports, working days, the tick,
replacement, liability, the e-purse refund, PIN reset requests."""

import datetime as dt
import itertools

import chinese_calendar
import pytest
from citycard.core.ledger import accounts_array, transfers_array
from citycard.core.lifecycle import TRANSITIONS, CardEvent, CardState
from citycard.core.records import AccountKind, LedgerId, TransferCode, TransferResult
from citycard.core.registry import tick
from citycard.core.registry_records import ErrorCode, RegistryError

PASSWORD = "correct horse 42"


@pytest.fixture
def registry(kit):
    return kit.open()


@pytest.fixture
def holder(kit, registry):
    number = kit.citizen_id()
    kit.add_person(registry, number, at=kit.at(2025, 9, 1, 8))
    return number


def issue(kit, registry, holder, at=(2025, 9, 1, 9)):
    return registry.issue_card(holder, actor="op", at=kit.at(*at)).card_number


def phone(registry, holder, at, **identity):
    values = {"id_number": holder, "name": "张三", "gender": "male", "employer": "91370100MA3C5LQX6E"}
    values.update(identity)
    return registry.report_loss_phone(**values, actor="op", at=at)


def written(registry, holder, card, at, **extra):
    return registry.report_loss_written(card, holder_id=holder, holder_name="张三", actor="op", at=at, **extra)


def refused(kit, registry, operation, *, field, code):
    before = kit.snapshot(registry)
    with pytest.raises(RegistryError) as caught:
        operation()
    assert (caught.value.field, caught.value.code) == (field, code), str(caught.value)
    assert kit.snapshot(registry) == before
    return caught.value


# -- every transition, allowed and forbidden, through the registry -------------------------------------

SETUP_AT = (2025, 9, 1, 9)
EVENT_AT = (2025, 9, 15, 9)  # well after the phone report's restore deadline (end of 2025-09-03)


def card_in_state(kit, registry, holder, state):
    """A card brought to ``state`` by registry operations only."""
    at = kit.at(*SETUP_AT)
    if state in ("ordered", "printed", "registered", "distributed"):
        card = registry.issue_card(holder, actor="op", channel="batch", at=at).card_number
        for step in ("print", "register", "distribute")[: ["ordered", "printed", "registered", "distributed"].index(state)]:
            registry.advance(card, step, actor="op", channel="batch", at=at)
        return card
    card = issue(kit, registry, holder, SETUP_AT)
    if state == "stopped":
        phone(registry, holder, at)
    elif state in ("frozen", "replaced"):
        written(registry, holder, card, at)
        if state == "replaced":
            registry.replace(card, actor="op", at=at)
    elif state == "cancelled":
        registry.cancel(card, reason="duplicate", actor="op", at=at)
    elif state == "expired":
        registry.expire(card, at=at)
    assert registry.card(card).state.value == state
    return card


EVENT_CALLS = {
    CardEvent.PRINT: lambda r, h, c, at: r.advance(c, "print", actor="op", at=at),
    CardEvent.REGISTER: lambda r, h, c, at: r.advance(c, "register", actor="op", at=at),
    CardEvent.DISTRIBUTE: lambda r, h, c, at: r.advance(c, "distribute", actor="op", at=at),
    CardEvent.ACTIVATE: lambda r, h, c, at: r.advance(c, "activate", actor="op", at=at),
    CardEvent.REPORT_LOSS_PHONE: lambda r, h, c, at: phone(r, h, at, card_number=c),
    CardEvent.REPORT_LOSS_ONLINE: lambda r, h, c, at: r.report_loss_online(id_number=h, password=PASSWORD,
                                                                           card_number=c, at=at),
    CardEvent.REPORT_LOSS_WRITTEN: lambda r, h, c, at: written(r, h, c, at),
    CardEvent.AUTO_RESTORE: lambda r, h, c, at: r.auto_restore(c, at=at),
    CardEvent.RESTORE: lambda r, h, c, at: r.restore(c, reason="found in a coat pocket", actor="op", at=at),
    CardEvent.REPLACE: lambda r, h, c, at: r.replace(c, actor="op", at=at),
    CardEvent.CANCEL: lambda r, h, c, at: r.cancel(c, reason="death", actor="op", at=at),
    CardEvent.EXPIRE: lambda r, h, c, at: r.expire(c, at=at),
    CardEvent.RENEW: lambda r, h, c, at: r.renew(c, actor="op", at=at),
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(CardState, CardEvent)),
                         ids=lambda value: value.value)
def test_every_transition_through_the_registry(kit, registry, holder, state, event):
    if event is CardEvent.REPORT_LOSS_ONLINE:
        registry.set_self_service_password(holder, PASSWORD, actor="op", at=kit.at(*SETUP_AT))
    card = card_in_state(kit, registry, holder, state.value)
    call = EVENT_CALLS[event]
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        error = refused(kit, registry, lambda: call(registry, holder, card, kit.at(*EVENT_AT)), field="state",
                        code=ErrorCode.FAILED_PRECONDITION)
        assert f"card {card}" in str(error) and state.value in str(error)
        return
    call(registry, holder, card, kit.at(*EVENT_AT))
    assert registry.card(card).state is expected
    last = registry.history(card)[-1]
    assert (last["from"], last["event"], last["to"]) == (state.value, event.value, expected.value)
    assert last["at"] == kit.at(*EVENT_AT).isoformat() and last["actor"] and last["channel"]
    if event in (CardEvent.REPLACE, CardEvent.RENEW):
        new_card = registry.card(registry.card(card).replaced_by)
        assert new_card.state is CardState.ACTIVE and new_card.replaces == card
    assert registry.verify_audit() == []


def test_a_transition_dated_before_the_cards_last_change_is_refused(kit, registry, holder):
    card = issue(kit, registry, holder, (2025, 9, 10, 9))
    refused(kit, registry, lambda: phone(registry, holder, kit.at(2025, 9, 9, 9)), field="at",
            code=ErrorCode.FAILED_PRECONDITION)
    assert registry.card(card).state is CardState.ACTIVE


# -- phone, online and written reports ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "fields"),
    [
        ({"name": "张四"}, "name"),
        ({"gender": "female"}, "gender"),
        ({"employer": "别的公司"}, "employer"),
        ({"employer": None}, "employer"),
        ({"name": "李四", "employer": "别的公司"}, "name, employer"),
    ],
)
def test_a_phone_report_whose_identity_does_not_match_is_refused(kit, registry, holder, identity, fields):
    issue(kit, registry, holder)
    error = refused(kit, registry, lambda: phone(registry, holder, kit.at(2025, 9, 30, 21), **identity),
                    field="identity", code=ErrorCode.FAILED_PRECONDITION)
    assert fields in str(error) and "370102********1234" in str(error)


def test_a_phone_report_for_an_unknown_person_is_refused(kit, registry, holder):
    issue(kit, registry, holder)
    refused(kit, registry, lambda: phone(registry, kit.citizen_id("19700101", 11), kit.at(2025, 9, 30, 21)),
            field="id_number", code=ErrorCode.NOT_FOUND)


def test_a_phone_report_takes_the_employer_by_code_or_name(kit, registry, holder):
    card = issue(kit, registry, holder)
    result = phone(registry, holder, kit.at(2025, 9, 30, 21), employer=" 济南示例科技有限公司 ")
    assert result.card.card_number == card and result.card.state is CardState.STOPPED
    assert result.card.loss_report.channel == "phone"


def test_a_person_without_an_employer_reports_without_one(kit, registry):
    retired = kit.citizen_id("19550101", 22)
    kit.add_person(registry, retired, "王芳", employed=False, at=kit.at(2025, 9, 1))
    issue(kit, registry, retired)
    result = registry.report_loss_phone(id_number=retired, name="王芳", gender="female", employer="",
                                        actor="op", at=kit.at(2025, 9, 30, 21))
    assert result.card.state is CardState.STOPPED


def test_another_persons_card_cannot_be_reported(kit, registry, holder):
    issue(kit, registry, holder)
    other = kit.citizen_id("19900215", 246)
    kit.add_person(registry, other, "李四", at=kit.at(2025, 9, 1))
    other_card = issue(kit, registry, other)
    refused(kit, registry, lambda: phone(registry, holder, kit.at(2025, 9, 30), card_number=other_card),
            field="card_number", code=ErrorCode.FAILED_PRECONDITION)


def test_an_online_report_authenticates_with_the_self_service_password(kit, registry, holder):
    card = issue(kit, registry, holder)
    registry.set_self_service_password(holder, PASSWORD, actor="op", at=kit.at(2025, 9, 1, 10))
    result = registry.report_loss_online(id_number=holder, password=PASSWORD, at=kit.at(2025, 9, 30, 21))
    assert result.card.card_number == card and result.card.state is CardState.STOPPED
    assert result.restore_deadline == dt.date(2025, 10, 10)
    assert registry.history(card)[-1]["channel"] == "online"


def test_online_failures_name_no_field_and_lock_after_the_limit(kit, registry, holder):
    issue(kit, registry, holder)
    registry.set_self_service_password(holder, PASSWORD, actor="op", at=kit.at(2025, 9, 1, 10))
    unknown = kit.citizen_id("19700101", 11)
    messages = set()
    for id_number, password in [(unknown, PASSWORD)] + [(holder, "wrong password")] * 5:
        with pytest.raises(RegistryError) as caught:
            registry.report_loss_online(id_number=id_number, password=password, at=kit.at(2025, 9, 30, 21))
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
        messages.add(str(caught.value))
    assert messages == {"self-service: credentials: ID number or password is wrong"}
    with pytest.raises(RegistryError) as caught:  # the right password no longer helps
        registry.report_loss_online(id_number=holder, password=PASSWORD, at=kit.at(2025, 9, 30, 21))
    assert "locked" in str(caught.value)
    registry.set_self_service_password(holder, "a new passphrase", actor="op", at=kit.at(2025, 10, 1))
    assert registry.report_loss_online(id_number=holder, password="a new passphrase",
                                       at=kit.at(2025, 10, 1, 1)).card.state is CardState.STOPPED


def test_passwords_are_never_stored_or_audited(kit, registry, holder):
    issue(kit, registry, holder)
    registry.set_self_service_password(holder, PASSWORD, actor="op", at=kit.at(2025, 9, 1, 10))
    with pytest.raises(RegistryError):
        registry.report_loss_online(id_number=holder, password="guess number one", at=kit.at(2025, 9, 30))
    stored = repr(kit.snapshot(registry)).encode()
    assert PASSWORD.encode() not in stored and b"guess number one" not in stored
    with pytest.raises(RegistryError) as caught:
        registry.set_self_service_password(holder, "12345678", actor="op")
    assert caught.value.field == "password" and "12345678" not in str(caught.value)


def test_a_written_report_freezes_the_card_and_the_medical_account_at_once(kit, registry, holder):
    card = issue(kit, registry, holder)
    medical = registry.person(holder).medical_account_id
    result = written(registry, holder, card, kit.at(2025, 9, 30, 10))
    assert result.card.state is CardState.FROZEN and registry.account_frozen(medical)
    assert registry.card_may_settle(card, kit.at(2025, 9, 30, 10))[0] is False
    assert registry.denylist_delta(0).added[0].card_number == card


def test_a_written_report_after_a_phone_report_cancels_the_restore(kit, registry, holder):
    card = issue(kit, registry, holder)
    phone(registry, holder, kit.at(2025, 9, 30, 21))
    result = written(registry, holder, card, kit.at(2025, 10, 9, 10))
    assert result.card.loss_report.previous.channel == "phone"
    report = tick(registry, kit.at(2025, 10, 20))
    assert report.restored == () and registry.card(card).state is CardState.FROZEN


def test_an_agent_reports_in_writing_with_their_own_id_registered(kit, registry, holder):
    card = issue(kit, registry, holder)
    agent = kit.citizen_id("19820304", 56)
    result = written(registry, holder, card, kit.at(2025, 9, 30, 10), agent_id=agent, agent_name="张小红")
    assert (result.card.loss_report.agent_id, result.card.loss_report.agent_name) == (agent, "张小红")
    assert result.card.public()["loss_report"]["agent_id"] == agent[:6] + "********" + agent[-4:]
    entry = registry.audit_entries()[-1]
    assert entry.details["agent_id"] == agent[:6] + "********" + agent[-4:]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"agent_id": "370102198203040565", "agent_name": "张小红"}, "agent_id"),  # wrong check character
        ({"agent_id": "370102198203040566"}, "agent_name"),
        ({"agent_id": "370102198005011234", "agent_name": "张三"}, "agent_id"),  # the holder themself
        ({"holder_name": "张四"}, "identity"),
        ({"holder_id": "370102198005011250"}, "identity"),
    ],
)
def test_a_written_report_with_bad_identity_or_agent_is_refused(kit, registry, holder, extra, field):
    card = issue(kit, registry, holder)
    values = {"holder_id": holder, "holder_name": "张三"}
    values.update(extra)
    code = ErrorCode.FAILED_PRECONDITION if field == "identity" else ErrorCode.INVALID_ARGUMENT
    refused(kit, registry, lambda: registry.report_loss_written(card, **values, actor="op"), field=field, code=code)


def test_an_employer_card_is_reported_in_writing_by_an_agent(kit, registry, holder):
    card = registry.issue_card(kit.UNIT, kind="employer", actor="op", at=kit.at(2025, 9, 1, 9)).card_number
    refused(kit, registry, lambda: registry.report_loss_written(card, holder_id=kit.UNIT, holder_name=kit.UNIT_NAME,
                                                                actor="op"), field="agent_id",
            code=ErrorCode.INVALID_ARGUMENT)
    result = registry.report_loss_written(card, holder_id=kit.UNIT, holder_name=kit.UNIT_NAME, agent_id=holder,
                                          agent_name="张三", actor="op", at=kit.at(2025, 9, 2))
    assert result.card.state is CardState.FROZEN
    refused(kit, registry, lambda: phone(registry, holder, kit.at(2025, 9, 3), card_number=card),
            field="card_number", code=ErrorCode.FAILED_PRECONDITION)


# -- working days and the tick -----------------------------------------------------------------------


def test_a_report_on_the_last_working_day_before_national_day_waits_out_the_holiday(kit, registry, holder):
    card = issue(kit, registry, holder)
    result = phone(registry, holder, kit.at(2025, 9, 30, 21, 15))
    # 1 to 8 October 2025 are holidays: the 2 working days are 9 and 10 October.
    assert result.restore_deadline == dt.date(2025, 10, 10) and result.warnings == ()
    assert result.restore_at == kit.at(2025, 10, 11)
    assert tick(registry, kit.at(2025, 10, 10, 23, 59)).restored == ()
    assert registry.card(card).state is CardState.STOPPED
    report = tick(registry, kit.at(2025, 10, 11, 8))
    assert [r.card_number for r in report.restored] == [card] and report.warnings == ()
    assert registry.card(card).state is CardState.ACTIVE
    restored = registry.history(card)[-1]
    assert (restored["event"], restored["actor"], restored["channel"]) == ("auto_restore", "system", "system")
    assert restored["at"] == kit.at(2025, 10, 11).isoformat()  # the rule's instant, not the tick's
    assert tick(registry, kit.at(2025, 10, 12)).restored == ()  # nothing twice


def test_a_make_up_working_day_on_a_sunday_counts(kit, registry, holder):
    assert chinese_calendar.is_workday(dt.date(2025, 9, 28))  # Sunday, worked for National Day
    issue(kit, registry, holder)
    result = phone(registry, holder, kit.at(2025, 9, 26, 17))  # Friday
    assert result.restore_deadline == dt.date(2025, 9, 29)  # Sunday 28th and Monday 29th


def test_n_is_a_city_setting_and_stays_with_the_report(kit):
    registry = kit.open(restore_workdays=3)
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1))
    card = issue(kit, registry, holder)
    result = phone(registry, holder, kit.at(2025, 9, 30, 21))
    assert result.restore_deadline == dt.date(2025, 10, 11)  # Saturday, a make-up working day
    kit.close(registry)
    registry = kit.open(restore_workdays=2)
    assert tick(registry, kit.at(2025, 10, 11, 12)).restored == ()  # still 3 for this report
    assert [r.card_number for r in tick(registry, kit.at(2025, 10, 12)).restored] == [card]


def test_a_year_the_calendar_does_not_cover_falls_back_to_weekdays_and_says_so(kit, registry):
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2027, 9, 1))
    card = issue(kit, registry, holder, (2027, 9, 1, 9))
    result = phone(registry, holder, kit.at(2027, 9, 30, 21))
    warning = f"2027 is not covered by chinesecalendar {chinese_calendar.__version__}; assuming Monday to Friday"
    assert result.restore_deadline == dt.date(2027, 10, 4)  # Friday 1 October counts, then Monday
    assert result.warnings == (warning,)
    waiting = tick(registry, kit.at(2027, 10, 2))
    assert waiting.warnings == (warning,) and waiting.waiting == 1
    report = tick(registry, kit.at(2027, 10, 5))
    assert [r.card_number for r in report.restored] == [card] and report.warnings == (warning,)
    assert registry.history(card)[-1]["event"] == "auto_restore"


def test_an_operator_holiday_table_covers_a_year_the_library_does_not(kit):
    data = kit.root / "data"
    data.mkdir()
    days = [f"2027-10-0{day},holiday" for day in range(1, 8)] + ["2027-10-09,workday"]
    (data / "holidays.csv").write_text("date,kind\n" + "\n".join(days) + "\n", encoding="utf-8")
    registry = kit.open(holiday_table="holidays.csv")
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2027, 9, 1))
    issue(kit, registry, holder, (2027, 9, 1, 9))
    result = phone(registry, holder, kit.at(2027, 9, 30, 21))
    assert result.restore_deadline == dt.date(2027, 10, 9) and result.warnings == ()  # 8th and make-up 9th


def test_a_calendar_without_enough_working_days_never_crashes(kit):
    data = kit.root / "data"
    data.mkdir()
    start = dt.date(2027, 1, 1)
    # Eleven years of nothing but holidays: longer than the calendar's bounded search for working days.
    days = [f"{(start + dt.timedelta(days=offset)).isoformat()},holiday" for offset in range(11 * 366)]
    (data / "holidays.csv").write_text("date,kind\n" + "\n".join(days) + "\n", encoding="utf-8")
    registry = kit.open(holiday_table="holidays.csv")
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2026, 12, 1))
    card = issue(kit, registry, holder, (2026, 12, 1, 9))
    result = phone(registry, holder, kit.at(2027, 1, 4, 9))
    assert result.card.state is CardState.STOPPED and result.restore_deadline is None
    assert "no restore deadline" in result.warnings[0]
    report = tick(registry, kit.at(2027, 6, 1))
    assert report.restored == () and report.waiting == 1 and "no restore deadline" in report.warnings[0]
    assert registry.card(card).state is CardState.STOPPED


def test_the_system_cannot_restore_before_the_deadline(kit, registry, holder):
    card = issue(kit, registry, holder)
    phone(registry, holder, kit.at(2025, 9, 30, 21))
    refused(kit, registry, lambda: registry.auto_restore(card, at=kit.at(2025, 10, 10, 12)), field="at",
            code=ErrorCode.FAILED_PRECONDITION)


def test_a_card_expires_at_the_end_of_its_expiry_date(kit):
    registry = kit.open(card_validity_years=1)
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1))
    card = issue(kit, registry, holder, (2025, 9, 2, 9))
    assert tick(registry, kit.at(2026, 9, 2, 23, 59)).expired == ()
    assert tick(registry, kit.at(2026, 9, 3, 0, 1)).expired == (card,)
    assert registry.card(card).state is CardState.EXPIRED
    assert registry.history(card)[-1]["at"] == kit.at(2026, 9, 3).isoformat()
    old, new = registry.renew(card, actor="op", at=kit.at(2026, 9, 10))
    assert (old.state, new.state, old.replaced_by) == (CardState.REPLACED, CardState.ACTIVE, new.card_number)


def test_a_stopped_card_that_expires_before_its_restore_deadline_expires(kit):
    registry = kit.open(card_validity_years=1)
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1))
    card = issue(kit, registry, holder, (2025, 9, 2, 9))
    result = phone(registry, holder, kit.at(2026, 9, 2, 10))  # Wednesday, the card's last valid day
    assert result.restore_deadline == dt.date(2026, 9, 4)
    report = tick(registry, kit.at(2026, 9, 10))
    assert (report.restored, report.expired, report.waiting) == ((), (card,), 0)
    assert [row["event"] for row in registry.history(card)][-2:] == ["report_loss_phone", "expire"]


# -- replacement, liability, the purse left behind ---------------------------------------------------


def funded(kit, registry, holder):
    card = issue(kit, registry, holder)
    registry.credit_contribution(holder, 50_000, actor="batch", at=kit.at(2025, 9, 2))
    registry.credit_contribution(holder, 20_000, actor="batch", at=kit.at(2025, 10, 2))
    registry.load_purse(card, 8_800, actor="op", at=kit.at(2025, 9, 3))
    return card


def test_replacement_keeps_the_medical_balance_and_history_and_leaves_the_purse_behind(kit, registry, holder):
    card = funded(kit, registry, holder)
    person = registry.person(holder)
    history_before = registry.ledger.account_transfers(person.medical_account_id).tobytes()
    refused(kit, registry, lambda: registry.replace(card, actor="op", at=kit.at(2025, 10, 9)), field="state",
            code=ErrorCode.FAILED_PRECONDITION)  # no written report yet
    written(registry, holder, card, kit.at(2025, 10, 9, 10))
    old, new = registry.replace(card, actor="op", at=kit.at(2025, 10, 10, 10))
    assert (old.state, new.state) == (CardState.REPLACED, CardState.ACTIVE)
    assert new.card_number != card and (old.replaced_by, new.replaces) == (new.card_number, card)
    assert registry.medical_balance(holder).credit_balance == 70_000
    assert registry.ledger.account_transfers(person.medical_account_id).tobytes() == history_before
    assert not registry.account_frozen(person.medical_account_id)  # works with the new card at once
    assert registry.ledger.balance(old.purse_account_id).credit_balance == 8_800  # stays behind
    assert registry.ledger.balance(new.purse_account_id).credit_balance == 0
    assert registry.card_may_settle(new.card_number, kit.at(2025, 10, 10, 11)) == (True, f"card {new.card_number} is active")
    assert card in [entry.card_number for entry in registry.denylist_delta(0).added]
    registry.cancel(new.card_number, reason="duplicate", actor="op", at=kit.at(2025, 10, 11))
    assert registry.card(card).state is CardState.REPLACED  # denylisted forever: nothing brings it back


def test_liability_is_fixed_by_the_acceptance_instant(kit, registry, holder):
    card = funded(kit, registry, holder)
    person = registry.person(holder)
    shop = (3 << 120) | 0x1001
    hospital = (3 << 120) | 0x1002
    created = registry.ledger.execute(accounts=accounts_array([
        {"id": shop, "ledger": LedgerId.PURSE, "code": AccountKind.OPERATOR_SETTLEMENT, "flags": 0, "owner": 0},
        {"id": hospital, "ledger": LedgerId.MEDICAL, "code": AccountKind.INSTITUTION_SETTLEMENT, "flags": 0, "owner": 0}]))
    assert created.ok

    def purse_purchase(transfer_id, at):
        may, why = registry.card_may_settle(card, at)
        if not may:
            return why
        result = registry.ledger.create_transfers(transfers_array([{
            "id": transfer_id, "debit_account_id": registry.card(card).purse_account_id, "credit_account_id": shop,
            "amount": 300, "ledger": LedgerId.PURSE, "code": TransferCode.PURCHASE}]))
        return TransferResult(int(result[0]["status"]))

    def medical_bill(transfer_id):
        result = registry.ledger.create_transfers(transfers_array([{
            "id": transfer_id, "debit_account_id": person.medical_account_id, "credit_account_id": hospital, "amount": 1_000,
            "ledger": LedgerId.MEDICAL, "code": TransferCode.SETTLEMENT}]))
        return TransferResult(int(result[0]["status"]))

    accepted = kit.at(2025, 9, 30, 21, 15)
    assert purse_purchase(1, accepted - dt.timedelta(minutes=5)) is TransferResult.OK
    assert medical_bill(2) is TransferResult.OK
    phone(registry, holder, accepted)
    # An offline purchase made a microsecond before acceptance and cleared later still stands ...
    assert purse_purchase(3, accepted - dt.timedelta(microseconds=1)) is TransferResult.OK
    # ... from the acceptance instant on, the registry refuses the card.
    assert "stopped since 2025-09-30T21:15:00+08:00" in purse_purchase(4, accepted)
    accepted_ns = int(accepted.timestamp()) * 10**9  # the ledger's timestamps are ns: the same answer
    assert registry.card_may_settle(card, accepted_ns)[0] is False
    assert registry.card_may_settle(card, accepted_ns - 1)[0] is True
    written(registry, holder, card, kit.at(2025, 10, 8, 9))
    assert medical_bill(5) is TransferResult.DEBIT_ACCOUNT_FROZEN  # the ledger itself refuses
    assert registry.ledger.balance(registry.card(card).purse_account_id).credit_balance == 8_800 - 600
    assert registry.medical_balance(holder).credit_balance == 70_000 - 1_000


def test_card_may_settle_for_unknown_and_not_yet_issued_cards(kit, registry, holder):
    card = issue(kit, registry, holder, (2025, 9, 10, 9))
    assert registry.card_may_settle("A99999999", kit.at(2025, 9, 11)) == (False, "card A99999999 is unknown")
    assert registry.card_may_settle(card, kit.at(2025, 9, 9))[0] is False
    assert registry.card_may_settle("bad", kit.at(2025, 9, 11))[0] is False


def test_the_purse_refund_is_off_by_default(kit, registry, holder):
    card = funded(kit, registry, holder)
    written(registry, holder, card, kit.at(2025, 10, 9, 10))
    registry.replace(card, actor="op", at=kit.at(2025, 10, 10))
    refused(kit, registry, lambda: registry.refund_purse(card, actor="op", at=kit.at(2026, 10, 10)),
            field="purse_refund_allowed", code=ErrorCode.FAILED_PRECONDITION)


def test_a_city_may_refund_the_purse_after_the_clearing_window(kit):
    registry = kit.open(purse_refund_allowed=True, purse_clearing_window_days=30)
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1))
    card = funded(kit, registry, holder)
    refused(kit, registry, lambda: registry.refund_purse(card, actor="op", at=kit.at(2025, 10, 9)), field="state",
            code=ErrorCode.FAILED_PRECONDITION)  # an active card's purse is the holder's to spend
    written(registry, holder, card, kit.at(2025, 10, 9, 10))
    registry.replace(card, actor="op", at=kit.at(2025, 10, 10))
    refused(kit, registry, lambda: registry.refund_purse(card, actor="op", at=kit.at(2025, 11, 8, 9, 59)),
            field="at", code=ErrorCode.FAILED_PRECONDITION)  # 30 days from the written report
    transfer = registry.refund_purse(card, actor="op", at=kit.at(2025, 11, 8, 10))
    record = registry.ledger.transfer(transfer)
    assert (int(record["code"]), int(record["amount"])) == (TransferCode.REDEMPTION, 8_800)
    assert registry.ledger.balance(registry.card(card).purse_account_id).credit_balance == 0
    assert registry.ledger.balance(registry.suspense_account_id).credits_posted == 8_800
    refused(kit, registry, lambda: registry.refund_purse(card, actor="op", at=kit.at(2025, 11, 9)), field="purse",
            code=ErrorCode.FAILED_PRECONDITION)


def test_a_purse_is_loaded_only_while_its_card_settles(kit, registry, holder):
    card = issue(kit, registry, holder)
    phone(registry, holder, kit.at(2025, 9, 30, 21))
    refused(kit, registry, lambda: registry.load_purse(card, 100, actor="op", at=kit.at(2025, 10, 1)), field="state",
            code=ErrorCode.FAILED_PRECONDITION)


def test_a_cancellation_needs_one_of_the_reasons(kit, registry, holder):
    card = issue(kit, registry, holder)
    refused(kit, registry, lambda: registry.cancel(card, reason="lost interest", actor="op"), field="reason",
            code=ErrorCode.INVALID_ARGUMENT)
    cancelled = registry.cancel(card, reason="emigration", note="moved abroad", actor="op", at=kit.at(2025, 9, 5))
    assert cancelled.cancel_reason == "emigration"
    assert registry.history(card)[-1]["reason"] == "emigration: moved abroad"
    assert issue(kit, registry, holder, (2025, 9, 6)) != card  # a new card may be issued after a cancellation


def test_a_new_card_after_cancelling_a_frozen_one_unfreezes_the_medical_account(kit, registry, holder):
    card = issue(kit, registry, holder)
    written(registry, holder, card, kit.at(2025, 9, 5))
    registry.cancel(card, reason="duplicate", actor="op", at=kit.at(2025, 9, 6))
    medical = registry.person(holder).medical_account_id
    assert registry.account_frozen(medical)
    issue(kit, registry, holder, (2025, 9, 7))
    assert not registry.account_frozen(medical)


# -- PIN reset requests ------------------------------------------------------------------------------


def test_a_pin_reset_request_is_recorded_and_closed(kit, registry, holder):
    card = issue(kit, registry, holder)
    request = registry.request_pin_reset(card, holder_id=holder, holder_name="张三", actor="op",
                                         at=kit.at(2025, 9, 5))
    assert request.state.value == "requested" and registry.card(card).open_pin_reset == request.request_id
    refused(kit, registry, lambda: registry.request_pin_reset(card, holder_id=holder, holder_name="张三", actor="op"),
            field="pin_reset", code=ErrorCode.ALREADY_EXISTS)
    closed = registry.close_pin_reset(request.request_id, outcome="completed", actor="terminal-7",
                                      at=kit.at(2025, 9, 5, 10))
    assert closed.state.value == "completed" and registry.card(card).open_pin_reset is None
    assert registry.pin_reset(request.request_id) == closed
    refused(kit, registry, lambda: registry.close_pin_reset(request.request_id, outcome="cancelled", actor="op"),
            field="pin_reset", code=ErrorCode.FAILED_PRECONDITION)


def test_a_pin_reset_needs_an_active_card_and_the_holder(kit, registry, holder):
    card = issue(kit, registry, holder)
    refused(kit, registry, lambda: registry.request_pin_reset(card, holder_id=holder, holder_name="李四", actor="op"),
            field="identity", code=ErrorCode.FAILED_PRECONDITION)
    phone(registry, holder, kit.at(2025, 9, 30))
    refused(kit, registry, lambda: registry.request_pin_reset(card, holder_id=holder, holder_name="张三", actor="op"),
            field="state", code=ErrorCode.FAILED_PRECONDITION)
