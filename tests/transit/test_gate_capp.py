"""The transit record in the CAPP file (apps/bus/capp.py) and the rider category the issuer writes in 0015."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from citycard.apps.bus.capp import (
    CAPP_RECORD_BYTES,
    CappError,
    JourneyState,
    TransitRecord,
    category_code,
    category_from_fci,
    category_id,
)
from citycard.card import HolderDataError, MasterKeys, MemoryStore, MemoryTransport, VirtualCard, personalize
from citycard.card.channel import CardChannel
from citycard.card.flows import SELECT_PURSE
from citycard.card.personalize import SAMPLE_PROFILE, profile_from_json
from citycard.core.clock import CITY_ZONE

KEYS = Path(__file__).resolve().parents[1] / "card" / "data" / "test-master-keys.json"
AT = dt.datetime(2026, 11, 25, 8, 1, 2, tzinfo=CITY_ZONE)
TERMINAL = bytes.fromhex("330300000001")


def entered(**changes: object) -> TransitRecord:
    base = TransitRecord(JourneyState.ENTERED, 1, AT, "M1", "M_SQUARE", 600, TERMINAL)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_record_layout_is_the_documented_one() -> None:
    raw = entered().encode()
    assert len(raw) == CAPP_RECORD_BYTES
    assert raw[:6] == bytes.fromhex("022E" "01" "01" "00" "01")  # tag, length, format, entered, lock, senior
    assert raw[6:13] == bytes.fromhex("20261125080102")
    assert raw[13:21] == b"M1".ljust(8, b"\x00")
    assert raw[21:31] == b"M_SQUARE\x00\x00"
    assert raw[31:35] == (600).to_bytes(4, "big")
    assert raw[35:41] == TERMINAL
    assert raw[41:] == bytes(7)
    assert TransitRecord.decode(raw) == entered()


def test_time_in_another_zone_is_written_as_city_time() -> None:
    utc = AT.astimezone(dt.UTC)
    assert TransitRecord.decode(entered(tapped_at=utc).encode()).tapped_at == AT


def test_a_fresh_card_has_no_journey() -> None:
    fresh = TransitRecord.decode(bytes((0x02, 0x2E)) + bytes(46))
    assert fresh.state is JourneyState.NONE and fresh.tapped_at is None and fresh.rider_category_id == "adult"


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: r[:1] + b"\x03" + r[2:], "record"),
    (lambda r: r[:47], "record"),
    (lambda r: r[:2] + b"\x07" + r[3:], "format"),
    (lambda r: r[:3] + b"\x09" + r[4:], "journey state"),
    (lambda r: r[:3] + b"\x00" + r[4:], "journey state"),
    (lambda r: r[:4] + b"\x01" + r[5:], "lock"),
    (lambda r: r[:6] + bytes.fromhex("2026133108") + r[11:], "tapped_at"),
    (lambda r: r[:6] + bytes.fromhex("2026112508A1") + r[12:], "tapped_at"),
    (lambda r: r[:13] + b"\x00M1" + r[16:], "route_id"),
    (lambda r: r[:21] + b"\x01" * 10 + r[31:], "stop_id"),
    (lambda r: r[:47] + b"\x01", "reserved"),
    (lambda r: r[:2] + b"\x00" + r[3:], "format 00"),
])
def test_decode_names_the_bad_field(mutate, field: str) -> None:
    with pytest.raises(CappError, match=field):
        TransitRecord.decode(mutate(entered().encode()))


@pytest.mark.parametrize(("changes", "field"), [
    ({"state": JourneyState.NONE}, "state"),
    ({"tapped_at": None}, "tapped_at"),
    ({"route_id": "R123456789"}, "route_id"),
    ({"stop_id": ""}, "stop_id"),
    ({"stop_id": "站"}, "stop_id"),
    ({"amount_fen": -1}, "amount_fen"),
    ({"amount_fen": 2**31}, "amount_fen"),
    ({"category": 256}, "category"),
    ({"terminal_id": b"\x00"}, "terminal_id"),
])
def test_encode_refuses_what_does_not_fit(changes: dict, field: str) -> None:
    with pytest.raises(CappError, match=field):
        entered(**changes).encode()


def test_category_codes() -> None:
    assert [category_id(code) for code in range(4)] == ["adult", "senior", "student", "disabled"]
    assert category_id(0x7F) == "adult"  # a code the gate does not know pays the adult fare
    assert category_code("student") == 2 and category_code("unknown") == 0


@pytest.mark.parametrize("code", [0, 2, 3])
def test_issuer_writes_the_category_in_0015_and_the_fci_carries_it(code: int) -> None:
    profile = dict(SAMPLE_PROFILE, purse=dict(SAMPLE_PROFILE["purse"], rider_category=code))
    card = VirtualCard(personalize(profile_from_json(profile), MasterKeys.load(KEYS)), MemoryStore())
    fci = CardChannel(MemoryTransport(card)).send(SELECT_PURSE).data
    assert category_from_fci(fci) == code


@pytest.mark.parametrize("bad", [-1, 256, "1", True])
def test_personalisation_refuses_a_bad_category(bad: object) -> None:
    profile = dict(SAMPLE_PROFILE, purse=dict(SAMPLE_PROFILE["purse"], rider_category=bad))
    with pytest.raises(HolderDataError, match="rider_category"):
        personalize(profile_from_json(profile), MasterKeys.load(KEYS))


def test_fci_without_public_data_is_refused() -> None:
    with pytest.raises(CappError, match="9F0C"):
        category_from_fci(bytes.fromhex("6F0884009F08010190"))
