"""Messages <-> the settlement core's records: hex ids, fen, timestamps, transfer batches.

Batches are converted column by column (one list comprehension per field, then numpy), not record by
record: a request of 8,189 transfers is the common case on the write path, and this is where the server
spends its own CPU time. Every value from a message is checked here, and a bad one is a FieldError
naming the field (``transfers[3].amount_fen``); nothing reaches the ledger unless the whole request is good.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import timestamp_pb2

from citycard.core.ledger import u128_value
from citycard.core.records import BATCH_EVENTS_MAX, TRANSFER_DTYPE, AccountFlags, TransferFlags
from citycard.server.errors import FieldError, OutOfRange
from citycard.v1 import common_pb2, ledger_pb2

__all__ = [
    "ID_HEX_DIGITS_MAX",
    "INT64_MAX",
    "account_message",
    "errors_from_results",
    "format_id",
    "parse_id",
    "parse_ids",
    "timestamp",
    "timestamp_ns",
    "transfer_messages",
    "transfers_from_messages",
]

INT64_MAX = 2**63 - 1
ID_HEX_DIGITS_MAX = 32
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
NS_PER_S = 1_000_000_000
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_TRANSFER_FLAG_FIELDS = (
    ("linked", TransferFlags.LINKED),
    ("pending", TransferFlags.PENDING),
    ("post_pending_transfer", TransferFlags.POST_PENDING_TRANSFER),
    ("void_pending_transfer", TransferFlags.VOID_PENDING_TRANSFER),
)
ACCOUNT_KINDS = frozenset(common_pb2.AccountKind.values()) - {common_pb2.ACCOUNT_KIND_UNSPECIFIED}


def check_batch_size(count: int, field: str) -> None:
    if count == 0:
        raise FieldError(field, "is empty; give at least one")
    if count > BATCH_EVENTS_MAX:
        raise FieldError(field, f"holds {count} events; a batch holds at most {BATCH_EVENTS_MAX}",
                         reason=common_pb2.BATCH_TOO_LARGE)


# -- ids ---------------------------------------------------------------------------------------------

def parse_id(text: str, field: str, *, required: bool = True) -> int:
    if not text:
        if required:
            raise FieldError(field, "is required (an id of 1 to 32 hex digits)")
        return 0
    if len(text) > ID_HEX_DIGITS_MAX or not _HEX_DIGITS.issuperset(text):
        raise FieldError(field, f"{text[:40]!r} is not an id of 1 to 32 hex digits")
    return int(text, 16)


def parse_ids(values: Sequence[str], field_pattern: str, *, required: bool = True) -> np.ndarray:
    """Hex ids as the records' ``[lo, hi]`` u64 pairs, shape (n, 2); checked all at once, then one by one
    only to name the first bad one (``field_pattern`` has a ``{}`` for its index)."""
    joined = "".join(value.rjust(ID_HEX_DIGITS_MAX, "0") for value in values)
    bad = (len(joined) != ID_HEX_DIGITS_MAX * len(values) or not _HEX_DIGITS.issuperset(joined)
           or (required and not all(values)))
    if bad:
        for index, value in enumerate(values):
            parse_id(value, field_pattern.format(index), required=required)
    words = np.frombuffer(bytes.fromhex(joined), dtype=">u8").reshape(-1, 2)  # big-endian [hi, lo]
    return words[:, ::-1].astype("<u8")


def format_id(words: Any) -> str:
    value = u128_value(words)
    return f"{value:x}" if value else ""


def format_int_id(value: int) -> str:
    return f"{value:x}" if value else ""


# -- time --------------------------------------------------------------------------------------------

def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.seconds, stamp.nanos = divmod(int(ns), NS_PER_S)
    return stamp


def timestamp_ns(stamp: timestamp_pb2.Timestamp, field: str) -> int:
    if stamp.seconds < 0 or not 0 <= stamp.nanos < NS_PER_S:
        raise FieldError(field, "must be a valid instant after 1970")
    return stamp.seconds * NS_PER_S + stamp.nanos


# -- transfers ---------------------------------------------------------------------------------------

def transfers_from_messages(messages: Sequence[ledger_pb2.Transfer], field: str = "transfers") -> np.ndarray:
    """A request's transfers as one TRANSFER_DTYPE batch, every field checked."""
    count = len(messages)
    check_batch_size(count, field)
    batch = np.zeros(count, dtype=TRANSFER_DTYPE)
    batch["id"] = parse_ids([m.id for m in messages], field + "[{}].id")
    batch["debit_account_id"] = parse_ids([m.debit_account_id for m in messages], field + "[{}].debit_account_id")
    batch["credit_account_id"] = parse_ids([m.credit_account_id for m in messages],
                                           field + "[{}].credit_account_id")
    batch["pending_id"] = parse_ids([m.pending_id for m in messages], field + "[{}].pending_id", required=False)
    batch["ref_id"] = parse_ids([m.ref_id for m in messages], field + "[{}].ref_id", required=False)
    batch["user_data"] = parse_ids([m.user_data for m in messages], field + "[{}].user_data", required=False)
    batch["amount"] = _column([m.amount_fen for m in messages], field, "amount_fen", 0, INT64_MAX, "<u8")
    batch["ledger"] = _column([m.ledger for m in messages], field, "ledger", 1, U32_MAX, "<u4")
    batch["code"] = _column([m.code for m in messages], field, "code", 1, U16_MAX, "<u2")
    batch["timeout"] = [m.timeout_seconds for m in messages]
    flags = np.zeros(count, dtype="<u2")
    for name, flag in _TRANSFER_FLAG_FIELDS:
        flags |= np.fromiter((getattr(m, name) for m in messages), dtype=bool, count=count) * np.uint16(flag)
    batch["flags"] = flags
    return batch


