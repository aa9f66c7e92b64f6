import datetime as dt
import itertools

import pytest

from citycard.core.lifecycle import (
    TRANSITIONS,
    CardEvent,
    CardState,
    Channel,
    ForbiddenTransition,
    LifecycleInputError,
    Transition,
    allowed_events,
    apply,
    is_denylisted,
    settles,
)

CITY = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2025, 9, 30, 21, 15, tzinfo=CITY)

# The lifecycle written out independently of the module: (state, event, new state).
EXPECTED_TRANSITIONS = {
    ("ordered", "print"): "printed",
    ("printed", "register"): "registered",
    ("registered", "distribute"): "distributed",
    ("distributed", "activate"): "active",
    ("active", "report_loss_phone"): "stopped",
    ("active", "report_loss_online"): "stopped",
    ("distributed", "report_loss_written"): "frozen",
    ("active", "report_loss_written"): "frozen",
    ("stopped", "report_loss_written"): "frozen",
    ("stopped", "auto_restore"): "active",
    ("stopped", "restore"): "active",
    ("frozen", "replace"): "replaced",
    ("active", "expire"): "expired",
    ("stopped", "expire"): "expired",
    ("active", "renew"): "replaced",
    ("expired", "renew"): "replaced",
    ("ordered", "cancel"): "cancelled",
    ("printed", "cancel"): "cancelled",
    ("registered", "cancel"): "cancelled",
    ("distributed", "cancel"): "cancelled",
    ("active", "cancel"): "cancelled",
    ("stopped", "cancel"): "cancelled",
    ("frozen", "cancel"): "cancelled",
    ("expired", "cancel"): "cancelled",
}

EXPECTED_CHANNELS = {
    "print": {"batch", "counter"},
    "register": {"batch", "counter"},
    "distribute": {"batch", "counter"},
    "activate": {"counter", "online"},
    "report_loss_phone": {"phone"},
    "report_loss_online": {"online"},
    "report_loss_written": {"written"},
    "auto_restore": {"system"},
    "restore": {"counter", "phone", "online"},
    "replace": {"counter", "batch"},
    "cancel": {"counter", "batch"},
    "expire": {"system", "batch"},
    "renew": {"counter", "batch", "online"},
}

ALL_PAIRS = list(itertools.product(CardState, CardEvent))


def valid_arguments(event: str) -> dict:
    """Arguments that satisfy everything but the (state, event) rule."""
    channel = min(EXPECTED_CHANNELS[event])
    return {
        "actor": "system" if channel == "system" else "operator7",
        "channel": channel,
        "reason": "card found in a coat pocket",
        "at": AT,
    }


def test_transition_table_is_the_expected_one():
    assert {(state.value, event.value): to.value for (state, event), to in TRANSITIONS.items()} == (
        EXPECTED_TRANSITIONS
    )


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=lambda member: member.value)
def test_every_state_and_event_pair_is_allowed_or_refused_as_expected(state, event):
    expected = EXPECTED_TRANSITIONS.get((state.value, event.value))
    arguments = valid_arguments(event.value)
    if expected is None:
        with pytest.raises(ForbiddenTransition) as caught:
            apply(state, event, **arguments)
        assert (caught.value.state, caught.value.event) == (state, event)
        assert str(caught.value) == f"card in state {state.value} cannot take {event.value}"
    else:
        transition = apply(state, event, **arguments)
        assert transition == Transition(
            from_state=state,
            event=event,
            to_state=CardState(expected),
            actor=arguments["actor"],
            channel=Channel(arguments["channel"]),
            reason=arguments["reason"],
            at=AT,
        )


def test_forbidden_message_for_a_phone_report_on_a_frozen_card():
    with pytest.raises(ForbiddenTransition, match=r"^card in state frozen cannot take report_loss_phone$"):
        apply("frozen", "report_loss_phone", actor="op", channel="phone", at=AT)


@pytest.mark.parametrize(("event", "channel"), list(itertools.product(CardEvent, Channel)))
def test_each_event_comes_only_through_its_channels(event, channel):
    state = next(from_state for (from_state, on_event) in TRANSITIONS if on_event is event)
    actor = "system" if channel is Channel.SYSTEM else "operator7"
    if channel.value in EXPECTED_CHANNELS[event.value]:
        assert apply(state, event, actor=actor, channel=channel, reason="r", at=AT).channel is channel
    else:
        with pytest.raises(LifecycleInputError) as caught:
            apply(state, event, actor=actor, channel=channel, reason="r", at=AT)
        assert caught.value.field == "channel"
        assert event.value in str(caught.value)


