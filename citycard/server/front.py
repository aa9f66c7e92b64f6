"""The server's public port: HTTP/2 on the event loop itself, answering the unary CreateTransfers at once and
handing every other call, unchanged, to grpcio behind it.

Why: grpcio spends 0.4-0.9 ms of CPU on a unary call, most of it in handing each call between its threads
(its event engine, its poller, the event loop), and on the 2-core reference machine that alone capped the
server near 1,000 unary calls a second. The unary CreateTransfers is what gates and tills send one by one at
rush hour, so it is answered here, on the loop, with the frames parsed by libnghttp2 (``_h2``): the request's
credential, scope and checks are the Ledger service's own (``LedgerService.checked_batch``), the transfers
go to the same group-committing writer, and the answer leaves once its batch is on disk, exactly as grpcio
would have sent it (same message, status codes, ErrorInfo details, deadlines).

Every other call (look-ups, streams, cards, applications, health, reflection) is proxied stream by stream to
the grpcio server, which listens on an abstract Unix socket only this process names: headers, data and
trailers pass through as they are, flow control holds a fast sender to the pace of the other side, and a
reset on either side resets the other. Each client connection gets its own connection to grpcio, opened
with its first proxied call.

The front speaks plaintext HTTP/2 (h2c), as every gRPC client does without TLS. With TLS configured the
server has grpcio serve the port itself, as before (it needs the client certificate for mutual TLS).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from citycard.server._h2 import (
    CANCEL,
    INITIAL_WINDOW_SIZE,
    INTERNAL_ERROR,
    MAX_CONCURRENT_STREAMS,
    H2Error,
    Session,
)
from citycard.server.auth import Principal, require
from citycard.server.common import refusal
from citycard.server.convert import errors_from_results
from citycard.server.errors import ApiError
from citycard.v1 import common_pb2, ledger_pb2

__all__ = ["HOT_PATH", "Front"]

HOT_PATH = b"/citycard.v1.Ledger/CreateTransfers"
HOT_METHOD = "Ledger.CreateTransfers"
STREAM_WINDOW = 1 << 20  # what a peer may send on one stream before we consume it
CONNECTION_WINDOW = 16 << 20
# What the unary calls of one connection may hold between them while their bodies arrive and until they are
# answered (their bytes keep the connection's window closed meanwhile). A call whose data would pass it is
# refused, which frees its bytes: so the window never closes on calls none of which can finish.
HELD_MAX = CONNECTION_WINDOW - STREAM_WINDOW
STREAMS_MAX = 4096  # concurrent streams a client may open on one connection
CLOSE_POLL_S = 0.01
_MESSAGE_HEADER = 5  # gRPC length-prefixed message: compressed flag (1 byte) + length (4 bytes, big-endian)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]
_GRPC_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}
log = logging.getLogger("citycard.server.front")


class _ProtocolError(ApiError):
    """The call broke gRPC's framing (grpcio answers these INTERNAL too)."""

    code = grpc.StatusCode.INTERNAL


