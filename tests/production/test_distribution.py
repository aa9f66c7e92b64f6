"""Personalisation, distribution and activation: the chip holds the holder's data and keys, cards go to
the employer and then to their holders, and the holder's own PIN replaces the initial one at activation."""

from __future__ import annotations

import datetime as dt

import pytest
from citycard.apps.production import (
    INITIAL_PIN,
    ProductionError,
    RowState,
    activate,
    activate_financial,
    card_profile,
    distribute_to_employer,
    distribution,
    hand_over,
    open_chip,
    personalize_batch,
    register_printed,
)
from citycard.card import (
    CardChannel,
    FileStore,
    IssuerHost,
    MasterKeys,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
)
from citycard.card.sw import VerificationFailed

from .helpers import NOW, Production, handed_over_batch, printed_results, reviewed_batch

TERMINAL_ID = bytes.fromhex("001122334455")


def _terminal(card: VirtualCard, keys: MasterKeys) -> Terminal:
    return Terminal(CardChannel(MemoryTransport(card)), SoftSam(keys, TERMINAL_ID), host=IssuerHost(keys))


def test_personalisation_writes_the_holder_and_working_keys(prod: Production, master_keys: MasterKeys) -> None:
    batch_id, _ = reviewed_batch(prod, 2)
    path, _ = printed_results(prod, batch_id)
    register_printed(prod.registry, prod.store, batch_id, path, actor="op")
    result = personalize_batch(prod.registry, prod.store, prod.settings, batch_id, master_keys, actor="op")
    assert result.personalized == 2 and not result.problems
    for row in prod.store.rows(batch_id):
        assert row.state is RowState.PERSONALIZED
        terminal = _terminal(open_chip(prod.store, row.card_number), master_keys)
        on_chip = terminal.read_holder()
        assert (on_chip.identity.card_number, on_chip.identity.card_id_code) == (row.card_number, row.card_id_code)
        assert (on_chip.holder.ssn, on_chip.holder.name, on_chip.holder.birth_date) == (
            row.id_number, row.name, row.date_of_birth)
        assert on_chip.holder.birthplace == row.id_number[:6] and on_chip.holder.ethnicity == row.ethnicity
        terminal.verify_pin(INITIAL_PIN)
        # The purse keys are diversified from the same masters a SAM holds: a load and a purchase work.
        terminal.load(5_000)
        assert terminal.purchase(200).balance_after_fen == 4_800
    again = personalize_batch(prod.registry, prod.store, prod.settings, batch_id, master_keys, actor="op")
    assert (again.personalized, again.already) == (0, 2)


def test_an_interrupted_personalisation_is_finished_without_writing_chips_twice(
        prod: Production, master_keys: MasterKeys) -> None:
    batch_id, _ = reviewed_batch(prod, 2)
    path, _ = printed_results(prod, batch_id)
    register_printed(prod.registry, prod.store, batch_id, path, actor="op")
    first = prod.store.rows(batch_id)[0]
    prod.store.chips_dir.mkdir(parents=True, exist_ok=True)
    FileStore(prod.store.chip_path(first.card_number)).create(personalize(card_profile(first, prod.settings),
                                                                          master_keys))
    written = prod.store.chip_path(first.card_number).read_bytes()
    result = personalize_batch(prod.registry, prod.store, prod.settings, batch_id, master_keys, actor="op")
    assert result.personalized == 2 and prod.store.chip_path(first.card_number).read_bytes() == written


def test_distribution_hand_over_and_activation(prod: Production, master_keys: MasterKeys) -> None:
    batch_id, _ = handed_over_batch(prod, master_keys, 3)
    rows = prod.store.rows(batch_id)
    assert {row.state for row in rows} == {RowState.HANDED_OVER}
    assert rows[0].at_employer["receiver"] == "王经理"
    assert prod.registry.card(rows[0].card_number).state.value == "distributed"
    row = rows[0]
    person = prod.registry.person(row.id_number)
    later = NOW + dt.timedelta(days=3)
    activated = activate(prod.registry, prod.store, row.card_number, id_number=row.id_number, name=person.name,
                         institution="济南市社保服务中心", new_pin="482915", actor="op", at=later)
    assert activated.state is RowState.ACTIVATED and activated.activated["institution"] == "济南市社保服务中心"
    assert prod.registry.card(row.card_number).state.value == "active"
    assert prod.registry.card_may_settle(row.card_number, later + dt.timedelta(seconds=1))[0]
    terminal = _terminal(open_chip(prod.store, row.card_number), master_keys)
    terminal.verify_pin("482915")
    with pytest.raises(VerificationFailed):
        terminal.verify_pin(INITIAL_PIN)
    bank = activate_financial(prod.registry, prod.store, row.card_number, bank="中国银行济南分行", actor="op")
    assert bank.bank_activation["bank"] == "中国银行济南分行"
    with pytest.raises(ProductionError, match="already"):
        activate_financial(prod.registry, prod.store, row.card_number, bank="中国银行济南分行", actor="op")


