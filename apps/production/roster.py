"""Roster import: the e-government system's insured-persons roster, checked row by row, into production.

    result = import_roster(registry, store, Path("roster.dbf"), actor="op1")
    result.record.accepted, result.problems        # good rows in, bad rows listed (file, row, field, reason)

Every row is checked: the ID number (shape, region, birth date, ISO 7064 check character) against the
declared date of birth and gender, the required fields, the ethnicity code, the nationality, the
employer (registered in the registry), duplicates within the file (every occurrence is rejected: the
file does not say which one is right), a person who already holds a usable card, and a person whose
card is already being made. Good rows become roster entries that wait for a production batch; the
registry itself is not touched until a batch orders the cards (``batches.create_batches``).

Who does what: ``jobs`` worker processes read the file in pieces of ``PIECE_ROWS`` rows (reading a DBF
row through the dbf package is most of the cost) and run each row's own checks (``rowcheck``); this
process takes their results in file order, checks what needs the registry (``RegistryChecks``), and
is the only one that writes.

How "nothing is half-imported" holds for a file of any size. The file is archived first (by its
SHA-256) and read once; its good rows are spooled beside the archive. They are then written in
chunks of ``CHUNK_ROWS`` (one LMDB transaction each; memory stays flat). The import's record says
``importing`` until the last chunk marks it ``complete``, and nothing in production uses the entries of
an incomplete import: batch creation refuses to run while one exists and says which file to import
again. Importing the same file again finishes an interrupted import, and changes nothing after a
complete one. A file that cannot be read at all (not CSV/DBF, a missing column, an unknown encoding)
is refused whole before anything is written.

An entry that the file repeats unchanged stays as it is; a changed one is updated (a corrected row
sends an entry that the employer rejected back to waiting).
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from citycard.core.identity import mask_id
from citycard.core.lifecycle import TERMINAL_STATES, Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import RegistryError, as_instant

from .collector import collector_paused
from .errors import ProductionError, RowProblem
from .parallel import ordered_map
from .rosterfile import RosterFile
from .rowcheck import ETHNICITY_CODES, CheckedRow, RosterRow, check_piece
from .store import EntryState, ImportRecord, ImportState, ProductionStore, RosterEntry

__all__ = ["CHUNK_ROWS", "ETHNICITY_CODES", "ImportResult", "RosterRow", "import_roster", "write_problems"]

# Roster entries per LMDB transaction. Each entry dirties about two B-tree pages (the entry, the waiting
# index) that LMDB holds in memory until the commit and keeps for reuse afterwards, so this bounds the
# heap (about 10 KB an entry); more entries a commit saves little once a chunk is in the thousands.
CHUNK_ROWS = 2000
HASH_CHUNK_BYTES = 1 << 20
FILE_BYTES_MAX = 4 * 2**30
EMPLOYERS_PER_FILE_MAX = 100_000  # employer answers remembered while checking one file
PIECE_ROWS = 2000  # rows a worker reads and checks at a time (a few pieces per worker are in flight)
ID_KEYS_PER_ARRAY = 10_000  # ID keys gathered in a list before they are packed into an array
ID_KEY_DIGITS = 17  # a valid ID number is fixed by its first 17 digits (the 18th is their check character)

Progress = Callable[[str, int, int | None], None]


@dataclass
class ImportResult:
    record: ImportRecord
    problems: list[RowProblem]
    report_path: Path
    already_imported: bool = False  # the same file was imported before: nothing changed
    resumed: bool = False  # an interrupted import of this file was finished
    ignored_columns: list[str] = field(default_factory=list)
    deleted_records: int = 0


# -- the checks that need the registry ------------------------------------------------------------------


class RegistryChecks:
    """What ``rowcheck`` cannot see from the row alone: the employer is registered, the person holds no
    card that is not retired. Remembers the employers' answers for the file (a file names few)."""

    def __init__(self, registry: Registry, store: ProductionStore, file_name: str) -> None:
        self.registry = registry
        self.store = store
        self.file_name = file_name
        self._employers: dict[str, str | None] = {}

    def check(self, checked: CheckedRow) -> RosterRow | list[RowProblem]:
        problems = list(checked.problems)
        if checked.employer is not None:
            reason = self._employer_reason(checked.employer)
            if reason is not None:
                problems.append(RowProblem(self.file_name, checked.number, "employer", reason, checked.who))
        if problems or checked.row is None:
            return problems
        problem = self._check_card_holder(checked.row)
        return [problem] if problem is not None else checked.row

    def _employer_reason(self, code: str) -> str | None:
        if code not in self._employers:
            if len(self._employers) >= EMPLOYERS_PER_FILE_MAX:
                self._employers.clear()
            try:
                self.registry.employer(code)
                self._employers[code] = None
            except RegistryError:
                self._employers[code] = f"{code} is not a registered employer (citycard employer add)"
        return self._employers[code]

    def _check_card_holder(self, row: RosterRow) -> RowProblem | None:
        """A person whose card is being made, or who holds a card that is not retired, gets no new one
        through a roster: the employer's review corrects the first, the counter replaces the second."""
        entry = self.store.entry(row.id_number)
        if entry is not None and entry.state is EntryState.BATCHED:
            return RowProblem(self.file_name, row.number, "id_number",
                              f"the card is being made in batch {entry.batch_id} (row {entry.batch_row}); "
                              "corrections go through that batch's employer review", mask_id(row.id_number))
        in_correction = entry is not None and entry.state is EntryState.CORRECTION
        for card in self.registry.cards_of(row.id_number):
            if card.state in TERMINAL_STATES:
                continue
            if in_correction and card.state.value == "ordered":
                continue  # the card of the rejected row: the next batch makes it with the corrected data
            return RowProblem(self.file_name, row.number, "id_number",
                              f"already holds card {card.card_number} ({card.state.value}); "
                              "a lost, broken or expired card is replaced or renewed at the counter",
                              mask_id(row.id_number))
        return None


