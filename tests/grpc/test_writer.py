"""The single writer's group commit, back-pressure and deadlines, driven in-process (no clocks involved:
the writer thread is held on a call job while the queue is filled, so what it does next is certain)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from citycard.core.ledger import accounts_array, transfers_array
from citycard.core.records import BATCH_EVENTS_MAX, AccountKind, TransferFlags, TransferResult
from citycard.core.registry import Registry

from citycard.server.errors import DeadlinePassed, Overloaded
from citycard.server.writer import Writer

LEDGER = 16


@pytest.fixture
def registry(tmp_path):
    registry = Registry.open(tmp_path / "data")
    registry.ledger.register_ledger(LEDGER, "TEST", [(1, 0, 0)])
    registry.ledger.create_accounts(accounts_array(
        [{"id": n, "ledger": LEDGER, "code": AccountKind.OPERATOR_SETTLEMENT} for n in (1, 2)]))
    yield registry
    registry.close()


def batch(first_id: int, count: int, *, linked_last: bool = False) -> np.ndarray:
    rows = [{"id": first_id + n, "debit_account_id": 1, "credit_account_id": 2, "amount": 1, "ledger": LEDGER,
             "code": 1} for n in range(count)]
    if linked_last:
        rows[-1]["flags"] = TransferFlags.LINKED
    return transfers_array(rows)


async def with_writer(registry: Registry, body, **options):
    writer = Writer(registry, asyncio.get_running_loop(), **options)
    writer.start()
    try:
        return await body(writer)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, writer.stop)


def hold(writer: Writer) -> tuple[threading.Event, asyncio.Future]:
    """Keep the writer thread busy on a call job until the event is set."""
    release = threading.Event()
    return release, asyncio.ensure_future(writer.call(lambda registry: release.wait(30)))


async def settle_queue() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_waiting_together_are_written_as_one_batch(registry):
    async def body(writer: Writer):
        release, held = hold(writer)
        await settle_queue()
        bookings = [asyncio.ensure_future(writer.transfers(batch(100 * (n + 1), 10))) for n in range(5)]
        await settle_queue()
        batches_before = writer.stats.batches
        release.set()
        results = await asyncio.gather(*bookings)
        await held
        return results, writer.stats.batches - batches_before

    results, batches = asyncio.run(with_writer(registry, body))
    assert batches == 1
    assert [len(result) for result in results] == [10] * 5
    assert all((result["status"] == 0).all() for result in results)
    assert registry.ledger.balance(2).credits_posted == 50


def test_an_open_chain_ends_its_batch_and_never_joins_the_next_request(registry):
    async def body(writer: Writer):
        release, held = hold(writer)
        await settle_queue()
        first = asyncio.ensure_future(writer.transfers(batch(1000, 3, linked_last=True)))
        second = asyncio.ensure_future(writer.transfers(batch(2000, 2)))
        await settle_queue()
        before = writer.stats.batches
        release.set()
        results = await asyncio.gather(first, second)
        await held
        return results, writer.stats.batches - before

    (first, second), batches = asyncio.run(with_writer(registry, body))
    assert batches == 2
    assert first["status"][-1] == TransferResult.LINKED_EVENT_CHAIN_OPEN
    assert (second["status"] == 0).all()


def test_a_full_queue_refuses_at_once_and_writes_nothing(registry):
    async def body(writer: Writer):
        release, held = hold(writer)
        await settle_queue()
        accepted = asyncio.ensure_future(writer.transfers(batch(3000, 8)))
        await settle_queue()
        with pytest.raises(Overloaded):
            await writer.transfers(batch(4000, 8))
        release.set()
        await accepted
        await held

    asyncio.run(with_writer(registry, body, queue_events_max=10))
    assert registry.ledger.transfer(4000) is None
    assert registry.ledger.transfer(3000) is not None


def test_a_request_whose_deadline_passed_in_the_queue_is_dropped_unwritten(registry):
    async def body(writer: Writer):
        release, held = hold(writer)
        await settle_queue()
        late = asyncio.ensure_future(writer.transfers(batch(5000, 1), deadline=time.monotonic() - 1))
        in_time = asyncio.ensure_future(writer.transfers(batch(6000, 1), deadline=time.monotonic() + 60))
        await settle_queue()
        release.set()
        with pytest.raises(DeadlinePassed):
            await late
        await in_time
        await held
        return writer.stats.dropped

    assert asyncio.run(with_writer(registry, body)) == 1
    assert registry.ledger.transfer(5000) is None
    assert registry.ledger.transfer(6000) is not None


def test_a_caller_that_went_away_is_not_written(registry):
    async def body(writer: Writer):
        release, held = hold(writer)
        await settle_queue()
        gone = asyncio.ensure_future(writer.transfers(batch(7000, 1)))
        await settle_queue()
        gone.cancel()
        await settle_queue()
        release.set()
        await held
        await writer.call(lambda registry: None)  # everything before it is done

    asyncio.run(with_writer(registry, body))
    assert registry.ledger.transfer(7000) is None


def test_a_streams_window_holds_two_full_batches_or_eight_requests():
    from citycard.server.ledger_service import STREAM_WINDOW_EVENTS, STREAM_WINDOW_REQUESTS, _InFlight

    assert STREAM_WINDOW_EVENTS == 2 * BATCH_EVENTS_MAX

    async def body():
        window = _InFlight()
        window.put("first", BATCH_EVENTS_MAX)
        await window.wait_for_room(BATCH_EVENTS_MAX)  # a second full batch still fits
        window.put("second", BATCH_EVENTS_MAX)
        reader = asyncio.ensure_future(window.wait_for_room(1))
        await settle_queue()
        full_at_two_batches = not reader.done()
        assert await window.first() == "first"
        window.done()  # answered: room again
        await settle_queue()
        resumed = reader.done()
        assert await window.first() == "second"
        window.done()
        for n in range(STREAM_WINDOW_REQUESTS):
            await window.wait_for_room(1)
            window.put(n, 1)
        reader = asyncio.ensure_future(window.wait_for_room(1))
        await settle_queue()
        full_at_eight_requests = not reader.done()
        window.done()
        await settle_queue()
        return full_at_two_batches, resumed, full_at_eight_requests, reader.done()

    assert asyncio.run(body()) == (True, True, True, True)


def test_a_cancelled_submission_is_not_written(registry):
    async def body(writer: Writer):
        release, held = hold(writer)
        await settle_queue()
        kept = writer.submit_transfers(batch(8000, 1))
        dropped = writer.submit_transfers(batch(8100, 1))
        dropped.cancel()  # e.g. a stream whose caller went away
        release.set()
        await kept
        await held
        return writer.stats.dropped

    assert asyncio.run(with_writer(registry, body)) == 1
    assert registry.ledger.transfer(8000) is not None
    assert registry.ledger.transfer(8100) is None
