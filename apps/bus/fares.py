"""The fare engine: what a tap costs, decided in memory from a loaded ``FareNetwork`` and the card's state.

Pure and deterministic: ``FareEngine.decide(state, tap)`` reads an immutable ``RiderState`` and returns a
``FareDecision``; nothing is changed and nothing is read from disk or the network. The decision carries the
state the card will be in once the money has moved (``next_state``), and ``commit(state, decision)`` returns
it. So the Transit service, per card and one tap at a time:

    decision = engine.decide(states[card], tap)
    if decision.expired: book it first (post the old journey's hold: decision.expired.fare_fen)
    book decision on the ledger (board/exit: post or transfer fare_fen; entry: a pending transfer of held_fen)
    states[card] = commit(states[card], decision, hold_ref=<the pending transfer's id, at entry>)

If the ledger refuses (insufficient balance, unavailable), the service does not commit and the card's state
is as before: a refusal by the ledger never leaves a hold, a cap or a transfer half-counted. If the expired
journey was booked but the new tap was not, ``commit(state, decision.expired)`` records just the expiry.
``commit`` refuses (``StaleDecision``) a decision made from a state that has moved on since (two taps of one
card decided concurrently): decide again from the new state. A refused decision commits to the same state.

Rules (FARES.md explains them for operators, with the numbers of the sample feed):

- Money is integer fen. Concession percentages are applied by the loader, rounded down (fractions of a fen go
  to the rider). A holder's registry categories map to one rider category, by the policy's priority order.
- board (a bus): the fare of a leg from this stop to an unknown destination, i.e. the highest the rules allow
  from here; for a flat fare, the flat fare. entry: hold the highest fare the journey could cost from this
  stop, reduced by what is left under the daily and weekly caps. exit: the zone fare from the entry stop,
  minus a transfer discount, limited by the caps and never more than the hold.
- A transfer rule applies between the card's previous leg and this one (only the previous leg is kept), within
  its duration limit, its transfer_count (for legs of the same group) and its fare_transfer_type
  (0: AB, 1: AB + B, 2: AB - A; never below 0).
- Caps: the service day is the local date (Asia/Shanghai, from the feed) after the policy's day start, the week
  the ISO week (Monday to Sunday) of that day. A charge counts toward the service day of the leg's start (the
  entry for a metro journey), so a journey's exit can never exceed its hold. The state keeps the amounts of
  this week and last week; a tap dated before that is refused as invalid.
- Entry while a journey is open within the hold limit: refused ("already_entered"); the rider exits first.
  A journey open longer than the hold limit is closed at the maximum fare (its hold, within the caps): by
  ``expire(state, now)``, or inside the next decision as ``decision.expired``; an exit after the limit closes
  it at the maximum too.
- Exit without an entry: the maximum fare of the exit's network (within the caps). An exit pair for which the
  feed has no fare: the maximum (the hold).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from enum import StrEnum
from itertools import product as combinations

from citycard.apps.bus.gtfs import FareNetwork, LegRule, Route, TransferRule

__all__ = [
    "FareDecision",
    "FareEngine",
    "LastLeg",
    "Mode",
    "OpenJourney",
    "Outcome",
    "Refusal",
    "RiderState",
    "StaleDecision",
    "Tap",
    "commit",
]

NO_GROUPS: frozenset[str] = frozenset()
SPENT_WEEKS_KEPT = 2           # this ISO week and the one before: enough for the weekly cap and late taps
LEG_CACHE_ENTRIES_MAX = 65_536  # priced legs remembered; cleared when full (a feed has far fewer pairs)
WEEK = dt.timedelta(days=7)


class Mode(StrEnum):
    BOARD = "board"
    ENTRY = "entry"
    EXIT = "exit"


class Outcome(StrEnum):
    CHARGE = "charge"
    HOLD = "hold"
    REFUSE = "refuse"


class Refusal(StrEnum):
    NO_FARE = "no_fare"                  # the network has no fare for this leg
    ALREADY_ENTERED = "already_entered"  # entry with a journey open within the hold limit
    INVALID = "invalid"                  # the tap itself is wrong: naive time, unknown route or stop, ...


class StaleDecision(ValueError):
    """The decision was made from an older state of the card; decide again."""


@dataclass(frozen=True, slots=True)
class Tap:
    card_number: str
    at: dt.datetime                  # aware
    route_id: str
    stop_id: str
    mode: Mode | str
    categories: frozenset[str] = frozenset()  # the registry's: "senior", "student", "disabled"


@dataclass(frozen=True, slots=True)
class OpenJourney:
    """A tap-on waiting for its tap-off."""

    route_id: str
    network_id: str
    agency_id: str
    stop_id: str
    at: dt.datetime
    service_day: dt.date
    rider_category_id: str
    fare_product_id: str   # the product of the maximum fare
    max_fen: int           # the highest fare from the entry stop, for the rider's category
    held_fen: int          # max_fen within the caps, as held on the ledger
    from_groups: frozenset[str]
    hold_ref: object = None  # the service's reference of the pending transfer (commit(..., hold_ref=))


@dataclass(frozen=True, slots=True)
class LastLeg:
    """The card's previous completed leg, for transfer rules."""

    leg_group_id: str
    started_at: dt.datetime
    ended_at: dt.datetime
    price_fen: int     # its fare before transfer discount and caps (fare_transfer_type 2 subtracts it)
    transfers: int     # transfers that led into it (0: it began a new chain)


