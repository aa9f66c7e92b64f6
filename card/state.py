"""The chip's persistent state (its "EEPROM") and how it reaches the disk in one atomic step.

`CardImage` is everything that survives a power cut: the file tree with its keys, the PIN and
its retry counter, the purse's balances, counters and proofs, serialised as one JSON document.
A store keeps a journal of checksummed JSON lines: first a whole image, then one line per
state-changing command holding the new value of each part the command changed (see FileStore).
A card pulled (or a process killed) at any instant leaves either the state before the command or
the state after it, never a mix. Reading treats the journal as untrusted input: checksums, then
every size and range of the state it yields (`CardStateError` names what is wrong).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the stdlib encoder writes the same bytes
    orjson = None  # type: ignore[assignment]

from .fs import MF_FID, DedicatedFile, EfKind, ElementaryFile
from .keys import CardKey
from .purse import PurseData

__all__ = [
    "JOURNAL_COMPACT_BYTES",
    "PIN_BYTES_MAX",
    "PIN_BYTES_MIN",
    "STATE_FORMAT",
    "CardImage",
    "CardStateError",
    "FileStore",
    "MemoryStore",
    "Part",
    "PinState",
    "StateStore",
    "apply_changes",
    "apply_pushes",
    "change_record",
    "is_valid_pin",
    "journal_state",
    "pin_from_digits",
]

STATE_FORMAT = "citycard-card-state/1"
PIN_BYTES_MIN = 2  # PBOC PINs: 4..12 digits, BCD, F-padded (2..6 bytes)
PIN_BYTES_MAX = 6
PIN_TRIES_MAX = 15  # what a 63 Cx nibble can report
STATE_BYTES_MAX = 4 * 1024 * 1024
TEMP_SUFFIX = ".tmp"
# Past this, the journal is rewritten as one whole image. A purchase adds about 0.22 KB, so this is
# one rewrite per ~1,150 purchases (rare enough to stay out of the p99) and ~35 ms of replay when
# a card with a full journal is opened.
JOURNAL_COMPACT_BYTES = 256 * 1024
JOURNAL_BYTES_MAX = JOURNAL_COMPACT_BYTES + STATE_BYTES_MAX  # a journal due for compaction, plus one record
CRC_FIELD_BYTES = 9  # 8 hex digits and a space
PREALLOCATE_CHUNK_BYTES = 64 * 1024  # zeros written per call when a syncing journal is preallocated
REPLACE = "replace"  # a change record: {"replace": {pointer: value}, "push": {pointer: [value, keep]}}
PUSH = "push"  # (either key may be missing; see apply_changes and apply_pushes)
PUSH_KEEP_MAX = 254  # a push keeps at most this many entries (RECORDS_MAX; proofs keep PROOFS_KEPT)
# The stdlib's most compact form: key order is fixed by to_json itself (no sort_keys), the tree has no
# cycles (no check_circular), and ensure_ascii keeps every record on one line.
_STDLIB_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False, ensure_ascii=True)


def json_bytes_stdlib(obj: Any) -> bytes:
    return _STDLIB_ENCODER.encode(obj).encode("ascii")


def json_bytes_orjson(obj: Any) -> bytes:
    """orjson writes the same compact JSON in a tenth of the time (~1 µs instead of ~9 µs for a
    purchase's change record, which is a tenth of the card's work in a DEBIT). Our documents hold only
    ASCII (hex strings, numbers, fixed names), so the bytes are the stdlib's exactly (a test checks it)
    and a journal does not depend on which encoder wrote it."""
    return orjson.dumps(obj)


json_bytes = json_bytes_orjson if orjson is not None else json_bytes_stdlib


class CardStateError(ValueError):
    """A card state file cannot be used; the message says which part and why."""


def pin_from_digits(digits: str) -> bytes:
    """'123456' -> 12 34 56; an odd count is padded with F ('12345' -> 12 34 5F)."""
    if not digits.isascii() or not digits.isdigit() or not 4 <= len(digits) <= 12:
        raise ValueError("a PIN is 4 to 12 decimal digits")
    return bytes.fromhex(digits + ("F" if len(digits) % 2 else ""))


def is_valid_pin(pin: bytes) -> bool:
    """BCD digits, with at most the very last nibble F."""
    if not PIN_BYTES_MIN <= len(pin) <= PIN_BYTES_MAX:
        return False
    nibbles = pin.hex().upper()
    nibbles = nibbles.removesuffix("F")
    return nibbles.isdigit()


@dataclass(slots=True, eq=False)
class PinState:
    value: bytes = field(repr=False)
    tries_max: int
    tries_left: int

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value.hex(), "tries_max": self.tries_max, "tries_left": self.tries_left}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PinState:
        pin = cls(bytes.fromhex(obj["value"]), obj["tries_max"], obj["tries_left"])
        if not is_valid_pin(pin.value):
            raise ValueError("stored PIN is malformed")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pin.tries_max, pin.tries_left)):
            raise ValueError("PIN tries must be integers")
        if not 0 <= pin.tries_left <= pin.tries_max <= PIN_TRIES_MAX or pin.tries_max == 0:
            raise ValueError("PIN tries out of range")
        return pin


# The parts of an image a command can change (CardImage.change says what of each is recorded).
Part = PinState | PurseData | ElementaryFile | CardKey


@dataclass(slots=True, eq=False)
class CardImage:
    mf: DedicatedFile
    pin: PinState
    purse: PurseData | None = None
    # id(part) -> (part, its JSON pointer); rebuilt whenever a part is not found in it
    _pointers: dict[int, tuple[object, str]] = field(default_factory=dict, init=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "mf": self.mf.to_json(),
            "pin": self.pin.to_json(),
            "purse": self.purse.to_json() if self.purse is not None else None,
        }

    def to_bytes(self) -> bytes:
        return json_bytes(self.to_json())

    def change(self, part: Part) -> tuple[str, Any]:
        """How a change of `part` is recorded: a JSON pointer (RFC 6901) into this image's JSON
        document, and the new value to put there.

        Only what commands can change is recorded: an EF's records or data, a key's error counter,
        the PIN and the purse data whole. The file tree never changes shape after personalisation
        (the COS has no CREATE or DELETE FILE), so a pointer stays valid for the life of the card.
        """
        pointer = self.pointer(part)
        if isinstance(part, ElementaryFile):
            name, content = part.content_to_json()
            return f"{pointer}/{name}", content
        if isinstance(part, CardKey):
            return f"{pointer}/tries_left", part.tries_left
        return pointer, part.to_json()

    def appended(self, ef: ElementaryFile) -> tuple[str, list[Any]]:
        """How APPEND to a cyclic file is recorded, as a push (apply_pushes): the newest record (record 1)
        goes in front, and the file keeps its records_max. A purchase so writes one 23-byte record, not
        all ten."""
        if ef.kind is not EfKind.CYCLIC or not ef.records:
            raise ValueError("only an append to a cyclic file is recorded as a push")
        return f"{self.pointer(ef)}/records", [ef.records[0].hex(), ef.records_max]

    def record_changed(self, ef: ElementaryFile, number: int) -> tuple[str, str]:
        """How UPDATE RECORD of record `number` is recorded: that record alone (a replace of one list item)."""
        return f"{self.pointer(ef)}/records/{number - 1}", ef.record(number).hex()

    def pointer(self, part: Part) -> str:
        """The JSON pointer of `part` in this image's document (stable: the tree never changes shape)."""
        entry = self._pointers.get(id(part))
        if entry is None or entry[0] is not part:
            self._pointers = {id(p): (p, pointer) for pointer, p in self._parts()}
            entry = self._pointers.get(id(part))
            if entry is None or entry[0] is not part:
                raise ValueError(f"this {type(part).__name__} is not a part of the card image")
        return entry[1]

    def _parts(self) -> Iterator[tuple[str, object]]:
        yield "/pin", self.pin
        if self.purse is not None:
            yield "/purse", self.purse
        yield from _df_parts(self.mf, "/mf")

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "card state") -> CardImage:
        if len(raw) > STATE_BYTES_MAX:
            raise CardStateError(f"{source}: larger than {STATE_BYTES_MAX} bytes")
        return cls.from_json(_json_object(raw, source), source)

    @classmethod
    def from_json(cls, obj: Any, source: str = "card state") -> CardImage:
        """Check every part of an untrusted document and build the image; nothing of `obj` is kept."""
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise CardStateError(f"{source}: 'format' must be {STATE_FORMAT!r}")
        part = "mf"
        try:
            mf = DedicatedFile.from_json(obj["mf"])
            if mf.fid != MF_FID:
                raise ValueError("the root DF must be the MF (3F00)")
            part = "pin"
            pin = PinState.from_json(obj["pin"])
            part = "purse"
            purse = PurseData.from_json(obj["purse"]) if obj["purse"] is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # The message of a ValueError raised by our own checks names the problem; a KeyError
            # names a missing field. Neither ever contains a key or PIN value.
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
            raise CardStateError(f"{source}: {part}: {detail}") from None
        if purse is not None and not any(df.application == "purse" for df in mf.walk()):
            raise CardStateError(f"{source}: purse data without a purse application")
        return cls(mf, pin, purse)


