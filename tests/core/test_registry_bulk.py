"""Bulk enrolment (what production batches use): ``prechecked`` rows store exactly what checked rows
store, a malformed prechecked ID number is still refused, and the account records are the same
whichever way they are built."""

import numpy as np
import pytest
from citycard.core.ledger import LedgerInputError, _accounts_alike, accounts_array, u128_words
from citycard.core.lifecycle import Channel
from citycard.core.records import ACCOUNT_DTYPE, AccountFlags, AccountKind, LedgerId
from citycard.core.registry import OrderedCard
from citycard.core.registry_records import ErrorCode, RegistryError
from citycard.core.registry_store import PERSONS as PERSONS_TABLE

AT = (2025, 9, 1, 9, 0)
PERSONS = 5


def enrol(kit, registry, numbers, *, prechecked):
    at = kit.at(*AT)
    registry.add_employer(kit.UNIT, kit.UNIT_NAME, actor="op", at=at)
    stage = registry.begin(at)
    for number in numbers:
        person = registry.stage_person(
            stage, id_number=number, name="欧阳·娜娜", gender="female", date_of_birth="1980-05-01",
            residence="济南市历下区", household_registration="济南市", status="employed", employer=kit.UNIT,
            actor="bulk", channel=Channel.BATCH, at=at, audit=False, prechecked=prechecked)
        registry.stage_card(stage, person, actor="bulk", channel=Channel.BATCH, at=at, audit=False,
                            prechecked=prechecked)
    stage.audit(actor="bulk", channel=Channel.BATCH, action="bulk", subject="test", at=at)
    stage.commit("bulk enrolment")


def without_timestamps(snapshot):
    """A snapshot with the accounts' ledger timestamps (the wall clock at the commit) zeroed."""
    accounts = np.frombuffer(snapshot["accounts"], dtype=ACCOUNT_DTYPE).copy()
    accounts["timestamp"] = 0
    return {**snapshot, "accounts": accounts.tobytes()}


def test_prechecked_rows_store_the_bytes_that_checked_rows_store(kit):
    numbers = [kit.citizen_id(sequence=120 + 2 * index) for index in range(PERSONS)]
    checked, prechecked = kit.open("checked"), kit.open("prechecked")
    enrol(kit, checked, numbers, prechecked=False)
    enrol(kit, prechecked, numbers, prechecked=True)
    assert without_timestamps(kit.snapshot(prechecked)) == without_timestamps(kit.snapshot(checked))
    person = prechecked.person(numbers[0])
    assert (person.gender.value, person.name) == ("female", "欧阳·娜娜")
    assert len(prechecked.cards_of(numbers[-1])) == 1


@pytest.mark.parametrize("id_number", ["37010219800501012x", "3701021980050101", "37010A198005010120", 370102])
def test_a_malformed_prechecked_id_number_is_refused_and_nothing_is_staged(kit, id_number):
    registry = kit.open()
    at = kit.at(*AT)
    registry.add_employer(kit.UNIT, kit.UNIT_NAME, actor="op", at=at)
    before = kit.snapshot(registry)
    stage = registry.begin(at)
    with pytest.raises(RegistryError) as caught:
        registry.stage_person(stage, id_number=id_number, name="张三", gender="male", date_of_birth="1980-05-01",
                              residence="济南市", household_registration="济南市", status="employed",
                              employer=kit.UNIT, actor="bulk", channel=Channel.BATCH, at=at, audit=False,
                              prechecked=True)
    assert caught.value.field == "id_number"
    assert stage.accounts == []
    assert kit.snapshot(registry) == before


def test_without_prechecked_a_second_usable_card_is_still_refused(kit):
    registry = kit.open()
    number = kit.citizen_id()
    kit.add_person(registry, number, at=kit.at(*AT))
    registry.issue_card(number, actor="op", at=kit.at(*AT))
    stage = registry.begin(kit.at(*AT))
    with pytest.raises(RegistryError) as caught:
        registry.stage_card(stage, number, actor="bulk", at=kit.at(*AT), audit=False)
    assert (caught.value.field, caught.value.code) == ("holder", ErrorCode.FAILED_PRECONDITION)


def record_by_record(rows):
    """The account records set one field of one record at a time: the reference."""
    array = np.zeros(len(rows), dtype=ACCOUNT_DTYPE)
    for index, row in enumerate(rows):
        for name, value in row.items():
            array[index][name] = u128_words(value) if name in ("id", "owner") else value
    return array


