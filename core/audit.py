"""The audit log's entries and chain: append-only, hash-chained, and checkable. Pure: no storage.

Each entry records who did what, through which channel, to what, when, and links to the entry before
it by hash::

    hash = SHA-256( prev_hash (64 hex characters, ASCII) || canonical body )

The canonical body is the JSON object of every field but ``hash`` (seq, time, actor, channel, action,
subject, details, prev_hash) with sorted keys, no whitespace, non-ASCII characters as themselves, in
UTF-8. The first entry has seq 1 and a prev_hash of 64 zeros. Stored, an entry is the key
``seq`` as 8 bytes big-endian (so LMDB keeps the log in order and appends are cheap) and the value
the canonical JSON including ``hash``.

Changing any byte of an entry breaks its hash (EDITED); rewriting an entry and its hash breaks the
next entry's link (BROKEN_LINK); removing one leaves a seq gap (REMOVED); moving one breaks the order
(REORDERED). Cutting off the newest entries leaves a valid shorter chain, which only an anchor kept
elsewhere can reveal: ``verify(..., expected_head=(seq, hash))``.

Nothing secret or identifying goes in: ``scrub`` masks ID numbers in details and refuses PINs,
keys and secrets; ``AuditChain.append`` applies it to every entry, and masks ID numbers in the subject.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from citycard.core import clock
from citycard.core.identity import check_character, mask_id

__all__ = [
    "GENESIS_HASH",
    "AuditChain",
    "AuditEntry",
    "AuditFormatError",
    "AuditProblem",
    "ProblemKind",
    "SecretInAuditError",
    "decode_key",
    "encode_key",
    "scrub",
]

GENESIS_HASH = "0" * 64
SEQ_KEY_BYTES = 8
SEQ_MAX = 2 ** (8 * SEQ_KEY_BYTES) - 1
TEXT_FIELD_LENGTH_MAX = 200  # actor, channel, action, subject
DETAILS_BYTES_MAX = 16 * 1024  # an audit entry records a decision, not a document
DETAILS_DEPTH_MAX = 8
PROBLEMS_MAX = 1000  # verify stops listing after this many; a log that broken needs a person, not a list

# Details keys whose values are ID numbers: masked. Compared in lower case.
MASKED_KEYS = frozenset(
    {"id_number", "citizen_id", "ssn", "social_security_number", "agent_id", "agent_id_number", "id_no"}
)
# Keys that name a secret: refused, whole (pin, key, ...) or as the last part (new_pin, master_key).
SECRET_WORDS = frozenset({"pin", "key", "secret", "password", "passphrase"})
_KEY_PART_SEPARATORS = re.compile(r"[_\-. ]")
# An 18-character citizen ID inside free text; masked when its check character is right.
_ID_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")

_BODY_FIELDS = ("seq", "time", "actor", "channel", "action", "subject", "details", "prev_hash")
_HEX_DIGITS = frozenset("0123456789abcdef")


class AuditFormatError(ValueError):
    """Bytes or values that are not an audit entry; names the field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"audit entry {field}: {reason}")


class SecretInAuditError(ValueError):
    """Details carry a key that names a secret (a PIN, a key); secrets never enter the audit log."""

    def __init__(self, key_path: str) -> None:
        self.key_path = key_path
        super().__init__(
            f"audit details: {key_path!r} names a secret; PINs, keys and secrets are never logged"
        )


class ProblemKind(enum.StrEnum):
    EDITED = "edited"  # the entry's bytes do not give its hash
    # prev_hash is not the previous entry's hash: that entry was rewritten (hash and all), or entries
    # were removed and the rest renumbered; the bytes cannot tell which
    BROKEN_LINK = "broken_link"
    REMOVED = "removed"  # one or more seqs are missing
    REORDERED = "reordered"  # the entry comes after a later one, or sits under another seq's key
    DUPLICATE = "duplicate"  # a seq appears twice
    UNREADABLE = "unreadable"  # the stored bytes are not an entry
    TRUNCATED = "truncated"  # the chain ends before the anchor's seq
    ANCHOR_MISMATCH = "anchor_mismatch"  # the entry at the anchor's seq has another hash
    TOO_MANY = "too_many"  # listing stopped at PROBLEMS_MAX


