"""Offline transaction records as gates upload them: the packed 48-byte layout, and the checks of its fields.

The layout is proto/citycard/v1/transit.proto's (UploadRecordsRequest.packed_records): integers big-endian as
on the chip, no padding. `RECORD_DTYPE` maps it onto numpy, so a packed upload is read in place
(`from_packed`, no copy) and handed whole to the compiled TAC check (apps/bus/tac.py), and records given as
OfflineRecord messages are packed into the same array (`from_messages`).

    offset  size  field
         0    10  app_serial         BCD
        10     2  card_counter       u16
        12     4  amount_fen         u32   \\
        16     1  tx_type            u8     |
        17     6  terminal_id               | the 22 bytes the TAC covers, in its order
        23     4  terminal_seq       u32    |
        27     7  date_time          BCD   /
        34     4  tac
        38     4  balance_after_fen  u32
        42     6  reserved           zero

`validate` checks every field a TAC cannot vouch for being well-formed (BCD digits, a real calendar date and
time, the transaction type, the reserved bytes) and names each problem by record index, field and reason; it
never raises for bad content, so one bad record never hides the others.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from citycard.card.flows import PurchaseReceipt
from citycard.card.purse import TxType
from citycard.card.sam import PurchaseTacFields

from citycard.v1 import transit_pb2

__all__ = [
    "RECORDS_MAX",
    "RECORD_BYTES",
    "RECORD_DTYPE",
    "TAC_COVERED",
    "TRANSIT_TX_TYPES",
    "BatchTooLargeError",
    "FieldProblem",
    "PackedRecordsError",
    "Record",
    "RecordFieldError",
    "Validation",
    "bcd_column",
    "big_endian_column",
    "from_messages",
    "from_packed",
    "pack",
    "to_packed",
    "unpack",
    "validate",
]

RECORD_BYTES = 48
RECORDS_MAX = 8_189  # per upload (TRANSIT_BATCH_TOO_LARGE beyond), the ledger's batch limit
TRANSIT_TX_TYPES = (TxType.PURCHASE_EP, TxType.CAPP)
TAC_COVERED = slice(12, 34)  # amount .. date_time, as card.sam.PurchaseTacFields.mac_input() lays them out
YEAR_MIN = 2000  # no chip of this platform dated a transaction earlier; a smaller year is a corrupt record
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF

RECORD_DTYPE = np.dtype([
    ("app_serial", "u1", (10,)),
    ("card_counter", ">u2"),
    ("amount_fen", ">u4"),
    ("tx_type", "u1"),
    ("terminal_id", "u1", (6,)),
    ("terminal_seq", ">u4"),
    ("date_time", "u1", (7,)),
    ("tac", "u1", (4,)),
    ("balance_after_fen", ">u4"),
    ("reserved", "u1", (6,)),
])
_PACKED = struct.Struct(">10sHIB6sI7s4sI6x")
_BYTE_FIELDS = {"app_serial": 10, "terminal_id": 6, "date_time": 7, "tac": 4}
_INT_FIELDS = {"card_counter": U16_MAX, "amount_fen": U32_MAX, "tx_type": 0xFF, "terminal_seq": U32_MAX,
               "balance_after_fen": U32_MAX}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)

if RECORD_DTYPE.itemsize != RECORD_BYTES or _PACKED.size != RECORD_BYTES:  # an explicit check: never compiled out
    raise ImportError("the offline record layout is not 48 bytes")


class RecordFieldError(ValueError):
    """One field of one record cannot be packed: `field` names it, the message says why (no key, no TAC)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PackedRecordsError(ValueError):
    """A packed upload is not whole 48-byte records."""


class BatchTooLargeError(PackedRecordsError):
    """More records than one upload may carry (RECORDS_MAX)."""


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """Why record `index` is malformed: the field and a person-readable reason."""

    index: int
    field: str
    reason: str


class Validation(NamedTuple):
    ok: np.ndarray  # bool per record: no field problem
    problems: list[FieldProblem]  # by index, then in layout order


