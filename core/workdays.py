"""Working days on the official Chinese calendar, for the deadlines of loss reports.

A phone or online loss report stops a card; unless a written report follows within N full working
days after the day of the report, the card is restored at the end of the N-th working day. Working
days follow the State Council's calendar: public holidays are days off even on weekdays, and make-up
working days (调休) are working days even on weekends.

Where a day's kind comes from, first match wins:

1. the operator's holiday table (a CSV file ``date,kind``, kind ``holiday`` or ``workday``);
2. the ``chinesecalendar`` library, for the years it has data for;
3. Monday to Friday, for a year neither covers, with a warning.

A year is "covered" when the library has data for it or the operator's table lists at least one day
of it; in a covered year, days the table does not list follow the library, or Monday to Friday.
The calendar never fails for a missing year: it falls back and says so. Results that depend on an
uncovered year carry the warning, so callers can put it in logs and command output.
"""

from __future__ import annotations

import csv
import datetime as _dt
import enum
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import chinese_calendar

from citycard.core import clock

__all__ = [
    "DayKind",
    "HolidayTable",
    "HolidayTableError",
    "WorkdayCalendar",
    "WorkdayResult",
    "load_holiday_table",
    "parse_holiday_rows",
]

RESTORE_WORKDAYS_DEFAULT = 2
WORKDAYS_AHEAD_MAX = 366  # a deadline further out than a year of working days is a configuration error
# Bounds the day-by-day walk: a table that marks every day a holiday must end in an error, not a hang.
DAYS_SCANNED_MAX = 3 * 366 + WORKDAYS_AHEAD_MAX * 7
HOLIDAY_TABLE_ROWS_MAX = 10_000  # about 27 years of every single day
HOLIDAY_TABLE_HEADER = ("date", "kind")
_LIBRARY_NAME = "chinesecalendar"
_LAST_WEEKDAY = 4  # Friday, in date.weekday() numbering


class DayKind(enum.StrEnum):
    HOLIDAY = "holiday"
    WORKDAY = "workday"


class HolidayTableError(ValueError):
    """A row of an operator holiday table is wrong. Names the file, the row (1-based line) and the field."""

    def __init__(self, path: str, row: int | None, field: str, reason: str) -> None:
        self.path = path
        self.row = row
        self.field = field
        self.reason = reason
        where = f"{path}, row {row}" if row is not None else path
        super().__init__(f"{where}, field {field}: {reason}")


@dataclass(frozen=True)
class HolidayTable:
    """Days an operator declares a holiday or a working day, overriding the library."""

    days: Mapping[_dt.date, DayKind]
    source: str = "operator table"

    def years(self) -> frozenset[int]:
        return frozenset(day.year for day in self.days)


@dataclass(frozen=True)
class WorkdayResult:
    """A computed day, and the warnings about the calendar data it rests on (empty when all is official)."""

    date: _dt.date
    warnings: tuple[str, ...] = ()

    def end_instant(self) -> _dt.datetime:
        """The end of ``date`` in city time: the first instant of the next day."""
        next_day = self.date + _dt.timedelta(days=1)
        return _dt.datetime.combine(next_day, _dt.time(), tzinfo=clock.CITY_ZONE)


class WorkdayCalendar:
    """Which days are working days, and deadlines counted in them."""

    def __init__(self, table: HolidayTable | None = None) -> None:
        self._table = table if table is not None else HolidayTable(days={})
        self._table_years = self._table.years()
        self._library_covers_year: dict[int, bool] = {}

    def is_workday(self, day: _dt.date) -> bool:
        """Whether ``day`` is a working day. For an uncovered year this is Monday to Friday;
        ``warnings_for`` says when that is the case."""
        day = _as_city_date(day)
        declared = self._table.days.get(day)
        if declared is not None:
            return declared is DayKind.WORKDAY
        if self._library_covers(day.year):
            return bool(chinese_calendar.is_workday(day))
        return day.weekday() <= _LAST_WEEKDAY

    def warnings_for(self, first: _dt.date, last: _dt.date) -> tuple[str, ...]:
        """One warning for every year from ``first`` to ``last`` (inclusive) that no calendar data covers."""
        first, last = _as_city_date(first), _as_city_date(last)
        library = f"{_LIBRARY_NAME} {chinese_calendar.__version__}"
        return tuple(
            f"{year} is not covered by {library}; assuming Monday to Friday"
            for year in range(min(first.year, last.year), max(first.year, last.year) + 1)
            if not self._year_covered(year)
        )

    def add_workdays(self, day: _dt.date, n: int) -> WorkdayResult:
        """The n-th full working day after ``day`` (``day`` itself never counts), n >= 1."""
        day = _as_city_date(day)
        if not 1 <= n <= WORKDAYS_AHEAD_MAX:
            raise ValueError(f"n: {n} working days is outside 1..{WORKDAYS_AHEAD_MAX}")
        candidate, counted = day, 0
        for _ in range(DAYS_SCANNED_MAX):
            candidate += _dt.timedelta(days=1)
            counted += self.is_workday(candidate)
            if counted == n:
                first_counted = day + _dt.timedelta(days=1)
                return WorkdayResult(candidate, self.warnings_for(first_counted, candidate))
        raise ValueError(
            f"no {n} working days within {DAYS_SCANNED_MAX} days after {day.isoformat()}: "
            f"the holiday table ({self._table.source}) leaves too few working days"
        )

    def restore_deadline(
        self, report_date: _dt.date, n_workdays: int = RESTORE_WORKDAYS_DEFAULT
    ) -> WorkdayResult:
        """The day at whose end a temporarily stopped card is restored: the ``n_workdays``-th full working
        day after the day of the report. ``report_date`` may be an instant; its city date counts."""
        return self.add_workdays(report_date, n_workdays)

    def _year_covered(self, year: int) -> bool:
        return year in self._table_years or self._library_covers(year)

    def _library_covers(self, year: int) -> bool:
        covered = self._library_covers_year.get(year)
        if covered is None:
            # The library signals a year without data by raising NotImplementedError; asking once per
            # year keeps that probe out of the day-by-day walk.
            try:
                chinese_calendar.is_workday(_dt.date(year, 1, 1))
                covered = True
            except NotImplementedError:
                covered = False
            self._library_covers_year[year] = covered
        return covered