def test_accounts_built_a_column_at_a_time_are_the_records_set_one_by_one():
    rows = [{"id": (1 << 120) | n, "ledger": LedgerId.MEDICAL, "code": AccountKind.PERSON_MEDICAL,
             "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS, "owner": n} for n in range(1, 50)]
    rows.insert(7, {"id": 2**128 - 1, "user_data": 2**64 - 1, "ledger": 2})  # fields the others lack
    rows.append({"id": 5, "timestamp": 0})
    assert accounts_array(rows).tobytes() == record_by_record(rows).tobytes()
    assert len(accounts_array([])) == 0


@pytest.mark.parametrize("rows, message", [
    ([{"id": 1}, {"id": 2, "colour": 1}], "row 1: unknown field 'colour'"),
    ([{"id": 1, "reserved": b""}], "row 0: reserved must stay zero"),
    ([{"id": 1, "code": 1.0}], "row 0: code=1.0 is not an unsigned integer"),
    ([{"id": 1, "flags": -1}], "row 0: flags=-1 is not an unsigned integer"),
    ([{"id": 2**128}], "is not a u128"),
])
def test_a_wrong_account_field_is_named_with_its_row(rows, message):
    with pytest.raises(LedgerInputError, match=message):
        accounts_array(rows)


def test_accounts_of_alike_rows_are_the_records_set_one_by_one():
    """A commit's accounts (every row the same fields, integers in range) take the column-wise check."""
    rows = [{"id": (kind << 120) | n, "ledger": ledger, "code": code, "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS,
             "owner": n} for n in range(1, 50) for kind, ledger, code in (
                (1, LedgerId.MEDICAL, AccountKind.PERSON_MEDICAL), (2, LedgerId.PURSE, AccountKind.CARD_PURSE))]
    rows.append({"id": 2**128 - 1, "ledger": 2**32 - 1, "code": 2**16 - 1, "flags": True, "owner": 2**128 - 1})
    assert _accounts_alike(rows) is not None
    assert accounts_array(rows).tobytes() == record_by_record(rows).tobytes()


def enrol_in_bulk(kit, registry, numbers, before):
    """``enrol``'s rows through a BulkEnrolment; ``before`` were registered earlier."""
    at = kit.at(*AT)
    stage = registry.begin(at)
    bulk = registry.bulk_enrolment(stage, actor="bulk", channel=Channel.BATCH, at=at)
    cards = []
    for number in numbers:
        registered = bulk.register(
            id_number=number, name="欧阳·娜娜", date_of_birth="1980-05-01", residence="济南市历下区",
            household_registration="济南市", status="employed", employer=kit.UNIT)
        assert registered is (number not in before)
        cards.append(bulk.order_card(number))
    stage.audit(actor="bulk", channel=Channel.BATCH, action="bulk", subject="test", at=at)
    stage.commit("bulk enrolment")
    assert cards == [OrderedCard.of(registry.card(card.card_number)) for card in cards]


def enrol_row_by_row(kit, registry, numbers, before):
    at = kit.at(*AT)
    stage = registry.begin(at)
    for number in numbers:
        holder = number
        if number not in before:
            holder = registry.stage_person(
                stage, id_number=number, name="欧阳·娜娜", gender="female", date_of_birth="1980-05-01",
                residence="济南市历下区", household_registration="济南市", status="employed", employer=kit.UNIT,
                actor="bulk", channel=Channel.BATCH, at=at, audit=False, prechecked=True)
        registry.stage_card(stage, holder, actor="bulk", channel=Channel.BATCH, at=at, audit=False, prechecked=True)
    stage.audit(actor="bulk", channel=Channel.BATCH, action="bulk", subject="test", at=at)
    stage.commit("bulk enrolment")


def test_a_bulk_enrolment_stores_the_bytes_of_prechecked_rows(kit):
    """New persons, and persons registered before (one with a frozen medical account, which the new
    card's order lifts): the same rows, accounts, changes and audit entries either way."""
    numbers = [kit.citizen_id(sequence=120 + 2 * index) for index in range(PERSONS)]
    before = {numbers[1], numbers[3]}
    snapshots = []
    for name, enrol_rows in (("row_by_row", enrol_row_by_row), ("bulk", enrol_in_bulk)):
        registry = kit.open(name)
        registry.add_employer(kit.UNIT, kit.UNIT_NAME, actor="op", at=kit.at(*AT))
        for number in sorted(before):
            kit.add_person(registry, number, name="欧阳·娜娜", at=kit.at(*AT))
        registry.ledger.freeze(registry.person(numbers[3]).medical_account_id)
        enrol_rows(kit, registry, numbers, before)
        assert not registry.account_frozen(registry.person(numbers[3]).medical_account_id)
        snapshots.append(without_timestamps(kit.snapshot(registry)))
    assert snapshots[0] == snapshots[1]


def test_a_bulk_enrolment_leaves_a_registered_person_to_the_caller_and_refuses_a_counter(kit):
    registry = kit.open()
    number = kit.citizen_id()
    kit.add_person(registry, number, at=kit.at(*AT))
    key = number.encode("ascii")
    stage = registry.begin(kit.at(*AT))
    bulk = registry.bulk_enrolment(stage, actor="bulk", at=kit.at(*AT))
    assert not bulk.register(id_number=number, name="李四", date_of_birth="1980-05-01", residence="济南市",
                             household_registration="济南市", status="employed", employer=kit.UNIT)
    assert stage.accounts == []
    assert stage.get(PERSONS_TABLE, key) == registry.ledger.get(PERSONS_TABLE, key)
    with pytest.raises(RegistryError) as caught:
        registry.bulk_enrolment(stage, actor="op", channel=Channel.COUNTER, at=kit.at(*AT))
    assert caught.value.field == "channel"
