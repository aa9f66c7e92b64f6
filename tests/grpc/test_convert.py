"""The write path's conversion and scope checks, in-process and differential: Transfer messages and packed
records must become exactly the batch the core's own ``transfers_array`` builds from the same values, a single
bad value must be named the same way whatever the batch looks like, and the vectorised scope check must agree
with the rule written out one transfer at a time."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from citycard.core.ledger import transfers_array
from citycard.core.records import BATCH_EVENTS_MAX
from hypothesis import given, settings
from hypothesis import strategies as st

from citycard.server import auth
from citycard.server.auth import AppRecord, app_account_id
from citycard.server.convert import INT64_MAX, transfers_from_messages, transfers_from_packed
from citycard.server.errors import FieldError, PermissionDenied, classify
from citycard.v1 import ledger_pb2

U32_MAX = 2**32 - 1
ID_FIELDS = ("id", "debit_account_id", "credit_account_id", "pending_id", "ref_id", "user_data")
FLAG_NAMES = ("linked", "pending", "post_pending_transfer", "void_pending_transfer")
PACKED = struct.Struct("<16s16s16s16s16s16sQQIIHHI")  # ledger.proto's record, independent of the server


def hex_id(value: int, width: int, upper: bool) -> str:
    text = f"{value:0{width}x}" if value else ""
    return text.upper() if upper else text


@st.composite
def transfer_rows(draw: st.DrawFn) -> list[dict[str, int]]:
    count = draw(st.integers(1, 40))
    ids = st.integers(1, 2**124 - 1)
    optional = st.one_of(st.just(0), st.integers(1, 2**128 - 2))
    rows = []
    for _ in range(count):
        rows.append({
            "id": draw(ids), "debit_account_id": draw(st.integers(1, 2**128 - 2)),
            "credit_account_id": draw(st.integers(1, 2**128 - 2)), "pending_id": draw(optional),
            "ref_id": draw(optional), "user_data": draw(optional), "amount": draw(st.integers(0, INT64_MAX)),
            "ledger": draw(st.integers(1, U32_MAX)), "code": draw(st.integers(1, 0xFFFF)),
            "timeout": draw(st.integers(0, U32_MAX)), "flags": draw(st.integers(0, 15)),
        })
    return rows


def as_messages(rows: list[dict[str, int]], width: int, upper: bool) -> list[ledger_pb2.Transfer]:
    """``width`` 0: each id as short as it can be (columns of mixed lengths); 32: every id padded (one length)."""
    messages = []
    for row in rows:
        ids = {name: hex_id(row[name], width, upper) for name in ID_FIELDS}
        flags = {name: bool(row["flags"] >> bit & 1) for bit, name in enumerate(FLAG_NAMES)}
        messages.append(ledger_pb2.Transfer(**ids, amount_fen=row["amount"], ledger=row["ledger"], code=row["code"],
                                            timeout_seconds=row["timeout"], **flags))
    return messages


def as_packed(rows: list[dict[str, int]]) -> bytes:
    return b"".join(PACKED.pack(*(row[name].to_bytes(16, "little") for name in ID_FIELDS), row["amount"], 0,
                                row["timeout"], row["ledger"], row["code"], row["flags"], 0) for row in rows)


@settings(max_examples=30, deadline=None)
@given(rows=transfer_rows(), width=st.sampled_from([0, 32]), upper=st.booleans())
def test_messages_and_packed_records_become_the_cores_own_batch(rows, width, upper):
    expected = transfers_array(rows)
    from_messages = transfers_from_messages(as_messages(rows, width, upper))
    from_packed = transfers_from_packed(as_packed(rows))
    assert from_messages.tobytes() == expected.tobytes()
    assert from_packed.tobytes() == expected.tobytes()
    # A view of the payload (the ledger only reads it), read-only so nothing on the way can change it.
    assert not from_packed.flags.writeable


BAD_IDS = ["", "xyz", "1" * 33, " 12", "12 34", "+1", "\u0663", "0x1f"]


@settings(max_examples=40, deadline=None)
@given(rows=transfer_rows(), width=st.sampled_from([0, 32]), data=st.data())
def test_one_bad_id_is_named_whatever_the_batch_looks_like(rows, width, data):
    messages = as_messages(rows, width, upper=False)
    index = data.draw(st.integers(0, len(messages) - 1))
    name = data.draw(st.sampled_from(ID_FIELDS))
    bad = data.draw(st.sampled_from(BAD_IDS[1:] if name in ID_FIELDS[3:] else BAD_IDS))
    if width and bad:  # the bad id as long as its neighbours, so the column keeps a single length
        bad = bad.rjust(32, "0")[-32:] if len(bad) <= 32 else bad
    setattr(messages[index], name, bad)
    with pytest.raises(FieldError) as refused:
        transfers_from_messages(messages)
    assert refused.value.field == f"transfers[{index}].{name}"


@pytest.mark.parametrize(("name", "value", "field"), [
    ("amount_fen", -1, "amount_fen"), ("ledger", 0, "ledger"), ("code", 0, "code"), ("code", 0x10000, "code")])
def test_a_bad_number_is_named(name, value, field):
    rows = [{"id": n + 1, "debit_account_id": 1, "credit_account_id": 2, "pending_id": 0, "ref_id": 0, "user_data": 0,
             "amount": 1, "ledger": 2, "code": 11, "timeout": 0, "flags": 0} for n in range(5)]
    messages = as_messages(rows, 0, upper=False)
    setattr(messages[3], name, value)
    with pytest.raises(FieldError) as refused:
        transfers_from_messages(messages)
    assert refused.value.field == f"transfers[3].{field}"


def packed_rule_broken(payload: bytes) -> str | None:
    """ledger.proto's rules for packed records, one record at a time: the first rule (in the order the server
    names them) that any record breaks, as ``[index].field`` for that rule's first such record."""
    records = list(PACKED.iter_unpack(payload))
    rules = [(name, lambda r, at=at: not any(r[at])) for at, name in enumerate(ID_FIELDS[:3])] + [
        ("amount_fen", lambda r: r[6] > INT64_MAX), ("ledger", lambda r: r[9] == 0), ("code", lambda r: r[10] == 0),
        ("flags", lambda r: r[11] > 15), ("reserved", lambda r: r[7] != 0 or r[12] != 0)]
    for name, broken in rules:
        for index, record in enumerate(records):
            if broken(record):
                return f"[{index}].{name}"
    return None


