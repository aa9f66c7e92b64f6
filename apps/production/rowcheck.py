"""The checks of one roster row that need nothing but the row: they run in worker processes.

    checked = check_row(raw, "roster.dbf", today)       # CheckedRow: the normalised row or its problems
    results, deleted = check_piece(roster, piece, today)  # a piece of a file, read and checked in a worker

The ID number (shape, region, birth date, ISO 7064 check character) against the declared date of birth
and gender, the required fields, lengths, the ethnicity code, the nationality, the addresses and the
shape of the employer's unit code. What needs the registry (is the employer registered, does the
person hold a card) is checked afterwards by the one process that writes (``roster.RegistryChecks``).
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from citycard.core.identity import (
    Gender,
    IdentityError,
    mask_id,
    validate_citizen_id,
    validate_name,
    validate_unit_code,
)
from citycard.core.registry_records import RegistryError, check_text

from .errors import RowProblem
from .rosterfile import FIELD_CHARS_MAX, REQUIRED_COLUMNS, Piece, RawRow, RosterFile
from .store import EntryState, RosterEntry

__all__ = ["ETHNICITY_CODES", "CheckedRow", "RosterRow", "check_piece", "check_row"]

# GB/T 3304: the 56 ethnic groups, 97 other, 98 foreign-born naturalised citizens.
ETHNICITY_CODES = frozenset({f"{code:02d}" for code in range(1, 57)} | {"97", "98"})
NATIONALITY_DEFAULT = "CHN"
_GENDERS = {"1": Gender.MALE, "男": Gender.MALE, "MALE": Gender.MALE, "M": Gender.MALE,
            "2": Gender.FEMALE, "女": Gender.FEMALE, "FEMALE": Gender.FEMALE, "F": Gender.FEMALE}
_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d")
TEXT_ANSWERS_MAX = 4096  # answers remembered per kind of text checked


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


class CheckedRow(NamedTuple):
    """A row after the checks that need nothing else: ``row`` when it passed them, else ``problems``;
    ``employer`` is the unit code when its shape is right (its registration is checked later)."""

    number: int
    row: RosterRow | None
    problems: list[RowProblem]
    employer: str | None
    who: str  # the masked ID number, for the problems found later


def check_piece(roster: RosterFile, piece: Piece, today: _dt.date) -> tuple[list[CheckedRow], int]:
    """Read one piece of ``roster`` and check its rows: what a worker process does. Returns the
    checked rows in file order and the number of deleted records the piece held."""
    deleted_before = roster.deleted_records
    checked = [check_row(raw, roster.display_name, today) for raw in roster.rows_of(piece)]
    return checked, roster.deleted_records - deleted_before


def check_row(raw: RawRow, file_name: str, today: _dt.date) -> CheckedRow:
    values = raw.values
    who = mask_id(str(values.get("id_number") or ""))
    if raw.problem is not None:
        return CheckedRow(raw.number, None, [raw.problem], None, who)
    problems: list[RowProblem] = []

    def bad(field_name: str, reason: str) -> None:
        problems.append(RowProblem(file_name, raw.number, field_name, reason, who))

    for column, value in values.items():
        if isinstance(value, str) and len(value) > FIELD_CHARS_MAX:
            bad(column, f"has {len(value)} characters, at most {FIELD_CHARS_MAX}")
    for column in REQUIRED_COLUMNS:
        if values.get(column) in (None, ""):
            bad(column, "is empty")
    if problems:
        return CheckedRow(raw.number, None, problems, None, who)
    gender = _GENDERS.get(str(values["gender"]).strip().upper())
    if gender is None:
        bad("gender", f"{values['gender']!r} is not 1, 2, 男, 女, male or female")
    birth = _parse_date(values["date_of_birth"])
    if birth is None:
        bad("date_of_birth", f"{values['date_of_birth']!r} is not a date (YYYY-MM-DD or YYYYMMDD)")
    citizen = _check_id(str(values["id_number"]), birth, gender, today, bad)
    name = _check(_name, str(values["name"]), "name", bad)
    ethnicity = str(values["ethnicity"]).zfill(2)
    if ethnicity not in ETHNICITY_CODES:  # an e-government export may drop the leading zero
        bad("ethnicity", f"{values['ethnicity']!r} is not a GB/T 3304 code (01 to 56, 97, 98)")
    nationality = str(values.get("nationality") or NATIONALITY_DEFAULT).upper()
    if len(nationality) != 3 or not (nationality.isascii() and nationality.isalpha()):
        bad("nationality", f"{nationality!r} is not an ISO 3166 three-letter code")
    residence = _check(_residence, str(values["residence"]), "residence", bad)
    household = _check(_household_registration, str(values["household_registration"]), "household_registration",
                       bad)
    employer = _check(_unit_code, str(values["employer"]), "employer", bad)
    if problems or citizen is None or gender is None or birth is None:
        return CheckedRow(raw.number, None, problems, employer, who)
    row = RosterRow(number=raw.number, id_number=citizen, name=str(name), gender=gender.value,
                    date_of_birth=birth.isoformat(), nationality=nationality, ethnicity=ethnicity,
                    residence=str(residence), household_registration=str(household), employer=str(employer))
    return CheckedRow(raw.number, row, problems, employer, who)


def _check_id(text: str, birth: _dt.date | None, gender: Gender | None, today: _dt.date,
              bad: Callable[[str, str], None]) -> str | None:
    try:
        citizen = validate_citizen_id(text, today=today)
    except IdentityError as exc:
        bad("id_number", f"the birth date in it {exc.reason}" if exc.field == "birth_date" else exc.reason)
        return None
    if birth is not None and birth != citizen.birth_date:
        bad("date_of_birth", "does not match the birth date in the ID number")
    if gender is not None and gender is not citizen.gender:
        bad("gender", "does not match the ID number (odd sequence digit: male, even: female)")
    return citizen.number


def _check(check: Callable[[str], tuple[str | None, str | None]], text: str, field_name: str,
           bad: Callable[[str, str], None]) -> str | None:
    value, reason = check(text)
    if reason is not None:
        bad(field_name, reason)
    return value


# The text checks answer (value, None) or (None, reason), remembered for the values that repeat down a
# roster (employers, places, common names): a worker checks each distinct value once.
def _remembered(check: Callable[[str], str]) -> Callable[[str], tuple[str | None, str | None]]:
    @functools.lru_cache(maxsize=TEXT_ANSWERS_MAX)
    def answer(text: str) -> tuple[str | None, str | None]:
        try:
            return check(text), None
        except (IdentityError, RegistryError) as exc:
            return None, exc.reason

    return answer


_name = _remembered(validate_name)
_residence = _remembered(lambda text: check_text(text, "residence"))
_household_registration = _remembered(lambda text: check_text(text, "household_registration"))
_unit_code = _remembered(lambda text: validate_unit_code(text).code)


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
            return _dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
    return None
