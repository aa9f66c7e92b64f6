"""The one clock.

Every timer in citycard (ledger timestamps, pending-transfer timeouts, auto-restore of lost cards,
clearing windows) reads time from here. ``CITYCARD_NOW`` pins it: an ISO 8601 instant, read in
Asia/Shanghai when it carries no zone. Tests, replays and audits set it; production leaves it unset.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from zoneinfo import ZoneInfo

__all__ = ["CITY_ZONE", "ClockError", "now", "now_ns", "today", "parse_instant"]

CITY_ZONE = ZoneInfo("Asia/Shanghai")
ENV_NAME = "CITYCARD_NOW"


class ClockError(ValueError):
    """CITYCARD_NOW (or another instant given by an operator) cannot be read."""


def parse_instant(text: str) -> _dt.datetime:
    """An ISO 8601 instant as an aware datetime; naive ones are city time."""
    try:
        instant = _dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ClockError(f"{text!r} is not an ISO 8601 instant (example: 2026-10-01T09:30:00+08:00)") from exc
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=CITY_ZONE)
    return instant


def now() -> _dt.datetime:
    """The current instant in city time, or the pinned one."""
    pinned = os.environ.get(ENV_NAME)
    if pinned:
        return parse_instant(pinned).astimezone(CITY_ZONE)
    return _dt.datetime.now(CITY_ZONE)


def now_ns() -> int:
    """The current instant as nanoseconds since the Unix epoch (ledger timestamps are built on this)."""
    pinned = os.environ.get(ENV_NAME)
    if pinned:
        instant = parse_instant(pinned)
        return int(instant.timestamp()) * 1_000_000_000 + instant.microsecond * 1_000
    return time.time_ns()


def today() -> _dt.date:
    """The city's calendar date now."""
    return now().date()
