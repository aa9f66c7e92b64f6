"""The Transit service as gates and operators meet it: a real core server and the transit plugin in their own
processes, gates' streams and uploads from here over loopback, money checked on the ledger."""

from __future__ import annotations

import datetime as dt
import queue
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "grpc")]

from citycard.apps.bus import records as rec
from citycard.card import MasterKeys
from citycard.core import clock
from grpc_helpers import auth
from transit_helpers import TEST_KEYS_PATH, Transit, add_rider, chip_terminal, eventually, start_transit, tap

from citycard.v1 import cards_pb2, ledger_pb2, transit_pb2, transit_pb2_grpc

BOARD, ENTRY, EXIT = transit_pb2.TAP_MODE_BOARD, transit_pb2.TAP_MODE_ENTRY, transit_pb2.TAP_MODE_EXIT
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def transit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Transit]:
    served = start_transit(tmp_path_factory.mktemp("transit"))
    yield served
    assert served.server.stop() == 0, served.server.log_text()


class Gate:
    """One gate's kept-open Taps stream."""

    def __init__(self, transit: Transit) -> None:
        self._requests: queue.Queue[transit_pb2.TapRequest | None] = queue.Queue()
        self._channel = transit.channel()
        self._answers = transit_pb2_grpc.TransitStub(self._channel).Taps(iter(self._requests.get, None),
                                                                         metadata=transit.gate)

    def tap(self, request: transit_pb2.TapRequest) -> transit_pb2.TapDecision:
        self._requests.put(request)
        return next(self._answers)

    def close(self) -> None:
        self._requests.put(None)
        self._channel.close()


@pytest.fixture
def gate(transit: Transit) -> Iterator[Gate]:
    opened = Gate(transit)
    yield opened
    opened.close()


def available(transit: Transit, account_id: str) -> int:
    answer = transit.server.ledger().GetAccountBalance(
        ledger_pb2.GetAccountBalanceRequest(account_id=account_id), metadata=auth(transit.server.operator_token),
        timeout=TIMEOUT_S)
    return answer.balance.available_fen


def credits(transit: Transit, account_id: str) -> int:
    answer = transit.server.ledger().GetAccountBalance(
        ledger_pb2.GetAccountBalanceRequest(account_id=account_id), metadata=auth(transit.server.operator_token),
        timeout=TIMEOUT_S)
    return answer.balance.credits_posted_fen


def operator_account(transit: Transit, agency: str) -> str:
    network = transit.stub().GetFareNetwork(transit_pb2.GetFareNetworkRequest(), metadata=transit.gate,
                                            timeout=TIMEOUT_S)
    return next(o.settlement_account_id for o in network.operators if o.agency_id == agency)


def now() -> dt.datetime:
    return clock.now()


def test_a_bus_fare_is_booked_into_the_operators_account(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 101, load_fen=5_000)
    citybus = operator_account(transit, "citybus")
    before = credits(transit, citybus)
    decision = gate.tap(tap(card.card_number, tap_id="t1", route="1", stop="B_RAIL", mode=BOARD, at=now()))
    assert decision.accepted, decision.message
    assert (decision.fare_fen, decision.held_fen, decision.balance_fen) == (200, 0, 4_800)
    assert decision.rider_category_id == "adult"
    assert eventually(lambda: available(transit, card.purse_account_id), 4_800) == 4_800
    assert eventually(lambda: credits(transit, citybus) - before, 200) == 200
    assert decision.decision_micros > 0


def test_a_resent_tap_is_answered_again_and_books_nothing_more(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 102, load_fen=1_000)
    request = tap(card.card_number, tap_id="resend-1", route="2", stop="B_SQUARE", mode=BOARD, at=now(),
                  terminal_seq=7)
    first = gate.tap(request)
    again = gate.tap(request)
    assert first.accepted and again.accepted
    assert (again.fare_fen, again.balance_fen) == (first.fare_fen, first.balance_fen)
    assert eventually(lambda: available(transit, card.purse_account_id), 800) == 800