# -- the import --------------------------------------------------------------------------------------------


def import_roster(registry: Registry, store: ProductionStore, path: Path, *, actor: str, encoding: str = "auto",
                  at: _dt.datetime | None = None, progress: Progress | None = None, jobs: int = 1) -> ImportResult:
    """Import a roster file (see the module docstring); raises ProductionError for a file that cannot be
    read at all, having changed nothing. ``jobs`` worker processes read and check the rows."""
    at = as_instant(at)
    progress = progress or _no_progress
    path = Path(path)
    display_name = path.name
    if not path.is_file():
        raise ProductionError("file", "does not exist or is not a file", file=str(path))
    sha256 = _file_sha256(path, display_name)
    archive = store.imports_dir / f"{sha256[:16]}{path.suffix.lower()}"
    spool = archive.with_suffix(".accepted.jsonl")
    report_path = archive.with_suffix(".rejections.csv")
    existing = store.import_of_file(sha256)
    if existing is not None and existing.state is ImportState.COMPLETE:
        return ImportResult(existing, read_problems(report_path), report_path, already_imported=True)
    _archive(path, archive)
    roster = RosterFile.open(archive, display_name=display_name, encoding=encoding)
    if existing is not None and spool.exists():
        record, problems = existing, read_problems(report_path)
    else:
        # A first import; or an interrupted one whose spool is gone: checked again and written from the
        # start, which is safe because writing an entry that is already there changes nothing.
        with collector_paused():  # its worker processes inherit the pause (their rows make no cycles)
            problems, accepted, rows = _check_file(registry, store, roster, spool, at, progress, jobs)
        write_problems(report_path, problems)
        record = ImportRecord(
            import_id=existing.import_id if existing else "", file_name=display_name, sha256=sha256,
            format=roster.format, encoding=roster.encoding, rows=rows, accepted=accepted,
            rejected=len({problem.row for problem in problems}), state=ImportState.IMPORTING,
            started_at=existing.started_at if existing else at.isoformat(), actor=actor)
    with collector_paused():
        record = _write_entries(registry, store, record, spool, at, actor, progress)
    return ImportResult(record, problems, report_path, resumed=existing is not None,
                        ignored_columns=roster.ignored_columns, deleted_records=roster.deleted_records)


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


