"""The server's public port: HTTP/2 on the event loop itself, answering the Ledger's two write paths (the unary
CreateTransfers and the CreateTransfersStream) at once and handing every other call, unchanged, to grpcio
behind it.

Why: grpcio spends 0.4-0.9 ms of CPU on a unary call, most of it in handing each call between its threads
(its event engine, its poller, the event loop), and on the 2-core reference machine that alone capped the
server near 1,000 unary calls a second. The unary CreateTransfers is what gates and tills send one by one at
rush hour, so it is answered here, on the loop, with the frames parsed by libnghttp2 (``_h2``): the request's
credential, scope and checks are the Ledger service's own (``LedgerService.checked_batch``), the transfers
go to the same group-committing writer, and the answer leaves once its batch is on disk, exactly as grpcio
would have sent it (same message, status codes, ErrorInfo details, deadlines). The stream is answered the way
LedgerService.CreateTransfersStream answers it (in order, the same window of requests in flight, a bad
request ending the stream after the answers before it), without grpcio copying each megabyte request through
its threads. tests/grpc/test_front.py holds both to grpcio's answers, call for call.

Every other call (look-ups, the denylist stream, cards, applications, health, reflection) is proxied stream by
stream to the grpcio server, which listens on an abstract Unix socket only this process names: headers, data
and trailers pass through as they are, flow control holds a fast sender to the pace of the other side, and a
reset on either side resets the other. Each client connection gets its own connection to grpcio, opened with
its first proxied call. The built-in applications skip the front and call grpcio on that socket directly.

The front speaks plaintext HTTP/2 (h2c), as every gRPC client does without TLS. With TLS configured the
server has grpcio serve the port itself, as before (it needs the client certificate for mutual TLS).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

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
from citycard.server.ledger_service import STREAM_WINDOW_EVENTS, STREAM_WINDOW_REQUESTS
from citycard.v1 import common_pb2, ledger_pb2

__all__ = ["HOT_PATH", "Front"]

HOT_PATH = b"/citycard.v1.Ledger/CreateTransfers"
HOT_METHOD = "Ledger.CreateTransfers"
STREAM_PATH = b"/citycard.v1.Ledger/CreateTransfersStream"
STREAM_METHOD = "Ledger.CreateTransfersStream"
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


def _is_grpc(content_type: bytes | None) -> bool:
    """application/grpc, with or without +proto or parameters; not grpc-web (its trailers ride in the body)."""
    return content_type is not None and (content_type == b"application/grpc"
                                         or content_type.startswith((b"application/grpc+", b"application/grpc;")))


def _metadata(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """A call's metadata as grpcio hands it to a servicer: every header but the pseudo-headers."""
    return [(name.decode("latin-1"), value.decode("utf-8", "replace")) for name, value in headers if name[:1] != b":"]


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
        self.metadata = _metadata(headers)
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
        # the connection's window until the call is answered: a connection's unfinished calls never hold more
        # than HELD_MAX between them (past it, this one is refused, which frees its bytes).
        self.conn.session.consume_stream(self.stream_id, len(chunk))
        self.held += len(chunk)
        too_much = self.conn.hold(len(chunk))
        if too_much is not None:
            self._refuse(too_much)
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
        except DecodeError as exc:
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


