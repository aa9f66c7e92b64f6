"""citycard.v1.Ledger: transfers in (unary and streamed, through the group-committing writer), accounts,
transfers and balances out. Only translation and scope checks live here; the ledger decides everything else."""

from __future__ import annotations

import asyncio
import logging
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
)
from citycard.server.errors import FieldError, NotFound, PermissionDenied
from citycard.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

__all__ = ["STREAM_WINDOW", "LedgerService"]

# Requests of one stream in flight at once; past it the server stops reading the stream, and HTTP/2 flow
# control holds the sender back. Enough to keep the writer's next batch filling while one is on disk.
STREAM_WINDOW = 8
log = logging.getLogger("citycard.server")
_END = object()


class LedgerService(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    def _checked_batch(self, transfers: Any, principal: Principal, field: str = "transfers") -> np.ndarray:
        batch = transfers_from_messages(transfers, field)
        auth.check_transfer_ids(batch, field)
        assert principal.app is not None  # the method table lets only applications book
        auth.check_transfer_scope(principal.app, batch, field)
        return batch

    @unary("Ledger.CreateTransfers")
    async def CreateTransfers(self, request: ledger_pb2.CreateTransfersRequest, context: grpc.aio.ServicerContext,
                              principal: Principal) -> ledger_pb2.CreateTransfersResponse:
        batch = self._checked_batch(request.transfers, principal)
        results = await self.services.writer.transfers(batch, deadline=deadline_of(context))
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
        in_flight: asyncio.Queue[Any] = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, context, principal, in_flight))
        try:
            while True:
                item = await in_flight.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                request_id, booking = item
                results = await booking
                await context.write(ledger_pb2.CreateTransfersStreamResponse(
                    request_id=request_id, errors=errors_from_results(results)))
        except Exception as exc:  # noqa: BLE001 - earlier requests were answered; this one ends the stream
            reader.cancel()
            await refuse(context, method, principal, exc)
        finally:
            reader.cancel()

    async def _read_stream(self, request_iterator: AsyncIterator[ledger_pb2.CreateTransfersStreamRequest],
                           context: grpc.aio.ServicerContext, principal: Principal,
                           in_flight: asyncio.Queue[Any]) -> None:
        writer = self.services.writer
        index = 0
        try:
            async for request in request_iterator:
                batch = self._checked_batch(request.transfers, principal, f"requests[{index}].transfers")
                booking = asyncio.ensure_future(writer.transfers(batch, deadline=deadline_of(context)))
                await in_flight.put((request.request_id, booking))
                index += 1
            await in_flight.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the answering side, in order
            await in_flight.put(exc)

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
