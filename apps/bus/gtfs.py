"""Load a GTFS-Fares v2 feed (plus the city's one extension file) into an immutable ``FareNetwork``.

The feed is a directory of CSV files named and shaped as the GTFS reference names them: agency.txt,
routes.txt (network_id, or networks.txt + route_networks.txt), stops.txt, areas.txt + stop_areas.txt,
fare_media.txt, fare_products.txt, rider_categories.txt, fare_leg_rules.txt, timeframes.txt (with
calendar.txt / calendar_dates.txt for their service_id) and fare_transfer_rules.txt. Columns the loader
does not use are ignored, as the reference allows.

What GTFS-Fares v2 cannot express lives in ``citycard_fare_policy.txt``, ours and marked as ours (see
FARES.md): daily and weekly caps, the hold time limit, concession percentages, the mapping from the
registry's holder categories (senior, student, disabled) to rider categories, the fare medium the city
card is, and the start of the service day.

Amounts are CNY in the feed ("2.00") and integer fen here, converted with Decimal; sub-fen precision is
refused. Any bad row raises ``FeedError`` naming the file, the line (1-based, the header is line 1), the
field and the reason; the network is built only after every file has been read, so nothing is half-loaded.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "HOLDER_CATEGORIES",
    "POLICY_FILE",
    "Agency",
    "FareNetwork",
    "FarePolicy",
    "FeedError",
    "LegRule",
    "Route",
    "Timeframe",
    "TransferRule",
    "load_feed",
]

POLICY_FILE = "citycard_fare_policy.txt"
HOLDER_CATEGORIES = frozenset({"senior", "student", "disabled"})  # the registry's categories
CURRENCY = "CNY"
FEN_PER_YUAN = Decimal(100)
FEED_ROWS_MAX = 1_000_000  # per file: a feed far larger than any city's is refused, not read forever
UNLIMITED_TRANSFERS = -1


class FeedError(ValueError):
    """A feed file is wrong; nothing was loaded. ``row`` is the 1-based line (1 = header), None for the file."""

    def __init__(self, file: str, row: int | None, field: str, reason: str) -> None:
        self.file, self.row, self.field, self.reason = file, row, field, reason
        where = file if row is None else f"{file} line {row}"
        super().__init__(f"{where}, field {field}: {reason}" if field else f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Agency:
    agency_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Route:
    route_id: str
    agency_id: str
    network_id: str


@dataclass(frozen=True, slots=True)
class LegRule:
    """One row of fare_leg_rules.txt; "" is an empty field."""

    leg_group_id: str
    network_id: str
    from_area_id: str
    to_area_id: str
    from_timeframe_group_id: str
    to_timeframe_group_id: str
    fare_product_id: str
    rule_priority: int


@dataclass(frozen=True, slots=True)
class TransferRule:
    """One row of fare_transfer_rules.txt; limits in seconds, transfer_count -1 for unlimited."""

    from_leg_group_id: str
    to_leg_group_id: str
    transfer_count: int | None
    duration_limit_s: int | None
    duration_limit_type: int | None  # 0 dep->arr, 1 dep->dep, 2 arr->dep, 3 arr->arr (from leg -> to leg)
    fare_transfer_type: int          # 0 A+AB, 1 A+AB+B, 2 AB
    fare_product_id: str


@dataclass(frozen=True, slots=True)
class Timeframe:
    """A time-of-day window (seconds after local midnight, end exclusive) on the service's dates."""

    start_s: int
    end_s: int
    service_id: str


@dataclass(frozen=True, slots=True)
class FarePolicy:
    """What citycard_fare_policy.txt says: the parts of the city's fares that GTFS-Fares v2 cannot express."""

    hold_limit_s: int
    daily_cap_fen: Mapping[str, int]       # rider_category_id ("" for every category) -> cap
    weekly_cap_fen: Mapping[str, int]
    concession_percent: Mapping[str, int]  # rider_category_id -> percent of the default category's amount
    holder_categories: tuple[tuple[str, str], ...]  # (holder category, rider_category_id), by priority
    card_fare_media_id: str
    service_day_start_s: int

    def daily_cap(self, rider_category_id: str) -> int | None:
        return self.daily_cap_fen.get(rider_category_id, self.daily_cap_fen.get(""))

    def weekly_cap(self, rider_category_id: str) -> int | None:
        return self.weekly_cap_fen.get(rider_category_id, self.weekly_cap_fen.get(""))


