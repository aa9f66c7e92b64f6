"""The fare engine over the city's sample feed, with the numbers written out.

Sample feed: bus 2.00 flat; metro 3.00 within a zone, 4.00 across two, 5.00 across three (zone1 M_RAIL,
M_SQUARE, M_OLDTOWN; zone2 M_UNIV, M_STADIUM; zone3 M_SCIENCE, M_AIRPORT); 1.00 off the second leg of a
bus<->metro transfer within 60 minutes; senior and disabled free, student 50 percent; caps 15.00 a day and
60.00 a week; hold limit 180 minutes. 2026-03-02 is a Monday.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from citycard.apps.bus import gtfs
from citycard.apps.bus.fares import (
    FareDecision,
    FareEngine,
    Outcome,
    Refusal,
    RiderState,
    StaleDecision,
    Tap,
    commit,
)
from citycard.apps.bus.gtfs import load_feed
from hypothesis import given, settings
from hypothesis import strategies as st

ZONE = dt.timezone(dt.timedelta(hours=8))  # Asia/Shanghai has no DST: the city's offset
ENGINE = FareEngine(load_feed(Path(gtfs.__file__).parent / "feed"))
MONDAY = dt.date(2026, 3, 2)


def at(hour: int, minute: int = 0, day: dt.date = MONDAY) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZONE)


class Rider:
    """One card: decides each tap and commits it, as the service does after the ledger booked it."""

    def __init__(self, *categories: str) -> None:
        self.categories = frozenset(categories)
        self.state = RiderState()

    def tap(self, mode: str, route: str, stop: str, when: dt.datetime) -> FareDecision:
        decision = ENGINE.decide(self.state, Tap("C00000001", when, route, stop, mode, self.categories))
        self.state = commit(self.state, decision, hold_ref=f"hold-{when:%H%M}")
        return decision

    def bus(self, when: dt.datetime, route: str = "1", stop: str = "B_RAIL") -> FareDecision:
        return self.tap("board", route, stop, when)

    def metro(self, entry: str, exit: str, entered: dt.datetime, minutes: int = 20) -> FareDecision:
        hold = self.tap("entry", "M1", entry, entered)
        assert hold.outcome is Outcome.HOLD, hold.message
        return self.tap("exit", "M2", exit, entered + dt.timedelta(minutes=minutes))


def test_flat_bus_fare() -> None:
    decision = Rider().bus(at(8))
    assert (decision.outcome, decision.fare_fen, decision.fare_product_id) == (Outcome.CHARGE, 200, "bus_flat")
    assert (decision.agency_id, decision.rider_category_id, decision.discount_fen) == ("citybus", "adult", 0)
    assert decision.service_day == MONDAY and not decision.capped


@pytest.mark.parametrize(("entry", "exit", "held", "fare", "product"), [
    ("M_RAIL", "M_OLDTOWN", 500, 300, "metro_1zone"),
    ("M_RAIL", "M_UNIV", 500, 400, "metro_2zones"),
    ("M_STADIUM", "M_AIRPORT", 400, 400, "metro_2zones"),   # from zone 2 nothing costs more than 4.00
    ("M_STADIUM", "M_UNIV", 400, 300, "metro_1zone"),
    ("M_AIRPORT", "M_SQUARE", 500, 500, "metro_3zones"),
    ("M_SCIENCE", "M_SCIENCE", 500, 300, "metro_1zone"),
])
def test_zone_metro_fare_holds_the_maximum_and_releases_the_rest(entry: str, exit: str, held: int, fare: int,
                                                                 product: str) -> None:
    rider = Rider()
    hold = rider.tap("entry", "M1", entry, at(8))
    assert (hold.outcome, hold.held_fen, hold.fare_fen, hold.agency_id) == (Outcome.HOLD, held, 0, "metro")
    charged = rider.tap("exit", "M1", exit, at(8, 30))
    assert (charged.outcome, charged.fare_fen, charged.held_fen, charged.released_fen) == (
        Outcome.CHARGE, fare, held, held - fare)
    assert (charged.fare_product_id, charged.hold_ref, charged.agency_id) == (product, "hold-0800", "metro")
    assert rider.state.journey is None


def test_transfer_within_the_window_takes_one_yuan_off_the_second_leg() -> None:
    rider = Rider()
    assert rider.bus(at(8)).fare_fen == 200
    metro = rider.metro("M_RAIL", "M_UNIV", at(9, 0))       # entry exactly 60 minutes after boarding
    assert (metro.fare_fen, metro.transfer_discount_fen, metro.discount_fen) == (300, 100, 100)
    back = rider.bus(at(9, 50), route="2", stop="B_UNIV")   # 30 minutes after the metro exit at 9:20
    assert (back.fare_fen, back.transfer_discount_fen, back.agency_id) == (100, 100, "citybus")


def test_transfer_outside_the_window_pays_in_full() -> None:
    rider = Rider()
    rider.bus(at(8))
    metro = rider.metro("M_RAIL", "M_UNIV", at(9, 1))       # 61 minutes after boarding
    assert (metro.fare_fen, metro.transfer_discount_fen) == (400, 0)
    back = rider.bus(at(10, 22), route="2", stop="B_UNIV")  # 61 minutes after the exit at 9:21
    assert (back.fare_fen, back.transfer_discount_fen) == (200, 0)


def test_bus_to_bus_has_no_transfer_rule() -> None:
    rider = Rider()
    rider.bus(at(8))
    assert rider.bus(at(8, 10), route="2").fare_fen == 200


def test_daily_cap_reached_mid_day() -> None:
    rider = Rider()
    assert rider.bus(at(7)).fare_fen == 200                                         # 2.00
    assert rider.metro("M_RAIL", "M_SCIENCE", at(10)).fare_fen == 500               # 7.00
    assert rider.metro("M_SCIENCE", "M_RAIL", at(12)).fare_fen == 500               # 12.00
    hold = rider.tap("entry", "M1", "M_RAIL", at(15))
    assert (hold.held_fen, hold.capped, hold.cap_reduction_fen) == (300, True, 200)  # 3.00 left under 15.00
    crossing = rider.tap("exit", "M1", "M_SCIENCE", at(15, 40))
    assert (crossing.fare_fen, crossing.released_fen, crossing.capped) == (300, 0, True)
    assert (crossing.cap_reduction_fen, crossing.discount_fen) == (200, 200)
    after = rider.bus(at(18))
    assert (after.fare_fen, after.capped, after.discount_fen) == (0, True, 200)
    assert rider.tap("entry", "M1", "M_RAIL", at(19)).held_fen == 0
    assert rider.tap("exit", "M1", "M_UNIV", at(19, 20)).fare_fen == 0
    assert rider.bus(at(7, day=MONDAY + dt.timedelta(days=1))).fare_fen == 200     # a new service day


def test_a_transfer_discount_and_the_cap_together() -> None:
    rider = Rider()
    rider.metro("M_RAIL", "M_SCIENCE", at(8))
    rider.metro("M_SCIENCE", "M_RAIL", at(10))        # 10.00
    rider.metro("M_RAIL", "M_UNIV", at(12))           # 14.00, exit at 12:20
    bus = rider.bus(at(12, 30))                        # 2.00 - 1.00 transfer = 1.00, exactly what is left
    assert (bus.fare_fen, bus.transfer_discount_fen, bus.cap_reduction_fen, bus.capped) == (100, 100, 0, False)
    assert rider.bus(at(13, 40)).fare_fen == 0


def test_weekly_cap() -> None:
    rider = Rider()
    for offset in range(4):                            # Monday to Thursday: 15.00 a day, 60.00 in all
        day = MONDAY + dt.timedelta(days=offset)
        paid = [rider.metro("M_RAIL", "M_SCIENCE", at(hour, day=day)).fare_fen for hour in (8, 11, 14, 17)]
        assert paid == [500, 500, 500, 0]
    friday = rider.bus(at(8, day=MONDAY + dt.timedelta(days=4)))
    assert (friday.fare_fen, friday.capped) == (0, True)
    assert rider.tap("entry", "M1", "M_RAIL", at(9, day=MONDAY + dt.timedelta(days=6))).held_fen == 0  # Sunday
    rider.tap("exit", "M1", "M_RAIL", at(9, 10, day=MONDAY + dt.timedelta(days=6)))
    assert rider.bus(at(8, day=MONDAY + dt.timedelta(days=7))).fare_fen == 200  # the next ISO week


def test_senior_rides_free() -> None:
    rider = Rider("senior")
    bus = rider.bus(at(8))
    assert (bus.fare_fen, bus.rider_category_id, bus.concession_fen) == (0, "senior", 200)
    hold = rider.tap("entry", "M1", "M_RAIL", at(9))
    assert (hold.outcome, hold.held_fen, hold.concession_fen) == (Outcome.HOLD, 0, 500)
    assert rider.tap("exit", "M1", "M_UNIV", at(9, 30)).fare_fen == 0


def test_student_pays_half_and_half_the_transfer_discount() -> None:
    rider = Rider("student")
    bus = rider.bus(at(8))
    assert (bus.fare_fen, bus.rider_category_id, bus.concession_fen) == (100, "student", 100)
    assert rider.tap("entry", "M1", "M_RAIL", at(8, 30)).held_fen == 250
    metro = rider.tap("exit", "M1", "M_UNIV", at(8, 50))
    assert (metro.fare_fen, metro.transfer_discount_fen, metro.released_fen) == (150, 50, 100)  # 2.00 - 0.50


def test_disabled_rides_free_and_wins_over_student() -> None:
    assert Rider("disabled").bus(at(8)).fare_fen == 0
    both = Rider("student", "disabled").bus(at(8))
    assert (both.fare_fen, both.rider_category_id) == (0, "disabled")
    assert Rider("senior", "student").bus(at(8)).rider_category_id == "senior"


def test_missing_tap_off_expires_at_the_maximum() -> None:
    rider = Rider()
    rider.tap("entry", "M1", "M_RAIL", at(8))
    assert ENGINE.expire(rider.state, at(11)) is None                 # exactly 180 minutes: still open
    expired = ENGINE.expire(rider.state, at(11, 1))
    assert expired is not None
    assert (expired.outcome, expired.fare_fen, expired.held_fen, expired.released_fen) == (
        Outcome.CHARGE, 500, 500, 0)
    assert (expired.hold_ref, expired.mode, expired.agency_id, expired.service_day) == (
        "hold-0800", "expiry", "metro", MONDAY)
    rider.state = commit(rider.state, expired)
    assert rider.state.journey is None and rider.state.spent == ((MONDAY, 500),)
    assert ENGINE.expire(rider.state, at(12)) is None


def test_a_late_exit_pays_the_maximum() -> None:
    rider = Rider()
    rider.tap("entry", "M1", "M_RAIL", at(8))
    late = rider.tap("exit", "M1", "M_OLDTOWN", at(11, 30))           # a one-zone trip, 210 minutes later
    assert (late.fare_fen, late.released_fen, late.hold_ref) == (500, 0, "hold-0800")


def test_an_entry_after_a_forgotten_exit_closes_the_old_journey_first() -> None:
    rider = Rider()
    rider.tap("entry", "M1", "M_RAIL", at(8))
    before = rider.state
    decision = ENGINE.decide(before, Tap("C00000001", at(12), "M1", "M_UNIV", "entry"))
    assert decision.expired is not None
    assert (decision.expired.fare_fen, decision.expired.hold_ref) == (500, "hold-0800")
    assert (decision.outcome, decision.held_fen) == (Outcome.HOLD, 400)  # from zone 2
    after = commit(before, decision, hold_ref="hold-1200")
    assert after.journey is not None and after.journey.stop_id == "M_UNIV" and after.journey.hold_ref == "hold-1200"
    assert after.spent == ((MONDAY, 500),) and after.version == before.version + 1
    only_expiry = commit(before, decision.expired)                    # the new hold was not booked
    assert only_expiry.journey is None and only_expiry.spent == ((MONDAY, 500),)


def test_exit_without_entry_pays_the_network_maximum() -> None:
    decision = Rider().tap("exit", "M2", "M_UNIV", at(8))
    assert (decision.outcome, decision.fare_fen, decision.fare_product_id) == (Outcome.CHARGE, 500, "metro_3zones")
    assert decision.held_fen == 0 and "exit without entry" in decision.message
    assert Rider("student").tap("exit", "M2", "M_UNIV", at(8)).fare_fen == 250


def test_entry_with_a_journey_open_is_refused_and_changes_nothing() -> None:
    rider = Rider()
    rider.tap("entry", "M1", "M_RAIL", at(8))
    before = rider.state
    refused = ENGINE.decide(before, Tap("C00000001", at(8, 5), "M2", "M_SQUARE", "entry"))
    assert (refused.outcome, refused.refusal, refused.fare_fen, refused.held_fen) == (
        Outcome.REFUSE, Refusal.ALREADY_ENTERED, 0, 0)
    assert commit(before, refused) is before
    assert rider.state == before


@pytest.mark.parametrize(("tap", "says"), [
    (Tap("C1", dt.datetime(2026, 3, 2, 8), "1", "B_RAIL", "board"), "no time zone"),
    (Tap("C1", at(8), "99", "B_RAIL", "board"), "route '99'"),
    (Tap("C1", at(8), "1", "B_MOON", "board"), "stop 'B_MOON'"),
    (Tap("C1", at(8), "1", "B_RAIL", "fly"), "mode 'fly'"),
])
def test_an_invalid_tap_is_refused(tap: Tap, says: str) -> None:
    decision = ENGINE.decide(RiderState(), tap)
    assert (decision.outcome, decision.refusal) == (Outcome.REFUSE, Refusal.INVALID)
    assert says in decision.message


def test_an_exit_before_its_entry_and_a_tap_older_than_last_week_are_refused() -> None:
    rider = Rider()
    rider.tap("entry", "M1", "M_RAIL", at(8))
    early = ENGINE.decide(rider.state, Tap("C1", at(7, 59), "M1", "M_UNIV", "exit"))
    assert (early.refusal, early.message) == (Refusal.INVALID, "the tap-off is before its tap-on")
    rider.tap("exit", "M1", "M_UNIV", at(8, 30))
    old = ENGINE.decide(rider.state, Tap("C1", at(8, day=MONDAY - dt.timedelta(days=8)), "1", "B_RAIL", "board"))
    assert old.refusal is Refusal.INVALID
    last_week = ENGINE.decide(rider.state, Tap("C1", at(8, day=MONDAY - dt.timedelta(days=7)), "1", "B_RAIL",
                                               "board"))
    assert (last_week.outcome, last_week.fare_fen) == (Outcome.CHARGE, 200)  # no transfer back in time


def test_a_decision_from_an_older_state_is_not_committed() -> None:
    state = RiderState()
    first = ENGINE.decide(state, Tap("C1", at(8), "1", "B_RAIL", "board"))
    second = ENGINE.decide(state, Tap("C1", at(8, 1), "1", "B_RAIL", "board"))
    moved = commit(state, first)
    with pytest.raises(StaleDecision):
        commit(moved, second)
    assert state == RiderState()  # decide never changed the state it was given


def test_the_service_day_is_the_city_date() -> None:
    late_utc = dt.datetime(2026, 3, 2, 17, 0, tzinfo=dt.UTC)  # 01:00 on Tuesday in the city
    assert ENGINE.service_day(late_utc) == MONDAY + dt.timedelta(days=1)


STOPS = {"1": ["B_RAIL", "B_SQUARE", "B_OLDTOWN"], "2": ["B_SQUARE", "B_UNIV"], "101": ["B_RAIL", "B_SCIENCE"],
         "M1": ["M_RAIL", "M_SQUARE", "M_UNIV", "M_SCIENCE"], "M2": ["M_OLDTOWN", "M_STADIUM", "M_AIRPORT"]}
TAPS = st.lists(st.tuples(st.integers(0, 24 * 60 - 1), st.sampled_from(sorted(STOPS)), st.integers(0, 3),
                          st.sampled_from(["board", "entry", "exit"])), max_size=40)


@settings(max_examples=200, deadline=None)
@given(TAPS, st.sampled_from([(), ("student",), ("senior",)]))
def test_a_day_of_random_taps_never_charges_above_the_daily_cap_nor_below_zero(taps: list, categories: tuple) -> None:
    state = RiderState()
    charged = 0
    for minute, route, stop_index, mode in sorted(taps):
        stops = STOPS[route]
        tap = Tap("C1", at(minute // 60, minute % 60), route, stops[stop_index % len(stops)], mode,
                  frozenset(categories))
        decision = ENGINE.decide(state, tap)
        for part in (decision.expired, decision):
            if part is None or part.outcome is Outcome.REFUSE:
                continue
            assert part.fare_fen >= 0 and part.held_fen >= 0 and part.released_fen >= 0
            if part.outcome is Outcome.CHARGE and part.hold_ref is not None:
                assert part.fare_fen <= part.held_fen
            charged += part.fare_fen
        state = commit(state, decision, hold_ref=minute)
        assert charged <= 1500
    assert sum(fen for _, fen in state.spent) == charged
