"""citycard.v1.Ledger: transfers in (unary and streamed, through the group-committing writer), accounts,
transfers and balances out. Only translation and scope checks live here; the ledger decides everything else.

The write paths are the server's hot paths, so they stay lean: no log line per request (refusals only),
one vectorised conversion and scope check per request whatever its size, and the writer's future awaited
directly (no task per request)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from citycard.core import clock
from citycard.core.ledger import TIMESTAMP_MAX, u128_value
from citycard.core.records import BATCH_EVENTS_MAX
from citycard.core.registry import Registry
from citycard.server import auth
from citycard.server.auth import Principal
from citycard.server.common import Services, deadline_of, refuse, unary
from citycard.server.convert import (
    account_message,
    balance_message,
    check_batch_size,
    errors_from_results,
    parse_id,
    parse_ids,
    timestamp,
    timestamp_ns,
    transfer_messages,
    transfers_from_messages,
    transfers_from_packed,
)
from citycard.server.errors import FieldError, NotFound, PermissionDenied
from citycard.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

__all__ = ["STREAM_WINDOW_EVENTS", "STREAM_WINDOW_REQUESTS", "LedgerService"]

# How much of one stream may be in flight (read, not yet answered); past either limit the server stops
# reading the stream, and HTTP/2 flow control holds the sender back. Two full batches: one on its way to
# disk while the next fills, so a single busy stream keeps the writer busy.
STREAM_WINDOW_REQUESTS = 8
STREAM_WINDOW_EVENTS = 2 * BATCH_EVENTS_MAX
log = logging.getLogger("citycard.server")
_END = object()

TransfersRequest = ledger_pb2.CreateTransfersRequest | ledger_pb2.CreateTransfersStreamRequest


class LedgerService(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    def checked_batch(self, request: TransfersRequest, principal: Principal, prefix: str = "") -> np.ndarray:
        """The request's transfers (messages or packed) as one checked batch; ``prefix`` names the request
        within a stream (``requests[3].``). The front (front.py) checks its unary calls here too."""
        packed = request.packed_transfers  # read once: each read of a bytes field copies it
        if packed:
            if len(request.transfers):
                raise FieldError(prefix + "packed_transfers", "give transfers or packed_transfers, not both")
            field = prefix + "packed_transfers"
            batch = transfers_from_packed(packed, field)
        else:
            field = prefix + "transfers"
            batch = transfers_from_messages(request.transfers, field)
        auth.check_transfer_ids(batch, field)
        assert principal.app is not None  # the method table lets only applications book
        auth.check_transfer_scope(principal.app, batch, field)
        return batch

    @unary("Ledger.CreateTransfers")
    async def CreateTransfers(self, request: ledger_pb2.CreateTransfersRequest, context: grpc.aio.ServicerContext,
                              principal: Principal) -> ledger_pb2.CreateTransfersResponse:
        batch = self.checked_batch(request, principal)
        results = await self.services.writer.submit_transfers(batch, deadline=deadline_of(context))
        return ledger_pb2.CreateTransfersResponse(errors=errors_from_results(results))

    async def CreateTransfersStream(self, request_iterator: AsyncIterator[ledger_pb2.CreateTransfersStreamRequest],
                                    context: grpc.aio.ServicerContext) -> None:
        """Reads requests in one task and answers them, in order, in this one, so a caller that waits for
        each answer before sending on is served as fast as one that sends many ahead."""
        method = "Ledger.CreateTransfersStream"
        principal = None
        try:
            principal = self.services.auth.authenticate(context)
            auth.require(principal, method)
        except Exception as exc:  # noqa: BLE001
            await refuse(context, method, principal, exc)
        in_flight = _InFlight()
        reader = asyncio.ensure_future(self._read_stream(request_iterator, context, principal, in_flight))
        try:
            while True:
                item = await in_flight.first()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                request_id, booking = item
                results = await booking
                await context.write(ledger_pb2.CreateTransfersStreamResponse(
                    request_id=request_id, errors=errors_from_results(results)))
                in_flight.done()
        except Exception as exc:  # noqa: BLE001 - earlier requests were answered; this one ends the stream
            reader.cancel()
            await refuse(context, method, principal, exc)
        finally:
            reader.cancel()
            in_flight.cancel_bookings()  # a caller gone: what has not started is not written

    async def _read_stream(self, request_iterator: AsyncIterator[ledger_pb2.CreateTransfersStreamRequest],
                           context: grpc.aio.ServicerContext, principal: Principal, in_flight: _InFlight) -> None:
        writer = self.services.writer
        deadline = deadline_of(context)  # the stream's; fixed for the whole call
        index = 0
        try:
            async for request in request_iterator:
                batch = self.checked_batch(request, principal, f"requests[{index}].")
                await in_flight.wait_for_room(len(batch))
                in_flight.put((request.request_id, writer.submit_transfers(batch, deadline=deadline)), len(batch))
                index += 1
            in_flight.put(_END, 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the answering side, in order
            in_flight.put(exc, 0)

    # -- look-ups ----------------------------------------------------------------------------------

    @unary("Ledger.LookupAccounts")
    async def LookupAccounts(self, request: ledger_pb2.LookupAccountsRequest, context: grpc.aio.ServicerContext,
                             principal: Principal) -> ledger_pb2.LookupAccountsResponse:
        check_batch_size(len(request.ids), "ids")
        ids = parse_ids(request.ids, "ids[{}]")
        records = await self.services.writer.call(lambda registry: registry.ledger.lookup_accounts(ids),
                                                  deadline=deadline_of(context))
        if principal.app is not None:
            auth.check_accounts_visible(principal.app, records, "ids")
        return ledger_pb2.LookupAccountsResponse(accounts=[account_message(record) for record in records])

    @unary("Ledger.LookupTransfers")
    async def LookupTransfers(self, request: ledger_pb2.LookupTransfersRequest, context: grpc.aio.ServicerContext,
                              principal: Principal) -> ledger_pb2.LookupTransfersResponse:
        check_batch_size(len(request.ids), "ids")
        ids = parse_ids(request.ids, "ids[{}]")
        records = await self.services.writer.call(lambda registry: registry.ledger.lookup_transfers(ids),
                                                  deadline=deadline_of(context))
        app = principal.app
        if app is not None:
            for record in records:
                if not (app.owns(u128_value(record["debit_account_id"]))
                        or app.owns(u128_value(record["credit_account_id"]))):
                    raise PermissionDenied(f"ids: transfer {u128_value(record['id']):x} is not one of {app.name}'s",
                                           reason=common_pb2.ACCOUNT_OUT_OF_SCOPE, field="ids")
        return ledger_pb2.LookupTransfersResponse(transfers=transfer_messages(records))

    @unary("Ledger.GetAccountTransfers")
    async def GetAccountTransfers(self, request: ledger_pb2.GetAccountTransfersRequest,
                                  context: grpc.aio.ServicerContext,
                                  principal: Principal) -> ledger_pb2.GetAccountTransfersResponse:
        account_id = parse_id(request.account_id, "account_id")
        since_ns = timestamp_ns(request.since, "since") if request.HasField("since") else 0
        until_ns = timestamp_ns(request.until, "until") if request.HasField("until") else TIMESTAMP_MAX
        if since_ns > until_ns:
            raise FieldError("until", "is before since")
        limit = request.limit or BATCH_EVENTS_MAX
        if limit > BATCH_EVENTS_MAX:
            raise FieldError("limit", f"{limit} is over the maximum of {BATCH_EVENTS_MAX}")

        def scan(registry: Registry) -> tuple[np.void | None, np.ndarray]:
            record = registry.ledger.account(account_id)
            if record is None:
                return None, np.empty(0)
            return record, registry.ledger.account_transfers(account_id, since_ns=since_ns, until_ns=until_ns,
                                                             limit=limit)

        record, transfers = await self.services.writer.call(scan, deadline=deadline_of(context))
        self._check_account(principal, account_id, record)
        app = principal.app
        if app is not None and not app.owns(account_id):
            # Another account on the application's ledger (a card's e-purse): only the transfers with
            # the application itself, never what the card did elsewhere.
            transfers = [t for t in transfers if app.owns(u128_value(t["debit_account_id"]))
                         or app.owns(u128_value(t["credit_account_id"]))]
        return ledger_pb2.GetAccountTransfersResponse(transfers=transfer_messages(transfers))

    @unary("Ledger.GetAccountBalance")
    async def GetAccountBalance(self, request: ledger_pb2.GetAccountBalanceRequest,
                                context: grpc.aio.ServicerContext,
                                principal: Principal) -> ledger_pb2.GetAccountBalanceResponse:
        account_id = parse_id(request.account_id, "account_id")
        as_of_ns = timestamp_ns(request.as_of, "as_of") if request.HasField("as_of") else None

        def balance(registry: Registry) -> tuple[np.void | None, Any, int]:
            record = registry.ledger.account(account_id)
            if record is None:
                return None, None, 0
            if as_of_ns is None:
                return record, registry.ledger.balance(account_id), clock.now_ns()
            return record, registry.ledger.balance_at(account_id, as_of_ns), as_of_ns

        record, found, at_ns = await self.services.writer.call(balance, deadline=deadline_of(context))
        self._check_account(principal, account_id, record)
        return ledger_pb2.GetAccountBalanceResponse(
            account_id=f"{account_id:x}", as_of=timestamp(at_ns),
            balance=balance_message(found.debits_pending, found.debits_posted, found.credits_pending,
                                    found.credits_posted))

    @staticmethod
    def _check_account(principal: Principal, account_id: int, record: np.void | None) -> None:
        if record is None:
            raise NotFound(f"no account {account_id:x}", field="account_id")
        if principal.app is not None and not auth.account_visible(principal.app, account_id, int(record["ledger"])):
            raise PermissionDenied(f"account_id: account {account_id:x} is outside the scope of {principal.app.name}",
                                   reason=common_pb2.ACCOUNT_OUT_OF_SCOPE, field="account_id")


class _InFlight:
    """One stream's requests between reading and answering, in order: at most STREAM_WINDOW_REQUESTS of
    them and STREAM_WINDOW_EVENTS transfers (a single request may be larger than what is left)."""

    def __init__(self) -> None:
        self._items: deque[tuple[Any, int]] = deque()
        self._events = 0
        self._item_added = asyncio.Event()
        self._room_made = asyncio.Event()

    def _full(self, events: int) -> bool:
        return bool(self._items) and (len(self._items) >= STREAM_WINDOW_REQUESTS
                                      or self._events + events > STREAM_WINDOW_EVENTS)

    async def wait_for_room(self, events: int) -> None:
        while self._full(events):
            self._room_made.clear()
            await self._room_made.wait()

    def put(self, item: Any, events: int) -> None:
        self._items.append((item, events))
        self._events += events
        self._item_added.set()

    async def first(self) -> Any:
        """The oldest item not yet answered (it stays in until ``done``)."""
        while not self._items:
            self._item_added.clear()
            await self._item_added.wait()
        return self._items[0][0]

    def done(self) -> None:
        _, events = self._items.popleft()
        self._events -= events
        self._room_made.set()

    def cancel_bookings(self) -> None:
        for item, _ in self._items:
            if isinstance(item, tuple):
                item[1].cancel()
