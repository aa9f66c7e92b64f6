"""The transit record in the e-purse's CAPP file, and where a gate finds the holder's rider category.

A gate writes one composite (CAPP) record at every tap, in the same atomic step as the debit (UPDATE CAPP
DATA CACHE between INITIALIZE FOR CAPP PURCHASE and DEBIT, card-standards.md §2.6). The record lives in
EF 0017 (SFI 17) of the purse ADF, identifier 02, 48 bytes: tag 02, length 2E, and 46 bytes of value. Its
content is scheme-specific (the standard fixes only the envelope); this is this city's layout. Integers are
big-endian, times BCD city time, ids ASCII padded with 00:

    offset size  field             meaning
         0    1  tag               02
         1    1  length            2E (46)
         2    1  format            01 (00: never written since personalisation; then every byte is 00)
         3    1  journey state     00 none, 01 entered (tap-on, journey open), 02 exited (tap-off), 03 boarded
         4    1  lock              00; the Changsha applet debits only while this byte is 00, so a gate never
                                   writes another value and refuses a record that has one
         5    1  rider category    the category code the gate applied at this tap (RIDER_CATEGORIES)
         6    7  tapped at         YYYYMMDDhhmmss BCD: the entry time when entered, else the last tap's time
        13    8  route id          GTFS route_id of the line tapped
        21   10  stop id           GTFS stop_id: the entry stop when entered
        31    4  amount fen        u32: held at entry (the maximum fare), charged at exit or boarding
        35    6  terminal id       the gate's SAM terminal id (the chip transaction's terminal)
        41    7  reserved          00

Where the rider category comes from. Online, the server decides (registry categories) and the gate writes
what the decision names. Offline, the gate has only the chip: the issuer writes the holder's category code
at personalisation in byte 28 of the purse's public data file EF 0015 (the first of its two "issuer FCI
data" bytes, card/personalize.py `PurseProfile.rider_category`). The purse's SELECT answer carries that
file in its FCI (tag 9F0C), so the gate reads the category with no extra APDU, and the issuer can change
it at a service counter (UPDATE BINARY after EXTERNAL AUTHENTICATE) without touching transit records.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from citycard.core.clock import CITY_ZONE

__all__ = [
    "ADULT",
    "CAPP_RECORD_BYTES",
    "CAPP_RECORD_ID",
    "CATEGORY_CODES",
    "CATEGORY_OFFSET_IN_PUBLIC_DATA",
    "RIDER_CATEGORIES",
    "CappError",
    "JourneyState",
    "TransitRecord",
    "category_code",
    "category_from_fci",
    "category_id",
]

CAPP_RECORD_ID = 0x02
CAPP_RECORD_BYTES = 48
CAPP_VALUE_BYTES = CAPP_RECORD_BYTES - 2
FORMAT_NEVER_WRITTEN = 0x00
FORMAT_V1 = 0x01
LOCK_OPEN = 0x00
ROUTE_ID_BYTES = 8
STOP_ID_BYTES = 10
TERMINAL_ID_BYTES = 6
AMOUNT_FEN_MAX = 0x7FFFFFFF  # the purse's own amount limit
RESERVED_BYTES = 7
CATEGORY_OFFSET_IN_PUBLIC_DATA = 28  # EF 0015 byte 28: issuer FCI data, first byte
PUBLIC_DATA_BYTES = 30
FCI_PUBLIC_DATA_TAG = b"\x9f\x0c"

ADULT = "adult"
# Category codes on the chip and the GTFS rider_category_id each stands for. Code 00 is no concession.
RIDER_CATEGORIES: dict[int, str] = {0x00: ADULT, 0x01: "senior", 0x02: "student", 0x03: "disabled"}
CATEGORY_CODES: dict[str, int] = {name: code for code, name in RIDER_CATEGORIES.items()}


class CappError(ValueError):
    """A transit record (or a value for one) that does not fit the layout; the message names the field."""


class JourneyState(enum.IntEnum):
    NONE = 0x00
    ENTERED = 0x01
    EXITED = 0x02
    BOARDED = 0x03


def category_id(code: int) -> str:
    """The rider_category_id of a chip code; a code this gate does not know pays the adult fare."""
    return RIDER_CATEGORIES.get(code, ADULT)


def category_code(rider_category_id: str) -> int:
    """The chip code of a rider_category_id; a category without a code is written as 00 (adult)."""
    return CATEGORY_CODES.get(rider_category_id, CATEGORY_CODES[ADULT])


def category_from_fci(fci: bytes) -> int:
    """The holder's category code from the purse ADF's FCI: byte 28 of the 0015 content in tag 9F0C."""
    marker = fci.find(FCI_PUBLIC_DATA_TAG)
    if marker < 0 or marker + 3 > len(fci) or fci[marker + 2] != PUBLIC_DATA_BYTES:
        raise CappError("purse FCI: no 30-byte public data (9F0C)")
    start = marker + 3
    if start + PUBLIC_DATA_BYTES > len(fci):
        raise CappError("purse FCI: public data (9F0C) cut short")
    return fci[start + CATEGORY_OFFSET_IN_PUBLIC_DATA]


@dataclass(frozen=True, slots=True)
class TransitRecord:
    """The decoded CAPP transit record. `state` NONE with every other field empty is a fresh card."""

    state: JourneyState
    category: int = 0
    tapped_at: dt.datetime | None = None  # city time, to the second
    route_id: str = ""
    stop_id: str = ""
    amount_fen: int = 0
    terminal_id: bytes = bytes(TERMINAL_ID_BYTES)

    @property
    def rider_category_id(self) -> str:
        return category_id(self.category)

    def encode(self) -> bytes:
        """The 48 bytes for UPDATE CAPP DATA CACHE; raises CappError naming a field that does not fit."""
        if not isinstance(self.state, JourneyState) or self.state is JourneyState.NONE:
            raise CappError("state: a gate writes entered, exited or boarded")
        if self.tapped_at is None:
            raise CappError("tapped_at: required")
        if not 0 <= self.category <= 0xFF:
            raise CappError("category: one byte, 0..255")
        if not isinstance(self.amount_fen, int) or not 0 <= self.amount_fen <= AMOUNT_FEN_MAX:
            raise CappError(f"amount_fen: an integer number of fen, 0..{AMOUNT_FEN_MAX}")
        if len(self.terminal_id) != TERMINAL_ID_BYTES:
            raise CappError("terminal_id: 6 bytes")
        value = (bytes((FORMAT_V1, self.state, LOCK_OPEN, self.category)) + _bcd_time(self.tapped_at)
                 + _ascii("route_id", self.route_id, ROUTE_ID_BYTES) + _ascii("stop_id", self.stop_id, STOP_ID_BYTES)
                 + self.amount_fen.to_bytes(4, "big") + self.terminal_id + bytes(RESERVED_BYTES))
        return bytes((CAPP_RECORD_ID, CAPP_VALUE_BYTES)) + value

    @classmethod
    def decode(cls, record: bytes) -> TransitRecord:
        """Check and read a record as READ RECORD returns it; raises CappError naming the first bad field."""
        if len(record) != CAPP_RECORD_BYTES:
            raise CappError(f"record: {len(record)} bytes, expected {CAPP_RECORD_BYTES}")
        if record[0] != CAPP_RECORD_ID or record[1] != CAPP_VALUE_BYTES:
            raise CappError(f"record: tag {record[0]:02X} length {record[1]:02X}, expected 02 2E")
        value = record[2:]
        if value[0] == FORMAT_NEVER_WRITTEN:
            if any(value):
                raise CappError("format 00 (never written) with data in the record")
            return cls(JourneyState.NONE)
        if value[0] != FORMAT_V1:
            raise CappError(f"format: {value[0]:02X} is not a format this gate reads")
        try:
            state = JourneyState(value[1])
        except ValueError:
            raise CappError(f"journey state: {value[1]:02X} is not 01, 02 or 03") from None
        if state is JourneyState.NONE:
            raise CappError("journey state: 00 in a written record")
        if value[2] != LOCK_OPEN:
            raise CappError(f"lock: {value[2]:02X}, the record is locked")
        if any(value[39:]):
            raise CappError("reserved bytes are not zero")
        return cls(state, value[3], _time_from_bcd(value[4:11]), _text("route_id", value[11:19]),
                   _text("stop_id", value[19:29]), int.from_bytes(value[29:33], "big"), bytes(value[33:39]))


def _bcd_time(when: dt.datetime) -> bytes:
    if when.tzinfo is not None:
        when = when.astimezone(CITY_ZONE)
    return bytes.fromhex(when.strftime("%Y%m%d%H%M%S"))


def _time_from_bcd(raw: bytes) -> dt.datetime:
    digits = raw.hex()
    try:
        if not digits.isdigit():
            raise ValueError
        naive = dt.datetime.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        raise CappError(f"tapped_at: {digits.upper()} is not a BCD date and time") from None
    return naive.replace(tzinfo=CITY_ZONE)


def _ascii(name: str, text: str, length: int) -> bytes:
    if not text or not text.isascii() or not text.isprintable():
        raise CappError(f"{name}: {text!r} must be 1 to {length} printable ASCII characters")
    raw = text.encode("ascii")
    if len(raw) > length:
        raise CappError(f"{name}: {text!r} is longer than {length} characters")
    return raw.ljust(length, b"\x00")


def _text(name: str, raw: bytes) -> str:
    body = raw.rstrip(b"\x00")
    if not body or b"\x00" in body or not body.isascii() or not body.decode("ascii").isprintable():
        raise CappError(f"{name}: {raw.hex().upper()} is not printable ASCII padded with 00")
    return body.decode("ascii")
