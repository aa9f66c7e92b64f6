"""The settlement core's facade: the only module that imports the compiled ``_ledger``.

Everything the platform does with money is a transfer in this ledger. Batches go in as numpy
structured arrays (records.TRANSFER_DTYPE and friends, up to BATCH_EVENTS_MAX events a call) and come
back as one result per event; nothing raises per event. When a call returns, its batch is on disk.

    ledger = Ledger("var/ledger")
    results = ledger.create_transfers(transfers)   # results["status"] holds TransferResult codes

Bad input (a wrong dtype, a batch over the limit) raises LedgerInputError before anything is touched.
One thread owns a Ledger: the gRPC server funnels writes through one writer thread.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from citycard.core import _ledger, clock
from citycard.core.records import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BATCH_EVENTS_MAX,
    BUILTIN_MOVEMENTS,
    CHANGE_DTYPE,
    HOME_LEDGER_OF_KIND,
    ID_MAX,
    TRANSFER_DTYPE,
    AccountKind,
    ChangeAction,
    LedgerId,
    Movement,
    TransferFlags,
    movements_array,
)

__all__ = [
    "Ledger", "BatchResult", "Balance", "LedgerError", "LedgerInputError", "LedgerIOError",
    "CorruptionError", "MapFullError", "u128_words", "u128_value", "lmdb_version",
    "DEFAULT_MAP_SIZE_BYTES",
]

LedgerError = _ledger.LedgerError
LedgerIOError = _ledger.LedgerIOError
CorruptionError = _ledger.CorruptionError
MapFullError = _ledger.MapFullError
lmdb_version = _ledger.lmdb_version

# LMDB reserves address space, not disk: a large map costs nothing until it is used.
DEFAULT_MAP_SIZE_BYTES = 64 * 2**30
TIMESTAMP_MAX = 2**64 - 1
_LEDGERS_TABLE = "ledgers"
_EVENT_EXPIRE = 4


class LedgerInputError(LedgerError, ValueError):
    """A call's arguments are malformed: nothing was done."""


@dataclass(frozen=True)
class BatchResult:
    accounts: np.ndarray
    changes: np.ndarray
    transfers: np.ndarray

    @property
    def ok(self) -> bool:
        return all(not (results["status"] != 0).any() for results in (self.accounts, self.changes, self.transfers))


@dataclass(frozen=True)
class Balance:
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int

    @property
    def credit_balance(self) -> int:
        """What the holder of a credit-normal account (a medical account, an e-purse) may still spend."""
        return self.credits_posted - self.debits_posted - self.debits_pending


def u128_words(value: int) -> tuple[int, int]:
    """An id as the [lo, hi] pair of u64 words that the records hold."""
    if not 0 <= value <= ID_MAX:
        raise LedgerInputError(f"{value} is not a u128")
    return value & 0xFFFFFFFFFFFFFFFF, value >> 64


def u128_value(words: Sequence[int] | np.ndarray) -> int:
    return int(words[0]) | (int(words[1]) << 64)


def _check_batch(name: str, array: Any, dtype: np.dtype) -> np.ndarray | None:
    if array is None:
        return None
    if not isinstance(array, np.ndarray):
        raise LedgerInputError(f"{name}: expected a numpy array of records.{_dtype_name(dtype)}, got {type(array).__name__}")
    if array.dtype != dtype:
        raise LedgerInputError(f"{name}: wrong dtype {array.dtype}; expected records.{_dtype_name(dtype)}")
    if array.ndim != 1:
        raise LedgerInputError(f"{name}: expected a 1-d array, got shape {array.shape}")
    if len(array) > BATCH_EVENTS_MAX:
        raise LedgerInputError(f"{name}: {len(array)} events is over the limit of {BATCH_EVENTS_MAX} a call")
    return array


