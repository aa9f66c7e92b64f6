"""The front (citycard/server/front.py): the unary CreateTransfers it answers itself must be answered exactly as
grpcio answers it, call for call, and what it passes through must keep HTTP/2's flow control.

- Differential: two real servers, one with the front and one with grpcio alone (``--front grpcio``), built
  the same way, get the same unary calls and streams; every answer (errors listed, status code, message, ErrorInfo, BadRequest)
  must be the same, but for a body that does not parse (INTERNAL from the front, UNKNOWN from grpc.aio).
- Framing grpcio's clients never send (a compressed flag without grpc-encoding, two messages in a unary call,
  none) is sent by a raw HTTP/2 client on the front's own Session, and refused INTERNAL with nothing booked.
- Flow control, in-process: a session that does not consume what arrives holds its sender to the window.
"""

from __future__ import annotations

import base64
import socket
import struct

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_helpers import (
    CALL_TIMEOUT_S,
    add_person_with_card,
    auth,
    citizen_id,
    packed_record,
    purse_manifest,
    register,
    start_server,
)
from grpc_status import rpc_status

from benches import grpc as bench
from citycard.server import front
from citycard.server._h2 import INITIAL_WINDOW_SIZE, Session
from citycard.v1 import cards_pb2, ledger_pb2

C = grpc.StatusCode
METHOD = "/citycard.v1.Ledger/CreateTransfers"


def build_world(server) -> dict:
    """The same world on either server: fresh registries hand out the same card and account ids."""
    card_number = add_person_with_card(server, citizen_id(sequence=222), load_fen=10_000)
    bike = register(server, purse_manifest("bikeshare"))
    other = register(server, purse_manifest("library"))
    card = server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card_number),
                                  metadata=auth(server.operator_token)).card
    return {"server": server, "purse": card.purse_account_id, "settlement": bike.application.accounts[0].id,
            "other": other.application.accounts[0].id, "token": bike.bearer_token}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    native = start_server(tmp_path_factory.mktemp("native"))
    plain = start_server(tmp_path_factory.mktemp("grpcio"), extra=["--front", "grpcio"])
    try:
        yield build_world(native), build_world(plain)
    finally:
        codes = [native.stop(), plain.stop()]  # both, whatever the first says
        assert codes == [0, 0], native.log_text() + plain.log_text()


def transfer(world, transfer_id: str, **fields) -> ledger_pb2.Transfer:
    values = {"id": transfer_id, "debit_account_id": world["purse"], "credit_account_id": world["settlement"],
                  "amount_fen": 150, "ledger": 2, "code": 11}
    values.update(fields)
    return ledger_pb2.Transfer(**values)


