"""The registry: employers, persons, cards, their accounts on the ledger, settings, and bad input."""

import datetime as dt
import json

import pytest
from citycard.core.identity import check_character, unit_check_character
from citycard.core.lifecycle import CardState
from citycard.core.records import AccountFlags, AccountKind, LedgerId
from citycard.core.registry import Registry
from citycard.core.registry_records import ErrorCode, RegistryError
from citycard.core.settings import Settings, SettingsError, load_settings

AT = (2025, 9, 1, 9, 0)


@pytest.fixture
def registry(kit):
    return kit.open()


@pytest.fixture
def person_id(kit, registry):
    number = kit.citizen_id()
    kit.add_person(registry, number, at=kit.at(*AT))
    return number


def refused(kit, registry, operation, *, field, code=ErrorCode.INVALID_ARGUMENT):
    """Run an operation that must be refused; assert the error and that nothing was stored."""
    before = kit.snapshot(registry)
    with pytest.raises(RegistryError) as caught:
        operation()
    assert caught.value.field == field, str(caught.value)
    assert caught.value.code is code
    assert kit.snapshot(registry) == before
    return caught.value


# -- employers and persons ---------------------------------------------------------------------------


def test_a_person_is_registered_with_a_medical_account_opened_in_the_same_batch(kit, registry, person_id):
    person = registry.person(person_id)
    assert (person.name, person.gender.value, person.date_of_birth) == ("张三", "male", dt.date(1980, 5, 1))
    assert person.employer == kit.UNIT
    assert person.medical_account_id == (1 << 120) | 1
    account = registry.ledger.account(person.medical_account_id)
    assert int(account["ledger"]) == LedgerId.MEDICAL
    assert int(account["code"]) == AccountKind.PERSON_MEDICAL
    assert int(account["flags"]) & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    stored = registry.ledger.get("persons", person_id.encode())
    assert "张三".encode() in stored  # JSON keeps Chinese as itself (ensure_ascii=False)


def test_the_first_write_opens_the_system_accounts(registry, person_id):
    for account_id, ledger_id, kind in (
        (registry.fund_account_id, LedgerId.MEDICAL, AccountKind.FUND),
        (registry.load_account_id, LedgerId.PURSE, AccountKind.OPERATOR_SETTLEMENT),
        (registry.suspense_account_id, LedgerId.PURSE, AccountKind.SUSPENSE),
    ):
        account = registry.ledger.account(account_id)
        assert (int(account["ledger"]), int(account["code"])) == (ledger_id, kind)


def test_a_lower_case_x_check_character_finds_the_person(kit, registry):
    body = "11010519491231002"
    number = body + check_character(body)
    assert number.endswith("X")
    registry.add_person(id_number=number.lower(), name="李四", gender="female", date_of_birth="1949-12-31",
                        residence="北京市", household_registration="北京市", status="retired", actor="op",
                        at=kit.at(*AT))
    assert registry.person(number.lower()).id_number == number


def test_public_view_masks_the_id_number_and_the_birth_date_it_contains(registry, person_id):
    public = registry.person(person_id).public()
    assert public["id_number"] == person_id[:6] + "*" * 8 + person_id[-4:]
    assert public["date_of_birth"] == "****-**-**"
    assert registry.person(person_id).public(unmask=True)["id_number"] == person_id


def test_categories_are_kept_once_each(kit, registry):
    number = kit.citizen_id("19500101", 11)
    person = registry.add_person(id_number=number, name="王五", gender="male", date_of_birth="1950-01-01",
                                 residence="济南市", household_registration="济南市", status="retired",
                                 categories=["senior", "disabled", "senior"], actor="op", at=kit.at(*AT))
    assert [category.value for category in person.categories] == ["disabled", "senior"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id_number": "370102198005011235"}, "check_character"),  # the right one is 4
        ({"date_of_birth": "1980-05-02"}, "date_of_birth"),
        ({"gender": "female"}, "gender"),
        ({"id_number": "990102198005011234"}, "region"),
        ({"id_number": "37010219800501123"}, "length"),
        ({"date_of_birth": "1980/05/01"}, "date_of_birth"),
        ({"name": "张\u0000三"}, "name"),
        ({"name": "Zoë 😀"}, "name"),
        ({"nationality": "China"}, "nationality"),
        ({"residence": ""}, "residence"),
        ({"status": "working"}, "status"),
        ({"categories": ["veteran"]}, "categories"),
        ({"employer": None}, "employer"),  # employed without an insured unit
        ({"employer": "91370100MA3C5LQX6A"}, "unit_code"),  # wrong check character of the unit code
    ],
)
def test_bad_person_input_is_refused_and_changes_nothing(kit, registry, person_id, change, field):
    values = {"id_number": kit.citizen_id("19800501", 125), "name": "赵六", "gender": "male", "date_of_birth": "1980-05-01",
                  "residence": "济南市", "household_registration": "济南市", "status": "employed", "employer": kit.UNIT}
    if "id_number" in change and "date_of_birth" not in change:
        values["id_number"] = change.pop("id_number")
    values.update(change)
    error = refused(kit, registry, lambda: registry.add_person(**values, actor="op", at=kit.at(*AT)), field=field)
    assert values["id_number"] not in str(error)  # never a whole ID number in a message


