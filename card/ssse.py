"""The social security application (SSSE): its AID and the EF05 / EF06 TLV records.

Layout from card-standards.md §4.2. Each data item is one record `tag || length || value`;
record numbers and tags differ (EF06 record 1 is tag 08), which is why READ RECORD works both by
number and by tag. Formats: `cn` (dates, region codes) is BCD, left-aligned, padded with F;
`an` is ASCII (GBK for names), left-aligned, padded with 00; `b` is binary.

Used on both sides: personalisation encodes these records into the chip, the terminal decodes them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

__all__ = [
    "EF05_FID",
    "EF05_ITEMS",
    "EF05_SFI",
    "EF06_FID",
    "EF06_ITEMS",
    "EF06_SFI",
    "SSSE_AID",
    "CardIdentity",
    "Holder",
    "HolderDataError",
    "check_ssn",
]

# "sx1.sh." + GBK "社会保障" (§4.1).
SSSE_AID = bytes.fromhex("7378312E73682EC9E7BBE1B1A3D5CF")
EF05_FID, EF06_FID = 0xEF05, 0xEF06
EF05_SFI, EF06_SFI = 0x05, 0x06


@dataclass(frozen=True, slots=True)
class Item:
    record: int
    tag: int
    length: int
    fmt: str  # "b", "an", "cn", "gbk"


# EF05: card and issuer data.
EF05_ITEMS = {
    "card_id_code": Item(1, 0x01, 16, "b"),
    "card_type": Item(2, 0x02, 1, "an"),
    "spec_version": Item(3, 0x03, 4, "an"),
    "init_org": Item(4, 0x04, 12, "b"),
    "issue_date": Item(5, 0x05, 4, "cn"),
    "expiry_date": Item(6, 0x06, 4, "cn"),
    "card_number": Item(7, 0x07, 9, "an"),
}
# EF06: cardholder basics. Record 3 (tag 4E, name extension) keeps the numbering of the spec; its
# length is not confirmed by the sources (§4.2 marks it ○), 20 bytes is this card's choice.
EF06_ITEMS = {
    "ssn": Item(1, 0x08, 18, "an"),
    "name": Item(2, 0x09, 30, "gbk"),
    "name_extension": Item(3, 0x4E, 20, "gbk"),
    "gender": Item(4, 0x0A, 1, "an"),
    "ethnicity": Item(5, 0x0B, 1, "cn"),
    "birthplace": Item(6, 0x0C, 3, "cn"),
    "birth_date": Item(7, 0x0D, 4, "cn"),
}


class HolderDataError(ValueError):
    """A holder or card data item does not fit its format; the message names the item."""


# -- value codecs ---------------------------------------------------------------------------------


def _encode(name: str, item: Item, value: str | bytes) -> bytes:
    if item.fmt == "b":
        raw = value if isinstance(value, bytes) else _hex(name, value)
        if len(raw) != item.length:
            raise HolderDataError(f"{name}: must be {item.length} bytes ({2 * item.length} hex digits)")
        return raw
    text = value.decode() if isinstance(value, bytes) else value
    if item.fmt == "cn":
        if not text.isascii() or not text.isdigit() or len(text) > 2 * item.length:
            raise HolderDataError(f"{name}: must be at most {2 * item.length} decimal digits")
        return bytes.fromhex(text.ljust(2 * item.length, "F"))
    try:
        raw = text.encode("gbk" if item.fmt == "gbk" else "ascii")
    except UnicodeEncodeError:
        raise HolderDataError(f"{name}: has characters outside {'GBK' if item.fmt == 'gbk' else 'ASCII'}") from None
    if len(raw) > item.length:
        raise HolderDataError(f"{name}: longer than {item.length} bytes")
    return raw.ljust(item.length, b"\x00")


def _decode(item: Item, raw: bytes) -> str:
    if item.fmt == "b":
        return raw.hex().upper()
    if item.fmt == "cn":
        return raw.hex().upper().rstrip("F")
    return raw.rstrip(b"\x00").decode("gbk" if item.fmt == "gbk" else "ascii", errors="replace")


def _hex(name: str, text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise HolderDataError(f"{name}: not hexadecimal") from None


def _date_digits(name: str, text: str) -> str:
    try:
        return dt.date.fromisoformat(text).strftime("%Y%m%d")
    except (TypeError, ValueError):
        raise HolderDataError(f"{name}: must be a date YYYY-MM-DD") from None


def _date_text(digits: str) -> str:
    return f"{digits[0:4]}-{digits[4:6]}-{digits[6:8]}" if len(digits) == 8 else digits


def _records(items: dict[str, Item], values: dict[str, str | bytes]) -> list[bytes]:
    out = []
    for name, item in sorted(items.items(), key=lambda kv: kv[1].record):
        value = _encode(name, item, values[name])
        out.append(bytes((item.tag, len(value))) + value)
    return out


def _values(items: dict[str, Item], records: dict[int, bytes]) -> dict[str, str]:
    """Decode TLV records keyed by tag; a missing or malformed record is an error naming the item."""
    out = {}
    for name, item in items.items():
        record = records.get(item.tag)
        if record is None or len(record) < 2 or record[1] != len(record) - 2:
            raise HolderDataError(f"{name}: record with tag {item.tag:02X} missing or malformed")
        out[name] = _decode(item, record[2:])
    return out


# -- GB 11643 citizen ID (the social security number) ----------------------------------------------

_SSN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SSN_CHECK = "10X98765432"


def check_ssn(ssn: str) -> None:
    """18 characters: 17 digits and the ISO 7064 MOD 11-2 check character."""
    if len(ssn) != 18 or not ssn[:17].isdigit() or not ssn.isascii():
        raise HolderDataError("ssn: must be 18 characters, 17 digits then a check character")
    total = sum(int(d) * w for d, w in zip(ssn[:17], _SSN_WEIGHTS))
    if ssn[17].upper() != _SSN_CHECK[total % 11]:
        raise HolderDataError("ssn: check character does not match")


# -- the two files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardIdentity:
    """EF05. `card_id_code` and `init_org` are hex text; dates are YYYY-MM-DD."""

    card_id_code: str
    card_type: str
    spec_version: str
    init_org: str
    issue_date: str
    expiry_date: str
    card_number: str

    def records(self) -> list[bytes]:
        if len(self.card_number) != 9:
            raise HolderDataError("card_number: must be 9 characters")
        values: dict[str, str | bytes] = {
            "card_id_code": self.card_id_code,
            "card_type": self.card_type,
            "spec_version": self.spec_version,
            "init_org": self.init_org,
            "issue_date": _date_digits("issue_date", self.issue_date),
            "expiry_date": _date_digits("expiry_date", self.expiry_date),
            "card_number": self.card_number,
        }
        return _records(EF05_ITEMS, values)

    @classmethod
    def from_records(cls, records: dict[int, bytes]) -> CardIdentity:
        v = _values(EF05_ITEMS, records)
        v["issue_date"] = _date_text(v["issue_date"])
        v["expiry_date"] = _date_text(v["expiry_date"])
        return cls(**v)


@dataclass(frozen=True, slots=True)
class Holder:
    """EF06. `gender` is the GB 2261 code ('1' male, '2' female), `ethnicity` the GB 3304 code ('01'
    Han), `birthplace` a 6-digit region code, `birth_date` YYYY-MM-DD."""

    ssn: str
    name: str
    gender: str
    ethnicity: str
    birthplace: str
    birth_date: str
    name_extension: str = ""

    def records(self) -> list[bytes]:
        check_ssn(self.ssn)
        if not self.name:
            raise HolderDataError("name: empty")
        if len(self.ethnicity) != 2:
            raise HolderDataError("ethnicity: must be 2 digits (GB 3304)")
        values: dict[str, str | bytes] = {
            "ssn": self.ssn.upper(),
            "name": self.name,
            "name_extension": self.name_extension,
            "gender": self.gender,
            "ethnicity": self.ethnicity,
            "birthplace": self.birthplace,
            "birth_date": _date_digits("birth_date", self.birth_date),
        }
        return _records(EF06_ITEMS, values)

    @classmethod
    def from_records(cls, records: dict[int, bytes]) -> Holder:
        v = _values(EF06_ITEMS, records)
        v["birth_date"] = _date_text(v["birth_date"])
        return cls(**v)

    @property
    def ssn_masked(self) -> str:
        """First 6 and last 4 characters, as logs and errors show ID numbers."""
        return self.ssn[:6] + "*" * (len(self.ssn) - 10) + self.ssn[-4:]
