"""The transit application's operations: decide a tap, clear an offline batch, charge missing tap-offs.

One asyncio loop runs them all. A tap is decided from memory (the denylist relay, the card cache, the
rider's fare state, the fare engine) and booked on the core's ledger through the shared stream before the
answer leaves: the gate never opens for money the ledger has not taken. Per card, taps are decided one at
a time (a lock per card); across cards, bookings of many gates share ledger requests (ledger_link.py).

Bookings, by mode (all on PURSE, code PURCHASE, from the card's e-purse account to the operator's):
- board: one transfer of the fare, under the id of the chip transaction the gate is about to make;
- entry: a pending transfer of the maximum fare (the hold), under the entry transaction's id;
- exit: the hold posted with the actual fare (the rest released), or voided when the fare is 0; an exit
  without an open hold is charged as the engine decides (the maximum fare);
- a hold still open after the network's limit is posted in full by the sweeper (the maximum fare).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import grpc
import numpy as np
from citycard.apps.bus import fares, records
from citycard.apps.bus.clearing import (
    RECORD_BYTES,
    ClearingPlan,
    Outcome,
    outcomes_after_booking,
    plan_clearing,
)
from citycard.apps.bus.denylist import DenylistRelay
from citycard.apps.bus.gtfs import FareNetwork
from citycard.apps.bus.ids import app_serial_of_card, card_seq_of_serial, chip_transfer_id
from citycard.apps.bus.ledger_link import LedgerLink, LedgerUnavailable, transfer_record
from citycard.apps.bus.store import BookedTap, OpenHold, Owed, Store
from citycard.core import clock
from citycard.core.records import TRANSFER_DTYPE, TransferCode, TransferFlags, TransferResult
from citycard.core.registry_store import purse_account_id

from citycard.v1 import cards_pb2, cards_pb2_grpc, ledger_pb2, ledger_pb2_grpc, transit_pb2

__all__ = ["TransitError", "TransitService"]

CARD_CACHE_S = 300.0  # a card's state and balance are asked of the core again after this long
ANSWERS_KEPT = 200_000  # recent tap answers, to answer a resent tap the same
HOLD_GRACE_S = 6 * 3600  # the ledger voids a hold nobody resolved this long after the network's limit
SWEEP_S = 5.0
NUMBER_MAX = 64
MODE_NAMES = {transit_pb2.TAP_MODE_BOARD: "board", transit_pb2.TAP_MODE_ENTRY: "entry",
              transit_pb2.TAP_MODE_EXIT: "exit"}
_LOW64 = (1 << 64) - 1
_SERIAL_SEQ = slice(3, 10)  # the application serial's 14 BCD digits after the region: the card sequence
REFUSAL_OF_ENGINE = {fares.Refusal.NO_FARE: transit_pb2.REFUSAL_NO_FARE,
                     fares.Refusal.ALREADY_ENTERED: transit_pb2.REFUSAL_ALREADY_ENTERED,
                     fares.Refusal.INVALID: transit_pb2.REFUSAL_INVALID}
log = logging.getLogger("citycard.apps.bus")
RepeatedOfflineRecords: TypeAlias = Sequence[transit_pb2.OfflineRecord]


class TransitError(Exception):
    """A refused call (not a refused tap): reason is a TransitErrorReason name without TRANSIT_."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


@dataclass
class CardInfo:
    card_number: str
    card_seq: int
    app_serial: str
    purse_account: int
    categories: frozenset[str]
    balance_fen: int
    fetched: float
    state: str


def _refusal(tap_id: str, reason: int, message: str) -> transit_pb2.TapDecision:
    return transit_pb2.TapDecision(tap_id=tap_id, accepted=False, reason=reason, message=message)


def _settle_hold(transfer_id: int, hold: OpenHold, fare_fen: int, user_data: int) -> np.ndarray:
    """Post a hold with the fare (the rest is released), or void it when the fare is 0."""
    if fare_fen == 0:
        return transfer_record(transfer_id, hold.purse_account, hold.operator_account, 0, TransferCode.PURCHASE,
                               pending_id=hold.hold_id, user_data=user_data, flags=TransferFlags.VOID_PENDING_TRANSFER)
    return transfer_record(transfer_id, hold.purse_account, hold.operator_account, fare_fen, TransferCode.PURCHASE,
                           pending_id=hold.hold_id, user_data=user_data, flags=TransferFlags.POST_PENDING_TRANSFER)


