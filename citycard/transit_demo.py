"""The transit act of ``citycard demo``: a morning rush on two bus lines and a metro line.

``citycard serve`` runs with the transit application in its own process; gates here (apps/bus/gate.py) tap
riders' cards: online gates decide through ``Transit.Taps`` (holds at metro entry, fares at exit and on the
bus), an offline bus gate debits the chips itself and uploads its records afterwards, a card is reported lost
mid-rush and refused at both kinds of gate, and each operator's settlement is printed and reconciled with the
ledger. The riders' chips are virtual cards in memory (the gates speak the same APDUs to them as to a card in a
PC/SC reader; ``citycard transit gate --reader ...`` does the latter).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from citycard.apps.bus.capp import category_code
from citycard.apps.bus.gate import EngineFares, Gate, GateConfig, GateStore, Mode, TransitLink
from citycard.apps.bus.ids import app_serial_of_card
from citycard.card import (
    CardChannel,
    IssuerHost,
    MasterKeys,
    MemoryStore,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
    profile_from_json,
)
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.core import clock
from citycard.core.identity import check_character
from citycard.v1 import cards_pb2, cards_pb2_grpc, transit_pb2, transit_pb2_grpc

__all__ = ["run_transit_demo"]

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
LOAD_FEN = 5_000
FEED = Path(__file__).resolve().parent.parent / "apps" / "bus" / "feed"


def _yuan(fen: int) -> str:
    return f"{'-' if fen < 0 else ''}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def _auth(path: str | Path) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {Path(path).read_text().strip()}"),)


@contextlib.contextmanager
def _server(data_dir: Path, keys_path: Path, out: Callable[[str], None]) -> Iterator[tuple[dict, dict]]:
    ready_file = data_dir / "server.ready.json"
    transit_ready = data_dir / "transit" / "ready.json"
    log_path = data_dir / "server.log"
    env = {**os.environ, "CITYCARD_TRANSIT_DIR": str(data_dir / "transit"), "CITYCARD_CARD_KEYS": str(keys_path)}
    env.pop("CITYCARD_NOW", None)  # the server keeps real time; the gates' clock is the rush's
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "citycard.server", "--data", str(data_dir), "--listen", "127.0.0.1:0",
             "--plugins", "transit", "--ready-file", str(ready_file)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (ready_file.exists() and transit_ready.exists()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server or the transit application did not start; see {log_path}")
            time.sleep(0.05)
        core, transit = json.loads(ready_file.read_text()), json.loads(transit_ready.read_text())
        out(f"citycard serve on {core['address']} (pid {process.pid}); the transit application serves "
            f"citycard.v1.Transit on {transit['address']} from {data_dir / 'transit'}")
        yield core, transit
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(STOP_TIMEOUT_S)
        out(f"server stopped (exit code {process.returncode})")


@dataclass
class Rider:
    name: str
    id_number: str
    card: cards_pb2.Card
    chip: VirtualCard


class _Reader:
    """The card in a gate's reader: whichever rider taps next."""

    def __init__(self) -> None:
        self.card: VirtualCard | None = None

    def connect(self) -> MemoryTransport:
        assert self.card is not None
        return MemoryTransport(self.card)


def run_transit_demo(data_dir: Path, out: Callable[[str], None]) -> None:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_path = data_dir / "issuer-keys.json"
    MasterKeys.generate().save(keys_path)  # a throw-away issuer, readable by its owner only
    with _server(data_dir, keys_path, out) as (core, transit):
        _Rush(data_dir, MasterKeys.load(keys_path), core, transit, out).run()