class _StreamCall:
    """A CreateTransfersStream answered here, as LedgerService.CreateTransfersStream answers it: requests read
    in order while the stream's window has room (STREAM_WINDOW_REQUESTS requests, STREAM_WINDOW_EVENTS
    transfers), each checked and booked through the writer, answered in order; a bad request ends the stream
    with its status once the requests before it are answered. While the window is full nothing more is read
    and the stream's HTTP/2 window stays closed, so a fast sender waits."""

    __slots__ = ("body", "client_done", "conn", "deadline", "events", "finished", "held", "in_flight", "index", "next",
                 "principal", "reading_done", "responded", "stream_id", "unconsumed")

    def __init__(self, conn: _Connection, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.deadline = _deadline(next((value for name, value in headers if name == b"grpc-timeout"), None))
        self.body = bytearray()
        self.unconsumed = 0  # received bytes the stream's window has not been opened for again
        self.held = 0  # received bytes still held against the connection's window (as _UnaryCall.held)
        self.index = 0  # requests read
        self.next: tuple[int, Any] | None = None  # a checked request waiting for room: (request_id, batch)
        self.in_flight: deque[tuple[int, Any, int]] = deque()  # (request_id, booking or refusal, transfers)
        self.events = 0
        self.responded = False
        self.finished = False
        self.client_done = False  # the client has sent its last request
        self.reading_done = False  # a request was refused: nothing after it is read
        self.principal: Principal | None = None
        try:
            self.principal = conn.front.services.auth.authenticate(_Metadata(_metadata(headers)))
            require(self.principal, STREAM_METHOD)
        except Exception as exc:  # noqa: BLE001 - a refusal ends the call, as in common.refuse
            self._finish(exc)

    def data(self, chunk: bytes) -> None:
        conn = self.conn
        if self.finished or self.reading_done:  # what follows a refused request is never read
            conn.session.consume(self.stream_id, len(chunk))
            return
        self.body += chunk
        self.unconsumed += len(chunk)
        self.held += len(chunk)
        too_much = conn.hold(len(chunk))
        if too_much is not None:
            self._finish(too_much)
            return
        self._read()

    def end(self) -> None:
        self.client_done = True
        if not self.finished:
            self._read()
            self._answer()

    def _read(self) -> None:
        """Take the complete requests in the buffer while there is room; reopen the stream's window unless a
        request is waiting for room."""
        body, limit = self.body, self.conn.front.message_bytes_max
        while not self.finished and not self.reading_done and self.next is None and len(body) >= _MESSAGE_HEADER:
            size = int.from_bytes(body[1:_MESSAGE_HEADER], "big")
            if size > limit:
                self._finish(_TooLarge(f"received message larger than max ({size} vs. {limit})"))
                return
            if len(body) < _MESSAGE_HEADER + size:
                break
            if body[0]:
                self._finish(_ProtocolError("a compressed message without grpc-encoding"))
                return
            raw = bytes(body[_MESSAGE_HEADER:_MESSAGE_HEADER + size])
            del body[:_MESSAGE_HEADER + size]
            self._release(_MESSAGE_HEADER + size)
            try:
                try:
                    request = ledger_pb2.CreateTransfersStreamRequest.FromString(raw)
                except DecodeError as exc:
                    raise _ProtocolError(f"requests[{self.index}] does not parse as a "
                                         "CreateTransfersStreamRequest") from exc
                batch = self.conn.front.ledger.checked_batch(request, self.principal, f"requests[{self.index}].")
            except Exception as exc:  # noqa: BLE001 - answered in order, then the stream ends
                self._refuse_in_order(exc)
                return
            self.index += 1
            self.next = (request.request_id, batch)
            self._submit()
        if self.next is None and self.unconsumed:
            self.conn.session.consume_stream(self.stream_id, self.unconsumed)
            self.unconsumed = 0

    def _submit(self) -> None:
        """Book the waiting request if the window has room (one request always fits an empty window)."""
        if self.next is None:
            return
        request_id, batch = self.next
        if self.in_flight and (len(self.in_flight) >= STREAM_WINDOW_REQUESTS
                               or self.events + len(batch) > STREAM_WINDOW_EVENTS):
            return
        self.next = None
        try:
            booking = self.conn.front.services.writer.submit_transfers(batch, deadline=self.deadline)
        except Exception as exc:  # noqa: BLE001 - Overloaded, ShuttingDown: in order, as the grpcio path
            self._refuse_in_order(exc)
            return
        self.in_flight.append((request_id, booking, len(batch)))
        self.events += len(batch)
        booking.add_done_callback(self._booked)

    def _refuse_in_order(self, exc: BaseException) -> None:
        """A request refused: nothing after it is read; its status ends the stream after the answers before it."""
        self.in_flight.append((-1, exc, 0))
        self.reading_done = True
        self._release(self.held)
        self.body.clear()
        self._answer()

    def _booked(self, booking: asyncio.Future[Any]) -> None:
        if not self.finished:
            self._answer()
            self.conn.flush()

    def _answer(self) -> None:
        """Answer the requests at the head that are booked, in order; end the stream when it is done."""
        session, room_made = self.conn.session, False
        while self.in_flight and not self.finished:
            request_id, item, events = self.in_flight[0]
            if isinstance(item, BaseException):
                self._finish(item)
                return
            if not item.done():
                break
            error = asyncio.CancelledError() if item.cancelled() else item.exception()
            if error is not None:
                self._finish(error)
                return
            answer = ledger_pb2.CreateTransfersStreamResponse(
                request_id=request_id, errors=errors_from_results(item.result())).SerializeToString()
            if not self.responded:
                self.responded = True
                session.respond(self.stream_id, _RESPONSE_HEADERS, body=True)
            session.send_data(self.stream_id, b"\0" + len(answer).to_bytes(4, "big") + answer)
            self.in_flight.popleft()
            self.events -= events
            room_made = True
        if room_made:
            self._submit()
            self._read()
        if not self.finished and not self.in_flight and self.next is None and self.client_done:
            if self.body:
                self._finish(_ProtocolError("the stream ended inside a message"))
            else:
                self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        """End the stream: status OK (``exc`` None) or the refusal's; bookings not yet started are dropped."""
        self.finished = True
        self._release(self.held)
        for _, item, _ in self.in_flight:
            if isinstance(item, asyncio.Future) and not item.done():
                item.cancel()
        self.in_flight.clear()
        self.next = None
        trailers = _OK_TRAILERS if exc is None else _status_trailers(refusal(STREAM_METHOD, self.principal, exc))
        session = self.conn.session
        if self.responded:
            session.end_data(self.stream_id, trailers)
        else:
            self.responded = True
            session.respond(self.stream_id, _RESPONSE_HEADERS + trailers, body=False)
        if self.unconsumed:
            session.consume_stream(self.stream_id, self.unconsumed)
            self.unconsumed = 0
        self.conn.flush()

    def _release(self, size: int) -> None:
        size = min(size, self.held)
        self.conn.session.consume_connection(size)
        self.conn.held -= size
        self.held -= size

    def taken(self, size: int) -> None:
        pass

    def closed(self, error_code: int) -> None:
        if not self.finished:
            self.finished = True
            for _, item, _ in self.in_flight:
                if isinstance(item, asyncio.Future) and not item.done():
                    item.cancel()  # not yet started: the writer skips it; started: ids make a retry safe
            self.in_flight.clear()
        self._release(self.held)


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


_Call = _UnaryCall | _StreamCall | _ProxiedCall


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

    def hold(self, size: int) -> _TooMuchInFlight | None:
        """Count ``size`` more request bytes held by this connection's calls; the refusal for the call that
        brought them if that passes HELD_MAX (refusing it frees its bytes: the window never closes on calls
        none of which can finish)."""
        self.held += size
        if self.held <= HELD_MAX:
            return None
        return _TooMuchInFlight(f"the connection holds more than {HELD_MAX >> 20} MiB of unfinished requests; "
                                "nothing more of this call was written; retry, or send fewer at once")

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
        if _is_grpc(content_type) and encoding in (None, b"identity"):
            if path == HOT_PATH:
                return _UnaryCall(self, stream_id, headers)
            if path == STREAM_PATH:
                return _StreamCall(self, stream_id, headers)
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
