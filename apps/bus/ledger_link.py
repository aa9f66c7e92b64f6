"""The transit application's one stream to the core's Ledger service.

Every fare the application books goes through ``Ledger.CreateTransfersStream`` in the packed form (the
ledger's own 128-byte records, see ledger.proto), with the application's credential, so the core holds it to
the transit manifest: PURSE only, its codes, its operators' accounts.

Taps arrive one by one from many gates; sending each as its own request would cost a round trip and a ledger
commit each. ``book_one`` queues a transfer and a flusher sends whatever is queued as one request as soon as
fewer than ``in_flight_max`` requests are outstanding, so under load many taps share one commit (group
commit, as the core's writer does for its own callers) and when idle a tap goes out at once. Big uploads go
through ``book_many`` in requests of at most 8,189 records. Answers are matched by request id.

Requests go out already encoded (``stream_request``): a request of 8,189 records is 1 MiB, and building it
as a message, then serializing that, copied the megabyte twice more than writing its bytes once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from citycard.core.records import BATCH_EVENTS_MAX, TRANSFER_DTYPE, LedgerId

from citycard.v1 import ledger_pb2

__all__ = ["LedgerLink", "LedgerUnavailable", "stream_request", "transfer_record"]

IN_FLIGHT_MAX = 4
STREAM_METHOD = "/citycard.v1.Ledger/CreateTransfersStream"
# CreateTransfersStreamRequest's fields on the wire: (field number << 3) | wire type
_REQUEST_ID_KEY = bytes(((1 << 3) | 0,))        # request_id = 1, varint
_PACKED_TRANSFERS_KEY = bytes(((3 << 3) | 2,))  # packed_transfers = 3, length-delimited
log = logging.getLogger("citycard.apps.bus")


class LedgerUnavailable(Exception):
    """The core's stream broke or did not answer: what was queued may or may not be booked; resend it (ids are
    idempotency keys)."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def stream_request(request_id: int, records: np.ndarray) -> bytes:
    """A CreateTransfersStreamRequest with ``request_id`` and ``packed_transfers`` (the records' own bytes),
    encoded in one copy of the records (tests/transit/test_ledger_link.py parses it with ledger_pb2)."""
    records = np.ascontiguousarray(records)
    if records.dtype != TRANSFER_DTYPE:
        raise TypeError(f"records must be TRANSFER_DTYPE, not {records.dtype}")
    return b"".join((_REQUEST_ID_KEY, _varint(request_id), _PACKED_TRANSFERS_KEY, _varint(records.nbytes),
                     memoryview(records).cast("B")))


def transfer_record(transfer_id: int, debit: int, credit: int, amount_fen: int, code: int, *,
                    pending_id: int = 0, ref_id: int = 0, user_data: int = 0, timeout_s: int = 0,
                    flags: int = 0) -> np.ndarray:
    """One PURSE transfer as the ledger's packed record (a 1-element TRANSFER_DTYPE array)."""
    record = np.zeros(1, dtype=TRANSFER_DTYPE)
    for name, value in (("id", transfer_id), ("debit_account_id", debit), ("credit_account_id", credit),
                        ("pending_id", pending_id), ("ref_id", ref_id), ("user_data", user_data)):
        record[name] = (value & 0xFFFF_FFFF_FFFF_FFFF, value >> 64)
    record["amount"] = amount_fen
    record["timeout"] = timeout_s
    record["ledger"] = LedgerId.PURSE
    record["code"] = code
    record["flags"] = int(flags)
    return record


