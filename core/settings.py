"""City settings of the registry and the card lifecycle, read from ``DIR/citycard.json``.

The file is optional; without it every setting has its default. The registry's settings live in the
``"registry"`` section, so other parts of the platform can keep theirs in the same file::

    {
      "registry": {
        "restore_workdays": 2,
        "purse_refund_allowed": false,
        "purse_clearing_window_days": 30,
        "holiday_table": "holidays.csv",
        "issuer_region_code": "370100",
        "card_validity_years": 10,
        "self_service_failures_max": 5
      }
    }

- ``restore_workdays``: N, the full working days after the day of a phone or online loss report
  within which a written report must follow; otherwise the card is restored at the end of the N-th.
- ``purse_refund_allowed``: whether the e-purse shadow balance of a replaced or cancelled card may be
  paid back out (a REDEMPTION to the suspense account); off by default, the e-purse is cash-like.
- ``purse_clearing_window_days``: calendar days after the card last stopped settling before such a
  refund, so the chip's offline transactions have reached clearing first.
- ``holiday_table``: an operator holiday table (core/workdays.py describes the CSV), relative to DIR.
- ``issuer_region_code``: the 6-digit region code that opens every card identification code.
- ``card_validity_years``: a card expires this many years after its issue date.
- ``self_service_failures_max``: wrong self-service passwords in a row before online self-service
  locks for the person (a counter sets a new password to unlock it).

Anything else in the section, or a value of the wrong type or range, is an error naming the file and
the field: a mistyped setting must not silently fall back to its default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from citycard.core.workdays import (
    RESTORE_WORKDAYS_DEFAULT,
    WORKDAYS_AHEAD_MAX,
    HolidayTableError,
    WorkdayCalendar,
    load_holiday_table,
)

__all__ = ["SETTINGS_FILE", "SETTINGS_SECTION", "Settings", "SettingsError", "load_calendar", "load_settings"]

SETTINGS_FILE = "citycard.json"
SETTINGS_SECTION = "registry"
SETTINGS_FILE_BYTES_MAX = 1024 * 1024
CLEARING_WINDOW_DAYS_MAX = 3660
CARD_VALIDITY_YEARS_MAX = 30
FAILURES_MAX_LIMIT = 100


class SettingsError(ValueError):
    """A setting is wrong; names the file and the field."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        super().__init__(f"{source}: {field}: {reason}")


@dataclass(frozen=True)
class Settings:
    restore_workdays: int = RESTORE_WORKDAYS_DEFAULT
    purse_refund_allowed: bool = False
    purse_clearing_window_days: int = 30
    holiday_table: Path | None = None
    issuer_region_code: str = "370100"
    card_validity_years: int = 10
    self_service_failures_max: int = 5

    def __post_init__(self) -> None:
        _check_settings(self, source="settings")


def load_settings(data_dir: str | os.PathLike[str]) -> Settings:
    """The settings in ``data_dir/citycard.json``, or the defaults when there is no such file."""
    path = Path(data_dir) / SETTINGS_FILE
    source = str(path)
    if not path.exists():
        return Settings()
    try:
        if path.stat().st_size > SETTINGS_FILE_BYTES_MAX:
            raise SettingsError(source, "file", f"is larger than {SETTINGS_FILE_BYTES_MAX} bytes")
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(source, "file", f"cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SettingsError(source, "file", f"is not UTF-8 JSON ({exc})") from None
    if not isinstance(document, dict):
        raise SettingsError(source, "file", "must hold a JSON object")
    section = document.get(SETTINGS_SECTION, {})
    if not isinstance(section, dict):
        raise SettingsError(source, SETTINGS_SECTION, "must be a JSON object")
    return _settings_from(section, source, base_dir=path.parent)


def _settings_from(section: dict[str, Any], source: str, base_dir: Path) -> Settings:
    known = {field.name for field in fields(Settings)}
    for name in section:
        if name not in known:
            raise SettingsError(source, f"{SETTINGS_SECTION}.{name}", f"is not a setting; known: {', '.join(sorted(known))}")
    values = dict(section)
    table = values.get("holiday_table")
    if table is not None:
        if not isinstance(table, str) or not table:
            raise SettingsError(source, f"{SETTINGS_SECTION}.holiday_table", "must be a file path")
        values["holiday_table"] = base_dir / table
    try:
        return Settings(**values)
    except SettingsError as exc:  # the same check, told where the value came from
        raise SettingsError(source, exc.field, exc.reason) from None


def _check_settings(settings: Settings, source: str) -> None:
    def need(condition: bool, name: str, reason: str) -> None:
        if not condition:
            raise SettingsError(source, f"{SETTINGS_SECTION}.{name}", reason)


    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    n = settings.restore_workdays
    need(is_int(n) and 1 <= n <= WORKDAYS_AHEAD_MAX, "restore_workdays",
         f"{n!r} must be a whole number of working days from 1 to {WORKDAYS_AHEAD_MAX}")
    need(isinstance(settings.purse_refund_allowed, bool), "purse_refund_allowed", "must be true or false")
    window = settings.purse_clearing_window_days
    need(is_int(window) and 0 <= window <= CLEARING_WINDOW_DAYS_MAX, "purse_clearing_window_days",
         f"{window!r} must be a whole number of days from 0 to {CLEARING_WINDOW_DAYS_MAX}")
    need(settings.holiday_table is None or isinstance(settings.holiday_table, Path), "holiday_table",
         "must be a file path")
    region = settings.issuer_region_code
    need(isinstance(region, str) and len(region) == 6 and region.isascii() and region.isdigit()
         and region[0] != "0", "issuer_region_code", f"{region!r} must be a 6-digit region code")
    years = settings.card_validity_years
    need(is_int(years) and 1 <= years <= CARD_VALIDITY_YEARS_MAX, "card_validity_years",
         f"{years!r} must be a whole number of years from 1 to {CARD_VALIDITY_YEARS_MAX}")
    failures = settings.self_service_failures_max
    need(is_int(failures) and 1 <= failures <= FAILURES_MAX_LIMIT, "self_service_failures_max",
         f"{failures!r} must be a whole number from 1 to {FAILURES_MAX_LIMIT}")


def load_calendar(settings: Settings) -> WorkdayCalendar:
    """The working-day calendar: the official one, with the operator's table over it when one is set."""
    if settings.holiday_table is None:
        return WorkdayCalendar()
    try:
        return WorkdayCalendar(load_holiday_table(settings.holiday_table))
    except HolidayTableError as exc:
        raise SettingsError(str(settings.holiday_table), exc.field, exc.reason if exc.row is None
                            else f"row {exc.row}: {exc.reason}") from None