def derived_id(*parts: str) -> int:
    """A deterministic transfer id (120 bits) for a booking that is not a chip transaction (an expired hold)."""
    value = int.from_bytes(hashlib.sha256("\x1f".join(("citycard.transit", *parts)).encode()).digest()[:15], "big")
    return value or 1


class TransitService:
    def __init__(self, network: FareNetwork, link: LedgerLink, relay: DenylistRelay, core: grpc.aio.Channel,
                 metadata: tuple[tuple[str, str], ...], store: Store, operator_accounts: Mapping[str, int],
                 region: int, tac_verifier: Any | None) -> None:
        self.network = network
        self.engine = fares.FareEngine(network)
        self.link = link
        self.relay = relay
        self._cards = cards_pb2_grpc.CardsStub(core)
        self._ledger = ledger_pb2_grpc.LedgerStub(core)
        self._metadata = metadata
        self.store = store
        self.operator_accounts = dict(operator_accounts)
        self.region = region
        self.tac_verifier = tac_verifier  # tac.TacVerifier; None: no issuer key, no offline clearing
        self._card_cache: dict[str, CardInfo] = {}
        self._riders: dict[str, fares.RiderState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._answers: OrderedDict[str, transit_pb2.TapDecision] = OrderedDict()
        self.holds: dict[str, OpenHold] = {hold.card_number: hold for hold in store.holds()}
        self.owed: dict[str, list[Owed]] = {}
        for owed in store.owed():
            self.owed.setdefault(owed.card_number, []).append(owed)
        self.hold_limit_s = network.policy.hold_limit_s
        self._uploading: dict[str, asyncio.Future[None]] = {}  # batch key -> done, while it clears

    # -- taps ------------------------------------------------------------------------------------------------

    async def tap(self, request: transit_pb2.TapRequest, arrived_ns: int) -> transit_pb2.TapDecision:
        key = f"{request.gate_id}/{request.tap_id}"
        answered = self._answers.get(key)
        if answered is not None:
            return answered
        decision = await self._decide(request)
        decision.decision_micros = max(0, (time.perf_counter_ns() - arrived_ns) // 1000)
        if decision.accepted or decision.reason != transit_pb2.REFUSAL_UNAVAILABLE:
            self._answers[key] = decision
            if len(self._answers) > ANSWERS_KEPT:
                self._answers.popitem(last=False)
        return decision

    async def _decide(self, request: transit_pb2.TapRequest) -> transit_pb2.TapDecision:
        problem = self._tap_problem(request)
        if problem:
            return _refusal(request.tap_id, transit_pb2.REFUSAL_INVALID, problem)
        if self.link.broken:
            return _refusal(request.tap_id, transit_pb2.REFUSAL_UNAVAILABLE,
                            "the ledger is not reachable: decide offline and upload the records later")
        if self.relay.is_denied(request.card_number):
            return _refusal(request.tap_id, transit_pb2.REFUSAL_DENYLISTED, "the card is on the denylist")
        card = await self._card(request.card_number)
        if card is None:
            return _refusal(request.tap_id, transit_pb2.REFUSAL_CARD_UNKNOWN, "no such card")
        if card.state != "CARD_STATE_ACTIVE":
            return _refusal(request.tap_id, transit_pb2.REFUSAL_DENYLISTED,
                            f"the card is {card.state.removeprefix('CARD_STATE_').lower()}")
        lock = self._locks.setdefault(card.card_number, asyncio.Lock())
        async with lock:
            return await self._decide_locked(request, card)

    def _tap_problem(self, request: transit_pb2.TapRequest) -> str:
        if not request.tap_id or len(request.tap_id) > NUMBER_MAX:
            return f"tap_id: 1 to {NUMBER_MAX} characters"
        if not request.gate_id or len(request.gate_id) > NUMBER_MAX:
            return f"gate_id: 1 to {NUMBER_MAX} characters"
        if not request.card_number:
            return "card_number: required"
        if request.mode not in MODE_NAMES:
            return "mode: TAP_MODE_BOARD, TAP_MODE_ENTRY or TAP_MODE_EXIT"
        if request.route_id not in self.network.routes:
            return f"route_id: {request.route_id!r} is not a route of the fare network"
        if request.stop_id not in self.network.stop_names:
            return f"stop_id: {request.stop_id!r} is not a stop of the fare network"
        if not request.HasField("at"):
            return "at: required"
        if len(request.terminal_id) != 12 or not _is_hex(request.terminal_id):
            return "terminal_id: 12 hexadecimal digits"
        return ""

    async def _decide_locked(self, request: transit_pb2.TapRequest, card: CardInfo) -> transit_pb2.TapDecision:
        at = request.at.ToDatetime(tzinfo=_dt.UTC).astimezone(clock.CITY_ZONE)
        tap = fares.Tap(card_number=card.card_number, at=at, route_id=request.route_id, stop_id=request.stop_id,
                        mode=MODE_NAMES[request.mode], categories=card.categories)
        state = self._riders.get(card.card_number) or fares.RiderState()
        decision = self.engine.decide(state, tap)
        if decision.outcome is fares.Outcome.REFUSE:
            return _refusal(request.tap_id, REFUSAL_OF_ENGINE.get(decision.refusal, transit_pb2.REFUSAL_NO_FARE),
                            decision.message)
        operator = self.operator_accounts.get(decision.agency_id)
        if operator is None:
            return _refusal(request.tap_id, transit_pb2.REFUSAL_NO_FARE,
                            f"operator {decision.agency_id!r} has no settlement account")
        if decision.expired is not None:  # an earlier journey closed at its maximum: book that first
            refused = await self._book_expiry(card.card_number, decision.expired)
            if refused is not None:
                return _refusal(request.tap_id, transit_pb2.REFUSAL_UNAVAILABLE, refused)
            state = fares.commit(state, decision.expired)
            self._riders[card.card_number] = state
            decision = self.engine.decide(state, tap)
            if decision.outcome is fares.Outcome.REFUSE:
                return _refusal(request.tap_id, REFUSAL_OF_ENGINE.get(decision.refusal, transit_pb2.REFUSAL_NO_FARE),
                                decision.message)
        chip_id = chip_transfer_id(card.card_seq, int(request.terminal_id, 16), request.terminal_seq)
        user_data = (request.card_counter << 32) | request.terminal_seq
        settles = decision.hold_ref if isinstance(decision.hold_ref, OpenHold) else None
        if decision.outcome is fares.Outcome.CHARGE and settles is None and decision.mode == "exit":
            settles = self.holds.get(card.card_number)  # a journey opened before a restart: charge its hold
            if settles is not None:
                decision = replace(decision, fare_fen=settles.amount_fen, held_fen=settles.amount_fen)
        collect = [owed for owed in self.owed.get(card.card_number, ()) if owed.agency_id == decision.agency_id]
        chain, opened = self._booking(decision, card, operator, chip_id, user_data, settles, at, collect)
        collected = sum(owed.amount_fen for owed in collect)
        chip_debit = collected + (0 if decision.outcome is fares.Outcome.HOLD else decision.fare_fen)
        # What the e-purse account loses by this tap (the collected charges are refunded and charged again).
        account_debit = (decision.held_fen if decision.outcome is fares.Outcome.HOLD
                         else decision.fare_fen - (settles.amount_fen if settles else 0))
        if account_debit > card.balance_fen or chip_debit > request.chip_balance_fen:
            return _refusal(request.tap_id, transit_pb2.REFUSAL_INSUFFICIENT_BALANCE,
                            "the e-purse cannot cover " + ("the hold" if decision.outcome is fares.Outcome.HOLD
                                                           else "the fare"))
        if len(chain):
            # Decided: the booking goes to the ledger now, in order behind every earlier tap's, and the answer
            # does not wait for it. The chip transaction it stands for is signed by the chip with its TAC and
            # uploaded by the gate, so a booking lost before it was written is made by the upload (same id).
            booking = asyncio.ensure_future(self.link.book_chain(chain))
            booking.add_done_callback(lambda done, key=f"{request.gate_id}/{request.tap_id}", card=card,
                                      agency=decision.agency_id, amount=chip_debit, chip=chip_id,
                                      settles=settles, records=chain: self._booked(done, key, card, agency, amount,
                                                                                   chip, settles, records))
        self._riders[card.card_number] = fares.commit(state, decision, hold_ref=opened)
        if opened is not None:
            self.holds[card.card_number] = opened
            self.store.open_hold(opened)
        elif settles is not None:
            self.holds.pop(card.card_number, None)
            self.store.close_hold(card.card_number)
        day = clock.today().isoformat()
        for owed in collect:
            self.owed[card.card_number].remove(owed)
            self.store.collected(owed)
            self.store.add_charge(f"collected-{owed.post_id:x}", card.card_number, owed.agency_id, day,
                                  -owed.amount_fen, decision.rider_category_id,
                                  "a missing tap-off's charge, collected on the chip at this tap (the tap carries it)")
        # The hold was taken off the available balance at entry: the exit gives it back and takes the fare.
        card.balance_fen -= account_debit
        answer = transit_pb2.TapDecision(
            tap_id=request.tap_id, accepted=True, fare_fen=chip_debit,
            held_fen=decision.held_fen if decision.outcome is fares.Outcome.HOLD else 0,
            balance_fen=card.balance_fen, fare_product_id=decision.fare_product_id,
            rider_category_id=decision.rider_category_id, discount_fen=decision.discount_fen,
            capped=decision.capped, collected_fen=collected)
        self.store.add_tap(BookedTap(
            key=f"{request.gate_id}/{request.tap_id}", card_number=card.card_number, agency_id=decision.agency_id,
            route_id=request.route_id, day=day, at_ns=request.at.ToNanoseconds(),
            mode=MODE_NAMES[request.mode], fare_fen=chip_debit, held_fen=answer.held_fen,
            discount_fen=decision.discount_fen, rider_category=decision.rider_category_id, capped=decision.capped,
            answer=answer.SerializeToString()))
        return answer

    def _booked(self, done: asyncio.Future[list[int]], key: str, card: CardInfo, agency_id: str, amount_fen: int,
                chip_id: int, settles: OpenHold | None, chain: np.ndarray) -> None:
        """A decided tap's booking came back. Refused (rare: the account was spent elsewhere meanwhile, or the
        hold it settles was lost): a hold that is gone is replaced by a plain transfer of the chip transaction;
        anything else is recorded as unbooked for the settlement, and the gate's upload of the chip's record
        retries it."""
        try:
            results = done.result()
        except LedgerUnavailable as exc:
            reason = f"the ledger did not answer: {exc}"
        else:
            failed = [r for r in results if r not in (0, TransferResult.EXISTS, TransferResult.LINKED_EVENT_FAILED)]
            if not failed:
                return
            if settles is not None and failed[0] == TransferResult.PENDING_TRANSFER_NOT_FOUND and amount_fen:
                retry = transfer_record(chip_id, settles.purse_account, settles.operator_account, amount_fen,
                                        TransferCode.PURCHASE)
                again = asyncio.ensure_future(self.link.book_chain(retry))
                again.add_done_callback(lambda second: self._booked(second, key, card, agency_id, amount_fen,
                                                                    chip_id, None, retry))
                return
            reason = TransferResult(failed[0]).name
        log.error("the booking of tap %s was refused: %s; the gate's upload of its chip record retries it",
                  key, reason)
        self._card_cache.pop(card.card_number, None)  # ask the core for the balance again
        self.store.add_unbooked(key, card.card_number, agency_id, clock.today().isoformat(), amount_fen, reason)

    def _booking(self, decision: fares.FareDecision, card: CardInfo, operator: int, chip_id: int, user_data: int,
                 settles: OpenHold | None, at: _dt.datetime, collect: list[Owed]) -> tuple[np.ndarray, OpenHold | None]:
        """The transfers a decision books, as one linked chain (possibly empty), and the hold it opens.

        A chip transaction is booked as exactly one transfer under its chip id, for the whole amount the chip
        is debited, so its record uploaded later is recognised. That amount includes ``collect``: missing
        tap-offs the ledger charged earlier while the chip kept the money; each of those charges is refunded in
        the same chain, so the rider pays it once, now on the chip too."""
        chain = [transfer_record(derived_id("collected", f"{owed.post_id:x}"), owed.operator_account,
                                 owed.purse_account, owed.amount_fen, TransferCode.REFUND, ref_id=owed.post_id)
                 for owed in collect]
        catch_up = sum(owed.amount_fen for owed in collect)
        opened = None
        if decision.outcome is fares.Outcome.HOLD:
            if catch_up:
                chain.append(transfer_record(chip_id, card.purse_account, operator, catch_up, TransferCode.PURCHASE,
                                             user_data=user_data))
            if decision.held_fen:
                entered_ns = int(at.timestamp()) * 1_000_000_000
                hold_id = derived_id("hold", f"{chip_id:x}")
                opened = OpenHold(card.card_number, hold_id, decision.agency_id, decision.held_fen,
                                  card.purse_account, operator, decision.rider_category_id, entered_ns,
                                  entered_ns + self.hold_limit_s * 1_000_000_000)
                chain.append(transfer_record(hold_id, card.purse_account, operator, decision.held_fen,
                                             TransferCode.PURCHASE, user_data=user_data,
                                             timeout_s=self.hold_limit_s + HOLD_GRACE_S, flags=TransferFlags.PENDING))
        elif settles is not None and not catch_up:
            chain.append(_settle_hold(chip_id, settles, decision.fare_fen, user_data))
        else:
            if settles is not None:  # the chip pays fare and catch-up in one transaction: release the hold
                chain.insert(0, _settle_hold(derived_id("released", f"{settles.hold_id:x}"), settles, 0, 0))
            if decision.fare_fen + catch_up:
                chain.append(transfer_record(chip_id, card.purse_account, operator, decision.fare_fen + catch_up,
                                             TransferCode.PURCHASE, user_data=user_data))
        if not chain:
            return np.zeros(0, dtype=TRANSFER_DTYPE), opened
        records = np.concatenate(chain)
        records["flags"][:-1] |= np.uint16(TransferFlags.LINKED)
        return records, opened

    async def _book_expiry(self, card_number: str, expired: fares.FareDecision) -> str | None:
        """Charge a journey closed at its maximum (its hold, within the caps); None, or why it failed."""
        hold = expired.hold_ref if isinstance(expired.hold_ref, OpenHold) else self.holds.get(card_number)
        if hold is None:
            return None  # a journey whose hold was 0: nothing was held, nothing to post
        post_id = derived_id("expired", f"{hold.hold_id:x}")
        try:
            result = await self.link.book_one(_settle_hold(post_id, hold, expired.fare_fen, 0))
        except LedgerUnavailable as exc:
            return f"the ledger did not answer: {exc}"
        if result not in (0, TransferResult.EXISTS, TransferResult.PENDING_TRANSFER_ALREADY_POSTED):
            return f"the ledger refused the missing tap-off's charge: {TransferResult(result).name}"
        self.holds.pop(card_number, None)
        self.store.close_hold(card_number)
        self.store.add_charge(f"{post_id:x}", card_number, hold.agency_id, clock.today().isoformat(),
                              expired.fare_fen, hold.rider_category, "no tap-off within the time limit")
        cached = self._card_cache.get(card_number)
        if cached is not None:
            cached.balance_fen += hold.amount_fen - expired.fare_fen
        if expired.fare_fen:
            owed = Owed(post_id, card_number, hold.agency_id, expired.fare_fen, hold.purse_account,
                        hold.operator_account)
            self.owed.setdefault(card_number, []).append(owed)
            self.store.add_owed(owed)
        return None

    async def _card(self, card_number: str) -> CardInfo | None:
        cached = self._card_cache.get(card_number)
        if cached is not None and time.monotonic() - cached.fetched < CARD_CACHE_S:
            return cached
        try:
            answer = await self._cards.GetCard(cards_pb2.GetCardRequest(card_number=card_number),
                                               metadata=self._metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise
        found = answer.card
        serial = app_serial_of_card(found.card_id_code)
        seq = card_seq_of_serial(serial)
        account = purse_account_id(seq)
        balance = await self._ledger.GetAccountBalance(
            ledger_pb2.GetAccountBalanceRequest(account_id=f"{account:x}"), metadata=self._metadata, timeout=5)
        info = CardInfo(found.card_number, seq, serial, account, frozenset(found.categories),
                        balance.balance.available_fen, time.monotonic(), cards_pb2.CardState.Name(found.state))
        self._card_cache[card_number] = info
        return info

    def forget_card(self, card_number: str) -> None:
        self._card_cache.pop(card_number, None)

    # -- missing tap-offs ----------------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Charge every journey open longer than the network's limit its maximum fare; how many were charged."""
        now_ns = clock.now_ns()
        now = clock.now()
        charged = 0
        for hold in [h for h in self.holds.values() if h.expires_ns <= now_ns]:
            async with self._locks.setdefault(hold.card_number, asyncio.Lock()):
                if self.holds.get(hold.card_number) is not hold:
                    continue  # the rider tapped off meanwhile
                state = self._riders.get(hold.card_number)
                expired = self.engine.expire(state, now) if state is not None else None
                if expired is None:  # a hold from before a restart: the engine has no journey for it
                    expired = fares.FareDecision(outcome=fares.Outcome.CHARGE, card_number=hold.card_number, at=now,
                                                 mode="expiry", fare_fen=hold.amount_fen, hold_ref=hold)
                failure = await self._book_expiry(hold.card_number, expired)
                if failure is not None:
                    log.error("could not charge a missing tap-off: %s", failure)
                    continue
                if state is not None and expired.next_state is not None:
                    self._riders[hold.card_number] = fares.commit(state, expired)
                charged += 1
        return charged

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                if self.link.broken:
                    await self.link.reopen()
                await self.sweep()
            except Exception:
                log.exception("the missing tap-off sweep failed")

    # -- offline batches -------------------------------------------------------------------------------------------

    async def upload(self, request: transit_pb2.UploadRecordsRequest) -> transit_pb2.UploadRecordsResponse:
        """Clear a batch: checked and planned on a worker thread (the compiled pass releases the GIL), booked
        over the ledger stream, answered once its answer is stored. The loop stays free meanwhile, so one
        upload plans while another books."""
        source = self._records_source(request)
        agency = self._route_agency(request.route_id)
        operator = self.operator_accounts[agency]
        if not request.batch_id or len(request.batch_id) > NUMBER_MAX or "/" in request.batch_id:
            raise TransitError("INVALID", f"batch_id: 1 to {NUMBER_MAX} characters, no '/'", "batch_id")
        if not request.gate_id or len(request.gate_id) > NUMBER_MAX:
            raise TransitError("INVALID", f"gate_id: 1 to {NUMBER_MAX} characters", "gate_id")
        key = f"{request.gate_id}/{request.batch_id}"
        # The same batch sent again while its first upload is still clearing waits for that one's stored
        # answer, so it is answered as a resend (or refused as a conflict), never booked a second time.
        while (running := self._uploading.get(key)) is not None:
            await asyncio.wait({running})
        done = asyncio.get_running_loop().create_future()
        self._uploading[key] = done
        try:
            return await self._clear(key, request, source, agency, operator)
        finally:
            del self._uploading[key]
            done.set_result(None)

    async def _clear(self, key: str, request: transit_pb2.UploadRecordsRequest,
                     source: np.ndarray | RepeatedOfflineRecords, agency: str,
                     operator: int) -> transit_pb2.UploadRecordsResponse:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        planned = await loop.run_in_executor(None, self._plan, key, request.route_id, source, operator)
        if isinstance(planned, transit_pb2.UploadRecordsResponse):
            return planned  # a resend: the stored answer
        batch, digest, plan = planned
        planned_at = time.perf_counter()
        errors = await self.link.book_many(plan.transfers) if len(plan.transfers) else {}
        if self.holds:
            await self._close_journeys_paid_offline(batch, plan, errors)
        booked_at = time.perf_counter()
        response = await loop.run_in_executor(None, self._answer, key, request, agency, batch, digest, plan,
                                              errors)
        log.info("batch %s: %d booked (%d fen), %d already cleared, %d rejected, %d entry records; planned in "
                 "%.1f ms, booked in %.1f ms, answered in %.1f ms", key, response.booked, response.booked_fen,
                 response.already_cleared, response.rejected, plan.entry_only, (planned_at - started) * 1e3,
                 (booked_at - planned_at) * 1e3, (time.perf_counter() - booked_at) * 1e3)
        return response

    def _plan(self, key: str, route_id: str, source: np.ndarray | RepeatedOfflineRecords,
              operator: int) -> tuple[np.ndarray, str, ClearingPlan] | transit_pb2.UploadRecordsResponse:
        """On a worker thread: the records, their digest, the stored answer of a resend, else the plan."""
        batch, malformed = self._records(source)
        digest_of = hashlib.sha256(route_id.encode() + b"\x1f")
        digest_of.update(batch.view(np.uint8).data)  # in place: both sources are contiguous
        digest = digest_of.hexdigest()
        earlier = self.store.batch(key)
        if earlier is not None:
            gate_id, batch_id = key.split("/", 1)
            if earlier[0] != digest:
                raise TransitError("BATCH_CONFLICT", f"batch {batch_id} of gate {gate_id} was uploaded before "
                                   "with other records", "batch_id")
            answer = transit_pb2.UploadRecordsResponse.FromString(earlier[1])
            answer.replayed = True
            return answer
        if self.tac_verifier is None:
            raise TransitError("NOT_CONFIGURED", "offline clearing needs the issuer's TAC master key "
                               "(CITYCARD_CARD_KEYS names the key file); nothing was booked")
        plan = plan_clearing(self.tac_verifier, batch, malformed, region=self.region, operator_account=operator)
        return batch, digest, plan

    def _answer(self, key: str, request: transit_pb2.UploadRecordsRequest, agency: str, batch: np.ndarray,
                digest: str, plan: ClearingPlan, errors: dict[int, int]) -> transit_pb2.UploadRecordsResponse:
        """On a worker thread: the ledger's answers folded in, the response, stored before it is returned
        (a resend is answered from the store)."""
        booked, booked_fen, problems = outcomes_after_booking(plan, errors)
        raw = batch.view(np.uint8).reshape(-1, RECORD_BYTES)
        response = transit_pb2.UploadRecordsResponse(
            batch_id=request.batch_id, booked=booked, booked_fen=booked_fen, entry_only=plan.entry_only,
            already_cleared=sum(1 for outcome, _ in problems.values() if outcome == Outcome.ALREADY_CLEARED))
        response.rejected = len(problems) - response.already_cleared
        rejected = []
        for index in sorted(problems):
            outcome, message = problems[index]
            serial = raw[index, :10].tobytes().hex()
            counter = int.from_bytes(raw[index, 10:12].tobytes(), "big")
            response.problems.append(transit_pb2.RecordProblem(
                index=index, app_serial=serial, card_counter=counter,
                outcome=transit_pb2.RecordOutcome.Value("RECORD_" + outcome), message=message))
            if outcome != Outcome.ALREADY_CLEARED:
                rejected.append((index, serial, counter, outcome, message))
        self.store.add_batch(key, request.gate_id, agency, clock.today().isoformat(), digest, len(raw), booked,
                             booked_fen, response.SerializeToString(), rejected)
        return response

    async def _close_journeys_paid_offline(self, batch: np.ndarray, plan: ClearingPlan,
                                           errors: dict[int, int]) -> None:
        """A journey entered at an online gate and left through an offline one: the chip paid the fare at the
        exit (a composite purchase after the entry), so the ledger's hold is voided, not charged again."""
        raw = batch.view(np.uint8).reshape(-1, RECORD_BYTES)
        booked = np.ones(len(plan.booked_index), dtype=bool)
        booked[list(errors)] = False
        candidates = plan.booked_index[booked]
        candidates = candidates[raw[candidates, 16] == records.TxType.CAPP]
        by_seq = {hold.purse_account & _LOW64: hold for hold in self.holds.values()}
        seqs = records.bcd_column(raw[candidates], _SERIAL_SEQ)  # the card sequence: its purse account's low word
        held = np.isin(seqs, np.fromiter(by_seq, dtype=np.uint64, count=len(by_seq)))
        for record_index, seq in zip(candidates[held].tolist(), seqs[held].tolist(), strict=True):
            hold = by_seq[seq]
            paid_at = _dt.datetime.strptime(raw[record_index, 27:34].tobytes().hex(), "%Y%m%d%H%M%S").replace(
                tzinfo=clock.CITY_ZONE)
            if int(paid_at.timestamp()) * 1_000_000_000 <= hold.entered_ns:
                continue
            async with self._locks.setdefault(hold.card_number, asyncio.Lock()):
                if self.holds.get(hold.card_number) is not hold:
                    continue
                void = _settle_hold(derived_id("paid-offline", f"{hold.hold_id:x}"), hold, 0, 0)
                result = await self.link.book_one(void)
                if result not in (0, TransferResult.EXISTS, TransferResult.PENDING_TRANSFER_ALREADY_VOIDED):
                    log.error("could not release the hold of a journey paid offline: %s", TransferResult(result).name)
                    continue
                self.holds.pop(hold.card_number, None)
                self.store.close_hold(hold.card_number)
                state = self._riders.get(hold.card_number)
                if state is not None and state.journey is not None:
                    self._riders[hold.card_number] = replace(state, journey=None, version=state.version + 1)

    def _records_source(self, request: transit_pb2.UploadRecordsRequest) -> np.ndarray | RepeatedOfflineRecords:
        """The batch's records as sent: packed ones as RECORD_DTYPE in place, messages as they are (converted
        on the worker thread); the checks of its shape, here."""
        packed = request.packed_records  # read once: each read of a bytes field copies it
        if request.records and packed:
            raise TransitError("INVALID", "send records or packed_records, not both", "packed_records")
        if packed:
            try:
                return records.from_packed(packed)
            except records.BatchTooLargeError as exc:
                raise TransitError("BATCH_TOO_LARGE", str(exc), "packed_records") from None
            except records.PackedRecordsError as exc:
                raise TransitError("INVALID", str(exc), "packed_records") from None
        if not request.records:
            raise TransitError("INVALID", "the batch holds no records", "records")
        if len(request.records) > records.RECORDS_MAX:
            raise TransitError("BATCH_TOO_LARGE", f"at most {records.RECORDS_MAX} records per batch", "records")
        return request.records

    @staticmethod
    def _records(source: np.ndarray | RepeatedOfflineRecords) -> tuple[np.ndarray, dict[int, str]]:
        """The batch as RECORD_DTYPE and the first problem of each record already found malformed, by index
        (packed records: none yet, the clearing pass checks them; messages: those records.from_messages found)."""
        if isinstance(source, np.ndarray):
            return source, {}
        batch, validation = records.from_messages(source)
        malformed: dict[int, str] = {}
        for problem in validation.problems:
            malformed.setdefault(problem.index, f"{problem.field} {problem.reason}")
        return batch, malformed

    def _route_agency(self, route_id: str) -> str:
        route = self.network.routes.get(route_id)
        if route is None:
            raise TransitError("NOT_FOUND", f"route_id: {route_id!r} is not a route of the fare network", "route_id")
        return route.agency_id

    # -- settlement ----------------------------------------------------------------------------------------------

    async def settlement(self, agency_id: str, day: _dt.date) -> dict[str, Any]:
        if agency_id not in self.operator_accounts:
            raise TransitError("NOT_FOUND", f"agency_id: no operator {agency_id!r}", "agency_id")
        loop = asyncio.get_running_loop()
        await self.link.drain()  # every decided tap's booking is on the ledger (or recorded as unbooked)
        await asyncio.sleep(0)  # let the last answers' callbacks record what they must
        await loop.run_in_executor(None, self.store.flush)
        summary = await loop.run_in_executor(None, self.store.day_summary, agency_id, day.isoformat())
        received = await self._received(self.operator_accounts[agency_id], day)
        return {"summary": summary, "ledger_received_fen": received}

    async def _received(self, account: int, day: _dt.date) -> int:
        """What the account received over the city day, net: posted credits less posted debits (refunds), as of
        the day's start and end."""
        start = _dt.datetime.combine(day, _dt.time(), clock.CITY_ZONE)
        values = []
        for instant in (start, min(start + _dt.timedelta(days=1), clock.now())):
            request = ledger_pb2.GetAccountBalanceRequest(account_id=f"{account:x}")
            request.as_of.FromDatetime(instant.astimezone(_dt.UTC))
            answer = await self._ledger.GetAccountBalance(request, metadata=self._metadata, timeout=10)
            # Net of refunds (a missing tap-off's charge given back when the chip paid it at a later tap).
            values.append(answer.balance.credits_posted_fen - answer.balance.debits_posted_fen)
        return values[1] - values[0]


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True

