"""Group commit for the medical application: the bookings of concurrent requests go out together.

Each booking is an intent row (written durably *before* its transfers reach the ledger), a chain of linked
transfers, and marking the intent booked after. Done one request at a time that is one fsync'ed SQLite
commit, one ``CreateTransfers`` round trip to the core (which waits for the core's own group commit) and
one more commit per bill. Here the requests that arrive while a batch is being booked wait, and the next
batch books all of them with **one** SQLite transaction for their intents, **one** ``CreateTransfers``
request carrying every chain (each chain ends unlinked, so chains fail or book independently: the ledger's
rule), and one transaction marking them booked (or dropping the intents the ledger refused).

No thread of its own (leader/follower): a caller whose booking is queued either books the next batch
itself (the leader) or waits until a leader has booked its booking. Recovery is unchanged: an intent is
durable before its transfers are sent, and the transfer ids are the intent's, so ``recover()`` or a resend
finishes whatever a crash interrupted.

Also here: ``AccountLookups``, the same shape for ``LookupAccounts`` (one call for the accounts that
concurrent settlements need).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from citycard.apps.medical.core_client import Booking, CoreClient
from citycard.apps.medical.errors import MedicalError
from citycard.apps.medical.store import Store
from citycard.core.records import LedgerId

from citycard.v1 import ledger_pb2

__all__ = ["AccountLookups", "Booker", "GroupCommit", "ledger_refusal"]

BATCH_JOBS_MAX = 256  # bills per batch; at most 3 transfers each, far below the ledger's 8,189 per request
LOOKUPS_MAX = 1024
REASON_BY_LEDGER_RESULT = {
    "DEBIT_ACCOUNT_FROZEN": ("account_frozen", "the medical personal account is frozen (written loss report)"),
    "EXCEEDS_CREDITS": ("balance_changed", "the personal account balance changed during settlement; try again"),
    "EXCEEDS_REFUNDABLE_AMOUNT": ("exceeds_refundable", "the refund exceeds what is left of the original"),
}

In = TypeVar("In")


@dataclass(eq=False)
class Job(Generic[In]):
    value: In
    result: Any = None
    error: BaseException | None = None
    finished: bool = field(default=False)


class GroupCommit(Generic[In]):
    """Runs ``process(batch)`` for the jobs queued meanwhile; ``process`` sets each job's result or error."""

    def __init__(self, process: Callable[[list[Job[In]]], None], jobs_max: int) -> None:
        self._process = process
        self._jobs_max = jobs_max
        self._queue: list[Job[In]] = []
        self._busy = False
        self._changed = threading.Condition()

    def submit(self, value: In) -> Any:
        job: Job[In] = Job(value)
        with self._changed:
            self._queue.append(job)
            while not job.finished:
                if self._busy:
                    self._changed.wait()
                    continue
                self._busy = True
                batch, self._queue = self._queue[:self._jobs_max], self._queue[self._jobs_max:]
                self._changed.release()
                try:
                    self._run(batch)
                finally:
                    self._changed.acquire()
                    self._busy = False
                    self._changed.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self, batch: list[Job[In]]) -> None:
        try:
            self._process(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiter gets the failure, none hangs
            for job in batch:
                if job.error is None and not job.finished:
                    job.error = exc
        for job in batch:
            job.finished = True


@dataclass(frozen=True)
class Chain:
    """One request's booking: its store table and key, its chain, and its intent row if not written yet."""

    table: str
    key: str
    transfers: Sequence[dict[str, Any]]
    intent: tuple[str, tuple[Any, ...]] | None = None  # INSERT statement and its values


def ledger_refusal(key: str, transfers: Sequence[dict[str, Any]], booking: Booking) -> MedicalError:
    index, result = booking.failure()
    reason, message = REASON_BY_LEDGER_RESULT.get(result, ("ledger_refused", f"the ledger refused: {result}"))
    if result == "EXCEEDS_CREDITS" and 0 <= index < len(transfers) and transfers[index]["ledger"] == LedgerId.PURSE:
        reason, message = "epurse_insufficient", "the e-purse balance does not cover the insured's share"
    return MedicalError(reason, f"{key}: {message} ({result}); nothing was booked")


class Booker:
    """Books requests' chains in groups: intents, one ledger request, marks (module docstring)."""

    def __init__(self, store: Store, core: CoreClient) -> None:
        self.store = store
        self.core = core
        self._group: GroupCommit[Chain] = GroupCommit(self._book, BATCH_JOBS_MAX)

    def book(self, table: str, key: str, transfers: Sequence[dict[str, Any]],
             intent: tuple[str, tuple[Any, ...]] | None = None) -> None:
        """Write the intent (if given), book the chain, mark it booked; MedicalError if the ledger refused
        (the intent is then gone: nothing was booked)."""
        self._group.submit(Chain(table, key, transfers, intent))

    def _book(self, batch: list[Job[Chain]]) -> None:
        with_intent = [job for job in batch if job.value.intent is not None]
        if with_intent:
            with self.store.transaction() as db:  # durable: intents before the ledger sees their transfers
                for job in with_intent:
                    sql, values = job.value.intent  # type: ignore[misc]
                    try:  # a failed statement undoes itself only; the others' intents stay in the transaction
                        db.execute(sql, values)
                    except sqlite3.IntegrityError:
                        job.error = MedicalError("already_exists", f"{job.value.key} was submitted before "
                                                                   "with different content")
        live = [job for job in batch if job.error is None]
        messages: list[ledger_pb2.Transfer] = []
        spans = []
        for job in live:
            chain = job.value.transfers
            spans.append((job, len(messages), len(chain)))
            messages.extend(ledger_pb2.Transfer(**transfer, linked=index < len(chain) - 1)
                            for index, transfer in enumerate(chain))
        booking = self.core.book(messages) if messages else Booking({})
        refused: list[Job[Chain]] = []
        for job, start, count in spans:
            mine = Booking({index - start: result for index, result in booking.errors.items()
                            if start <= index < start + count})
            if not mine.booked and not mine.replayed:
                job.error = ledger_refusal(job.value.key, job.value.transfers, mine)
                refused.append(job)
        if refused:
            with self.store.transaction() as db:
                for job in refused:
                    db.execute(f"DELETE FROM {job.value.table} WHERE key = ? AND status = 'intent'", (job.value.key,))
        with self.store.transaction(durable=False) as db:  # derivable: a resend finds the booking again
            for job in live:
                if job.error is None:
                    db.execute(f"UPDATE {job.value.table} SET status = 'booked' WHERE key = ?", (job.value.key,))


class AccountLookups:
    """``LookupAccounts`` for concurrent settlements, one call per group."""

    def __init__(self, core: CoreClient) -> None:
        self.core = core
        self._group: GroupCommit[str] = GroupCommit(self._lookup, LOOKUPS_MAX)

    def account(self, account_id: str) -> ledger_pb2.Account | None:
        found: ledger_pb2.Account | None = self._group.submit(account_id)
        return found

    def _lookup(self, batch: list[Job[str]]) -> None:
        found = {int(account.id, 16): account for account in self.core.accounts(sorted({job.value for job in batch}))}
        for job in batch:
            job.result = found.get(int(job.value, 16))
