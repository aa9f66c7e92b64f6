"""The gate through the real stack: pyscard -> pcscd -> vsmartcard-vpcd -> a virtual card, in a private pcscd.

Chip side of a metro journey (entry writes the entry record, exit debits and writes the exit record), an
offline gate refusing a denylisted card, and a card pulled during DEBIT settled when it comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from citycard.apps.bus.capp import JourneyState, TransitRecord
from citycard.apps.bus.gate import FixedFare, Gate, GateStore, StoredRecord
from citycard.card import (
    CardChannel,
    IssuerHost,
    MasterKeys,
    PcscDaemon,
    PcscdError,
    PcscTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    VpcdLink,
    personalize,
    profile_from_json,
    verify_tac,
)
from citycard.card import commands as cmd
from citycard.card.flows import SELECT_PURSE
from citycard.card.pcscd import wait_for_card, wait_until_empty
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import CAPP_SFI, EP
from citycard.card.state import FileStore

from citycard.v1 import transit_pb2

pytestmark = pytest.mark.pcsc

KEYS = Path(__file__).resolve().parents[1] / "card" / "data" / "test-master-keys.json"
FARES = FixedFare({"adult": 400, "student": 200})
SERIAL = "33030000000000000001"


@pytest.fixture(scope="module")
def master_keys() -> MasterKeys:
    return MasterKeys.load(KEYS)


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscDaemon]:
    daemon = PcscDaemon(tmp_path_factory.mktemp("pcscd"), entries=1, name="citycard gate test")
    try:
        daemon.start()
    except PcscdError as exc:
        pytest.fail(f"cannot start pcscd for the gate tests: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()


class Slot:
    """A reader of the private pcscd and the card in it (inserted from a state file, removed at the end)."""

    def __init__(self, daemon: PcscDaemon, index: int) -> None:
        self.reader = daemon.readers[index]
        self.link: VpcdLink | None = None

    def insert(self, state: Path, pull_after: Callable[[bytes], bool] | None = None) -> VirtualCard:
        card = VirtualCard.open(state)
        self.link = VpcdLink(card, self.reader.port, pull_after=pull_after)
        self.link.insert()
        wait_for_card(self.reader.name)
        return card

    def remove(self) -> None:
        if self.link is not None and self.link.inserted:
            self.link.remove()
            wait_until_empty(self.reader.name)
        self.link = None


@pytest.fixture
def slot(pcscd: PcscDaemon) -> Iterator[Slot]:
    slot = Slot(pcscd, 0)
    yield slot
    slot.remove()


def new_card(path: Path, keys: MasterKeys, slot: Slot, *, balance_fen: int, category: int = 0,
             card_number: str = "A00000001", app_serial: str = SERIAL) -> VirtualCard:
    """Personalise a card, insert it, load it at a counter (PIN and issuer MAC2, through PC/SC)."""
    purse = dict(SAMPLE_PROFILE["purse"], rider_category=category, app_serial=app_serial)
    ssse = dict(SAMPLE_PROFILE["ssse"], card_number=card_number)
    FileStore(path).create(personalize(profile_from_json(dict(SAMPLE_PROFILE, purse=purse, ssse=ssse)), keys))
    card = slot.insert(path)
    counter = Terminal(CardChannel(PcscTransport(slot.reader.name)), SoftSam(keys, bytes(6)), host=IssuerHost(keys))
    try:
        counter.verify_pin(SAMPLE_PROFILE["initial_pin"])
        counter.select_purse()
        counter.load(balance_fen)
    finally:
        counter.channel.close()
    return card


def chip_transit_record(reader: str) -> TransitRecord:
    """The transit record as any terminal reads it (READ RECORD 02 of SFI 17)."""
    channel = CardChannel(PcscTransport(reader))
    try:
        channel.send(SELECT_PURSE)
        return TransitRecord.decode(channel.send(cmd.read_record_by_tag(CAPP_SFI, 0x02, ne=48)).data)
    finally:
        channel.close()


def tac_ok(keys: MasterKeys, stored: StoredRecord) -> bool:
    record = stored.record()
    return verify_tac(keys, record.tac_fields(), record.tac)


def gate(tmp: Path, slot: Slot, keys: MasterKeys, mode: str, gate_id: str, stop: str, **options) -> Gate:
    return Gate.open(reader=slot.reader.name, gate_id=gate_id, route_id="M1", stop_id=stop, mode=mode,
                     store_dir=tmp / gate_id, master_keys=keys, fares=FARES, **options)


def test_entry_then_exit_writes_the_transit_records_and_debits_the_chip(
        tmp_path: Path, slot: Slot, master_keys: MasterKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    card = new_card(tmp_path / "card.json", master_keys, slot, balance_fen=3_000, category=2)
    names: list[str] = []
    entry = gate(tmp_path, slot, master_keys, "entry", "G-IN", "M_RAIL", observers=(lambda e: names.append(e.name),))
    exit_ = gate(tmp_path, slot, master_keys, "exit", "G-OUT", "M_SCIENCE")

    monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T08:00:00+08:00")
    on = entry.tap()
    assert on.accepted and (on.held_fen, on.fare_fen, on.rider_category_id) == (200, 0, "student"), on
    assert names == ["SELECT SSSE", "READ RECORD 7 SFI 05", "SELECT ED/EP", "READ RECORD tag 02 SFI 17",
                     "INITIALIZE FOR CAPP PURCHASE", "SELECT ED/EP", "INITIALIZE FOR CAPP PURCHASE",
                     "UPDATE CAPP DATA CACHE", "DEBIT FOR PURCHASE"]
    record = chip_transit_record(slot.reader.name)
    assert (record.state, record.route_id, record.stop_id, record.amount_fen, record.rider_category_id) == \
        (JourneyState.ENTERED, "M1", "M_RAIL", 200, "student")
    assert record.terminal_id == entry.config.terminal_id

    monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T08:35:00+08:00")
    off = exit_.tap()
    assert off.accepted and off.fare_fen == 200 and off.chip_balance_fen == 2_800, off
    record = chip_transit_record(slot.reader.name)
    assert (record.state, record.stop_id, record.amount_fen) == (JourneyState.EXITED, "M_SCIENCE", 200)
    assert record.tapped_at is not None and record.tapped_at.isoformat() == "2026-11-25T08:35:00+08:00"
    assert card.image.purse.balances[EP] == 2_800 and card.image.purse.offline_counters[EP] == 2
    assert VirtualCard.open(tmp_path / "card.json").image.purse.balances[EP] == 2_800  # on disk
    [on_record], [off_record] = entry.store.records(), exit_.store.records()
    assert (on_record.amount_fen, off_record.amount_fen) == (0, 200)
    assert tac_ok(master_keys, on_record) and tac_ok(master_keys, off_record)
    assert off.line() == "OK exit A00000001 [student] (offline): fare 2.00, balance 28.00"


def test_offline_gate_refuses_a_denylisted_card(tmp_path: Path, slot: Slot, master_keys: MasterKeys) -> None:
    card = new_card(tmp_path / "card.json", master_keys, slot, balance_fen=1_000)
    bus = gate(tmp_path, slot, master_keys, "board", "BUS-9", "B_RAIL")
    bus.store.apply_denylist(transit_pb2.StreamGateDenylistResponse(since_version=0, version=7, added=[
        transit_pb2.GateDenylistEntry(card_number="A00000001", app_serial=SERIAL)]))
    refused = bus.tap()
    assert (refused.accepted, refused.reason, refused.chip_balance_fen) == (False, "DENYLISTED", 1_000)
    assert card.image.purse.offline_counters[EP] == 0 and card.image.purse.balances[EP] == 1_000
    assert chip_transit_record(slot.reader.name).state is JourneyState.NONE
    assert len(bus.store) == 0


def test_card_pulled_during_debit_is_settled_when_it_comes_back(
        tmp_path: Path, slot: Slot, master_keys: MasterKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYCARD_NOW", "2026-11-25T08:00:00+08:00")
    state = tmp_path / "card.json"
    new_card(state, master_keys, slot, balance_fen=1_000)
    slot.remove()
    pulled = threading.Event()

    def pull_at_debit(apdu: bytes) -> bool:
        if apdu[:2] == b"\x80\x54" and not pulled.is_set():
            pulled.set()
            return True
        return False

    slot.insert(state, pull_after=pull_at_debit)
    bus = gate(tmp_path, slot, master_keys, "board", "BUS-3", "B_RAIL")
    torn = bus.tap()
    assert (torn.accepted, torn.reason) == (False, "TORN") and pulled.is_set()
    wait_until_empty(slot.reader.name)
    slot.remove()
    assert VirtualCard.open(state).image.purse.balances[EP] == 600  # the chip did debit before it left
    assert len(bus.store) == 0

    again = slot.insert(state)  # the same card (its state file) back in the reader
    settled = bus.tap()
    assert settled.accepted and settled.recovered and settled.fare_fen == 400, settled
    assert again.image.purse.balances[EP] == 600 and again.image.purse.offline_counters[EP] == 1
    [record] = bus.store.records()
    assert tac_ok(master_keys, record) and record.amount_fen == 400
    assert bus.tap().terminal_seq == 2  # and the next passenger's tap goes on as usual


def citycard(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citycard", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[2], check=False)


def test_cli_gate_taps_offline_with_a_trace(tmp_path: Path, slot: Slot, master_keys: MasterKeys) -> None:
    card = new_card(tmp_path / "card.json", master_keys, slot, balance_fen=1_000)
    store = tmp_path / "bus-1"
    run = citycard("transit", "gate", "--reader", slot.reader.name, "--gate-id", "BUS-1", "--route", "1",
                   "--stop", "B_RAIL", "--mode", "board", "--offline", "--store", str(store), "--keys", str(KEYS),
                   "--fare-fen", "250", "--json", "--trace", env={"CITYCARD_NOW": "2026-11-25T07:30:00+08:00"})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["accepted"], result["fare_fen"], result["chip_balance_fen"], result["online"]) == \
        (True, 250, 750, False)
    assert ">> DEBIT FOR PURCHASE" in run.stderr and ">> UPDATE CAPP DATA CACHE" in run.stderr
    assert card.image.purse.balances[EP] == 750
    assert [r.amount_fen for r in GateStore.existing(store).records()] == [250]

    again = citycard("transit", "gate", "--reader", slot.reader.name, "--gate-id", "BUS-1", "--route", "1",
                     "--stop", "B_RAIL", "--mode", "board", "--offline", "--store", str(store), "--keys", str(KEYS),
                     "--fare-fen", "900")
    assert again.returncode == 1 and again.stdout.startswith("REFUSED board A00000001 (offline): "
                                                             "INSUFFICIENT_BALANCE"), again.stdout


@pytest.mark.parametrize(("extra", "message"), [
    (("--offline", "--server", "127.0.0.1:1"), "--offline: a gate with no server"),
    (("--offline", "--terminal-id", "12"), "--terminal-id"),
    (("--offline", "--fare-fen", "-5"), "--fare-fen"),
    (("--data", "/nonexistent"), "ready.json not found"),
])
def test_cli_gate_refuses_bad_options(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    run = citycard("transit", "gate", "--reader", "no such reader", "--gate-id", "G", "--route", "1",
                   "--stop", "B_RAIL", "--mode", "board", "--store", str(tmp_path / "g"), "--keys", str(KEYS), *extra)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_cli_upload_needs_a_store_and_a_server(tmp_path: Path) -> None:
    run = citycard("transit", "upload", "--store", str(tmp_path / "none"))
    assert run.returncode == 2 and "no gate store here" in run.stderr
