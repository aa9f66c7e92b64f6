"""Messages <-> the settlement core's records: hex ids, fen, timestamps, transfer batches.

A request's transfers arrive in one of two forms, and both become one TRANSFER_DTYPE batch here:

- ``transfers``: Transfer messages. Their fields are read in one pass (``operator.attrgetter``: every read
  of a string field builds a new ``str``, so this is the part of the path that costs per transfer), then
  checked and converted column by column with numpy; the hex ids of a column go through one ``join`` and
  one ``bytes.fromhex``.
- ``packed_transfers``: 128-byte records in the ledger's own layout (documented in ledger.proto), read
  with ``np.frombuffer`` and checked with a few vectorised comparisons: the form for high-volume callers.

Every value is checked here, and a bad one is a FieldError naming the field (``transfers[3].amount_fen``,
``packed_transfers[3].code``); nothing reaches the ledger unless the whole request is good. The checks run
on the whole batch at once and only a failing batch is walked again, to name its first bad field.
"""

from __future__ import annotations

import operator
import struct
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
    "PACKED_RECORD_BYTES",
    "account_message",
    "errors_from_results",
    "format_id",
    "parse_id",
    "parse_ids",
    "timestamp",
    "timestamp_ns",
    "transfer_messages",
    "transfers_from_messages",
    "transfers_from_packed",
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
_FLAG_BITS = np.array([int(flag) for _, flag in _TRANSFER_FLAG_FIELDS], dtype=np.uint16)
_FLAGS_KNOWN = int(_FLAG_BITS.sum())
# (field, required): the ids, named alike in the message and the record, in the order a bad one is looked for
_ID_FIELDS = (
    ("id", True),
    ("debit_account_id", True),
    ("credit_account_id", True),
    ("pending_id", False),
    ("ref_id", False),
    ("user_data", False),
)
# (message field, record field, lowest, highest), after the ids
_NUMBER_FIELDS = (
    ("amount_fen", "amount", 0, INT64_MAX),
    ("ledger", "ledger", 1, U32_MAX),
    ("code", "code", 1, U16_MAX),
    ("timeout_seconds", "timeout", 0, U32_MAX),
)
_NUMBER_LOWEST = np.array([[low] for _, _, low, _ in _NUMBER_FIELDS], dtype=np.int64)
_NUMBER_HIGHEST = np.array([[high] for _, _, _, high in _NUMBER_FIELDS], dtype=np.int64)
_TRANSFER_COLUMNS = operator.attrgetter(*(name for name, _ in _ID_FIELDS), *(name for name, *_ in _NUMBER_FIELDS),
                                        *(name for name, _ in _TRANSFER_FLAG_FIELDS))
PACKED_RECORD_BYTES = TRANSFER_DTYPE.itemsize  # 128: the packed form is the ledger's own record
_RECORD_WORDS = PACKED_RECORD_BYTES // 8
# Where the fields sit, as transfers_from_messages writes them and ledger.proto documents them: the six ids
# in words 0 to 11 ([lo, hi] each), amount in word 12, the timestamp in 13, timeout | ledger << 32 in 14,
# code | flags << 16 | reserved << 32 in 15. Checked against the core's dtype once, here.
_WORD_LAYOUT = {"id": 0, "debit_account_id": 16, "credit_account_id": 32, "pending_id": 48, "ref_id": 64,
                "user_data": 80, "amount": 96, "timestamp": 104, "timeout": 112, "ledger": 116, "code": 120,
                "flags": 122, "reserved": 124}
if PACKED_RECORD_BYTES != 128 or {name: TRANSFER_DTYPE.fields[name][1] for name in TRANSFER_DTYPE.names} != _WORD_LAYOUT:
    raise ImportError("records.TRANSFER_DTYPE no longer has the layout that ledger.proto documents")
