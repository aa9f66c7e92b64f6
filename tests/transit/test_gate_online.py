"""The gate online: a real core server and the transit application in their own processes, the gate here on a
virtual card in a private pcscd, talking to the Transit service over loopback (apps/bus/GATES.md)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "grpc")]

from citycard.apps.bus.capp import JourneyState
from citycard.apps.bus.gate import FixedFare, Gate, GateUnavailable, TransitLink, upload_records
from citycard.apps.bus.ids import app_serial_of_card
from citycard.card import MasterKeys, VirtualCard
from citycard.card.purse import EP
from citycard.core import clock
from grpc_helpers import auth, citizen_id
from transit_helpers import Transit, add_rider, eventually, start_transit

from citycard.v1 import cards_pb2, ledger_pb2

from . import test_gate_pcsc as on_pcsc
from .test_gate_pcsc import KEYS, Slot, chip_transit_record, citycard, new_card

# The PC/SC fixtures of the offline gate tests: a private pcscd for this module, a reader slot, the test keys.
pcscd, slot, master_keys = on_pcsc.pcscd, on_pcsc.slot, on_pcsc.master_keys

pytestmark = pytest.mark.pcsc
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def transit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Transit]:
    served = start_transit(tmp_path_factory.mktemp("transit"))
    yield served
    assert served.server.stop() == 0, served.server.log_text()


def ledger_balance(transit: Transit, account_id: str) -> int:
    answer = transit.server.ledger().GetAccountBalance(
        ledger_pb2.GetAccountBalanceRequest(account_id=account_id), metadata=auth(transit.server.operator_token),
        timeout=TIMEOUT_S)
    return answer.balance.available_fen


def rider_chip(transit: Transit, tmp: Path, keys: MasterKeys, slot: Slot, sequence: int, fen: int,
               categories: tuple[str, ...] = ()) -> tuple[cards_pb2.Card, VirtualCard]:
    """A registered card whose purse is loaded with `fen` on the ledger and on its chip (in the reader)."""
    card = add_rider(transit.server, sequence, load_fen=fen, categories=categories)
    chip = new_card(tmp / f"chip-{sequence}.json", keys, slot, balance_fen=fen, card_number=card.card_number,
                    app_serial=app_serial_of_card(card.card_id_code))
    return card, chip


def online_gate(transit: Transit, tmp: Path, slot: Slot, keys: MasterKeys, mode: str, gate_id: str,
                route: str, stop: str, **options) -> Gate:
    return Gate.open(reader=slot.reader.name, gate_id=gate_id, route_id=route, stop_id=stop, mode=mode,
                     store_dir=tmp / gate_id, master_keys=keys,
                     link=TransitLink(transit.address, transit.gate_token), **options)


def test_metro_journey_online_then_its_records_uploaded(transit: Transit, tmp_path: Path, slot: Slot,
                                                        master_keys: MasterKeys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    card, chip = rider_chip(transit, tmp_path, master_keys, slot, 401, 3_000)
    entry = online_gate(transit, tmp_path, slot, master_keys, "entry", "M-IN-1", "M1", "M_RAIL")
    exit_ = online_gate(transit, tmp_path, slot, master_keys, "exit", "M-OUT-1", "M1", "M_UNIV")
    started = clock.now().replace(microsecond=0)
    try:
        monkeypatch.setenv("CITYCARD_NOW", started.isoformat())
        on = entry.tap()
        assert on.accepted and on.online and (on.fare_fen, on.held_fen) == (0, 500), on
        assert on.chip_balance_fen == 3_000 and on.ledger_balance_fen == 2_500  # the hold is on the ledger
        record = chip_transit_record(slot.reader.name)
        assert (record.state, record.stop_id, record.amount_fen) == (JourneyState.ENTERED, "M_RAIL", 500)

        monkeypatch.setenv("CITYCARD_NOW", (started + dt.timedelta(minutes=25)).isoformat())
        off = exit_.tap()
        assert off.accepted and off.online and 0 < off.fare_fen <= 500, off
        assert chip.image.purse.balances[EP] == 3_000 - off.fare_fen == off.chip_balance_fen
        assert eventually(lambda: ledger_balance(transit, card.purse_account_id), 3_000 - off.fare_fen) \
            == 3_000 - off.fare_fen == off.ledger_balance_fen
        record = chip_transit_record(slot.reader.name)
        assert (record.state, record.stop_id, record.amount_fen) == (JourneyState.EXITED, "M_UNIV", off.fare_fen)
        assert [r.online for r in entry.store.records() + exit_.store.records()] == [True, True]

        # An upload that cannot reach the server keeps its batch; the next one sends that very batch.
        with pytest.raises(GateUnavailable):
            upload_records(exit_.store, TransitLink("127.0.0.1:1", transit.gate_token))
        batch = exit_.store.state["open_batch"]
        [answer] = exit_.upload()
        assert answer.batch_id == batch["batch_id"]
        assert (answer.booked, answer.already_cleared, answer.rejected) == (0, 1, 0)  # booked at the tap
        [entry_answer] = entry.upload()
        assert (entry_answer.booked, entry_answer.rejected, entry_answer.booked_fen) == (0, 0, 0)
        assert exit_.upload() == [] and entry.upload() == []  # nothing left to send
        assert eventually(lambda: ledger_balance(transit, card.purse_account_id), 3_000 - off.fare_fen) \
            == 3_000 - off.fare_fen
    finally:
        entry.close()
        exit_.close()


def test_a_refused_tap_writes_nothing_on_the_chip(transit: Transit, tmp_path: Path, slot: Slot,
                                                 master_keys: MasterKeys) -> None:
    card, chip = rider_chip(transit, tmp_path, master_keys, slot, 402, 100)
    bus = online_gate(transit, tmp_path, slot, master_keys, "board", "BUS-ON-2", "1", "B_RAIL")
    before = chip.image.to_json()
    try:
        refused = bus.tap()
    finally:
        bus.close()
    assert (refused.accepted, refused.online, refused.reason) == (False, True, "INSUFFICIENT_BALANCE"), refused
    assert chip.image.to_json() == before and len(bus.store) == 0
    assert ledger_balance(transit, card.purse_account_id) == 100


def test_a_lost_card_reaches_the_gates_denylist_and_is_refused_offline_too(
        transit: Transit, tmp_path: Path, slot: Slot, master_keys: MasterKeys) -> None:
    card, chip = rider_chip(transit, tmp_path, master_keys, slot, 403, 1_000)
    bus = online_gate(transit, tmp_path, slot, master_keys, "board", "BUS-ON-3", "1", "B_RAIL")
    try:
        version = bus.sync_denylist()
        assert bus.tap().accepted
        transit.server.cards().ReportLoss(cards_pb2.ReportLossRequest(
            actor="op1", card_number=card.card_number, written=cards_pb2.WrittenReport(
                holder_id_number=citizen_id(sequence=403), holder_name="乘客")),
            metadata=auth(transit.server.operator_token), timeout=TIMEOUT_S)
        refused_online = bus.tap()
        assert (refused_online.accepted, refused_online.reason) == (False, "DENYLISTED"), refused_online
        assert bus.sync_denylist() > version
        assert bus.store.denylisted[card.card_number] == app_serial_of_card(card.card_id_code)
    finally:
        bus.close()
    # The same gate, its server gone: it refuses the card from what it kept.
    offline = Gate.open(reader=slot.reader.name, gate_id="BUS-ON-3", route_id="1", stop_id="B_RAIL", mode="board",
                        store_dir=tmp_path / "BUS-ON-3", master_keys=master_keys, fares=FixedFare({"adult": 200}))
    counter = chip.image.purse.offline_counters[EP]
    refused_offline = offline.tap()
    assert (refused_offline.accepted, refused_offline.online, refused_offline.reason) == (False, False, "DENYLISTED")
    assert chip.image.purse.offline_counters[EP] == counter


def test_cli_gate_online_and_upload(transit: Transit, tmp_path: Path, slot: Slot, master_keys: MasterKeys) -> None:
    card, chip = rider_chip(transit, tmp_path, master_keys, slot, 404, 1_000)
    data = str(transit.server.data_dir)
    store = tmp_path / "cli-bus"
    run = citycard("transit", "gate", "--data", data, "--reader", slot.reader.name, "--gate-id", "BUS-CLI",
                   "--route", "1", "--stop", "B_RAIL", "--mode", "board", "--store", str(store), "--keys", str(KEYS),
                   "--json")
    assert run.returncode == 0, run.stderr + run.stdout
    result = json.loads(run.stdout)
    assert result["accepted"] and result["online"] and result["fare_fen"] == 200
    assert chip.image.purse.balances[EP] == 800
    uploaded = citycard("transit", "upload", "--data", data, "--store", str(store))
    assert uploaded.returncode == 0, uploaded.stderr
    assert "booked 0 (0.00), already cleared 1, entry only 0, rejected 0" in uploaded.stdout
    assert ledger_balance(transit, card.purse_account_id) == 800
