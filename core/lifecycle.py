"""The card lifecycle: which event moves a card from which state to which, through which channels. Pure.

::

    ordered -print-> printed -register-> registered -distribute-> distributed -activate-> active

    active -report_loss_phone / report_loss_online-> stopped     (settling stops at once)
    stopped -auto_restore (system, after N working days)-> active
    stopped -restore (operator: the card was found)-> active
    active | stopped | distributed -report_loss_written-> frozen  (final: a written report is not revoked)
    frozen -replace-> replaced                                    (the new card is another card)
    active | stopped -expire-> expired
    active | expired -renew-> replaced                            (the new card is another card)
    any state but replaced and cancelled -cancel (reason required)-> cancelled

Decisions where the source is silent:

- A written report is accepted for a distributed card that was never activated: it can be lost too,
  and replacement needs a written report first.
- A second phone or online report on a stopped card is refused: the first one set the liability time
  and the auto-restore deadline, and a repeat must not move either.
- Renewal retires the old card as ``replaced``, like a replacement; the registry issues the new card,
  which starts at ``ordered``. Renewal is open to an expired card and to an active one (a card swapped
  for a new generation before it expires).
- An expired card is denylisted: the denylist is what offline terminals trust, and one with a wrong
  clock would otherwise take a card the back office has closed. Once a card stops settling for good,
  it stays denylisted.
- Each event comes only through the channels that fit it (a phone call cannot freeze an account), and
  the system actor acts only through the system channel and only for the events it owns.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from citycard.core import clock

__all__ = [
    "EVENT_CHANNELS",
    "REASON_REQUIRED",
    "SYSTEM_ACTOR",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "CardEvent",
    "CardState",
    "Channel",
    "ForbiddenTransition",
    "LifecycleError",
    "LifecycleInputError",
    "Transition",
    "allowed_events",
    "apply",
    "is_denylisted",
    "settles",
]

SYSTEM_ACTOR = "system"
ACTOR_LENGTH_MAX = 64
REASON_LENGTH_MAX = 200


class CardState(enum.StrEnum):
    ORDERED = "ordered"
    PRINTED = "printed"
    REGISTERED = "registered"
    DISTRIBUTED = "distributed"
    ACTIVE = "active"
    STOPPED = "stopped"  # temporarily, after a phone or online loss report
    FROZEN = "frozen"  # after a written loss report
    REPLACED = "replaced"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class CardEvent(enum.StrEnum):
    PRINT = "print"
    REGISTER = "register"
    DISTRIBUTE = "distribute"
    ACTIVATE = "activate"
    REPORT_LOSS_PHONE = "report_loss_phone"
    REPORT_LOSS_ONLINE = "report_loss_online"
    REPORT_LOSS_WRITTEN = "report_loss_written"
    AUTO_RESTORE = "auto_restore"
    RESTORE = "restore"
    REPLACE = "replace"
    CANCEL = "cancel"
    EXPIRE = "expire"
    RENEW = "renew"


class Channel(enum.StrEnum):
    COUNTER = "counter"
    PHONE = "phone"
    WRITTEN = "written"
    ONLINE = "online"
    SYSTEM = "system"
    BATCH = "batch"


_S, _E = CardState, CardEvent

TERMINAL_STATES = frozenset({_S.REPLACED, _S.CANCELLED})
_CANCELLABLE_STATES = [state for state in CardState if state not in TERMINAL_STATES]

TRANSITIONS: Mapping[tuple[CardState, CardEvent], CardState] = MappingProxyType(
    {
        (_S.ORDERED, _E.PRINT): _S.PRINTED,
        (_S.PRINTED, _E.REGISTER): _S.REGISTERED,
        (_S.REGISTERED, _E.DISTRIBUTE): _S.DISTRIBUTED,
        (_S.DISTRIBUTED, _E.ACTIVATE): _S.ACTIVE,
        (_S.ACTIVE, _E.REPORT_LOSS_PHONE): _S.STOPPED,
        (_S.ACTIVE, _E.REPORT_LOSS_ONLINE): _S.STOPPED,
        (_S.DISTRIBUTED, _E.REPORT_LOSS_WRITTEN): _S.FROZEN,
        (_S.ACTIVE, _E.REPORT_LOSS_WRITTEN): _S.FROZEN,
        (_S.STOPPED, _E.REPORT_LOSS_WRITTEN): _S.FROZEN,
        (_S.STOPPED, _E.AUTO_RESTORE): _S.ACTIVE,
        (_S.STOPPED, _E.RESTORE): _S.ACTIVE,
        (_S.FROZEN, _E.REPLACE): _S.REPLACED,
        (_S.ACTIVE, _E.EXPIRE): _S.EXPIRED,
        (_S.STOPPED, _E.EXPIRE): _S.EXPIRED,
        (_S.ACTIVE, _E.RENEW): _S.REPLACED,
        (_S.EXPIRED, _E.RENEW): _S.REPLACED,
        **{(state, _E.CANCEL): _S.CANCELLED for state in _CANCELLABLE_STATES},
    }
)

_C = Channel
# Which channels may carry each event. Production steps come in batches from the vendor or are keyed in
# at a counter; each loss report has its own channel; only the system restores automatically and expires.
EVENT_CHANNELS: Mapping[CardEvent, frozenset[Channel]] = MappingProxyType(
    {
        _E.PRINT: frozenset({_C.BATCH, _C.COUNTER}),
        _E.REGISTER: frozenset({_C.BATCH, _C.COUNTER}),
        _E.DISTRIBUTE: frozenset({_C.BATCH, _C.COUNTER}),
        _E.ACTIVATE: frozenset({_C.COUNTER, _C.ONLINE}),
        _E.REPORT_LOSS_PHONE: frozenset({_C.PHONE}),
        _E.REPORT_LOSS_ONLINE: frozenset({_C.ONLINE}),
        _E.REPORT_LOSS_WRITTEN: frozenset({_C.WRITTEN}),
        _E.AUTO_RESTORE: frozenset({_C.SYSTEM}),
        _E.RESTORE: frozenset({_C.COUNTER, _C.PHONE, _C.ONLINE}),
        _E.REPLACE: frozenset({_C.COUNTER, _C.BATCH}),
        _E.CANCEL: frozenset({_C.COUNTER, _C.BATCH}),
        _E.EXPIRE: frozenset({_C.SYSTEM, _C.BATCH}),
        _E.RENEW: frozenset({_C.COUNTER, _C.BATCH, _C.ONLINE}),
    }
)

# Events a person must explain: a cancellation (death, emigration, duplicate) and a manual restore.
REASON_REQUIRED = frozenset({_E.CANCEL, _E.RESTORE})

_Enum = TypeVar("_Enum", bound=enum.StrEnum)

_DENYLISTED_STATES = frozenset({_S.STOPPED, _S.FROZEN, _S.REPLACED, _S.CANCELLED, _S.EXPIRED})


class LifecycleError(ValueError):
    """A lifecycle event that cannot happen; nothing changes."""


class ForbiddenTransition(LifecycleError):
    """The (state, event) pair is not in TRANSITIONS."""

    def __init__(self, state: CardState, event: CardEvent) -> None:
        self.state = state
        self.event = event
        super().__init__(f"card in state {state.value} cannot take {event.value}")


class LifecycleInputError(LifecycleError):
    """An argument of an event is missing or wrong; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Transition:
    """One change of a card's state, with what the audit log and the liability rules need."""

    from_state: CardState
    event: CardEvent
    to_state: CardState
    actor: str
    channel: Channel
    reason: str | None
    at: _dt.datetime  # the time the event was accepted; it fixes liability for a loss report


