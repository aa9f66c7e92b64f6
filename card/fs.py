"""The chip's ISO 7816-4 file system: MF, DFs (by FID and by DF name), transparent and record EFs.

Files are plain objects with a JSON form (`to_json` / `from_json`); `from_json` treats the stored
image as untrusted input and checks every size against the limits below. Operations that write
check everything first and mutate last, raising `Refusal` before touching anything, which is
what lets the COS promise "a refused command changes nothing".

Record numbering follows ISO: record 1 is the first record of a linear file and the most recent
one of a cyclic file (appending to a cyclic file pushes the oldest out).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .keys import CardKey, KeyUsage
from .sw import SW, Refusal

__all__ = [
    "EF_BYTES_MAX",
    "MF_FID",
    "NAME_BYTES_MAX",
    "RECORDS_MAX",
    "RECORD_BYTES_MAX",
    "SFI_MAX",
    "Access",
    "DedicatedFile",
    "EfKind",
    "ElementaryFile",
]

MF_FID = 0x3F00
SFI_MAX = 30  # 5 bits; 31 (11111) is reserved
RECORD_BYTES_MAX = 254  # a record plus its SW fits one short response
RECORDS_MAX = 254  # record numbers 1..254 (FF is reserved)
EF_BYTES_MAX = 0x8000  # READ BINARY's 15-bit offset addresses 32 KiB
NAME_BYTES_MAX = 16  # ISO 7816-4 DF name
DF_DEPTH_MAX = 4
FILES_PER_DF_MAX = 64


class Access(StrEnum):
    """Who may read or update an EF. AUTH = EXTERNAL AUTHENTICATE with the DF's maintenance key."""

    ALWAYS = "always"
    NEVER = "never"
    PIN = "pin"
    AUTH = "auth"


class EfKind(StrEnum):
    TRANSPARENT = "transparent"
    LINEAR_FIXED = "linear-fixed"
    LINEAR_VARIABLE = "linear-variable"
    CYCLIC = "cyclic"


@dataclass(slots=True, eq=False)
class ElementaryFile:
    fid: int
    kind: EfKind
    sfi: int | None = None
    read: Access = Access.ALWAYS
    update: Access = Access.NEVER
    data: bytearray = field(default_factory=bytearray)  # transparent files: fixed size
    records: list[bytes] = field(default_factory=list)
    record_bytes: int = 0  # fixed and cyclic: every record's length; variable: the maximum
    records_max: int = 0
    tlv: bool = False  # records are tag || length || value; the tag is the record identifier

    @property
    def is_record_file(self) -> bool:
        return self.kind is not EfKind.TRANSPARENT

    # -- transparent --------------------------------------------------------------------------

    def read_binary(self, offset: int, count: int) -> bytes:
        self._require(EfKind.TRANSPARENT)
        if offset >= len(self.data):
            raise Refusal(SW.OFFSET_OUTSIDE)
        return bytes(self.data[offset : offset + count])

    def check_update_binary(self, offset: int, chunk: bytes) -> None:
        self._require(EfKind.TRANSPARENT)
        if offset >= len(self.data):
            raise Refusal(SW.OFFSET_OUTSIDE)
        if offset + len(chunk) > len(self.data):
            raise Refusal(SW.NOT_ENOUGH_MEMORY)

    def update_binary(self, offset: int, chunk: bytes) -> None:
        self.check_update_binary(offset, chunk)
        self.data[offset : offset + len(chunk)] = chunk

    # -- records ------------------------------------------------------------------------------

    def record(self, number: int) -> bytes:
        self._require_records()
        if not 1 <= number <= len(self.records):
            raise Refusal(SW.RECORD_NOT_FOUND)
        return self.records[number - 1]

    def find_record(self, identifier: int) -> int:
        """Number of the first record whose identifier (its TLV tag) is `identifier`."""
        self._require_records()
        if self.tlv:
            for number, rec in enumerate(self.records, start=1):
                if rec and rec[0] == identifier:
                    return number
        raise Refusal(SW.RECORD_NOT_FOUND)

    def check_record(self, rec: bytes) -> None:
        """Refuse a record this file cannot hold (67 00 wrong length, 6A 80 bad TLV)."""
        self._require_records()
        if self.kind is EfKind.LINEAR_VARIABLE:
            if not 1 <= len(rec) <= self.record_bytes:
                raise Refusal(SW.WRONG_LENGTH)
        elif len(rec) != self.record_bytes:
            raise Refusal(SW.WRONG_LENGTH)
        if self.tlv and (len(rec) < 2 or rec[1] != len(rec) - 2 or rec[0] in (0x00, 0xFF)):
            raise Refusal(SW.WRONG_DATA)

    def update_record(self, number: int, rec: bytes) -> None:
        # ISO lets UPDATE RECORD rewrite a cyclic record in place; only APPEND RECORD rotates.
        self.record(number)
        self.check_record(rec)
        self.records[number - 1] = bytes(rec)

    def check_append(self, rec: bytes) -> None:
        self.check_record(rec)
        if self.kind is not EfKind.CYCLIC and len(self.records) >= self.records_max:
            raise Refusal(SW.NOT_ENOUGH_MEMORY)

    def append_record(self, rec: bytes) -> None:
        self.check_append(rec)
        self.append_checked_record(rec)

    def append_checked_record(self, rec: bytes) -> None:
        """append_record for a caller that ran check_append(rec) already (before its first mutation)."""
        if self.kind is EfKind.CYCLIC:
            self.records.insert(0, bytes(rec))
            del self.records[self.records_max :]
        else:
            self.records.append(bytes(rec))

    def _require(self, kind: EfKind) -> None:
        if self.kind is not kind:
            raise Refusal(SW.FILE_STRUCTURE)

    def _require_records(self) -> None:
        if not self.is_record_file:
            raise Refusal(SW.FILE_STRUCTURE)

    # -- storage ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fid": self.fid,
            "kind": str(self.kind),
            "sfi": self.sfi,
            "read": str(self.read),
            "update": str(self.update),
        }
        if self.is_record_file:
            out.update(record_bytes=self.record_bytes, records_max=self.records_max, tlv=self.tlv)
        name, content = self.content_to_json()
        out[name] = content
        return out

    def content_to_json(self) -> tuple[str, Any]:
        """What commands can change in this file, and its name in to_json(): the records or the data.
        Everything else about a file is fixed when the card is personalised."""
        if self.is_record_file:
            return "records", [r.hex() for r in self.records]
        return "data", self.data.hex()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ElementaryFile:
        ef = cls(
            fid=_fid(obj["fid"]),
            kind=EfKind(obj["kind"]),
            sfi=obj["sfi"],
            read=Access(obj["read"]),
            update=Access(obj["update"]),
        )
        if ef.sfi is not None and (not isinstance(ef.sfi, int) or not 1 <= ef.sfi <= SFI_MAX):
            raise ValueError("SFI out of range")
        if ef.is_record_file:
            ef.record_bytes = _int(obj["record_bytes"], 1, RECORD_BYTES_MAX, "record_bytes")
            ef.records_max = _int(obj["records_max"], 1, RECORDS_MAX, "records_max")
            ef.tlv = bool(obj["tlv"])
            records = [bytes.fromhex(r) for r in obj["records"]]
            if len(records) > ef.records_max:
                raise ValueError("more records than records_max")
            for rec in records:
                try:
                    ef.check_record(rec)
                except Refusal:
                    raise ValueError(f"EF {ef.fid:04X}: a stored record does not fit the file") from None
            ef.records = records
        else:
            ef.data = bytearray.fromhex(obj["data"])
            if len(ef.data) > EF_BYTES_MAX:
                raise ValueError("transparent EF too large")
        return ef


