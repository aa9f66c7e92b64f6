import dataclasses
import datetime as dt
import hashlib
import json

import pytest

from citycard.core.audit import (
    GENESIS_HASH,
    PROBLEMS_MAX,
    AuditChain,
    AuditEntry,
    AuditFormatError,
    ProblemKind,
    SecretInAuditError,
    decode_key,
    encode_key,
    scrub,
)

CITY = dt.timezone(dt.timedelta(hours=8))
T0 = dt.datetime(2025, 9, 30, 9, 0, tzinfo=CITY)
CITIZEN_ID = "11010519491231002X"  # valid check character
CITIZEN_ID_MASKED = "110105********002X"


def fixed_clock():
    return T0


@pytest.fixture
def chain():
    return AuditChain(now=fixed_clock)


def build(chain: AuditChain, count: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    for index in range(count):
        previous = entries[-1] if entries else None
        entries.append(
            chain.append(
                previous,
                actor=f"operator{index % 3}",
                channel="counter",
                action="card.report_loss_phone",
                subject=f"card:A{index:08d}",
                details={"n": index, "note": "电话挂失"},
                at=T0 + dt.timedelta(minutes=index),
            )
        )
    return entries


def stored(entries):
    return [(entry.key(), entry.to_bytes()) for entry in entries]


def rehashed(entry: AuditEntry, **changes) -> AuditEntry:
    """``entry`` changed and given the hash its new content gives: a careful forger's edit."""
    changed = dataclasses.replace(entry, **changes)
    return dataclasses.replace(changed, hash=changed.computed_hash())


def kinds_and_seqs(problems):
    return [(problem.kind, problem.seq) for problem in problems]


# --- entries and their encoding ---------------------------------------------------------------------


def test_first_entry_has_seq_one_and_the_genesis_hash_and_a_pinned_encoding(chain):
    entry = chain.append(
        None,
        actor="op1",
        channel="phone",
        action="card.stop",
        subject="card:A00000001",
        details={"note": "挂失"},
    )
    body = (
        '{"action":"card.stop","actor":"op1","channel":"phone","details":{"note":"挂失"},'
        f'"prev_hash":"{GENESIS_HASH}","seq":1,"subject":"card:A00000001","time":"2025-09-30T09:00:00+08:00"}}'
    ).encode()
    assert entry.seq == 1
    assert entry.prev_hash == GENESIS_HASH
    assert entry.hash == hashlib.sha256(GENESIS_HASH.encode("ascii") + body).hexdigest()
    stored_value = (
        '{"action":"card.stop","actor":"op1","channel":"phone","details":{"note":"挂失"},'
        f'"hash":"{entry.hash}","prev_hash":"{GENESIS_HASH}","seq":1,"subject":"card:A00000001",'
        '"time":"2025-09-30T09:00:00+08:00"}'
    ).encode()
    assert entry.to_bytes() == stored_value


def test_stored_value_is_the_canonical_json_with_sorted_keys(chain):
    entry = build(chain, 1)[0]
    record = json.loads(entry.to_bytes())
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    assert entry.to_bytes() == canonical
    assert list(record) == sorted(record)


def test_each_entry_links_to_the_one_before(chain):
    entries = build(chain, 3)
    assert [entry.seq for entry in entries] == [1, 2, 3]
    assert entries[1].prev_hash == entries[0].hash
    assert entries[2].prev_hash == entries[1].hash


def test_entry_round_trips_through_its_stored_bytes(chain):
    for entry in build(chain, 3):
        assert AuditEntry.from_bytes(entry.to_bytes()) == entry
        assert decode_key(entry.key()) == entry.seq


def test_key_is_seq_as_eight_bytes_big_endian():
    assert encode_key(1) == b"\x00\x00\x00\x00\x00\x00\x00\x01"
    assert encode_key(258) == b"\x00\x00\x00\x00\x00\x00\x01\x02"
    assert sorted([encode_key(256), encode_key(2), encode_key(65536)]) == [
        encode_key(2),
        encode_key(256),
        encode_key(65536),
    ]
    with pytest.raises(AuditFormatError):
        encode_key(0)
    with pytest.raises(AuditFormatError):
        decode_key(b"\x01")


def test_time_comes_from_the_injected_clock_and_must_be_aware(chain):
    entry = chain.append(None, actor="op", channel="counter", action="x", subject="s")
    assert entry.time == "2025-09-30T09:00:00+08:00"
    with pytest.raises(AuditFormatError) as caught:
        chain.append(None, actor="op", channel="counter", action="x", subject="s", at=dt.datetime(2025, 1, 1))
    assert caught.value.field == "time"


def test_default_clock_is_the_platform_clock(monkeypatch):
    monkeypatch.setenv("CITYCARD_NOW", "2026-10-01T09:30:00+08:00")
    entry = AuditChain().append(None, actor="op", channel="counter", action="x", subject="s")
    assert entry.time == "2026-10-01T09:30:00+08:00"


@pytest.mark.parametrize("subject", [CITIZEN_ID, "person:" + CITIZEN_ID, "person:11010519491231002x"])
def test_subject_id_numbers_are_masked(chain, subject):
    entry = chain.append(None, actor="op", channel="counter", action="person.update", subject=subject)
    assert "19491231" not in entry.subject
    assert CITIZEN_ID_MASKED in entry.subject.upper()


def test_subject_masks_a_mistyped_id_too(chain):
    mistyped = CITIZEN_ID[:-1] + "1"
    entry = chain.append(None, actor="op", channel="counter", action="x", subject=mistyped)
    assert entry.subject == "110105********0021"


def test_append_scrubs_details(chain):
    with pytest.raises(SecretInAuditError):
        chain.append(None, actor="op", channel="counter", action="x", subject="s", details={"pin": "123456"})
    entry = chain.append(
        None, actor="op", channel="counter", action="x", subject="s", details={"ssn": CITIZEN_ID}
    )
    assert entry.details == {"ssn": CITIZEN_ID_MASKED}


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("actor", {"actor": ""}),
        ("channel", {"channel": "c" * 201}),
        ("details", {"details": {"blob": "x" * 20_000}}),
        ("text", {"subject": "bad \ud800 surrogate"}),
    ],
)
def test_append_refuses_bad_fields(chain, field, changes):
    arguments = {"actor": "op", "channel": "counter", "action": "x", "subject": "s", "details": {}} | changes
    with pytest.raises(AuditFormatError) as caught:
        chain.append(None, **arguments)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda record: record.pop("actor"), "value"),
        (lambda record: record.update(extra=1), "value"),
        (lambda record: record.update(seq="1"), "seq"),
        (lambda record: record.update(seq=0), "seq"),
        (lambda record: record.update(hash="ABC"), "hash"),
        (lambda record: record.update(time="yesterday"), "time"),
        (lambda record: record.update(details=[]), "details"),
    ],
)
def test_from_bytes_names_the_bad_field(chain, mutate, field):
    record = json.loads(build(chain, 1)[0].to_bytes())
    mutate(record)
    with pytest.raises(AuditFormatError) as caught:
        AuditEntry.from_bytes(json.dumps(record).encode())
    assert caught.value.field == field


