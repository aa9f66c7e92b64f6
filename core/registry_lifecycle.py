"""A card's life after issue: loss reports, restore, replacement, renewal, cancellation, expiry, PIN
reset requests, the e-purse refund, and ``tick``, which restores and expires cards when they are due.

Mixed into ``Registry`` (core/registry.py), whose units of work these operations use. The rules the
source leaves open are decided here:

- Phone report: the caller's name, gender, citizen ID number and employer (unit code or registered
  name; none for a person without one) must all match; the refusal names the fields that do not.
  Without a card number the person's current card is reported.
- Online report: authenticated by citizen ID number + self-service password (core/registry_auth.py);
  a failure names no field, and wrong passwords are counted (that count is the one thing a refused
  call writes).
- N (the working days before the auto-restore) is the value in force when the report was accepted
  and is kept with the report; the calendar is read when the deadline is computed, so a holiday
  table installed later still counts. The restore takes effect at the end of the N-th working day
  (the transition carries that instant, however late the tick runs), so ``card_may_settle``
  answers for any instant as the rule says.
- A calendar that cannot give a deadline (an operator table with too few working days) never
  crashes: the report is accepted, the card stays stopped, and tick says why in its warnings.
- Written report: the holder's citizen ID and name as on the ID card shown; an agent gives their own
  citizen ID and name, which are kept with the report. An employer card is reported only in writing,
  by the unit's agent. The person's medical account is frozen in the same transaction. The e-purse
  account is not frozen: clearing must still book the chip's offline purchases made before the
  report; the card's state and the denylist stop the purse.
- Replacement and renewal at a counter make the new card on the spot (active at once); through a
  batch or online they order it from production. Either way the person's medical account is
  unfrozen at once, and the old card's e-purse shadow stays with the old card.
- A card expires at the end of its expiry date.
- The e-purse refund (a city setting, off by default) pays a replaced or cancelled card's shadow
  balance to the suspense account once the clearing window has passed since the card last stopped
  settling.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from citycard.core import clock
from citycard.core.identity import Gender, IdentityError, validate_citizen_id, validate_name
from citycard.core.lifecycle import SYSTEM_ACTOR, TERMINAL_STATES, CardEvent, CardState, Channel, settles
from citycard.core.records import ChangeAction, LedgerId, TransferCode
from citycard.core.registry_auth import verify_password
from citycard.core.registry_records import (
    CancelReason,
    Card,
    CardKind,
    ErrorCode,
    LossReport,
    Person,
    PinReset,
    PinResetState,
    RegistryError,
    as_instant,
    check_actor,
    check_text,
    checked_citizen_id,
    checked_unit_code,
    from_identity_error,
    parse_enum,
    stored_record,
)
from citycard.core.registry_store import CARDS, CREDENTIALS, PIN_RESETS, TIMERS, Stage, instant_ns

if TYPE_CHECKING:
    from citycard.core.ledger import Ledger
    from citycard.core.registry import Registry
    from citycard.core.settings import Settings
    from citycard.core.workdays import WorkdayCalendar

__all__ = ["LifecycleOperations", "LossReportResult", "RestoredCard", "TickReport", "tick"]

log = logging.getLogger("citycard.registry")

SELF_SERVICE_ACTOR = "self-service"
TICK_EVENTS_MAX = 10_000  # cards one tick looks at; a longer queue is finished by the next tick
_STOPPED_PREFIX = b"stopped:"
_EXPIRES_PREFIX = b"expires:"
_AUTHENTICATION_FAILED = "ID number or password is wrong"


@dataclass(frozen=True)
class LossReportResult:
    card: Card
    accepted_at: _dt.datetime  # fixes liability
    restore_deadline: _dt.date | None = None  # phone and online reports: restored at this day's end
    restore_at: _dt.datetime | None = None
    warnings: tuple[str, ...] = ()  # about the calendar data the deadline rests on


@dataclass(frozen=True)
class RestoredCard:
    card_number: str
    report_accepted_at: str
    restore_deadline: _dt.date
    restored_at: _dt.datetime


@dataclass(frozen=True)
class TickReport:
    at: _dt.datetime
    restored: tuple[RestoredCard, ...]
    expired: tuple[str, ...]
    waiting: int  # cards still stopped after the tick: deadline not reached (or not computable)
    warnings: tuple[str, ...]
    more: bool  # the tick stopped at TICK_EVENTS_MAX; run it again

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(), "waiting": self.waiting, "warnings": list(self.warnings), "more": self.more,
            "expired": list(self.expired),
            "restored": [{"card_number": r.card_number, "report_accepted_at": r.report_accepted_at,
                          "restore_deadline": r.restore_deadline.isoformat(), "restored_at": r.restored_at.isoformat()}
                         for r in self.restored],
        }


def end_of_day(day: _dt.date) -> _dt.datetime:
    """The first instant after ``day`` in city time."""
    return _dt.datetime.combine(day + _dt.timedelta(days=1), _dt.time(), tzinfo=clock.CITY_ZONE)


class LifecycleOperations:
    """The lifecycle operations of Registry; see the module docstring for the rules."""

    if TYPE_CHECKING:  # provided by Registry
        ledger: Ledger
        settings: Settings
        calendar: WorkdayCalendar
        suspense_account_id: int
        _calendar_warnings_logged: set[str]

        def _begin(self, at: _dt.datetime) -> Stage: ...
        def _stage_transition(self, stage: Stage, card: Card, event: CardEvent, **kwargs: Any) -> Card: ...
        def _stage_new_card(self, stage: Stage, **kwargs: Any) -> Card: ...
        def _book(self, *args: Any) -> int: ...
        def _read(self, table: str, key: bytes) -> dict[str, Any] | None: ...
        def card(self, number_or_alias: str) -> Card: ...
        def cards_of(self, holder: str) -> list[Card]: ...
        def person(self, id_number: str) -> Person: ...
        def employer(self, unit_code: str) -> Any: ...
        def history(self, card_number: str) -> list[dict[str, Any]]: ...
        def account_frozen(self, account_id: int) -> bool: ...

    # -- loss reports -------------------------------------------------------------------------------

    def report_loss_phone(self, *, id_number: str, name: str, gender: Gender | str, employer: str | None,
                          card_number: str | None = None, actor: str,
                          at: _dt.datetime | None = None) -> LossReportResult:
        """A phone report: the card stops settling at once, and is restored at the end of the N-th
        working day after the day of the report unless a written report follows."""
        at = as_instant(at)
        channel = check_actor(actor, Channel.PHONE)
        person = self.person(id_number)
        self._match_phone_identity(person, name, gender, employer)
        card = self._card_to_report(person, card_number)
        stage = self._begin(at)
        result = self._stage_stop(stage, card, CardEvent.REPORT_LOSS_PHONE, channel, actor, at)
        stage.commit(f"the phone loss report of card {card.card_number}")
        return result

    def report_loss_online(self, *, id_number: str, password: str, card_number: str | None = None,
                           at: _dt.datetime | None = None) -> LossReportResult:
        """A self-service report, authenticated by citizen ID number and self-service password; the
        same effect as a phone report."""
        at = as_instant(at)
        person, credential = self._authenticate(id_number, password, at)
        card = self._card_to_report(person, card_number)
        stage = self._begin(at)
        if credential["failures"]:
            stage.put_json(CREDENTIALS, person.id_number.encode("ascii"), {**credential, "failures": 0})
        result = self._stage_stop(stage, card, CardEvent.REPORT_LOSS_ONLINE, Channel.ONLINE, SELF_SERVICE_ACTOR, at)
        stage.commit(f"the online loss report of card {card.card_number}")
        return result

    def report_loss_written(self, card_number: str, *, holder_id: str, holder_name: str,
                            agent_id: str | None = None, agent_name: str | None = None, actor: str,
                            at: _dt.datetime | None = None) -> LossReportResult:
        """A written report: card frozen, the holder's medical account frozen, settling stopped, all at
        once. An agent reporting for the holder is registered with the report."""
        at = as_instant(at)
        channel = check_actor(actor, Channel.WRITTEN)
        card = self.card(card_number)
        self._match_holder_identity(card, holder_id, holder_name)
        agent_number, agent_name = self._check_agent(card, agent_id, agent_name, at)
        stage = self._begin(at)
        medical_frozen = self._stage_freeze_medical(stage, card)
        report = LossReport(channel=channel.value, accepted_at=at.isoformat(), accepted_at_ns=instant_ns(at),
                            actor=actor, agent_id=agent_number, agent_name=agent_name, previous=card.loss_report)
        frozen = self._stage_transition(stage, card, CardEvent.REPORT_LOSS_WRITTEN, actor=actor, channel=channel,
                                        at=at, updates={"loss_report": report},
                                        details={"agent_id": agent_number, "medical_account_frozen": medical_frozen})
        stage.commit(f"the written loss report of card {card.card_number}")
        return LossReportResult(frozen, at)

    def _stage_stop(self, stage: Stage, card: Card, event: CardEvent, channel: Channel, actor: str,
                    at: _dt.datetime) -> LossReportResult:
        n_workdays = self.settings.restore_workdays
        deadline, warnings = self._deadline(at.date(), n_workdays)
        report = LossReport(channel=channel.value, accepted_at=at.isoformat(), accepted_at_ns=instant_ns(at),
                            actor=actor, restore_workdays=n_workdays,
                            restore_deadline=None if deadline is None else deadline.isoformat())
        stopped = self._stage_transition(stage, card, event, actor=actor, channel=channel, at=at,
                                         updates={"loss_report": report},
                                         details={"restore_deadline": report.restore_deadline,
                                                  "calendar_warnings": list(warnings)})
        restore_at = None if deadline is None else end_of_day(deadline)
        return LossReportResult(stopped, at, deadline, restore_at, warnings)

    def _deadline(self, report_day: _dt.date, n_workdays: int) -> tuple[_dt.date | None, tuple[str, ...]]:
        try:
            result = self.calendar.restore_deadline(report_day, n_workdays)
        except ValueError as exc:  # an operator table leaving too few working days: say so, never crash
            warnings: tuple[str, ...] = (f"no restore deadline for a report of {report_day.isoformat()}: {exc}",)
            deadline = None
        else:
            warnings, deadline = result.warnings, result.date
        for warning in warnings:
            if warning not in self._calendar_warnings_logged:  # once per process, not once per card
                self._calendar_warnings_logged.add(warning)
                log.warning("working days: %s", warning)
        return deadline, warnings

    def restore_deadline_of(self, card: Card) -> tuple[_dt.date | None, tuple[str, ...]]:
        """The day at whose end a stopped card is restored, computed on today's calendar data."""
        report = card.loss_report
        if card.state is not CardState.STOPPED or report is None or report.restore_workdays is None:
            return None, ()
        report_day = _dt.datetime.fromisoformat(report.accepted_at).astimezone(clock.CITY_ZONE).date()
        return self._deadline(report_day, report.restore_workdays)

    def _match_phone_identity(self, person: Person, name: str, gender: Gender | str, employer: str | None) -> None:
        try:
            given_name = validate_name(name)
        except IdentityError as exc:
            raise from_identity_error(exc) from None
        given_gender = parse_enum(Gender, gender, "gender", person.subject)
        mismatched = [field for field, matches in (
            ("name", given_name == person.name),
            ("gender", given_gender is person.gender),
            ("employer", self._employer_matches(person, employer)),
        ) if not matches]
        _refuse_mismatch(mismatched, person.subject)

    def _employer_matches(self, person: Person, given: str | None) -> bool:
        given_text = " ".join((given or "").split())
        if person.employer is None:
            return not given_text
        registered_name = " ".join(self.employer(person.employer).name.split())
        return given_text.upper() == person.employer or given_text == registered_name

    def _match_holder_identity(self, card: Card, holder_id: str, holder_name: str) -> None:
        """The holder's identity as on the document shown at a counter (ID card, or the unit's papers)."""
        if card.kind is CardKind.INDIVIDUAL:
            number = checked_citizen_id(holder_id, "holder_id")
            try:
                name = validate_name(holder_name)
            except IdentityError as exc:
                raise RegistryError("holder_name", exc.reason) from None
            person = self.person(card.holder)
            checks = (("holder_id", number == person.id_number), ("holder_name", name == person.name))
        else:
            code = checked_unit_code(holder_id)
            name = check_text(holder_name, "holder_name")
            checks = (("holder_id", code == card.holder),
                      ("holder_name", " ".join(name.split()) == " ".join(self.employer(card.holder).name.split())))
        _refuse_mismatch([field for field, matches in checks if not matches], card.subject)

    def _check_agent(self, card: Card, agent_id: str | None, agent_name: str | None,
                     at: _dt.datetime) -> tuple[str | None, str | None]:
        if not agent_id and not agent_name:
            if card.kind is CardKind.EMPLOYER:
                raise RegistryError("agent_id", "a unit reports through an agent: give the agent's citizen ID and "
                                                "name", subject=card.subject)
            return None, None
        if not agent_id or not agent_name:
            missing = "agent_id" if not agent_id else "agent_name"
            raise RegistryError(missing, "an agent is registered with both citizen ID and name", subject=card.subject)
        try:
            agent = validate_citizen_id(agent_id, today=at.date())
        except IdentityError as exc:
            raise RegistryError("agent_id", f"{exc.field}: {exc.reason}", subject=exc.subject) from None
        except TypeError:
            raise RegistryError("agent_id", "must be text") from None
        try:
            name = validate_name(agent_name)
        except IdentityError as exc:
            raise RegistryError("agent_name", exc.reason) from None
        if agent.number == card.holder:
            raise RegistryError("agent_id", "is the holder's own citizen ID; an agent reports for someone else",
                                subject=card.subject)
        return agent.number, name

    def _card_to_report(self, person: Person, card_number: str | None) -> Card:
        if card_number:
            card = self.card(card_number)
            if card.holder != person.id_number:
                raise RegistryError("card_number", f"card {card.card_number} is not a card of this person",
                                    subject=person.subject, code=ErrorCode.FAILED_PRECONDITION)
            return card
        current = [card for card in self.cards_of(person.id_number) if card.state not in TERMINAL_STATES]
        if not current:
            raise RegistryError("card_number", "the person has no card that could be reported", subject=person.subject,
                                code=ErrorCode.NOT_FOUND)
        return current[-1]

    def _authenticate(self, id_number: str, password: str, at: _dt.datetime) -> tuple[Person, dict[str, Any]]:
        failed = RegistryError("credentials", _AUTHENTICATION_FAILED, subject="self-service",
                               code=ErrorCode.UNAUTHENTICATED)
        try:
            person = self.person(id_number)
        except RegistryError:
            raise failed from None
        credential = self._read(CREDENTIALS, person.id_number.encode("ascii"))
        if credential is None:
            raise failed
        if credential["failures"] >= self.settings.self_service_failures_max:
            raise RegistryError("credentials", f"self-service is locked after {credential['failures']} wrong "
                                               "passwords; a counter can set a new one", subject="self-service",
                                code=ErrorCode.UNAUTHENTICATED)
        if verify_password(password, credential["verifier"]):
            return person, credential
        stage = self._begin(at)
        failures = credential["failures"] + 1
        stage.put_json(CREDENTIALS, person.id_number.encode("ascii"), {**credential, "failures": failures})
        stage.audit(actor=SELF_SERVICE_ACTOR, channel=Channel.ONLINE, action="person.self_service_auth_failed",
                    subject=person.subject, at=at, details={"failures_in_a_row": failures})
        stage.commit("recording a failed self-service login")
        raise failed

    def _stage_freeze_medical(self, stage: Stage, card: Card) -> bool:
        if card.kind is not CardKind.INDIVIDUAL:
            return False
        account_id = self.person(card.holder).medical_account_id
        if self.account_frozen(account_id):
            return False
        stage.changes.append((account_id, ChangeAction.FREEZE))
        return True

    # -- restore, replace, renew, cancel, expire ----------------------------------------------------

    def restore(self, card_number: str, *, reason: str, actor: str, channel: Channel | str = Channel.COUNTER,
                at: _dt.datetime | None = None) -> Card:
        """Lift a phone or online report before its deadline (the holder found the card)."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        stage = self._begin(at)
        restored = self._stage_transition(stage, card, CardEvent.RESTORE, actor=actor, channel=channel, at=at,
                                          reason=reason, updates={"loss_report": None})
        stage.commit(f"restoring card {card.card_number}")
        return restored

    def auto_restore(self, card_number: str, *, at: _dt.datetime | None = None) -> Card:
        """The system's restore of a stopped card whose deadline has passed (``tick`` calls this)."""
        at = as_instant(at)
        card = self.card(card_number)
        deadline, warnings = self.restore_deadline_of(card)
        if card.state is CardState.STOPPED:
            if deadline is None:
                raise RegistryError("restore_deadline", "cannot be computed: " + "; ".join(warnings),
                                    subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
            if at < end_of_day(deadline):
                raise RegistryError("at", f"the card is restored at the end of {deadline.isoformat()}, not before",
                                    subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
        report = card.loss_report
        stage = self._begin(at)
        restored = self._stage_transition(
            stage, card, CardEvent.AUTO_RESTORE, actor=SYSTEM_ACTOR, channel=Channel.SYSTEM, at=at,
            reason="no written report followed in time", updates={"loss_report": None},
            details={"report_accepted_at": None if report is None else report.accepted_at,
                     "restore_deadline": None if deadline is None else deadline.isoformat(),
                     "calendar_warnings": list(warnings)})
        stage.commit(f"restoring card {card.card_number}")
        return restored

    def replace(self, card_number: str, *, actor: str, channel: Channel | str = Channel.COUNTER,
                at: _dt.datetime | None = None) -> tuple[Card, Card]:
        """Replace a card after a written report: (the old card, now replaced; the new card)."""
        return self._retire_and_reissue(card_number, CardEvent.REPLACE, actor, channel, at)

    def renew(self, card_number: str, *, actor: str, channel: Channel | str = Channel.COUNTER,
              at: _dt.datetime | None = None) -> tuple[Card, Card]:
        """Renew an active or expired card: (the old card, now replaced; the new card)."""
        return self._retire_and_reissue(card_number, CardEvent.RENEW, actor, channel, at)

    def _retire_and_reissue(self, card_number: str, event: CardEvent, actor: str, channel: Channel | str,
                            at: _dt.datetime | None) -> tuple[Card, Card]:
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        stage = self._begin(at)
        retired = self._stage_transition(stage, card, event, actor=actor, channel=channel, at=at)
        new_card = self._stage_new_card(stage, kind=card.kind, holder=card.holder, actor=actor, channel=channel,
                                        at=at, replaces=card.card_number)
        retired = replace(retired, replaced_by=new_card.card_number)
        stage.put_json(CARDS, retired.card_number.encode("ascii"), retired.to_json())
        stage.commit(f"{event.value} of card {card.card_number}")
        return retired, new_card

    def cancel(self, card_number: str, *, reason: CancelReason | str, note: str | None = None, actor: str,
               channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> Card:
        """Cancel a card for good (death, emigration, a duplicate)."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        cause = parse_enum(CancelReason, reason, "reason", card.subject)
        note = check_text(note, "note", required=False, subject=card.subject)
        stage = self._begin(at)
        cancelled = self._stage_transition(stage, card, CardEvent.CANCEL, actor=actor, channel=channel, at=at,
                                           reason=f"{cause.value}: {note}" if note else cause.value,
                                           updates={"cancel_reason": cause.value})
        stage.commit(f"cancelling card {card.card_number}")
        return cancelled

    def expire(self, card_number: str, *, actor: str = SYSTEM_ACTOR, channel: Channel | str = Channel.SYSTEM,
               at: _dt.datetime | None = None) -> Card:
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        stage = self._begin(at)
        expired = self._stage_transition(stage, card, CardEvent.EXPIRE, actor=actor, channel=channel, at=at,
                                         details={"expiry_date": card.expiry_date.isoformat()})
        stage.commit(f"expiring card {card.card_number}")
        return expired

    # -- PIN reset requests -------------------------------------------------------------------------

    def request_pin_reset(self, card_number: str, *, holder_id: str, holder_name: str, actor: str,
                          channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> PinReset:
        """Record a holder's request to reset the PIN of an active card; the chip side completes it."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        self._match_holder_identity(card, holder_id, holder_name)
        if not settles(card.state):
            raise RegistryError("state", f"the PIN of a {card.state.value} card cannot be reset",
                                subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
        if card.open_pin_reset is not None:
            raise RegistryError("pin_reset", f"request {card.open_pin_reset} is still open", subject=card.subject,
                                code=ErrorCode.ALREADY_EXISTS)
        stage = self._begin(at)
        request = PinReset(request_id=stage.next_seq("pin_reset"), card_number=card.card_number,
                           state=PinResetState.REQUESTED, requested_at=at.isoformat(), actor=actor,
                           channel=channel.value)
        stage.put_json(PIN_RESETS, _request_key(request.request_id), request.to_json())
        stage.put_json(CARDS, card.card_number.encode("ascii"),
                       replace(card, open_pin_reset=request.request_id).to_json())
        stage.audit(actor=actor, channel=channel, action="card.pin_reset_requested", subject=card.subject, at=at,
                    details={"request": request.request_id})
        stage.commit(f"a PIN reset request for card {card.card_number}")
        return request

    def close_pin_reset(self, request_id: int, *, outcome: PinResetState | str, actor: str,
                        channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> PinReset:
        """Mark a PIN reset request completed (the chip's PIN was reset) or cancelled."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        outcome = parse_enum(PinResetState, outcome, "outcome")
        if outcome is PinResetState.REQUESTED:
            raise RegistryError("outcome", "a request is closed as completed or cancelled")
        request = self.pin_reset(request_id)
        if request.state is not PinResetState.REQUESTED:
            raise RegistryError("pin_reset", f"request {request_id} is already {request.state.value}",
                                code=ErrorCode.FAILED_PRECONDITION)
        card = self.card(request.card_number)
        closed = replace(request, state=outcome, closed_at=at.isoformat())
        stage = self._begin(at)
        stage.put_json(PIN_RESETS, _request_key(request_id), closed.to_json())
        stage.put_json(CARDS, card.card_number.encode("ascii"), replace(card, open_pin_reset=None).to_json())
        stage.audit(actor=actor, channel=channel, action=f"card.pin_reset_{outcome.value}", subject=card.subject,
                    at=at, details={"request": request_id})
        stage.commit(f"closing PIN reset request {request_id}")
        return closed

    def pin_reset(self, request_id: int) -> PinReset:
        if isinstance(request_id, bool) or not isinstance(request_id, int) or not 1 <= request_id < 2**64:
            raise RegistryError("request_id", f"{request_id!r} is not a request number")
        found = self._read(PIN_RESETS, _request_key(request_id))
        if found is None:
            raise RegistryError("request_id", f"no PIN reset request {request_id}", code=ErrorCode.NOT_FOUND)
        return stored_record(PinReset, found, f"PIN reset request {request_id}")

    # -- the e-purse left behind --------------------------------------------------------------------

    def refund_purse(self, card_number: str, *, actor: str, channel: Channel | str = Channel.COUNTER,
                     at: _dt.datetime | None = None) -> int:
        """Where the city allows it, pay a retired card's e-purse shadow balance out to the suspense
        account (a REDEMPTION) once the clearing window has passed; the transfer id."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        if not self.settings.purse_refund_allowed:
            raise RegistryError("purse_refund_allowed", "the city does not refund e-purse balances (setting "
                                "registry.purse_refund_allowed)", subject=card.subject,
                                code=ErrorCode.FAILED_PRECONDITION)
        if card.state not in (CardState.REPLACED, CardState.CANCELLED):
            raise RegistryError("state", f"only a replaced or cancelled card's e-purse is refunded, not a "
                                         f"{card.state.value} one's", subject=card.subject,
                                code=ErrorCode.FAILED_PRECONDITION)
        window_ends = self._stopped_settling_at(card) + _dt.timedelta(days=self.settings.purse_clearing_window_days)
        if at < window_ends:
            raise RegistryError("at", f"the clearing window runs until {window_ends.isoformat()}",
                                subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
        balance = self.ledger.balance(card.purse_account_id)
        if balance.debits_pending or balance.credits_pending:
            raise RegistryError("purse", "has pending transfers; refund after they are posted or voided",
                                subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
        if balance.credit_balance <= 0:
            raise RegistryError("purse", "has nothing to refund", subject=card.subject,
                                code=ErrorCode.FAILED_PRECONDITION)
        return self._book(at, actor, channel, "purse.redemption", card.subject, LedgerId.PURSE,
                          TransferCode.REDEMPTION, card.purse_account_id, self.suspense_account_id,
                          balance.credit_balance)

    def _stopped_settling_at(self, card: Card) -> _dt.datetime:
        """The instant the card last stopped being active (or was retired, if it never was)."""
        rows = self.history(card.card_number)
        left_active = [row for row in rows if row["from"] == CardState.ACTIVE and row["to"] != CardState.ACTIVE]
        chosen = left_active[-1] if left_active else rows[-1]
        return _dt.datetime.fromisoformat(chosen["at"])


def tick(registry: Registry, at: _dt.datetime | None = None) -> TickReport:
    """Restore stopped cards whose written report did not follow in time, and expire cards past their
    expiry date; each change in its own transaction, at the instant the rule names. The gRPC server
    calls this on a timer; ``citycard lifecycle tick`` calls it once."""
    at = as_instant(at)
    restored: list[RestoredCard] = []
    warnings: list[str] = []
    stopped_rows = _stopped_rows(registry, TICK_EVENTS_MAX + 1)
    for key, _ in stopped_rows[:TICK_EVENTS_MAX]:
        card = registry.card(key[len(_STOPPED_PREFIX):].decode("ascii"))
        deadline, card_warnings = registry.restore_deadline_of(card)
        warnings.extend(warning for warning in card_warnings if warning not in warnings)
        if deadline is None or end_of_day(deadline) > at:
            continue
        if end_of_day(card.expiry_date) <= end_of_day(deadline):
            continue  # it expires before it would be restored: _expire_due takes it from stopped to expired
        report = card.loss_report
        registry.auto_restore(card.card_number, at=end_of_day(deadline))
        restored.append(RestoredCard(card.card_number, report.accepted_at if report else "", deadline,
                                     end_of_day(deadline)))
    expired = _expire_due(registry, at)
    waiting = len(_stopped_rows(registry, TICK_EVENTS_MAX))
    more = len(stopped_rows) > TICK_EVENTS_MAX or len(expired) >= TICK_EVENTS_MAX
    return TickReport(at, tuple(restored), tuple(expired), waiting, tuple(warnings), more)


def _stopped_rows(registry: Registry, limit: int) -> list[tuple[bytes, bytes]]:
    return registry.ledger.scan(TIMERS, start=_STOPPED_PREFIX, stop=_prefix_end(_STOPPED_PREFIX), limit=limit)


def _expire_due(registry: Registry, at: _dt.datetime) -> list[str]:
    # Keys hold the expiry date: every key below "expires:<today>" is a card whose last valid day is over.
    rows = registry.ledger.scan(TIMERS, start=_EXPIRES_PREFIX,
                                stop=_EXPIRES_PREFIX + at.date().isoformat().encode("ascii"), limit=TICK_EVENTS_MAX)
    expired = []
    for key, _ in rows:
        card = registry.card(key.rsplit(b":", 1)[1].decode("ascii"))
        if card.state not in (CardState.ACTIVE, CardState.STOPPED):
            continue  # not yet in use (or frozen): it leaves the timers when it is replaced or cancelled
        when = max(end_of_day(card.expiry_date), _dt.datetime.fromisoformat(card.changed_at))
        registry.expire(card.card_number, at=when)
        expired.append(card.card_number)
    return expired


def _refuse_mismatch(mismatched: list[str], subject: str) -> None:
    if mismatched:
        verb = "does" if len(mismatched) == 1 else "do"
        raise RegistryError("identity", f"{', '.join(mismatched)} {verb} not match the registry; nothing was changed",
                            subject=subject, code=ErrorCode.FAILED_PRECONDITION)


def _request_key(request_id: int) -> bytes:
    return request_id.to_bytes(8, "big")


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])

