"""A transit gate over PC/SC: what a real gate does with a card at each tap, online and offline.

`Gate.tap()` runs one tap on the card in the gate's reader (GATES.md has the APDU sequence and a trace):

1. read the card: SELECT SSSE and its card number (EF05 record 7); SELECT the purse (its FCI carries the
   application serial number and, in byte 28 of the public data, the holder's rider category); READ RECORD
   02 of SFI 17, the transit record (capp.py); INITIALIZE FOR CAPP PURCHASE for 0 fen, which changes
   nothing and tells the chip's balance and offline counter;
2. decide: online, a TapRequest on the gate's kept-open `Transit.Taps` stream and its TapDecision; offline,
   the gate's denylist and its own fare decision (`FareDecider`) from what the chip says;
3. on accept, the composite purchase (`Terminal.composite_purchase`): INITIALIZE FOR CAPP PURCHASE for the
   fare, UPDATE CAPP DATA CACHE with the new transit record, DEBIT; the chip writes the debit, the detail
   record and the transit record in one step. Entry debits 0 (online, the server holds the maximum fare on
   the ledger); exit and boarding debit the fare. On refusal the chip is not written.
4. keep the chip's purchase record (its TAC) in the gate's store, marked online or offline; `upload()`
   sends them to `Transit.UploadRecords` in batches whose id is fixed before the first try, so a retry
   books nothing twice (an online tap's record answers "already cleared").

A card pulled during DEBIT leaves the outcome unknown: the gate keeps the pending purchase and, when the
same card is presented again, asks the chip (INITIALIZE for 0, GET TRANSACTION PROVE) whether it debited.
If it did, the proof's TAC settles the tap; if it did not, the same purchase runs again under the same
terminal transaction number, so the chip transaction keeps the identity the server already knows.

The gate's files (a directory, `GateStore`): gate.json (terminal id, next terminal transaction number,
upload progress, torn taps), denylist.json (the version and the refused cards, from
`Transit.StreamDenylist`), records.bin (one 49-byte entry per chip transaction: a flag byte, then the
48-byte packed record of transit.proto). Every change is written before the gate answers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import grpc
from citycard.card import commands as cmd
from citycard.card.channel import ApduObserver, CardChannel
from citycard.card.commands import PublicData, PurchaseInit
from citycard.card.flows import (
    PURCHASE_KEY_INDEX,
    SELECT_PURSE,
    PendingPurchase,
    PurchaseInterrupted,
    PurchaseReceipt,
    RecoveryError,
    Terminal,
)
from citycard.card.keys import MasterKeys
from citycard.card.purse import CAPP_SFI
from citycard.card.sam import PurchaseAuthorization, PurchaseRequest, PurchaseSam, SoftSam, TacFields
from citycard.card.ssse import EF05_ITEMS, EF05_SFI, SSSE_AID
from citycard.card.sw import InsufficientBalance, StatusWordError
from citycard.card.transport import PcscTransport, Transport, TransportError
from citycard.core import clock
from google.protobuf import timestamp_pb2

from citycard.v1 import transit_pb2, transit_pb2_grpc

from . import records
from .capp import (
    ADULT,
    CAPP_RECORD_BYTES,
    CAPP_RECORD_ID,
    CappError,
    JourneyState,
    TransitRecord,
    category_code,
    category_from_fci,
    category_id,
)
from .records import RECORD_BYTES, Record

__all__ = [
    "DECISION_TIMEOUT_S",
    "RECORDS_PER_BATCH_MAX",
    "EngineFares",
    "FareDecider",
    "FixedFare",
    "Gate",
    "GateConfig",
    "GateError",
    "GateStore",
    "GateUnavailable",
    "LocalDecision",
    "LocalTap",
    "Mode",
    "StoredRecord",
    "TapResult",
    "TransitLink",
    "pack_record",
    "terminal_id_for",
    "upload_records",
]

log = logging.getLogger("citycard.apps.bus.gate")

DECISION_TIMEOUT_S = 2.0  # a gate's whole budget is 300 ms; past this the server is taken as gone
UPLOAD_TIMEOUT_S = 60.0
DENYLIST_TIMEOUT_S = 30.0
RECORDS_PER_BATCH_MAX = records.RECORDS_MAX  # transit.proto: UploadRecordsRequest.packed_records
STORE_ENTRY_BYTES = 1 + RECORD_BYTES
FLAG_OFFLINE, FLAG_ONLINE = 0x00, 0x01
STORE_FORMAT = "citycard-gate/1"
CARD_NUMBER = EF05_ITEMS["card_number"]
TERMINAL_SEQ_FIRST = 1


class GateError(Exception):
    """The gate cannot work as configured (bad store, bad option, a card that cannot be read)."""


class GateUnavailable(GateError):
    """The Transit service did not answer; nothing was booked by this tap."""


class Mode(enum.StrEnum):
    BOARD = "board"
    ENTRY = "entry"
    EXIT = "exit"

    @property
    def tap_mode(self) -> Any:  # a transit_pb2.TapMode value
        return {Mode.BOARD: transit_pb2.TAP_MODE_BOARD, Mode.ENTRY: transit_pb2.TAP_MODE_ENTRY,
                Mode.EXIT: transit_pb2.TAP_MODE_EXIT}[self]

    @property
    def journey_state(self) -> JourneyState:
        return {Mode.BOARD: JourneyState.BOARDED, Mode.ENTRY: JourneyState.ENTERED,
                Mode.EXIT: JourneyState.EXITED}[self]


def terminal_id_for(gate_id: str) -> bytes:
    """A gate without a PSAM terminal id of its own gets a stable one from its gate id (6 bytes)."""
    return hashlib.sha256(gate_id.encode("utf-8")).digest()[:6]


@dataclass(frozen=True, slots=True)
class GateConfig:
    gate_id: str
    route_id: str
    stop_id: str
    mode: Mode
    terminal_id: bytes

    def __post_init__(self) -> None:
        for name in ("gate_id", "route_id", "stop_id"):
            value = getattr(self, name)
            if not value or not value.isascii() or not value.isprintable():
                raise GateError(f"{name}: {value!r} must be printable ASCII")
        if len(self.terminal_id) != 6:
            raise GateError("terminal_id: 6 bytes (12 hex digits)")
        try:  # the ids must fit the transit record: refused here, not at the first tap
            TransitRecord(JourneyState.BOARDED, tapped_at=dt.datetime(2000, 1, 1), route_id=self.route_id,
                          stop_id=self.stop_id, terminal_id=self.terminal_id).encode()
        except CappError as exc:
            raise GateError(str(exc)) from None


# -- the offline fare decision ----------------------------------------------------------------------------


class LocalTap(NamedTuple):
    """What an offline gate knows at a tap: itself, the time, and what the chip says."""

    card_number: str
    mode: Mode
    route_id: str
    stop_id: str
    at: dt.datetime
    rider_category_id: str
    chip_balance_fen: int


class LocalDecision(NamedTuple):
    accepted: bool
    fare_fen: int = 0  # debited from the chip by this tap (board, exit)
    held_fen: int = 0  # the maximum fare an entry stands for (written in the transit record)
    reason: int = transit_pb2.REFUSAL_REASON_UNSPECIFIED  # a RefusalReason when refused
    message: str = ""
    rider_category_id: str = ADULT
    fare_product_id: str = ""


class FareDecider(Protocol):
    """An offline gate's fare decision from the chip alone: the journey so far and this tap."""

    def decide(self, journey: TransitRecord, tap: LocalTap) -> LocalDecision: ...