# --- scrub -------------------------------------------------------------------------------------------------


def test_scrub_masks_values_under_id_keys_at_any_depth():
    details = {
        "citizen_id": CITIZEN_ID,
        "Agent_ID": "110105194912310021",  # a wrong check character: masked for its key alone
        "id_number": 110105194912310021,
        "holder": {"ssn": CITIZEN_ID, "name_length": 3},
        "agents": [{"agent_id": CITIZEN_ID}],
    }
    assert scrub(details) == {
        "citizen_id": CITIZEN_ID_MASKED,
        "Agent_ID": "110105********0021",
        "id_number": "110105********0021",
        "holder": {"ssn": CITIZEN_ID_MASKED, "name_length": 3},
        "agents": [{"agent_id": CITIZEN_ID_MASKED}],
    }


def test_scrub_masks_valid_id_numbers_inside_free_text_but_not_other_numbers():
    reference = "123456789012345678"  # 18 digits with a wrong check character for an ID
    scrubbed = scrub({"note": f"agent {CITIZEN_ID} brought ref {reference}"})
    assert scrubbed == {"note": f"agent {CITIZEN_ID_MASKED} brought ref {reference}"}


def test_scrub_does_not_change_its_input():
    details = {"citizen_id": CITIZEN_ID}
    scrub(details)
    assert details == {"citizen_id": CITIZEN_ID}