class Record(NamedTuple):
    """One offline record with Python values, for building and reading records one at a time."""

    app_serial: bytes  # 10 bytes, BCD
    card_counter: int  # the e-purse's offline counter the purchase used (before its increment)
    amount_fen: int
    tx_type: int
    terminal_id: bytes  # 6 bytes
    terminal_seq: int
    date_time: bytes  # 7 bytes, BCD YYYYMMDDhhmmss
    tac: bytes  # 4 bytes
    balance_after_fen: int

    def pack(self) -> bytes:
        """The 48 packed bytes; RecordFieldError names a field that does not fit its slot."""
        for name, size in _BYTE_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, bytes | bytearray) or len(value) != size:
                raise RecordFieldError(name, f"must be {size} bytes")
        for name, maximum in _INT_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
                raise RecordFieldError(name, f"must be an integer 0..{maximum}")
        return _PACKED.pack(self.app_serial, self.card_counter, self.amount_fen, self.tx_type, self.terminal_id,
                            self.terminal_seq, self.date_time, self.tac, self.balance_after_fen)

    def tac_fields(self) -> PurchaseTacFields:
        """What card.sam.verify_tac checks this record's TAC over."""
        return PurchaseTacFields(self.app_serial, self.amount_fen, self.tx_type, self.terminal_id,
                                 self.terminal_seq, self.date_time)

    def to_message(self) -> transit_pb2.OfflineRecord:
        return transit_pb2.OfflineRecord(
            app_serial=self.app_serial.hex().upper(), card_counter=self.card_counter, amount_fen=self.amount_fen,
            tx_type=self.tx_type, terminal_id=self.terminal_id.hex().upper(), terminal_seq=self.terminal_seq,
            date_time=self.date_time.hex(), tac=self.tac.hex().upper(), balance_after_fen=self.balance_after_fen)

    @classmethod
    def from_receipt(cls, receipt: PurchaseReceipt) -> Record:
        """The record a gate keeps of a purchase or composite purchase it made on the chip."""
        return cls(receipt.app_serial, receipt.offline_counter, receipt.amount_fen, receipt.tx_type,
                   receipt.terminal_id, receipt.terminal_seq, receipt.date_time, receipt.tac,
                   receipt.balance_after_fen)

    @classmethod
    def from_tac_fields(cls, fields: PurchaseTacFields, tac: bytes, *, card_counter: int,
                        balance_after_fen: int) -> Record:
        return cls(fields.app_serial, card_counter, fields.amount_fen, fields.tx_type, fields.terminal_id,
                   fields.terminal_seq, fields.date_time, tac, balance_after_fen)

    @classmethod
    def from_message(cls, message: transit_pb2.OfflineRecord) -> Record:
        """A record from its message form; RecordFieldError names the first field that is not well-formed."""
        return cls(
            app_serial=_hex_field("app_serial", message.app_serial, 10),
            card_counter=_int_field("card_counter", message.card_counter, U16_MAX),
            amount_fen=_int_field("amount_fen", message.amount_fen, U32_MAX),
            tx_type=_int_field("tx_type", message.tx_type, 0xFF),
            terminal_id=_hex_field("terminal_id", message.terminal_id, 6),
            terminal_seq=message.terminal_seq,
            date_time=_digits_field("date_time", message.date_time, 7),
            tac=_hex_field("tac", message.tac, 4),
            balance_after_fen=_int_field("balance_after_fen", message.balance_after_fen, U32_MAX),
        )


def _hex_field(name: str, text: str, size: int) -> bytes:
    if len(text) != 2 * size or not _HEX_DIGITS.issuperset(text):
        raise RecordFieldError(name, f"must be {2 * size} hex digits")
    return bytes.fromhex(text)


def _digits_field(name: str, text: str, size: int) -> bytes:
    if len(text) != 2 * size or not text.isascii() or not text.isdigit():
        raise RecordFieldError(name, f"must be {2 * size} decimal digits")
    return bytes.fromhex(text)


def _int_field(name: str, value: int, maximum: int) -> int:
    if not 0 <= value <= maximum:
        raise RecordFieldError(name, f"{value} is out of range 0..{maximum}")
    return value


# -- whole batches ------------------------------------------------------------------------------------


def from_packed(data: bytes | bytearray | memoryview, *, records_max: int = RECORDS_MAX) -> np.ndarray:
    """The records in a packed upload, read in place (no copy; read-only when `data` is bytes)."""
    size = len(data)
    if size == 0 or size % RECORD_BYTES:
        raise PackedRecordsError(f"packed records are whole {RECORD_BYTES}-byte records; got {size} bytes")
    if size // RECORD_BYTES > records_max:
        raise BatchTooLargeError(f"{size // RECORD_BYTES} records; at most {records_max} per upload")
    return np.frombuffer(data, dtype=RECORD_DTYPE)


def to_packed(records: np.ndarray) -> bytes:
    """The packed form of `records` (UploadRecordsRequest.packed_records)."""
    return _checked(records).tobytes()


def pack(records: Iterable[Record]) -> np.ndarray:
    """A writable array of `records`; RecordFieldError (with `index`) names the first one that does not fit."""
    packed = bytearray()
    for index, record in enumerate(records):
        try:
            packed += record.pack()
        except RecordFieldError as exc:
            raise RecordFieldError(exc.field, f"record {index}: {exc.reason}") from None
    return np.frombuffer(packed, dtype=RECORD_DTYPE)


def unpack(records: np.ndarray) -> list[Record]:
    """Each record with Python values (for reports and tests; the hot path stays on the array)."""
    return [Record(*_PACKED.unpack(row)) for row in _rows(_checked(records))]