def test_an_unknown_employer_is_refused(kit, registry, person_id):
    other_unit = "91370100MA3C5LQX7" + unit_check_character("91370100MA3C5LQX7")
    error = refused(kit, registry, lambda: registry.add_person(
        id_number=kit.citizen_id("19800501", 127), name="赵六", gender="male", date_of_birth="1980-05-01",
        residence="济南市", household_registration="济南市", status="employed", employer=other_unit, actor="op",
        at=kit.at(*AT)), field="unit_code", code=ErrorCode.NOT_FOUND)
    assert other_unit in str(error)


def test_a_duplicate_person_is_refused_and_changes_nothing(kit, registry, person_id):
    error = refused(kit, registry, lambda: kit.add_person(registry, person_id, name="张三", at=kit.at(*AT)),
                    field="id_number", code=ErrorCode.ALREADY_EXISTS)
    assert "370102********1234" in str(error)


def test_a_duplicate_employer_is_refused(kit, registry, person_id):
    refused(kit, registry, lambda: registry.add_employer(kit.UNIT, "另一个名字", actor="op"), field="unit_code",
            code=ErrorCode.ALREADY_EXISTS)


def test_an_unknown_person_is_not_found(kit, registry, person_id):
    with pytest.raises(RegistryError) as caught:
        registry.person(kit.citizen_id("19900101", 1))
    assert caught.value.code is ErrorCode.NOT_FOUND


def test_the_system_actor_cannot_act_at_a_counter(kit, registry):
    refused(kit, registry, lambda: registry.add_employer(kit.UNIT, kit.UNIT_NAME, actor="system"), field="actor")


# -- cards -------------------------------------------------------------------------------------------


def test_a_card_issued_at_the_counter_is_made_on_the_spot_and_opens_a_purse(kit, registry, person_id):
    card = registry.issue_card(person_id, actor="op", at=kit.at(2025, 9, 2, 10))
    assert card.state is CardState.ACTIVE
    assert len(card.card_number) == 9 and card.card_number == "A00000001"
    assert len(bytes.fromhex(card.card_id_code)) == 16 and card.card_id_code.startswith("370100D156000005")
    assert (card.issue_date, card.expiry_date) == (dt.date(2025, 9, 2), dt.date(2035, 9, 2))
    assert [row["event"] for row in registry.history(card.card_number)] == [
        "issue", "print", "register", "distribute", "activate"]
    purse = registry.ledger.account(card.purse_account_id)
    assert card.purse_account_id == (2 << 120) | 1
    assert (int(purse["ledger"]), int(purse["code"])) == (LedgerId.PURSE, AccountKind.CARD_PURSE)
    assert registry.cards_of(person_id) == [card]


def test_a_card_ordered_through_a_batch_walks_the_production_steps(kit, registry, person_id):
    card = registry.issue_card(person_id, actor="op", channel="batch", at=kit.at(2025, 9, 2, 10))
    assert card.state is CardState.ORDERED
    for step, state in (("print", "printed"), ("register", "registered"), ("distribute", "distributed")):
        card = registry.advance(card.card_number, step, actor="op", channel="batch", at=kit.at(2025, 9, 3))
        assert card.state.value == state
    card = registry.advance(card.card_number, "activate", actor="op", at=kit.at(2025, 9, 4))
    assert card.state is CardState.ACTIVE


def test_legacy_numbers_are_aliases_of_the_cpu_card(kit, registry, person_id):
    card = registry.issue_card(person_id, actor="op", legacy_aliases={"barcode": "bc0042", "magstripe": "6217001234"},
                               at=kit.at(2025, 9, 2))
    assert card.technology.value == "cpu"
    assert registry.card("BC0042").card_number == card.card_number
    assert registry.card("6217001234").legacy_aliases == {"barcode": "BC0042", "magstripe": "6217001234"}


def test_a_migrated_card_keeps_its_number_and_generated_numbers_skip_it(kit, registry, person_id):
    registry.issue_card(person_id, actor="op", card_number="a00000002", at=kit.at(2025, 9, 2))
    other = kit.citizen_id("19900215", 246)
    kit.add_person(registry, other, "李四", at=kit.at(2025, 9, 2))
    assert registry.issue_card(other, actor="op", at=kit.at(2025, 9, 2)).card_number == "A00000001"
    third = kit.citizen_id("19910215", 246)
    kit.add_person(registry, third, "王五", at=kit.at(2025, 9, 2))
    assert registry.issue_card(third, actor="op", at=kit.at(2025, 9, 2)).card_number == "A00000003"


def test_a_person_has_at_most_one_usable_card(kit, registry, person_id):
    card = registry.issue_card(person_id, actor="op", at=kit.at(2025, 9, 2))
    error = refused(kit, registry, lambda: registry.issue_card(person_id, actor="op"), field="holder",
                    code=ErrorCode.FAILED_PRECONDITION)
    assert card.card_number in str(error)