def _dtype_name(dtype: np.dtype) -> str:
    return {id(ACCOUNT_DTYPE): "ACCOUNT_DTYPE", id(TRANSFER_DTYPE): "TRANSFER_DTYPE",
            id(CHANGE_DTYPE): "CHANGE_DTYPE"}.get(id(dtype), str(dtype))


def _ids_array(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    if isinstance(ids, np.ndarray) and ids.dtype == np.uint64 and ids.ndim == 2 and ids.shape[1] == 2:
        return ids
    return np.array([u128_words(int(value)) for value in ids], dtype=np.uint64).reshape(-1, 2)


class Ledger:
    """The settlement ledger in an LMDB environment at `path` (a directory, created if missing)."""

    def __init__(self, path: str | os.PathLike[str], *, map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES,
                 now_ns: Callable[[], int] = clock.now_ns) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._now_ns = now_ns
        self._core = _ledger.Core(
            str(self.path),
            map_size_bytes=map_size_bytes,
            movements=movements_array(BUILTIN_MOVEMENTS),
            medical_ledger=LedgerId.MEDICAL,
            purse_ledger=LedgerId.PURSE,
            kind_person_medical=AccountKind.PERSON_MEDICAL,
            kind_card_purse=AccountKind.CARD_PURSE,
        )
        self._registered: dict[int, dict[str, Any]] = {}
        for key, value in self._core.kv_scan(_LEDGERS_TABLE):
            self._registered[struct.unpack(">I", key)[0]] = json.loads(value)
        self._install_movements()

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ledgers -----------------------------------------------------------------------------------

    def ledgers(self) -> dict[int, str]:
        names = {LedgerId.MEDICAL.value: "MEDICAL", LedgerId.PURSE.value: "PURSE"}
        names.update({number: entry["name"] for number, entry in self._registered.items()})
        return names

    def movements(self) -> list[Movement]:
        registered = [Movement(number, *row) for number, entry in sorted(self._registered.items())
                      for row in entry["movements"]]
        return list(BUILTIN_MOVEMENTS) + registered

    def register_ledger(self, number: int, name: str, movements: Sequence[tuple[int, int, int] | tuple[int, int, int, int]]
                        ) -> None:
        """Register an app's ledger (BANK, ...) with its table of allowed movements.

        Each movement is (code, debit kind, credit kind[, refund_of]); 0 is a wildcard for any of the
        first three. Registering the same ledger again with the same table changes nothing.
        """
        first = LedgerId.first_registered()
        if not isinstance(number, int) or not first <= number <= 2**32 - 1:
            raise LedgerInputError(f"ledger number {number!r} must be an integer from {first} to {2**32 - 1}")
        if not name or not name.isidentifier() or name.upper() != name:
            raise LedgerInputError(f"ledger name {name!r} must be an upper-case identifier such as BANK")
        rows = [self._movement_row(number, movement) for movement in movements]
        if not rows:
            raise LedgerInputError(f"ledger {name}: give at least one allowed movement")
        entry = {"name": name, "movements": rows}
        existing = self._registered.get(number)
        if existing == entry:
            return
        if existing is not None:
            raise LedgerInputError(f"ledger {number} is already registered as {existing['name']} with another table")
        if name in self.ledgers().values():
            raise LedgerInputError(f"a ledger named {name} exists already")
        self._core.execute(None, None, None, [(_LEDGERS_TABLE, struct.pack(">I", number),
                                               json.dumps(entry).encode())], True, self._now_ns())
        self._registered[number] = entry
        self._install_movements()

    @staticmethod
    def _movement_row(number: int, movement: Sequence[int]) -> list[int]:
        if len(movement) not in (3, 4):
            raise LedgerInputError(f"movement {movement!r}: expected (code, debit kind, credit kind[, refund_of])")
        code, debit_kind, credit_kind, *rest = (int(part) for part in movement)
        refund_of = rest[0] if rest else 0
        for kind in (debit_kind, credit_kind):
            if kind in HOME_LEDGER_OF_KIND:
                raise LedgerInputError(f"ledger {number}: {AccountKind(kind).name} accounts live only on "
                                       f"{HOME_LEDGER_OF_KIND[AccountKind(kind)].name}")
            if kind and kind not in AccountKind.__members__.values():
                raise LedgerInputError(f"ledger {number}: unknown account kind {kind}")
        if not 0 <= code <= 0xFFFF or not 0 <= refund_of <= 0xFFFF:
            raise LedgerInputError(f"ledger {number}: transfer codes are 16-bit")
        return [code, debit_kind, credit_kind, refund_of]

    def _install_movements(self) -> None:
        self._core.set_movements(movements_array(self.movements()))

    # -- batches -----------------------------------------------------------------------------------

    def execute(self, *, accounts: np.ndarray | None = None, changes: np.ndarray | None = None,
                transfers: np.ndarray | None = None, puts: Iterable[tuple[str, bytes, bytes | None]] = (),
                atomic: bool = False) -> BatchResult:
        """One durable batch: accounts, then account changes, then transfers, then table rows.

        With `atomic`, all events must succeed or none is kept (the others then show
        LINKED_EVENT_FAILED), and the table rows are written only if all did: this is how a card's
        state change commits together with the account freeze it causes.
        """
        accounts = _check_batch("accounts", accounts, ACCOUNT_DTYPE)
        changes = _check_batch("changes", changes, CHANGE_DTYPE)
        transfers = _check_batch("transfers", transfers, TRANSFER_DTYPE)
        rows = []
        for table, key, value in puts:
            if not isinstance(key, bytes) or not 1 <= len(key) <= 511:
                raise LedgerInputError(f"table {table}: a key must be 1 to 511 bytes")
            if value is not None and not isinstance(value, bytes):
                raise LedgerInputError(f"table {table}: a value must be bytes or None")
            rows.append((table, key, value))
        account_results, change_results, transfer_results = self._core.execute(
            accounts, changes, transfers, rows, atomic, self._now_ns())
        return BatchResult(account_results, change_results, transfer_results)

    def create_accounts(self, accounts: np.ndarray) -> np.ndarray:
        return self.execute(accounts=_require(accounts, "accounts")).accounts

    def create_transfers(self, transfers: np.ndarray) -> np.ndarray:
        return self.execute(transfers=_require(transfers, "transfers")).transfers

    def change_accounts(self, changes: np.ndarray) -> np.ndarray:
        return self.execute(changes=_require(changes, "changes")).changes

    def freeze(self, account_id: int) -> int:
        return int(self.change_accounts(changes_array([(account_id, ChangeAction.FREEZE)]))[0]["status"])

    def unfreeze(self, account_id: int) -> int:
        return int(self.change_accounts(changes_array([(account_id, ChangeAction.UNFREEZE)]))[0]["status"])

    # -- look-ups ----------------------------------------------------------------------------------

    def lookup_accounts(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        return self._core.lookup_accounts(_ids_array(ids))

    def lookup_transfers(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        return self._core.lookup_transfers(_ids_array(ids))

    def account(self, account_id: int) -> np.void | None:
        found = self.lookup_accounts([account_id])
        return found[0] if len(found) else None

    def transfer(self, transfer_id: int) -> np.void | None:
        found = self.lookup_transfers([transfer_id])
        return found[0] if len(found) else None

    def balance(self, account_id: int) -> Balance:
        record = self.account(account_id)
        if record is None:
            raise LedgerInputError(f"no account {account_id}")
        return Balance(int(record["debits_pending"]), int(record["debits_posted"]),
                       int(record["credits_pending"]), int(record["credits_posted"]))

    def account_transfers(self, account_id: int, *, since_ns: int = 0, until_ns: int = TIMESTAMP_MAX,
                          limit: int = BATCH_EVENTS_MAX) -> np.ndarray:
        """An account's transfers with since_ns <= timestamp <= until_ns, oldest first, at most `limit`."""
        if not 1 <= limit <= BATCH_EVENTS_MAX:
            raise LedgerInputError(f"limit must be 1 to {BATCH_EVENTS_MAX}")
        if not 0 <= since_ns <= until_ns <= TIMESTAMP_MAX:
            raise LedgerInputError("need 0 <= since_ns <= until_ns")
        return self._core.scan_transfers(account_id, since_ns, until_ns, limit)

    def iter_transfers(self, account_id: int | None = None, *, since_ns: int = 0,
                       until_ns: int = TIMESTAMP_MAX) -> Iterator[np.ndarray]:
        """All transfers in a time range (of one account, or all), in chunks of at most one batch."""
        while since_ns <= until_ns:
            chunk = self._core.scan_transfers(account_id, since_ns, until_ns, BATCH_EVENTS_MAX)
            if not len(chunk):
                return
            yield chunk
            since_ns = int(chunk["timestamp"][-1]) + 1

    def balance_at(self, account_id: int, timestamp_ns: int) -> Balance:
        """The account's balances as they stood just after `timestamp_ns`, replayed from the log."""
        if self.account(account_id) is None:
            raise LedgerInputError(f"no account {account_id}")
        totals = [0, 0, 0, 0]  # debits pending, debits posted, credits pending, credits posted
        holds: dict[int, tuple[int, int]] = {}  # pending id -> (side, amount)
        for chunk in self.iter_transfers(account_id, until_ns=timestamp_ns):
            for record in chunk:
                side = 0 if u128_value(record["debit_account_id"]) == account_id else 2
                amount = int(record["amount"])
                flags = int(record["flags"])
                if flags & (TransferFlags.POST_PENDING_TRANSFER | TransferFlags.VOID_PENDING_TRANSFER):
                    _, held = holds.pop(u128_value(record["pending_id"]))
                    totals[side] -= held
                    if flags & TransferFlags.POST_PENDING_TRANSFER:
                        totals[side + 1] += amount
                elif flags & TransferFlags.PENDING:
                    holds[u128_value(record["id"])] = (side, amount)
                    totals[side] += amount
                else:
                    totals[side + 1] += amount
        for _, kind, transfer_id in self._core.scan_events(timestamp_ns):
            if kind == _EVENT_EXPIRE and transfer_id in holds:
                side, held = holds.pop(transfer_id)
                totals[side] -= held
        return Balance(*totals)

    def pending_state(self, pending_id: int) -> str | None:
        state = self._core.pending_state(pending_id)
        return None if state is None else ("pending", "posted", "voided", "expired")[state]

    def totals(self) -> dict[int, tuple[int, int, int, int]]:
        """Per ledger: (debits pending, debits posted, credits pending, credits posted)."""
        return self._core.totals()

    def stats(self) -> dict[str, int]:
        return self._core.stats()

    @property
    def last_timestamp(self) -> int:
        return self._core.last_timestamp

    # -- tables beside the log ---------------------------------------------------------------------

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._core.kv_get(table, key)

    def scan(self, table: str, start: bytes = b"", stop: bytes | None = None, limit: int = -1
             ) -> list[tuple[bytes, bytes]]:
        return self._core.kv_scan(table, start, stop, limit)


def _require(array: np.ndarray | None, name: str) -> np.ndarray:
    if array is None:
        raise LedgerInputError(f"{name}: expected an array, got None")
    return array


# -- building batches from Python values ------------------------------------------------------------

def accounts_array(rows: Iterable[dict[str, Any]]) -> np.ndarray:
    """Account records from dicts with int ids: {"id", "ledger", "code", "flags", "owner", "user_data"}.

    Written a column at a time: numpy sets one field of one record some ten times slower than it fills
    a column from a list, and a production commit opens two thousand accounts. Rows that all set the
    same fields to integers in range (a commit's accounts) are checked a column at a time too; any
    other rows are checked row by row, field by field, and the first wrong field is the error, as
    ``_records_from`` reports it."""
    rows = list(rows)
    alike = _accounts_alike(rows)
    return alike if alike is not None else _accounts_row_by_row(rows)


def _accounts_alike(rows: list[dict[str, Any]]) -> np.ndarray | None:
    """The records of rows that set the same fields, every value an integer in its field's range; None
    for anything else (the row-by-row check then names what is wrong)."""
    if not rows:
        return None
    names = rows[0].keys()
    if not names <= _ACCOUNT_FIELDS or "reserved" in names or any(row.keys() != names for row in rows):
        return None
    array = np.zeros(len(rows), dtype=ACCOUNT_DTYPE)
    for name in names:
        column = [row[name] for row in rows]
        if not all(issubclass(kind, int) for kind in set(map(type, column))):
            return None
        wide = name in _ACCOUNT_WIDE_FIELDS
        if min(column) < 0 or max(column) > (ID_MAX if wide else AMOUNT_MAX):
            return None
        if wide:
            array[name][:, 0] = [value & _WORD_MASK for value in column]
            array[name][:, 1] = [value >> 64 for value in column]
        else:
            array[name] = list(map(int, column))
    return array


def _accounts_row_by_row(rows: list[dict[str, Any]]) -> np.ndarray:
    """Any rows, checked one field at a time (the first wrong one is the error), then set by column."""
    columns: dict[str, tuple[list[int], list[Any]]] = {}
    for index, row in enumerate(rows):
        for field, value in row.items():
            if field not in _ACCOUNT_FIELDS:
                raise LedgerInputError(f"row {index}: unknown field {field!r}")
            if field in _ACCOUNT_WIDE_FIELDS:
                value = u128_words(int(value))
            elif field == "reserved":
                raise LedgerInputError(f"row {index}: reserved must stay zero")
            elif isinstance(value, float) or not 0 <= int(value) <= AMOUNT_MAX:
                raise LedgerInputError(f"row {index}: {field}={value!r} is not an unsigned integer")
            else:
                value = int(value)
            positions, values = columns.setdefault(field, ([], []))
            positions.append(index)
            values.append(value)
    array = np.zeros(len(rows), dtype=ACCOUNT_DTYPE)
    for field, (positions, values) in columns.items():
        array[field][positions] = values
    return array


_ACCOUNT_FIELDS = frozenset(ACCOUNT_DTYPE.names)
_ACCOUNT_WIDE_FIELDS = frozenset({"id", "owner"})
_WORD_MASK = 2**64 - 1


def transfers_array(rows: Iterable[dict[str, Any]]) -> np.ndarray:
    """Transfer records from dicts with int ids and int fen amounts."""
    return _records_from(rows, TRANSFER_DTYPE, ("id", "debit_account_id", "credit_account_id", "pending_id",
                                                "ref_id", "user_data"))


def changes_array(rows: Iterable[tuple[int, int]]) -> np.ndarray:
    rows = list(rows)
    array = np.zeros(len(rows), dtype=CHANGE_DTYPE)
    for index, (account_id, action) in enumerate(rows):
        array[index]["account_id"] = u128_words(account_id)
        array[index]["action"] = int(action)
    return array


def _records_from(rows: Iterable[dict[str, Any]], dtype: np.dtype, wide: tuple[str, ...]) -> np.ndarray:
    rows = list(rows)
    array = np.zeros(len(rows), dtype=dtype)
    for index, row in enumerate(rows):
        for field, value in row.items():
            if field not in dtype.names:
                raise LedgerInputError(f"row {index}: unknown field {field!r}")
            if field in wide:
                array[index][field] = u128_words(int(value))
            elif field == "reserved":
                raise LedgerInputError(f"row {index}: reserved must stay zero")
            else:
                if isinstance(value, float) or not 0 <= int(value) <= AMOUNT_MAX:
                    raise LedgerInputError(f"row {index}: {field}={value!r} is not an unsigned integer")
                array[index][field] = int(value)
    return array