def _file_sha256(path: Path, display_name: str) -> str:
    digest = hashlib.sha256()
    try:
        if path.stat().st_size > FILE_BYTES_MAX:
            raise ProductionError("file", f"is larger than {FILE_BYTES_MAX} bytes", file=display_name)
        with open(path, "rb") as source:
            while chunk := source.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise ProductionError("file", f"cannot be read ({exc.strerror})", file=display_name) from None
    return digest.hexdigest()


def _archive(path: Path, archive: Path) -> None:
    if archive.exists():
        return
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    shutil.copyfile(path, partial)
    os.replace(partial, archive)


def _check_file(registry: Registry, store: ProductionStore, roster: RosterFile, spool: Path, at: _dt.datetime,
                progress: Progress, jobs: int) -> tuple[list[RowProblem], int, int]:
    """Pass over the file: good rows to the spool, bad rows to the list. Returns (problems, good, records).

    ``jobs`` worker processes read pieces of the file and run the row's own checks (``rowcheck``); this
    process takes their results in file order, checks what needs the registry and spools the good rows.
    Duplicates are found at the end from a compact column of the good rows' ID numbers."""
    registry_checks = RegistryChecks(registry, store, roster.display_name)
    problems: list[RowProblem] = []
    id_keys = _IdKeys()
    partial = spool.with_name(spool.name + ".partial")
    records = good = 0
    check = functools.partial(check_piece, roster, today=at.date())
    with open(partial, "wb") as out:
        for _, (checked_rows, deleted) in ordered_map(check, roster.pieces(PIECE_ROWS), jobs=jobs):
            roster.deleted_records += deleted
            for checked_row in checked_rows:
                records = checked_row.number
                verdict = registry_checks.check(checked_row)
                if isinstance(verdict, list):
                    problems.extend(verdict)
                    continue
                id_keys.add(verdict.id_number, verdict.number)
                out.write(orjson.dumps(verdict.to_json()) + b"\n")
                good += 1
            progress("checking", records, None)
    progress("checking", records, records)
    repeated = id_keys.repeated()
    if repeated:
        id_numbers = _drop_from_spool(partial, set(repeated))
        for key, rows in repeated.items():
            for row in rows:
                others = ", ".join(str(other) for other in rows if other != row)
                problems.append(RowProblem(roster.display_name, row, "id_number",
                                           f"appears more than once in the file (also row {others})",
                                           mask_id(id_numbers[key])))
        good -= sum(len(rows) for rows in repeated.values())
    os.replace(partial, spool)
    problems.sort(key=lambda problem: (problem.row, problem.field))
    return problems, good, records