def _df_parts(df: DedicatedFile, pointer: str) -> Iterator[tuple[str, object]]:
    for index, ef in enumerate(df.efs):
        yield f"{pointer}/efs/{index}", ef
    for index, key in enumerate(df.keys):
        yield f"{pointer}/keys/{index}", key
    for index, child in enumerate(df.dfs):
        yield from _df_parts(child, f"{pointer}/dfs/{index}")


def apply_changes(doc: dict[str, Any], changes: dict[str, Any]) -> None:
    """Replace, in an image's JSON document, the value at each pointer by the new one.

    This is JSON Patch's "replace" (RFC 6902): the pointer must name a value that exists; nothing
    is ever added or removed. The values are not checked here: the document they make is, as a
    whole, by CardImage.from_json. Raises ValueError for a pointer that names nothing.
    """
    for pointer, value in changes.items():
        if not isinstance(pointer, str) or not pointer.startswith("/"):
            raise ValueError("a change must be addressed by a JSON pointer")
        *path, last = pointer[1:].split("/")
        node: Any = doc
        for token in path:
            node = _child(node, token, pointer)
        _child(node, last, pointer)  # must exist: replace, never add
        node[int(last) if isinstance(node, list) else last] = value


def _child(node: Any, token: str, pointer: str) -> Any:
    if isinstance(node, dict) and token in node:
        return node[token]
    if isinstance(node, list) and token.isdigit() and int(token) < len(node):
        return node[int(token)]
    raise ValueError(f"change at {pointer!r} names no part of the card")