@dataclass(frozen=True, slots=True)
class FareNetwork:
    """A loaded feed: read-only lookup tables for the fare engine."""

    zone: ZoneInfo
    agencies: Mapping[str, Agency]
    routes: Mapping[str, Route]
    stop_names: Mapping[str, str]
    stop_areas: Mapping[str, frozenset[str]]
    rider_categories: tuple[str, ...]
    default_category: str
    leg_rules: tuple[LegRule, ...]
    leg_rules_by_network: Mapping[str, tuple[LegRule, ...]]  # "" holds the rules with an empty network_id
    uses_rule_priority: bool
    price_fen: Mapping[tuple[str, str], int]                 # (fare_product_id, rider_category_id) -> fen
    transfer_rules: Mapping[tuple[str, str], TransferRule]   # (from_leg_group_id, to_leg_group_id)
    transfer_from_groups: frozenset[str]
    timeframes: Mapping[str, tuple[Timeframe, ...]]          # timeframe_group_id -> windows
    service_weekdays: Mapping[str, tuple[dt.date, dt.date, frozenset[int]]]
    service_exceptions: Mapping[tuple[str, dt.date], bool]   # True added, False removed
    policy: FarePolicy

    def service_runs(self, service_id: str, day: dt.date) -> bool:
        exception = self.service_exceptions.get((service_id, day))
        if exception is not None:
            return exception
        calendar = self.service_weekdays.get(service_id)
        return calendar is not None and calendar[0] <= day <= calendar[1] and day.weekday() in calendar[2]

    def timeframe_groups_at(self, local: dt.datetime) -> frozenset[str]:
        """The timeframe groups that hold at a local instant (empty when the feed has none)."""
        if not self.timeframes:
            return frozenset()
        second = local.hour * 3600 + local.minute * 60 + local.second
        day = local.date()
        return frozenset(group for group, windows in self.timeframes.items()
                         if any(w.start_s <= second < w.end_s and self.service_runs(w.service_id, day)
                                for w in windows))


# -- reading CSV -------------------------------------------------------------------------------------------