@pytest.mark.parametrize(
    ("details", "key_path"),
    [
        ({"pin": "123456"}, "pin"),
        ({"PIN": "123456"}, "PIN"),
        ({"key": "00" * 16}, "key"),
        ({"secret": "s"}, "secret"),
        ({"new_pin": "654321"}, "new_pin"),
        ({"master-key": "k"}, "master-key"),
        ({"password": "p"}, "password"),
        ({"card": {"pin": None}}, "card.pin"),
    ],
)
def test_scrub_refuses_secrets_and_names_where(details, key_path):
    with pytest.raises(SecretInAuditError) as caught:
        scrub(details)
    assert caught.value.key_path == key_path
    assert "123456" not in str(caught.value)


def test_scrub_allows_counts_and_versions_named_after_secrets():
    assert scrub({"pin_retries": 3, "key_version": 2, "monkey": "ok"}) == {
        "pin_retries": 3,
        "key_version": 2,
        "monkey": "ok",
    }


@pytest.mark.parametrize(
    "details",
    [
        {"amount": 1.5},
        {1: "x"},
        {"when": dt.date(2025, 1, 1)},
        {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}},
    ],
)
def test_scrub_refuses_what_has_no_canonical_json(details):
    with pytest.raises(AuditFormatError) as caught:
        scrub(details)
    assert caught.value.field == "details"


# --- verify ----------------------------------------------------------------------------------------


def test_an_untouched_chain_verifies_clean_as_entries_and_as_stored_pairs(chain):
    entries = build(chain, 10)
    assert chain.verify(entries) == []
    assert chain.verify(stored(entries)) == []
    assert chain.verify(iter(stored(entries)), expected_head=(10, entries[-1].hash)) == []


def test_an_empty_log_verifies_clean(chain):
    assert chain.verify([]) == []


def test_edited_entry_is_found(chain):
    entries = build(chain, 10)
    entries[4] = dataclasses.replace(entries[4], details={"n": 4, "note": "书面挂失"})
    assert kinds_and_seqs(chain.verify(entries)) == [(ProblemKind.EDITED, 5)]


def test_edited_stored_bytes_are_found(chain):
    pairs = stored(build(chain, 10))
    key, value = pairs[6]
    pairs[6] = (key, value.replace(b'"actor":"operator0"', b'"actor":"operator9"'))
    assert kinds_and_seqs(chain.verify(pairs)) == [(ProblemKind.EDITED, 7)]


def test_rewritten_entry_with_a_fresh_hash_breaks_the_next_link(chain):
    entries = build(chain, 10)
    entries[4] = rehashed(entries[4], actor="intruder")
    problems = chain.verify(entries)
    assert kinds_and_seqs(problems) == [(ProblemKind.BROKEN_LINK, 6)]
    assert "seq 5" in problems[0].message


def test_removed_entry_is_found(chain):
    entries = build(chain, 10)
    del entries[4]
    problems = chain.verify(entries)
    assert kinds_and_seqs(problems) == [(ProblemKind.REMOVED, 5)]
    assert "seq 5 missing before seq 6" in problems[0].message


def test_removed_run_is_one_problem(chain):
    entries = build(chain, 10)
    del entries[3:6]
    problems = chain.verify(stored(entries))
    assert kinds_and_seqs(problems) == [(ProblemKind.REMOVED, 4)]
    assert "seqs 4 to 6" in problems[0].message


def test_removed_first_entry_is_found(chain):
    assert kinds_and_seqs(chain.verify(build(chain, 5)[1:])) == [(ProblemKind.REMOVED, 1)]


