"""Durable transfers per second: the settlement core next to the storage limit and next to SQLite.

    python -m benches.ledger --json

Each contender runs in its own subprocess, one after the other, on the same disk (a scratch folder
under --dir, default ./var/bench), and books the same workload: batches of 8,189 transfers, each a
pair of a contribution (fund -> a random person's medical account) and a settlement of part of it
(that person -> a random pharmacy), so every rule is on: ids, ledgers, the movement table, the
debit limit of the personal account. Every batch is on disk (fsync) before the next starts.

Contenders:
  ledger_10k      citycard's compiled core, 10,000 accounts
  ledger_10m      citycard's compiled core, 10,000,000 accounts
  limit           LMDB's fastest path for the same number of 128-byte records: sorted keys,
                  py-lmdb putmulti(append=True), one write transaction and one fsync per batch
  limit_block     the same bytes as one LMDB value per batch: what the ledger's log writes
  sqlite          the same transfers and rules in SQLite (WAL, synchronous=FULL, one transaction
                  per batch, balances in a table): what an engineer would reach for first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 8189
FUNDS = 10
PHARMACIES = 100
PERSON_FIRST_ID = 1_000


def machine() -> dict:
    import Cython
    import lmdb

    from citycard.core.ledger import lmdb_version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "lmdb_c": ".".join(map(str, lmdb_version())),
        "py_lmdb": lmdb.__version__,
        "py_lmdb_engine": ".".join(map(str, lmdb.version())),
        "cython": Cython.__version__,
        "numpy": np.__version__,
        "sqlite": sqlite3.sqlite_version,
    }


# -- the workload ------------------------------------------------------------------------------------

def workload(batches: int, persons: int, seed: int = 7) -> list[np.ndarray]:
    """Transfer batches: pairs of (fund -> person contribution, person -> pharmacy settlement)."""
    from citycard.core.records import TRANSFER_DTYPE, LedgerId, TransferCode

    rng = np.random.default_rng(seed)
    out = []
    next_id = 1
    for _ in range(batches):
        pairs = BATCH // 2
        batch = np.zeros(pairs * 2, dtype=TRANSFER_DTYPE)
        person = PERSON_FIRST_ID + rng.integers(0, persons, pairs, dtype=np.uint64)
        batch["id"][:, 0] = np.arange(next_id, next_id + pairs * 2, dtype=np.uint64)
        next_id += pairs * 2
        batch["ledger"] = LedgerId.MEDICAL
        contribution, settlement = batch[0::2], batch[1::2]
        contribution["debit_account_id"][:, 0] = 1 + rng.integers(0, FUNDS, pairs, dtype=np.uint64)
        contribution["credit_account_id"][:, 0] = person
        contribution["amount"] = rng.integers(100, 10_000, pairs, dtype=np.uint64)
        contribution["code"] = TransferCode.CONTRIBUTION
        settlement["debit_account_id"][:, 0] = person
        settlement["credit_account_id"][:, 0] = 1 + FUNDS + rng.integers(0, PHARMACIES, pairs, dtype=np.uint64)
        settlement["amount"] = contribution["amount"] // 2
        settlement["code"] = TransferCode.SETTLEMENT
        out.append(batch)
    return out


def chart(persons: int) -> list[np.ndarray]:
    from citycard.core.records import ACCOUNT_DTYPE, AccountFlags, AccountKind, LedgerId

    total = FUNDS + PHARMACIES + persons
    accounts = np.zeros(total, dtype=ACCOUNT_DTYPE)
    accounts["ledger"] = LedgerId.MEDICAL
    accounts["id"][:FUNDS, 0] = np.arange(1, FUNDS + 1)
    accounts["code"][:FUNDS] = AccountKind.FUND
    accounts["id"][FUNDS:FUNDS + PHARMACIES, 0] = np.arange(FUNDS + 1, FUNDS + PHARMACIES + 1)
    accounts["code"][FUNDS:FUNDS + PHARMACIES] = AccountKind.INSTITUTION_SETTLEMENT
    accounts["id"][FUNDS + PHARMACIES:, 0] = np.arange(PERSON_FIRST_ID, PERSON_FIRST_ID + persons)
    accounts["code"][FUNDS + PHARMACIES:] = AccountKind.PERSON_MEDICAL
    accounts["flags"][FUNDS + PHARMACIES:] = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    return [accounts[i:i + BATCH] for i in range(0, total, BATCH)]


# -- contenders (each runs in its own process) --------------------------------------------------------

def run_ledger(directory: Path, accounts: int, batches: int) -> dict:
    from citycard.core.ledger import Ledger

    persons = accounts - FUNDS - PHARMACIES
    ledger = Ledger(directory, map_size_bytes=2**36)
    started = time.perf_counter()
    for block in chart(persons):
        if (ledger.create_accounts(block)["status"] != 0).any():
            raise SystemExit("account creation failed")
    setup_s = time.perf_counter() - started
    work = workload(batches, persons)
    started = time.perf_counter()
    for batch in work:
        results = ledger.create_transfers(batch)
        if (results["status"] != 0).any():
            raise SystemExit(f"a transfer was refused: {np.unique(results['status'])}")
    elapsed = time.perf_counter() - started
    totals = ledger.totals()
    ledger.close()
    started = time.perf_counter()
    Ledger(directory, map_size_bytes=2**36).close()
    reopen_s = time.perf_counter() - started
    return {"transfers": batches * BATCH, "seconds": elapsed, "per_s": batches * BATCH / elapsed,
            "accounts_setup_s": setup_s, "reopen_s": reopen_s,
            "balanced": all(t[1] == t[3] for t in totals.values())}


def _limit_items(batches: int) -> list[list[tuple[bytes, bytes]]]:
    value = bytes(range(128))
    return [[((b * BATCH + i).to_bytes(8, "big"), value) for i in range(BATCH)] for b in range(batches)]


def run_limit(directory: Path, batches: int) -> dict:
    import lmdb

    env = lmdb.open(str(directory), map_size=2**34, sync=True)
    items = _limit_items(batches)
    started = time.perf_counter()
    for batch in items:
        with env.begin(write=True) as txn:
            txn.cursor().putmulti(batch, append=True)
    elapsed = time.perf_counter() - started
    env.close()
    return {"records": batches * BATCH, "seconds": elapsed, "per_s": batches * BATCH / elapsed}


def run_limit_block(directory: Path, batches: int) -> dict:
    import lmdb

    env = lmdb.open(str(directory), map_size=2**34, sync=True)
    blocks = [(b.to_bytes(8, "big"), bytes(128) * BATCH) for b in range(batches)]
    started = time.perf_counter()
    for key, value in blocks:
        with env.begin(write=True) as txn:
            txn.put(key, value, append=True)
    elapsed = time.perf_counter() - started
    env.close()
    return {"records": batches * BATCH, "seconds": elapsed, "per_s": batches * BATCH / elapsed}


SQLITE_SCHEMA = """
create table account (id integer primary key, ledger integer not null, kind integer not null,
  limit_debits integer not null, debits integer not null default 0, credits integer not null default 0);