@settings(max_examples=60, deadline=None)
@given(rows=transfer_rows(), data=st.data())
def test_packed_records_are_refused_by_the_rule_and_named_in_its_order(rows, data):
    payload = bytearray(as_packed(rows))
    for _ in range(data.draw(st.integers(0, 3))):  # a few bytes set, or a few required fields zeroed
        record = data.draw(st.integers(0, len(rows) - 1)) * 128
        if data.draw(st.booleans()):
            at = record + data.draw(st.integers(0, 127))
            payload[at] = data.draw(st.sampled_from([0, 0x80, 0x10, 0xFF]))
        else:
            start, end = data.draw(st.sampled_from([(0, 16), (16, 32), (32, 48), (116, 120), (120, 122)]))
            payload[record + start:record + end] = bytes(end - start)
    expected = packed_rule_broken(bytes(payload))
    if expected is None:
        assert transfers_from_packed(bytes(payload)).tobytes() == bytes(payload)
        return
    with pytest.raises(FieldError) as refused:
        transfers_from_packed(bytes(payload))
    assert refused.value.field == "packed_transfers" + expected


def test_batch_sizes_are_checked_in_both_forms():
    one = as_packed([{"id": 1, "debit_account_id": 1, "credit_account_id": 2, "pending_id": 0, "ref_id": 0,
                      "user_data": 0, "amount": 1, "ledger": 2, "code": 11, "timeout": 0, "flags": 0}])
    assert len(transfers_from_packed(one * BATCH_EVENTS_MAX)) == BATCH_EVENTS_MAX
    for payload in (b"", one * (BATCH_EVENTS_MAX + 1), one[:64]):
        with pytest.raises(FieldError):
            transfers_from_packed(payload)
    with pytest.raises(FieldError):
        transfers_from_messages([])