def test_metro_entry_holds_the_maximum_and_exit_posts_the_zone_fare(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 103, load_fen=2_000)
    metro = operator_account(transit, "metro")
    before = credits(transit, metro)
    entry = gate.tap(tap(card.card_number, tap_id="m1", route="M1", stop="M_RAIL", mode=ENTRY, at=now(),
                         terminal_seq=11))
    assert entry.accepted, entry.message
    assert (entry.fare_fen, entry.held_fen, entry.balance_fen) == (0, 500, 1_500)  # 3 zones: 5.00 at most
    assert eventually(lambda: available(transit, card.purse_account_id), 1_500) == 1_500
    exit_ = gate.tap(tap(card.card_number, tap_id="m2", route="M1", stop="M_UNIV", mode=EXIT,
                         at=now() + dt.timedelta(minutes=25), terminal_seq=12, card_counter=1))
    assert exit_.accepted, exit_.message
    assert (exit_.fare_fen, exit_.balance_fen) == (400, 1_600)  # zone 1 to zone 2: 4.00, the rest released
    assert eventually(lambda: available(transit, card.purse_account_id), 1_600) == 1_600
    assert eventually(lambda: credits(transit, metro) - before, 400) == 400


def test_a_concession_comes_from_the_registry(transit: Transit, gate: Gate) -> None:
    student = add_rider(transit.server, 104, load_fen=1_000, categories=("student",), birth="20080301")
    decision = gate.tap(tap(student.card_number, tap_id="s1", route="1", stop="B_RAIL", mode=BOARD, at=now(),
                            terminal_seq=21))
    assert decision.accepted, decision.message
    assert (decision.rider_category_id, decision.fare_fen) == ("student", 100)


def test_an_empty_purse_is_refused_and_nothing_is_booked(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 105, load_fen=150)
    decision = gate.tap(tap(card.card_number, tap_id="poor", route="1", stop="B_RAIL", mode=BOARD, at=now(),
                            terminal_seq=31))
    assert not decision.accepted
    assert decision.reason == transit_pb2.REFUSAL_INSUFFICIENT_BALANCE
    assert eventually(lambda: available(transit, card.purse_account_id), 150) == 150


def test_bad_taps_are_refused_with_the_field(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 106, load_fen=1_000)
    for request, field in (
        (tap(card.card_number, tap_id="b1", route="99", stop="B_RAIL", mode=BOARD, at=now()), "route_id"),
        (tap(card.card_number, tap_id="b2", route="1", stop="NOWHERE", mode=BOARD, at=now()), "stop_id"),
        (tap(card.card_number, tap_id="b3", route="1", stop="B_RAIL", mode=0, at=now()), "mode"),
        (tap(card.card_number, tap_id="b4", route="1", stop="B_RAIL", mode=BOARD, at=now(), terminal_id="xyz"),
         "terminal_id"),
    ):
        decision = gate.tap(request)
        assert not decision.accepted and decision.reason == transit_pb2.REFUSAL_INVALID
        assert decision.message.startswith(field)
    unknown = gate.tap(tap("Z99999999", tap_id="b5", route="1", stop="B_RAIL", mode=BOARD, at=now()))
    assert unknown.reason == transit_pb2.REFUSAL_CARD_UNKNOWN
    assert eventually(lambda: available(transit, card.purse_account_id), 1_000) == 1_000