# What follows the six ids in a record, for struct: amount, timestamp, timeout, ledger, code, flags, reserved.
_RECORD_TAIL = struct.Struct("<QQIIHHI")
_ID_BYTES = 16
_ZERO_ID = bytes(_ID_BYTES)
_ID_REQUIRED = tuple(required for _, required in _ID_FIELDS)
_LINKED, _PENDING, _POST_PENDING, _VOID_PENDING = (int(flag) for _, flag in _TRANSFER_FLAG_FIELDS)
if (_RECORD_TAIL.size + len(_ID_FIELDS) * _ID_BYTES != PACKED_RECORD_BYTES
        or [name for name, *_ in _NUMBER_FIELDS] != ["amount_fen", "ledger", "code", "timeout_seconds"]):
    raise ImportError("_small_batch no longer matches the record or the message fields")
# The packed records' rules over their u64 words, one whole-batch column each (a column of an (n, 16)
# array is one strided pass; a 2-d block of columns costs several times more): the words of the required
# ids as [lo, hi] pairs (id, debit, credit: the first three of _ID_FIELDS), and in word 15 (code | flags << 16
# | reserved << 32) the bits that must be zero: unknown flags and the reserved bytes.
_REQUIRED_ID_WORDS = ((0, 1), (2, 3), (4, 5))
if [required for _, required in _ID_FIELDS] != [True] * 3 + [False] * 3:
    raise ImportError("_REQUIRED_ID_WORDS no longer matches _ID_FIELDS")
_FLAGS_UNKNOWN = ~_FLAGS_KNOWN & U16_MAX
_WORD15_MUST_BE_ZERO = np.uint64((_FLAGS_UNKNOWN << 16) | (U32_MAX << 32))
_WORD15_CODE = np.uint64(U16_MAX)
_SHIFT_SIGN, _SHIFT_LEDGER = np.uint64(63), np.uint64(32)
SMALL_BATCH_MAX = 4  # up to here transfers_from_messages converts one transfer at a time
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
    """A request's Transfer messages as one TRANSFER_DTYPE batch, every field checked."""
    count = len(messages)
    check_batch_size(count, field)
    rows = list(map(_TRANSFER_COLUMNS, messages))
    if count <= SMALL_BATCH_MAX:
        records = _small_batch(rows)
        if records is not None:
            return records
    columns = list(zip(*rows))
    ids_end = len(_ID_FIELDS)
    numbers_end = ids_end + len(_NUMBER_FIELDS)
    ids = _id_words(columns[:ids_end], field)
    # Every proto number here fits an int64 (amount_fen is one, the others are uint32), so one array holds them.
    numbers = np.array(columns[ids_end:numbers_end], dtype=np.int64)
    if ((numbers < _NUMBER_LOWEST) | (numbers > _NUMBER_HIGHEST)).any():
        _name_bad_number(numbers, field)
    amount, ledger, code, timeout = numbers.astype(np.uint64)
    flags = _FLAG_BITS @ np.array(columns[numbers_end:], dtype=np.uint64)
    # The record as its 16 little-endian u64 words (see _WORD_LAYOUT): a handful of whole-column writes
    # instead of one structured-field write per field, which matters for the many one-transfer requests.
    words = np.empty((count, _RECORD_WORDS), dtype="<u8")
    words[:, :ids_end * 2] = ids
    words[:, 12] = amount
    words[:, 13] = 0  # timestamp: the ledger's
    words[:, 14] = timeout | (ledger << np.uint64(32))
    words[:, 15] = code | (flags << np.uint64(16))  # reserved (the top 32 bits) stays zero
    return words.view(TRANSFER_DTYPE).reshape(count)