# -- scope: the vectorised check against the rule, one transfer at a time ---------------------------------

APP_SEQ = 7
APP = AppRecord(name="bike", seq=APP_SEQ, aid="F0", ledgers=frozenset({2, 20}), codes=frozenset({11, 4}),
                accounts=(), credential_kind=1, tls_client_common_name="", token_sha256=None, manifest=b"",
                registered_at_ns=0)
ACCOUNTS = [
    app_account_id(APP_SEQ, 0), app_account_id(APP_SEQ, 3),  # its own
    app_account_id(APP_SEQ + 1, 0), app_account_id(1, 5),  # other applications'
    (1 << 120) | 99, (3 << 120) | (2 << 16) | 5, 12345,  # persons', cards', the registry's
    app_account_id(APP_SEQ, 0) | (1 << 100),  # top byte says application, high word does not: not one
]


def expected_refusal(rows: list[dict[str, int]]) -> tuple[str, str] | None:
    """The rule, in the order the server names a refusal: any ledger, then any code, then any accounts."""
    def owner(account: int) -> int | None:
        return (account & (2**64 - 1)) >> 16 if account >> 64 == auth.APP_ACCOUNT_PREFIX >> 64 else None

    for index, row in enumerate(rows):
        if row["ledger"] not in APP.ledgers:
            return ("MEDICAL_LEDGER_RESERVED" if row["ledger"] == 1 else "LEDGER_OUT_OF_SCOPE",
                    f"transfers[{index}].ledger")
    for index, row in enumerate(rows):
        if row["code"] not in APP.codes:
            return "CODE_OUT_OF_SCOPE", f"transfers[{index}].code"
    for index, row in enumerate(rows):
        owners = (owner(row["debit_account_id"]), owner(row["credit_account_id"]))
        if APP_SEQ not in owners or any(seq not in (None, APP_SEQ) for seq in owners):
            return "ACCOUNT_OUT_OF_SCOPE", f"transfers[{index}]"
    return None


@st.composite
def scoped_rows(draw: st.DrawFn) -> list[dict[str, int]]:
    count = draw(st.integers(1, 12))
    likely = st.integers(0, 9)  # mostly inside the manifest, so that batches get past the first checks
    rows = [{"id": n + 1, "debit_account_id": draw(st.sampled_from(ACCOUNTS)),
             "credit_account_id": draw(st.sampled_from(ACCOUNTS[:2] if draw(likely) else ACCOUNTS)),
             "amount": 1, "ledger": draw(st.sampled_from([2, 20] if draw(likely) else [1, 2, 3, 20])),
             "code": draw(st.sampled_from([11, 4] if draw(likely) else [4, 10, 11, 0xFFFF]))} for n in range(count)]
    if draw(st.booleans()):  # one ledger for the whole batch, as most are (the check has a shortcut for it)
        for row in rows:
            row["ledger"] = rows[0]["ledger"]
    return rows


@settings(max_examples=80, deadline=None)
@given(rows=scoped_rows())
def test_the_vectorised_scope_check_follows_the_rule(rows):
    expected = expected_refusal(rows)
    batch = transfers_array(rows)
    if expected is None:
        auth.check_transfer_scope(APP, batch)
        return
    with pytest.raises(PermissionDenied) as refused:
        auth.check_transfer_scope(APP, batch)
    assert (classify(refused.value)[1], refused.value.field) == expected


def test_an_application_with_every_code_and_one_ledger():
    app = AppRecord(name="wide", seq=3, aid="F0", ledgers=frozenset({2}), codes=frozenset(range(1, 0x10000)),
                    accounts=(), credential_kind=1, tls_client_common_name="", token_sha256=None, manifest=b"",
                    registered_at_ns=0)
    batch = transfers_array([{"id": 1, "debit_account_id": app_account_id(3, 0), "credit_account_id": 5,
                              "amount": 1, "ledger": 2, "code": 0xFFFF}])
    auth.check_transfer_scope(app, batch)
    batch["ledger"] = 3
    with pytest.raises(PermissionDenied):
        auth.check_transfer_scope(app, batch)
    assert np.array_equal(app.ledgers_sorted, [2])
