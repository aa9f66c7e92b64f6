"""The gate's logic on in-memory cards (no PC/SC): offline decisions, the store, torn taps, the fare engine.

The real PC/SC path is tests/transit/test_gate_pcsc.py; here a card is a VirtualCard object behind
MemoryTransport, and a torn DEBIT is injected by a transport that drops the card around it."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from citycard.apps.bus.capp import JourneyState, TransitRecord
from citycard.apps.bus.gate import (
    EngineFares,
    FixedFare,
    Gate,
    GateConfig,
    GateError,
    GateStore,
    Mode,
    StoredRecord,
)
from citycard.card import (
    CardRemoved,
    IssuerHost,
    MasterKeys,
    MemoryStore,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
    profile_from_json,
    verify_tac,
)
from citycard.card import commands as cmd
from citycard.card.channel import CardChannel
from citycard.card.commands import PurchaseInit
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import CAPP_SFI, EP

from citycard.v1 import transit_pb2

KEYS = Path(__file__).resolve().parents[1] / "card" / "data" / "test-master-keys.json"
FEED = Path(__file__).resolve().parents[2] / "apps" / "bus" / "feed"
MORNING = "2026-11-25T08:00:00+08:00"
FARES = FixedFare({"adult": 300, "senior": 150})


@pytest.fixture(scope="module")
def keys() -> MasterKeys:
    return MasterKeys.load(KEYS)


def new_card(keys: MasterKeys, *, balance_fen: int = 2_000, category: int = 0, serial: int = 1) -> VirtualCard:
    purse = dict(SAMPLE_PROFILE["purse"], rider_category=category, app_serial=f"{33030000000000000000 + serial:020d}")
    card = VirtualCard(personalize(profile_from_json(dict(SAMPLE_PROFILE, purse=purse)), keys), MemoryStore(),
                       random=random.Random(serial).randbytes)
    if balance_fen:
        counter = Terminal(CardChannel(MemoryTransport(card)), SoftSam(keys, bytes(6)), host=IssuerHost(keys))
        counter.verify_pin(SAMPLE_PROFILE["initial_pin"])
        counter.select_purse()
        counter.load(balance_fen)
    return card


class TearingTransport(MemoryTransport):
    """Failure injection: the card leaves at the first DEBIT, before (`debit=False`) or after processing it."""

    def __init__(self, card: VirtualCard, *, debit: bool) -> None:
        super().__init__(card)
        self.debit = debit
        self.torn = False

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[:2] == b"\x80\x54" and not self.torn:
            self.torn = True
            if self.debit:
                super().transmit(apdu)
            raise CardRemoved("card removed")
        return super().transmit(apdu)


def make_gate(tmp: Path, keys: MasterKeys, mode: str, gate_id: str, stop: str,
              connect: Callable[[], MemoryTransport], fares=FARES, route: str = "M1") -> Gate:
    store = GateStore(tmp / gate_id, gate_id)
    return Gate(GateConfig(gate_id, route, stop, Mode(mode), store.terminal_id),
                make_sam=lambda seq: SoftSam(keys, store.terminal_id, next_terminal_seq=seq), store=store,
                connect=connect, fares=fares)


def transit_record(card: VirtualCard) -> TransitRecord:
    purse_df = next(df for df in card.image.mf.dfs if df.application == "purse")
    return TransitRecord.decode(bytes(purse_df.ef_by_sfi(CAPP_SFI).records[0]))


def tac_ok(keys: MasterKeys, stored: StoredRecord) -> bool:
    record = stored.record()
    return verify_tac(keys, record.tac_fields(), record.tac)


def test_offline_entry_then_exit(tmp_path: Path, keys: MasterKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    card = new_card(keys, category=1)
    entry = make_gate(tmp_path, keys, "entry", "G-IN", "M_RAIL", lambda: MemoryTransport(card))
    exit_ = make_gate(tmp_path, keys, "exit", "G-OUT", "M_SCIENCE", lambda: MemoryTransport(card))
    monkeypatch.setenv("CITYCARD_NOW", MORNING)
    tapped_on = entry.tap()
    assert tapped_on.accepted and tapped_on.held_fen == 150 and tapped_on.fare_fen == 0, tapped_on
    assert tapped_on.rider_category_id == "senior" and not tapped_on.online
    on_chip = transit_record(card)
    assert (on_chip.state, on_chip.stop_id, on_chip.amount_fen, on_chip.category) == \
        (JourneyState.ENTERED, "M_RAIL", 150, 1)
    assert on_chip.terminal_id == entry.config.terminal_id
    assert card.image.purse.balances[EP] == 2_000

    monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T08:30:00+08:00")
    tapped_off = exit_.tap()
    assert tapped_off.accepted and tapped_off.fare_fen == 150 and tapped_off.chip_balance_fen == 1_850
    assert card.image.purse.balances[EP] == 1_850
    on_chip = transit_record(card)
    assert (on_chip.state, on_chip.stop_id, on_chip.amount_fen) == (JourneyState.EXITED, "M_SCIENCE", 150)
    assert on_chip.tapped_at == dt.datetime.fromisoformat("2026-11-25T08:30:00+08:00")

    [entry_record], [exit_record] = entry.store.records(), exit_.store.records()
    assert entry_record.amount_fen == 0 and exit_record.amount_fen == 150
    assert not entry_record.online and not exit_record.online
    assert tac_ok(keys, entry_record) and tac_ok(keys, exit_record)
    assert exit_record.packed[10:12] == (1).to_bytes(2, "big")  # the counter the chip used for the exit


def test_refusals_write_nothing_on_the_chip(tmp_path: Path, keys: MasterKeys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYCARD_NOW", MORNING)
    poor = new_card(keys, balance_fen=100, serial=2)
    gate = make_gate(tmp_path, keys, "board", "BUS-7", "B_RAIL", lambda: MemoryTransport(poor), route="1")
    before = poor.image.to_json()
    refused = gate.tap()
    assert not refused.accepted and refused.reason == "INSUFFICIENT_BALANCE"
    assert poor.image.to_json() == before and len(gate.store) == 0

    rich = new_card(keys, serial=3)
    entry = make_gate(tmp_path, keys, "entry", "G-IN", "M_RAIL", lambda: MemoryTransport(rich))
    assert entry.tap().accepted
    before = rich.image.to_json()
    again = entry.tap()
    assert not again.accepted and again.reason == "ALREADY_ENTERED"
    assert rich.image.to_json() == before and len(entry.store) == 1
    assert "REFUSED entry A00000001 (offline): ALREADY_ENTERED" in again.line()


def test_offline_denylist_refuses_by_serial_or_card_number(tmp_path: Path, keys: MasterKeys) -> None:
    card = new_card(keys, serial=4)
    gate = make_gate(tmp_path, keys, "board", "BUS-1", "B_RAIL", lambda: MemoryTransport(card), route="1")
    gate.store.apply_denylist(transit_pb2.StreamGateDenylistResponse(since_version=0, version=3, added=[
        transit_pb2.GateDenylistEntry(card_number="X00000009", app_serial="33030000000000000004")]))
    before = card.image.to_json()
    refused = gate.tap()
    assert (refused.accepted, refused.reason) == (False, "DENYLISTED") and "version 3" in refused.message
    assert card.image.to_json() == before

    # the delta that lifts it, then one that lists the card by its number only
    gate.store.apply_denylist(transit_pb2.StreamGateDenylistResponse(since_version=3, version=4,
                                                                     removed=["X00000009"]))
    assert gate.tap().accepted
    gate.store.apply_denylist(transit_pb2.StreamGateDenylistResponse(since_version=4, version=5, added=[
        transit_pb2.GateDenylistEntry(card_number="A00000001", app_serial="")]))
    assert gate.tap().reason == "DENYLISTED"
    reopened = GateStore(tmp_path / "BUS-1", "BUS-1")  # what a restarted gate knows
    assert reopened.denylist_version == 5 and reopened.refuses("A00000001", b"\x00" * 10)
    assert not reopened.refuses("A00000002", bytes.fromhex("33030000000000000004"))


@pytest.mark.parametrize("debited", [True, False])
def test_torn_tap_settles_when_the_card_returns(tmp_path: Path, keys: MasterKeys, debited: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYCARD_NOW", MORNING)
    card = new_card(keys, serial=5)
    tearing = TearingTransport(card, debit=debited)
    transports = iter([tearing, MemoryTransport(card)])
    gate = make_gate(tmp_path, keys, "board", "BUS-2", "B_RAIL", lambda: next(transports), route="1")
    torn = gate.tap()
    assert (torn.accepted, torn.reason) == (False, "TORN")
    assert card.image.purse.balances[EP] == (1_700 if debited else 2_000)
    assert len(gate.store) == 0 and gate.store.torn(bytes.fromhex("33030000000000000005")) is not None

    monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T08:00:09+08:00")  # presented again, seconds later
    settled = gate.tap()
    assert settled.accepted and settled.recovered and settled.fare_fen == 300, settled
    assert card.image.purse.balances[EP] == 1_700  # debited once, whichever way the tear went
    assert card.image.purse.offline_counters[EP] == 1
    [record] = gate.store.records()
    assert tac_ok(keys, record) and settled.terminal_seq == 1  # the same chip transaction as first meant
    assert record.packed[27:34] == bytes.fromhex("20261125080000")
    assert gate.store.torn(bytes.fromhex("33030000000000000005")) is None
    assert gate.store.next_terminal_seq == 2


def test_tap_request_names_the_chip_transaction_that_follows(tmp_path: Path, keys: MasterKeys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYCARD_NOW", MORNING)
    card = new_card(keys, serial=6)
    gate = make_gate(tmp_path, keys, "board", "BUS-3", "B_RAIL", lambda: MemoryTransport(card), route="1")
    assert gate.tap().accepted
    probe = Terminal(CardChannel(MemoryTransport(card)), SoftSam(keys, bytes(6)))
    probe.select_purse()
    init = PurchaseInit.parse(probe.channel.send(cmd.initialize_for_capp_purchase(1, 0, bytes(6))).data)
    request = gate.tap_request("A00000001", init)
    result = gate.tap()
    assert (request.terminal_seq, request.card_counter, request.chip_balance_fen) == \
        (result.terminal_seq, result.card_counter, 1_700)
    [_, record] = gate.store.records()
    assert bytes.fromhex(request.terminal_id) == gate.config.terminal_id == record.packed[17:23]
    assert request.mode == transit_pb2.TAP_MODE_BOARD and request.route_id == "1" and request.stop_id == "B_RAIL"
    assert request.at.ToDatetime(tzinfo=dt.UTC) == dt.datetime.fromisoformat(MORNING)
    assert request.tap_id == "BUS-3:2"


def test_a_restarted_gate_goes_on_with_the_next_terminal_number(tmp_path: Path, keys: MasterKeys) -> None:
    card = new_card(keys, serial=7)
    first = make_gate(tmp_path, keys, "board", "BUS-4", "B_RAIL", lambda: MemoryTransport(card), route="1")
    assert [first.tap().terminal_seq for _ in range(2)] == [1, 2]
    again = make_gate(tmp_path, keys, "board", "BUS-4", "B_RAIL", lambda: MemoryTransport(card), route="1")
    assert again.tap().terminal_seq == 3 and len(again.store) == 3


def test_store_checks(tmp_path: Path, keys: MasterKeys) -> None:
    card = new_card(keys, serial=8)
    gate = make_gate(tmp_path, keys, "board", "BUS-5", "B_RAIL", lambda: MemoryTransport(card), route="1")
    assert gate.tap().accepted
    with open(tmp_path / "BUS-5" / "records.bin", "ab") as torn_append:
        torn_append.write(b"\x00" * 20)  # the gate stopped inside an append
    reopened = GateStore(tmp_path / "BUS-5", "BUS-5")
    assert len(reopened) == 1 and (tmp_path / "BUS-5" / "records.bin").stat().st_size == 49
    with pytest.raises(GateError, match="belongs to gate 'BUS-5'"):
        GateStore(tmp_path / "BUS-5", "BUS-6")
    with pytest.raises(GateError, match="terminal id"):
        GateStore(tmp_path / "BUS-5", "BUS-5", terminal_id=bytes(6))
    (tmp_path / "BUS-5" / "denylist.json").write_text("{\"version\": 1}")
    with pytest.raises(GateError, match="denylist.json"):
        GateStore(tmp_path / "BUS-5", "BUS-5")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("route_id", "ROUTE-123456", "route_id"), ("stop_id", "", "stop_id"), ("gate_id", "闸机", "gate_id")])
def test_gate_config_refuses_ids_that_do_not_fit(field: str, value: str, message: str) -> None:
    config = {"gate_id": "G1", "route_id": "M1", "stop_id": "M_RAIL", "mode": Mode.ENTRY,
              "terminal_id": bytes(6)} | {field: value}
    with pytest.raises(GateError, match=message):
        GateConfig(**config)


def test_fare_engine_decides_offline_from_the_chip(tmp_path: Path, keys: MasterKeys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = EngineFares.from_feed(FEED)
    student = new_card(keys, category=2, serial=9)
    adult = new_card(keys, serial=10)
    current: list[VirtualCard] = [student]
    entry = make_gate(tmp_path, keys, "entry", "M-IN", "M_RAIL", lambda: MemoryTransport(current[0]), engine)
    exit_ = make_gate(tmp_path, keys, "exit", "M-OUT", "M_SCIENCE", lambda: MemoryTransport(current[0]), engine)
    monkeypatch.setenv("CITYCARD_NOW", MORNING)
    fares = {}
    for card in (student, adult):
        current[0] = card
        on = entry.tap()
        assert on.accepted and on.held_fen > 0, on
        monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T08:40:00+08:00")
        off = exit_.tap()
        assert off.accepted, off
        fares[off.rider_category_id] = off.fare_fen
        assert card.image.purse.balances[EP] == 2_000 - off.fare_fen
        monkeypatch.setenv("CITYCARD_NOW", MORNING)
    assert fares["student"] == fares["adult"] // 2  # the feed's 50 % student concession

    current[0] = new_card(keys, serial=11)  # an exit with no entry on the chip: the network's maximum fare
    monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T09:00:00+08:00")
    no_entry = exit_.tap()
    assert no_entry.accepted and no_entry.fare_fen >= fares["adult"]