@dataclass(frozen=True, slots=True)
class FixedFare:
    """One fare per rider category (adult when a category has none), the simplest decision a gate can make:
    a flat bus fare, or a metro whose exit always charges the same. Entry holds that fare, needs the
    balance for it and refuses a second entry within `hold_minutes` of the first."""

    fares_fen: dict[str, int]
    hold_minutes: int = 240

    def decide(self, journey: TransitRecord, tap: LocalTap) -> LocalDecision:
        fare = self.fares_fen.get(tap.rider_category_id, self.fares_fen[ADULT])
        category = tap.rider_category_id if tap.rider_category_id in self.fares_fen else ADULT
        if fare > tap.chip_balance_fen:
            return LocalDecision(False, reason=transit_pb2.REFUSAL_INSUFFICIENT_BALANCE,
                                 message=f"balance {tap.chip_balance_fen} fen, fare {fare} fen",
                                 rider_category_id=category)
        if tap.mode is Mode.ENTRY:
            if journey.state is JourneyState.ENTERED and journey.tapped_at is not None \
                    and tap.at - journey.tapped_at < dt.timedelta(minutes=self.hold_minutes):
                return LocalDecision(False, reason=transit_pb2.REFUSAL_ALREADY_ENTERED,
                                     message=f"entered at {journey.stop_id} {journey.tapped_at:%H:%M}",
                                     rider_category_id=category)
            return LocalDecision(True, held_fen=fare, rider_category_id=category)
        return LocalDecision(True, fare_fen=fare, rider_category_id=category)


class EngineFares:
    """The network's fare engine (apps/bus/fares.py) deciding from the chip alone.

    An offline gate knows a card's past only from its transit record, so the engine's state for the card is
    rebuilt by deciding that record's tap again from an empty state: an entry record gives the open journey
    (its hold as the chip recorded it), a boarding record the previous leg (for a transfer discount and the
    day's spending). After an exit nothing is carried: offline, caps and transfers from earlier legs are the
    server's to apply when the records are uploaded. A journey left open beyond the hold limit is charged its
    maximum at the next entry or boarding, in the same debit.
    """

    def __init__(self, engine: Any) -> None:
        from . import fares  # the engine is imported only by gates that decide offline

        self._fares = fares
        self.engine = engine

    @classmethod
    def from_feed(cls, directory: str | Path) -> EngineFares:
        from . import fares, gtfs

        return cls(fares.FareEngine(gtfs.load_feed(directory)))

    def _tap(self, card_number: str, at: dt.datetime, route_id: str, stop_id: str, mode: str,
             category: str) -> Any:
        categories = frozenset() if category == ADULT else frozenset({category})
        return self._fares.Tap(card_number, at, route_id, stop_id, mode, categories)

    def _state(self, journey: TransitRecord, tap: LocalTap) -> Any:
        empty = self._fares.RiderState()
        if journey.state not in (JourneyState.ENTERED, JourneyState.BOARDED) or journey.tapped_at is None:
            return empty
        mode = Mode.ENTRY if journey.state is JourneyState.ENTERED else Mode.BOARD
        replayed = self.engine.decide(empty, self._tap(tap.card_number, journey.tapped_at, journey.route_id,
                                                       journey.stop_id, mode, journey.rider_category_id))
        state = self._fares.commit(empty, replayed)
        if state.journey is not None and journey.amount_fen:
            state = dataclasses.replace(state, journey=dataclasses.replace(state.journey,
                                                                           held_fen=journey.amount_fen))
        return state

    def decide(self, journey: TransitRecord, tap: LocalTap) -> LocalDecision:
        decision = self.engine.decide(self._state(journey, tap), self._tap(
            tap.card_number, tap.at, tap.route_id, tap.stop_id, tap.mode, tap.rider_category_id))
        category = decision.rider_category_id or tap.rider_category_id
        if decision.outcome == self._fares.Outcome.REFUSE:
            return LocalDecision(False, reason=_ENGINE_REFUSALS.get(str(decision.refusal),
                                                                    transit_pb2.REFUSAL_INVALID),
                                 message=decision.message, rider_category_id=category)
        fare = decision.fare_fen + (decision.expired.fare_fen if decision.expired is not None else 0)
        if tap.mode is Mode.ENTRY:
            fare = decision.expired.fare_fen if decision.expired is not None else 0
        needed = fare + (decision.held_fen if tap.mode is Mode.ENTRY else 0)
        if needed > tap.chip_balance_fen:
            return LocalDecision(False, reason=transit_pb2.REFUSAL_INSUFFICIENT_BALANCE,
                                 message=f"balance {tap.chip_balance_fen} fen, {needed} fen needed",
                                 rider_category_id=category)
        held = decision.held_fen if tap.mode is Mode.ENTRY else 0
        return LocalDecision(True, fare, held, message=decision.message, rider_category_id=category,
                             fare_product_id=decision.fare_product_id)


