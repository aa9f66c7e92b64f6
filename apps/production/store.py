"""Where production keeps its state: key-value tables in the registry's LMDB environment, written in
the same units of work as the registry rows they go with (``Registry.begin`` ... ``commit``), so a
batch's rows, its persons and its ordered cards commit together or not at all.

Tables and keys::

    prod_imports        import id ("R000001")                  -> ImportRecord JSON
    prod_import_files   SHA-256 of a roster file (hex)         -> import id (re-importing a file is a no-op)
    prod_roster         citizen ID                             -> RosterEntry JSON (the person's latest roster data)
    prod_waiting        unit code ":" citizen ID               -> b"" (entries waiting for a batch)
    prod_photos         citizen ID                             -> PhotoRecord JSON (the photo file is DIR/production/photos)
    prod_batches        batch id ("B000001")                   -> Batch JSON
    prod_batch_rows     batch id ":" row (6 digits)            -> BatchRow JSON
    prod_cards          card number                            -> batch id ":" row (the row a card belongs to now)
    prod_chips          chip serial (hex)                      -> card number (a chip is registered once)

Files: DIR/production/imports (the archived roster files, their accepted-row spools and rejection
reports), DIR/production/photos (photos converted to the print specification, named by ID number),
DIR/production/chips (the personalised virtual cards, one state file per card number).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

import orjson
from citycard.core.identity import mask_id
from citycard.core.ledger import Ledger
from citycard.core.registry_records import ErrorCode, RegistryError
from citycard.core.registry_store import Stage

from .errors import ProductionError

__all__ = [
    "PRODUCTION_TABLES",
    "Batch",
    "BatchRow",
    "EntryState",
    "ImportRecord",
    "ImportState",
    "PhotoRecord",
    "ProductionStore",
    "RosterEntry",
    "RowState",
]

IMPORTS = "prod_imports"
IMPORT_FILES = "prod_import_files"
ROSTER = "prod_roster"
WAITING = "prod_waiting"
PHOTOS = "prod_photos"
BATCHES = "prod_batches"
BATCH_ROWS = "prod_batch_rows"
CARDS = "prod_cards"
CHIPS = "prod_chips"
PRODUCTION_TABLES = (IMPORTS, IMPORT_FILES, ROSTER, WAITING, PHOTOS, BATCHES, BATCH_ROWS, CARDS, CHIPS)

PRODUCTION_DIR = "production"
BATCH_ROWS_SCAN_MAX = 10_000  # a batch has at most settings.BATCH_ROWS_LIMIT rows
BATCH_EVENTS_MAX = 200  # events kept on a batch record; older ones stay in the audit log
BATCHES_SCAN_MAX = 100_000
ROW_DIGITS = 6


def encode(record: dict[str, Any]) -> bytes:
    """A production row as compact JSON with sorted keys (equal records are equal bytes). orjson writes
    the bytes the registry's stdlib encoder would for these records (text, integers, lists, null) in
    about a tenth of the time, which a batch of thousands of rows notices. The result is copied into a
    bytes object of its own size: orjson's comes from a larger buffer shrunk in place, and a commit
    holding thousands of rows would keep some 4 KiB of heap for each."""
    return bytes(memoryview(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)))


def decode(value: bytes, table: str, key: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise RegistryError("stored_row", f"table {table}, key {key!r} is not a JSON object",
                            code=ErrorCode.FAILED_PRECONDITION)
    return record


class ImportState(enum.StrEnum):
    IMPORTING = "importing"  # some chunks committed; rerun the same file to finish (production ignores it until then)
    COMPLETE = "complete"


class EntryState(enum.StrEnum):
    WAITING = "waiting"  # for a batch (and a photo)
    BATCHED = "batched"  # in a batch row that was not rejected
    CORRECTION = "correction"  # the employer rejected the row; a new roster row or photo sends it back to waiting


class RowState(enum.StrEnum):
    ORDERED = "ordered"  # in the batch, card ordered, waiting for the employer's verdict
    APPROVED = "approved"  # the employer approved it: it goes to the printing line
    REJECTED = "rejected"  # the employer rejected it: back to correction; final for this batch
    REGISTERED = "registered"  # the producer's printed card is registered (chip serial, ATR)
    PERSONALIZED = "personalized"  # holder data and diversified keys are on the chip
    AT_EMPLOYER = "at_employer"  # delivered to the employer
    HANDED_OVER = "handed_over"  # the employer handed it to the holder
    ACTIVATED = "activated"  # the holder changed the initial PIN; social security functions open


ROW_ORDER = {state: index for index, state in enumerate(RowState)}


class _Record:
    """JSON in and out: enum values as their text, everything else as stored."""

    def to_json(self) -> dict[str, Any]:
        return {name: value.value if isinstance(value, enum.Enum) else value
                for name, value in self.__dict__.items()}

    def stored(self) -> bytes:
        """The bytes of ``encode(self.to_json())``, without building that dict: orjson writes an enum
        member as its value (a test pins the equality)."""
        return encode(self.__dict__)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Self:
        return cls(**record)  # type: ignore[call-arg]


@dataclass(frozen=True)
class ImportRecord(_Record):
    import_id: str
    file_name: str  # as the operator gave it (base name)
    sha256: str
    format: str  # csv, dbf
    encoding: str
    rows: int  # records in the file
    accepted: int  # good rows (new, updated or unchanged)
    rejected: int
    state: ImportState
    started_at: str
    actor: str
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    committed_rows: int = 0  # accepted rows written so far (the import resumes after them)
    completed_at: str | None = None

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ImportRecord:
        return cls(**{**record, "state": ImportState(record["state"])})


@dataclass(frozen=True)
class RosterEntry(_Record):
    """A person as the e-government roster last described them, and where their card order stands."""

    id_number: str
    name: str
    gender: str  # male, female
    date_of_birth: str  # YYYY-MM-DD
    nationality: str
    ethnicity: str  # GB 3304 code, 2 digits
    residence: str
    household_registration: str
    employer: str
    import_id: str
    import_row: int
    state: EntryState
    batch_id: str | None = None
    batch_row: int | None = None
    reason: str | None = None  # why it is in correction

    IDENTITY_FIELDS = ("name", "gender", "date_of_birth", "nationality", "ethnicity", "residence",
                       "household_registration", "employer")

    def same_data(self, other: RosterEntry) -> bool:
        return all(getattr(self, name) == getattr(other, name) for name in self.IDENTITY_FIELDS)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RosterEntry:
        return cls(**{**record, "state": EntryState(record["state"])})


@dataclass(frozen=True)
class PhotoRecord(_Record):
    id_number: str
    sha256: str  # of the converted file
    source_name: str
    source_sha256: str
    source_format: str
    source_size: tuple[int, int] | list[int]
    bytes: int
    taken_at: str

    @property
    def file_name(self) -> str:
        return f"{self.id_number}.jpg"


@dataclass(frozen=True)
class Batch(_Record):
    batch_id: str
    employer: str
    employer_name: str
    rows: int
    created_at: str
    actor: str
    first_card: str
    last_card: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def with_event(self, event: str, at: str, actor: str, **details: Any) -> Batch:
        events = [*self.events, {"event": event, "at": at, "actor": actor, **details}][-BATCH_EVENTS_MAX:]
        return replace(self, events=events)


@dataclass(frozen=True)
class BatchRow(_Record):
    """One card of a batch: the data printed on it (a snapshot taken when the batch was made) and how
    far it has come."""

    batch_id: str
    row: int
    id_number: str
    name: str
    gender: str
    date_of_birth: str
    nationality: str
    ethnicity: str
    employer: str
    card_number: str
    card_id_code: str
    issue_date: str
    expiry_date: str
    photo_sha256: str
    state: RowState
    verdict_reason: str | None = None
    verdict_at: str | None = None
    chip_serial: str | None = None
    atr: str | None = None
    registered_at: str | None = None
    personalized_at: str | None = None
    at_employer: dict[str, str] | None = None  # receiver, at
    handed_over: dict[str, str] | None = None  # receiver, at
    activated: dict[str, str] | None = None  # institution, at
    bank_activation: dict[str, str] | None = None  # bank, at

    @property
    def key(self) -> bytes:
        return row_key(self.batch_id, self.row)

    @property
    def masked_id(self) -> str:
        return mask_id(self.id_number)

    @property
    def photo_file(self) -> str:
        return f"{self.id_number}.jpg"

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> BatchRow:
        return cls(**{**record, "state": RowState(record["state"])})


# What a new row sets, and what it leaves at the defaults (the verdict, the chip, the steps after).
_ROW_DEFAULTS = {item.name: item.default for item in fields(BatchRow) if item.default is not MISSING}
_NEW_ROW_FIELDS = {item.name for item in fields(BatchRow)} - _ROW_DEFAULTS.keys()


def row_key(batch_id: str, row: int) -> bytes:
    return f"{batch_id}:{row:0{ROW_DIGITS}d}".encode("ascii")


def waiting_key(employer: str, id_number: str) -> bytes:
    return f"{employer}:{id_number}".encode("ascii")


class ProductionStore:
    """Typed reads of the production tables, and staging of their rows into a registry unit of work."""

    def __init__(self, ledger: Ledger, data_dir: Path) -> None:
        self.ledger = ledger
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / PRODUCTION_DIR

    # -- files ----------------------------------------------------------------------------------------

    @property
    def imports_dir(self) -> Path:
        return self.root / "imports"

    @property
    def photos_dir(self) -> Path:
        return self.root / "photos"

    @property
    def chips_dir(self) -> Path:
        return self.root / "chips"

    def chip_path(self, card_number: str) -> Path:
        return self.chips_dir / f"{card_number}.json"

    # -- reads ----------------------------------------------------------------------------------------

    def _get(self, table: str, key: bytes) -> dict[str, Any] | None:
        value = self.ledger.get(table, key)
        return None if value is None else decode(value, table, key)

    def import_record(self, import_id: str) -> ImportRecord | None:
        found = self._get(IMPORTS, import_id.encode("ascii"))
        return None if found is None else ImportRecord.from_json(found)

    def import_of_file(self, sha256: str) -> ImportRecord | None:
        import_id = self.ledger.get(IMPORT_FILES, sha256.encode("ascii"))
        return None if import_id is None else self.import_record(import_id.decode("ascii"))

    def imports(self) -> list[ImportRecord]:
        return [ImportRecord.from_json(decode(value, IMPORTS, key)) for key, value in self.ledger.scan(IMPORTS)]

    def incomplete_imports(self) -> list[ImportRecord]:
        return [record for record in self.imports() if record.state is not ImportState.COMPLETE]

    def entry(self, id_number: str, stage: Stage | None = None) -> RosterEntry | None:
        key = id_number.encode("ascii")
        value = stage.get(ROSTER, key) if stage is not None else self.ledger.get(ROSTER, key)
        return None if value is None else RosterEntry.from_json(decode(value, ROSTER, key))

    def photo(self, id_number: str) -> PhotoRecord | None:
        found = self._get(PHOTOS, id_number.encode("ascii"))
        return None if found is None else PhotoRecord.from_json(found)

    def waiting(self, employer: str, limit: int) -> list[str]:
        """Citizen IDs waiting for a batch of ``employer``, in ID order."""
        prefix = f"{employer}:".encode("ascii")
        rows = self.ledger.scan(WAITING, start=prefix, stop=prefix + b"\xff", limit=limit)
        return [key[len(prefix):].decode("ascii") for key, _ in rows]

    def iter_waiting(self, employer: str, page_rows: int) -> Iterator[str]:
        """Citizen IDs waiting for a batch of ``employer``, in ID order, read a page at a time; an entry
        that leaves the index while this runs (a batch made from an earlier page) is not seen again."""
        prefix = f"{employer}:".encode("ascii")
        start, stop = prefix, prefix + b"\xff"
        while True:
            keys = [key for key, _ in self.ledger.scan(WAITING, start=start, stop=stop, limit=page_rows)]
            yield from (key[len(prefix):].decode("ascii") for key in keys)
            if len(keys) < page_rows:
                return
            start = keys[-1] + b"\x00"

    def waiting_employers(self) -> list[str]:
        """Unit codes with entries waiting, in order (one scan step per employer)."""
        employers: list[str] = []
        start = b""
        while True:
            rows = self.ledger.scan(WAITING, start=start, limit=1)
            if not rows:
                return employers
            employer = rows[0][0].split(b":", 1)[0]
            employers.append(employer.decode("ascii"))
            start = employer + b";"  # the byte after ':' : the next employer's first key

    def batch(self, batch_id: str) -> Batch:
        found = self._get(BATCHES, batch_id.encode("ascii"))
        if found is None:
            raise ProductionError("batch", f"no batch {batch_id}", code=ErrorCode.NOT_FOUND)
        return Batch.from_json(found)

    def batches(self) -> list[Batch]:
        return [Batch.from_json(decode(value, BATCHES, key))
                for key, value in self.ledger.scan(BATCHES, limit=BATCHES_SCAN_MAX)]

    def rows(self, batch_id: str) -> list[BatchRow]:
        prefix = f"{batch_id}:".encode("ascii")
        return [BatchRow.from_json(decode(value, BATCH_ROWS, key))
                for key, value in self.ledger.scan(BATCH_ROWS, start=prefix, stop=prefix + b"\xff",
                                                   limit=BATCH_ROWS_SCAN_MAX)]

    def row_of_card(self, card_number: str) -> BatchRow | None:
        key = self.ledger.get(CARDS, card_number.encode("ascii"))
        if key is None:
            return None
        found = self._get(BATCH_ROWS, key)
        return None if found is None else BatchRow.from_json(found)

    def card_of_chip(self, chip_serial: str) -> str | None:
        found = self.ledger.get(CHIPS, chip_serial.encode("ascii"))
        return None if found is None else found.decode("ascii")

    def iter_roster(self) -> Iterator[RosterEntry]:
        for key, value in self.ledger.scan(ROSTER):
            yield RosterEntry.from_json(decode(value, ROSTER, key))

    # -- staged writes ---------------------------------------------------------------------------------

    @staticmethod
    def put_import(stage: Stage, record: ImportRecord) -> None:
        stage.put(IMPORTS, record.import_id.encode("ascii"), record.stored())
        stage.put(IMPORT_FILES, record.sha256.encode("ascii"), record.import_id.encode("ascii"))

    @staticmethod
    def put_entry(stage: Stage, entry: RosterEntry, previous: RosterEntry | None) -> None:
        stage.put(ROSTER, entry.id_number.encode("ascii"), entry.stored())
        if previous is not None and previous.state is EntryState.WAITING:
            stage.put(WAITING, waiting_key(previous.employer, previous.id_number), None)
        if entry.state is EntryState.WAITING:
            stage.put(WAITING, waiting_key(entry.employer, entry.id_number), b"")

    @staticmethod
    def put_batched_entry(stage: Stage, entry: RosterEntry, batch_id: str, row: int) -> None:
        """``put_entry`` of the entry taken into row ``row`` of a batch, without building that entry (a
        batch of a hundred thousand persons notices the dataclass)."""
        stage.put(ROSTER, entry.id_number.encode("ascii"), encode(
            {**entry.__dict__, "state": EntryState.BATCHED, "batch_id": batch_id, "batch_row": row, "reason": None}))
        if entry.state is EntryState.WAITING:
            stage.put(WAITING, waiting_key(entry.employer, entry.id_number), None)

    @staticmethod
    def put_photo(stage: Stage, record: PhotoRecord) -> None:
        stage.put(PHOTOS, record.id_number.encode("ascii"), record.stored())

    @staticmethod
    def put_batch(stage: Stage, batch: Batch) -> None:
        stage.put(BATCHES, batch.batch_id.encode("ascii"), batch.stored())

    @staticmethod
    def put_row(stage: Stage, row: BatchRow) -> None:
        stage.put(BATCH_ROWS, row.key, row.stored())
        stage.put(CARDS, row.card_number.encode("ascii"), row.key)

    @staticmethod
    def put_new_row(stage: Stage, values: dict[str, Any]) -> None:
        """``put_row`` of ``BatchRow(**values)`` (a new row: the fields after ``state`` at their defaults),
        without building the BatchRow."""
        if values.keys() != _NEW_ROW_FIELDS:
            raise ValueError(f"a new batch row has the fields {sorted(_NEW_ROW_FIELDS)}")
        key = row_key(values["batch_id"], values["row"])
        stage.put(BATCH_ROWS, key, encode({**values, **_ROW_DEFAULTS}))
        stage.put(CARDS, values["card_number"].encode("ascii"), key)

    @staticmethod
    def put_chip(stage: Stage, chip_serial: str, card_number: str) -> None:
        stage.put(CHIPS, chip_serial.encode("ascii"), card_number.encode("ascii"))