def test_a_missing_tap_off_is_charged_the_maximum_and_collected_on_the_chip(transit: Transit, gate: Gate,
                                                                             keys: MasterKeys) -> None:
    card = add_rider(transit.server, 107, load_fen=2_000)
    terminal_id = bytes.fromhex("000000000107")
    chip = chip_terminal(card, keys, terminal_id, load_fen=2_000)
    early = now() - dt.timedelta(hours=4)
    entry = gate.tap(tap(card.card_number, tap_id="x1", route="M2", stop="M_OLDTOWN", mode=ENTRY, at=early,
                         terminal_id=terminal_id.hex(), terminal_seq=1, card_counter=0))
    assert entry.accepted and (entry.held_fen, entry.fare_fen) == (500, 0)
    chip.composite_purchase(0, bytes((0x02, 46)) + bytes(46))  # the entry record, nothing debited
    # Four hours on (the limit is 180 minutes), the card enters again: the old journey is charged its hold on the
    # ledger and, since the chip still has that money, this entry debits it from the chip.
    again = gate.tap(tap(card.card_number, tap_id="x2", route="M2", stop="M_OLDTOWN", mode=ENTRY, at=now(),
                         terminal_id=terminal_id.hex(), terminal_seq=2, card_counter=1))
    assert again.accepted, again.message
    assert (again.fare_fen, again.collected_fen, again.held_fen) == (500, 500, 500)
    assert eventually(lambda: available(transit, card.purse_account_id), 2_000 - 500 - 500) == 2_000 - 500 - 500
    receipt = chip.composite_purchase(again.fare_fen, bytes((0x02, 46)) + bytes(46))
    assert receipt.balance_after_fen == 1_500  # the chip and the ledger agree (but for the new hold)
    answer = upload(transit, "X-1", [rec.Record.from_receipt(receipt)], route="M2", gate_id="G-X")
    assert (answer.booked, answer.already_cleared) == (0, 1)
    assert eventually(lambda: available(transit, card.purse_account_id), 1_000) == 1_000


def test_the_sweeper_charges_a_journey_nobody_closed(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 109, load_fen=2_000)
    entry = gate.tap(tap(card.card_number, tap_id="sw1", route="M2", stop="M_OLDTOWN", mode=ENTRY,
                         at=now() - dt.timedelta(hours=4), terminal_seq=71))
    assert entry.accepted and entry.held_fen == 500
    ledger = transit.server.ledger()
    deadline = time.monotonic() + 60
    while True:  # the sweeper runs every few seconds; wait for it, not for a time
        balance = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=card.purse_account_id),
                                           metadata=auth(transit.server.operator_token), timeout=TIMEOUT_S).balance
        if balance.debits_posted_fen == 500:
            break
        assert time.monotonic() < deadline, "the sweeper did not charge the open journey"
        time.sleep(0.2)
    assert (balance.debits_pending_fen, balance.available_fen) == (0, 1_500)
    # The next tap with the same operator collects the charge on the chip; the rider pays it once.
    exit_ = gate.tap(tap(card.card_number, tap_id="sw2", route="M2", stop="M_OLDTOWN", mode=EXIT, at=now(),
                         terminal_seq=72, card_counter=1))
    assert exit_.accepted and exit_.collected_fen == 500
    assert exit_.fare_fen == 500 + 500  # collected, and an exit without an entry pays the maximum
    assert eventually(lambda: available(transit, card.purse_account_id), 1_000) == 1_000


def test_a_card_reported_lost_is_refused_online(transit: Transit, gate: Gate) -> None:
    card = add_rider(transit.server, 108, load_fen=1_000)
    before = gate.tap(tap(card.card_number, tap_id="l1", route="1", stop="B_RAIL", mode=BOARD, at=now(),
                          terminal_seq=51))
    assert before.accepted
    stub = transit.stub()
    stream = stub.StreamDenylist(transit_pb2.StreamGateDenylistRequest(since_version=0, follow=True),
                                 metadata=transit.gate, timeout=TIMEOUT_S)
    first = next(stream)
    assert card.card_number not in {entry.card_number for entry in first.added}
    person = transit.server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card.card_number),
                                            metadata=auth(transit.server.operator_token), timeout=TIMEOUT_S)
    assert person.card.card_number == card.card_number
    transit.server.cards().ReportLoss(cards_pb2.ReportLossRequest(
        actor="op1", card_number=card.card_number, written=cards_pb2.WrittenReport(
            holder_id_number=_holder_id(108), holder_name="乘客")),
        metadata=auth(transit.server.operator_token), timeout=TIMEOUT_S)
    delta = next(stream)
    stream.cancel()
    added = {entry.card_number: entry.app_serial for entry in delta.added}
    assert card.card_number in added and delta.since_version == first.version
    assert len(added[card.card_number]) == 20
    after = gate.tap(tap(card.card_number, tap_id="l2", route="1", stop="B_RAIL", mode=BOARD, at=now(),
                         terminal_seq=52, card_counter=1))
    assert not after.accepted and after.reason == transit_pb2.REFUSAL_DENYLISTED
    # A gate that saw version `first.version` gets exactly the change since.
    since = next(stub.StreamDenylist(transit_pb2.StreamGateDenylistRequest(since_version=first.version),
                                     metadata=transit.gate, timeout=TIMEOUT_S))
    assert [entry.card_number for entry in since.added] == [card.card_number]