def answer(world, request: bytes, metadata) -> tuple:
    """What a call of raw request bytes comes back with, in a form two servers can be compared by."""
    call = world["server"].channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    try:
        reply = ledger_pb2.CreateTransfersResponse.FromString(call(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), error_details(exc)
    return C.OK, [(error.index, error.result) for error in reply.errors]


# Each case: (name, the request's bytes for a world, whose credential: "app", "operator", "none", "basic", "bad").
CASES = [
    ("booked", lambda w: [transfer(w, "b1"), transfer(w, "b2")], "app"),
    ("replayed", lambda w: [transfer(w, "b1")], "app"),
    ("one overdrawn", lambda w: [transfer(w, "b3"), transfer(w, "b4", amount_fen=10**9)], "app"),
    ("bad id", lambda w: [transfer(w, "zz")], "app"),
    ("missing account", lambda w: [transfer(w, "b5", credit_account_id="")], "app"),
    ("no transfers", lambda w: [], "app"),
    ("MEDICAL", lambda w: [transfer(w, "b6", ledger=1)], "app"),
    ("a code outside the manifest", lambda w: [transfer(w, "b7", code=99)], "app"),
    ("another application's account", lambda w: [transfer(w, "b8", credit_account_id=w["other"])], "app"),
    ("reserved id", lambda w: [transfer(w, "1" + "0" * 31)], "app"),
    ("over the batch limit", lambda w: [transfer(w, f"{n + 1:x}") for n in range(8190)], "app"),
    ("no credential", lambda w: [transfer(w, "b9")], "none"),
    ("a wrong token", lambda w: [transfer(w, "b9")], "bad"),
    ("not a bearer token", lambda w: [transfer(w, "b9")], "basic"),
    ("the operator may not book", lambda w: [transfer(w, "b9")], "operator"),
]


def credential(world, who: str):
    return {"app": auth(world["token"]), "operator": auth(world["server"].operator_token), "none": (),
            "bad": auth("cc1_not-a-token"), "basic": (("authorization", "Basic abc"),)}[who]


def test_the_front_answers_every_call_as_grpcio_does(twins):
    for name, transfers, who in CASES:
        answers = [answer(world, ledger_pb2.CreateTransfersRequest(transfers=transfers(world)).SerializeToString(),
                          credential(world, who)) for world in twins]
        assert answers[0] == answers[1], name
    # The packed form, and both forms at once.
    for world in twins:
        record = packed_record(id=0xB10, debit_account_id=int(world["purse"], 16),
                               credit_account_id=int(world["settlement"], 16), amount_fen=10, ledger=2, code=11)
        world["packed"] = record
    for name, request in (("packed", lambda w: ledger_pb2.CreateTransfersRequest(packed_transfers=w["packed"])),
                          ("both forms", lambda w: ledger_pb2.CreateTransfersRequest(
                              packed_transfers=w["packed"], transfers=[transfer(w, "b11")]))):
        answers = [answer(world, request(world).SerializeToString(), credential(world, "app")) for world in twins]
        assert answers[0] == answers[1], name
    # What the servers booked is the same too.
    books = [world["server"].ledger().GetAccountTransfers(
        ledger_pb2.GetAccountTransfersRequest(account_id=world["settlement"]), metadata=auth(world["token"]))
        for world in twins]
    assert [(t.id, t.amount_fen) for t in books[0].transfers] == [(t.id, t.amount_fen) for t in books[1].transfers]
    assert len(books[0].transfers) == 4  # b1, b2, b3 and the packed one


def error_details(exc: grpc.RpcError) -> list[str]:
    details = []
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                details.append(str(message))
    return details


def stream_answer(world, requests: list, metadata) -> tuple:
    """What a CreateTransfersStream of ``requests`` comes back with: the answers in order, then the status."""
    answers = []
    try:
        for reply in world["server"].ledger().CreateTransfersStream(iter(requests), metadata=metadata,
                                                                    timeout=CALL_TIMEOUT_S):
            answers.append((reply.request_id, [(error.index, error.result) for error in reply.errors]))
    except grpc.RpcError as exc:
        return answers, exc.code(), exc.details(), error_details(exc)
    return answers, C.OK


def stream_of(world, *requests: list) -> list:
    return [ledger_pb2.CreateTransfersStreamRequest(request_id=100 + n, transfers=transfers)
            for n, transfers in enumerate(requests)]


# Each case: (name, the stream's requests for a world, whose credential).
STREAM_CASES = [
    ("three requests", lambda w: stream_of(w, [transfer(w, "e1")], [transfer(w, "e2"), transfer(w, "e3")],
                                           [transfer(w, "e1")]), "app"),
    ("a bad field in the third", lambda w: stream_of(w, [transfer(w, "e4")], [transfer(w, "e5")],
                                                     [transfer(w, "zz")], [transfer(w, "e6")]), "app"),
    ("MEDICAL in the second", lambda w: stream_of(w, [transfer(w, "e7")], [transfer(w, "e8", ledger=1)]), "app"),
    ("an empty request", lambda w: stream_of(w, [transfer(w, "e9")], []), "app"),
    ("no requests", lambda w: [], "app"),
    ("no credential", lambda w: stream_of(w, [transfer(w, "ea")]), "none"),
    ("the operator may not book", lambda w: stream_of(w, [transfer(w, "ea")]), "operator"),
]


def test_the_front_answers_every_stream_as_grpcio_does(twins):
    for name, requests, who in STREAM_CASES:
        answers = [stream_answer(world, requests(world), credential(world, who)) for world in twins]
        assert answers[0] == answers[1], name
    books = [world["server"].ledger().GetAccountTransfers(
        ledger_pb2.GetAccountTransfersRequest(account_id=world["settlement"]), metadata=auth(world["token"]))
        for world in twins]
    assert [t.id for t in books[0].transfers] == [t.id for t in books[1].transfers]
    assert {"e1", "e2", "e3", "e4", "e5", "e7", "e9"} <= {t.id for t in books[0].transfers}


def test_a_request_that_is_not_a_message_or_too_large_is_refused_by_both(twins):
    # A body that does not parse: INTERNAL from the front, as gRPC's status-code table says for "error parsing
    # request proto"; grpc.aio lets protobuf's DecodeError out as UNKNOWN. The one answer that differs.
    for request in (b"\xff\xff\xff", b"\x0a" + b"\x80" * 6):
        assert [answer(world, request, credential(world, "app"))[0] for world in twins] == [C.INTERNAL, C.UNKNOWN]
    world = twins[0]
    huge = ledger_pb2.CreateTransfersRequest(transfers=[transfer(world, "c1")] * 60_000).SerializeToString()
    assert len(huge) > 4 * 2**20
    assert [answer(w, huge, credential(w, "app"))[0] for w in twins] == [C.RESOURCE_EXHAUSTED] * 2


# -- a raw HTTP/2 client on the front's own Session ------------------------------------------------------------

class RawClient:
    """One HTTP/2 connection, driven by hand: ``call`` sends headers and body and reads until the stream ends;
    ``answers`` holds every stream's response headers and trailers, merged."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_S)
        self.session = Session(self, server=False)
        self.session.settings([])
        self.answers: dict[int, dict[bytes, bytes]] = {}
        self.data = b""
        self.closed: int | None = None

    def call(self, path: bytes, metadata: list[tuple[bytes, bytes]], body: bytes) -> dict[bytes, bytes]:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"citycard"),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers"), *metadata]
        self.data, self.closed = b"", None
        stream_id = self.session.request(headers)
        self.session.send_data(stream_id, body)
        self.session.end_data(stream_id)
        while self.closed is None:
            self.sock.sendall(self.session.output())
            received = self.sock.recv(65536)
            assert received, "the server closed the connection"
            self.session.receive(received)
        return self.answers[stream_id]

    def close(self) -> None:
        self.sock.close()

    def on_headers(self, stream_id, headers, end_stream):
        self.answers.setdefault(stream_id, {}).update(headers)

    def on_data(self, stream_id, data):
        self.data += data
        self.session.consume(stream_id, len(data))

    def on_end_stream(self, stream_id):
        pass

    def on_stream_close(self, stream_id, error_code):
        self.closed = error_code

    def on_data_taken(self, stream_id, size):
        pass


def framed(message: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(message)) + message


def test_framing_grpc_clients_never_send_is_refused_and_books_nothing(twins):
    world = twins[0]
    server = world["server"]
    message = ledger_pb2.CreateTransfersRequest(transfers=[transfer(world, "d1")]).SerializeToString()
    metadata = [(b"authorization", f"Bearer {world['token']}".encode())]
    client = RawClient(server.address)
    try:
        for body in (framed(message, compressed=1), framed(message) * 2, b"", framed(message)[:-1]):
            trailers = client.call(front.HOT_PATH, metadata, body)
            assert trailers[b"grpc-status"] == str(C.INTERNAL.value[0]).encode(), body
            assert client.closed == 0 and client.data == b""
        # The same connection still books a well-formed call, answered with its message and status 0.
        trailers = client.call(front.HOT_PATH, metadata, framed(message))
        assert trailers[b"grpc-status"] == b"0" and trailers[b":status"] == b"200"
        assert client.data == framed(b"")  # an empty CreateTransfersResponse: every transfer booked
        # A client that goes away half-way through a request leaves the server serving.
        client.session.send_data(client.session.request(
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", front.HOT_PATH), (b":authority", b"x"),
             (b"content-type", b"application/grpc")]), framed(message)[:8])
        client.sock.sendall(client.session.output())
    finally:
        client.close()
    found = server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["d1"]),
                                            metadata=auth(server.operator_token))
    assert [t.id for t in found.transfers] == ["d1"]


def test_a_long_stream_passes_through_the_front_in_order(twins):
    server = twins[0]["server"]
    token, debit, credit = bench.register_bench_app(server.address, server.operator_token)  # its own ledger
    requests = [ledger_pb2.CreateTransfersStreamRequest(request_id=r, packed_transfers=b"".join(
        packed_record(id=(0xE << 32) | (r << 16) | n, debit_account_id=int(debit, 16),
                      credit_account_id=int(credit, 16), amount_fen=1, ledger=bench.BENCH_LEDGER, code=1)
        for n in range(8189))) for r in range(24)]  # 24 MiB: many times every window on the way
    answers = list(server.ledger().CreateTransfersStream(iter(requests), metadata=auth(token), timeout=120))
    assert [(a.request_id, list(a.errors)) for a in answers] == [(r, []) for r in range(24)]
    moved = server.ledger().GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=credit),
                                              metadata=auth(token)).balance
    assert moved.credits_posted_fen == 24 * 8189


# -- flow control, in-process ------------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.received = 0
        self.session: Session | None = None

    def on_headers(self, stream_id, headers, end_stream):
        pass

    def on_data(self, stream_id, data):
        self.received += len(data)

    def on_end_stream(self, stream_id):
        pass

    def on_stream_close(self, stream_id, error_code):
        pass

    def on_data_taken(self, stream_id, size):
        pass


def pump(client: Session, server: Session) -> None:
    for _ in range(100):
        out_client, out_server = client.output(), server.output()
        if not out_client and not out_server:
            return
        server.receive(out_client)
        client.receive(out_server)


def test_a_session_holds_its_sender_to_what_it_has_consumed():
    window = 1 << 20
    receiver = Recorder()
    server = Session(receiver, server=True)
    server.settings([(INITIAL_WINDOW_SIZE, window)], connection_window=16 << 20)
    sender = Recorder()
    client = Session(sender, server=False)
    client.settings([])
    stream_id = client.request([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x.Y/Z"),
                                (b":authority", b"x")])
    client.send_data(stream_id, b"\0" * (4 << 20))
    pump(client, server)
    assert receiver.received == window  # not a byte more until some is consumed
    assert client.queued(stream_id) == (4 << 20) - window
    # nghttp2 opens the window once half of it is consumed (one WINDOW_UPDATE, not one per read).
    server.consume(stream_id, 300_000)
    pump(client, server)
    assert receiver.received == window
    server.consume(stream_id, 300_000)
    pump(client, server)
    assert receiver.received == window + 600_000


def test_bytes_that_are_not_http2_close_that_connection_only(twins):
    server = twins[0]["server"]
    host, _, port = server.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_S) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: citycard\r\n\r\n")
        sock.settimeout(CALL_TIMEOUT_S)
        while sock.recv(65536):  # whatever the server says (its SETTINGS), it then closes the connection
            pass
    found = server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["b1"]),
                                            metadata=auth(server.operator_token), timeout=CALL_TIMEOUT_S)
    assert [t.id for t in found.transfers] == ["b1"]


def test_unfinished_requests_hold_at_most_the_connection_window(twins):
    """Bodies still arriving keep the connection's window closed for their bytes, up to HELD_MAX for one
    connection: past it the call whose data does not fit is refused (RESOURCE_EXHAUSTED, REQUEST_DATA_LIMIT),
    which frees its bytes, so a client that never finishes its messages cannot make the server hold more, and
    the window never closes on calls none of which can finish."""
    world = twins[0]
    server = world["server"]
    client = RawClient(server.address)
    streams, piece = 20, 1 << 20
    try:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", front.HOT_PATH), (b":authority", b"x"),
                   (b"content-type", b"application/grpc"),
                   (b"authorization", f"Bearer {world['token']}".encode())]
        ids = []
        for _ in range(streams):
            stream_id = client.session.request(headers)
            client.session.send_data(stream_id, struct.pack(">BI", 0, 2 * piece) + b"\0" * (piece - 5))
            ids.append(stream_id)
        client.sock.settimeout(1.0)
        while True:  # until the server has nothing more to say
            client.sock.sendall(client.session.output())
            try:
                received = client.sock.recv(65536)
            except TimeoutError:
                break
            assert received
            client.session.receive(received)
        refused = [stream_id for stream_id in ids if stream_id in client.answers]
        assert refused, "the server held every unfinished request"
        for stream_id in refused:
            assert client.answers[stream_id][b"grpc-status"] == str(C.RESOURCE_EXHAUSTED.value[0]).encode()
            assert b"REQUEST_DATA_LIMIT" in base64.b64decode(client.answers[stream_id][b"grpc-status-details-bin"]
                                                             + b"==")
        held = sum(piece - client.session.queued(stream_id) for stream_id in ids if stream_id not in refused)
        assert held <= front.HELD_MAX
    finally:
        client.close()
    found = server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["b1"]),
                                            metadata=auth(server.operator_token), timeout=CALL_TIMEOUT_S)
    assert [t.id for t in found.transfers] == ["b1"]