_ENGINE_REFUSALS = {"no_fare": transit_pb2.REFUSAL_NO_FARE, "already_entered": transit_pb2.REFUSAL_ALREADY_ENTERED,
                    "invalid": transit_pb2.REFUSAL_INVALID}


# -- records: the chip's purchase as transit.proto packs it ---------------------------------------------


def pack_record(receipt: PurchaseReceipt) -> bytes:
    """The 48-byte packed record of transit.proto; card_counter is the counter the chip used."""
    return Record.from_receipt(receipt).pack()


class StoredRecord(NamedTuple):
    online: bool  # decided online: the server booked it at the tap, its upload answers "already cleared"
    packed: bytes

    def record(self) -> Record:
        [record] = records.unpack(records.from_packed(self.packed))
        return record

    @property
    def amount_fen(self) -> int:
        return int.from_bytes(self.packed[12:16], "big")


# -- the gate's own files --------------------------------------------------------------------------------


class GateStore:
    """A gate's directory: its SAM counter, denylist, torn taps and chip records (module docstring)."""

    def __init__(self, directory: Path, gate_id: str, terminal_id: bytes | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._gate_path = self.directory / "gate.json"
        self._denylist_path = self.directory / "denylist.json"
        self._records_path = self.directory / "records.bin"
        self._lock = threading.Lock()  # the denylist follower writes from its own thread
        self._serials: frozenset[str] | None = None  # the denylist's app serials, built at first use
        self.state = self._load_state(gate_id, terminal_id)
        self.denylist_version, self.denylisted = self._load_denylist()
        self._records_count = self._check_records()

    # gate.json ----------------------------------------------------------------------------------------

    def _load_state(self, gate_id: str, terminal_id: bytes | None) -> dict[str, Any]:
        if not self._gate_path.exists():
            state: dict[str, Any] = {"format": STORE_FORMAT, "gate_id": gate_id,
                     "terminal_id": (terminal_id or terminal_id_for(gate_id)).hex().upper(),
                     "next_terminal_seq": TERMINAL_SEQ_FIRST, "uploaded": 0, "open_batch": None, "torn": {}}
            _write_json(self._gate_path, state)
            return state
        state = _read_json(self._gate_path)
        if not isinstance(state, dict) or state.get("format") != STORE_FORMAT:
            raise GateError(f"{self._gate_path}: not a gate store ({STORE_FORMAT})")
        if state.get("gate_id") != gate_id:
            raise GateError(f"{self._gate_path}: belongs to gate {state.get('gate_id')!r}, not {gate_id!r}")
        if terminal_id is not None and terminal_id.hex().upper() != state["terminal_id"]:
            raise GateError(f"{self._gate_path}: the gate's terminal id is {state['terminal_id']}")
        for name in ("next_terminal_seq", "uploaded"):
            if not isinstance(state.get(name), int) or state[name] < 0:
                raise GateError(f"{self._gate_path}: {name} is not a count")
        return state

    @classmethod
    def existing(cls, directory: Path) -> GateStore:
        """The store a gate left in `directory` (for an upload without the gate's reader and keys)."""
        path = Path(directory) / "gate.json"
        if not path.exists():
            raise GateError(f"{path}: no gate store here")
        state = _read_json(path)
        if not isinstance(state, dict) or not isinstance(state.get("gate_id"), str):
            raise GateError(f"{path}: not a gate store ({STORE_FORMAT})")
        return cls(directory, state["gate_id"])

    def save(self) -> None:
        _write_json(self._gate_path, self.state)

    @property
    def gate_id(self) -> str:
        return str(self.state["gate_id"])

    @property
    def route_id(self) -> str:
        """The line the gate served last (its records' operator is paid for them)."""
        return str(self.state.get("route_id", ""))

    def serve_route(self, route_id: str) -> None:
        if self.state.get("route_id") != route_id:
            self.state["route_id"] = route_id
            self.save()

    @property
    def terminal_id(self) -> bytes:
        return bytes.fromhex(self.state["terminal_id"])

    @property
    def next_terminal_seq(self) -> int:
        return int(self.state["next_terminal_seq"])

    def seq_used(self, terminal_seq: int) -> None:
        """The SAM gave out `terminal_seq`: a restarted gate starts after it (written before the DEBIT)."""
        if terminal_seq + 1 > self.state["next_terminal_seq"]:
            self.state["next_terminal_seq"] = terminal_seq + 1
            self.save()

    # torn taps ----------------------------------------------------------------------------------------

    def torn(self, app_serial: bytes) -> dict[str, Any] | None:
        return self.state["torn"].get(app_serial.hex().upper())

    def keep_torn(self, pending: PendingPurchase, capp_record: bytes, online: bool, result: TapResult) -> None:
        self.state["torn"][pending.app_serial.hex().upper()] = {
            "pending": {name: value.hex() if isinstance(value, bytes) else value
                        for name, value in asdict(pending).items()},
            "capp_record": capp_record.hex(), "online": online, "result": result.to_json()}
        self.save()

    def forget_torn(self, app_serial: bytes) -> None:
        if self.state["torn"].pop(app_serial.hex().upper(), None) is not None:
            self.save()

    # denylist.json ------------------------------------------------------------------------------------

    def _load_denylist(self) -> tuple[int, dict[str, str]]:
        if not self._denylist_path.exists():
            return 0, {}
        obj = _read_json(self._denylist_path)
        try:
            version, cards = int(obj["version"]), dict(obj["cards"])
        except (KeyError, TypeError, ValueError):
            raise GateError(f"{self._denylist_path}: expected {{\"version\": N, \"cards\": {{...}}}}") from None
        return version, {str(card): str(serial).upper() for card, serial in cards.items()}

    def apply_denylist(self, delta: transit_pb2.StreamGateDenylistResponse) -> None:
        with self._lock:
            if delta.since_version != 0 and delta.since_version != self.denylist_version:
                log.warning("denylist delta since %d applied to version %d", delta.since_version,
                            self.denylist_version)
            cards = {} if delta.since_version == 0 else dict(self.denylisted)
            for entry in delta.added:
                cards[entry.card_number] = entry.app_serial.upper()
            for card_number in delta.removed:
                cards.pop(card_number, None)
            _write_json(self._denylist_path, {"version": delta.version, "cards": cards})
            self.denylist_version, self.denylisted = delta.version, cards
            self._serials = None

    def refuses(self, card_number: str, app_serial: bytes) -> bool:
        serials = self._serials
        if serials is None:
            serials = self._serials = frozenset(self.denylisted.values())
        return card_number in self.denylisted or app_serial.hex().upper() in serials

    # records.bin --------------------------------------------------------------------------------------

    def _check_records(self) -> int:
        if not self._records_path.exists():
            return 0
        size = self._records_path.stat().st_size
        whole = size - size % STORE_ENTRY_BYTES
        if whole != size:  # the gate stopped inside one append: that entry was never acknowledged
            log.warning("%s: cutting a partial record of %d bytes", self._records_path, size - whole)
            os.truncate(self._records_path, whole)
        return whole // STORE_ENTRY_BYTES

    def add_record(self, receipt: PurchaseReceipt, *, online: bool) -> None:
        entry = bytes((FLAG_ONLINE if online else FLAG_OFFLINE,)) + pack_record(receipt)
        with open(self._records_path, "ab") as out:
            out.write(entry)
            out.flush()
            os.fsync(out.fileno())
        self._records_count += 1

    def __len__(self) -> int:
        return self._records_count

    def records(self, first: int = 0, count: int | None = None) -> list[StoredRecord]:
        if not self._records_path.exists():
            return []
        with open(self._records_path, "rb") as source:
            source.seek(first * STORE_ENTRY_BYTES)
            raw = source.read(-1 if count is None else count * STORE_ENTRY_BYTES)
        return [StoredRecord(raw[i] == FLAG_ONLINE, raw[i + 1:i + STORE_ENTRY_BYTES])
                for i in range(0, len(raw) - STORE_ENTRY_BYTES + 1, STORE_ENTRY_BYTES)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GateError(f"{path}: cannot be read ({exc})") from None


def _write_json(path: Path, obj: Any) -> None:
    """Whole or not at all: a temporary file, fsync, rename."""
    scratch = path.with_suffix(".tmp")
    with open(scratch, "w", encoding="utf-8") as out:
        json.dump(obj, out, ensure_ascii=False, separators=(",", ":"))
        out.flush()
        os.fsync(out.fileno())
    os.replace(scratch, path)


# -- the SAM, with its transaction number kept in the store ---------------------------------------------


class _KeptSeqSam:
    """The gate's PSAM: each transaction number it gives out is recorded before the DEBIT is sent, and the
    next one is known before a tap (the TapRequest names the chip transaction it will become)."""

    def __init__(self, make_sam: Callable[[int], PurchaseSam], store: GateStore) -> None:
        self._make_sam = make_sam
        self._store = store
        self._sam = make_sam(store.next_terminal_seq)
        self.terminal_id = self._sam.terminal_id

    def rewind_to(self, terminal_seq: int) -> None:
        """Reuse the number of a chip transaction that never happened (a torn DEBIT the card did not do)."""
        self._sam = self._make_sam(terminal_seq)

    def resume(self) -> None:
        self._sam = self._make_sam(self._store.next_terminal_seq)

    def init_for_purchase(self, request: PurchaseRequest) -> PurchaseAuthorization:
        auth = self._sam.init_for_purchase(request)
        self._store.seq_used(auth.terminal_seq)
        return auth

    def check_mac2(self, mac2: bytes) -> None:
        self._sam.check_mac2(mac2)

    def verify_tac(self, fields: TacFields, tac: bytes) -> bool:
        return self._sam.verify_tac(fields, tac)


# -- the Transit service ----------------------------------------------------------------------------------


class TransitLink:
    """The gate's connection to citycard.v1.Transit: one kept-open Taps stream (reopened after a failure),
    the denylist stream and record upload, all with the gate token as bearer metadata."""

    def __init__(self, address: str, token: str, *, decision_timeout_s: float = DECISION_TIMEOUT_S) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.decision_timeout_s = decision_timeout_s
        self._channel = grpc.insecure_channel(address)
        self.stub = transit_pb2_grpc.TransitStub(self._channel)
        self._requests: queue.SimpleQueue[transit_pb2.TapRequest | None] | None = None
        self._answers: queue.SimpleQueue[transit_pb2.TapDecision | grpc.RpcError | None] = queue.SimpleQueue()
        self._stream: Any = None

    def _open_stream(self) -> queue.SimpleQueue[transit_pb2.TapRequest | None]:
        requests: queue.SimpleQueue[transit_pb2.TapRequest | None] = queue.SimpleQueue()
        answers: queue.SimpleQueue[transit_pb2.TapDecision | grpc.RpcError | None] = queue.SimpleQueue()
        self._stream = self.stub.Taps(iter(requests.get, None), metadata=self.metadata)
        threading.Thread(target=_read_decisions, args=(self._stream, answers), daemon=True,
                         name="transit-taps").start()
        self._requests, self._answers = requests, answers
        return requests

    def decide(self, request: transit_pb2.TapRequest) -> transit_pb2.TapDecision:
        """Send a tap on the stream and wait for its decision; GateUnavailable if none comes in time."""
        requests = self._requests or self._open_stream()
        requests.put(request)
        answers = self._answers
        while True:
            try:
                answer = answers.get(timeout=self.decision_timeout_s)
            except queue.Empty:
                self._drop_stream()
                raise GateUnavailable(f"no decision from {self.address} within {self.decision_timeout_s} s") \
                    from None
            if isinstance(answer, transit_pb2.TapDecision):
                if answer.tap_id == request.tap_id:
                    return answer
                continue  # the late answer to a tap already given up on
            self._drop_stream()
            what = f"{answer.code().name}: {answer.details()}" if answer is not None else "stream ended"
            raise GateUnavailable(f"Transit.Taps at {self.address}: {what}")

    def _drop_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
        if self._stream is not None:
            self._stream.cancel()
        self._requests = self._stream = None

    def denylist_since(self, version: int) -> list[transit_pb2.StreamGateDenylistResponse]:
        """The delta since `version` (the stream's first message, without following)."""
        request = transit_pb2.StreamGateDenylistRequest(since_version=version, follow=False)
        try:
            return list(self.stub.StreamDenylist(request, metadata=self.metadata, timeout=DENYLIST_TIMEOUT_S))
        except grpc.RpcError as exc:
            raise GateUnavailable(f"Transit.StreamDenylist at {self.address}: {exc.code().name}: "
                                  f"{exc.details()}") from None

    def follow_denylist(self, since: Callable[[], int], apply: Callable[[Any], None],
                        stop: threading.Event, reconnect_s: float = 2.0) -> None:
        """Apply every delta until `stop` is set, reconnecting from the version last applied."""
        while not stop.is_set():
            stream = self.stub.StreamDenylist(transit_pb2.StreamGateDenylistRequest(
                since_version=since(), follow=True), metadata=self.metadata)
            watcher = threading.Thread(target=_cancel_when, args=(stop, stream), daemon=True)
            watcher.start()
            try:
                for delta in stream:
                    apply(delta)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    log.warning("denylist stream ended (%s); reconnecting", exc.code().name)
            stop.wait(reconnect_s)

    def upload(self, request: transit_pb2.UploadRecordsRequest) -> transit_pb2.UploadRecordsResponse:
        return self.stub.UploadRecords(request, metadata=self.metadata, timeout=UPLOAD_TIMEOUT_S)

    def close(self) -> None:
        self._drop_stream()
        self._channel.close()


def _read_decisions(stream: Iterator[transit_pb2.TapDecision], answers: queue.SimpleQueue[Any]) -> None:
    try:
        for decision in stream:
            answers.put(decision)
    except grpc.RpcError as exc:
        answers.put(exc)
    else:
        answers.put(None)


def _cancel_when(stop: threading.Event, stream: Any) -> None:
    while not stream.done():
        if stop.wait(0.2):
            stream.cancel()
            return


# -- one tap's outcome --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TapResult:
    accepted: bool
    mode: str
    online: bool
    card_number: str = ""
    app_serial: str = ""
    reason: str = ""  # a RefusalReason name without its prefix ("DENYLISTED"), "TORN" or "CARD_ERROR"
    message: str = ""
    fare_fen: int = 0
    held_fen: int = 0
    chip_balance_fen: int | None = None  # after the tap
    ledger_balance_fen: int | None = None  # online: the server's view after the tap
    rider_category_id: str = ""
    fare_product_id: str = ""
    terminal_seq: int | None = None
    card_counter: int | None = None
    tac: str = ""
    recovered: bool = False  # a torn tap settled when the card came back
    decision_micros: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"} | self.extra

    def line(self) -> str:
        """One line for the gate's display and logs."""
        where = "online" if self.online else "offline"
        card = self.card_number or self.app_serial or "card"
        if not self.accepted:
            return f"REFUSED {self.mode} {card} ({where}): {self.reason}{': ' + self.message if self.message else ''}"
        money = f"held {_yuan(self.held_fen)}" if self.mode == Mode.ENTRY else f"fare {_yuan(self.fare_fen)}"
        balance = "" if self.chip_balance_fen is None else f", balance {_yuan(self.chip_balance_fen)}"
        category = f" [{self.rider_category_id}]" if self.rider_category_id and self.rider_category_id != ADULT \
            else ""
        recovered = " (torn tap recovered)" if self.recovered else ""
        return f"OK {self.mode} {card}{category} ({where}): {money}{balance}{recovered}"


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _refusal_name(reason: int) -> str:
    return transit_pb2.RefusalReason.Name(reason).removeprefix("REFUSAL_")


class _CardView(NamedTuple):
    """What the gate read from the card before deciding."""

    card_number: str
    public: PublicData
    category: int
    journey: TransitRecord
    init: PurchaseInit  # the 0-fen probe: balance and offline counter


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- the gate ------------------------------------------------------------------------------------------------


class Gate:
    """One gate: its place in the network, its SAM, its store, and its reader (module docstring).

    `link` is the Transit service for an online gate (None: offline); `fares` decides offline taps.
    `connect` opens the transport to the card in the reader (PcscTransport by default)."""

    def __init__(self, config: GateConfig, *, make_sam: Callable[[int], PurchaseSam], store: GateStore,
                 connect: Callable[[], Transport], fares: FareDecider | None = None,
                 link: TransitLink | None = None, observers: tuple[ApduObserver, ...] = ()) -> None:
        if link is None and fares is None:
            raise GateError("an offline gate needs a fare decision (fares)")
        if store.terminal_id != config.terminal_id:
            raise GateError("the store belongs to another terminal id")
        self.config = config
        self.store = store
        store.serve_route(config.route_id)
        self.sam = _KeptSeqSam(make_sam, store)
        self.connect = connect
        self.fares = fares
        self.link = link
        self.observers = observers
        self._tap_time = clock.now()

    @classmethod
    def open(cls, *, reader: str, gate_id: str, route_id: str, stop_id: str, mode: Mode | str, store_dir: Path,
             master_keys: MasterKeys, terminal_id: bytes | None = None, fares: FareDecider | None = None,
             link: TransitLink | None = None, observers: tuple[ApduObserver, ...] = ()) -> Gate:
        """A gate on a PC/SC reader with a soft SAM over the issuer's master keys."""
        store = GateStore(store_dir, gate_id, terminal_id)
        config = GateConfig(gate_id, route_id, stop_id, Mode(mode), store.terminal_id)
        return cls(config, make_sam=lambda seq: SoftSam(master_keys, store.terminal_id, next_terminal_seq=seq),
                   store=store, connect=lambda: PcscTransport(reader), fares=fares, link=link, observers=observers)

    @property
    def online(self) -> bool:
        return self.link is not None

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    # -- a tap ----------------------------------------------------------------------------------------

    def tap(self) -> TapResult:
        """One tap of the card now in the reader. Never raises for a card or a decision: the result says."""
        self._tap_time = clock.now().replace(microsecond=0)
        try:
            transport = self.connect()
        except TransportError as exc:
            return self._result(False, reason="CARD_ERROR", message=str(exc))
        terminal = Terminal(CardChannel(transport, self.observers), self.sam, clock=lambda: self._tap_time)
        try:
            return self._tap(terminal)
        except _Refused as refused:
            return self._result(False, reason=refused.reason, message=refused.message)
        except (TransportError, StatusWordError, CappError, RecoveryError) as exc:
            return self._result(False, reason="CARD_ERROR", message=f"{type(exc).__name__}: {exc}")
        finally:
            transport.close()

    def _tap(self, terminal: Terminal) -> TapResult:
        view = self._read_card(terminal)
        torn = self.store.torn(view.public.app_serial)
        if torn is not None:
            return self._settle_torn(terminal, view, torn)
        if self.link is not None:
            return self._tap_online(terminal, view)
        return self._tap_offline(terminal, view)

    def _read_card(self, terminal: Terminal) -> _CardView:
        send = terminal.channel.send
        send(cmd.select_by_name(SSSE_AID, "SELECT SSSE"))
        raw = send(cmd.read_record(EF05_SFI, CARD_NUMBER.record, ne=CARD_NUMBER.length + 2)).data
        if len(raw) != CARD_NUMBER.length + 2 or raw[0] != CARD_NUMBER.tag:
            raise _Refused("CARD_ERROR", "EF05 record 7 is not a card number")
        card_number = raw[2:].rstrip(b"\x00").decode("ascii", errors="replace")
        fci = send(SELECT_PURSE).data
        public = cmd.parse_fci_public_data(fci)
        capp = send(cmd.read_record_by_tag(CAPP_SFI, CAPP_RECORD_ID, ne=CAPP_RECORD_BYTES)).data
        journey = TransitRecord.decode(capp)
        init = PurchaseInit.parse(send(cmd.initialize_for_capp_purchase(
            PURCHASE_KEY_INDEX, 0, self.sam.terminal_id)).data)
        return _CardView(card_number, public, category_from_fci(fci), journey, init)

    def _tap_online(self, terminal: Terminal, view: _CardView) -> TapResult:
        assert self.link is not None  # _tap took this path because the link is set
        request = self.tap_request(view.card_number, view.init)
        try:
            decision = self.link.decide(request)
        except GateUnavailable as exc:
            if self.fares is not None:  # a gate with its own fares goes on offline, as it would all day
                log.warning("%s; deciding offline", exc)
                return self._tap_offline(terminal, view)
            return self._result(False, view, reason="UNAVAILABLE", message=str(exc))
        common: dict[str, Any] = {"ledger_balance_fen": decision.balance_fen, "decision_micros": decision.decision_micros,
                  "fare_product_id": decision.fare_product_id, "rider_category_id": decision.rider_category_id}
        if not decision.accepted:
            return self._result(False, view, reason=_refusal_name(decision.reason), message=decision.message,
                                **common)
        # What the server booked as this chip transaction: the fare, plus (collected_fen) an earlier journey's
        # missing tap-off the ledger charged while the chip kept the money; at entry only the latter.
        amount = decision.fare_fen
        record = self._transit_record(decision.rider_category_id, decision.held_fen or amount)
        return self._purchase(terminal, view, amount, record, online=True, held_fen=decision.held_fen, **common)

    def _tap_offline(self, terminal: Terminal, view: _CardView) -> TapResult:
        assert self.fares is not None  # Gate.__init__ refuses an offline gate without fares
        if self.store.refuses(view.card_number, view.public.app_serial):
            return self._result(False, view, online=False, reason="DENYLISTED",
                                message=f"on the gate's denylist (version {self.store.denylist_version})")
        today = self._tap_time.strftime("%Y%m%d")
        if not view.public.start_date <= today <= view.public.expiry_date:
            return self._result(False, view, online=False, reason="INVALID",
                                message=f"the e-purse is valid {view.public.start_date}..{view.public.expiry_date}")
        tap = LocalTap(view.card_number, self.config.mode, self.config.route_id, self.config.stop_id, self._tap_time,
                       category_id(view.category), view.init.balance_fen)
        decision = self.fares.decide(view.journey, tap)
        common: dict[str, Any] = {"rider_category_id": decision.rider_category_id, "fare_product_id": decision.fare_product_id}
        if not decision.accepted:
            return self._result(False, view, online=False, reason=_refusal_name(decision.reason),
                                message=decision.message, **common)
        record = self._transit_record(decision.rider_category_id,
                                      decision.held_fen if self.config.mode is Mode.ENTRY else decision.fare_fen)
        return self._purchase(terminal, view, decision.fare_fen, record, online=False, held_fen=decision.held_fen,
                              **common)

    def tap_request(self, card_number: str, init: PurchaseInit) -> transit_pb2.TapRequest:
        """The TapRequest for a card whose 0-fen INITIALIZE answered `init`: it names the chip transaction
        the tap becomes (terminal id, the SAM's next transaction number, the card's offline counter)."""
        seq = self.store.next_terminal_seq
        at = timestamp_pb2.Timestamp()
        at.FromDatetime(self._tap_time.astimezone(dt.UTC))
        return transit_pb2.TapRequest(
            tap_id=f"{self.config.gate_id}:{seq}", card_number=card_number, gate_id=self.config.gate_id,
            route_id=self.config.route_id, stop_id=self.config.stop_id, at=at, mode=self.config.mode.tap_mode,
            terminal_id=self.config.terminal_id.hex().upper(), terminal_seq=seq, card_counter=init.offline_counter,
            chip_balance_fen=init.balance_fen)

    def _transit_record(self, rider_category_id: str, amount_fen: int) -> bytes:
        return TransitRecord(self.config.mode.journey_state, category_code(rider_category_id or ADULT),
                             self._tap_time, self.config.route_id, self.config.stop_id, amount_fen,
                             self.config.terminal_id).encode()

    def _purchase(self, terminal: Terminal, view: _CardView, amount_fen: int, record: bytes, *, online: bool,
                  **details: Any) -> TapResult:
        try:
            receipt = terminal.composite_purchase(amount_fen, record)
        except InsufficientBalance:
            return self._result(False, view, online=online, reason="INSUFFICIENT_BALANCE",
                                message=f"the chip holds {_yuan(view.init.balance_fen)}, the fare is "
                                        f"{_yuan(amount_fen)}", **details)
        except PurchaseInterrupted as torn:
            return self._torn(torn.pending, view, record, online=online, fare_fen=amount_fen, **details)
        if receipt.app_serial != view.public.app_serial:  # another card was put down between the reads
            self.store.add_record(receipt, online=False)
            raise _Refused("CARD_ERROR", "the card changed during the tap; its purchase is kept for upload")
        self.store.add_record(receipt, online=online)
        return self._receipt_result(view, receipt, online=online, **details)

    def _torn(self, pending: PendingPurchase, view: _CardView, record: bytes, *, online: bool,
              **details: Any) -> TapResult:
        """The card left during DEBIT: keep what the gate knew, to settle when the card comes back."""
        self.store.keep_torn(pending, record, online, self._result(True, view, online=online, **details))
        details.pop("fare_fen", None)
        return self._result(False, view, online=online, reason="TORN",
                            message="card removed during the purchase: present it again", **details)

    def _settle_torn(self, terminal: Terminal, view: _CardView, torn: dict[str, Any]) -> TapResult:
        """The card of a torn tap is back: did its DEBIT happen? If not, run the same purchase again."""
        fields = dict(torn["pending"])
        for name in ("app_serial", "terminal_id", "date_time"):
            fields[name] = bytes.fromhex(fields[name])
        pending = PendingPurchase(**fields)
        before, online, record = dict(torn["result"]), bool(torn["online"]), bytes.fromhex(torn["capp_record"])
        details = {name: before[name] for name in ("held_fen", "rider_category_id", "fare_product_id",
                                                   "ledger_balance_fen", "decision_micros")}
        try:
            receipt = terminal.recover_purchase(pending)
        except RecoveryError as exc:  # used at other gates since: its detail records settle it, not this gate
            log.warning("torn tap of %s given up: %s", view.public.app_serial.hex().upper(), exc)
            self.store.forget_torn(pending.app_serial)
            return self._tap_online(terminal, view) if self.link is not None else self._tap_offline(terminal, view)
        if receipt is None:  # nothing happened on the chip: the same chip transaction, again
            self.sam.rewind_to(pending.terminal_seq)
            saved_time, self._tap_time = self._tap_time, _time_of(pending.date_time)
            try:
                receipt = terminal.composite_purchase(pending.amount_fen, record)
            except PurchaseInterrupted as again:
                return self._torn(again.pending, view, record, online=online, fare_fen=pending.amount_fen,
                                  **details)
            finally:
                self._tap_time = saved_time
                self.sam.resume()
        self.store.add_record(receipt, online=online)
        self.store.forget_torn(pending.app_serial)
        return self._receipt_result(view, receipt, online=online, recovered=True, **details)

    def _receipt_result(self, view: _CardView, receipt: PurchaseReceipt, *, online: bool,
                        **details: Any) -> TapResult:
        return TapResult(True, self.config.mode.value, online, view.card_number, receipt.app_serial.hex().upper(),
                         fare_fen=receipt.amount_fen, chip_balance_fen=receipt.balance_after_fen,
                         terminal_seq=receipt.terminal_seq, card_counter=receipt.offline_counter,
                         tac=receipt.tac.hex().upper(), **details)

    def _result(self, accepted: bool, view: _CardView | None = None, *, online: bool | None = None,
                **details: Any) -> TapResult:
        where = self.online if online is None else online
        if view is not None:
            details.setdefault("chip_balance_fen", view.init.balance_fen)
            details.setdefault("card_counter", view.init.offline_counter)
            return TapResult(accepted, self.config.mode.value, where, view.card_number,
                             view.public.app_serial.hex().upper(), **details)
        return TapResult(accepted, self.config.mode.value, where, **details)

    # -- the denylist and the upload --------------------------------------------------------------------

    def sync_denylist(self) -> int:
        """Bring the gate's denylist up to the server's version (online); returns the version."""
        link = self._need_link()
        for delta in link.denylist_since(self.store.denylist_version):
            self.store.apply_denylist(delta)
        return self.store.denylist_version

    def follow_denylist(self, stop: threading.Event) -> threading.Thread:
        """Keep the denylist current in the background until `stop` is set (an online gate's habit)."""
        link = self._need_link()
        thread = threading.Thread(target=link.follow_denylist, name="gate-denylist", daemon=True,
                                  args=(lambda: self.store.denylist_version, self.store.apply_denylist, stop))
        thread.start()
        return thread

    def upload(self, link: TransitLink | None = None,
               batch_max: int = RECORDS_PER_BATCH_MAX) -> list[transit_pb2.UploadRecordsResponse]:
        """Send the records not yet acknowledged (`upload_records`)."""
        return upload_records(self.store, link or self._need_link(), batch_max=batch_max)

    def _need_link(self) -> TransitLink:
        if self.link is None:
            raise GateError("this needs the Transit service (an online gate)")
        return self.link


def _time_of(bcd: bytes) -> dt.datetime:
    return dt.datetime.strptime(bcd.hex(), "%Y%m%d%H%M%S").replace(tzinfo=clock.CITY_ZONE)


def upload_records(store: GateStore, link: TransitLink,
                   batch_max: int = RECORDS_PER_BATCH_MAX) -> list[transit_pb2.UploadRecordsResponse]:
    """Send every record of `store` not yet acknowledged, in batches. A batch (its id and its records) is fixed
    in the store before its first try, so a batch that failed is sent again unchanged, under the same id, by the
    next upload, and the server books nothing twice. Raises GateUnavailable when the server does not answer."""
    if not 1 <= batch_max <= RECORDS_PER_BATCH_MAX:
        raise GateError(f"batch_max: 1..{RECORDS_PER_BATCH_MAX}")
    answers: list[transit_pb2.UploadRecordsResponse] = []
    while True:
        batch = store.state["open_batch"]
        if batch is None:
            first = store.state["uploaded"]
            count = min(len(store) - first, batch_max)
            if count <= 0:
                return answers
            batch = {"batch_id": f"{store.gate_id}-{store.terminal_id.hex().upper()}-{first:010d}",
                     "first": first, "count": count, "route_id": store.route_id}
            store.state["open_batch"] = batch
            store.save()
        stored = store.records(batch["first"], batch["count"])
        request = transit_pb2.UploadRecordsRequest(
            batch_id=batch["batch_id"], gate_id=store.gate_id, route_id=batch["route_id"],
            packed_records=b"".join(record.packed for record in stored))
        try:
            answers.append(link.upload(request))
        except grpc.RpcError as exc:
            gone = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            raise (GateUnavailable if gone else GateError)(
                f"Transit.UploadRecords at {link.address}: {exc.code().name}: {exc.details()}") from None
        store.state["uploaded"] = batch["first"] + batch["count"]
        store.state["open_batch"] = None
        store.save()
