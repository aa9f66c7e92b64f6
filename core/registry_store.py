"""Where the registry keeps its rows, and the unit of work that writes them with the ledger's events.

The registry lives in key-value tables of the ledger's own LMDB environment (``Ledger.get/scan`` to
read, ``Ledger.execute(puts=...)`` to write), so a card's state change, the account freeze it causes,
its audit entry and its denylist entry commit in one transaction or not at all.

Tables and keys (keys are chosen so that range scans answer the registry's questions)::

    persons        citizen ID (18 ASCII)                     -> Person JSON
    employers      unit code (18 ASCII)                      -> Employer JSON
    cards          card number (9 ASCII)                     -> Card JSON
    card_index     b"holder:" holder b":" card number        -> b""   (a holder's cards)
                   b"code:" card identification code (hex)   -> card number
                   b"alias:" legacy number                   -> {"card_number", "technology"} JSON
    card_history   card number + seq (4 bytes big-endian)    -> one transition, JSON
    timers         b"stopped:" card number                   -> b""   (cards a tick may restore)
                   b"expires:" YYYY-MM-DD b":" card number   -> b""   (cards a tick may expire)
    credentials    citizen ID                                -> self-service verifier JSON (never shown)
    pin_resets     request id (8 bytes big-endian)           -> PinReset JSON
    audit          seq (8 bytes big-endian)                  -> audit entry (core/audit.py's bytes)
    meta           b"seq:" name                              -> next-to-last number used, decimal ASCII
                   b"audit:head"                             -> {"seq", "hash"} of the newest entry
                   b"setup"                                  -> when the system accounts were opened
    denylist, denylist_log, denylist_head                    -> core/denylist.py

Values are JSON objects: UTF-8, ``ensure_ascii=False``, sorted keys, no spaces, so equal records are
equal bytes. Account ids are u128, derived from registry numbers so they can be read back by eye::

    person's medical account   (1 << 120) | person seq
    card's e-purse account     (2 << 120) | card seq
    system accounts            (3 << 120) | (ledger << 16) | account kind
    transfers the registry books (contributions, loads, refunds): (0x10 << 120) | transfer seq
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Collection, Mapping
from operator import itemgetter
from typing import Any

import orjson

from citycard.core.audit import AuditChain, AuditEntry, AuditFormatError, encode_key
from citycard.core.ledger import BatchResult, Ledger, accounts_array, changes_array, transfers_array
from citycard.core.records import (
    AccountKind,
    AccountResult,
    ChangeAction,
    ChangeResult,
    LedgerId,
    TransferResult,
)
from citycard.core.registry_records import ErrorCode, RegistryError

__all__ = [
    "REGISTRY_TABLES",
    "Stage",
    "decode",
    "encode",
    "encode_plain",
    "medical_account_id",
    "purse_account_id",
    "system_account_id",
    "transfer_id",
]

PERSONS = "persons"
EMPLOYERS = "employers"
CARDS = "cards"
CARD_INDEX = "card_index"
CARD_HISTORY = "card_history"
TIMERS = "timers"
CREDENTIALS = "credentials"
PIN_RESETS = "pin_resets"
AUDIT = "audit"
META = "meta"
REGISTRY_TABLES = (PERSONS, EMPLOYERS, CARDS, CARD_INDEX, CARD_HISTORY, TIMERS, CREDENTIALS, PIN_RESETS, AUDIT, META)

AUDIT_HEAD_KEY = b"audit:head"
SETUP_KEY = b"setup"
HISTORY_SEQ_BYTES = 4
SEQ_MAX = 2**64 - 1

_MEDICAL_PREFIX = 1 << 120
_PURSE_PREFIX = 2 << 120
_SYSTEM_PREFIX = 3 << 120
_TRANSFER_PREFIX = 0x10 << 120
_ACCOUNT_NUMBER_MAX = (1 << 120) - 1


def encode(record: Mapping[str, Any]) -> bytes:
    """A record as stored: compact JSON, sorted keys, UTF-8 (the bytes of ``_encode_stdlib``).

    orjson writes those same bytes about four times faster for records of text, integers, booleans,
    null, lists and text-keyed objects (every code point is escaped or not as the stdlib does, enum
    members are written as their values), which a batch of thousands of persons and cards notices.
    Anything else (a float, which the two format differently; a date or a dataclass, which the
    stdlib refuses) and anything orjson refuses (an integer beyond 64 bits, a key that is not text,
    a lone surrogate) goes to the stdlib, whose bytes or error are the answer."""
    try:
        plain = type(record) is dict and _plain(record.values())
    except RecursionError:  # nested too deep, or circular: the stdlib's error says which
        plain = False
    if plain:
        try:
            # Copied into a bytes object of its own size: orjson's comes from a larger buffer shrunk in
            # place, and a unit of work holding thousands of rows would keep some 4 KiB each (+14 MiB).
            return bytes(memoryview(orjson.dumps(record, option=_ORJSON_OPTIONS)))
        except orjson.JSONEncodeError:
            pass
    return _encode_stdlib(record)


def encode_plain(record: dict[str, Any]) -> bytes:
    """``encode`` of a record its caller built of text, integers (enum members among them), null, and
    lists and text-keyed objects of these, without looking at the types of its values first (a bulk
    enrolment writes two records a person); what orjson refuses still goes to the stdlib."""
    try:
        return bytes(memoryview(orjson.dumps(record, option=_ORJSON_OPTIONS)))
    except orjson.JSONEncodeError:
        return _encode_stdlib(record)


def _encode_stdlib(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# Dates, times and dataclasses are left to the stdlib (which refuses them), not written by orjson.
_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_LEAF_TYPES_MAX = 1000  # text and integer types remembered (str, int, bool and the enums met)
_leaf_types: set[type] = {str, int, bool, type(None)}
_CONTAINER_TYPES = frozenset({dict, list, tuple})


def _plain(values: Collection[Any]) -> bool:
    """Whether orjson writes these values as the stdlib does: text, integers (enum members among
    them), booleans, null, and lists, tuples and objects of these. The types are looked at once per
    kind of value (a flat record of a dozen texts costs a set of its value types); subclasses of
    dict, list and tuple, floats and anything else are left to the stdlib."""
    kinds = set(map(type, values))
    if kinds <= _leaf_types:
        return True
    for kind in kinds - _leaf_types:
        if kind in _CONTAINER_TYPES:
            continue
        if not issubclass(kind, (str, int)):
            return False  # float, and whatever else only one of the two writes
        if len(_leaf_types) < _LEAF_TYPES_MAX:  # str and int subclasses: both write the text or the number
            _leaf_types.add(kind)
    for value in values:
        kind = type(value)
        if kind is dict:
            if value and not _plain(value.values()):
                return False
        elif (kind is list or kind is tuple) and value and not _plain(value):
            return False
    return True


def decode(value: bytes, table: str, key: bytes) -> dict[str, Any]:
    try:
        record = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise RegistryError("stored_row", f"table {table}, key {key!r} is not a JSON object",
                            code=ErrorCode.FAILED_PRECONDITION)
    return record


def medical_account_id(person_seq: int) -> int:
    return _MEDICAL_PREFIX | _account_number(person_seq)


def purse_account_id(card_seq: int) -> int:
    return _PURSE_PREFIX | _account_number(card_seq)


def system_account_id(ledger: LedgerId, kind: AccountKind) -> int:
    return _SYSTEM_PREFIX | (int(ledger) << 16) | int(kind)


def transfer_id(transfer_seq: int) -> int:
    return _TRANSFER_PREFIX | _account_number(transfer_seq)


def _account_number(seq: int) -> int:
    if not 1 <= seq <= _ACCOUNT_NUMBER_MAX:
        raise RegistryError("seq", f"{seq} is outside 1..2**120-1", code=ErrorCode.FAILED_PRECONDITION)
    return seq


def history_key(card_number: str, seq: int) -> bytes:
    return card_number.encode("ascii") + seq.to_bytes(HISTORY_SEQ_BYTES, "big")


def instant_ns(instant: _dt.datetime) -> int:
    """Nanoseconds since the epoch, computed as the clock computes ``now_ns`` for a pinned instant."""
    return int(instant.timestamp()) * 1_000_000_000 + instant.microsecond * 1_000


class Stage:
    """One unit of work: reads see the committed tables with this unit's own writes laid over them;
    nothing reaches the disk until ``commit``, which hands the ledger events and every row to one
    atomic ``Ledger.execute``. An exception before ``commit`` simply drops the stage: nothing changed."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._puts: dict[tuple[str, bytes], bytes | None] = {}
        self.accounts: list[dict[str, Any]] = []
        self.changes: list[tuple[int, ChangeAction]] = []
        self.transfers: list[dict[str, Any]] = []
        self._audit_head: AuditEntry | None | bool = False  # False: not read yet
        self._chain = AuditChain()

    # -- rows ---------------------------------------------------------------------------------------

    def get(self, table: str, key: bytes) -> bytes | None:
        if (table, key) in self._puts:
            return self._puts[(table, key)]
        return self._ledger.get(table, key)

    def put(self, table: str, key: bytes, value: bytes | None) -> None:
        self._puts[(table, key)] = value

    def get_json(self, table: str, key: bytes) -> dict[str, Any] | None:
        value = self.get(table, key)
        return None if value is None else decode(value, table, key)

    def put_json(self, table: str, key: bytes, record: Mapping[str, Any]) -> None:
        self.put(table, key, encode(record))

    def next_seq(self, name: str) -> int:
        """The next number of the named sequence; it is used up only if the stage commits."""
        key = b"seq:" + name.encode("ascii")
        current = self.get(META, key)
        number = 1 if current is None else int(current) + 1
        if number > SEQ_MAX:
            raise RegistryError("seq", f"sequence {name} is exhausted", code=ErrorCode.FAILED_PRECONDITION)
        self.put(META, key, str(number).encode("ascii"))
        return number

    # -- audit --------------------------------------------------------------------------------------

    def audit(self, *, actor: str, channel: str, action: str, subject: str, at: _dt.datetime,
              details: Mapping[str, Any] | None = None) -> AuditEntry:
        """Append an entry to the audit log in this stage, chained to the newest one."""
        entry = self._chain.append(self._head(), actor=actor, channel=channel, action=action,
                                   subject=subject, details=details, at=at)
        self.put(AUDIT, entry.key(), entry.to_bytes())
        self.put_json(META, AUDIT_HEAD_KEY, {"seq": entry.seq, "hash": entry.hash})
        self._audit_head = entry
        return entry

    def _head(self) -> AuditEntry | None:
        if self._audit_head is not False:
            return self._audit_head  # type: ignore[return-value]
        anchor = self.get_json(META, AUDIT_HEAD_KEY)
        if anchor is None:
            return None
        # The anchor in meta, not the stored entry, says which hash comes next: the chain continues
        # from what was committed, even if someone has since edited the entry itself.
        stored = self.get(AUDIT, encode_key(anchor["seq"]))
        try:
            newest = AuditEntry.from_bytes(stored) if stored is not None else None
        except AuditFormatError:
            newest = None
        if newest is None:
            raise RegistryError("audit", f"the newest entry (seq {anchor['seq']}) is missing or unreadable; "
                                         "run `citycard audit verify`", code=ErrorCode.FAILED_PRECONDITION)
        return dataclasses.replace(newest, seq=anchor["seq"], hash=anchor["hash"])

    # -- commit -------------------------------------------------------------------------------------

    def commit(self, what: str) -> BatchResult:
        """Write everything in one atomic ledger batch; raise RegistryError (nothing kept) if refused."""
        result = self._ledger.execute(
            accounts=accounts_array(self.accounts) if self.accounts else None,
            changes=changes_array(self.changes) if self.changes else None,
            transfers=transfers_array(self.transfers) if self.transfers else None,
            # In key order, table by table: LMDB then writes each B-tree page once, while it is at hand,
            # instead of going back and forth between the pages of several randomly keyed tables.
            puts=[(table, key, value) for (table, key), value in sorted(self._puts.items(), key=itemgetter(0))],
            atomic=True,
        )
        if not result.ok:
            raise RegistryError("ledger", f"refused {what}: {_first_failure(result)}; nothing was changed",
                                code=ErrorCode.ABORTED)
        return result


def _first_failure(result: BatchResult) -> str:
    for name, results, codes, linked in (
        ("account", result.accounts, AccountResult, AccountResult.LINKED_EVENT_FAILED),
        ("account change", result.changes, ChangeResult, ChangeResult.LINKED_EVENT_FAILED),
        ("transfer", result.transfers, TransferResult, TransferResult.LINKED_EVENT_FAILED),
    ):
        for status in results["status"]:
            if status not in (0, linked):
                return f"{name} {codes(int(status)).name}"
    return "an event failed"

