"""What every servicer shares: authentication, the method table, deadlines and the refusal path.

A handler decorated with ``unary``/``server_streaming`` receives the caller's Principal; whatever it
raises becomes a status in ``errors.to_status`` (the one mapping), is logged with the method, the principal
and the reason, and ends the call. Servicers only translate messages <-> core calls.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from citycard.server.auth import Authenticator, Principal, require
from citycard.server.errors import classify, to_status
from citycard.server.writer import Writer

__all__ = ["Services", "deadline_of", "refusal", "refuse", "server_streaming", "unary"]

log = logging.getLogger("citycard.server")
T = TypeVar("T")


@dataclass
class Services:
    """What the servicers share: the single writer and the authenticator."""

    writer: Writer
    auth: Authenticator


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# Refusals that say "not now" rather than "not this": they come in floods exactly when the server is busiest,
# so they are logged at DEBUG only; the writer counts them (WriterStats.refused_full, .dropped) and the
# count is logged at shutdown. Every other refusal (credentials, scope, bad input) is logged at INFO.
_LOAD_SHEDDING = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNAVAILABLE})


def refusal(method: str, principal: Principal | None, exc: BaseException) -> grpc.Status:
    """The status a refusal ends its call with, logged with the method, the principal and the reason."""
    code, reason = classify(exc)
    level = logging.DEBUG if code in _LOAD_SHEDDING else logging.INFO
    if log.isEnabledFor(level):
        log.log(level, "refused", extra={"method": method, "principal": str(principal) if principal else "-",
                                         "code": code.name, "reason": reason, "detail": str(exc)[:300]})
    return to_status(exc)


async def refuse(context: grpc.aio.ServicerContext, method: str, principal: Principal | None,
                 exc: BaseException) -> None:
    status = refusal(method, principal, exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


def unary(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    def decorate(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(handler)
        async def run(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            principal = None
            try:
                principal = self.services.auth.authenticate(context)
                require(principal, method)
                return await handler(self, request, context, principal)
            except Exception as exc:
                await refuse(context, method, principal, exc)
                raise AssertionError("unreachable: context.abort raises") from exc

        return run

    return decorate


def server_streaming(method: str) -> Callable[[Callable[..., AsyncIterator[T]]], Callable[..., AsyncIterator[T]]]:
    def decorate(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(handler)
        async def run(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
            principal = None
            try:
                principal = self.services.auth.authenticate(context)
                require(principal, method)
                async for response in handler(self, request, context, principal):
                    yield response
            except Exception as exc:  # noqa: BLE001
                await refuse(context, method, principal, exc)

        return run

    return decorate