class _Table:
    """One feed file's rows as (line number, row dict) pairs, with the file's name for errors."""

    def __init__(self, directory: Path, name: str, required: bool, columns: tuple[str, ...]) -> None:
        self.name = name
        self.rows: list[tuple[int, dict[str, str]]] = []
        self.columns: frozenset[str] = frozenset()
        path = directory / name
        if not path.is_file():
            if required:
                raise FeedError(name, None, "", "the file is missing")
            return
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                self._read(handle, columns)
        except UnicodeDecodeError as exc:
            raise FeedError(name, None, "", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except csv.Error as exc:
            raise FeedError(name, None, "", f"not readable as CSV ({exc})") from exc

    def _read(self, handle: Iterator[str], columns: tuple[str, ...]) -> None:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        self.columns = frozenset(header)
        for column in columns:
            if column not in self.columns:
                raise FeedError(self.name, 1, column, "the column is missing")
        for values in reader:
            if len(self.rows) >= FEED_ROWS_MAX:
                raise FeedError(self.name, reader.line_num, "", f"more than {FEED_ROWS_MAX} rows")
            if not any(value.strip() for value in values):
                continue  # a blank line
            if len(values) != len(header):
                raise FeedError(self.name, reader.line_num, "", f"{len(values)} values for {len(header)} columns")
            self.rows.append((reader.line_num, {k: v.strip() for k, v in zip(header, values)}))

    def required(self, line: int, row: dict[str, str], field: str) -> str:
        value = row.get(field, "")
        if not value:
            raise FeedError(self.name, line, field, "required, but empty")
        return value

    def one_of(self, line: int, row: dict[str, str], field: str, known: Container[str],
               what: str, optional: bool = False) -> str:
        value = row.get(field, "") if optional else self.required(line, row, field)
        if value and value not in known:
            raise FeedError(self.name, line, field, f"{what} {value!r} is not defined")
        return value

    def integer(self, line: int, row: dict[str, str], field: str, allowed: range | None = None,
                optional: bool = False) -> int | None:
        text = row.get(field, "")
        if not text:
            if optional:
                return None
            raise FeedError(self.name, line, field, "required, but empty")
        try:
            value = int(text)
        except ValueError:
            raise FeedError(self.name, line, field, f"{text!r} is not a whole number") from None
        if allowed is not None and value not in allowed:
            raise FeedError(self.name, line, field,
                            f"{value} is outside {allowed.start}..{allowed.stop - 1}")
        return value

    def fen(self, line: int, row: dict[str, str], field: str, allow_negative: bool = False) -> int:
        text = self.required(line, row, field)
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise FeedError(self.name, line, field, f"{text!r} is not an amount") from None
        if not amount.is_finite():
            raise FeedError(self.name, line, field, f"{text!r} is not an amount")
        fen = amount * FEN_PER_YUAN
        if fen != fen.to_integral_value():
            raise FeedError(self.name, line, field, f"{text} has precision below one fen")
        if fen < 0 and not allow_negative:
            raise FeedError(self.name, line, field, f"{text} is negative")
        return int(fen)

    def seconds_of_day(self, line: int, row: dict[str, str], field: str, default: int | None = None) -> int:
        text = row.get(field, "")
        if not text and default is not None:
            return default
        parts = self.required(line, row, field).split(":")
        if len(parts) != 3 or not all(p.isdigit() and len(p) == 2 for p in parts[1:]) or not parts[0].isdigit():
            raise FeedError(self.name, line, field, f"{text!r} is not HH:MM:SS")
        hours, minutes, seconds = (int(p) for p in parts)
        total = hours * 3600 + minutes * 60 + seconds
        if minutes > 59 or seconds > 59 or total > 86_400:
            raise FeedError(self.name, line, field, f"{text!r} is not a time of day up to 24:00:00")
        return total

    def date(self, line: int, row: dict[str, str], field: str) -> dt.date:
        text = self.required(line, row, field)
        try:
            return dt.datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            raise FeedError(self.name, line, field, f"{text!r} is not a date YYYYMMDD") from None

    def unique(self, seen: set[Any], key: object, line: int, field: str) -> None:
        if key in seen:
            raise FeedError(self.name, line, field, f"{key!r} appears twice")
        seen.add(key)


# -- the files, one reader each ----------------------------------------------------------------------------

def load_feed(directory: str | Path) -> FareNetwork:
    """Read a feed directory; raise FeedError at the first bad row (and build nothing)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FeedError(str(folder), None, "", "not a directory")
    agencies, zone = _agencies(folder)
    routes, networks = _routes(folder, agencies)
    stop_names = _stops(folder)
    stop_areas, areas = _stop_areas(folder, stop_names)
    services, exceptions = _calendar(folder)
    timeframes = _timeframes(folder, frozenset(services) | {sid for sid, _ in exceptions})
    categories, default_category = _rider_categories(folder)
    media = _fare_media(folder)
    policy = _policy(folder, categories, media)
    products = _fare_products(folder, categories, media)
    price_fen = _prices(products, categories, default_category, media, policy)
    leg_rules, uses_priority = _leg_rules(folder, networks, areas, frozenset(timeframes), products)
    transfer_rules = _transfer_rules(folder, frozenset(r.leg_group_id for r in leg_rules), products)
    by_network: dict[str, list[LegRule]] = {}
    for rule in leg_rules:
        by_network.setdefault(rule.network_id, []).append(rule)
    return FareNetwork(
        zone=zone, agencies=_frozen(agencies), routes=_frozen(routes), stop_names=_frozen(stop_names),
        stop_areas=_frozen(stop_areas), rider_categories=tuple(categories), default_category=default_category,
        leg_rules=tuple(leg_rules), leg_rules_by_network=_frozen({k: tuple(v) for k, v in by_network.items()}),
        uses_rule_priority=uses_priority, price_fen=_frozen(price_fen), transfer_rules=_frozen(transfer_rules),
        transfer_from_groups=frozenset(key[0] for key in transfer_rules), timeframes=_frozen(timeframes),
        service_weekdays=_frozen(services), service_exceptions=_frozen(exceptions), policy=policy)


def _frozen(table: Mapping) -> Mapping:  # type: ignore[type-arg]
    return MappingProxyType(dict(table))


def _agencies(folder: Path) -> tuple[dict[str, Agency], ZoneInfo]:
    table = _Table(folder, "agency.txt", True, ("agency_id", "agency_name", "agency_timezone"))
    agencies: dict[str, Agency] = {}
    zone_name = ""
    for line, row in table.rows:
        agency_id = table.required(line, row, "agency_id")
        table.unique(set(agencies), agency_id, line, "agency_id")
        name = table.required(line, row, "agency_name")
        timezone = table.required(line, row, "agency_timezone")
        if zone_name and timezone != zone_name:
            raise FeedError(table.name, line, "agency_timezone", f"{timezone} differs from {zone_name}")
        zone_name = timezone
        agencies[agency_id] = Agency(agency_id, name)
    if not agencies:
        raise FeedError(table.name, None, "", "no agency")
    try:
        return agencies, ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise FeedError(table.name, 2, "agency_timezone", f"{zone_name!r} is not a time zone") from None


def _routes(folder: Path, agencies: Mapping[str, Agency]) -> tuple[dict[str, Route], frozenset[str]]:
    table = _Table(folder, "routes.txt", True, ("route_id",))
    links = _Table(folder, "route_networks.txt", False, ("network_id", "route_id"))
    declared = _Table(folder, "networks.txt", False, ("network_id",))
    networks = {table_row[1]["network_id"] for table_row in declared.rows if table_row[1].get("network_id")}
    network_of: dict[str, str] = {}
    if links.rows and "network_id" in table.columns:
        raise FeedError(table.name, 1, "network_id", "forbidden when route_networks.txt exists")
    routes: dict[str, Route] = {}
    for line, row in table.rows:
        route_id = table.required(line, row, "route_id")
        table.unique(set(routes), route_id, line, "route_id")
        agency_id = row.get("agency_id", "")
        if not agency_id and len(agencies) == 1:
            agency_id = next(iter(agencies))  # the reference lets a one-agency feed leave it out
        table.one_of(line, {"agency_id": agency_id}, "agency_id", agencies, "agency")
        routes[route_id] = Route(route_id, agency_id, row.get("network_id", ""))
    for line, row in links.rows:
        route_id = links.one_of(line, row, "route_id", routes, "route")
        network_id = links.one_of(line, row, "network_id", networks, "network") if declared.rows else \
            links.required(line, row, "network_id")
        links.unique(set(network_of), route_id, line, "route_id")
        network_of[route_id] = network_id
    if network_of:
        routes = {rid: Route(rid, r.agency_id, network_of.get(rid, "")) for rid, r in routes.items()}
    networks |= {route.network_id for route in routes.values() if route.network_id}
    return routes, frozenset(networks)


def _stops(folder: Path) -> dict[str, str]:
    table = _Table(folder, "stops.txt", True, ("stop_id",))
    names: dict[str, str] = {}
    for line, row in table.rows:
        stop_id = table.required(line, row, "stop_id")
        table.unique(set(names), stop_id, line, "stop_id")
        names[stop_id] = row.get("stop_name", "")
    return names


def _stop_areas(folder: Path, stops: Mapping[str, str]) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    areas_table = _Table(folder, "areas.txt", False, ("area_id",))
    areas: set[str] = set()
    for line, row in areas_table.rows:
        areas_table.unique(areas, areas_table.required(line, row, "area_id"), line, "area_id")
    table = _Table(folder, "stop_areas.txt", False, ("area_id", "stop_id"))
    members: dict[str, set[str]] = {}
    seen: set[Any] = set()
    for line, row in table.rows:
        area_id = table.one_of(line, row, "area_id", frozenset(areas), "area")
        stop_id = table.one_of(line, row, "stop_id", stops, "stop")
        table.unique(seen, (area_id, stop_id), line, "stop_id")
        members.setdefault(stop_id, set()).add(area_id)
    return {stop: frozenset(members.get(stop, ())) for stop in stops}, frozenset(areas)


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _calendar(folder: Path) -> tuple[dict[str, tuple[dt.date, dt.date, frozenset[int]]],
                                     dict[tuple[str, dt.date], bool]]:
    table = _Table(folder, "calendar.txt", False, ("service_id", *WEEKDAYS, "start_date", "end_date"))
    services: dict[str, tuple[dt.date, dt.date, frozenset[int]]] = {}
    for line, row in table.rows:
        service_id = table.required(line, row, "service_id")
        table.unique(set(services), service_id, line, "service_id")
        days = frozenset(i for i, name in enumerate(WEEKDAYS) if table.integer(line, row, name, range(2)))
        start, end = table.date(line, row, "start_date"), table.date(line, row, "end_date")
        if end < start:
            raise FeedError(table.name, line, "end_date", "before start_date")
        services[service_id] = (start, end, days)
    dates = _Table(folder, "calendar_dates.txt", False, ("service_id", "date", "exception_type"))
    exceptions: dict[tuple[str, dt.date], bool] = {}
    for line, row in dates.rows:
        key = (dates.required(line, row, "service_id"), dates.date(line, row, "date"))
        dates.unique(set(exceptions), key, line, "date")
        exceptions[key] = dates.integer(line, row, "exception_type", range(1, 3)) == 1
    return services, exceptions


def _timeframes(folder: Path, services: frozenset[str]) -> dict[str, tuple[Timeframe, ...]]:
    table = _Table(folder, "timeframes.txt", False, ("timeframe_group_id", "service_id"))
    groups: dict[str, list[Timeframe]] = {}
    for line, row in table.rows:
        group = table.required(line, row, "timeframe_group_id")
        if bool(row.get("start_time")) != bool(row.get("end_time")):
            field = "end_time" if row.get("start_time") else "start_time"
            raise FeedError(table.name, line, field, "start_time and end_time go together")
        start = table.seconds_of_day(line, row, "start_time", default=0)
        end = table.seconds_of_day(line, row, "end_time", default=86_400)
        if end <= start:
            raise FeedError(table.name, line, "end_time", "not after start_time")
        service_id = table.one_of(line, row, "service_id", services, "service")
        groups.setdefault(group, []).append(Timeframe(start, end, service_id))
    return {group: tuple(windows) for group, windows in groups.items()}


def _rider_categories(folder: Path) -> tuple[list[str], str]:
    table = _Table(folder, "rider_categories.txt", True, ("rider_category_id", "is_default_fare_category"))
    categories: list[str] = []
    defaults: list[str] = []
    for line, row in table.rows:
        category = table.required(line, row, "rider_category_id")
        table.unique(set(categories), category, line, "rider_category_id")
        categories.append(category)
        if table.integer(line, row, "is_default_fare_category", range(2), optional=True):
            if defaults:
                raise FeedError(table.name, line, "is_default_fare_category",
                                f"{defaults[0]!r} is the default category already")
            defaults.append(category)
    if not defaults:
        raise FeedError(table.name, None, "is_default_fare_category", "no category is the default")
    return categories, defaults[0]


TRANSIT_CARD_MEDIA_TYPE = 2


def _fare_media(folder: Path) -> dict[str, int]:
    table = _Table(folder, "fare_media.txt", False, ("fare_media_id", "fare_media_type"))
    media: dict[str, int] = {}
    for line, row in table.rows:
        media_id = table.required(line, row, "fare_media_id")
        table.unique(set(media), media_id, line, "fare_media_id")
        media[media_id] = table.integer(line, row, "fare_media_type", range(5)) or 0
    return media


# (fare_product_id, rider_category_id, fare_media_id) -> fen
Products = dict[tuple[str, str, str], int]


def _fare_products(folder: Path, categories: list[str], media: Mapping[str, int]) -> Products:
    table = _Table(folder, "fare_products.txt", True, ("fare_product_id", "amount", "currency"))
    products: Products = {}
    known_categories = frozenset(categories)
    for line, row in table.rows:
        product = table.required(line, row, "fare_product_id")
        category = table.one_of(line, row, "rider_category_id", known_categories, "rider category", optional=True)
        medium = table.one_of(line, row, "fare_media_id", media, "fare medium", optional=True)
        table.unique(set(products), (product, category, medium), line, "fare_product_id")
        if table.required(line, row, "currency") != CURRENCY:
            raise FeedError(table.name, line, "currency", f"{row['currency']!r}: the city's fares are in {CURRENCY}")
        products[(product, category, medium)] = table.fen(line, row, "amount", allow_negative=True)
    return products


def _prices(products: Products, categories: list[str], default_category: str, media: Mapping[str, int],
            policy: FarePolicy) -> dict[tuple[str, str], int]:
    """Each product's amount for each rider category when paid with the city card.

    A row for the category wins; then a row for every category (empty rider_category_id); then the default
    category's amount times the policy's concession percent, rounded down (the fraction goes to the rider).
    """
    def usable(medium: str) -> bool:
        if not medium:
            return True
        if policy.card_fare_media_id:
            return medium == policy.card_fare_media_id
        return media.get(medium) == TRANSIT_CARD_MEDIA_TYPE

    rows: dict[tuple[str, str], int] = {}
    for (product, category, medium), fen in sorted(products.items(), key=lambda item: item[0][2] != ""):
        if usable(medium):
            rows[(product, category)] = fen  # sorted so that a row for the card's medium beats an empty one
    prices: dict[tuple[str, str], int] = {}
    for product in {key[0] for key in rows}:
        base = rows.get((product, default_category), rows.get((product, "")))
        for category in categories:
            if (product, category) in rows:
                prices[(product, category)] = rows[(product, category)]
            elif (product, "") in rows and category not in policy.concession_percent:
                prices[(product, category)] = rows[(product, "")]
            elif base is not None:
                prices[(product, category)] = base * policy.concession_percent.get(category, 100) // 100
    return prices


def _leg_rules(folder: Path, networks: frozenset[str], areas: frozenset[str], groups: frozenset[str],
               products: Products) -> tuple[list[LegRule], bool]:
    table = _Table(folder, "fare_leg_rules.txt", True, ("fare_product_id",))
    product_ids = frozenset(key[0] for key in products)
    rules: list[LegRule] = []
    seen: set[Any] = set()
    for line, row in table.rows:
        rule = LegRule(
            leg_group_id=row.get("leg_group_id", ""),
            network_id=table.one_of(line, row, "network_id", networks, "network", optional=True),
            from_area_id=table.one_of(line, row, "from_area_id", areas, "area", optional=True),
            to_area_id=table.one_of(line, row, "to_area_id", areas, "area", optional=True),
            from_timeframe_group_id=table.one_of(line, row, "from_timeframe_group_id", groups, "timeframe group",
                                                 optional=True),
            to_timeframe_group_id=table.one_of(line, row, "to_timeframe_group_id", groups, "timeframe group",
                                               optional=True),
            fare_product_id=table.one_of(line, row, "fare_product_id", product_ids, "fare product"),
            rule_priority=table.integer(line, row, "rule_priority", range(1_000_000), optional=True) or 0)
        table.unique(seen, (rule.network_id, rule.from_area_id, rule.to_area_id, rule.from_timeframe_group_id,
                            rule.to_timeframe_group_id, rule.fare_product_id), line, "fare_product_id")
        rules.append(rule)
    uses_priority = any(row.get("rule_priority") for _, row in table.rows)
    return rules, uses_priority


def _transfer_rules(folder: Path, leg_groups: frozenset[str],
                    products: Products) -> dict[tuple[str, str], TransferRule]:
    table = _Table(folder, "fare_transfer_rules.txt", False, ("fare_transfer_type",))
    product_ids = frozenset(key[0] for key in products)
    rules: dict[tuple[str, str], TransferRule] = {}
    for line, row in table.rows:
        from_group = table.one_of(line, row, "from_leg_group_id", leg_groups, "leg group", optional=True)
        to_group = table.one_of(line, row, "to_leg_group_id", leg_groups, "leg group", optional=True)
        count = table.integer(line, row, "transfer_count", range(-1, 1_000), optional=True)
        if from_group != to_group and count is not None:
            raise FeedError(table.name, line, "transfer_count", "forbidden when the leg groups differ")
        if from_group == to_group and count is None:
            raise FeedError(table.name, line, "transfer_count", "required when the leg groups are the same")
        if count == 0:
            raise FeedError(table.name, line, "transfer_count", "0 is not allowed (-1 or at least 1)")
        limit = table.integer(line, row, "duration_limit", range(1, 7 * 86_400 + 1), optional=True)
        limit_type = table.integer(line, row, "duration_limit_type", range(4), optional=limit is None)
        if limit is None and limit_type is not None:
            raise FeedError(table.name, line, "duration_limit_type", "forbidden without duration_limit")
        table.unique(set(rules), (from_group, to_group), line, "to_leg_group_id")
        rules[(from_group, to_group)] = TransferRule(
            from_group, to_group, count, limit, limit_type,
            fare_transfer_type=table.integer(line, row, "fare_transfer_type", range(3)) or 0,
            fare_product_id=table.one_of(line, row, "fare_product_id", product_ids, "fare product", optional=True))
    return rules


POLICY_SETTINGS = frozenset({"hold_limit_minutes", "daily_cap", "weekly_cap", "concession_percent",
                             "holder_category", "card_fare_media_id", "service_day_start"})
HOLD_LIMIT_MINUTES_MAX = 24 * 60


def _policy(folder: Path, categories: list[str], media: Mapping[str, int]) -> FarePolicy:
    """citycard_fare_policy.txt: one setting a row (columns setting, rider_category_id, holder_category, value)."""
    table = _Table(folder, POLICY_FILE, True, ("setting", "rider_category_id", "holder_category", "value"))
    known = frozenset(categories)
    seen: set[Any] = set()
    caps: dict[str, dict[str, int]] = {"daily_cap": {}, "weekly_cap": {}}
    percent: dict[str, int] = {}
    holders: list[tuple[int, str, str]] = []
    hold_minutes: int | None = None
    card_media = ""
    day_start = 0
    for line, row in table.rows:
        setting = table.required(line, row, "setting")
        if setting not in POLICY_SETTINGS:
            raise FeedError(table.name, line, "setting", f"{setting!r} is not one of {sorted(POLICY_SETTINGS)}")
        category = table.one_of(line, row, "rider_category_id", known, "rider category", optional=True)
        holder = row.get("holder_category", "")
        table.unique(seen, (setting, category, holder), line, "setting")
        if setting == "hold_limit_minutes":
            hold_minutes = table.integer(line, row, "value", range(1, HOLD_LIMIT_MINUTES_MAX + 1))
        elif setting in caps:
            caps[setting][category] = table.fen(line, row, "value")
        elif setting == "concession_percent":
            percent[table.required(line, row, "rider_category_id")] = table.integer(line, row, "value", range(101)) or 0
        elif setting == "holder_category":
            if holder not in HOLDER_CATEGORIES:
                raise FeedError(table.name, line, "holder_category",
                                f"{holder!r} is not a registry category {sorted(HOLDER_CATEGORIES)}")
            priority = table.integer(line, row, "value", range(1, 1000)) or 0
            holders.append((priority, holder, table.required(line, row, "rider_category_id")))
        elif setting == "card_fare_media_id":
            card_media = table.one_of(line, row, "value", media, "fare medium")
        else:
            day_start = table.seconds_of_day(line, row, "value")
            if day_start >= 86_400:
                raise FeedError(table.name, line, "value", "the service day starts before 24:00:00")
    if hold_minutes is None:
        raise FeedError(table.name, None, "setting", "hold_limit_minutes is required")
    holders.sort()
    return FarePolicy(
        hold_limit_s=hold_minutes * 60, daily_cap_fen=MappingProxyType(caps["daily_cap"]),
        weekly_cap_fen=MappingProxyType(caps["weekly_cap"]), concession_percent=MappingProxyType(percent),
        holder_categories=tuple((holder, category) for _, holder, category in holders),
        card_fare_media_id=card_media, service_day_start_s=day_start)
