"""The GTFS-Fares v2 loader: the city's sample feed as loaded, exact fen, and every kind of bad row named."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from pathlib import Path

import pytest
from citycard.apps.bus import gtfs
from citycard.apps.bus.gtfs import FeedError, load_feed

FEED = Path(gtfs.__file__).parent / "feed"


@pytest.fixture
def feed(tmp_path: Path) -> Path:
    copy = tmp_path / "feed"
    shutil.copytree(FEED, copy)
    return copy


def edit(folder: Path, name: str, old: str, new: str) -> None:
    path = folder / name
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_sample_feed_loads_with_its_operators_routes_and_prices_in_fen() -> None:
    network = load_feed(FEED)
    assert sorted(network.agencies) == ["citybus", "metro"]
    assert {rid: (r.agency_id, r.network_id) for rid, r in network.routes.items()} == {
        "1": ("citybus", "bus"), "2": ("citybus", "bus"), "101": ("citybus", "bus"),
        "M1": ("metro", "metro"), "M2": ("metro", "metro")}
    assert network.stop_areas["M_SQUARE"] == {"zone1"} and network.stop_areas["B_SQUARE"] == frozenset()
    assert network.default_category == "adult"
    assert network.price_fen[("bus_flat", "adult")] == 200
    assert network.price_fen[("metro_3zones", "adult")] == 500
    assert network.price_fen[("metro_3zones", "student")] == 250   # 50 percent
    assert network.price_fen[("metro_3zones", "senior")] == 0
    assert network.price_fen[("transfer_discount", "adult")] == -100
    assert network.price_fen[("transfer_discount", "student")] == -50
    policy = network.policy
    assert (policy.hold_limit_s, policy.daily_cap("adult"), policy.weekly_cap("student")) == (180 * 60, 1500, 6000)
    assert policy.holder_categories == (("disabled", "disabled"), ("senior", "senior"), ("student", "student"))
    assert str(network.zone) == "Asia/Shanghai"


def test_the_network_cannot_be_changed_after_loading() -> None:
    network = load_feed(FEED)
    with pytest.raises(TypeError):
        network.routes["X"] = network.routes["1"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        network.default_category = "senior"  # type: ignore[misc]


@pytest.mark.parametrize(("amount", "fen"), [("0.29", 29), ("1.1", 110), ("2", 200), ("0.10", 10),
                                             ("1234567.89", 123456789)])
def test_amounts_become_exact_fen(feed: Path, amount: str, fen: int) -> None:
    edit(feed, "fare_products.txt", "citycard,2.00,CNY", f"citycard,{amount},CNY")
    assert load_feed(feed).price_fen[("bus_flat", "adult")] == fen


def test_concession_percent_rounds_down_so_the_fraction_goes_to_the_rider(feed: Path) -> None:
    edit(feed, "fare_products.txt", "citycard,2.00,CNY", "citycard,2.25,CNY")
    edit(feed, "fare_products.txt", "citycard,-1.00,CNY", "citycard,-0.25,CNY")
    prices = load_feed(feed).price_fen
    assert prices[("bus_flat", "student")] == 112            # 112.5 fen paid as 112
    assert prices[("transfer_discount", "student")] == -13   # a discount of 12.5 fen given as 13


def test_a_row_for_the_category_wins_over_the_percentage(feed: Path) -> None:
    with (feed / "fare_products.txt").open("a", encoding="utf-8") as handle:
        handle.write("bus_flat,Bus single fare (student),student,citycard,0.80,CNY\n")
    assert load_feed(feed).price_fen[("bus_flat", "student")] == 80


def test_timeframes_hold_on_their_service_days(feed: Path) -> None:
    (feed / "calendar.txt").write_text(
        "service_id,monday,tuesday,wednesday,thursday,friday,saturday,sunday,start_date,end_date\n"
        "weekdays,1,1,1,1,1,0,0,20260101,20261231\n", encoding="utf-8")
    (feed / "calendar_dates.txt").write_text("service_id,date,exception_type\nweekdays,20260302,2\n",
                                             encoding="utf-8")
    (feed / "timeframes.txt").write_text(
        "timeframe_group_id,start_time,end_time,service_id\npeak,07:00:00,09:00:00,weekdays\n", encoding="utf-8")
    network = load_feed(feed)
    zone = network.zone
    assert network.timeframe_groups_at(dt.datetime(2026, 3, 3, 8, 0, tzinfo=zone)) == {"peak"}
    assert network.timeframe_groups_at(dt.datetime(2026, 3, 3, 9, 0, tzinfo=zone)) == frozenset()
    assert network.timeframe_groups_at(dt.datetime(2026, 3, 7, 8, 0, tzinfo=zone)) == frozenset()  # Saturday
    assert network.timeframe_groups_at(dt.datetime(2026, 3, 2, 8, 0, tzinfo=zone)) == frozenset()  # removed day


BAD_ROWS = [
    # (file, old text, new text, line, field, part of the reason)
    ("fare_products.txt", "citycard,2.00,CNY", "citycard,2.005,CNY", 2, "amount", "below one fen"),
    ("fare_products.txt", "citycard,2.00,CNY", "citycard,two,CNY", 2, "amount", "not an amount"),
    ("fare_products.txt", "citycard,2.00,CNY", "citycard,NaN,CNY", 2, "amount", "not an amount"),
    ("fare_products.txt", "citycard,3.00,CNY", "citycard,3.00,USD", 3, "currency", "CNY"),
    ("fare_products.txt", "bus_flat,Bus single fare,,citycard", "bus_flat,Bus single fare,child,citycard", 2,
     "rider_category_id", "'child' is not defined"),
    ("fare_products.txt", "bus_flat,Bus single fare,,citycard", "bus_flat,Bus single fare,,paper", 2,
     "fare_media_id", "'paper' is not defined"),
    ("fare_leg_rules.txt", "bus_leg,bus,,,bus_flat", "bus_leg,bus,,,bus_night", 2, "fare_product_id",
     "'bus_night' is not defined"),
    ("fare_leg_rules.txt", "metro_leg,metro,zone1,zone1", "metro_leg,metro,zone9,zone1", 3, "from_area_id",
     "'zone9' is not defined"),
    ("fare_leg_rules.txt", "bus_leg,bus,,,bus_flat", "bus_leg,tram,,,bus_flat", 2, "network_id",
     "'tram' is not defined"),
    ("stop_areas.txt", "zone2,M_UNIV", "zone2,M_NOWHERE", 5, "stop_id", "'M_NOWHERE' is not defined"),
    ("stops.txt", "M_SQUARE,People's", "M_RAIL,People's", 3, "stop_id", "appears twice"),
    ("routes.txt", "101,citybus", "101,ferries", 4, "agency_id", "'ferries' is not defined"),
    ("route_networks.txt", "metro,M2", "metro,M9", 6, "route_id", "'M9' is not defined"),
    ("agency.txt", "metro,City Metro,https://metro.example.cn,Asia/Shanghai",
     "metro,City Metro,https://metro.example.cn,Asia/Tokyo", 3, "agency_timezone", "differs"),
    ("rider_categories.txt", "senior,Senior (65 and over),0", "senior,Senior (65 and over),1", 3,
     "is_default_fare_category", "default category already"),
    ("rider_categories.txt", "student,Student,0", "student,Student,yes", 4, "is_default_fare_category",
     "not a whole number"),
    ("fare_transfer_rules.txt", "bus_leg,metro_leg,,3600", "bus_leg,metro_leg,1,3600", 2, "transfer_count",
     "forbidden when the leg groups differ"),
    ("fare_transfer_rules.txt", "bus_leg,metro_leg,,3600,1", "bus_leg,metro_leg,,,1", 2, "duration_limit_type",
     "forbidden without duration_limit"),
    ("fare_transfer_rules.txt", "bus_leg,metro_leg,,3600,1,1", "bus_leg,metro_leg,,3600,1,7", 2,
     "fare_transfer_type", "outside 0..2"),
    ("fare_transfer_rules.txt", "metro_leg,bus_leg", "bus_leg,metro_leg", 3, "to_leg_group_id", "appears twice"),
    ("fare_transfer_rules.txt", "metro_leg,bus_leg", "metro_leg,ferry_leg", 3, "to_leg_group_id",
     "'ferry_leg' is not defined"),
    ("citycard_fare_policy.txt", "daily_cap,,,15.00", "daily_cap,,,15.001", 3, "value", "below one fen"),
    ("citycard_fare_policy.txt", "daily_cap,,,15.00", "monthly_cap,,,15.00", 3, "setting", "not one of"),
    ("citycard_fare_policy.txt", "holder_category,senior,senior,2", "holder_category,senior,veteran,2", 9,
     "holder_category", "'veteran' is not a registry category"),
    ("citycard_fare_policy.txt", "concession_percent,student,,50", "concession_percent,student,,150", 6, "value",
     "outside 0..100"),
    ("citycard_fare_policy.txt", "concession_percent,student,,50", "concession_percent,pupil,,50", 6,
     "rider_category_id", "'pupil' is not defined"),
    ("citycard_fare_policy.txt", "hold_limit_minutes,,,180", "hold_limit_minutes,,,0", 2, "value",
     "outside 1..1440"),
    ("citycard_fare_policy.txt", "weekly_cap,,,60.00", "daily_cap,,,60.00", 4, "setting", "appears twice"),
    ("citycard_fare_policy.txt", "card_fare_media_id,,,citycard", "card_fare_media_id,,,qr", 11, "value",
     "'qr' is not defined"),
]


@pytest.mark.parametrize(("name", "old", "new", "line", "field", "reason"), BAD_ROWS,
                         ids=[f"{row[0]}:{row[4]}:{row[5]}" for row in BAD_ROWS])
def test_a_bad_row_names_file_line_and_field(feed: Path, name: str, old: str, new: str, line: int, field: str,
                                             reason: str) -> None:
    edit(feed, name, old, new)
    with pytest.raises(FeedError) as caught:
        load_feed(feed)
    error = caught.value
    assert (error.file, error.row, error.field) == (name, line, field), str(error)
    assert reason in error.reason
    assert str(error).startswith(f"{name} line {line}, field {field}: ")


def test_a_missing_file_and_a_missing_column_are_named(feed: Path) -> None:
    (feed / "fare_leg_rules.txt").unlink()
    with pytest.raises(FeedError) as missing:
        load_feed(feed)
    assert (missing.value.file, missing.value.row, missing.value.reason) == (
        "fare_leg_rules.txt", None, "the file is missing")
    shutil.copy(FEED / "fare_leg_rules.txt", feed)
    edit(feed, "stops.txt", "stop_id,stop_name", "stop,stop_name")
    with pytest.raises(FeedError) as column:
        load_feed(feed)
    assert (column.value.file, column.value.row, column.value.field) == ("stops.txt", 1, "stop_id")


def test_a_policy_without_a_hold_limit_is_refused(feed: Path) -> None:
    edit(feed, "citycard_fare_policy.txt", "hold_limit_minutes,,,180\n", "")
    with pytest.raises(FeedError, match="hold_limit_minutes is required") as caught:
        load_feed(feed)
    assert caught.value.file == gtfs.POLICY_FILE


def test_a_short_row_and_a_non_utf8_file_are_refused(feed: Path) -> None:
    edit(feed, "areas.txt", "zone2,Zone 2", "zone2")
    with pytest.raises(FeedError, match="areas.txt line 3: 1 values for 2 columns"):
        load_feed(feed)
    shutil.copy(FEED / "areas.txt", feed)
    (feed / "stops.txt").write_bytes("stop_id,stop_name\nM_RAIL,火车站\n".encode("gbk"))
    with pytest.raises(FeedError, match="stops.txt: not UTF-8"):
        load_feed(feed)