def _holder_id(sequence: int) -> str:
    from grpc_helpers import citizen_id

    return citizen_id(sequence=sequence)


# -- offline batches --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> MasterKeys:
    return MasterKeys.load(TEST_KEYS_PATH)


def upload(transit: Transit, batch_id: str, records: list[rec.Record], route: str = "1",
           gate_id: str = "G-OFF") -> transit_pb2.UploadRecordsResponse:
    return transit.stub().UploadRecords(transit_pb2.UploadRecordsRequest(
        batch_id=batch_id, gate_id=gate_id, route_id=route, packed_records=rec.to_packed(rec.pack(records))),
        metadata=transit.gate, timeout=TIMEOUT_S)


def test_an_offline_batch_is_verified_booked_once_and_settled(transit: Transit, keys: MasterKeys) -> None:
    card = add_rider(transit.server, 201, load_fen=3_000)
    chip = chip_terminal(card, keys, bytes.fromhex("000000000201"), load_fen=3_000)
    receipts = [chip.purchase(200), chip.composite_purchase(0, bytes((0x02, 46)) + bytes(46)),
                chip.composite_purchase(200, bytes((0x02, 46)) + bytes(46))]
    good = [rec.Record.from_receipt(r) for r in receipts]
    forged = good[0]._replace(amount_fen=1, terminal_seq=good[0].terminal_seq + 100)
    citybus = operator_account(transit, "citybus")
    before = credits(transit, citybus)

    answer = upload(transit, "B1", [*good, forged])
    assert (answer.booked, answer.entry_only, answer.rejected, answer.already_cleared) == (2, 1, 1, 0)
    assert answer.booked_fen == 400 and not answer.replayed
    assert [(p.index, p.outcome) for p in answer.problems] == [(3, transit_pb2.RECORD_FORGED)]
    assert eventually(lambda: available(transit, card.purse_account_id), 2_600) == 2_600
    assert eventually(lambda: credits(transit, citybus) - before, 400) == 400

    again = upload(transit, "B1", [*good, forged])  # the same batch: the same answer, nothing booked
    assert again.replayed and (again.booked, again.booked_fen) == (2, 400)
    other = upload(transit, "B2", good[:1])  # the same chip transaction in another batch: a replay
    assert (other.booked, other.already_cleared) == (0, 1)
    assert other.problems[0].outcome == transit_pb2.RECORD_ALREADY_CLEARED
    assert eventually(lambda: available(transit, card.purse_account_id), 2_600) == 2_600

    with pytest.raises(grpc.RpcError) as refused:
        upload(transit, "B1", good[:1])  # the same batch id with other records
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS

    settlement = transit.stub().GetSettlement(transit_pb2.GetSettlementRequest(agency_id="citybus"),
                                              metadata=transit.operator, timeout=TIMEOUT_S)
    assert settlement.reconciled, settlement.csv
    assert settlement.amount_fen == settlement.ledger_received_fen
    assert settlement.offline_records >= 4
    assert any(p.outcome == transit_pb2.RECORD_FORGED for p in settlement.rejected)
    assert "FORGED" in settlement.csv and ",total," in settlement.csv


def test_an_online_tap_uploaded_later_is_not_booked_twice(transit: Transit, gate: Gate, keys: MasterKeys) -> None:
    card = add_rider(transit.server, 202, load_fen=1_000)
    terminal_id = bytes.fromhex("000000000202")
    chip = chip_terminal(card, keys, terminal_id, load_fen=1_000)
    # The gate asked the SAM for its next transaction number: 1 (a fresh SoftSam), the chip's counter is 0.
    decision = gate.tap(tap(card.card_number, tap_id="on-1", route="1", stop="B_RAIL", mode=BOARD, at=now(),
                            gate="G-ON", terminal_id=terminal_id.hex().upper(), terminal_seq=1, card_counter=0))
    assert decision.accepted
    receipt = chip.purchase(decision.fare_fen)
    assert receipt.terminal_seq == 1
    answer = upload(transit, "ON-1", [rec.Record.from_receipt(receipt)], gate_id="G-ON")
    assert (answer.booked, answer.already_cleared) == (0, 1)
    assert eventually(lambda: available(transit, card.purse_account_id), 800) == 800