class _Rush:
    def __init__(self, data_dir: Path, keys: MasterKeys, core: dict, transit: dict,
                 out: Callable[[str], None]) -> None:
        self.data_dir = data_dir
        self.keys = keys
        self.out = out
        self.operator = _auth(core["operator_token_file"])
        self.cards = cards_pb2_grpc.CardsStub(grpc.insecure_channel(core["address"]))
        self.transit_address = transit["address"]
        self.gate_token = Path(transit["gate_token_file"]).read_text().strip()
        self.transit_operator = _auth(transit["operator_token_file"])
        self.transit = transit_pb2_grpc.TransitStub(grpc.insecure_channel(transit["address"]))
        self.reader = _Reader()
        self.day = clock.today()
        self.links: list[TransitLink] = []

    # -- the cast -----------------------------------------------------------------------------------------

    def rider(self, n: int, name: str, categories: tuple[str, ...] = (), birth: str = "19850301") -> Rider:
        body = f"370102{birth}{n:03d}"
        id_number = body + check_character(body)
        self.cards.AddPerson(cards_pb2.AddPersonRequest(
            actor="op1", id_number=id_number, name=name, gender=cards_pb2.GENDER_MALE if n % 2 else
            cards_pb2.GENDER_FEMALE, date_of_birth=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", residence="济南市历下区",
            household_registration="济南市", status=cards_pb2.PERSON_STATUS_RETIRED, categories=list(categories)),
            metadata=self.operator, timeout=CALL_TIMEOUT_S)
        card = self.cards.IssueCard(cards_pb2.IssueCardRequest(actor="op1", holder_id_number=id_number),
                                    metadata=self.operator, timeout=CALL_TIMEOUT_S).card
        self.cards.LoadPurse(cards_pb2.LoadPurseRequest(actor="op1", card_number=card.card_number,
                                                        amount_fen=LOAD_FEN), metadata=self.operator,
                             timeout=CALL_TIMEOUT_S)
        profile = copy.deepcopy(SAMPLE_PROFILE)
        profile["ssse"]["card_number"] = card.card_number
        profile["purse"]["app_serial"] = app_serial_of_card(card.card_id_code)
        rider_category = {"senior": "senior", "student": "student", "disabled": "disabled"}
        profile["purse"]["rider_category"] = category_code(next((rider_category[c] for c in categories), "adult"))
        chip = VirtualCard(personalize(profile_from_json(profile), self.keys), MemoryStore())
        counter = Terminal(CardChannel(MemoryTransport(chip)), SoftSam(self.keys, bytes(6)), host=IssuerHost(self.keys))
        counter.verify_pin(SAMPLE_PROFILE["initial_pin"])
        counter.load(LOAD_FEN)  # the same load as the counter booked on the ledger
        return Rider(name, id_number, card, chip)

    def gate(self, gate_id: str, route: str, stop: str, mode: Mode, *, online: bool) -> Gate:
        store = GateStore(self.data_dir / "gates" / gate_id, gate_id)
        link = None
        if online:
            link = TransitLink(self.transit_address, self.gate_token)
            self.links.append(link)
        keys = self.keys
        return Gate(GateConfig(gate_id, route, stop, mode, store.terminal_id),
                    make_sam=lambda seq: SoftSam(keys, store.terminal_id, next_terminal_seq=seq), store=store,
                    connect=self.reader.connect, fares=None if online else EngineFares.from_feed(FEED), link=link)

    @contextlib.contextmanager
    def link(self) -> Iterator[TransitLink]:
        """A short connection to the Transit service, for a gate that is otherwise offline."""
        link = TransitLink(self.transit_address, self.gate_token)
        try:
            yield link
        finally:
            link.close()

    # -- the rush ---------------------------------------------------------------------------------------------

    def at(self, hhmm: str) -> None:
        os.environ["CITYCARD_NOW"] = f"{self.day.isoformat()}T{hhmm}:00+08:00"

    def tap(self, hhmm: str, gate: Gate, rider: Rider) -> None:
        self.at(hhmm)
        self.reader.card = rider.chip
        result = gate.tap()
        self.out(f"{hhmm}  {gate.config.gate_id:<12} {rider.name:<4} {result.line()}")

    def run(self) -> None:
        saved_now = os.environ.get("CITYCARD_NOW")
        try:
            self._run()
        finally:
            for link in self.links:
                link.close()
            if saved_now is None:
                os.environ.pop("CITYCARD_NOW", None)
            else:
                os.environ["CITYCARD_NOW"] = saved_now

    def _run(self) -> None:
        out = self.out
        wang, li, zhao = self.rider(1, "王军"), self.rider(2, "李娜"), self.rider(3, "赵老伯", ("senior",), "19500101")
        chen, liu, sun = self.rider(4, "陈晨", ("student",), "20080901"), self.rider(5, "刘洋"), self.rider(6, "孙丽")
        zhou, wu = self.rider(7, "周强"), self.rider(8, "吴敏")
        out(f"-- 8 riders, each card's e-purse loaded with {_yuan(LOAD_FEN)} at the counter (ledger and chip)")
        bus1 = self.gate("BUS1-RAIL", "1", "B_RAIL", Mode.BOARD, online=True)
        metro_in = self.gate("M1-RAIL-IN", "M1", "M_RAIL", Mode.ENTRY, online=True)
        metro_univ = self.gate("M1-UNIV-OUT", "M1", "M_UNIV", Mode.EXIT, online=True)
        metro_sci = self.gate("M1-SCI-OUT", "M1", "M_SCIENCE", Mode.EXIT, online=True)
        bus101 = self.gate("BUS101-OFF", "101", "B_RAIL", Mode.BOARD, online=False)
        out("-- gates: bus line 1 (online), metro M1 entry at Railway Station and exits at University Town and "
            "Science Park (online), bus line 101 (offline: decides on the gate, debits the chip, uploads later)")
        self.tap("07:30", bus1, wang)
        self.tap("07:32", bus101, li)
        self.tap("07:35", metro_in, wang)
        self.tap("07:40", metro_in, zhao)
        self.tap("07:41", bus1, chen)
        self.tap("07:55", metro_univ, wang)
        self.tap("08:05", metro_sci, zhao)
        self.tap("08:10", metro_in, liu)
        self.at("08:15")
        self.cards.ReportLoss(cards_pb2.ReportLossRequest(actor="op1", card_number=sun.card.card_number,
                                                          written=cards_pb2.WrittenReport(
                                                              holder_id_number=sun.id_number, holder_name=sun.name)),
                              metadata=self.operator, timeout=CALL_TIMEOUT_S)
        out(f"08:15  孙丽 reports her card {sun.card.card_number} lost in writing at the service counter")
        time.sleep(0.3)  # the denylist reaches the transit application's relay
        self.tap("08:16", bus1, sun)
        with self.link() as link:  # the offline gate's moment of signal
            for delta in link.denylist_since(bus101.store.denylist_version):
                bus101.store.apply_denylist(delta)
        out(f"08:17  BUS101-OFF   picks up the denylist (version {bus101.store.denylist_version}) in a moment of "
            "signal, then works offline again")
        self.tap("08:18", bus101, sun)
        self.tap("08:20", bus101, zhou)
        self.tap("08:21", bus101, wu)
        self.tap("08:30", metro_in, zhou)
        self.tap("08:50", metro_univ, zhou)
        self.tap("12:00", metro_in, liu)
        out("       (刘洋 never tapped off at 08:10: past the 180-minute limit that journey is charged the maximum "
            "fare, 5.00, on the ledger, and this entry debits it from the chip, so chip and ledger agree)")
        self.upload(bus101, "BUS101-OFF back online uploads its records")
        self.replay_and_forgery(bus101)
        for gate in (bus1, metro_in, metro_univ, metro_sci):
            answers = gate.upload()
            booked = sum(a.booked for a in answers)
            cleared = sum(a.already_cleared for a in answers)
            out(f"-- {gate.config.gate_id} uploads its chip records too: {booked} booked, {cleared} already "
                "cleared online (nothing twice)")
        os.environ.pop("CITYCARD_NOW", None)
        for agency in ("citybus", "metro"):
            self.settlement(agency)

    def upload(self, gate: Gate, what: str) -> None:
        with self.link() as link:
            for answer in gate.upload(link):
                self.out(f"-- {what}: batch {answer.batch_id}: {answer.booked} booked "
                         f"({_yuan(answer.booked_fen)}), {answer.already_cleared} already cleared, "
                         f"{answer.rejected} rejected")

    def replay_and_forgery(self, gate: Gate) -> None:
        from citycard.apps.bus import records as rec

        good = rec.from_packed(gate.store.records()[0].packed).copy()
        forged = good.copy()
        forged["amount_fen"] = 1  # a record changed after the chip signed it
        for batch_id, batch, what in (("REPLAY-1", good, "the first record again, in a new batch"),
                                      ("FORGED-1", forged, "a record whose amount was changed after signing")):
            answer = self.transit.UploadRecords(transit_pb2.UploadRecordsRequest(
                batch_id=batch_id, gate_id=gate.config.gate_id, route_id=gate.config.route_id,
                packed_records=rec.to_packed(batch)), metadata=(("authorization", f"Bearer {self.gate_token}"),),
                timeout=CALL_TIMEOUT_S)
            problem = answer.problems[0] if answer.problems else None
            self.out(f"-- {what}: booked {answer.booked}; "
                     + (f"{transit_pb2.RecordOutcome.Name(problem.outcome)}: {problem.message}" if problem else ""))

    def settlement(self, agency: str) -> None:
        answer = self.transit.GetSettlement(transit_pb2.GetSettlementRequest(agency_id=agency,
                                                                             date=self.day.isoformat()),
                                            metadata=self.transit_operator, timeout=CALL_TIMEOUT_S)
        path = self.data_dir / f"settlement-{agency}-{answer.date}.csv"
        path.write_text(answer.csv, encoding="utf-8")
        self.out(f"== settlement of {agency} for {answer.date}: {answer.online_taps} online taps, "
                 f"{answer.offline_records} offline records, owed {_yuan(answer.amount_fen)}; the ledger shows "
                 f"{_yuan(answer.ledger_received_fen)} received: "
                 + ("RECONCILED" if answer.reconciled else "NOT RECONCILED"))
        for line in answer.csv.splitlines():
            self.out("   " + line)
        self.out(f"   (written to {path})")