def _small_batch(rows: list[tuple[Any, ...]]) -> np.ndarray | None:
    """A few transfers, one by one in plain Python: the batch, or None if any value breaks a rule (then the
    columnar path, the one place that names bad fields, runs and refuses). Most unary requests carry one
    transfer, and for those the dozen numpy calls of the columnar path cost more than the work itself.

    An id becomes its record bytes in one step: left-padded to 32 digits, ``bytes.fromhex`` gives the u128
    big-endian, reversed it is the record's little-endian [lo, hi]. ``fromhex`` refuses anything but hex
    digits and whitespace, and whitespace (skipped) or a longer id shows as a length other than 16."""
    parts: list[bytes] = []
    ids_end = len(_ID_FIELDS)
    try:
        for row in rows:
            for text, required in zip(row, _ID_REQUIRED):
                if text:
                    big_endian = bytes.fromhex(text.rjust(ID_HEX_DIGITS_MAX, "0"))
                    if len(big_endian) != _ID_BYTES:
                        return None
                    parts.append(big_endian[::-1])
                elif required:
                    return None
                else:
                    parts.append(_ZERO_ID)
            amount, ledger, code, timeout, linked, pending, post, void = row[ids_end:]
            if not (0 <= amount <= INT64_MAX and 1 <= ledger <= U32_MAX and 1 <= code <= U16_MAX
                    and 0 <= timeout <= U32_MAX):
                return None
            flags = ((linked and _LINKED) | (pending and _PENDING) | (post and _POST_PENDING)
                     | (void and _VOID_PENDING))
            parts.append(_RECORD_TAIL.pack(amount, 0, timeout, ledger, code, flags, 0))
    except ValueError:  # not a hex digit
        return None
    return np.frombuffer(bytearray(b"".join(parts)), dtype=TRANSFER_DTYPE)  # writable, as the columnar path's


def _id_words(columns: Sequence[Sequence[str]], field: str) -> np.ndarray:
    """Columns of hex ids (in _ID_FIELDS order) as one (n, 2 * columns) array of little-endian u64 words,
    [lo, hi] per id, in record order.

    One string, one ``bytes.fromhex``: every id is left-padded to 32 digits, so the joined text has exactly
    32 characters per id unless one is too long, and ``fromhex`` yields 16 bytes per id unless a character
    is not a hex digit (an error) or is whitespace (skipped, so fewer bytes).
    """
    count = len(columns[0])
    joined = "".join([_padded_column(column) for column in columns])
    raw = b""
    if len(joined) == ID_HEX_DIGITS_MAX * count * len(columns):
        try:
            raw = bytes.fromhex(joined)
        except ValueError:
            pass
    required = all(all(column) for column, (_, needed) in zip(columns, _ID_FIELDS) if needed)
    if len(raw) != 16 * count * len(columns) or not required:
        _name_bad_id(columns, field)
    big_endian = np.frombuffer(raw, dtype=">u8").reshape(len(columns), count, 2)  # [hi, lo] per id
    return big_endian[:, :, ::-1].transpose(1, 0, 2).reshape(count, 2 * len(columns))


def _padded_column(column: Sequence[str]) -> str:
    """The column's ids, each left-padded with zeros to 32 digits, as one string. Ids of one column usually
    share a length (an application numbers its transfers; account ids are fixed), and then the padding
    is the separator of a single ``join`` instead of a method call per id."""
    lengths = set(map(len, column))
    if len(lengths) == 1:
        length = lengths.pop()
        if length <= ID_HEX_DIGITS_MAX:
            padding = "0" * (ID_HEX_DIGITS_MAX - length)
            return padding + padding.join(column)
    return "".join([value.rjust(ID_HEX_DIGITS_MAX, "0") for value in column])


def _name_bad_id(columns: Sequence[Sequence[str]], field: str) -> None:
    for column, (name, required) in zip(columns, _ID_FIELDS):
        for index, value in enumerate(column):
            parse_id(value, f"{field}[{index}].{name}", required=required)
    raise AssertionError("an id column failed the batch check but no single id does")