class _TooLarge(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class _TooMuchInFlight(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = common_pb2.REQUEST_DATA_LIMIT


def _grpc_message(text: str) -> bytes:
    """grpc-message: UTF-8, percent-encoded outside printable ASCII (gRPC over HTTP/2)."""
    return b"".join(bytes([byte]) if byte in _GRPC_MESSAGE_SAFE else b"%%%02X" % byte for byte in text.encode())


def _status_trailers(status: grpc.Status) -> list[tuple[bytes, bytes]]:
    trailers = [(b"grpc-status", str(status.code.value[0]).encode()), (b"grpc-message", _grpc_message(status.details))]
    for key, value in status.trailing_metadata or ():
        if key.endswith("-bin"):
            trailers.append((key.encode(), base64.b64encode(value).rstrip(b"=")))
        else:
            trailers.append((key.encode(), str(value).encode()))
    return trailers


def _deadline(value: bytes | None) -> float | None:
    """time.monotonic() seconds of a grpc-timeout header ("100m": 100 ms); None without (or unreadable)."""
    if not value or value[-1:] not in _TIMEOUT_UNITS or not value[:-1].isdigit():
        return None
    return time.monotonic() + int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]


class _Metadata:
    """What Authenticator.authenticate reads of a call: its metadata (and no TLS peer: the front is h2c)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.pairs

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


# -- the calls -----------------------------------------------------------------------------------------

class _UnaryCall:
    """A unary CreateTransfers answered here: body collected, checked, booked through the writer, answered
    when its batch is on disk."""

    __slots__ = ("answered", "body", "booking", "conn", "deadline", "held", "metadata", "principal", "stream_id")

    def __init__(self, conn: _Connection, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.metadata = [(name.decode("latin-1"), value.decode("utf-8", "replace"))
                         for name, value in headers if name[:1] != b":"]
        self.deadline = _deadline(next((value for name, value in headers if name == b"grpc-timeout"), None))
        self.body = bytearray()
        self.booking: asyncio.Future[Any] | None = None
        self.answered = False
        self.principal: Principal | None = None
        self.held = 0  # request bytes still counted against the connection's window

    def data(self, chunk: bytes) -> None:
        if self.answered:
            self.conn.session.consume(self.stream_id, len(chunk))
            return
        # The stream may go on sending (a message can be larger than its window), but the bytes keep holding
        # the connection's window until the call is answered: a connection's unfinished requests never hold
        # more than CONNECTION_WINDOW between them.
        conn = self.conn
        conn.session.consume_stream(self.stream_id, len(chunk))
        self.held += len(chunk)
        conn.held += len(chunk)
        if conn.held > HELD_MAX:
            self._refuse(_TooMuchInFlight(f"the connection holds more than {HELD_MAX >> 20} MiB of unfinished "
                                          "requests; nothing was written; retry, or send fewer at once"))
            return
        self.body += chunk
        limit = self.conn.front.message_bytes_max
        if len(self.body) >= _MESSAGE_HEADER:
            size = max(int.from_bytes(self.body[1:_MESSAGE_HEADER], "big"), len(self.body) - _MESSAGE_HEADER)
            if size > limit:
                self._refuse(_TooLarge(f"received message larger than max ({size} vs. {limit})"))

    def end(self) -> None:
        if self.answered:
            return
        try:
            request = self._request()
            front = self.conn.front
            self.principal = principal = front.services.auth.authenticate(_Metadata(self.metadata))
            require(principal, HOT_METHOD)
            batch = front.ledger.checked_batch(request, principal)
            self.booking = booking = front.services.writer.submit_transfers(batch, deadline=self.deadline)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes its status, as in common.unary
            self._refuse(exc)
            return
        booking.add_done_callback(self._booked)

    def _request(self) -> ledger_pb2.CreateTransfersRequest:
        body = self.body
        if len(body) < _MESSAGE_HEADER or len(body) != _MESSAGE_HEADER + int.from_bytes(body[1:5], "big"):
            raise _ProtocolError("a unary call carries exactly one length-prefixed message")
        if body[0]:
            raise _ProtocolError("a compressed message without grpc-encoding")
        try:
            return ledger_pb2.CreateTransfersRequest.FromString(bytes(body[_MESSAGE_HEADER:]))
        except Exception as exc:
            raise _ProtocolError("the request does not parse as a CreateTransfersRequest") from exc

    def _release(self) -> None:
        self.conn.session.consume_connection(self.held)
        self.conn.held -= self.held
        self.held = 0

    def _booked(self, booking: asyncio.Future[Any]) -> None:
        if booking.cancelled() or self.answered:
            return  # the caller went away
        error = booking.exception()
        if error is not None:
            self._refuse(error)
            return
        answer = ledger_pb2.CreateTransfersResponse(errors=errors_from_results(booking.result())).SerializeToString()
        self.answered = True
        self._release()
        session = self.conn.session
        session.respond(self.stream_id, _RESPONSE_HEADERS, body=True)
        session.send_data(self.stream_id, b"\0" + len(answer).to_bytes(4, "big") + answer)
        session.end_data(self.stream_id, _OK_TRAILERS)
        self.conn.flush()

    def _refuse(self, exc: BaseException) -> None:
        self.answered = True
        self._release()
        status = refusal(HOT_METHOD, self.principal, exc)
        self.conn.session.respond(self.stream_id, _RESPONSE_HEADERS + _status_trailers(status), body=False)
        self.conn.flush()

    def taken(self, size: int) -> None:
        pass

    def closed(self, error_code: int) -> None:
        self._release()
        if self.booking is not None and not self.booking.done():
            self.booking.cancel()  # not yet started: the writer skips it; started: ids make a retry safe


class _ProxiedCall:
    """Any other call, passed through to grpcio stream by stream."""

    __slots__ = (
        "conn",
        "down_open",
        "early",
        "early_end",
        "headers",
        "responded",
        "stream_id",
        "unconsumed",
        "up_id",
        "up_open",
        "up_unconsumed",
    )

    def __init__(self, conn: _Connection, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.headers = headers
        self.up_id: int | None = None
        self.early: list[bytes] = []  # request data that came before grpcio's connection was up
        self.early_end = False
        self.responded = False
        self.unconsumed = 0  # request bytes received and not yet passed on (the client's window holds them)
        self.up_unconsumed = 0  # response bytes received from grpcio and not yet passed on
        self.down_open = True
        self.up_open = False
        conn.upstream().open(self)

    # the client's side

    def data(self, chunk: bytes) -> None:
        self.unconsumed += len(chunk)
        if self.up_id is None:
            self.early.append(chunk)
            return
        upstream = self.conn.upstream()
        upstream.session.send_data(self.up_id, chunk)
        upstream.flush()

    def end(self) -> None:
        if self.up_id is None:
            self.early_end = True
            return
        upstream = self.conn.upstream()
        upstream.session.end_data(self.up_id)
        upstream.flush()

    def taken(self, size: int) -> None:
        """``size`` bytes of the response reached the client's connection: let grpcio send that much more."""
        self.up_unconsumed -= size
        if self.up_open and self.up_id is not None:
            upstream = self.conn.upstream()
            upstream.session.consume(self.up_id, size)
            upstream.flush()

    def closed(self, error_code: int) -> None:
        self.down_open = False
        self.conn.session.consume_connection(self.unconsumed)
        self.unconsumed = 0
        if self.up_open and self.up_id is not None:
            upstream = self.conn.upstream()
            upstream.session.reset(self.up_id, CANCEL)
            upstream.flush()

    # grpcio's side

    def started(self, up_id: int) -> None:
        upstream = self.conn.upstream()
        self.up_id, self.up_open = up_id, True
        for chunk in self.early:
            upstream.session.send_data(up_id, chunk)
        self.early = []
        if self.early_end:
            upstream.session.end_data(up_id)

    def up_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if not self.down_open:
            return
        session = self.conn.session
        if not self.responded:
            self.responded = True
            session.respond(self.stream_id, headers, body=not end_stream)  # end_stream: trailers-only
        else:
            session.end_data(self.stream_id, headers)  # the trailers
        self.conn.flush()

    def up_data(self, chunk: bytes) -> None:
        self.up_unconsumed += len(chunk)
        if self.down_open:
            self.conn.session.send_data(self.stream_id, chunk)
            self.conn.flush()

    def up_end(self) -> None:
        if self.down_open:
            self.conn.session.end_data(self.stream_id)
            self.conn.flush()

    def up_taken(self, size: int) -> None:
        """``size`` bytes of the request reached grpcio: let the client send that much more."""
        self.unconsumed -= size
        if self.down_open:
            self.conn.session.consume(self.stream_id, size)
            self.conn.flush()

    def up_closed(self, error_code: int) -> None:
        self.up_open = False
        upstream = self.conn.upstream()
        upstream.session.consume_connection(self.up_unconsumed)
        self.up_unconsumed = 0
        if error_code and self.down_open:
            self.conn.session.reset(self.stream_id, error_code)
            self.conn.flush()


_Call = _UnaryCall | _ProxiedCall


# -- the connections -------------------------------------------------------------------------------------

class _Endpoint(asyncio.Protocol):
    """One HTTP/2 connection's session and transport, and the one rule of driving nghttp2: a session's output
    is never asked for while the same session is inside ``receive`` or ``output`` (its callbacks reach the
    other end of a proxied call, whose callbacks reach back here). Such a flush is only noted, and the
    outer call flushes again before it returns."""

    session: Session

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._busy = False
        self._again = False

    def data_received(self, data: bytes) -> None:
        self._busy = True
        try:
            self.session.receive(data)
        except H2Error as exc:
            self.broken(exc)
            return
        finally:
            self._busy = False
        self.flush()

    def flush(self) -> None:
        if self._busy:
            self._again = True
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._busy = True
        try:
            while True:
                self._again = False
                out = self.session.output()
                if out:
                    transport.write(out)
                if not self._again:
                    break
        except H2Error as exc:
            self.broken(exc)
            return
        finally:
            self._busy = False
        self.flushed()

    def broken(self, exc: Exception) -> None:
        log.info("closing a broken HTTP/2 connection: %s", exc)
        self.close()

    def flushed(self) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Connection(_Endpoint):
    """One client connection."""

    def __init__(self, front: Front) -> None:
        super().__init__()
        self.front = front
        self.session = Session(self, server=True)
        self.calls: dict[int, _Call] = {}
        self.held = 0  # what its unary calls hold of the connection's window (_UnaryCall.held, summed)
        self._upstream: _Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.front.connections.add(self)
        self.session.settings([(MAX_CONCURRENT_STREAMS, STREAMS_MAX), (INITIAL_WINDOW_SIZE, STREAM_WINDOW)],
                              connection_window=CONNECTION_WINDOW)
        self.flush()

    def flushed(self) -> None:
        if not self.session.wants_io() and self.transport is not None:
            self.transport.close()  # after GOAWAY, with every stream done

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None
        for call in list(self.calls.values()):
            call.closed(CANCEL)
        self.calls.clear()
        if self._upstream is not None:
            self._upstream.close()

    def upstream(self) -> _Upstream:
        if self._upstream is None or (self._upstream.closed and not self._upstream.calls):
            self._upstream = _Upstream(self)
        return self._upstream

    # what the session reports

    def on_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        call = self.calls.get(stream_id)
        if call is None:
            call = self.calls[stream_id] = self._new_call(stream_id, headers)
        if end_stream:
            call.end()  # a client's trailers carry nothing gRPC reads: only that the request ended

    def _new_call(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> _Call:
        path = content_type = encoding = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-encoding":
                encoding = value
        if path == HOT_PATH and content_type is not None and content_type.startswith(b"application/grpc") \
                and encoding in (None, b"identity"):
            return _UnaryCall(self, stream_id, headers)
        return _ProxiedCall(self, stream_id, headers)  # grpcio answers everything else, and any oddity

    def on_data(self, stream_id: int, data: bytes) -> None:
        call = self.calls.get(stream_id)
        if call is None:
            self.session.consume(stream_id, len(data))
        else:
            call.data(data)

    def on_end_stream(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.end()

    def on_stream_close(self, stream_id: int, error_code: int) -> None:
        call = self.calls.pop(stream_id, None)
        if call is not None:
            call.closed(error_code)

    def on_data_taken(self, stream_id: int, size: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.taken(size)

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    def goaway(self) -> None:
        self.session.goaway()
        self.flush()


class _Upstream(_Endpoint):
    """The connection to grpcio that one client connection's proxied calls share."""

    def __init__(self, conn: _Connection) -> None:
        super().__init__()
        self.conn = conn
        self.session = Session(self, server=False)
        self.calls: dict[int, _ProxiedCall] = {}
        self.waiting: list[_ProxiedCall] = []
        self.closed = False
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_task(loop.create_unix_connection(lambda: self, conn.front.upstream_path))
        self._connecting.add_done_callback(self._connect_done)

    def _connect_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            log.error("cannot reach the grpcio server: %s", "cancelled" if task.cancelled() else task.exception())
            self._fail_all()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.closed:
            transport.close()
            return
        self.transport = transport
        self.session.settings([(INITIAL_WINDOW_SIZE, STREAM_WINDOW)], connection_window=CONNECTION_WINDOW)
        waiting, self.waiting = self.waiting, []
        for call in waiting:
            self._start(call)
        self.flush()

    def open(self, call: _ProxiedCall) -> None:
        if self.transport is None:
            self.waiting.append(call)
        else:
            self._start(call)
            self.flush()

    def _start(self, call: _ProxiedCall) -> None:
        if not call.down_open:
            return
        up_id = self.session.request(call.headers)
        self.calls[up_id] = call
        call.started(up_id)

    def broken(self, exc: Exception) -> None:
        log.error("the connection to grpcio broke: %s", exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        elif not self._connecting.done():
            self._connecting.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed = True
        self._fail_all()

    def _fail_all(self) -> None:
        calls = list(self.calls.values()) + self.waiting
        self.calls.clear()
        self.waiting = []
        for call in calls:
            if call.down_open:
                self.conn.session.reset(call.stream_id, INTERNAL_ERROR)
        self.conn.flush()

    # what the session reports

    def on_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.up_headers(headers, end_stream)

    def on_data(self, stream_id: int, data: bytes) -> None:
        call = self.calls.get(stream_id)
        if call is None:
            self.session.consume(stream_id, len(data))
        else:
            call.up_data(data)

    def on_end_stream(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.up_end()

    def on_stream_close(self, stream_id: int, error_code: int) -> None:
        call = self.calls.pop(stream_id, None)
        if call is not None:
            call.up_closed(error_code)

    def on_data_taken(self, stream_id: int, size: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.up_taken(size)


# -- the front ---------------------------------------------------------------------------------------------

class Front:
    """Binds the public port (``bind``), serves it (``start``), stops it gracefully (``stop``)."""

    def __init__(self, services: Any, ledger: Any, upstream_path: str, *, message_bytes_max: int) -> None:
        self.services = services
        self.ledger = ledger  # the LedgerService: its checked_batch is the hot path's check
        self.upstream_path = upstream_path  # the grpcio server's Unix socket ("\0name": abstract)
        # the same as a gRPC target, for the server's own applications (they skip the front)
        self.upstream_address = "unix-abstract:" + upstream_path.lstrip("\0")
        self.message_bytes_max = message_bytes_max
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def bind(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port), not yet serving; the port bound."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], _Connection] = lambda: _Connection(self)
        self._server = await loop.create_server(factory, host.strip("[]") or None, port, start_serving=False,
                                                backlog=1024, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def stop(self, grace_s: float) -> None:
        """No new connections or calls; calls in flight get ``grace_s`` to finish, then every connection
        closes."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.goaway()
        deadline = time.monotonic() + grace_s
        while any(conn.has_calls for conn in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(CLOSE_POLL_S)
        for conn in list(self.connections):
            conn.close()
        await self._server.wait_closed()
        self._server = None
