"""Terminal-side commands: build each APDU of the card's command set, and parse its answer.

Builders are pure (`Apdu` in, nothing sent); flows.py sends them through a CardChannel. Byte
layouts are those of card-standards.md §1.2, §2.3 and §4.2; Le values are the ones terminals send.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from .apdu import SHORT_NE_MAX, encode_command
from .channel import Apdu
from .purse import DETAIL_RECORD_BYTES, PUBLIC_DATA_BYTES
from .state import pin_from_digits

__all__ = [
    "LoadInit",
    "PublicData",
    "PurchaseInit",
    "ResponseFormatError",
    "TransactionRecord",
    "bcd_date_time",
    "change_pin",
    "credit_for_load",
    "debit_for_purchase",
    "external_authenticate",
    "get_balance",
    "get_challenge",
    "get_transaction_prove",
    "initialize_for_capp_purchase",
    "initialize_for_load",
    "initialize_for_purchase",
    "internal_authenticate",
    "parse_fci_public_data",
    "read_binary",
    "read_record",
    "read_record_by_tag",
    "reload_pin",
    "select_by_name",
    "select_ef",
    "select_mf",
    "update_binary",
    "update_capp_data_cache",
    "update_record",
    "verify_pin",
]

TERMINAL_ID_BYTES = 6
DATE_TIME_BYTES = 7
DEBIT_DATA_BYTES = 15  # terminal transaction number (4) || date time (7) || MAC1 (4)


class ResponseFormatError(ValueError):
    """A success answer whose data does not have the layout the command promises."""


def _amount(amount_fen: int) -> bytes:
    if not isinstance(amount_fen, int) or isinstance(amount_fen, bool) or not 0 <= amount_fen <= 0x7FFFFFFF:
        raise ValueError("amount_fen must be an integer 0..2147483647")
    return amount_fen.to_bytes(4, "big")


def _terminal_id(terminal_id: bytes) -> bytes:
    if len(terminal_id) != TERMINAL_ID_BYTES:
        raise ValueError("a terminal id is 6 bytes")
    return terminal_id


def bcd_date_time(when: dt.datetime) -> bytes:
    """YYYYMMDD || hhmmss as 7 BCD bytes."""
    # The decimal digits, read as hex, are the BCD bytes (an f-string costs a third of strftime).
    return bytes.fromhex(f"{when.year:04d}{when.month:02d}{when.day:02d}"
                         f"{when.hour:02d}{when.minute:02d}{when.second:02d}")


# -- ISO file system ------------------------------------------------------------------------------


def select_by_name(aid: bytes, name: str = "SELECT") -> Apdu:
    return Apdu(name, encode_command(0x00, 0xA4, 0x04, 0x00, aid, SHORT_NE_MAX))


def select_mf() -> Apdu:
    return Apdu("SELECT MF", encode_command(0x00, 0xA4, 0x00, 0x00, b"\x3f\x00", SHORT_NE_MAX))


def select_ef(fid: int) -> Apdu:
    """`00 A4 02 00 02 FID`, as social security readers select EF05 / EF06."""
    return Apdu(f"SELECT EF {fid:04X}", encode_command(0x00, 0xA4, 0x02, 0x00, fid.to_bytes(2, "big")))


def read_binary(sfi: int, offset: int = 0, ne: int = SHORT_NE_MAX) -> Apdu:
    if not 1 <= sfi <= 30 or not 0 <= offset <= 0xFF:
        raise ValueError("READ BINARY by SFI: SFI 1..30, offset 0..255")
    return Apdu(f"READ BINARY SFI {sfi:02X}", encode_command(0x00, 0xB0, 0x80 | sfi, offset, ne=ne))


def update_binary(sfi: int, offset: int, data: bytes) -> Apdu:
    if not 1 <= sfi <= 30 or not 0 <= offset <= 0xFF:
        raise ValueError("UPDATE BINARY by SFI: SFI 1..30, offset 0..255")
    return Apdu(f"UPDATE BINARY SFI {sfi:02X}", encode_command(0x00, 0xD6, 0x80 | sfi, offset, data))


def _where(sfi: int) -> str:
    return f"SFI {sfi:02X}" if sfi else "current EF"


def read_record(sfi: int, number: int, ne: int = SHORT_NE_MAX) -> Apdu:
    """By number: P2 = SFI << 3 | 100 (SFI 0: the current EF, e.g. `00 B2 01 04`)."""
    return Apdu(f"READ RECORD {number} {_where(sfi)}", encode_command(0x00, 0xB2, number, (sfi << 3) | 0x04, ne=ne))


def read_record_by_tag(sfi: int, tag: int, ne: int = SHORT_NE_MAX) -> Apdu:
    """By identifier: P1 = the record's tag, P2 = SFI << 3 | 000 (SFI 0: the current EF, `00 B2 08 00`)."""
    return Apdu(f"READ RECORD tag {tag:02X} {_where(sfi)}", encode_command(0x00, 0xB2, tag, sfi << 3, ne=ne))


