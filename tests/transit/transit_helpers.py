"""A served transit application for tests: ``citycard serve`` (its own process) with the transit plugin
(a third process), the issuer's test keys for offline clearing, and clients here over gRPC."""

from __future__ import annotations

import copy
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpc"))

from citycard.apps.bus.ids import app_serial_of_card
from citycard.card import (
    CardChannel,
    IssuerHost,
    MasterKeys,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
    profile_from_json,
)
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.state import MemoryStore
from grpc_helpers import RunningServer, auth, citizen_id, start_server

from citycard.v1 import cards_pb2, transit_pb2, transit_pb2_grpc

TESTS = Path(__file__).resolve().parents[1]
TEST_KEYS_PATH = TESTS / "card" / "data" / "test-master-keys.json"
PIN = SAMPLE_PROFILE["initial_pin"]
CALL_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
T = TypeVar("T")


@dataclass
class Transit:
    server: RunningServer
    address: str
    gate_token: str
    operator_token: str

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> transit_pb2_grpc.TransitStub:
        return transit_pb2_grpc.TransitStub(self.channel())

    @property
    def gate(self) -> tuple[tuple[str, str], ...]:
        return auth(self.gate_token)

    @property
    def operator(self) -> tuple[tuple[str, str], ...]:
        return auth(self.operator_token)


def start_transit(data: Path, env: dict[str, str] | None = None) -> Transit:
    running = start_server(data, plugins="transit", env={
        "CITYCARD_TRANSIT_DIR": str(data / "transit"), "CITYCARD_CARD_KEYS": str(TEST_KEYS_PATH), **(env or {})})
    ready = data / "transit" / "ready.json"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if time.monotonic() > deadline or running.process.poll() is not None:
            running.stop()
            raise RuntimeError(f"the transit application did not start:\n{running.log_text()}")
        time.sleep(0.05)
    found = json.loads(ready.read_text())
    return Transit(running, found["address"], Path(found["gate_token_file"]).read_text().strip(),
                   Path(found["operator_token_file"]).read_text().strip())


def add_rider(server: RunningServer, sequence: int, *, load_fen: int = 0, categories: tuple[str, ...] = (),
              birth: str = "19800501") -> cards_pb2.Card:
    """A registered person with a card (and its e-purse loaded at the counter); the card as GetCard has it."""
    cards = server.cards()
    operator = auth(server.operator_token)
    id_number = citizen_id(birth=birth, sequence=sequence)
    cards.AddPerson(cards_pb2.AddPersonRequest(
        actor="op1", id_number=id_number, name="乘客", gender=cards_pb2.GENDER_MALE if sequence % 2 else
        cards_pb2.GENDER_FEMALE, date_of_birth=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", residence="济南市历下区",
        household_registration="济南市", status=cards_pb2.PERSON_STATUS_RETIRED, categories=list(categories)),
        metadata=operator, timeout=CALL_TIMEOUT_S)
    card = cards.IssueCard(cards_pb2.IssueCardRequest(actor="op1", holder_id_number=id_number),
                           metadata=operator, timeout=CALL_TIMEOUT_S).card
    if load_fen:
        cards.LoadPurse(cards_pb2.LoadPurseRequest(actor="op1", card_number=card.card_number, amount_fen=load_fen),
                        metadata=operator, timeout=CALL_TIMEOUT_S)
    return card


def chip_terminal(card: cards_pb2.Card, keys: MasterKeys, terminal_id: bytes, *, load_fen: int) -> Terminal:
    """The chip of a registered card (its application serial as production writes it), in memory, with a
    gate's terminal and SAM; its e-purse loaded with ``load_fen`` (the same amount the counter loaded)."""
    profile = copy.deepcopy(SAMPLE_PROFILE)
    profile["purse"]["app_serial"] = app_serial_of_card(card.card_id_code)
    profile["ssse"]["card_number"] = card.card_number
    chip = VirtualCard(personalize(profile_from_json(profile), keys), MemoryStore())
    terminal = Terminal(CardChannel(MemoryTransport(chip)), SoftSam(keys, terminal_id), host=IssuerHost(keys))
    terminal.verify_pin(PIN)
    terminal.load(load_fen)
    return terminal


def eventually(read: Callable[[], T], expected: T, timeout_s: float = 30.0) -> T:
    """``read()`` until it gives ``expected`` (or the time is up): the service answers a tap before its booking
    reaches the ledger, so a test that reads the ledger directly waits for it, never for a fixed time."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        value = read()
    return value


def tap(card_number: str, *, tap_id: str, route: str, stop: str, mode: int, at: dt.datetime,
        gate: str = "G1", terminal_id: str = "0A0B0C0D0E0F", terminal_seq: int = 1,
        card_counter: int = 0, chip_balance_fen: int = 1_000_000) -> transit_pb2.TapRequest:
    request = transit_pb2.TapRequest(tap_id=tap_id, card_number=card_number, gate_id=gate, route_id=route,
                                     stop_id=stop, mode=mode, terminal_id=terminal_id, terminal_seq=terminal_seq,
                                     card_counter=card_counter, chip_balance_fen=chip_balance_fen)
    request.at.FromDatetime(at.astimezone(dt.UTC))
    return request
