"""The chip's persistent state (its "EEPROM") and how it reaches the disk in one atomic step.

`CardImage` is everything that survives a power cut: the file tree with its keys, the PIN and
its retry counter, the purse's balances, counters and proofs, serialised as one JSON document.
`FileStore` keeps a journal of such documents, one checksummed line per command: a card pulled
(or a process killed) at any instant leaves either the state before the command or the state
after it, never a mix (see FileStore). Reading treats the file as untrusted input: checksums,
then every size and range (`CardStateError` names what is wrong).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .fs import MF_FID, DedicatedFile
from .purse import PurseData

__all__ = [
    "PIN_BYTES_MAX",
    "PIN_BYTES_MIN",
    "STATE_FORMAT",
    "CardImage",
    "CardStateError",
    "FileStore",
    "MemoryStore",
    "PinState",
    "StateStore",
    "is_valid_pin",
    "pin_from_digits",
]

STATE_FORMAT = "citycard-card-state/1"
PIN_BYTES_MIN = 2  # PBOC PINs: 4..12 digits, BCD, F-padded (2..6 bytes)
PIN_BYTES_MAX = 6
PIN_TRIES_MAX = 15  # what a 63 Cx nibble can report
STATE_BYTES_MAX = 4 * 1024 * 1024
TEMP_SUFFIX = ".tmp"
JOURNAL_COMPACT_BYTES = 64 * 1024  # past this, the journal is rewritten as its newest record
CRC_FIELD_BYTES = 9  # 8 hex digits and a space
# One compact encoder for every commit: key order is fixed by to_json itself (no sort_keys), the tree
# has no cycles (no check_circular), and ensure_ascii keeps every record on one line.
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False, ensure_ascii=True)


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


@dataclass(slots=True, eq=False)
class CardImage:
    mf: DedicatedFile
    pin: PinState
    purse: PurseData | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "mf": self.mf.to_json(),
            "pin": self.pin.to_json(),
            "purse": self.purse.to_json() if self.purse is not None else None,
        }

    def to_bytes(self) -> bytes:
        return _ENCODER.encode(self.to_json()).encode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "card state") -> CardImage:
        if len(raw) > STATE_BYTES_MAX:
            raise CardStateError(f"{source}: larger than {STATE_BYTES_MAX} bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CardStateError(f"{source}: not JSON ({exc.msg if hasattr(exc, 'msg') else 'bad bytes'})") from None
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


class StateStore(Protocol):
    def save(self, data: bytes) -> None:
        """Persist the whole image atomically, or raise and leave the previous one in place."""


class FileStore:
    """A card state file: a journal of whole-image records, one JSON line each, newest last.

    Each `save` appends one record, `crc32 (8 hex) SP json LF`, in one write() (then fdatasync
    when `fsync` is on). A record is the whole image, so a record that is complete and checks out
    is a whole state; a card pulled or a process killed mid-write leaves a torn last line, which
    reading ignores (the state before the command) and the next writer cuts off. Once the journal
    passes JOURNAL_COMPACT_BYTES it is rewritten as its newest record the classic way (temporary
    file, fsync, os.replace, fsync of the directory). Appending instead of replacing the file on
    every command saves a rename (and the directory fsync) per command.

    `fsync=False` keeps the atomicity (safe against a pulled card or a killed process) but not the
    durability against a power cut of the host.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self._size = 0  # bytes of whole records in the file (where the next record goes)

    def load(self) -> CardImage:
        """The newest whole record. Read-only: a torn tail is ignored here, cut off by the writer."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise CardStateError(f"{self.path}: cannot read ({exc.strerror})") from None
        record, _ = _newest_record(raw, str(self.path))
        return CardImage.from_bytes(record, source=str(self.path))

    def save(self, data: bytes) -> None:
        if b"\n" in data:
            raise ValueError("a state record must be a single line")
        record = f"{zlib.crc32(data):08x} ".encode("ascii") + data + b"\n"
        if self._fd is None:
            self._open_for_append()
        if self._size + len(record) > JOURNAL_COMPACT_BYTES:
            self._rewrite(record)
            return
        assert self._fd is not None
        try:
            if os.write(self._fd, record) != len(record):
                raise OSError("short write of a card state record")
            if self.fsync:
                os.fdatasync(self._fd)
        except BaseException:
            os.ftruncate(self._fd, self._size)  # no half record, and no record the card did not confirm
            raise
        self._size += len(record)

    def create(self, image: CardImage) -> None:
        """Write a new card; refuse to overwrite an existing one."""
        if self.path.exists():
            raise CardStateError(f"{self.path}: exists already; a new card needs a new file")
        data = image.to_bytes()
        self._write_whole_file(f"{zlib.crc32(data):08x} ".encode("ascii") + data + b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def _open_for_append(self) -> None:
        self._remove_stale_temporaries()
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise CardStateError(f"{self.path}: cannot read ({exc.strerror})") from None
        _, whole_bytes = _newest_record(raw, str(self.path))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        if whole_bytes != len(raw):
            os.ftruncate(fd, whole_bytes)  # cut a torn last record before writing after it
        self._fd, self._size = fd, whole_bytes

    def _rewrite(self, record: bytes) -> None:
        self.close()
        self._write_whole_file(record)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(record)

    def _write_whole_file(self, content: bytes) -> None:
        directory = self.path.parent
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=directory)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(content)
                tmp.flush()
                if self.fsync:
                    os.fsync(tmp.fileno())
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


def _newest_record(raw: bytes, source: str) -> tuple[bytes, int]:
    """The newest whole record and the number of bytes that hold whole records.

    Only the last line may be bad (torn by a pull or a crash: no newline, or a checksum that
    fails); a bad line with whole records after it is corruption, not tearing, and is refused.
    """
    newest: bytes | None = None
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
        newest, position = line[CRC_FIELD_BYTES:], newline + 1
    if newest is None:
        raise CardStateError(f"{source}: no whole card state record")
    return newest, position


def _record_ok(line: bytes) -> bool:
    if len(line) <= CRC_FIELD_BYTES or line[CRC_FIELD_BYTES - 1 : CRC_FIELD_BYTES] != b" ":
        return False
    try:
        crc = int(line[: CRC_FIELD_BYTES - 1], 16)
    except ValueError:
        return False
    return crc == zlib.crc32(line[CRC_FIELD_BYTES:])


class MemoryStore:
    """Keeps the last saved image in memory: unit tests and the fuzz run."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.saves = 0

    def save(self, data: bytes) -> None:
        self.data = data
        self.saves += 1