@dataclass(frozen=True)
class AuditProblem:
    seq: int | None  # None when not even the seq can be read
    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "unknown seq"
        return f"{where}: {self.kind.value}: {self.message}"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str  # ISO 8601 with offset
    actor: str
    channel: str
    action: str
    subject: str  # ID numbers masked
    details: Mapping[str, Any] = field(hash=False)
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _BODY_FIELDS}

    def computed_hash(self) -> str:
        """The hash this entry's content gives, whatever its ``hash`` field says."""
        return _chain_hash(self.prev_hash, _canonical_json(self.body()))

    def key(self) -> bytes:
        return encode_key(self.seq)

    def to_bytes(self) -> bytes:
        return _canonical_json({**self.body(), "hash": self.hash})

    @classmethod
    def from_bytes(cls, value: bytes) -> AuditEntry:
        """Read a stored value; the hash is not checked here (``verify`` does that)."""
        try:
            record = json.loads(bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise AuditFormatError("value", f"is not UTF-8 JSON ({exc})") from None
        if not isinstance(record, dict):
            raise AuditFormatError("value", "is not a JSON object")
        expected = set(_BODY_FIELDS) | {"hash"}
        if set(record) != expected:
            raise AuditFormatError("value", f"has fields {sorted(record)}, expected {sorted(expected)}")
        _check_entry_fields(record)
        return cls(**record)


def encode_key(seq: int) -> bytes:
    if not 1 <= seq <= SEQ_MAX:
        raise AuditFormatError("seq", f"{seq} is outside 1..{SEQ_MAX}")
    return seq.to_bytes(SEQ_KEY_BYTES, "big")


def decode_key(key: bytes) -> int:
    if len(key) != SEQ_KEY_BYTES:
        raise AuditFormatError("key", f"has {len(key)} bytes, expected {SEQ_KEY_BYTES}")
    return int.from_bytes(key, "big")


def scrub(details: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``details`` safe for the audit log.

    Values under ID-number keys (id_number, citizen_id, ssn, agent_id, ...) are masked, and so is any
    valid citizen ID inside other text. A key that names a secret (pin, key, secret, password, or ending
    in one: new_pin, master_key) raises SecretInAuditError: the caller must leave it out, not have it
    blanked, so a leak is found in tests rather than hidden. Counts such as ``pin_retries`` are fine.
    """
    if not isinstance(details, Mapping):
        raise AuditFormatError("details", f"must be a mapping, not {type(details).__name__}")
    return _scrub_mapping(details, path="", depth=1)


def _scrub_mapping(mapping: Mapping[str, Any], path: str, depth: int) -> dict[str, Any]:
    if depth > DETAILS_DEPTH_MAX:
        raise AuditFormatError("details", f"nest deeper than {DETAILS_DEPTH_MAX} levels at {path!r}")
    cleaned: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise AuditFormatError("details", f"key {key!r} at {path or 'top level'!r} is not a str")
        key_path = f"{path}.{key}" if path else key
        if _names_secret(key):
            raise SecretInAuditError(key_path)
        masked = key.lower() in MASKED_KEYS
        cleaned[key] = _scrub_value(value, key_path, depth, masked)
    return cleaned


def _scrub_value(value: Any, path: str, depth: int, masked: bool) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return mask_id(str(value)) if masked else value
    if isinstance(value, str):
        return mask_id(value) if masked else _mask_ids_in_text(value)
    if isinstance(value, Mapping):
        return _scrub_mapping(value, path, depth + 1)
    if isinstance(value, (list, tuple)):
        return [_scrub_value(item, f"{path}[{index}]", depth + 1, masked) for index, item in enumerate(value)]
    # Floats have no single canonical text (and money is never a float); other types have no JSON form.
    raise AuditFormatError(
        "details", f"{path!r} holds a {type(value).__name__}; use str, int, bool, None, list or dict"
    )


def _names_secret(key: str) -> bool:
    parts = _KEY_PART_SEPARATORS.split(key.lower())
    return key.lower() in SECRET_WORDS or parts[-1] in SECRET_WORDS


def _mask_ids_in_text(text: str, *, checked_only: bool = True) -> str:
    """``text`` with 18-character citizen IDs masked. In free text (``checked_only``) only numbers with a
    right check character count, so an 18-digit reference number is usually left readable; a subject
    masks every number of that shape, a mistyped ID included."""

    def mask_if_citizen_id(match: re.Match[str]) -> str:
        candidate = match.group()
        if checked_only and check_character(candidate[:17]) != candidate[17].upper():
            return candidate
        return mask_id(candidate)

    return _ID_IN_TEXT.sub(mask_if_citizen_id, text)


class AuditChain:
    """Builds and checks chains of audit entries. ``now`` is the clock for entries given no time."""

    def __init__(self, now: Callable[[], _dt.datetime] = clock.now) -> None:
        self._now = now

    def append(
        self,
        previous: AuditEntry | None,
        *,
        actor: str,
        channel: str,
        action: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
        at: _dt.datetime | None = None,
    ) -> AuditEntry:
        """The entry after ``previous`` (None: the first entry of the log), details scrubbed."""
        instant = at if at is not None else self._now()
        if instant.tzinfo is None:
            raise AuditFormatError("time", "must carry a zone (an aware datetime)")
        record: dict[str, Any] = {
            "seq": 1 if previous is None else previous.seq + 1,
            "time": instant.isoformat(),
            "actor": str(actor),
            "channel": str(channel),
            "action": str(action),
            "subject": _mask_ids_in_text(str(subject), checked_only=False),
            "details": scrub(details or {}),
            "prev_hash": GENESIS_HASH if previous is None else previous.hash,
        }
        _check_entry_fields({**record, "hash": GENESIS_HASH})
        return AuditEntry(**record, hash=_chain_hash(record["prev_hash"], _canonical_json(record)))

    def verify(
        self,
        entries: Iterable[AuditEntry | tuple[bytes, bytes]],
        *,
        expected_head: tuple[int, str] | None = None,
    ) -> list[AuditProblem]:
        """Every problem in a log read in the order given (LMDB gives key order), sorted by seq.

        Entries are AuditEntry objects or stored (key, value) pairs. Reads the log once, keeping only
        the previous entry and the open gaps. ``expected_head`` is an anchor (seq, hash) kept outside
        the log; without one, a log whose newest entries were cut off looks whole.
        """
        walk = _ChainWalk(expected_head)
        for item in entries:
            walk.take(item)
            if len(walk.problems) >= PROBLEMS_MAX:
                walk.problems.append(
                    AuditProblem(None, ProblemKind.TOO_MANY, f"stopped listing after {PROBLEMS_MAX} problems")
                )
                break
        else:
            walk.finish()
        return sorted(walk.problems, key=lambda problem: (problem.seq is None, problem.seq or 0))


class _ChainWalk:
    """The state of one pass over a log: the head so far, the seqs still missing, the problems found."""

    def __init__(self, expected_head: tuple[int, str] | None) -> None:
        self.problems: list[AuditProblem] = []
        self.head: AuditEntry | None = None  # the entry with the highest seq so far
        self.gaps: list[tuple[int, int]] = []  # (first, last) seqs missing so far, inclusive
        self.unreadable_seqs: set[int] = set()
        self.anchor = expected_head
        self.hash_at_anchor: str | None = None  # the hash of the entry at the anchor's seq, once seen

    def take(self, item: AuditEntry | tuple[bytes, bytes]) -> None:
        entry = self._read(item)
        if entry is None:
            return
        if entry.computed_hash() != entry.hash:
            self._report(entry.seq, ProblemKind.EDITED, "its content does not give its hash")
        if self.anchor is not None and entry.seq == self.anchor[0]:
            self.hash_at_anchor = entry.hash
        if self.head is None or entry.seq > self.head.seq:
            self._advance(entry)
        elif entry.seq == self.head.seq:
            self._report(entry.seq, ProblemKind.DUPLICATE, "this seq appears twice")
        else:
            filled = self._fill_gap(entry.seq)
            detail = "which was counted missing" if filled else "which was already seen"
            self._report(entry.seq, ProblemKind.REORDERED, f"comes after seq {self.head.seq}, {detail}")

    def finish(self) -> None:
        for first, last in self.gaps:
            missing = [seq for seq in range(first, last + 1) if seq not in self.unreadable_seqs]
            if missing:
                span = f"seq {first}" if first == last else f"seqs {first} to {last}"
                self._report(first, ProblemKind.REMOVED, f"{span} missing before seq {last + 1}")
        if self.anchor is not None:
            self._check_anchor(*self.anchor)

    def _read(self, item: AuditEntry | tuple[bytes, bytes]) -> AuditEntry | None:
        if isinstance(item, AuditEntry):
            return item
        key, value = item
        try:
            key_seq = decode_key(key)
        except AuditFormatError as exc:
            self._report(None, ProblemKind.UNREADABLE, str(exc))
            return None
        try:
            entry = AuditEntry.from_bytes(value)
        except AuditFormatError as exc:
            self.unreadable_seqs.add(key_seq)
            self._report(key_seq, ProblemKind.UNREADABLE, str(exc))
            return None
        if entry.seq != key_seq:
            self._report(
                key_seq, ProblemKind.REORDERED, f"stored under key seq {key_seq} but says seq {entry.seq}"
            )
        return entry

    def _advance(self, entry: AuditEntry) -> None:
        expected_seq = 1 if self.head is None else self.head.seq + 1
        if entry.seq > expected_seq:
            self.gaps.append((expected_seq, entry.seq - 1))
        elif self.head is None and entry.prev_hash != GENESIS_HASH:
            self._report(
                entry.seq, ProblemKind.BROKEN_LINK, "the first entry does not start from the genesis hash"
            )
        elif self.head is not None and entry.prev_hash != self.head.hash:
            self._report(
                entry.seq,
                ProblemKind.BROKEN_LINK,
                f"prev_hash is not the hash of seq {self.head.seq}: that entry was rewritten, "
                "or entries were removed and the rest renumbered",
            )
        self.head = entry

    def _fill_gap(self, seq: int) -> bool:
        for index, (first, last) in enumerate(self.gaps):
            if first <= seq <= last:
                pieces = [(first, seq - 1), (seq + 1, last)]
                self.gaps[index : index + 1] = [(lo, hi) for lo, hi in pieces if lo <= hi]
                return True
        return False

    def _check_anchor(self, anchor_seq: int, anchor_hash: str) -> None:
        head_seq = 0 if self.head is None else self.head.seq
        if head_seq < anchor_seq:
            self._report(
                anchor_seq,
                ProblemKind.TRUNCATED,
                f"the log ends at seq {head_seq}, the anchor is at seq {anchor_seq}",
            )
        elif self.hash_at_anchor is not None and self.hash_at_anchor != anchor_hash:
            self._report(anchor_seq, ProblemKind.ANCHOR_MISMATCH, "the entry's hash is not the anchor's hash")

    def _report(self, seq: int | None, kind: ProblemKind, message: str) -> None:
        self.problems.append(AuditProblem(seq, kind, message))


def _canonical_json(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def _check_entry_fields(record: Mapping[str, Any]) -> None:
    seq = record["seq"]
    if type(seq) is not int or not 1 <= seq <= SEQ_MAX:
        raise AuditFormatError("seq", f"{seq!r} is not an integer in 1..{SEQ_MAX}")
    for name in ("time", "actor", "channel", "action", "subject"):
        text = record[name]
        if not isinstance(text, str) or not text or len(text) > TEXT_FIELD_LENGTH_MAX:
            raise AuditFormatError(
                name, f"must be a non-empty str of at most {TEXT_FIELD_LENGTH_MAX} characters"
            )
    try:
        _dt.datetime.fromisoformat(record["time"])
    except ValueError:
        raise AuditFormatError("time", f"{record['time']!r} is not an ISO 8601 instant") from None
    for name in ("prev_hash", "hash"):
        digest = record[name]
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX_DIGITS:
            raise AuditFormatError(name, "must be 64 lower-case hex digits")
    if not isinstance(record["details"], dict):
        raise AuditFormatError("details", "must be a JSON object")
    try:
        details_bytes = len(_canonical_json(record["details"]))
        _canonical_json(record)
    except UnicodeEncodeError as exc:
        raise AuditFormatError("text", f"holds a character UTF-8 cannot carry ({exc.reason})") from None
    if details_bytes > DETAILS_BYTES_MAX:
        raise AuditFormatError("details", f"take more than {DETAILS_BYTES_MAX} bytes")