def test_bad_batches_are_refused_whole(transit: Transit) -> None:
    stub = transit.stub()
    for request, code in (
        (transit_pb2.UploadRecordsRequest(batch_id="X", gate_id="G", route_id="1", packed_records=b"\x00" * 47),
         grpc.StatusCode.INVALID_ARGUMENT),
        (transit_pb2.UploadRecordsRequest(batch_id="X", gate_id="G", route_id="nope", packed_records=b"\x00" * 48),
         grpc.StatusCode.NOT_FOUND),
        (transit_pb2.UploadRecordsRequest(batch_id="", gate_id="G", route_id="1", packed_records=b"\x00" * 48),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            stub.UploadRecords(request, metadata=transit.gate, timeout=TIMEOUT_S)
        assert refused.value.code() == code, refused.value.details()


def test_credentials(transit: Transit) -> None:
    stub = transit.stub()
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetFareNetwork(transit_pb2.GetFareNetworkRequest(), timeout=TIMEOUT_S)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as gate_only:
        stub.GetSettlement(transit_pb2.GetSettlementRequest(agency_id="metro"), metadata=transit.gate,
                           timeout=TIMEOUT_S)
    assert gate_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
    network = stub.GetFareNetwork(transit_pb2.GetFareNetworkRequest(), metadata=transit.gate, timeout=TIMEOUT_S)
    assert {o.agency_id for o in network.operators} == {"citybus", "metro"}
    assert network.hold_minutes == 180


def test_the_service_stops_with_the_server(tmp_path: Path) -> None:
    served = start_transit(tmp_path / "short")
    assert served.server.stop() == 0, served.server.log_text()
    assert not (tmp_path / "short" / "transit" / "ready.json").exists()



def test_a_journey_entered_online_and_left_offline_is_charged_once(transit: Transit, gate: Gate,
                                                                    keys: MasterKeys) -> None:
    card = add_rider(transit.server, 203, load_fen=2_000)
    chip = chip_terminal(card, keys, bytes.fromhex("000000000203"), load_fen=2_000)
    entry = gate.tap(tap(card.card_number, tap_id="mix-1", route="M1", stop="M_RAIL", mode=ENTRY,
                         at=now() - dt.timedelta(minutes=10), terminal_seq=61))
    assert entry.accepted and entry.held_fen == 500
    assert eventually(lambda: available(transit, card.purse_account_id), 1_500) == 1_500
    # The exit gate was offline: it debited the chip the fare itself and uploads the record later.
    exit_record = rec.Record.from_receipt(chip.composite_purchase(400, bytes((0x02, 46)) + bytes(46)))
    answer = upload(transit, "MIX-1", [exit_record], route="M1", gate_id="G-MIX")
    assert answer.booked == 1
    # The hold released, the fare paid once.
    assert eventually(lambda: available(transit, card.purse_account_id), 1_600) == 1_600


def test_the_operator_reads_the_settlement_from_the_command_line(transit: Transit, tmp_path: Path) -> None:
    import json
    import subprocess

    token = tmp_path / "operator.token"
    token.write_text(transit.operator_token)
    done = subprocess.run([sys.executable, "-m", "citycard", "transit", "settlement", "--agency", "metro",
                           "--server", transit.address, "--token-file", str(token), "--json",
                           "--csv", str(tmp_path / "metro.csv")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["agency_id"] == "metro" and answer["reconciled"] is True
    assert answer["amount_fen"] == answer["ledger_received_fen"]
    assert (tmp_path / "metro.csv").read_text().startswith("agency_id,date,source")
    refused = subprocess.run([sys.executable, "-m", "citycard", "transit", "settlement", "--agency", "nobody",
                              "--server", transit.address, "--token-file", str(token)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0 and "NOT_FOUND" in refused.stderr
