"""The denylist: the cards every terminal must refuse, versioned so a terminal asks only for changes.

A card is on the list exactly while its state is one that ``lifecycle.is_denylisted`` names
(stopped, frozen, replaced, cancelled, expired): a restored card leaves it, a replaced or cancelled
card never does. The registry calls ``stage_state`` inside the unit of work of every state change, so
the list changes in the same LMDB transaction as the card.

Versions count membership changes: each card added or removed takes the next version, starting at 1
(version 0 is the empty list). A listed card that changes state (stopped -> frozen -> replaced) keeps
its entry and the list keeps its version: for a terminal nothing changed, it refuses the card either
way; the entry shows the current state.

``delta(ledger, since=V)`` answers "what changed since version V": the cards added and the cards
removed between V and now, and the current version. A card added and removed again after V is in
neither list; ``since=0`` gives the whole list.

Tables (in the ledger's LMDB environment)::

    denylist       card number                -> {"card_number", "card_id_code", "state", "version", "listed_at"}
    denylist_log   version (8 bytes, big-end) -> {"version", "op": "add"|"remove", "card_number", "card_id_code", "at"}
    denylist_head  b"version"                 -> the current version, decimal ASCII
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from citycard.core.lifecycle import CardState, is_denylisted
from citycard.core.registry_records import ErrorCode, RegistryError

__all__ = [
    "DENYLIST_TABLES",
    "DenylistDelta",
    "DenylistEntry",
    "current_version",
    "delta",
    "entries",
    "stage_state",
]

ENTRIES = "denylist"
LOG = "denylist_log"
HEAD = "denylist_head"
DENYLIST_TABLES = (ENTRIES, LOG, HEAD)
VERSION_KEY = b"version"
VERSION_KEY_BYTES = 8
# A delta is for terminals that keep up; one further behind than this many changes takes the whole list.
DELTA_LOG_ROWS_MAX = 1_000_000
ENTRIES_MAX = 10_000_000


class TableReader(Protocol):
    def get(self, table: str, key: bytes) -> bytes | None: ...


class TableWriter(TableReader, Protocol):
    def put(self, table: str, key: bytes, value: bytes | None) -> None: ...


class TableScanner(TableReader, Protocol):
    def scan(self, table: str, start: bytes = b"", stop: bytes | None = None, limit: int = -1
             ) -> list[tuple[bytes, bytes]]: ...


@dataclass(frozen=True)
class DenylistEntry:
    card_number: str
    card_id_code: str
    state: str
    version: int  # the version that added the card
    listed_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DenylistDelta:
    since: int
    version: int
    added: tuple[DenylistEntry, ...]
    removed: tuple[str, ...]  # card numbers

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "version": self.version,
                "added": [entry.to_json() for entry in self.added], "removed": list(self.removed)}


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _version_key(version: int) -> bytes:
    return version.to_bytes(VERSION_KEY_BYTES, "big")


def current_version(tables: TableReader) -> int:
    stored = tables.get(HEAD, VERSION_KEY)
    return 0 if stored is None else int(stored)


def stage_state(tables: TableWriter, *, card_number: str, card_id_code: str, state: CardState,
                at: _dt.datetime) -> int | None:
    """Bring the card's entry in line with its new ``state``; the new version if membership changed."""
    key = card_number.encode("ascii")
    stored = tables.get(ENTRIES, key)
    listed_now = is_denylisted(state)
    if stored is not None and listed_now:
        entry = json.loads(stored)
        entry["state"] = state.value
        tables.put(ENTRIES, key, _encode(entry))
        return None
    if stored is None and not listed_now:
        return None
    version = current_version(tables) + 1
    op = "add" if listed_now else "remove"
    tables.put(LOG, _version_key(version), _encode(
        {"version": version, "op": op, "card_number": card_number, "card_id_code": card_id_code,
         "at": at.isoformat()}))
    tables.put(HEAD, VERSION_KEY, str(version).encode("ascii"))
    if listed_now:
        entry = DenylistEntry(card_number, card_id_code, state.value, version, at.isoformat())
        tables.put(ENTRIES, key, _encode(entry.to_json()))
    else:
        tables.put(ENTRIES, key, None)
    return version


def entries(tables: TableScanner) -> list[DenylistEntry]:
    """The whole list, in card number order."""
    return [DenylistEntry(**json.loads(value)) for _, value in tables.scan(ENTRIES, limit=ENTRIES_MAX)]


def delta(tables: TableScanner, since: int) -> DenylistDelta:
    """What changed since version ``since``: cards added, cards removed, and the current version."""
    version = current_version(tables)
    if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= version:
        raise RegistryError("since", f"{since!r} is not a denylist version; the current version is {version}",
                            subject="denylist", code=ErrorCode.INVALID_ARGUMENT)
    if since == 0:
        return DenylistDelta(0, version, tuple(entries(tables)), ())
    rows = tables.scan(LOG, start=_version_key(since + 1), limit=DELTA_LOG_ROWS_MAX + 1)
    if len(rows) > DELTA_LOG_ROWS_MAX:
        raise RegistryError("since", f"more than {DELTA_LOG_ROWS_MAX} changes since version {since}; "
                                     "ask for the whole list (since 0)", subject="denylist",
                            code=ErrorCode.FAILED_PRECONDITION)
    first_op: dict[str, str] = {}
    for _, value in rows:
        change = json.loads(value)
        first_op.setdefault(change["card_number"], change["op"])
    added: list[DenylistEntry] = []
    removed: list[str] = []
    for card_number in sorted(first_op):
        # Membership alternates add/remove, so the first change after V tells what V had.
        listed_at_since = first_op[card_number] == "remove"
        stored = tables.get(ENTRIES, card_number.encode("ascii"))
        if stored is not None and not listed_at_since:
            added.append(DenylistEntry(**json.loads(stored)))
        elif stored is None and listed_at_since:
            removed.append(card_number)
    return DenylistDelta(since, version, tuple(added), tuple(removed))