@dataclass(slots=True, eq=False)
class DedicatedFile:
    fid: int | None = None
    name: bytes | None = None
    application: str = ""  # which COS application serves it: "", "ssse", "purse"
    efs: list[ElementaryFile] = field(default_factory=list)
    dfs: list[DedicatedFile] = field(default_factory=list)
    keys: list[CardKey] = field(default_factory=list)
    parent: DedicatedFile | None = field(default=None, repr=False)

    def add(self, child: ElementaryFile | DedicatedFile) -> None:
        if isinstance(child, DedicatedFile):
            child.parent = self
            self.dfs.append(child)
        else:
            self.efs.append(child)

    def ef_by_fid(self, fid: int) -> ElementaryFile | None:
        return next((ef for ef in self.efs if ef.fid == fid), None)

    def ef_by_sfi(self, sfi: int) -> ElementaryFile | None:
        return next((ef for ef in self.efs if ef.sfi == sfi), None)

    def df_by_fid(self, fid: int) -> DedicatedFile | None:
        return next((df for df in self.dfs if df.fid == fid), None)

    def walk(self) -> Iterator[DedicatedFile]:
        """This DF and every DF below it, depth first."""
        yield self
        for child in self.dfs:
            yield from child.walk()

    def find_by_name(self, name: bytes) -> DedicatedFile | None:
        return next((df for df in self.walk() if df.name == name), None)

    def key(self, usage: KeyUsage, index: int) -> CardKey | None:
        return next((k for k in self.keys if k.usage is usage and k.index == index), None)

    def keys_of(self, usage: KeyUsage) -> list[CardKey]:
        return [k for k in self.keys if k.usage is usage]

    # -- storage ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "fid": self.fid,
            "name": self.name.hex() if self.name is not None else None,
            "application": self.application,
            "keys": [k.to_json() for k in self.keys],
            "efs": [ef.to_json() for ef in self.efs],
            "dfs": [df.to_json() for df in self.dfs],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], depth: int = 0) -> DedicatedFile:
        if depth >= DF_DEPTH_MAX:
            raise ValueError("DF tree too deep")
        name = bytes.fromhex(obj["name"]) if obj["name"] is not None else None
        if name is not None and not 1 <= len(name) <= NAME_BYTES_MAX:
            raise ValueError("DF name length out of range")
        df = cls(
            fid=_fid(obj["fid"]) if obj["fid"] is not None else None,
            name=name,
            application=str(obj["application"]),
            keys=[CardKey.from_json(k) for k in obj["keys"]],
        )
        if len(obj["efs"]) + len(obj["dfs"]) > FILES_PER_DF_MAX:
            raise ValueError("too many files in one DF")
        for ef_obj in obj["efs"]:
            df.add(ElementaryFile.from_json(ef_obj))
        for df_obj in obj["dfs"]:
            df.add(cls.from_json(df_obj, depth + 1))
        return df


def _int(value: Any, low: int, high: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer {low}..{high}")
    return value


def _fid(value: Any) -> int:
    return _int(value, 0, 0xFFFF, "fid")