def apply(
    state: CardState | str,
    event: CardEvent | str,
    *,
    actor: str,
    channel: Channel | str,
    reason: str | None = None,
    at: _dt.datetime | None = None,
) -> Transition:
    """The transition ``event`` makes from ``state``, or ForbiddenTransition / LifecycleInputError."""
    state = _parse(CardState, state, "state")
    event = _parse(CardEvent, event, "event")
    channel = _parse(Channel, channel, "channel")
    to_state = TRANSITIONS.get((state, event))
    if to_state is None:
        raise ForbiddenTransition(state, event)
    _check_actor_and_channel(event, actor, channel)
    reason = _check_reason(event, reason)
    instant = at if at is not None else clock.now()
    if instant.tzinfo is None:
        raise LifecycleInputError("at", "must carry a zone (an aware datetime)")
    return Transition(state, event, to_state, actor, channel, reason, instant)


def allowed_events(state: CardState | str) -> frozenset[CardEvent]:
    """The events a card in ``state`` can take."""
    state = _parse(CardState, state, "state")
    return frozenset(event for (from_state, event) in TRANSITIONS if from_state is state)


def is_denylisted(state: CardState | str) -> bool:
    """Whether terminals must refuse the card: stopped, frozen, replaced, cancelled, expired."""
    return _parse(CardState, state, "state") in _DENYLISTED_STATES


def settles(state: CardState | str) -> bool:
    """Whether the card may pay or be paid with: only an active card."""
    return _parse(CardState, state, "state") is CardState.ACTIVE


def _parse(kind: type[_Enum], value: _Enum | str, field: str) -> _Enum:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise LifecycleInputError(field, f"{value!r} is not one of {choices}") from None


def _check_actor_and_channel(event: CardEvent, actor: str, channel: Channel) -> None:
    if not isinstance(actor, str) or not actor.strip() or len(actor) > ACTOR_LENGTH_MAX:
        raise LifecycleInputError(
            "actor", f"must be a non-empty name of at most {ACTOR_LENGTH_MAX} characters"
        )
    if channel not in EVENT_CHANNELS[event]:
        allowed = ", ".join(sorted(EVENT_CHANNELS[event]))
        raise LifecycleInputError("channel", f"{event.value} comes through {allowed}, not {channel.value}")
    # The system actor and the system channel go together: an operator cannot pose as the timer that
    # restores cards, and the timer cannot act at a counter.
    if (actor == SYSTEM_ACTOR) != (channel is Channel.SYSTEM):
        raise LifecycleInputError(
            "actor", f"only the {SYSTEM_ACTOR!r} actor uses the system channel, and it uses no other"
        )


def _check_reason(event: CardEvent, reason: str | None) -> str | None:
    if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_LENGTH_MAX):
        raise LifecycleInputError("reason", f"must be text of at most {REASON_LENGTH_MAX} characters")
    reason = reason.strip() if reason else None
    if event in REASON_REQUIRED and not reason:
        raise LifecycleInputError("reason", f"{event.value} needs a reason")
    return reason or None