def _name_bad_number(numbers: np.ndarray, field: str) -> None:
    for row, (name, _, low, high) in zip(numbers, _NUMBER_FIELDS):
        bad = np.flatnonzero((row < low) | (row > high))
        if len(bad):
            index = int(bad[0])
            value = int(row[index])
            what = "is required" if value == 0 and low > 0 else f"{value} is out of range"
            raise FieldError(f"{field}[{index}].{name}", f"{what} ({low} to {high})")


def transfers_from_packed(payload: bytes, field: str = "packed_transfers") -> np.ndarray:
    """A request's packed transfers (ledger.proto: 128-byte little-endian records) as a TRANSFER_DTYPE
    batch, every record checked.

    The batch is a read-only view of ``payload``, not a copy: the ledger only reads a batch, and ``payload``
    is immutable bytes of this request's own (reading the message field made them). A structured copy would
    cost more than all the checks together (numpy copies such a dtype field by field, record by record), as
    would the checks run per structured field; they run instead over the records' u64 words (_WORD_LAYOUT),
    a few whole-batch operations, and only a refused batch is looked at field by field."""
    if len(payload) % PACKED_RECORD_BYTES:
        raise FieldError(field, f"is {len(payload)} bytes, not a whole number of {PACKED_RECORD_BYTES}-byte records")
    count = len(payload) // PACKED_RECORD_BYTES
    check_batch_size(count, field)
    words = np.frombuffer(payload, dtype="<u8").reshape(count, _RECORD_WORDS)
    if not _packed_good(words):
        for name, mask, problem in _packed_problems(words):
            found = np.flatnonzero(mask)
            if len(found):
                raise FieldError(f"{field}[{int(found[0])}].{name}", problem)
        raise AssertionError("a packed batch failed the word check but no field does")
    return np.frombuffer(payload, dtype=TRANSFER_DTYPE)


def _packed_good(words: np.ndarray) -> bool:
    """Whether every record keeps the rules _packed_problems names: zero where it must be (an amount over
    int64 has the sign bit; the timestamp; word 15's reserved bits), and a required field not zero."""
    must_be_zero = (words[:, 12] >> _SHIFT_SIGN) | words[:, 13] | (words[:, 15] & _WORD15_MUST_BE_ZERO)
    if must_be_zero.any():
        return False
    required = [words[:, lo] | words[:, hi] for lo, hi in _REQUIRED_ID_WORDS]
    required += [words[:, 14] >> _SHIFT_LEDGER, words[:, 15] & _WORD15_CODE]
    return all(column.all() for column in required)


def _packed_problems(words: np.ndarray) -> list[tuple[str, Any, str]]:
    """(field, which records break the rule, the rule), in the order a bad field is named; ``words`` are
    the records as (n, 16) u64."""
    problems = [(name, (words[:, lo] | words[:, hi]) == 0, "is required (not zero)")
                for (name, _), (lo, hi) in zip(_ID_FIELDS, _REQUIRED_ID_WORDS)]
    timeout_ledger, code_flags_reserved = words[:, 14], words[:, 15]
    problems += [
        ("amount_fen", words[:, 12] > np.uint64(INT64_MAX), f"is over the API's int64 maximum of {INT64_MAX}"),
        ("ledger", (timeout_ledger >> _SHIFT_LEDGER) == 0, "is required (not zero)"),
        ("code", (code_flags_reserved & _WORD15_CODE) == 0, "is required (not zero)"),
        ("flags", (code_flags_reserved & np.uint64(_FLAGS_UNKNOWN << 16)) != 0,
         f"bits above {_FLAGS_KNOWN:#x} are reserved and must be zero"),
        ("reserved", (words[:, 13] != 0) | ((code_flags_reserved >> np.uint64(32)) != 0),
         "bytes 104 to 111 and 124 to 127 of a record are reserved and must be zero"),
    ]
    return problems


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
    if len(results) <= SMALL_BATCH_MAX:  # a unary request's few: plain Python beats three numpy calls
        return [ledger_pb2.TransferError(index=index, result=status)
                for index, status in enumerate(results["status"].tolist()) if status]
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