def test_removal_hidden_by_renumbering_breaks_the_links(chain):
    entries = build(chain, 8)
    renumbered = entries[:4] + [rehashed(entry, seq=entry.seq - 1) for entry in entries[5:]]
    problems = chain.verify(renumbered)
    assert problems[0].kind is ProblemKind.BROKEN_LINK
    assert problems[0].seq == 5
    assert {problem.kind for problem in problems} == {ProblemKind.BROKEN_LINK}


def test_swapped_entries_are_reordered(chain):
    entries = build(chain, 10)
    entries[3], entries[4] = entries[4], entries[3]
    problems = chain.verify(entries)
    assert kinds_and_seqs(problems) == [(ProblemKind.REORDERED, 4)]
    assert "comes after seq 5" in problems[0].message


def test_values_swapped_between_keys_are_reordered(chain):
    pairs = stored(build(chain, 10))
    (key4, value4), (key5, value5) = pairs[3], pairs[4]
    pairs[3], pairs[4] = (key4, value5), (key5, value4)
    problems = chain.verify(pairs)
    assert {problem.kind for problem in problems} == {ProblemKind.REORDERED}
    assert {problem.seq for problem in problems} == {4, 5}
    assert any("stored under key seq 4 but says seq 5" in problem.message for problem in problems)


def test_duplicate_entry_is_found(chain):
    entries = build(chain, 6)
    entries.insert(5, entries[4])
    assert kinds_and_seqs(chain.verify(entries)) == [(ProblemKind.DUPLICATE, 5)]


def test_unreadable_value_is_reported_once(chain):
    pairs = stored(build(chain, 6))
    pairs[2] = (pairs[2][0], b"\xff not json")
    assert kinds_and_seqs(chain.verify(pairs)) == [(ProblemKind.UNREADABLE, 3)]


def test_unreadable_key_is_reported_without_a_seq(chain):
    pairs = stored(build(chain, 3))
    pairs.append((b"\x04", b"{}"))
    assert kinds_and_seqs(chain.verify(pairs)) == [(ProblemKind.UNREADABLE, None)]


def test_first_entry_that_does_not_start_at_genesis_is_a_broken_link(chain):
    entries = build(chain, 3)
    entries[0] = rehashed(entries[0], prev_hash="1" * 64)
    assert kinds_and_seqs(chain.verify(entries)) == [
        (ProblemKind.BROKEN_LINK, 1),
        (ProblemKind.BROKEN_LINK, 2),
    ]


def test_truncated_tail_is_invisible_without_an_anchor_and_found_with_one(chain):
    entries = build(chain, 10)
    anchor = (10, entries[-1].hash)
    assert chain.verify(entries[:8]) == []
    problems = chain.verify(entries[:8], expected_head=anchor)
    assert kinds_and_seqs(problems) == [(ProblemKind.TRUNCATED, 10)]
    assert "ends at seq 8" in problems[0].message


def test_rewritten_tail_is_found_by_the_anchor(chain):
    entries = build(chain, 10)
    anchor = (10, entries[-1].hash)
    forged = entries[:9]
    forged.append(chain.append(forged[-1], actor="intruder", channel="counter", action="x", subject="s"))
    assert chain.verify(forged) == []
    assert kinds_and_seqs(chain.verify(forged, expected_head=anchor)) == [(ProblemKind.ANCHOR_MISMATCH, 10)]


def test_a_log_that_grew_past_its_anchor_verifies_clean(chain):
    entries = build(chain, 10)
    assert chain.verify(entries, expected_head=(6, entries[5].hash)) == []


def test_verify_stops_listing_at_the_limit(chain):
    garbage = [(encode_key(seq), b"not json") for seq in range(1, PROBLEMS_MAX + 50)]
    problems = chain.verify(garbage)
    assert len(problems) == PROBLEMS_MAX + 1
    assert problems[-1].kind is ProblemKind.TOO_MANY


def test_problem_reads_as_seq_kind_and_message(chain):
    entries = build(chain, 3)
    del entries[1]
    assert str(chain.verify(entries)[0]) == "seq 2: removed: seq 2 missing before seq 3"