def from_messages(messages: Sequence[transit_pb2.OfflineRecord]) -> tuple[np.ndarray, Validation]:
    """The records of an upload sent as messages, and their validation.

    A message that cannot be packed (a field not hex, a number too large) keeps its index with an all-zero
    record, reported as a problem in that field and never TAC-checked as good (its ok is False).
    """
    records = np.zeros(len(messages), dtype=RECORD_DTYPE)
    conversion: list[FieldProblem] = []
    raw = records.view(np.uint8).reshape(len(messages), RECORD_BYTES)
    for index, message in enumerate(messages):
        try:
            raw[index] = np.frombuffer(Record.from_message(message).pack(), dtype=np.uint8)
        except RecordFieldError as exc:
            conversion.append(FieldProblem(index, exc.field, exc.reason))
    checked = validate(records)
    if not conversion:
        return records, checked
    failed = {problem.index for problem in conversion}
    problems = conversion + [p for p in checked.problems if p.index not in failed]
    problems.sort(key=lambda p: p.index)  # stable: each record's problems keep their order
    ok = checked.ok.copy()
    ok[list(failed)] = False
    return records, Validation(ok, problems)


# -- validation ---------------------------------------------------------------------------------------


def validate(records: np.ndarray) -> Validation:
    """Every malformed field of every record, vectorised: BCD digits, calendar, type, reserved bytes."""
    records = _checked(records)
    # In layout order, so a record's problems read in the order of its fields.
    bad: dict[str, tuple[np.ndarray, str]] = {
        "app_serial": (~_all_bcd(records["app_serial"]), "is not 20 BCD digits"),
        "tx_type": (~np.asarray(np.isin(records["tx_type"], TRANSIT_TX_TYPES)),
                    "is not 6 (purchase) or 9 (composite purchase)"),
        "terminal_seq": (records["terminal_seq"] == 0, "is 0; a SAM numbers its transactions from 1"),
        "date_time": (~_valid_date_time(records["date_time"]),
                      f"is not a BCD date and time YYYYMMDDhhmmss from {YEAR_MIN} on"),
        "reserved": (np.asarray(records["reserved"].any(axis=1)), "must be zero"),
    }
    flagged = np.zeros(len(records), dtype=bool)
    for mask, _ in bad.values():
        flagged |= mask
    problems = []
    for index in np.flatnonzero(flagged).tolist():
        problems += [FieldProblem(index, field, reason) for field, (mask, reason) in bad.items() if mask[index]]
    return Validation(~flagged, problems)


def _checked(records: np.ndarray) -> np.ndarray:
    if not isinstance(records, np.ndarray) or records.dtype != RECORD_DTYPE or records.ndim != 1:
        raise TypeError("records must be a one-dimensional array of RECORD_DTYPE")
    return records


def _rows(records: np.ndarray) -> Iterable[bytes]:
    packed = np.ascontiguousarray(records).tobytes()
    return (packed[i:i + RECORD_BYTES] for i in range(0, len(packed), RECORD_BYTES))


def big_endian_column(raw: np.ndarray, columns: slice) -> np.ndarray:
    """The unsigned big-endian number in bytes `columns` of each row of `raw` (n x 48 uint8), as uint64."""
    value = np.zeros(raw.shape[0], dtype=np.uint64)
    for column in range(columns.start, columns.stop):
        value = (value << np.uint64(8)) | raw[:, column].astype(np.uint64)
    return value


def bcd_column(raw: np.ndarray, columns: slice) -> np.ndarray:
    """The decimal number the BCD bytes `columns` of each row of `raw` spell (checked to be BCD before)."""
    value = np.zeros(raw.shape[0], dtype=np.uint64)
    for column in range(columns.start, columns.stop):
        byte = raw[:, column].astype(np.uint64)
        value = value * np.uint64(100) + (byte >> np.uint64(4)) * np.uint64(10) + (byte & np.uint64(15))
    return value


def _all_bcd(field: np.ndarray) -> np.ndarray:
    return np.asarray(((field >> 4) <= 9).all(axis=1) & ((field & 0x0F) <= 9).all(axis=1))


def _valid_date_time(field: np.ndarray) -> np.ndarray:
    """YYYYMMDDhhmmss as 7 BCD bytes naming a real moment (leap years included)."""
    bcd = _all_bcd(field)
    two_digits = (field >> 4).astype(np.int64) * 10 + (field & 0x0F)  # per byte; garbage where not BCD
    year = two_digits[:, 0] * 100 + two_digits[:, 1]
    month, day, hour, minute, second = (two_digits[:, i] for i in range(2, 7))
    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    month_ok = (month >= 1) & (month <= 12)
    days = _DAYS_IN_MONTH[np.where(month_ok, month, 0)] + (leap & (month == 2))
    return np.asarray(bcd & (year >= YEAR_MIN) & month_ok & (day >= 1) & (day <= days)
            & (hour <= 23) & (minute <= 59) & (second <= 59))