def test_only_the_system_actor_restores_automatically():
    with pytest.raises(LifecycleInputError) as caught:
        apply("stopped", "auto_restore", actor="operator7", channel="system", at=AT)
    assert caught.value.field == "actor"
    assert (
        apply("stopped", "auto_restore", actor="system", channel="system", at=AT).to_state is CardState.ACTIVE
    )


def test_the_system_actor_does_not_act_at_a_counter():
    with pytest.raises(LifecycleInputError) as caught:
        apply("stopped", "restore", actor="system", channel="counter", reason="found", at=AT)
    assert caught.value.field == "actor"


@pytest.mark.parametrize("actor", ["", "   ", "x" * 65])
def test_actor_must_be_a_name(actor):
    with pytest.raises(LifecycleInputError) as caught:
        apply("active", "report_loss_phone", actor=actor, channel="phone", at=AT)
    assert caught.value.field == "actor"


@pytest.mark.parametrize(("state", "event"), [("active", "cancel"), ("stopped", "restore")])
@pytest.mark.parametrize("reason", [None, "", "  "])
def test_cancel_and_manual_restore_need_a_reason(state, event, reason):
    with pytest.raises(LifecycleInputError) as caught:
        apply(state, event, actor="operator7", channel="counter", reason=reason, at=AT)
    assert caught.value.field == "reason"
    assert event in str(caught.value)


def test_reason_is_trimmed_and_bounded():
    assert apply("active", "cancel", actor="op", channel="counter", reason=" death ", at=AT).reason == "death"
    with pytest.raises(LifecycleInputError) as caught:
        apply("active", "cancel", actor="op", channel="counter", reason="x" * 201, at=AT)
    assert caught.value.field == "reason"


def test_a_phone_report_needs_no_reason():
    assert apply("active", "report_loss_phone", actor="op", channel="phone", at=AT).reason is None


def test_time_defaults_to_the_platform_clock(monkeypatch):
    monkeypatch.setenv("CITYCARD_NOW", "2025-09-30T21:15:00+08:00")
    assert apply("active", "report_loss_phone", actor="op", channel="phone").at == AT


def test_naive_time_is_refused():
    with pytest.raises(LifecycleInputError) as caught:
        apply("active", "report_loss_phone", actor="op", channel="phone", at=dt.datetime(2025, 9, 30, 21, 15))
    assert caught.value.field == "at"


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("state", ("lost", "restore", "counter")),
        ("event", ("active", "steal", "counter")),
        ("channel", ("active", "report_loss_phone", "fax")),
    ],
)
def test_unknown_names_are_refused_naming_the_field(field, arguments):
    state, event, channel = arguments
    with pytest.raises(LifecycleInputError) as caught:
        apply(state, event, actor="op", channel=channel, at=AT)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("state", "denylisted"),
    [
        ("ordered", False),
        ("printed", False),
        ("registered", False),
        ("distributed", False),
        ("active", False),
        ("stopped", True),
        ("frozen", True),
        ("replaced", True),
        ("cancelled", True),
        ("expired", True),
    ],
)
def test_denylist_and_settlement_by_state(state, denylisted):
    assert is_denylisted(state) is denylisted
    assert settles(state) is (state == "active")


def test_allowed_events_per_state():
    assert allowed_events("frozen") == {CardEvent.REPLACE, CardEvent.CANCEL}
    assert allowed_events("stopped") == {
        CardEvent.REPORT_LOSS_WRITTEN,
        CardEvent.AUTO_RESTORE,
        CardEvent.RESTORE,
        CardEvent.EXPIRE,
        CardEvent.CANCEL,
    }
    assert allowed_events("replaced") == frozenset()
    assert allowed_events("cancelled") == frozenset()


def test_every_state_is_reachable_from_ordered_and_every_card_can_end():
    reachable, frontier = {CardState.ORDERED}, [CardState.ORDERED]
    while frontier:
        state = frontier.pop()
        for event in allowed_events(state):
            target = TRANSITIONS[(state, event)]
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(CardState)
    for state in CardState:
        assert state in (CardState.REPLACED, CardState.CANCELLED) or CardEvent.CANCEL in allowed_events(state)
