"""The medical application's own records, in a small SQLite file beside the plugin (not in the core's LMDB).

What lives here is what the settlement core does not know: designated institutions and their credentials,
bills with their items and split, admissions, refunds, contribution rows. Money itself lives in the
core's MEDICAL ledger only; every row that moved money names the ledger transfers it booked.

Recovery rule: a booking is written here as an *intent* (with its computed split and its deterministic
transfer ids) before it is sent to the ledger, and marked *booked* after. A crash between the two leaves an
intent; the same request sent again finds it, re-sends the same transfers (the ledger answers EXISTS, ids
are idempotency keys) and marks it booked. So a record and the money it describes never disagree for long,
and nothing is booked twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS institutions (
    code TEXT PRIMARY KEY, body TEXT NOT NULL, token_sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bills (
    key TEXT PRIMARY KEY,            -- institution code / bill number
    institution TEXT NOT NULL, bill_no TEXT NOT NULL, digest TEXT NOT NULL,
    id_number TEXT NOT NULL, card_number TEXT NOT NULL, visit TEXT NOT NULL,
    day TEXT NOT NULL, year INTEGER NOT NULL, at_ns INTEGER NOT NULL,
    total_fen INTEGER NOT NULL, pooled_fen INTEGER NOT NULL, personal_fen INTEGER NOT NULL,
    insured_fen INTEGER NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS bills_by_person ON bills (id_number, at_ns);
CREATE TABLE IF NOT EXISTS admissions (
    key TEXT PRIMARY KEY, institution TEXT NOT NULL, admission_no TEXT NOT NULL, digest TEXT NOT NULL,
    id_number TEXT NOT NULL, card_number TEXT NOT NULL, expected_fen INTEGER NOT NULL,
    hold_fen INTEGER NOT NULL, hold_id TEXT NOT NULL, at_ns INTEGER NOT NULL, body TEXT NOT NULL,
    status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (
    key TEXT PRIMARY KEY, bill_key TEXT NOT NULL, digest TEXT NOT NULL, amount_fen INTEGER NOT NULL,
    pooled_fen INTEGER NOT NULL, personal_fen INTEGER NOT NULL, insured_fen INTEGER NOT NULL,
    at_ns INTEGER NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS refunds_by_bill ON refunds (bill_key);
CREATE TABLE IF NOT EXISTS contributions (
    month TEXT NOT NULL, employer TEXT NOT NULL, id_number TEXT NOT NULL, insurance TEXT NOT NULL,
    base_fen INTEGER NOT NULL, employer_fen INTEGER NOT NULL, individual_fen INTEGER NOT NULL,
    credited_fen INTEGER NOT NULL, import_key TEXT NOT NULL,
    PRIMARY KEY (month, employer, id_number, insurance));
CREATE INDEX IF NOT EXISTS contributions_by_person ON contributions (id_number, month);
CREATE TABLE IF NOT EXISTS partner_cities (code TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS out_of_city_bills (
    key TEXT PRIMARY KEY,            -- institution code / bill number (the same numbers as local bills)
    partner TEXT NOT NULL, home_number TEXT NOT NULL, institution TEXT NOT NULL, digest TEXT NOT NULL,
    visit TEXT NOT NULL,
    day TEXT NOT NULL, year INTEGER NOT NULL, at_ns INTEGER NOT NULL, total_fen INTEGER NOT NULL,
    home_fund_fen INTEGER NOT NULL, insured_fen INTEGER NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS out_of_city_by_partner ON out_of_city_bills (partner, day);
CREATE TABLE IF NOT EXISTS epurse_payments (
    key TEXT PRIMARY KEY,            -- the bill's key
    chip_key TEXT NOT NULL UNIQUE,   -- application serial / offline counter: one chip purchase, one bill
    digest TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS imports (
    key TEXT PRIMARY KEY, digest TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);
"""


class Store:
    """Two SQLite connections, each behind its own lock: one writes (every change is one transaction), one
    reads. WAL lets the reads go on while a commit waits for its fsync, so a look-up never queues behind
    a group of intents being made durable; a read sees every transaction committed before it starts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        memory = str(path) == ":memory:"
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._durable = True
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        self._reader = self._db if memory else sqlite3.connect(str(path), check_same_thread=False,
                                                                isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        self._read_lock = self._lock if memory else threading.Lock()

    def close(self) -> None:
        with self._read_lock:
            if self._reader is not self._db:
                self._reader.close()
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """All or nothing: the statements inside commit together, or none of them does.

        ``durable=False`` skips the fsync of this commit (WAL, synchronous=NORMAL): it survives a crash of
        the process but maybe not of the machine, and the next durable commit makes it durable too. Only
        for rows that can be derived again (marking an intent booked: a resend re-finds the booking)."""
        with self._lock:
            if durable != self._durable:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._read_lock:
            row: sqlite3.Row | None = self._reader.execute(sql, args).fetchone()
            return row

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._read_lock:
            return list(self._reader.execute(sql, args).fetchall())


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
