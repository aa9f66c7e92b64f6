"""The transit application's own records, in a SQLite file beside the plugin (not in the core's LMDB).

Money lives on the core's PURSE ledger only. What is kept here is what the settlement file needs and the
ledger does not know: each booked tap with its fare, concession and discount; each uploaded batch with its
answer (so a resend is answered the same without booking); each rejected record with its reason; the holds
of journeys still open (so a restart still charges a missing tap-off).

Taps are written after the ledger booked them, by one writer thread that commits many at a time (the
decision path never waits for SQLite). A crash between the booking and the write loses the row, not the
money: the settlement then shows the difference against the ledger instead of hiding it.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BookedTap", "OpenHold", "Owed", "Store"]

FLUSH_S = 0.02
SCHEMA = """
CREATE TABLE IF NOT EXISTS taps (
    key TEXT PRIMARY KEY,              -- gate id / tap id
    card_number TEXT NOT NULL, agency_id TEXT NOT NULL, route_id TEXT NOT NULL, day TEXT NOT NULL,
    at_ns INTEGER NOT NULL, mode TEXT NOT NULL, fare_fen INTEGER NOT NULL, held_fen INTEGER NOT NULL,
    discount_fen INTEGER NOT NULL, rider_category TEXT NOT NULL, capped INTEGER NOT NULL,
    answer BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS taps_by_day ON taps (agency_id, day);
CREATE TABLE IF NOT EXISTS charges (       -- money posted without a tap: a missing tap-off charged at expiry
    key TEXT PRIMARY KEY, card_number TEXT NOT NULL, agency_id TEXT NOT NULL, day TEXT NOT NULL,
    fare_fen INTEGER NOT NULL, rider_category TEXT NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS charges_by_day ON charges (agency_id, day);
CREATE TABLE IF NOT EXISTS batches (
    key TEXT PRIMARY KEY,              -- gate id / batch id
    gate_id TEXT NOT NULL, agency_id TEXT NOT NULL, day TEXT NOT NULL, digest TEXT NOT NULL,
    records INTEGER NOT NULL, booked INTEGER NOT NULL, booked_fen INTEGER NOT NULL, answer BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_day ON batches (agency_id, day);
CREATE TABLE IF NOT EXISTS rejected (
    batch_key TEXT NOT NULL, idx INTEGER NOT NULL, agency_id TEXT NOT NULL, day TEXT NOT NULL,
    app_serial TEXT NOT NULL, card_counter INTEGER NOT NULL, outcome TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (batch_key, idx));
CREATE INDEX IF NOT EXISTS rejected_by_day ON rejected (agency_id, day);
CREATE TABLE IF NOT EXISTS unbooked (      -- a decided tap whose booking the ledger refused (the upload retries it)
    key TEXT PRIMARY KEY, card_number TEXT NOT NULL, agency_id TEXT NOT NULL, day TEXT NOT NULL,
    amount_fen INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS unbooked_by_day ON unbooked (agency_id, day);
CREATE TABLE IF NOT EXISTS owed (          -- charged on the ledger, not yet debited from the chip
    post_id TEXT PRIMARY KEY, card_number TEXT NOT NULL, agency_id TEXT NOT NULL, amount_fen INTEGER NOT NULL,
    purse_account TEXT NOT NULL, operator_account TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS holds (
    card_number TEXT PRIMARY KEY, hold_id TEXT NOT NULL, agency_id TEXT NOT NULL, amount_fen INTEGER NOT NULL,
    purse_account TEXT NOT NULL, operator_account TEXT NOT NULL, rider_category TEXT NOT NULL,
    entered_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class BookedTap:
    key: str
    card_number: str
    agency_id: str
    route_id: str
    day: str
    at_ns: int
    mode: str
    fare_fen: int
    held_fen: int
    discount_fen: int
    rider_category: str
    capped: bool
    answer: bytes  # the TapDecision as sent, to answer a resent tap the same


@dataclass(frozen=True)
class OpenHold:
    card_number: str
    hold_id: int
    agency_id: str
    amount_fen: int
    purse_account: int
    operator_account: int
    rider_category: str
    entered_ns: int
    expires_ns: int


@dataclass(frozen=True)
class Owed:
    """A missing tap-off the ledger charged (the hold posted) while the chip still holds the money: collected
    on the chip at the card's next tap with the same operator (service.py)."""

    post_id: int
    card_number: str
    agency_id: str
    amount_fen: int
    purse_account: int
    operator_account: int


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="transit-store", daemon=True)
        self._writer.start()

    # -- writes off the decision path -------------------------------------------------------------------

    def add_tap(self, tap: BookedTap) -> None:
        self._queue.put(("INSERT OR IGNORE INTO taps VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (tap.key, tap.card_number, tap.agency_id, tap.route_id, tap.day, tap.at_ns, tap.mode,
                          tap.fare_fen, tap.held_fen, tap.discount_fen, tap.rider_category, int(tap.capped),
                          tap.answer)))

    def add_charge(self, key: str, card_number: str, agency_id: str, day: str, fare_fen: int,
                   rider_category: str, reason: str) -> None:
        self._queue.put(("INSERT OR IGNORE INTO charges VALUES (?,?,?,?,?,?,?)",
                         (key, card_number, agency_id, day, fare_fen, rider_category, reason)))

    def open_hold(self, hold: OpenHold) -> None:
        self._queue.put(("INSERT OR REPLACE INTO holds VALUES (?,?,?,?,?,?,?,?,?)",
                         (hold.card_number, f"{hold.hold_id:x}", hold.agency_id, hold.amount_fen,
                          f"{hold.purse_account:x}", f"{hold.operator_account:x}", hold.rider_category,
                          hold.entered_ns, hold.expires_ns)))

    def close_hold(self, card_number: str) -> None:
        self._queue.put(("DELETE FROM holds WHERE card_number = ?", (card_number,)))

    def add_unbooked(self, key: str, card_number: str, agency_id: str, day: str, amount_fen: int,
                     reason: str) -> None:
        self._queue.put(("INSERT OR REPLACE INTO unbooked VALUES (?,?,?,?,?,?)",
                         (key, card_number, agency_id, day, amount_fen, reason)))

    def add_owed(self, owed: Owed) -> None:
        self._queue.put(("INSERT OR IGNORE INTO owed VALUES (?,?,?,?,?,?)",
                         (f"{owed.post_id:x}", owed.card_number, owed.agency_id, owed.amount_fen,
                          f"{owed.purse_account:x}", f"{owed.operator_account:x}")))

    def collected(self, owed: Owed) -> None:
        self._queue.put(("DELETE FROM owed WHERE post_id = ?", (f"{owed.post_id:x}",)))

    def flush(self) -> None:
        """Wait until every queued write is committed."""
        done = threading.Event()
        self._queue.put(("__flush__", (done,)))
        done.wait()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            try:
                while len(batch) < 10_000:
                    more = self._queue.get(timeout=FLUSH_S) if len(batch) == 1 else self._queue.get_nowait()
                    if more is None:
                        self._commit(batch)
                        return
                    batch.append(more)
            except queue.Empty:
                pass
            self._commit(batch)

    def _commit(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        flushed = [args[0] for sql, args in batch if sql == "__flush__"]
        with self._lock:
            self._db.execute("BEGIN")
            for sql, args in batch:
                if sql != "__flush__":
                    self._db.execute(sql, args)
            self._db.execute("COMMIT")
        for done in flushed:
            done.set()

    # -- batches: written at once (the answer to a resend must be there before the first answer leaves) ----

    def batch(self, key: str) -> tuple[str, bytes] | None:
        with self._lock:
            row = self._db.execute("SELECT digest, answer FROM batches WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def add_batch(self, key: str, gate_id: str, agency_id: str, day: str, digest: str, records: int, booked: int,
                  booked_fen: int, answer: bytes, rejected: Iterable[tuple[int, str, int, str, str]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR IGNORE INTO batches VALUES (?,?,?,?,?,?,?,?,?)",
                             (key, gate_id, agency_id, day, digest, records, booked, booked_fen, answer))
            self._db.executemany("INSERT OR IGNORE INTO rejected VALUES (?,?,?,?,?,?,?,?)",
                                 [(key, index, agency_id, day, serial, counter, outcome, message)
                                  for index, serial, counter, outcome, message in rejected])
            self._db.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------------------------

    def tap_answer(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM taps WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def holds(self) -> list[OpenHold]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM holds").fetchall()
        return [OpenHold(card, int(hold, 16), agency, amount, int(purse, 16), int(operator, 16), category,
                         entered, expires)
                for card, hold, agency, amount, purse, operator, category, entered, expires in rows]

    def owed(self) -> list[Owed]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM owed").fetchall()
        return [Owed(int(post, 16), card, agency, amount, int(purse, 16), int(operator, 16))
                for post, card, agency, amount, purse, operator in rows]

    def day_summary(self, agency_id: str, day: str) -> dict[str, Any]:
        """What the settlement file of one operator and day is made of."""
        with self._lock:
            taps = self._db.execute(
                "SELECT rider_category, mode, COUNT(*), SUM(fare_fen), SUM(discount_fen) FROM taps "
                "WHERE agency_id = ? AND day = ? GROUP BY rider_category, mode ORDER BY rider_category, mode",
                (agency_id, day)).fetchall()
            charges = self._db.execute(
                "SELECT rider_category, reason, COUNT(*), SUM(fare_fen) FROM charges WHERE agency_id = ? AND day = ? "
                "GROUP BY rider_category, reason", (agency_id, day)).fetchall()
            batches = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(records), 0), COALESCE(SUM(booked), 0), COALESCE(SUM(booked_fen), 0) "
                "FROM batches WHERE agency_id = ? AND day = ?", (agency_id, day)).fetchone()
            rejected = self._db.execute(
                "SELECT batch_key, idx, app_serial, card_counter, outcome, message FROM rejected "
                "WHERE agency_id = ? AND day = ? ORDER BY batch_key, idx", (agency_id, day)).fetchall()
            unbooked = self._db.execute(
                "SELECT key, card_number, amount_fen, reason FROM unbooked WHERE agency_id = ? AND day = ? "
                "ORDER BY key", (agency_id, day)).fetchall()
        return {"taps": taps, "charges": charges, "batches": batches, "rejected": rejected, "unbooked": unbooked}

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        with self._lock:
            self._db.close()