@dataclass(frozen=True, slots=True)
class RiderState:
    """One card's fare state. Immutable: a decision carries the next one, ``commit`` returns it."""

    version: int = 0
    journey: OpenJourney | None = None
    last_leg: LastLeg | None = None
    spent: tuple[tuple[dt.date, int], ...] = ()  # (service day, fen charged), oldest first, recent weeks only


@dataclass(frozen=True, slots=True)
class FareDecision:
    outcome: Outcome
    card_number: str
    at: dt.datetime
    mode: str
    fare_fen: int = 0              # charged now (board, exit, expiry)
    held_fen: int = 0              # held at entry; at exit, the hold this exit settles
    released_fen: int = 0          # at exit: held_fen - fare_fen, back to the rider
    fare_product_id: str = ""
    rider_category_id: str = ""
    concession_fen: int = 0        # default category's fare minus this category's (not in discount_fen)
    transfer_discount_fen: int = 0
    cap_reduction_fen: int = 0
    discount_fen: int = 0          # transfer discount + cap reduction
    capped: bool = False
    agency_id: str = ""            # the operator paid
    route_id: str = ""
    service_day: dt.date | None = None
    refusal: Refusal | None = None
    message: str = ""
    hold_ref: object = None        # at exit or expiry: the entry's pending transfer
    expired: FareDecision | None = None  # an earlier journey closed at its maximum; book it first
    base_version: int = 0
    next_state: RiderState | None = None


def commit(state: RiderState, decision: FareDecision, hold_ref: object = None) -> RiderState:
    """The card's state once ``decision`` has been booked. ``hold_ref`` names the pending transfer at entry."""
    if decision.outcome is Outcome.REFUSE or decision.next_state is None:
        return state
    if decision.base_version != state.version:
        raise StaleDecision(f"card {decision.card_number}: decided from state version {decision.base_version}, "
                            f"the card is at {state.version}")
    after = decision.next_state
    if hold_ref is not None and decision.outcome is Outcome.HOLD and after.journey is not None:
        after = replace(after, journey=replace(after.journey, hold_ref=hold_ref))
    return after


@dataclass(frozen=True, slots=True)
class _Leg:
    """A priced leg: the rider's fare, the default category's, the product and the leg group."""

    price_fen: int
    default_fen: int
    fare_product_id: str
    leg_group_id: str


@dataclass(frozen=True, slots=True)
class _Charge:
    fare_fen: int
    transfer_discount_fen: int
    cap_reduction_fen: int
    spent: tuple[tuple[dt.date, int], ...]
    last_leg: LastLeg | None


