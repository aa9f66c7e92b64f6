"""Make a fresh card: the file tree, the holder's data and keys diversified from the issuer's masters.

Deliberately minimal (the production issue will personalise for real): one JSON profile in, one
card image out. The tree:

    MF 3F00
    ├── DDF SSSE (AID 7378312E73682EC9E7BBE1B1A3D5CF)    keys: pin_reload, maintenance, internal_auth
    │   ├── EF05 (SFI 05) card identity, TLV records    read always, update after EXTERNAL AUTHENTICATE
    │   └── EF06 (SFI 06) cardholder basics, TLV records read always, update after EXTERNAL AUTHENTICATE
    └── ADF 1001 ED/EP (AID A00000000386980701)         keys: purchase, load, tac, pin_reload, maintenance,
        │                                                     internal_auth
        ├── EF 0015 (SFI 15) public data, 30 bytes       read always, update after EXTERNAL AUTHENTICATE
        ├── EF 0016 (SFI 16) cardholder data, 55 bytes   read after VERIFY, update after EXTERNAL AUTHENTICATE
        ├── EF 0017 (SFI 17) CAPP records, 48 bytes each written only by the composite purchase
        └── EF 0018 (SFI 18) transaction details, cyclic 10 x 23 bytes, written only by the purse

SSSE keys are diversified with the rightmost 8 bytes of the card identification code, purse keys
with the rightmost 8 bytes of the application serial number (crypto.diversify).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .crypto import diversification_factor
from .fs import MF_FID, Access, DedicatedFile, EfKind, ElementaryFile
from .keys import APPLICATION_KEY_USAGES, CardKey, KeyUsage, MasterKeys
from .purse import (
    CAPP_SFI,
    CARDHOLDER_SFI,
    DETAIL_RECORD_BYTES,
    DETAIL_RECORDS,
    DETAIL_SFI,
    PUBLIC_DATA_BYTES,
    PUBLIC_DATA_SFI,
    PURSE_AID,
    PURSE_FID,
    PurseData,
)
from .ssse import EF05_FID, EF05_SFI, EF06_FID, EF06_SFI, SSSE_AID, CardIdentity, Holder, HolderDataError
from .state import CardImage, PinState, pin_from_digits

__all__ = ["SAMPLE_PROFILE", "CardProfile", "PurseProfile", "personalize", "profile_from_json"]

PIN_TRIES_DEFAULT = 3
KEY_TRIES_DEFAULT = 3  # EXTERNAL AUTHENTICATE failures before the maintenance key blocks
BALANCE_MAX_FEN_DEFAULT = 100_000  # 1,000.00 CNY, the usual cap of a city e-purse
CARDHOLDER_BYTES = 55
CAPP_RECORD_BYTES = 48  # Changsha-style transit record: tag 02, length 2E, 46 bytes (§2.6)
CAPP_RECORDS_MAX = 4
TRANSIT_CAPP_TAG = 0x02
APP_TYPE_ED_EP = 0x03
APP_VERSION = 0x01
APP_SERIAL_BYTES = 10
ISSUER_ID_BYTES = 8


@dataclass(frozen=True, slots=True)
class PurseProfile:
    issuer_id: str  # 16 hex digits
    app_serial: str  # 20 hex digits: the application serial number, source of the key factor
    start_date: str  # YYYY-MM-DD
    expiry_date: str
    balance_max_fen: int = BALANCE_MAX_FEN_DEFAULT
    # The holder's transit rider category code, byte 28 of 0015 (issuer FCI data), which offline gates
    # read from the purse's FCI; 0 = no concession (codes: apps/bus/capp.py).
    rider_category: int = 0


@dataclass(frozen=True, slots=True)
class CardProfile:
    identity: CardIdentity
    holder: Holder
    purse: PurseProfile
    initial_pin: str
    pin_tries: int = PIN_TRIES_DEFAULT


def profile_from_json(obj: Any) -> CardProfile:
    """Read a profile: {"ssse": {...}, "holder": {...}, "purse": {...}, "initial_pin": "123456"}."""
    if not isinstance(obj, dict):
        raise HolderDataError("profile: must be a JSON object")
    try:
        identity = CardIdentity(**obj["ssse"])
        holder = Holder(**obj["holder"])
        purse = PurseProfile(**obj["purse"])
        initial_pin = obj["initial_pin"]
    except KeyError as exc:
        raise HolderDataError(f"profile: section {exc} missing") from None
    except TypeError as exc:
        raise HolderDataError(f"profile: unexpected or missing field ({exc})") from None
    if not isinstance(initial_pin, str):
        raise HolderDataError("initial_pin: must be a string of 4 to 12 digits")
    return CardProfile(identity, holder, purse, initial_pin)


def personalize(profile: CardProfile, master_keys: MasterKeys) -> CardImage:
    """The card image for `profile`; raises HolderDataError naming the first bad field."""
    try:
        pin = pin_from_digits(profile.initial_pin)
    except ValueError:
        raise HolderDataError("initial_pin: must be 4 to 12 decimal digits") from None
    if not 1 <= profile.pin_tries <= 15:
        raise HolderDataError("pin_tries: must be 1..15")
    mf = DedicatedFile(fid=MF_FID)
    mf.add(_ssse_df(profile, master_keys))
    mf.add(_purse_df(profile, master_keys))
    purse = PurseData(balance_max_fen=_balance_max(profile.purse.balance_max_fen))
    return CardImage(mf=mf, pin=PinState(pin, profile.pin_tries, profile.pin_tries), purse=purse)


def _keys(master_keys: MasterKeys, application: str, factor8: bytes) -> list[CardKey]:
    keys = []
    for usage in APPLICATION_KEY_USAGES[application]:
        tries = KEY_TRIES_DEFAULT if usage is KeyUsage.MAINTENANCE else 0
        keys.append(master_keys.get(application, usage).for_card(usage, factor8, tries_max=tries))
    return keys


def _tlv_file(fid: int, sfi: int, records: list[bytes]) -> ElementaryFile:
    return ElementaryFile(
        fid=fid,
        kind=EfKind.LINEAR_VARIABLE,
        sfi=sfi,
        read=Access.ALWAYS,
        update=Access.AUTH,
        records=records,
        record_bytes=max(len(r) for r in records),
        records_max=len(records),
        tlv=True,
    )


def _ssse_df(profile: CardProfile, master_keys: MasterKeys) -> DedicatedFile:
    ef05 = profile.identity.records()
    ef06 = profile.holder.records()
    card_id_code = ef05[0][2:]
    ssse = DedicatedFile(
        name=SSSE_AID, application="ssse", keys=_keys(master_keys, "ssse", diversification_factor(card_id_code))
    )
    ssse.add(_tlv_file(EF05_FID, EF05_SFI, ef05))
    ssse.add(_tlv_file(EF06_FID, EF06_SFI, ef06))
    return ssse


def _purse_df(profile: CardProfile, master_keys: MasterKeys) -> DedicatedFile:
    p = profile.purse
    serial = _hex_field("purse.app_serial", p.app_serial, APP_SERIAL_BYTES)
    public = (
        _hex_field("purse.issuer_id", p.issuer_id, ISSUER_ID_BYTES)
        + bytes((APP_TYPE_ED_EP, APP_VERSION))
        + serial
        + _bcd_date("purse.start_date", p.start_date)
        + _bcd_date("purse.expiry_date", p.expiry_date)
        + bytes((_rider_category(p.rider_category), 0x00))
    )
    if len(public) != PUBLIC_DATA_BYTES:
        raise AssertionError("public data layout drifted from 30 bytes")
    df = DedicatedFile(
        fid=PURSE_FID,
        name=PURSE_AID,
        application="purse",
        keys=_keys(master_keys, "purse", diversification_factor(serial)),
    )
    df.add(ElementaryFile(fid=0x0015, kind=EfKind.TRANSPARENT, sfi=PUBLIC_DATA_SFI, update=Access.AUTH,
                          data=bytearray(public)))
    df.add(ElementaryFile(fid=0x0016, kind=EfKind.TRANSPARENT, sfi=CARDHOLDER_SFI, read=Access.PIN,
                          update=Access.AUTH, data=bytearray(_cardholder_data(profile.holder))))
    transit = bytes((TRANSIT_CAPP_TAG, CAPP_RECORD_BYTES - 2)) + bytes(CAPP_RECORD_BYTES - 2)
    df.add(ElementaryFile(fid=0x0017, kind=EfKind.LINEAR_FIXED, sfi=CAPP_SFI, update=Access.NEVER,
                          records=[transit], record_bytes=CAPP_RECORD_BYTES, records_max=CAPP_RECORDS_MAX,
                          tlv=True))
    df.add(ElementaryFile(fid=0x0018, kind=EfKind.CYCLIC, sfi=DETAIL_SFI, update=Access.NEVER,
                          record_bytes=DETAIL_RECORD_BYTES, records_max=DETAIL_RECORDS))
    return df


def _cardholder_data(holder: Holder) -> bytes:
    """PBOC 0016: card type flag (1) || staff flag (1) || name (20, GBK) || ID number (32) || ID type (1)."""
    name = holder.name.encode("gbk")[:20].ljust(20, b"\x00")
    id_number = holder.ssn.encode("ascii").ljust(32, b"\x00")
    data = b"\x00\x00" + name + id_number + b"\x00"  # ID type 00 = citizen ID card
    if len(data) != CARDHOLDER_BYTES:
        raise AssertionError("cardholder data layout drifted from 55 bytes")
    return data


def _hex_field(name: str, text: str, length: int) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise HolderDataError(f"{name}: not hexadecimal") from None
    if len(raw) != length:
        raise HolderDataError(f"{name}: must be {length} bytes ({2 * length} hex digits)")
    return raw


def _bcd_date(name: str, text: str) -> bytes:
    try:
        return bytes.fromhex(dt.date.fromisoformat(text).strftime("%Y%m%d"))
    except (TypeError, ValueError):
        raise HolderDataError(f"{name}: must be a date YYYY-MM-DD") from None


def _rider_category(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFF:
        raise HolderDataError("purse.rider_category: must be an integer code 0..255")
    return value


def _balance_max(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 0x7FFFFFFF:
        raise HolderDataError("purse.balance_max_fen: must be an integer number of fen, 1..2147483647")
    return value


# A complete example profile: the CLI's --sample, the demo and the tests start from it.
# The SSN is a made-up number with a valid check character.
SAMPLE_PROFILE: dict[str, Any] = {
    "ssse": {
        "card_id_code": "330300D15600000500A1B2C3D4E5F607",
        "card_type": "3",
        "spec_version": "3.00",
        "init_org": "330300000000000000000001",
        "issue_date": "2025-01-15",
        "expiry_date": "2035-01-15",
        "card_number": "A00000001",
    },
    "holder": {
        "ssn": "330302198503070011",
        "name": "张三",
        "gender": "1",
        "ethnicity": "01",
        "birthplace": "330302",
        "birth_date": "1985-03-07",
    },
    "purse": {
        "issuer_id": "3303000000000001",
        "app_serial": "33030000000000000001",
        "start_date": "2025-01-15",
        "expiry_date": "2035-01-15",
        "balance_max_fen": 100000,
    },
    "initial_pin": "123456",
}