def apply_pushes(doc: dict[str, Any], pushes: dict[str, Any]) -> None:
    """Put, in an image's JSON document, a new entry in front of the list at each pointer, then cut the
    list to `keep` entries: `{pointer: [value, keep]}`. This is how an append to a cyclic file (and
    PurseData.keep_proof) is recorded. Like apply_changes, the pointer must name a list that exists and
    the values are checked later, with the whole document. Raises ValueError for anything else."""
    for pointer, push in pushes.items():
        if not isinstance(pointer, str) or not pointer.startswith("/"):
            raise ValueError("a change must be addressed by a JSON pointer")
        if not isinstance(push, list) or len(push) != 2:
            raise ValueError(f"push at {pointer!r} is not [value, keep]")
        value, keep = push
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= PUSH_KEEP_MAX:
            raise ValueError(f"push at {pointer!r} keeps 1..{PUSH_KEEP_MAX} entries")
        node: Any = doc
        for token in pointer[1:].split("/"):
            node = _child(node, token, pointer)
        if not isinstance(node, list):  # bad journal data, like every other refusal here: ValueError
            raise ValueError(f"push at {pointer!r} names no list")  # noqa: TRY004
        node.insert(0, value)
        del node[keep:]


def _json_object(raw: bytes, source: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardStateError(f"{source}: not JSON ({exc.msg if hasattr(exc, 'msg') else 'bad bytes'})") from None


# -- the journal -------------------------------------------------------------------------------------


def _record(payload: bytes) -> bytes:
    """One journal line: crc32 (8 hex) SP payload LF."""
    if b"\n" in payload:
        raise ValueError("a journal record must be a single line")
    return b"%08x %b\n" % (zlib.crc32(payload), payload)


def change_record(changes: dict[str, Any], pushes: dict[str, Any] | None = None) -> bytes:
    """The journal line of one command's changes: replaces (apply_changes), then pushes (apply_pushes).
    A command never names one part in both (a push into a value the same record replaces)."""
    return _record(json_bytes({REPLACE: changes, PUSH: pushes} if pushes else {REPLACE: changes}))


def _replay(raw: bytes, source: str) -> tuple[dict[str, Any], int]:
    """The state a journal holds, as a JSON document, and the number of bytes that hold whole records.

    The state is the last whole image with every later change record applied in order. Only the
    last line may be bad (torn by a pull or a crash: no newline, or a checksum that fails); a bad
    line with whole records after it is corruption, not tearing, and is refused.
    """
    doc: dict[str, Any] | None = None
    position = 0
    while position < len(raw):
        newline = raw.find(b"\n", position)
        if newline < 0:
            break  # torn: the last record never got its newline
        line = raw[position:newline]
        if not _record_ok(line):
            if raw[newline + 1 :].strip(b"\0"):
                raise CardStateError(f"{source}: damaged record at byte {position} with records after it")
            break
        record = _json_object(line[CRC_FIELD_BYTES:], f"{source}: record at byte {position}")
        if not isinstance(record, dict):
            raise CardStateError(f"{source}: record at byte {position} is neither an image nor changes")
        if REPLACE in record or PUSH in record:
            if doc is None:
                raise CardStateError(f"{source}: changes at byte {position} before any whole card state")
            try:
                apply_changes(doc, record.get(REPLACE, {}))
                apply_pushes(doc, record.get(PUSH, {}))
            except (ValueError, AttributeError) as exc:
                raise CardStateError(f"{source}: record at byte {position}: {exc}") from None
        else:
            doc = record  # a whole image (personalisation or compaction): everything before is history
        position = newline + 1
    if doc is None:
        raise CardStateError(f"{source}: no whole card state record")
    return doc, position


def journal_state(image: bytes, records: bytes, source: str) -> dict[str, Any]:
    """The JSON document of a whole image (to_bytes) followed by change records (change_record)."""
    doc, whole_bytes = _replay(_record(image) + records, source)
    if whole_bytes != len(image) + CRC_FIELD_BYTES + 1 + len(records):
        raise CardStateError(f"{source}: a change record is not whole")
    return doc


def _record_ok(line: bytes) -> bool:
    if len(line) <= CRC_FIELD_BYTES or line[CRC_FIELD_BYTES - 1 : CRC_FIELD_BYTES] != b" ":
        return False
    try:
        crc = int(line[: CRC_FIELD_BYTES - 1], 16)
    except ValueError:
        return False
    return crc == zlib.crc32(line[CRC_FIELD_BYTES:])


class StateStore(Protocol):
    def save(self, record: bytes, image: CardImage) -> None:
        """Persist one command's change record (a journal line made by change_record) in one atomic
        step, or raise and leave the previous state in place. `image` already holds the changes; a
        store writes it whole when it starts or compacts its journal."""


class FileStore:
    """A card state file: a journal of checksummed JSON lines, one write() per state-changing command.

    The file starts with a whole image (`create`). Each `save` appends one line `crc32 SP json LF`
    holding `{"replace": {pointer: value, ...}, "push": {pointer: [value, keep], ...}}` (change_record):
    the new value of every part the command changed, or of the one item of a list it changed, and the
    entries it put in front of a list (a purchase: balance, counter, proof and detail record, ~0.22 KB).
    Reading applies the changes in order to the whole image; the result is checked like any image
    (CardImage.from_json).

    Anti-tearing does not need fsync. A card "pulled" mid-command is its process killed or its
    connection dropped; a record written by one write() then either is in the page cache whole or
    fails its checksum (a write can stop short at a page boundary when the process dies), and a
    record that is torn (no newline, bad checksum) is ignored on reading and cut off by the next
    writer: the card is before or after the command, never between. What fsync adds is durability
    against the *host* losing power, at ~0.3 ms or more per command on this machine's disk. So it is
    off by default; `fsync=True` (`citycard card virtual --fsync`) runs fdatasync after every record.

    Past JOURNAL_COMPACT_BYTES the journal is rewritten as one whole image the classic way
    (temporary file, fsync, os.replace; then fsync of the directory when `fsync` is on). That
    rewrite always syncs the new file before the rename: it replaces the only copy of the card, and
    a power cut must never leave an empty file in its place.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self._size = 0  # bytes of whole records in the file (where the next record goes)

    def load(self) -> CardImage:
        """The state the journal holds. Read-only: a torn tail is ignored here, cut off by the writer."""
        doc, _ = _replay(self._read(), str(self.path))
        return CardImage.from_json(doc, str(self.path))

    def save(self, record: bytes, image: CardImage) -> None:
        if self._fd is None:
            self._open_for_append()
        if self._size + len(record) > JOURNAL_COMPACT_BYTES:
            self._rewrite(_record(image.to_bytes()))
            return
        assert self._fd is not None
        try:
            if os.write(self._fd, record) != len(record):
                raise OSError("short write of a card state record")
            if self.fsync:
                os.fdatasync(self._fd)
        except BaseException:
            self._undo_write(len(record))  # no half record, and no record the card did not confirm
            raise
        self._size += len(record)

    def create(self, image: CardImage) -> None:
        """Write a new card (synced, whatever `fsync` says); refuse to overwrite an existing one."""
        if self.path.exists():
            raise CardStateError(f"{self.path}: exists already; a new card needs a new file")
        self._write_whole_file(_record(image.to_bytes()))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(JOURNAL_BYTES_MAX + 1)
        except OSError as exc:
            raise CardStateError(f"{self.path}: cannot read ({exc.strerror})") from None
        if len(raw) > JOURNAL_BYTES_MAX:
            raise CardStateError(f"{self.path}: larger than {JOURNAL_BYTES_MAX} bytes")
        return raw

    def _open_for_append(self) -> None:
        self._remove_stale_temporaries()
        raw = self._read()
        _, whole_bytes = _replay(raw, str(self.path))
        fd = os.open(self.path, os.O_WRONLY)
        self._fd, self._size = fd, whole_bytes
        torn = raw[whole_bytes:].strip(b"\0")  # what is left of a torn record (zeros: preallocated space)
        if torn or (not self.fsync and whole_bytes != len(raw)):
            os.ftruncate(fd, whole_bytes)  # cut a torn last record before writing after it
        self._ready_for_records(len(raw) if not torn else whole_bytes)

    def _ready_for_records(self, file_bytes: int) -> None:
        """Position the journal's fd after its last whole record; with `fsync`, preallocate first.

        fdatasync of a record that *grows* the file must also commit the new size and the new block
        to the file system's journal: two device writes and flushes instead of one. So a journal that
        syncs every record is kept JOURNAL_COMPACT_BYTES long, zeros after the last record (written
        and synced once, here: real zeros, since blocks reserved with fallocate would be converted on
        the first write, which is again metadata), and records overwrite zeros in place. Replay reads
        zeros after the last newline as unused space (see _replay). Costs 256 KiB of disk per card."""
        assert self._fd is not None
        if self.fsync and file_bytes < JOURNAL_COMPACT_BYTES:
            zeros = bytes(PREALLOCATE_CHUNK_BYTES)
            position = file_bytes
            while position < JOURNAL_COMPACT_BYTES:
                position += os.pwrite(self._fd, zeros[: JOURNAL_COMPACT_BYTES - position], position)
            os.fsync(self._fd)
        os.lseek(self._fd, self._size, os.SEEK_SET)

    def _undo_write(self, record_bytes: int) -> None:
        """Take back a record that failed: zeros over it in preallocated space, else cut the file."""
        assert self._fd is not None
        try:
            if self.fsync and self._size + record_bytes <= JOURNAL_COMPACT_BYTES:
                os.pwrite(self._fd, bytes(record_bytes), self._size)
            else:
                os.ftruncate(self._fd, self._size)
        finally:
            os.lseek(self._fd, self._size, os.SEEK_SET)

    def _rewrite(self, record: bytes) -> None:
        self.close()
        self._write_whole_file(record)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._size = len(record)
        self._ready_for_records(len(record))

    def _write_whole_file(self, content: bytes) -> None:
        directory = self.path.parent
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=directory)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(content)
                tmp.flush()
                os.fsync(tmp.fileno())  # always: see the class docstring
            os.replace(tmp_name, self.path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        if self.fsync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)

    def _remove_stale_temporaries(self) -> None:
        """A process killed between mkstemp and os.replace leaves its temporary file; it is garbage."""
        for stale in self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            try:
                stale.unlink()
            except OSError:
                pass


class MemoryStore:
    """The same journal in memory, for unit tests and the fuzz run; `load()` replays it.

    The first save writes the whole image (there is nothing to apply changes to yet).
    """

    def __init__(self) -> None:
        self.journal = bytearray()
        self.saves = 0

    def save(self, record: bytes, image: CardImage) -> None:
        if not self.journal or len(self.journal) + len(record) > JOURNAL_COMPACT_BYTES:
            self.journal = bytearray(_record(image.to_bytes()))
        else:
            self.journal += record
        self.saves += 1

    def load(self) -> CardImage:
        doc, _ = _replay(bytes(self.journal), "memory store")
        return CardImage.from_json(doc, "memory store")