class FareEngine:
    """Decisions over one loaded network. Holds only caches derived from the network."""

    def __init__(self, network: FareNetwork) -> None:
        self.network = network
        self._policy = network.policy
        self._hold_limit = dt.timedelta(seconds=network.policy.hold_limit_s)
        self._day_start = dt.timedelta(seconds=network.policy.service_day_start_s)
        self._areas = sorted({area for areas in network.stop_areas.values() for area in areas})
        self._groups = sorted(network.timeframes)
        self._categories: dict[frozenset[str], str] = {}
        self._legs: dict[tuple[object, ...], _Leg | None] = {}

    # -- the public calls ----------------------------------------------------------------------------------

    def rider_category(self, holder_categories: frozenset[str]) -> str:
        """The rider category of a holder: the first of the policy's holder mappings that applies."""
        category = self._categories.get(holder_categories)
        if category is None:
            category = next((rider for holder, rider in self._policy.holder_categories
                             if holder in holder_categories), self.network.default_category)
            self._categories[holder_categories] = category
        return category

    def service_day(self, at: dt.datetime) -> dt.date:
        return (at.astimezone(self.network.zone) - self._day_start).date()

    def decide(self, state: RiderState, tap: Tap) -> FareDecision:
        problem = self._invalid(state, tap)
        if problem:
            return self._refuse(state, tap, Refusal.INVALID, problem)
        mode = Mode(tap.mode)
        expired = None
        if state.journey is not None and mode is not Mode.EXIT and tap.at - state.journey.at > self._hold_limit:
            expired = self._close_at_maximum(state, state.journey, tap.at, "no tap-off within the hold limit")
            before, state = state, expired.next_state or state
            decision = self._board(state, tap) if mode is Mode.BOARD else self._entry(state, tap)
            if decision.outcome is Outcome.REFUSE:
                return replace(decision, base_version=before.version)
            after = decision.next_state or state
            return replace(decision, expired=expired, base_version=before.version,
                           next_state=replace(after, version=before.version + 1))
        if mode is Mode.BOARD:
            return self._board(state, tap)
        if mode is Mode.ENTRY:
            return self._entry(state, tap)
        return self._exit(state, tap)

    def expire(self, state: RiderState, now: dt.datetime) -> FareDecision | None:
        """Close a journey open longer than the hold limit at its maximum fare; None when there is none."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("expire needs an aware datetime")
        journey = state.journey
        if journey is None or now - journey.at <= self._hold_limit:
            return None
        return self._close_at_maximum(state, journey, now, "no tap-off within the hold limit")

    # -- the three modes -----------------------------------------------------------------------------------

    def _from_here(self, tap: Tap, ends_here: bool) -> tuple[Route, str, frozenset[str], _Leg | None]:
        """The tap's route, rider category and timeframes, and the highest fare of a leg starting here."""
        route = self.network.routes[tap.route_id]
        category = self.rider_category(tap.categories)
        groups = self.network.timeframe_groups_at(tap.at.astimezone(self.network.zone))
        return route, category, groups, self._price(route.network_id, tap.stop_id, None, groups,
                                                    groups if ends_here else None, category)

    def _board(self, state: RiderState, tap: Tap) -> FareDecision:
        route, category, _, leg = self._from_here(tap, ends_here=True)
        if leg is None:
            return self._no_fare_from(state, tap, route)
        day = self.service_day(tap.at)
        charge = self._charge(state, category, leg, tap.at, tap.at, day, None)
        return self._charged(state, tap, charge, leg, category, route.agency_id, day, "board")

    def _entry(self, state: RiderState, tap: Tap) -> FareDecision:
        if state.journey is not None:
            return self._refuse(state, tap, Refusal.ALREADY_ENTERED,
                                f"a journey from {state.journey.stop_id} is open since "
                                f"{state.journey.at.isoformat()}")
        route, category, groups, leg = self._from_here(tap, ends_here=False)
        if leg is None:
            return self._no_fare_from(state, tap, route)
        day = self.service_day(tap.at)
        room = self._room(state, category, day)
        held = leg.price_fen if room is None else min(leg.price_fen, room)
        journey = OpenJourney(tap.route_id, route.network_id, route.agency_id, tap.stop_id, tap.at, day, category,
                              leg.fare_product_id, leg.price_fen, held, groups)
        return FareDecision(
            Outcome.HOLD, tap.card_number, tap.at, str(tap.mode), held_fen=held,
            fare_product_id=leg.fare_product_id, rider_category_id=category,
            concession_fen=leg.default_fen - leg.price_fen, cap_reduction_fen=leg.price_fen - held,
            discount_fen=leg.price_fen - held, capped=held < leg.price_fen, agency_id=route.agency_id,
            route_id=tap.route_id, service_day=day, message=f"held {held} fen until the tap-off",
            base_version=state.version, next_state=replace(state, version=state.version + 1, journey=journey))

    def _exit(self, state: RiderState, tap: Tap) -> FareDecision:
        journey = state.journey
        if journey is None:
            return self._exit_without_entry(state, tap)
        if tap.at - journey.at > self._hold_limit:
            return self._close_at_maximum(state, journey, tap.at, "tap-off after the hold limit", tap)
        groups = self.network.timeframe_groups_at(tap.at.astimezone(self.network.zone))
        leg = self._price(journey.network_id, journey.stop_id, tap.stop_id, journey.from_groups, groups,
                          journey.rider_category_id)
        note = "exit"
        if leg is None:  # the rider is out already: the hold covers the maximum
            leg = _Leg(journey.max_fen, journey.max_fen, journey.fare_product_id, "")
            note = f"no fare from {journey.stop_id} to {tap.stop_id}: the maximum fare"
        charge = self._charge(state, journey.rider_category_id, leg, journey.at, tap.at, journey.service_day,
                              journey.held_fen)
        decision = self._charged(state, tap, charge, leg, journey.rider_category_id, journey.agency_id,
                                 journey.service_day, note, journey)
        return decision

    def _exit_without_entry(self, state: RiderState, tap: Tap) -> FareDecision:
        route = self.network.routes[tap.route_id]
        category = self.rider_category(tap.categories)
        leg = self._price(route.network_id, None, None, None, None, category)
        if leg is None:
            return self._refuse(state, tap, Refusal.NO_FARE, f"no fare on network {route.network_id!r}")
        day = self.service_day(tap.at)
        room = self._room(state, category, day)
        fare = leg.price_fen if room is None else min(leg.price_fen, room)
        charge = _Charge(fare, 0, leg.price_fen - fare, _add_spent(state.spent, day, fare), None)
        return self._charged(state, tap, charge, leg, category, route.agency_id, day,
                             "exit without entry: the maximum fare")

    def _close_at_maximum(self, state: RiderState, journey: OpenJourney, at: dt.datetime, note: str,
                          tap: Tap | None = None) -> FareDecision:
        room = self._room(state, journey.rider_category_id, journey.service_day)
        fare = min(journey.held_fen, journey.max_fen if room is None else room)
        charge = _Charge(fare, 0, journey.max_fen - fare, _add_spent(state.spent, journey.service_day, fare), None)
        leg = _Leg(journey.max_fen, journey.max_fen, journey.fare_product_id, "")
        closing = tap or Tap("", at, journey.route_id, journey.stop_id, Mode.EXIT)
        decision = self._charged(state, closing, charge, leg, journey.rider_category_id, journey.agency_id,
                                 journey.service_day, note + ": the maximum fare", journey)
        return decision if tap else replace(decision, mode="expiry")

    # -- money ---------------------------------------------------------------------------------------------

    def _room(self, state: RiderState, category: str, day: dt.date) -> int | None:
        """What the caps leave for ``day`` (None: no cap applies)."""
        day_cap, week_cap = self._policy.daily_cap(category), self._policy.weekly_cap(category)
        room = None
        if day_cap is not None:
            room = max(0, day_cap - sum(fen for d, fen in state.spent if d == day))
        if week_cap is not None:
            monday = day - dt.timedelta(days=day.weekday())
            week_room = max(0, week_cap - sum(fen for d, fen in state.spent if monday <= d < monday + WEEK))
            room = week_room if room is None else min(room, week_room)
        return room

    def _charge(self, state: RiderState, category: str, leg: _Leg, started: dt.datetime, ended: dt.datetime,
                day: dt.date, held: int | None) -> _Charge:
        cost, transfers = leg.price_fen, 0
        rule = self._transfer(state.last_leg, leg.leg_group_id, started, ended)
        if rule is not None and state.last_leg is not None:
            step = self.network.price_fen.get((rule.fare_product_id, category), 0) if rule.fare_product_id else 0
            if rule.fare_transfer_type == 0:
                cost = step
            elif rule.fare_transfer_type == 1:
                cost = step + leg.price_fen
            else:
                cost = step - state.last_leg.price_fen
            cost, transfers = max(0, cost), state.last_leg.transfers + 1
        room = self._room(state, category, day)
        fare = cost if room is None else min(cost, room)
        if held is not None:
            fare = min(fare, held)  # an exit never takes more than its hold
        if fare < 0 or (held is not None and fare > held):
            raise AssertionError(f"fare {fare} fen outside 0..{held}")  # explicit: money is guarded under -O too
        last = LastLeg(leg.leg_group_id, started, ended, leg.price_fen, transfers)
        return _Charge(fare, leg.price_fen - cost, cost - fare, _add_spent(state.spent, day, fare), last)

    def _transfer(self, last: LastLeg | None, group: str, started: dt.datetime,
                  ended: dt.datetime) -> TransferRule | None:
        """The fare_transfer_rule from the previous leg to this one, if it applies now."""
        if last is None or not group or started < last.started_at:  # no group: a maximum fare; or out of order
            return None
        rules = self.network.transfer_rules
        from_group = last.leg_group_id if last.leg_group_id in self.network.transfer_from_groups else ""
        rule = rules.get((from_group, group)) or rules.get((from_group, ""))
        if rule is None:
            return None
        if rule.from_leg_group_id == rule.to_leg_group_id and rule.transfer_count not in (None, -1) \
                and last.transfers >= rule.transfer_count:
            return None
        if rule.duration_limit_s is not None:
            since = last.started_at if rule.duration_limit_type in (0, 1) else last.ended_at
            until = ended if rule.duration_limit_type in (0, 3) else started
            if not 0 <= (until - since).total_seconds() <= rule.duration_limit_s:
                return None
        return rule

    # -- fares from the leg rules --------------------------------------------------------------------------

    def _price(self, network_id: str, from_stop: str | None, to_stop: str | None,
               from_groups: frozenset[str] | None, to_groups: frozenset[str] | None, category: str) -> _Leg | None:
        """The leg's fare; an unknown (None) end or time is the highest fare over every one it could be."""
        key = (network_id, from_stop, to_stop, from_groups, to_groups, category)
        if key in self._legs:
            return self._legs[key]
        if len(self._legs) >= LEG_CACHE_ENTRIES_MAX:
            self._legs.clear()
        area_options = [frozenset({area}) for area in self._areas] + [NO_GROUPS]
        group_options = [frozenset({group}) for group in self._groups] + [NO_GROUPS]
        stop_areas = self.network.stop_areas
        choices = combinations(
            [stop_areas[from_stop]] if from_stop is not None else area_options,
            [stop_areas[to_stop]] if to_stop is not None else area_options,
            [from_groups] if from_groups is not None else group_options,
            [to_groups] if to_groups is not None else group_options)
        legs = [leg for fa, ta, fg, tg in choices if (leg := self._cheapest(network_id, fa, ta, fg, tg, category))]
        leg = max(legs, key=lambda c: (c.price_fen, c.fare_product_id)) if legs else None
        self._legs[key] = leg
        return leg

    def _cheapest(self, network_id: str, from_areas: frozenset[str], to_areas: frozenset[str],
                  from_groups: frozenset[str], to_groups: frozenset[str], category: str) -> _Leg | None:
        """Of the rules that match a known leg, the one cheapest for the rider (GTFS lets the rider choose)."""
        prices = self.network.price_fen
        default = self.network.default_category
        legs = [_Leg(prices[(rule.fare_product_id, category)],
                     prices.get((rule.fare_product_id, default), prices[(rule.fare_product_id, category)]),
                     rule.fare_product_id, rule.leg_group_id)
                for rule in self._matching(network_id, from_areas, to_areas, from_groups, to_groups)
                if (rule.fare_product_id, category) in prices]
        return min(legs, key=lambda c: (c.price_fen, c.fare_product_id)) if legs else None

    def _matching(self, network_id: str, from_areas: frozenset[str], to_areas: frozenset[str],
                  from_groups: frozenset[str], to_groups: frozenset[str]) -> list[LegRule]:
        """fare_leg_rules matching, as the reference defines it with and without rule_priority."""
        wanted = ((lambda r: r.from_area_id, from_areas), (lambda r: r.to_area_id, to_areas),
                  (lambda r: r.from_timeframe_group_id, from_groups), (lambda r: r.to_timeframe_group_id, to_groups))
        if self.network.uses_rule_priority:  # an empty field matches anything; the highest priority wins
            rules = [r for r in self.network.leg_rules if r.network_id in ("", network_id)
                     and all(not field(r) or field(r) in values for field, values in wanted)]
            top = max((r.rule_priority for r in rules), default=0)
            return [r for r in rules if r.rule_priority == top]
        by_network = self.network.leg_rules_by_network  # an empty field matches what no rule names exactly
        rules = list(by_network.get(network_id) or by_network.get("", ()))
        for field, values in wanted:
            exact = [r for r in rules if field(r) and field(r) in values]
            rules = exact or [r for r in rules if not field(r)]
        return rules

    # -- building decisions --------------------------------------------------------------------------------

    def _invalid(self, state: RiderState, tap: Tap) -> str:
        if tap.at.tzinfo is None or tap.at.utcoffset() is None:
            return "the tap's time has no time zone"
        if tap.mode not in Mode.__members__.values():
            return f"mode {tap.mode!r} is not board, entry or exit"
        if tap.route_id not in self.network.routes:
            return f"route {tap.route_id!r} is not in the fare network"
        if tap.stop_id not in self.network.stop_names:
            return f"stop {tap.stop_id!r} is not in the fare network"
        if state.spent:
            newest = state.spent[-1][0]
            if self.service_day(tap.at) < newest - dt.timedelta(days=newest.weekday()) - WEEK:
                return "the tap is older than the card's cap records (this week and last)"
        if tap.mode == Mode.EXIT and state.journey is not None and tap.at < state.journey.at:
            return "the tap-off is before its tap-on"
        return ""

    def _refuse(self, state: RiderState, tap: Tap, refusal: Refusal, message: str) -> FareDecision:
        return FareDecision(Outcome.REFUSE, tap.card_number, tap.at, str(tap.mode), route_id=tap.route_id,
                            refusal=refusal, message=message, base_version=state.version)

    def _no_fare_from(self, state: RiderState, tap: Tap, route: Route) -> FareDecision:
        return self._refuse(state, tap, Refusal.NO_FARE,
                            f"no fare on network {route.network_id!r} from stop {tap.stop_id!r}")

    def _charged(self, state: RiderState, tap: Tap, charge: _Charge, leg: _Leg, category: str, agency_id: str,
                 day: dt.date, note: str, journey: OpenJourney | None = None) -> FareDecision:
        """A charge, and the state after it; ``journey``: the open journey this charge closes."""
        held = journey.held_fen if journey is not None else 0
        after = replace(state, version=state.version + 1, journey=None if journey else state.journey,
                        last_leg=charge.last_leg, spent=charge.spent)
        return FareDecision(
            Outcome.CHARGE, tap.card_number, tap.at, str(tap.mode), fare_fen=charge.fare_fen, held_fen=held,
            released_fen=held - charge.fare_fen if journey else 0, fare_product_id=leg.fare_product_id,
            rider_category_id=category, concession_fen=leg.default_fen - leg.price_fen,
            transfer_discount_fen=charge.transfer_discount_fen, cap_reduction_fen=charge.cap_reduction_fen,
            discount_fen=charge.transfer_discount_fen + charge.cap_reduction_fen,
            capped=charge.cap_reduction_fen > 0, agency_id=agency_id,
            route_id=journey.route_id if journey else tap.route_id, service_day=day,
            message=f"{note}: {charge.fare_fen} fen", hold_ref=journey.hold_ref if journey else None,
            base_version=state.version, next_state=after)


def _add_spent(spent: tuple[tuple[dt.date, int], ...], day: dt.date,
               fen: int) -> tuple[tuple[dt.date, int], ...]:
    """The per-day amounts with ``fen`` added to ``day``, keeping only this ISO week and the one before."""
    totals = dict(spent)
    totals[day] = totals.get(day, 0) + fen
    newest = max(totals)
    oldest_kept = newest - dt.timedelta(days=newest.weekday()) - (SPENT_WEEKS_KEPT - 1) * WEEK
    return tuple(sorted((d, f) for d, f in totals.items() if d >= oldest_kept))