def test_an_alias_already_taken_is_refused(kit, registry, person_id):
    registry.issue_card(person_id, actor="op", legacy_aliases={"barcode": "BC0042"}, at=kit.at(2025, 9, 2))
    other = kit.citizen_id("19900215", 246)
    kit.add_person(registry, other, "李四", at=kit.at(2025, 9, 2))
    refused(kit, registry, lambda: registry.issue_card(other, actor="op", legacy_aliases={"magstripe": "bc0042"}),
            field="legacy_magstripe", code=ErrorCode.ALREADY_EXISTS)


@pytest.mark.parametrize("number", ["A99999999", "ZZZZ", "A0000000!", ""])
def test_an_unknown_or_malformed_card_is_refused(kit, registry, person_id, number):
    registry.issue_card(person_id, actor="op", at=kit.at(2025, 9, 2))
    code = ErrorCode.NOT_FOUND if number.isalnum() else ErrorCode.INVALID_ARGUMENT
    refused(kit, registry, lambda: registry.report_loss_written(number, holder_id=person_id, holder_name="张三",
                                                                actor="op"), field="card_number", code=code)


def test_an_employer_card_has_a_purse_and_no_medical_account(kit, registry, person_id):
    card = registry.issue_card(kit.UNIT, kind="employer", actor="op", at=kit.at(2025, 9, 2))
    assert card.kind.value == "employer" and card.holder == kit.UNIT
    assert registry.ledger.account(card.purse_account_id) is not None
    assert card.public()["holder"] == kit.UNIT  # a unit code is not personal data


def test_amounts_are_whole_fen(kit, registry, person_id):
    for amount in (0, -5, 1.5, True, 10**12):
        refused(kit, registry, lambda amount=amount: registry.credit_contribution(person_id, amount, actor="op"),
                field="amount_fen")


# -- storage and settings ----------------------------------------------------------------------------


def test_a_second_process_cannot_open_the_same_directory_for_writing(kit, registry):
    with pytest.raises(RegistryError) as caught:
        Registry.open(kit.root / "data")
    assert caught.value.field == "data"
    Registry.open(kit.root / "data", write=False).close()  # readers need no lock


def test_a_read_only_open_of_an_empty_directory_creates_nothing(kit):
    with pytest.raises(RegistryError) as caught:
        Registry.open(kit.root / "nothing", create=False, write=False)
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert not (kit.root / "nothing").exists()


def test_settings_default_without_a_file(tmp_path):
    assert load_settings(tmp_path) == Settings()
    assert (Settings().restore_workdays, Settings().purse_refund_allowed) == (2, False)


def test_settings_are_read_from_the_registry_section(tmp_path):
    (tmp_path / "citycard.json").write_text(json.dumps({
        "registry": {"restore_workdays": 3, "purse_refund_allowed": True, "purse_clearing_window_days": 7,
                     "holiday_table": "h.csv"},
        "server": {"port": 1}}), encoding="utf-8")
    settings = load_settings(tmp_path)
    assert (settings.restore_workdays, settings.purse_refund_allowed, settings.purse_clearing_window_days) == (3, True, 7)
    assert settings.holiday_table == tmp_path / "h.csv"


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"restore_workday": 3}, "registry.restore_workday"),
        ({"restore_workdays": 0}, "registry.restore_workdays"),
        ({"restore_workdays": "2"}, "registry.restore_workdays"),
        ({"purse_refund_allowed": 1}, "registry.purse_refund_allowed"),
        ({"issuer_region_code": "37010"}, "registry.issuer_region_code"),
        ({"card_validity_years": True}, "registry.card_validity_years"),
    ],
)
def test_a_wrong_setting_names_the_file_and_the_field(tmp_path, section, field):
    path = tmp_path / "citycard.json"
    path.write_text(json.dumps({"registry": section}), encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path)
    assert caught.value.field == field
    assert str(path) in str(caught.value)


def test_a_settings_file_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "citycard.json").write_text("{restore_workdays: 2", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path)
    assert caught.value.field == "file"


def test_a_bad_holiday_table_is_refused_when_the_registry_opens(kit):
    (kit.root / "data").mkdir()
    (kit.root / "data" / "holidays.csv").write_text("date,kind\n2027-10-01,vacation\n", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        kit.open(holiday_table="holidays.csv")
    assert "row 2" in str(caught.value) and caught.value.field == "kind"


def test_a_stored_row_that_does_not_fit_is_an_error_naming_it(kit, registry, person_id):
    card = registry.issue_card(person_id, actor="op", at=kit.at(2025, 9, 2))
    row = json.loads(registry.ledger.get("cards", card.card_number.encode()))
    row["state"] = "misplaced"
    assert registry.ledger.execute(puts=[("cards", card.card_number.encode(), json.dumps(row).encode())]).ok
    with pytest.raises(RegistryError) as caught:
        registry.card(card.card_number)
    assert caught.value.field == "stored_row" and f"card {card.card_number}" in str(caught.value)