def _as_city_date(day: _dt.date) -> _dt.date:
    # datetime is a subclass of date: an instant counts by its calendar date in the city.
    if isinstance(day, _dt.datetime):
        if day.tzinfo is not None:
            day = day.astimezone(clock.CITY_ZONE)
        return day.date()
    if isinstance(day, _dt.date):
        return day
    raise TypeError(f"expected a date, not {type(day).__name__}")


def load_holiday_table(path: str | os.PathLike[str]) -> HolidayTable:
    """Read an operator holiday table: a CSV file with the header ``date,kind`` and one row per day,
    date as YYYY-MM-DD, kind ``holiday`` or ``workday``. Any bad row raises HolidayTableError and
    nothing is loaded."""
    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8-sig") as handle:
            return parse_holiday_rows(csv.reader(handle), source=name)
    except OSError as exc:
        raise HolidayTableError(name, None, "file", f"cannot be read ({exc.strerror})") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HolidayTableError(name, None, "file", f"is not a UTF-8 CSV file ({exc})") from exc


def parse_holiday_rows(rows: Iterable[list[str]], *, source: str) -> HolidayTable:
    """Build a table from CSV rows, the first being the header; ``source`` names them in errors."""
    days: dict[_dt.date, DayKind] = {}
    header_seen = False
    for line, row in enumerate(rows, start=1):
        if not header_seen:
            _check_header(row, source)
            header_seen = True
            continue
        if line - 1 > HOLIDAY_TABLE_ROWS_MAX:
            raise HolidayTableError(source, line, "file", f"has more than {HOLIDAY_TABLE_ROWS_MAX} rows")
        if not any(cell.strip() for cell in row):
            continue  # a blank line, often the last one
        day, kind = _parse_row(row, line, source)
        if day in days:
            raise HolidayTableError(source, line, "date", f"{day.isoformat()} is listed twice")
        days[day] = kind
    if not header_seen:
        raise HolidayTableError(
            source, 1, "header", f"is missing; the first row must be {','.join(HOLIDAY_TABLE_HEADER)}"
        )
    return HolidayTable(days=MappingProxyType(days), source=source)


def _check_header(row: list[str], source: str) -> None:
    if tuple(cell.strip().lower() for cell in row) != HOLIDAY_TABLE_HEADER:
        raise HolidayTableError(
            source,
            1,
            "header",
            f"is {','.join(row)!r}; the first row must be {','.join(HOLIDAY_TABLE_HEADER)}",
        )


def _parse_row(row: list[str], line: int, source: str) -> tuple[_dt.date, DayKind]:
    if len(row) != len(HOLIDAY_TABLE_HEADER):
        raise HolidayTableError(
            source, line, "row", f"has {len(row)} fields, expected {len(HOLIDAY_TABLE_HEADER)}"
        )
    date_text, kind_text = (cell.strip() for cell in row)
    try:
        day = _dt.date.fromisoformat(date_text)
    except ValueError:
        day = None
    # fromisoformat also takes 20251001 and 2025-W40-3; the table is for people, so one form only.
    if day is None or len(date_text) != len("YYYY-MM-DD"):
        raise HolidayTableError(source, line, "date", f"{date_text!r} is not a date written YYYY-MM-DD")
    try:
        kind = DayKind(kind_text.lower())
    except ValueError:
        raise HolidayTableError(
            source, line, "kind", f"{kind_text!r} is neither holiday nor workday"
        ) from None
    return day, kind
