"""Roster import: the e-government system's insured-persons roster, checked row by row, into production.

    result = import_roster(registry, store, Path("roster.dbf"), actor="op1")
    result.record.accepted, result.problems        # good rows in, bad rows listed (file, row, field, reason)

Every row is checked: the ID number (shape, region, birth date, ISO 7064 check character) against the
declared date of birth and gender, the required fields, the ethnicity code, the nationality, the
employer (registered in the registry), duplicates within the file (every occurrence is rejected: the
file does not say which one is right), a person who already holds a usable card, and a person whose
card is already being made. Good rows become roster entries that wait for a production batch; the
registry itself is not touched until a batch orders the cards (``batches.create_batches``).

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
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from citycard.core.identity import (
    Gender,
    IdentityError,
    mask_id,
    validate_citizen_id,
    validate_name,
    validate_unit_code,
)
from citycard.core.lifecycle import TERMINAL_STATES, Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import RegistryError, as_instant, check_text

from .errors import ProductionError, RowProblem
from .rosterfile import FIELD_CHARS_MAX, REQUIRED_COLUMNS, RawRow, RosterFile
from .store import EntryState, ImportRecord, ImportState, ProductionStore, RosterEntry

__all__ = ["CHUNK_ROWS", "ETHNICITY_CODES", "ImportResult", "RosterRow", "import_roster", "write_problems"]

CHUNK_ROWS = 5000  # roster entries per LMDB transaction
HASH_CHUNK_BYTES = 1 << 20
FILE_BYTES_MAX = 4 * 2**30
# GB/T 3304: the 56 ethnic groups, 97 other, 98 foreign-born naturalised citizens.
ETHNICITY_CODES = frozenset({f"{code:02d}" for code in range(1, 57)} | {"97", "98"})
NATIONALITY_DEFAULT = "CHN"
EMPLOYERS_PER_FILE_MAX = 100_000  # employer answers remembered while checking one file
_GENDERS = {"1": Gender.MALE, "男": Gender.MALE, "MALE": Gender.MALE, "M": Gender.MALE,
            "2": Gender.FEMALE, "女": Gender.FEMALE, "FEMALE": Gender.FEMALE, "F": Gender.FEMALE}
_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d")

Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class RosterRow:
    """A good roster row, normalised."""

    number: int
    id_number: str
    name: str
    gender: str
    date_of_birth: str
    nationality: str
    ethnicity: str
    residence: str
    household_registration: str
    employer: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def entry(self, import_id: str, state: EntryState) -> RosterEntry:
        return RosterEntry(id_number=self.id_number, name=self.name, gender=self.gender,
                           date_of_birth=self.date_of_birth, nationality=self.nationality, ethnicity=self.ethnicity,
                           residence=self.residence, household_registration=self.household_registration,
                           employer=self.employer, import_id=import_id, import_row=self.number, state=state)


@dataclass
class ImportResult:
    record: ImportRecord
    problems: list[RowProblem]
    report_path: Path
    already_imported: bool = False  # the same file was imported before: nothing changed
    resumed: bool = False  # an interrupted import of this file was finished
    ignored_columns: list[str] = field(default_factory=list)
    deleted_records: int = 0


# -- checking one row ------------------------------------------------------------------------------------


class RowChecker:
    """Checks rows of one file; remembers the registry answers it needs (employers) for the file."""

    def __init__(self, registry: Registry, store: ProductionStore, file_name: str, today: _dt.date) -> None:
        self.registry = registry
        self.store = store
        self.file_name = file_name
        self.today = today
        self._employers: dict[str, tuple[str | None, str | None]] = {}

    def check(self, raw: RawRow) -> RosterRow | list[RowProblem]:
        if raw.problem is not None:
            return [raw.problem]
        values = raw.values
        problems: list[RowProblem] = []
        who = mask_id(str(values.get("id_number") or ""))

        def bad(field_name: str, reason: str) -> None:
            problems.append(RowProblem(self.file_name, raw.number, field_name, reason, who))

        for column, value in values.items():
            if isinstance(value, str) and len(value) > FIELD_CHARS_MAX:
                bad(column, f"has {len(value)} characters, at most {FIELD_CHARS_MAX}")
        for column in REQUIRED_COLUMNS:
            if values.get(column) in (None, ""):
                bad(column, "is empty")
        if problems:
            return problems
        gender = _GENDERS.get(str(values["gender"]).strip().upper())
        if gender is None:
            bad("gender", f"{values['gender']!r} is not 1, 2, 男, 女, male or female")
        birth = _parse_date(values["date_of_birth"])
        if birth is None:
            bad("date_of_birth", f"{values['date_of_birth']!r} is not a date (YYYY-MM-DD or YYYYMMDD)")
        citizen = self._check_id(str(values["id_number"]), birth, gender, bad)
        name = self._check(lambda: validate_name(str(values["name"])), "name", bad)
        ethnicity = str(values["ethnicity"]).zfill(2)
        if ethnicity not in ETHNICITY_CODES:  # an e-government export may drop the leading zero
            bad("ethnicity", f"{values['ethnicity']!r} is not a GB/T 3304 code (01 to 56, 97, 98)")
        nationality = str(values.get("nationality") or NATIONALITY_DEFAULT).upper()
        if len(nationality) != 3 or not (nationality.isascii() and nationality.isalpha()):
            bad("nationality", f"{nationality!r} is not an ISO 3166 three-letter code")
        residence = self._check(lambda: check_text(values["residence"], "residence"), "residence", bad)
        household = self._check(lambda: check_text(values["household_registration"], "household_registration"),
                                "household_registration", bad)
        employer = self._check_employer(str(values["employer"]), bad)
        if problems or citizen is None or gender is None or birth is None:
            return problems
        row = RosterRow(number=raw.number, id_number=citizen, name=str(name), gender=gender.value,
                        date_of_birth=birth.isoformat(), nationality=nationality, ethnicity=ethnicity,
                        residence=str(residence), household_registration=str(household), employer=str(employer))
        problem = self._check_card_holder(row)
        return [problem] if problem is not None else row

    def _check_id(self, text: str, birth: _dt.date | None, gender: Gender | None,
                  bad: Callable[[str, str], None]) -> str | None:
        try:
            citizen = validate_citizen_id(text, today=self.today)
        except IdentityError as exc:
            bad("id_number", f"the birth date in it {exc.reason}" if exc.field == "birth_date" else exc.reason)
            return None
        if birth is not None and birth != citizen.birth_date:
            bad("date_of_birth", "does not match the birth date in the ID number")
        if gender is not None and gender is not citizen.gender:
            bad("gender", "does not match the ID number (odd sequence digit: male, even: female)")
        return citizen.number

    @staticmethod
    def _check(check: Callable[[], str], field_name: str, bad: Callable[[str, str], None]) -> str | None:
        try:
            return check()
        except (IdentityError, RegistryError) as exc:
            bad(field_name, exc.reason)
            return None

    def _check_employer(self, text: str, bad: Callable[[str, str], None]) -> str | None:
        """The unit code, or None having said why; a file names few employers, each is checked once."""
        if text not in self._employers:
            self._employers[text] = self._employer_verdict(text)
        code, reason = self._employers[text]
        if reason is not None:
            bad("employer", reason)
        return code

    def _employer_verdict(self, text: str) -> tuple[str | None, str | None]:
        if len(self._employers) >= EMPLOYERS_PER_FILE_MAX:
            self._employers.clear()
        try:
            code = validate_unit_code(text).code
        except IdentityError as exc:
            return None, exc.reason
        try:
            self.registry.employer(code)
        except RegistryError:
            return None, f"{code} is not a registered employer (citycard employer add)"
        return code, None

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


def _parse_date(value: Any) -> _dt.date | None:
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    text = str(value).strip()
    if len(text) == len("YYYY-MM-DD") and text[4] == "-":
        try:
            return _dt.date.fromisoformat(text)
        except ValueError:
            return None
    for pattern in _DATE_FORMATS:
        try:
            return _dt.datetime.strptime(str(value).strip(), pattern).date()
        except ValueError:
            continue
    return None


# -- the import --------------------------------------------------------------------------------------------


def import_roster(registry: Registry, store: ProductionStore, path: Path, *, actor: str, encoding: str = "auto",
                  at: _dt.datetime | None = None, progress: Progress | None = None) -> ImportResult:
    """Import a roster file (see the module docstring); raises ProductionError for a file that cannot be
    read at all, having changed nothing."""
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
        problems, accepted, rows = _check_file(registry, store, roster, spool, at, progress)
        write_problems(report_path, problems)
        record = ImportRecord(
            import_id=existing.import_id if existing else "", file_name=display_name, sha256=sha256,
            format=roster.format, encoding=roster.encoding, rows=rows, accepted=accepted,
            rejected=len({problem.row for problem in problems}), state=ImportState.IMPORTING,
            started_at=existing.started_at if existing else at.isoformat(), actor=actor)
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
                progress: Progress) -> tuple[list[RowProblem], int, int]:
    """Pass over the file: good rows to the spool, bad rows to the list. Returns (problems, good, records)."""
    checker = RowChecker(registry, store, roster.display_name, at.date())
    problems: list[RowProblem] = []
    first_row: dict[str, int] = {}  # ID number -> the first row that has it
    repeated: dict[str, list[int]] = {}
    partial = spool.with_name(spool.name + ".partial")
    records = good = 0
    with open(partial, "w", encoding="utf-8") as out:
        for raw in roster.rows():
            records = raw.number
            checked = checker.check(raw)
            if isinstance(checked, list):
                problems.extend(checked)
            else:
                seen = first_row.setdefault(checked.id_number, checked.number)
                if seen != checked.number:
                    repeated.setdefault(checked.id_number, [seen]).append(checked.number)
                out.write(json.dumps(checked.to_json(), ensure_ascii=False) + "\n")
                good += 1
            if records % 1000 == 0:
                progress("checking", records, None)
    progress("checking", records, records)
    for id_number, rows in repeated.items():
        for row in rows:
            others = ", ".join(str(other) for other in rows if other != row)
            problems.append(RowProblem(roster.display_name, row, "id_number",
                                       f"appears more than once in the file (also row {others})", mask_id(id_number)))
    if repeated:
        _drop_from_spool(partial, set(repeated))
        good -= sum(len(rows) for rows in repeated.values())
    os.replace(partial, spool)
    problems.sort(key=lambda problem: (problem.row, problem.field))
    return problems, good, records


def _drop_from_spool(spool: Path, id_numbers: set[str]) -> None:
    kept = spool.with_name(spool.name + ".kept")
    with open(spool, encoding="utf-8") as source, open(kept, "w", encoding="utf-8") as out:
        for line in source:
            if json.loads(line)["id_number"] not in id_numbers:
                out.write(line)
    os.replace(kept, spool)


def _spooled(spool: Path) -> Iterator[RosterRow]:
    with open(spool, encoding="utf-8") as source:
        for line in source:
            yield RosterRow(**json.loads(line))


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