def update_record(sfi: int, number: int, record: bytes) -> Apdu:
    return Apdu(f"UPDATE RECORD {number} SFI {sfi:02X}", encode_command(0x00, 0xDC, number, (sfi << 3) | 0x04, record))


# -- PIN and authentication ----------------------------------------------------------------------


def verify_pin(pin: str) -> Apdu:
    return Apdu("VERIFY", encode_command(0x00, 0x20, 0x00, 0x00, pin_from_digits(pin)), secret=True)


def change_pin(old: str, new: str) -> Apdu:
    data = pin_from_digits(old) + b"\xff" + pin_from_digits(new)
    return Apdu("CHANGE PIN", encode_command(0x80, 0x5E, 0x01, 0x00, data), secret=True)


def reload_pin(new_pin: bytes, mac: bytes) -> Apdu:
    return Apdu("RELOAD PIN", encode_command(0x80, 0x5E, 0x00, 0x00, new_pin + mac), secret=True)


def get_challenge(length: int = 8) -> Apdu:
    return Apdu("GET CHALLENGE", encode_command(0x00, 0x84, 0x00, 0x00, ne=length))


def external_authenticate(key_id: int, cryptogram: bytes) -> Apdu:
    return Apdu("EXTERNAL AUTHENTICATE", encode_command(0x00, 0x82, 0x00, key_id, cryptogram))


def internal_authenticate(key_id: int, challenge: bytes) -> Apdu:
    return Apdu("INTERNAL AUTHENTICATE", encode_command(0x00, 0x88, 0x00, key_id, challenge, 8))


# -- ED/EP ----------------------------------------------------------------------------------------


def get_balance(purse: int) -> Apdu:
    return Apdu("GET BALANCE", encode_command(0x80, 0x5C, 0x00, purse, ne=4))


def initialize_for_load(purse: int, key_index: int, amount_fen: int, terminal_id: bytes) -> Apdu:
    data = bytes((key_index,)) + _amount(amount_fen) + _terminal_id(terminal_id)
    return Apdu("INITIALIZE FOR LOAD", encode_command(0x80, 0x50, 0x00, purse, data, 0x10))


def credit_for_load(date_time: bytes, mac2: bytes) -> Apdu:
    return Apdu("CREDIT FOR LOAD", encode_command(0x80, 0x52, 0x00, 0x00, date_time + mac2, 4))


def initialize_for_purchase(purse: int, key_index: int, amount_fen: int, terminal_id: bytes) -> Apdu:
    # Spelled out (a purchase sends one): `80 50 01 P2 0B` key index || amount || terminal id, Le 0F,
    # the bytes encode_command makes (bytes() refuses a P2 or key index beyond a byte, as it does).
    return Apdu("INITIALIZE FOR PURCHASE", b"\x80\x50\x01" + bytes((purse, 0x0B, key_index)) + _amount(amount_fen)
                + _terminal_id(terminal_id) + b"\x0f")


def initialize_for_capp_purchase(key_index: int, amount_fen: int, terminal_id: bytes) -> Apdu:
    data = bytes((key_index,)) + _amount(amount_fen) + _terminal_id(terminal_id)
    return Apdu("INITIALIZE FOR CAPP PURCHASE", encode_command(0x80, 0x50, 0x03, 0x02, data, 0x0F))