class LedgerLink:
    def __init__(self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]], *,
                 in_flight_max: int = IN_FLIGHT_MAX) -> None:
        self._stream = channel.stream_stream(  # requests are sent as the bytes stream_request made
            STREAM_METHOD, request_serializer=None,
            response_deserializer=ledger_pb2.CreateTransfersStreamResponse.FromString)
        self._metadata = tuple(metadata)
        self._in_flight_max = in_flight_max
        self._numbers = itertools.count(1)
        self._queued: deque[tuple[np.ndarray, asyncio.Future[list[int]]]] = deque()
        self._waiting: dict[int, tuple[asyncio.Future[dict[int, int]], int]] = {}
        self._outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._room = asyncio.Condition()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._call: grpc.aio.StreamStreamCall | None = None
        self.requests_sent = 0
        self.transfers_sent = 0
        self.broken = False  # the stream ended: nothing more is booked until reopen()

    async def start(self) -> None:
        self._outgoing = asyncio.Queue()
        self._call = self._stream(self._requests(), metadata=self._metadata)
        self._tasks = [asyncio.create_task(self._read(), name="ledger-read"),
                       asyncio.create_task(self._flush(), name="ledger-flush")]
        self.broken = False

    async def reopen(self) -> None:
        """A new stream after the old one broke (the core restarted, say)."""
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._fail_all("the ledger stream was reopened")
        await self.start()
        log.info("the ledger stream is open again")

    async def close(self) -> None:
        await self._outgoing.put(None)
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._fail_all("the transit application is stopping")

    async def drain(self) -> None:
        """Wait until everything queued so far has been answered by the ledger (a consistent read after it)."""
        while (self._queued or self._waiting) and not self.broken:
            await asyncio.sleep(0.001)

    async def book_one(self, record: np.ndarray) -> int:
        """Book one transfer (a TRANSFER_DTYPE record); its result code, 0 if booked."""
        return (await self.book_chain(record))[0]

    async def book_chain(self, records: np.ndarray) -> list[int]:
        """Book a few transfers that go together (a linked chain: every record but the last has LINKED), sent
        contiguously in one request; the result code of each, 0 if booked."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queued.append((records, future))
        self._wake.set()
        return await future

    async def book_many(self, records: np.ndarray) -> dict[int, int]:
        """Book many transfers in requests of at most 8,189; the result code of each one not booked, by index."""
        results: dict[int, int] = {}
        sends = []
        for start in range(0, len(records), BATCH_EVENTS_MAX):
            sends.append((start, await self._send(records[start:start + BATCH_EVENTS_MAX])))
        for start, waiting in sends:
            for index, result in (await waiting).items():
                results[start + index] = result
        return results

    async def _send(self, records: np.ndarray) -> asyncio.Future[dict[int, int]]:
        async with self._room:
            await self._room.wait_for(lambda: len(self._waiting) < self._in_flight_max)
            number = next(self._numbers)
            future: asyncio.Future[dict[int, int]] = asyncio.get_running_loop().create_future()
            self._waiting[number] = (future, len(records))
        self.requests_sent += 1
        self.transfers_sent += len(records)
        await self._outgoing.put(stream_request(number, records))
        return future

    async def _requests(self) -> AsyncIterator[bytes]:
        while (request := await self._outgoing.get()) is not None:
            yield request

    async def _flush(self) -> None:
        """Send what taps queued, as one request, whenever the stream has room."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                taken: list[tuple[np.ndarray, asyncio.Future[list[int]]]] = []
                size = 0
                while self._queued and size + len(self._queued[0][0]) <= BATCH_EVENTS_MAX:
                    taken.append(self._queued.popleft())
                    size += len(taken[-1][0])
                records = np.concatenate([record for record, _ in taken])
                futures = [(future, len(record)) for record, future in taken]
                try:
                    waiting = await self._send(records)
                except Exception as exc:  # noqa: BLE001 (every queued tap must hear of it)
                    for future, _ in futures:
                        if not future.done():
                            future.set_exception(LedgerUnavailable(str(exc)))
                    continue
                waiting.add_done_callback(lambda done, futures=futures: _settle(done, futures))

    async def _read(self) -> None:
        assert self._call is not None
        try:
            async for response in self._call:
                waiting = self._waiting.pop(response.request_id, None)
                async with self._room:
                    self._room.notify_all()
                if waiting is None:
                    log.error("the ledger answered request %d, which is not waiting", response.request_id)
                    continue
                future, _ = waiting
                if not future.done():
                    future.set_result({error.index: int(error.result) for error in response.errors})
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.error("the ledger stream ended: %s %s", exc.code().name, exc.details())
            self._fail_all(f"the ledger stream ended: {exc.code().name}")
        except asyncio.CancelledError:
            raise
        else:
            self._fail_all("the ledger stream ended")

    def _fail_all(self, why: str) -> None:
        self.broken = True
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(LedgerUnavailable(why))
        self._waiting.clear()
        for _, future in self._queued:
            if not future.done():
                future.set_exception(LedgerUnavailable(why))
        self._queued.clear()


def _settle(done: asyncio.Future[dict[int, int]], futures: list[tuple[asyncio.Future[list[int]], int]]) -> None:
    if done.cancelled() or done.exception() is not None:
        error = done.exception() if not done.cancelled() else LedgerUnavailable("cancelled")
        for future, _ in futures:
            if not future.done():
                future.set_exception(error or LedgerUnavailable("cancelled"))
        return
    errors = done.result()
    start = 0
    for future, count in futures:
        if not future.done():
            future.set_result([errors.get(index, 0) for index in range(start, start + count)])
        start += count