def _column(values: list[int], field: str, name: str, low: int, high: int, dtype: str) -> np.ndarray:
    column = np.array(values, dtype=np.int64)
    bad = np.flatnonzero((column < low) | (column > high))
    if len(bad):
        index = int(bad[0])
        what = "is required" if values[index] == 0 and low > 0 else f"{values[index]} is out of range"
        raise FieldError(f"{field}[{index}].{name}", f"{what} ({low} to {high})")
    return column.astype(dtype)


def transfer_messages(records: np.ndarray) -> list[ledger_pb2.Transfer]:
    out = []
    for record in records:
        flags = int(record["flags"])
        out.append(ledger_pb2.Transfer(
            id=format_id(record["id"]), debit_account_id=format_id(record["debit_account_id"]),
            credit_account_id=format_id(record["credit_account_id"]), amount_fen=_int64(record["amount"]),
            ledger=int(record["ledger"]), code=int(record["code"]), pending_id=format_id(record["pending_id"]),
            ref_id=format_id(record["ref_id"]), user_data=format_id(record["user_data"]),
            timeout_seconds=int(record["timeout"]),
            **{name: bool(flags & flag) for name, flag in _TRANSFER_FLAG_FIELDS},
            timestamp=timestamp(int(record["timestamp"]))))
    return out


def errors_from_results(results: np.ndarray) -> list[ledger_pb2.TransferError]:
    """The sparse answer: one TransferError per transfer that was not booked. Result codes are the core's,
    and the proto enum has the same numbers."""
    failed = np.flatnonzero(results["status"])
    statuses = results["status"][failed]
    return [ledger_pb2.TransferError(index=int(index), result=int(status)) for index, status in zip(failed, statuses)]


# -- accounts ----------------------------------------------------------------------------------------

def _int64(value: Any) -> int:
    number = int(value)
    if number > INT64_MAX:
        raise OutOfRange(f"an amount of {number} fen does not fit the API's int64")
    return number


def account_message(record: np.void) -> ledger_pb2.Account:
    flags = int(record["flags"])
    return ledger_pb2.Account(
        id=format_id(record["id"]), ledger=int(record["ledger"]), kind=int(record["code"]),
        debits_pending_fen=_int64(record["debits_pending"]), debits_posted_fen=_int64(record["debits_posted"]),
        credits_pending_fen=_int64(record["credits_pending"]), credits_posted_fen=_int64(record["credits_posted"]),
        owner=format_id(record["owner"]), user_data=int(record["user_data"]),
        debits_must_not_exceed_credits=bool(flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS),
        credits_must_not_exceed_debits=bool(flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS),
        frozen=bool(flags & AccountFlags.FROZEN), closed=bool(flags & AccountFlags.CLOSED),
        created_at=timestamp(int(record["timestamp"])))


def balance_message(debits_pending: int, debits_posted: int, credits_pending: int,
                    credits_posted: int) -> ledger_pb2.Balance:
    return ledger_pb2.Balance(
        debits_pending_fen=_int64(debits_pending), debits_posted_fen=_int64(debits_posted),
        credits_pending_fen=_int64(credits_pending), credits_posted_fen=_int64(credits_posted),
        available_fen=max(-INT64_MAX, min(INT64_MAX, credits_posted - debits_posted - debits_pending)))