def update_capp_data_cache(sfi: int, record: bytes) -> Apdu:
    """P1 = the record's identifier (its first byte), P2 = SFI << 3."""
    if len(record) < 2:
        raise ValueError("a CAPP record is tag || length || value")
    return Apdu("UPDATE CAPP DATA CACHE", encode_command(0x80, 0xDC, record[0], sfi << 3, record))


def debit_for_purchase(terminal_seq: int, date_time: bytes, mac1: bytes) -> Apdu:
    data = terminal_seq.to_bytes(4, "big") + date_time + mac1
    if len(data) != DEBIT_DATA_BYTES:  # the one shape a purchase sends is spelled out below
        return Apdu("DEBIT FOR PURCHASE", encode_command(0x80, 0x54, 0x01, 0x00, data, 8))
    return Apdu("DEBIT FOR PURCHASE", b"\x80\x54\x01\x00\x0f" + data + b"\x08")


def get_transaction_prove(tx_type: int, counter: int) -> Apdu:
    return Apdu("GET TRANSACTION PROVE", encode_command(0x80, 0x5A, 0x00, tx_type, counter.to_bytes(2, "big"), 8))


# -- response layouts --------------------------------------------------------------------------------
# Parsed answers are NamedTuples: immutable, and built in a third of a frozen dataclass's time (a
# purchase parses two of them).


def _expect(data: bytes, length: int, what: str) -> None:
    if len(data) != length:
        raise ResponseFormatError(f"{what}: expected {length} bytes, got {len(data)}")


class LoadInit(NamedTuple):
    balance_fen: int
    online_counter: int
    key_version: int
    algorithm: int
    card_random: bytes
    mac1: bytes

    @classmethod
    def parse(cls, data: bytes) -> LoadInit:
        _expect(data, 16, "INITIALIZE FOR LOAD")
        return cls(int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:6], "big"), data[6], data[7],
                   data[8:12], data[12:16])


class PurchaseInit(NamedTuple):
    balance_fen: int
    offline_counter: int
    overdraft_fen: int
    key_version: int
    algorithm: int
    card_random: bytes

    @classmethod
    def parse(cls, data: bytes) -> PurchaseInit:
        _expect(data, 15, "INITIALIZE FOR PURCHASE")
        return cls(int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:6], "big"),
                   int.from_bytes(data[6:9], "big"), data[9], data[10], data[11:15])


class PublicData(NamedTuple):
    """The purse's public application data (SFI 15, 30 bytes)."""

    issuer_id: bytes
    app_type: int
    app_version: int
    app_serial: bytes
    start_date: str
    expiry_date: str

    @classmethod
    def parse(cls, data: bytes) -> PublicData:
        _expect(data, PUBLIC_DATA_BYTES, "public application data")
        return cls(data[0:8], data[8], data[9], data[10:20], data[20:24].hex(), data[24:28].hex())


def parse_fci_public_data(fci: bytes) -> PublicData:
    """Find tag 9F0C (the 0015 content) in the purse ADF's FCI."""
    marker = fci.find(b"\x9f\x0c")
    if marker < 0 or marker + 3 > len(fci):
        raise ResponseFormatError("FCI without 9F0C public data")
    length = fci[marker + 2]
    return PublicData.parse(fci[marker + 3 : marker + 3 + length])


class TransactionRecord(NamedTuple):
    """One 23-byte transaction detail record (SFI 18)."""

    counter: int
    overdraft_fen: int
    amount_fen: int
    tx_type: int
    terminal_id: bytes
    date_time: bytes

    @classmethod
    def parse(cls, record: bytes) -> TransactionRecord:
        _expect(record, DETAIL_RECORD_BYTES, "transaction detail record")
        return cls(int.from_bytes(record[0:2], "big"), int.from_bytes(record[2:5], "big"),
                   int.from_bytes(record[5:9], "big"), record[9], record[10:16], record[16:23])

    @property
    def when(self) -> str:
        d = self.date_time.hex()
        return f"{d[0:4]}-{d[4:6]}-{d[6:8]} {d[8:10]}:{d[10:12]}:{d[12:14]}"