def test_activation_refuses_the_wrong_holder_a_weak_pin_and_an_early_card(
        prod: Production, master_keys: MasterKeys) -> None:
    batch_id, _ = handed_over_batch(prod, master_keys, 2)
    row = prod.store.rows(batch_id)[0]
    other = prod.store.rows(batch_id)[1]
    name = prod.registry.person(row.id_number).name
    before = prod.snapshot()
    chip_before = prod.store.chip_path(row.card_number).read_bytes()
    with pytest.raises(ProductionError, match="not the holder's"):
        activate(prod.registry, prod.store, row.card_number, id_number=other.id_number, name=name,
                 institution="医院", new_pin="482915", actor="op")
    for weak in (INITIAL_PIN, "111111", "12345", "abcdef"):
        with pytest.raises(ProductionError, match="pin"):
            activate(prod.registry, prod.store, row.card_number, id_number=row.id_number, name=name,
                     institution="医院", new_pin=weak, actor="op")
    with pytest.raises(ProductionError, match="financial|activated first"):
        activate_financial(prod.registry, prod.store, row.card_number, bank="银行", actor="op")
    assert prod.snapshot() == before and prod.store.chip_path(row.card_number).read_bytes() == chip_before


def test_activation_waits_for_the_hand_over(prod: Production, master_keys: MasterKeys) -> None:
    batch_id, _ = reviewed_batch(prod, 2)
    path, _ = printed_results(prod, batch_id)
    register_printed(prod.registry, prod.store, batch_id, path, actor="op")
    personalize_batch(prod.registry, prod.store, prod.settings, batch_id, master_keys, actor="op")
    distribute_to_employer(prod.registry, prod.store, batch_id, receiver="王经理", actor="op")
    row = prod.store.rows(batch_id)[0]
    with pytest.raises(ProductionError, match="record the hand-over first"):
        activate(prod.registry, prod.store, row.card_number, id_number=row.id_number,
                 name=prod.registry.person(row.id_number).name, institution="医院", new_pin="482915", actor="op")
    result = hand_over(prod.registry, prod.store, batch_id, cards=[row.card_number], actor="op")
    assert result.moved == 1 and prod.store.rows(batch_id)[1].state is RowState.AT_EMPLOYER


def test_an_activation_interrupted_after_the_chip_is_finished_by_activating_again(
        prod: Production, master_keys: MasterKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    batch_id, _ = handed_over_batch(prod, master_keys, 1)
    row = prod.store.rows(batch_id)[0]
    name = prod.registry.person(row.id_number).name
    real_begin = prod.registry.begin

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut at the counter")

    monkeypatch.setattr(prod.registry, "begin", crash)
    with pytest.raises(KeyboardInterrupt):
        activate(prod.registry, prod.store, row.card_number, id_number=row.id_number, name=name, institution="医院",
                 new_pin="482915", actor="op")
    assert prod.registry.card(row.card_number).state.value == "distributed"
    monkeypatch.setattr(prod.registry, "begin", real_begin)
    activate(prod.registry, prod.store, row.card_number, id_number=row.id_number, name=name, institution="医院",
             new_pin="482915", actor="op")
    assert prod.registry.card(row.card_number).state.value == "active"
    assert distribution.check_pin("482915") == "482915"


def test_the_audit_log_records_each_step_once_and_stays_intact(prod: Production, master_keys: MasterKeys) -> None:
    _, people = handed_over_batch(prod, master_keys, 3)
    actions = [entry.action for entry in prod.registry.audit_entries()]
    for step in ("production.roster_import", "production.photo_import", "production.batch_create",
                 "production.review_export", "production.review_import", "production.print_export",
                 "production.printed_register", "production.personalize", "production.distribute_employer",
                 "production.hand_over"):
        assert actions.count(step) == 1, step
    assert not prod.registry.verify_audit()
    log = b"".join(entry.to_bytes() for entry in prod.registry.audit_entries())
    assert not any(person.id_number.encode("ascii") in log for person in people)  # never a whole ID number