create table transfer (id integer primary key, debit integer not null, credit integer not null,
  amount integer not null, ledger integer not null, code integer not null, ts integer not null);
create table movement (ledger integer, code integer, debit_kind integer, credit_kind integer,
  primary key (ledger, code, debit_kind, credit_kind));
"""


def run_sqlite(directory: Path, accounts: int, batches: int) -> dict:
    from citycard.core.records import BUILTIN_MOVEMENTS, AccountFlags

    directory.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(directory / "ledger.sqlite", isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=full")
    db.executescript(SQLITE_SCHEMA)
    db.executemany("insert into movement values (?, ?, ?, ?)",
                   [(m.ledger, m.code, m.debit_kind, m.credit_kind) for m in BUILTIN_MOVEMENTS])
    db.execute("begin")
    for block in chart(accounts - FUNDS - PHARMACIES):
        db.executemany("insert into account (id, ledger, kind, limit_debits) values (?, ?, ?, ?)",
                       [(int(a["id"][0]), int(a["ledger"]), int(a["code"]),
                         int(a["flags"]) & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS) for a in block])
    db.execute("commit")
    work = [[(int(t["id"][0]), int(t["debit_account_id"][0]), int(t["credit_account_id"][0]), int(t["amount"]),
              int(t["ledger"]), int(t["code"])) for t in batch] for batch in workload(batches, accounts - FUNDS - PHARMACIES)]
    started = time.perf_counter()
    ts = 0
    for batch in work:
        db.execute("begin")
        for transfer_id, debit, credit, amount, ledger, code in batch:
            ts += 1
            if db.execute("select 1 from transfer where id = ?", (transfer_id,)).fetchone():
                raise SystemExit("duplicate id")
            d = db.execute("select ledger, kind, limit_debits, debits, credits from account where id = ?",
                           (debit,)).fetchone()
            c = db.execute("select ledger, kind from account where id = ?", (credit,)).fetchone()
            if d is None or c is None or d[0] != c[0] or d[0] != ledger:
                raise SystemExit("account or ledger check failed")
            if not db.execute("select 1 from movement where ledger = ? and code = ? and debit_kind = ? and "
                              "credit_kind = ?", (ledger, code, d[1], c[1])).fetchone():
                raise SystemExit("movement not allowed")
            if d[2] and d[3] + amount > d[4]:
                raise SystemExit("exceeds credits")
            db.execute("update account set debits = debits + ? where id = ?", (amount, debit))
            db.execute("update account set credits = credits + ? where id = ?", (amount, credit))
            db.execute("insert into transfer values (?, ?, ?, ?, ?, ?, ?)",
                       (transfer_id, debit, credit, amount, ledger, code, ts))
        db.execute("commit")
    elapsed = time.perf_counter() - started
    db.close()
    return {"transfers": batches * BATCH, "seconds": elapsed, "per_s": batches * BATCH / elapsed}


CONTENDERS = {
    "ledger_10k": lambda d, a: run_ledger(d, 10_000, a.batches),
    "ledger_10m": lambda d, a: run_ledger(d, 10_000_000, a.batches),
    "limit": lambda d, a: run_limit(d, a.batches),
    "limit_block": lambda d, a: run_limit_block(d, a.batches),
    "sqlite": lambda d, a: run_sqlite(d, 10_000, a.sqlite_batches),
}


def run_contender(name: str, args: argparse.Namespace) -> dict:
    scratch = Path(args.dir) / name
    shutil.rmtree(scratch, ignore_errors=True)
    command = [sys.executable, "-m", "benches.ledger", "--contender", name, "--dir", str(scratch),
               "--batches", str(args.batches), "--sqlite-batches", str(args.sqlite_batches)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as failure:
        raise SystemExit(f"{name} failed:\n{failure.stdout}\n{failure.stderr}") from failure
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benches.ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batches", type=int, default=120, help="batches of 8,189 per contender (default 120)")
    parser.add_argument("--sqlite-batches", type=int, default=4, help="batches for SQLite (default 4)")
    parser.add_argument("--dir", default="var/bench", help="scratch folder on the disk under test")
    parser.add_argument("--contender", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contender:
        print(json.dumps(CONTENDERS[args.contender](Path(args.dir), args)))
        return
    runs = {name: run_contender(name, args) for name in CONTENDERS}
    report = {
        "transfers_per_s_10k_accounts": round(runs["ledger_10k"]["per_s"]),
        "transfers_per_s_10m_accounts": round(runs["ledger_10m"]["per_s"]),
        "limit_per_s": round(runs["limit"]["per_s"]),
        "limit_block_per_s": round(runs["limit_block"]["per_s"]),
        "sqlite_per_s": round(runs["sqlite"]["per_s"]),
    }
    report |= {
        "ratio_to_limit_10k": round(report["transfers_per_s_10k_accounts"] / report["limit_per_s"], 2),
        "ratio_to_limit_10m": round(report["transfers_per_s_10m_accounts"] / report["limit_per_s"], 2),
        "ratio_to_limit_block_10k": round(report["transfers_per_s_10k_accounts"] / report["limit_block_per_s"], 2),
        "ratio_to_sqlite": round(report["transfers_per_s_10k_accounts"] / report["sqlite_per_s"], 1),
        "reopen_s_10m_accounts": round(runs["ledger_10m"]["reopen_s"], 2),
        "accounts_setup_s_10m": round(runs["ledger_10m"]["accounts_setup_s"], 2),
        "batch": BATCH,
        "batches": args.batches,
        "sqlite_batches": args.sqlite_batches,
        "balanced": runs["ledger_10k"]["balanced"] and runs["ledger_10m"]["balanced"],
        "machine": machine(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