class _IdKeys:
    """The good rows' ID numbers as 8-byte integers with their row numbers: 12 bytes a row, where a set
    of strings costs about 150, so a file of two million rows is checked for duplicates in 24 MB."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._pending_keys: list[int] = []
        self._pending_rows: list[int] = []

    def add(self, id_number: str, row: int) -> None:
        self._pending_keys.append(int(id_number[:ID_KEY_DIGITS]))
        self._pending_rows.append(row)
        if len(self._pending_keys) == ID_KEYS_PER_ARRAY:
            self._flush()

    def _flush(self) -> None:
        self._keys.append(np.array(self._pending_keys, dtype=np.int64))
        self._rows.append(np.array(self._pending_rows, dtype=np.int64))
        self._pending_keys, self._pending_rows = [], []

    def repeated(self) -> dict[int, list[int]]:
        """Each key that occurs more than once -> its rows, in file order."""
        self._flush()
        keys, rows = np.concatenate(self._keys), np.concatenate(self._rows)
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        same_as_next = keys[1:] == keys[:-1]
        if not same_as_next.any():
            return {}
        in_group = np.zeros(len(keys), dtype=bool)
        in_group[1:] |= same_as_next
        in_group[:-1] |= same_as_next
        repeated: dict[int, list[int]] = {}
        for key, row in zip(keys[in_group].tolist(), rows[in_group].tolist(), strict=True):
            repeated.setdefault(key, []).append(row)
        return repeated


def _drop_from_spool(spool: Path, keys: set[int]) -> dict[int, str]:
    """Rewrite the spool without the rows whose ID key is in ``keys``; returns their ID numbers."""
    dropped: dict[int, str] = {}
    kept = spool.with_name(spool.name + ".kept")
    with open(spool, "rb") as source, open(kept, "wb") as out:
        for line in source:
            id_number = orjson.loads(line)["id_number"]
            key = int(id_number[:ID_KEY_DIGITS])
            if key in keys:
                dropped[key] = id_number
            else:
                out.write(line)
    os.replace(kept, spool)
    return dropped


def _spooled(spool: Path) -> Iterator[RosterRow]:
    with open(spool, "rb") as source:
        for line in source:
            yield RosterRow(**orjson.loads(line))


def _write_entries(registry: Registry, store: ProductionStore, record: ImportRecord, spool: Path,
                   at: _dt.datetime, actor: str, progress: Progress) -> ImportRecord:
    """Write the spooled rows after ``record.committed_rows`` in chunks; the last commit completes."""
    counts = {"new": record.new, "updated": record.updated, "unchanged": record.unchanged}
    chunk: list[RosterRow] = []
    done = record.committed_rows
    rows = _spooled(spool)
    for _ in range(record.committed_rows):
        next(rows)
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK_ROWS:
            done += len(chunk)
            record = _commit_chunk(registry, store, record, chunk, counts, done, at, actor, final=False)
            chunk = []
            progress("importing", done, record.accepted)
    record = _commit_chunk(registry, store, record, chunk, counts, done + len(chunk), at, actor, final=True)
    progress("importing", record.committed_rows, record.accepted)
    return record


def _commit_chunk(registry: Registry, store: ProductionStore, record: ImportRecord, chunk: list[RosterRow],
                  counts: dict[str, int], done: int, at: _dt.datetime, actor: str, *, final: bool) -> ImportRecord:
    stage = registry.begin(at)
    if not record.import_id:
        record = _with(record, import_id=f"R{stage.next_seq('production.import'):06d}")
    for row in chunk:
        previous = store.entry(row.id_number, stage)
        entry = _entry_for(row, previous, record.import_id, counts)
        if entry is not None:
            store.put_entry(stage, entry, previous)
    record = _with(record, committed_rows=done, **counts)
    if final:
        record = _with(record, state=ImportState.COMPLETE, completed_at=at.isoformat())
        stage.audit(actor=actor, channel=Channel.BATCH, action="production.roster_import",
                    subject=f"roster import {record.import_id}", at=at, details={
                        "file": record.file_name, "sha256": record.sha256, "rows": record.rows,
                        "accepted": record.accepted, "rejected": record.rejected, **counts})
    store.put_import(stage, record)
    stage.commit(f"importing roster {record.file_name}")
    return record


def _entry_for(row: RosterRow, previous: RosterEntry | None, import_id: str,
               counts: dict[str, int]) -> RosterEntry | None:
    """The entry a row makes, or None when it changes nothing."""
    if previous is None:
        counts["new"] += 1
        return row.entry(import_id, EntryState.WAITING)
    candidate = row.entry(import_id, EntryState.WAITING)
    if previous.same_data(candidate) or previous.state is EntryState.BATCHED:
        counts["unchanged"] += 1
        return None
    counts["updated"] += 1
    return candidate  # a waiting entry with new data, or a corrected one back from correction


def _with(record: ImportRecord, **changes: Any) -> ImportRecord:
    return replace(record, **changes)


# -- rejection reports ----------------------------------------------------------------------------------

REPORT_COLUMNS = ("file", "row", "field", "reason", "who")


def write_problems(path: Path, problems: list[RowProblem]) -> None:
    """A rejection report: CSV, UTF-8 with a BOM (spreadsheet programs read it right), masked IDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(REPORT_COLUMNS)
        for problem in problems:
            writer.writerow((problem.file, problem.row, problem.field, problem.reason, problem.who))
    os.replace(partial, path)


def read_problems(path: Path) -> list[RowProblem]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8-sig", newline="") as source:
        return [RowProblem(row["file"], int(row["row"]), row["field"], row["reason"], row["who"])
                for row in csv.DictReader(source)]
