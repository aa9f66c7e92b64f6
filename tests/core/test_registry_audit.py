"""The registry's audit log: every change recorded in its own transaction, no whole ID number in it,
and every kind of tampering with the stored rows found and located."""

import dataclasses
import json

import pytest
from citycard.core.audit import AuditEntry, ProblemKind, encode_key
from citycard.core.identity import unit_check_character
from citycard.core.registry_records import ErrorCode, RegistryError

SECOND_UNIT = "91370100MA3C5LQX7" + unit_check_character("91370100MA3C5LQX7")


@pytest.fixture
def registry(kit):
    registry = kit.open()
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1, 8))
    card = registry.issue_card(holder, actor="op1", at=kit.at(2025, 9, 1, 9)).card_number
    registry.report_loss_phone(id_number=holder, name="张三", gender="male", employer=kit.UNIT, actor="op2",
                               at=kit.at(2025, 9, 30, 21))
    registry.report_loss_written(card, holder_id=holder, holder_name="张三", agent_id=kit.citizen_id("19820304", 56),
                                 agent_name="张小红", actor="op3", at=kit.at(2025, 10, 9, 10))
    registry.replace(card, actor="op3", at=kit.at(2025, 10, 10, 10))
    return registry


def stored(registry, seq):
    return registry.ledger.get("audit", encode_key(seq))


def tamper(registry, *rows):
    assert registry.ledger.execute(puts=[("audit", encode_key(seq), value) for seq, value in rows]).ok


def problems(registry):
    return [(problem.seq, problem.kind) for problem in registry.verify_audit()]


def test_every_state_change_and_operator_action_is_audited(registry, kit):
    actions = [entry.action for entry in registry.audit_entries()]
    assert actions[:4] == ["registry.setup", "employer.add", "person.add", "card.issue"]
    assert actions[4:8] == ["card.print", "card.register", "card.distribute", "card.activate"]
    assert actions[8:] == ["card.report_loss_phone", "card.report_loss_written", "card.replace", "card.issue",
                           "card.print", "card.register", "card.distribute", "card.activate"]
    written = registry.audit_entries()[9]
    assert (written.actor, written.channel, written.time) == ("op3", "written", "2025-10-09T10:00:00+08:00")
    assert written.details["medical_account_frozen"] is True and written.details["from"] == "stopped"
    assert problems(registry) == []


def test_no_whole_id_number_is_in_the_audit_log(registry, kit):
    log = b"".join(value for _, value in registry.ledger.scan("audit"))
    for number in (kit.citizen_id(), kit.citizen_id("19820304", 56)):
        assert number.encode() not in log
        assert (number[:6] + "********" + number[-4:]).encode() in log


def test_an_edited_entry_is_found(registry):
    original = stored(registry, 10)
    tamper(registry, (10, original.replace(b'"actor":"op3"', b'"actor":"op9"')))
    assert problems(registry) == [(10, ProblemKind.EDITED)]


def test_an_entry_rewritten_with_a_fresh_hash_breaks_the_next_link(registry):
    entry = AuditEntry.from_bytes(stored(registry, 10))
    forged = dataclasses.replace(entry, actor="op9")
    forged = dataclasses.replace(forged, hash=forged.computed_hash())
    tamper(registry, (10, forged.to_bytes()))
    assert problems(registry) == [(11, ProblemKind.BROKEN_LINK)]


def test_a_removed_entry_is_found(registry):
    tamper(registry, (7, None))
    assert problems(registry) == [(7, ProblemKind.REMOVED)]


def test_removing_the_newest_entries_is_found_through_the_recorded_head(registry):
    count = registry.audit_entry_count()
    tamper(registry, (count, None), (count - 1, None))
    assert problems(registry) == [(count, ProblemKind.TRUNCATED)]


def test_reordered_entries_are_found(registry):
    fifth, sixth = stored(registry, 5), stored(registry, 6)
    tamper(registry, (5, sixth), (6, fifth))
    found = problems(registry)
    assert (5, ProblemKind.REORDERED) in found and (6, ProblemKind.REORDERED) in found
    assert {kind for _, kind in found} <= {ProblemKind.REORDERED, ProblemKind.BROKEN_LINK}


def test_an_unreadable_entry_is_found(registry):
    tamper(registry, (3, b"not json"))
    assert problems(registry) == [(3, ProblemKind.UNREADABLE)]


def test_the_chain_continues_from_the_recorded_head_after_an_edit(registry, kit):
    count = registry.audit_entry_count()
    head = json.loads(registry.ledger.get("meta", b"audit:head"))
    tamper(registry, (count, stored(registry, count).replace(b'"actor":"op3"', b'"actor":"op9"')))
    registry.add_employer(SECOND_UNIT, "第二家公司", actor="op1")
    newest = AuditEntry.from_bytes(stored(registry, count + 1))
    assert newest.prev_hash == head["hash"]  # the edit does not launder itself into the chain
    assert problems(registry) == [(count, ProblemKind.EDITED)]


def test_writes_stop_when_the_newest_entry_is_gone(registry, kit):
    count = registry.audit_entry_count()
    tamper(registry, (count, None))
    with pytest.raises(RegistryError) as caught:
        registry.add_employer(SECOND_UNIT, "第二家公司", actor="op1")
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION and "audit verify" in str(caught.value)
