"""The single writer: one thread owns the Registry (and so the Ledger), and every request that touches it
goes through this thread's bounded queue.

Group commit: transfer requests that wait in the queue together are written as ONE ledger batch (one
LMDB transaction, one fsync), up to the ledger's 8,189 events, and each request gets its own slice of the
results. So many small requests from many connections approach the throughput of one big batch, and no
request is answered before its batch is on disk. The writer never waits to fill a batch: it starts one as
soon as it is free, with whatever is queued; what arrives while a batch is on its way to disk goes into the
next. At low load a request is written at once, alone; under load batches grow by themselves.

Rules that keep coalescing invisible to callers:

- Requests are taken in arrival order; a batch ends at a call job (a look-up or a registry operation),
  so a caller always reads its own writes.
- A request whose last transfer is ``linked`` (an open chain, which the ledger fails as
  LINKED_EVENT_CHAIN_OPEN) ends its batch, so the chain can never run on into another caller's transfers.
- A request whose deadline has passed, or whose caller has gone, before its batch starts is dropped
  unwritten (DEADLINE_EXCEEDED); once its batch has started it is written, and ids make a retry safe.

Back-pressure: the queue holds at most ``queue_events_max`` events; past that ``submit_transfers`` refuses
at once with RESOURCE_EXHAUSTED instead of growing without bound.

Threads and the GIL: the ledger checks and applies a batch, and LMDB commits it, with the GIL released, so
the event loop keeps reading and checking the next requests meanwhile. The answers of a whole batch go
back to the loop in ONE ``call_soon_threadsafe`` (each call wakes the loop through its self-pipe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from citycard.core import denylist
from citycard.core.records import BATCH_EVENTS_MAX, TransferFlags
from citycard.core.registry import Registry
from citycard.server.errors import DeadlinePassed, Overloaded, ShuttingDown

__all__ = ["QUEUE_EVENTS_MAX", "Writer", "WriterStats"]

QUEUE_EVENTS_MAX = 32 * BATCH_EVENTS_MAX  # about 32 MiB of transfers waiting, at most
CALL_EVENTS = 1  # what a call job counts against the queue
log = logging.getLogger("citycard.server.writer")

# An answer for the loop: the future, and its result or the error it ends with.
_Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


@dataclass(eq=False)
class _Job:
    events: int
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[Any]
    batch: np.ndarray | None = None  # a transfer job
    call: Callable[[Registry], Any] | None = None  # a call job

    @property
    def open_chain(self) -> bool:
        return self.batch is not None and bool(self.batch["flags"][-1] & TransferFlags.LINKED)


@dataclass
class WriterStats:
    batches: int = 0
    transfer_requests: int = 0
    transfers: int = 0
    calls: int = 0
    dropped: int = 0
    refused_full: int = 0
    largest_batch: int = 0
    started_ns: int = field(default_factory=time.monotonic_ns)


class Writer:
    """Owns ``registry`` from ``start`` until ``stop`` returns; asyncio callers use ``transfers`` (or
    ``submit_transfers``) and ``call``."""

    def __init__(self, registry: Registry, loop: asyncio.AbstractEventLoop, *,
                 queue_events_max: int = QUEUE_EVENTS_MAX,
                 on_denylist_version: Callable[[int], None] | None = None) -> None:
        self.registry = registry
        self.stats = WriterStats()
        self._loop = loop
        self._queue_events_max = queue_events_max
        self._queued_events = 0
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._on_denylist_version = on_denylist_version
        self._denylist_version = denylist.current_version(registry.ledger)
        self._thread = threading.Thread(target=self._run, name="citycard-writer", daemon=True)

    # -- the asyncio side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit_transfers(self, batch: np.ndarray, *, deadline: float | None = None) -> asyncio.Future[np.ndarray]:
        """Queue a checked TRANSFER_DTYPE batch; a future of its results, set once its batch is on disk.
        Cancelling the future before its batch starts keeps it from being written. Raises Overloaded or
        ShuttingDown at once (nothing queued)."""
        job = _Job(len(batch), deadline, self._loop.create_future(), batch=batch)
        self._enqueue(job)
        return job.future

    async def transfers(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """Book a checked TRANSFER_DTYPE batch; its results, once the batch it went into is on disk."""
        return await self.submit_transfers(batch, deadline=deadline)

    async def call(self, function: Callable[..., Any], *args: Any, deadline: float | None = None,
                   **kwargs: Any) -> Any:
        """Run ``function(registry, *args, **kwargs)`` on the writer thread, in queue order."""
        job = _Job(CALL_EVENTS, deadline, self._loop.create_future(),
                   call=lambda registry: function(registry, *args, **kwargs))
        self._enqueue(job)
        return await job.future  # a cancelled caller cancels the future, and the writer skips the job

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; nothing was written")
            if self._queued_events + job.events > self._queue_events_max:
                self.stats.refused_full += 1
                raise Overloaded(f"the write queue is full ({self._queued_events} events waiting); "
                                 "back off and retry; nothing was written")
            self._queued_events += job.events
            self._jobs.append(job)
            self._cond.notify()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Refuse new work, finish what is queued, end the thread. True if it ended in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                jobs, answers = self._take()
            if jobs and jobs[0].call is not None:
                answers.append(self._run_call(jobs[0]))
            elif jobs:
                answers.extend(self._run_transfers(jobs))
            self._answer(answers)

    def _take(self) -> tuple[list[_Job], list[_Answer]]:
        """The next unit of work (one call job, or consecutive transfer jobs that fit one ledger batch),
        and the answers for the jobs dropped on the way."""
        taken: list[_Job] = []
        dropped: list[_Answer] = []
        events = 0
        now = time.monotonic()
        while self._jobs:
            job = self._jobs[0]
            if job.call is not None and taken:
                break
            if job.batch is not None and events + job.events > BATCH_EVENTS_MAX:
                break
            self._jobs.popleft()
            self._queued_events -= job.events
            if job.future.cancelled() or (job.deadline is not None and job.deadline <= now):
                self.stats.dropped += 1
                dropped.append((job.future, None, DeadlinePassed(
                    "the deadline passed before the request was written; nothing was written")))
                continue
            taken.append(job)
            events += job.events
            if job.call is not None or job.open_chain:
                break
        return taken, dropped

    def _run_transfers(self, jobs: list[_Job]) -> list[_Answer]:
        batches = [job.batch for job in jobs if job.batch is not None]  # all of them: _take took transfer jobs
        combined = batches[0] if len(batches) == 1 else _joined(batches)
        try:
            results = self.registry.ledger.create_transfers(combined)
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of it
            return [(job.future, None, exc) for job in jobs]
        stats = self.stats
        stats.batches += 1
        stats.transfer_requests += len(jobs)
        stats.transfers += len(combined)
        stats.largest_batch = max(stats.largest_batch, len(combined))
        answers: list[_Answer] = []
        offset = 0
        for job in jobs:
            answers.append((job.future, results[offset:offset + job.events], None))
            offset += job.events
        return answers

    def _run_call(self, job: _Job) -> _Answer:
        self.stats.calls += 1
        try:
            answer: _Answer = (job.future, job.call(self.registry), None)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - the caller gets it as a status
            answer = (job.future, None, exc)
        version = denylist.current_version(self.registry.ledger)
        if version != self._denylist_version:
            self._denylist_version = version
            if self._on_denylist_version is not None:
                self._loop.call_soon_threadsafe(self._on_denylist_version, version)
        return answer

    def _answer(self, answers: list[_Answer]) -> None:
        if not answers:
            return
        try:
            self._loop.call_soon_threadsafe(_settle, answers)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.warning("%d answers arrived after the event loop closed", len(answers))


def _joined(batches: list[np.ndarray]) -> np.ndarray:
    """The batches as one, joined as bytes: numpy concatenates a structured dtype such as TRANSFER_DTYPE
    field by field, record by record, about fifteen times slower than copying the bytes."""
    return np.frombuffer(b"".join([np.ascontiguousarray(batch) for batch in batches]), dtype=batches[0].dtype)


def _settle(answers: list[_Answer]) -> None:
    """On the loop: hand each waiting caller its result or error."""
    for future, result, error in answers:
        if future.done():  # the caller went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
