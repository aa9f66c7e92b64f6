"""The registry: persons, employers and cards, their accounts on the ledger, and the card lifecycle.

Every operation that changes something follows one pattern: check every input (a RegistryError
names the field, nothing is written), then stage the rows, the ledger events (opening an account,
freezing it), the audit entry and the denylist change in a ``Stage``, and commit them in ONE atomic
``Ledger.execute``: a card's state and its side effects on the ledger are never half-done.

    registry = Registry.open("var")
    registry.add_employer("91370100MA3C5LQX6E", "济南示例科技有限公司", actor="op1")
    person = registry.add_person(id_number=..., name="张三", gender="male", ..., actor="op1")
    card = registry.issue_card(person.id_number, actor="op1")
    registry.report_loss_phone(id_number=..., name="张三", gender="male", employer="...", actor="op2")
    tick(registry)                      # restores cards whose written report did not follow in time

Where rows live and how account ids are derived: core/registry_store.py. The loss reports, the
other lifecycle operations and ``tick``: core/registry_lifecycle.py (mixed into Registry).
Settings (N working days, the purse refund): core/settings.py.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Self

from citycard.core import denylist, lifecycle
from citycard.core.audit import AuditChain, AuditEntry, AuditProblem
from citycard.core.identity import (
    CITIZEN_ID_LENGTH,
    Gender,
    IdentityError,
    mask_id,
    validate_citizen_id,
    validate_name,
)
from citycard.core.ledger import Balance, Ledger
from citycard.core.lifecycle import (
    SYSTEM_ACTOR,
    TERMINAL_STATES,
    CardEvent,
    CardState,
    Channel,
    ForbiddenTransition,
    LifecycleInputError,
)
from citycard.core.records import AccountFlags, AccountKind, ChangeAction, LedgerId, TransferCode
from citycard.core.registry_auth import check_new_password, make_verifier
from citycard.core.registry_lifecycle import LifecycleOperations, LossReportResult, TickReport, tick
from citycard.core.registry_records import (
    CARD_NUMBER_LENGTH,
    LEGACY_NUMBER_LENGTH_MAX,
    LEGACY_TECHNOLOGIES,
    Card,
    CardKind,
    Category,
    Employer,
    ErrorCode,
    Person,
    PersonStatus,
    RegistryError,
    Technology,
    as_instant,
    check_actor,
    check_text,
    checked_amount,
    checked_citizen_id,
    checked_unit_code,
    from_identity_error,
    normalise_card_number,
    normalise_legacy_number,
    parse_enum,
    stored_record,
)
from citycard.core.registry_store import (
    AUDIT,
    AUDIT_HEAD_KEY,
    CARD_HISTORY,
    CARD_INDEX,
    CARDS,
    CREDENTIALS,
    EMPLOYERS,
    META,
    PERSONS,
    SETUP_KEY,
    TIMERS,
    Stage,
    decode,
    encode,
    encode_plain,
    history_key,
    instant_ns,
    medical_account_id,
    purse_account_id,
    system_account_id,
    transfer_id,
)
from citycard.core.settings import Settings, load_calendar, load_settings
from citycard.core.workdays import WorkdayCalendar

__all__ = [
    "LEDGER_DIR",
    "BulkEnrolment",
    "LossReportResult",
    "OrderedCard",
    "Registry",
    "RegistryError",
    "TickReport",
    "tick",
]

LEDGER_DIR = "ledger"  # DIR/ledger holds the LMDB environment of the ledger and the registry
LOCK_FILE = "registry.lock"
NATIONALITY_DEFAULT = "CHN"
CARD_NUMBER_TRIES_MAX = 1000  # generated numbers skip numbers taken by migrated cards
CARD_ID_RID = "D156000005"  # the MOHRSS registered application provider id, after the region code
HISTORY_ROWS_MAX = 10_000
EMPLOYERS_REMEMBERED_MAX = 100_000
CARDS_PER_HOLDER_MAX = 1000

# Accounts the registry opens once, in its first write: where contributions come from, where loads
# come from, where redeemed e-purse balances wait to be paid out.
SYSTEM_ACCOUNTS = (
    (LedgerId.MEDICAL, AccountKind.FUND),
    (LedgerId.PURSE, AccountKind.OPERATOR_SETTLEMENT),
    (LedgerId.PURSE, AccountKind.SUSPENSE),
)
PRODUCTION_EVENTS = (CardEvent.PRINT, CardEvent.REGISTER, CardEvent.DISTRIBUTE, CardEvent.ACTIVATE)


class Registry(LifecycleOperations):
    """Persons, employers, cards and the card lifecycle over one Ledger. One thread owns it."""

    fund_account_id = system_account_id(LedgerId.MEDICAL, AccountKind.FUND)
    load_account_id = system_account_id(LedgerId.PURSE, AccountKind.OPERATOR_SETTLEMENT)
    suspense_account_id = system_account_id(LedgerId.PURSE, AccountKind.SUSPENSE)

    def __init__(self, ledger: Ledger, settings: Settings | None = None,
                 calendar: WorkdayCalendar | None = None, *, lock_fd: int | None = None) -> None:
        self.ledger = ledger
        self.settings = settings if settings is not None else Settings()
        self.calendar = calendar if calendar is not None else load_calendar(self.settings)
        self._lock_fd = lock_fd
        self._calendar_warnings_logged: set[str] = set()
        self._employers_seen: dict[str, Employer] = {}

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *, create: bool = True, write: bool = True) -> Registry:
        """The registry in ``data_dir`` (its ledger in ``data_dir/ledger``), with the settings of
        ``data_dir/citycard.json``. ``write`` takes the directory's lock, so two processes never
        interleave their checks and commits; ``create=False`` refuses a directory without a registry."""
        data_dir = Path(data_dir)
        settings = load_settings(data_dir)
        calendar = load_calendar(settings)
        ledger_dir = data_dir / LEDGER_DIR
        if not create and not ledger_dir.is_dir():
            raise RegistryError("data", f"there is no registry in {data_dir}", code=ErrorCode.NOT_FOUND)
        lock_fd = _lock(data_dir) if write else None
        try:
            ledger = Ledger(ledger_dir)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(ledger, settings, calendar, lock_fd=lock_fd)

    def close(self) -> None:
        self.ledger.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- units of work ------------------------------------------------------------------------------

    def begin(self, at: _dt.datetime | None = None) -> Stage:
        """A unit of work for a caller that commits many registry operations as one (a production
        batch): pass it to the ``stage_*`` methods, add the caller's own rows, then ``commit`` it."""
        return self._begin(as_instant(at))

    def _begin(self, at: _dt.datetime) -> Stage:
        """A new unit of work; the registry's first one also opens the system accounts."""
        stage = Stage(self.ledger)
        if stage.get(META, SETUP_KEY) is None:
            for ledger_id, kind in SYSTEM_ACCOUNTS:
                account_id = system_account_id(ledger_id, kind)
                if self.ledger.account(account_id) is None:
                    stage.accounts.append({"id": account_id, "ledger": ledger_id, "code": kind, "flags": 0,
                                           "owner": 0})
            stage.put(META, SETUP_KEY, at.isoformat().encode("ascii"))
            stage.audit(actor=SYSTEM_ACTOR, channel=Channel.SYSTEM, action="registry.setup", subject="registry",
                        at=at, details={"system_accounts": [f"{system_account_id(l, k):032x}"
                                                            for l, k in SYSTEM_ACCOUNTS]})
        return stage

    # -- employers ----------------------------------------------------------------------------------

    def add_employer(self, unit_code: str, name: str, *, actor: str, channel: Channel | str = Channel.COUNTER,
                     at: _dt.datetime | None = None) -> Employer:
        at = as_instant(at)
        channel = check_actor(actor, channel)
        code = checked_unit_code(unit_code)
        subject = f"employer {code}"
        name = check_text(name, "employer_name", subject=subject)
        stage = self._begin(at)
        if stage.get(EMPLOYERS, code.encode("ascii")) is not None:
            raise RegistryError("unit_code", "is already registered", subject=subject, code=ErrorCode.ALREADY_EXISTS)
        employer = Employer(unit_code=code, name=name, registered_at=at.isoformat())
        stage.put_json(EMPLOYERS, code.encode("ascii"), employer.to_json())
        stage.audit(actor=actor, channel=channel, action="employer.add", subject=subject, at=at,
                    details={"name": name})
        stage.commit("adding an employer")
        return employer

    def employer(self, unit_code: str) -> Employer:
        known = self._employers_seen.get(unit_code)
        if known is not None:
            return known
        code = checked_unit_code(unit_code)
        found = self._read(EMPLOYERS, code.encode("ascii"))
        if found is None:
            raise RegistryError("unit_code", "no employer with this unit code", subject=f"employer {code}",
                                code=ErrorCode.NOT_FOUND)
        employer = stored_record(Employer, found, f"employer {code}")
        if len(self._employers_seen) < EMPLOYERS_REMEMBERED_MAX:
            # An employer record never changes once added, so what was read stays true; a bulk import
            # asks for the same few employers a hundred thousand times.
            self._employers_seen[code] = employer
        return employer

    # -- persons ------------------------------------------------------------------------------------

    def add_person(self, *, id_number: str, name: str, gender: Gender | str, date_of_birth: _dt.date | str,
                   residence: str, household_registration: str, status: PersonStatus | str,
                   nationality: str = NATIONALITY_DEFAULT, employer: str | None = None,
                   categories: Iterable[Category | str] = (), actor: str,
                   channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> Person:
        """Register a person and open the person's medical personal account (MEDICAL), together."""
        at = as_instant(at)
        stage = self._begin(at)
        person = self.stage_person(
            stage, id_number=id_number, name=name, gender=gender, date_of_birth=date_of_birth, residence=residence,
            household_registration=household_registration, status=status, nationality=nationality,
            employer=employer, categories=categories, actor=actor, channel=channel, at=at)
        stage.commit("registering a person")
        return person

    def stage_person(self, stage: Stage, *, id_number: str, name: str, gender: Gender | str,
                     date_of_birth: _dt.date | str, residence: str, household_registration: str,
                     status: PersonStatus | str, nationality: str = NATIONALITY_DEFAULT, employer: str | None = None,
                     categories: Iterable[Category | str] = (), actor: str, channel: Channel | str = Channel.COUNTER,
                     at: _dt.datetime, audit: bool = True, prechecked: bool = False) -> Person:
        """``add_person`` staged in the caller's unit of work (see ``begin``); ``audit=False`` leaves
        the audit entry to the caller, who records one for the whole lot.

        ``prechecked=True`` is for bulk enrolment whose rows were checked already: the caller has
        validated the ID number (``validate_citizen_id`` against this birth date and gender) and the
        name (``validate_name``), and passes the values those returned; they are not validated again
        (a roster row's checks, apps/production/rowcheck.py, cost as much as the rest of enrolment).
        Everything else is checked as always, and the gender stored is still the ID number's."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        birth = _parse_date(date_of_birth, "date_of_birth")
        if prechecked:
            number, holder_gender = _prechecked_citizen_id(id_number)
        else:
            try:
                citizen = validate_citizen_id(id_number, date_of_birth=birth, gender=gender, today=at.date())
                name = validate_name(name)
            except IdentityError as exc:
                raise from_identity_error(exc) from None
            number, holder_gender = citizen.number, citizen.gender
        subject = f"person {mask_id(number)}"
        status = parse_enum(PersonStatus, status, "status", subject)
        unique_categories = sorted({parse_enum(Category, category, "categories", subject) for category in categories})
        unit_code = self._check_person_employer(employer, status, subject)
        key = number.encode("ascii")
        if stage.get(PERSONS, key) is not None:
            raise RegistryError("id_number", "is already registered", subject=subject, code=ErrorCode.ALREADY_EXISTS)
        seq = stage.next_seq("person")
        person = Person(
            id_number=number, name=name, gender=holder_gender, date_of_birth=birth,
            nationality=_nationality(nationality, subject),
            residence=check_text(residence, "residence", subject=subject),
            household_registration=check_text(household_registration, "household_registration", subject=subject),
            employer=unit_code, status=status, categories=tuple(unique_categories), seq=seq,
            medical_account_id=medical_account_id(seq), registered_at=at.isoformat(),
        )
        stage.accounts.append({"id": person.medical_account_id, "ledger": LedgerId.MEDICAL,
                               "code": AccountKind.PERSON_MEDICAL,
                               "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS, "owner": seq})
        stage.put_json(PERSONS, key, person.to_json())
        if audit:
            stage.audit(actor=actor, channel=channel, action="person.add", subject=subject, at=at, details={
                "status": status.value, "employer": unit_code, "categories": [c.value for c in unique_categories],
                "medical_account": f"{person.medical_account_id:032x}"})
        return person

    def stage_person_update(self, stage: Stage, person: Person, *, name: str, residence: str,
                            household_registration: str, nationality: str, employer: str | None,
                            status: PersonStatus | str, actor: str, channel: Channel | str = Channel.COUNTER,
                            at: _dt.datetime, audit: bool = True) -> Person:
        """Correct what a person's record says that the ID number does not fix (name, addresses,
        nationality, employer, status), staged in the caller's unit of work. The ID number, and so the
        birth date, gender and medical account, never change."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        try:
            name = validate_name(name)
        except IdentityError as exc:
            raise from_identity_error(exc) from None
        status = parse_enum(PersonStatus, status, "status", person.subject)
        updated = replace(
            person, name=name, nationality=_nationality(nationality, person.subject),
            residence=check_text(residence, "residence", subject=person.subject),
            household_registration=check_text(household_registration, "household_registration",
                                              subject=person.subject),
            employer=self._check_person_employer(employer, status, person.subject), status=status)
        if updated == person:
            return person
        stage.put_json(PERSONS, person.id_number.encode("ascii"), updated.to_json())
        if audit:
            changed = [field_name for field_name in ("name", "nationality", "residence", "household_registration",
                                                     "employer", "status")
                       if getattr(updated, field_name) != getattr(person, field_name)]
            stage.audit(actor=actor, channel=channel, action="person.update", subject=person.subject, at=at,
                        details={"changed": changed})
        return updated

    def _check_person_employer(self, employer: str | None, status: PersonStatus, subject: str) -> str | None:
        if employer is None or not str(employer).strip():
            if status is PersonStatus.EMPLOYED:
                raise RegistryError("employer", "an employed person needs the insured unit's code", subject=subject)
            return None
        return self.employer(employer).unit_code

    def person(self, id_number: str) -> Person:
        number = checked_citizen_id(id_number)
        found = self._read(PERSONS, number.encode("ascii"))
        if found is None:
            raise RegistryError("id_number", "no person with this citizen ID", subject=f"person {mask_id(number)}",
                                code=ErrorCode.NOT_FOUND)
        return stored_record(Person, found, f"person {mask_id(number)}")

    def set_self_service_password(self, id_number: str, password: str, *, actor: str,
                                  channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> None:
        """Register (or replace) the password the holder uses for online self-service; unlocks it too."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        person = self.person(id_number)
        verifier = make_verifier(check_new_password(password))
        stage = self._begin(at)
        stage.put_json(CREDENTIALS, person.id_number.encode("ascii"),
                       {"verifier": verifier, "failures": 0, "set_at": at.isoformat()})
        stage.audit(actor=actor, channel=channel, action="person.self_service_credential_set",
                    subject=person.subject, at=at)
        stage.commit("setting a self-service password")

    def medical_balance(self, id_number: str) -> Balance:
        return self.ledger.balance(self.person(id_number).medical_account_id)

    def account_frozen(self, account_id: int) -> bool:
        record = self.ledger.account(account_id)
        return record is not None and bool(int(record["flags"]) & AccountFlags.FROZEN)

    # -- cards --------------------------------------------------------------------------------------

    def issue_card(self, holder: str, *, kind: CardKind | str = CardKind.INDIVIDUAL, actor: str,
                   channel: Channel | str = Channel.COUNTER, legacy_aliases: Mapping[str, str] | None = None,
                   card_number: str | None = None, at: _dt.datetime | None = None) -> Card:
        """Issue a holder's card and open its e-purse account (PURSE).

        At a counter the card is made on the spot: it passes print, register, distribute and activate
        at once, each recorded. Through a batch it is ordered from production and starts ``ordered``.
        ``legacy_aliases`` ({"barcode": number, "magstripe": number}) keep an old card's numbers so
        the old card migrates to this one; ``card_number`` keeps a number given by a migration."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        kind = parse_enum(CardKind, kind, "kind")
        holder_key = self._holder_key(kind, holder)
        aliases = self._check_aliases(legacy_aliases or {})
        explicit_number = None if card_number is None else normalise_card_number(card_number)
        stage = self._begin(at)
        self._refuse_second_usable_card(kind, holder_key)
        card = self._stage_new_card(stage, kind=kind, holder=holder_key, actor=actor, channel=channel, at=at,
                                    aliases=aliases, explicit_number=explicit_number)
        stage.commit("issuing a card")
        return card

    def stage_card(self, stage: Stage, holder: Person | str, *, actor: str, channel: Channel | str = Channel.BATCH,
                   at: _dt.datetime, audit: bool = True, prechecked: bool = False) -> Card:
        """``issue_card`` of a person's card staged in the caller's unit of work (see ``begin``);
        ``holder`` is the citizen ID or the Person as ``stage_person`` returned it. The one-usable-card
        rule is checked against what is committed: a caller staging many cards stages at most one per
        holder. ``prechecked=True``: the caller has just read the holder's cards (``cards_of``) in
        this unit of work and found none that is not retired, so they are not scanned again."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        person = holder if isinstance(holder, Person) else self._staged_person(stage, holder)
        if not prechecked:
            self._refuse_second_usable_card(CardKind.INDIVIDUAL, person.id_number)
        return self._stage_new_card(stage, kind=CardKind.INDIVIDUAL, holder=person.id_number, actor=actor,
                                    channel=channel, at=at, audit=audit, person=person)

    def bulk_enrolment(self, stage: Stage, *, actor: str, channel: Channel | str = Channel.BATCH,
                       at: _dt.datetime) -> BulkEnrolment:
        """Many persons registered and their cards ordered in the caller's unit of work (a production
        batch): see ``BulkEnrolment``."""
        return BulkEnrolment(self, stage, actor=actor, channel=channel, at=at)

    def _staged_person(self, stage: Stage, id_number: str) -> Person:
        """The person as the unit of work sees them: registered before, or staged in it."""
        number = checked_citizen_id(id_number)
        found = stage.get_json(PERSONS, number.encode("ascii"))
        if found is None:
            raise RegistryError("id_number", "no person with this citizen ID", subject=f"person {mask_id(number)}",
                                code=ErrorCode.NOT_FOUND)
        return stored_record(Person, found, f"person {mask_id(number)}")

    def card(self, number_or_alias: str) -> Card:
        """A card by its number or by a legacy bar-code or magnetic-stripe number."""
        text = number_or_alias.strip().upper() if isinstance(number_or_alias, str) else ""
        if not (text.isascii() and text.isalnum() and len(text) <= LEGACY_NUMBER_LENGTH_MAX):
            raise RegistryError("card_number", f"{number_or_alias!r} is neither a card number nor a legacy number")
        found = self._read(CARDS, text.encode("ascii")) if len(text) == CARD_NUMBER_LENGTH else None
        if found is None:
            alias = self._read(CARD_INDEX, b"alias:" + text.encode("ascii"))
            if alias is not None:
                found = self._read(CARDS, alias["card_number"].encode("ascii"))
        if found is None:
            raise RegistryError("card_number", "no such card", subject=f"card {text}", code=ErrorCode.NOT_FOUND)
        return stored_record(Card, found, f"card {text}")

    def cards_of(self, holder: str) -> list[Card]:
        """A holder's cards (citizen ID or unit code), oldest first."""
        prefix = b"holder:" + holder.strip().upper().encode("ascii", "replace") + b":"
        rows = self.ledger.scan(CARD_INDEX, start=prefix, stop=prefix + b"\xff", limit=CARDS_PER_HOLDER_MAX)
        cards = [self.card(key[len(prefix):].decode("ascii")) for key, _ in rows]
        return sorted(cards, key=lambda card: card.seq)

    def history(self, card_number: str) -> list[dict[str, Any]]:
        """A card's transitions, oldest first: from, event, to, actor, channel, reason, at."""
        prefix = normalise_card_number(card_number).encode("ascii")
        rows = self.ledger.scan(CARD_HISTORY, start=prefix, stop=prefix + b"\xff" * 5, limit=HISTORY_ROWS_MAX)
        return [decode(value, CARD_HISTORY, key) for key, value in rows]

    def advance(self, card_number: str, event: CardEvent | str, *, actor: str,
                channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> Card:
        """A production step of an ordered card: print, register, distribute, activate."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        event = parse_enum(CardEvent, event, "event")
        if event not in PRODUCTION_EVENTS:
            raise RegistryError("event", f"{event.value} is not a production step "
                                         f"({', '.join(e.value for e in PRODUCTION_EVENTS)})")
        card = self.card(card_number)
        stage = self._begin(at)
        card = self._stage_transition(stage, card, event, actor=actor, channel=channel, at=at)
        stage.commit(f"{event.value} of card {card.card_number}")
        return card

    def stage_advance(self, stage: Stage, card: Card, event: CardEvent | str, *, actor: str,
                      channel: Channel | str = Channel.BATCH, at: _dt.datetime, audit: bool = True,
                      details: Mapping[str, Any] | None = None) -> Card:
        """``advance`` staged in the caller's unit of work, for ``card`` as the caller last saw it
        (a card advanced twice in one unit is passed back in as the first call returned it)."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        event = parse_enum(CardEvent, event, "event")
        if event not in PRODUCTION_EVENTS:
            raise RegistryError("event", f"{event.value} is not a production step "
                                         f"({', '.join(e.value for e in PRODUCTION_EVENTS)})")
        return self._stage_transition(stage, card, event, actor=actor, channel=channel, at=at, audit=audit,
                                      details=details)

    def _holder_key(self, kind: CardKind, holder: str) -> str:
        if kind is CardKind.INDIVIDUAL:
            return self.person(holder).id_number
        return self.employer(holder).unit_code

    def _check_aliases(self, aliases: Mapping[str, str]) -> dict[str, str]:
        checked: dict[str, str] = {}
        for technology_name, number in aliases.items():
            technology = parse_enum(Technology, technology_name, "legacy_aliases")
            if technology not in LEGACY_TECHNOLOGIES:
                raise RegistryError("legacy_aliases", f"{technology.value} is not a legacy technology "
                                                      f"({', '.join(t.value for t in LEGACY_TECHNOLOGIES)})")
            legacy = normalise_legacy_number(number, technology)
            taken = self._read(CARD_INDEX, b"alias:" + legacy.encode("ascii"))
            if taken is not None or legacy in checked.values():
                raise RegistryError(f"legacy_{technology.value}", f"{legacy} is already an alias of card "
                                    f"{taken['card_number'] if taken else 'this request'}",
                                    code=ErrorCode.ALREADY_EXISTS)
            checked[technology.value] = legacy
        return checked

    def _refuse_second_usable_card(self, kind: CardKind, holder: str) -> None:
        # At most one usable card at a time: a lost, broken or expired card is replaced or renewed,
        # which retires it in the same transaction; only then may a new one be issued.
        for card in self.cards_of(holder):
            if card.state not in TERMINAL_STATES:
                who = f"person {mask_id(holder)}" if kind is CardKind.INDIVIDUAL else f"employer {holder}"
                raise RegistryError("holder", f"already has card {card.card_number} ({card.state.value}); "
                                              "replace, renew or cancel it first", subject=who,
                                    code=ErrorCode.FAILED_PRECONDITION)

    def _stage_new_card(self, stage: Stage, *, kind: CardKind, holder: str, actor: str, channel: Channel,
                        at: _dt.datetime, aliases: Mapping[str, str] | None = None,
                        explicit_number: str | None = None, replaces: str | None = None,
                        audit: bool = True, person: Person | None = None) -> Card:
        seq = stage.next_seq("card")
        number = explicit_number or self._next_card_number(stage)
        if stage.get(CARDS, number.encode("ascii")) is not None:
            raise RegistryError("card_number", "is already taken", subject=f"card {number}",
                                code=ErrorCode.ALREADY_EXISTS)
        card = Card(
            card_number=number, card_id_code=f"{self.settings.issuer_region_code}{CARD_ID_RID}{seq:016X}",
            kind=kind, technology=Technology.CPU, holder=holder, state=CardState.ORDERED, seq=seq,
            purse_account_id=purse_account_id(seq), issue_date=at.date(),
            expiry_date=_add_years(at.date(), self.settings.card_validity_years),
            changed_at=at.isoformat(), changed_at_ns=instant_ns(at), history_count=1,
            legacy_aliases=dict(aliases or {}), replaces=replaces,
        )
        stage.accounts.append({"id": card.purse_account_id, "ledger": LedgerId.PURSE, "code": AccountKind.CARD_PURSE,
                               "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS, "owner": seq})
        self._stage_card_rows(stage, card)
        stage.put_json(CARD_HISTORY, history_key(number, 1), _history_row(
            1, None, "issue", CardState.ORDERED, actor, channel, None, at))
        medical_unfrozen = self._stage_unfreeze_medical(stage, card, person)
        if audit:
            stage.audit(actor=actor, channel=channel, action="card.issue", subject=card.subject, at=at, details={
                "holder": holder, "kind": kind.value, "replaces": replaces, "legacy_aliases": dict(aliases or {}),
                "purse_account": f"{card.purse_account_id:032x}", "medical_account_unfrozen": medical_unfrozen})
        if channel is Channel.COUNTER:
            for event in PRODUCTION_EVENTS:
                card = self._stage_transition(stage, card, event, actor=actor, channel=channel, at=at, audit=audit)
        return card

    def _stage_card_rows(self, stage: Stage, card: Card) -> None:
        number = card.card_number.encode("ascii")
        stage.put_json(CARDS, number, card.to_json())
        stage.put(CARD_INDEX, b"holder:" + card.holder.encode("ascii") + b":" + number, b"")
        stage.put(CARD_INDEX, b"code:" + card.card_id_code.encode("ascii"), number)
        for technology, legacy in card.legacy_aliases.items():
            stage.put_json(CARD_INDEX, b"alias:" + legacy.encode("ascii"),
                           {"card_number": card.card_number, "technology": technology})
        stage.put(TIMERS, _expiry_key(card), b"")

    def _stage_unfreeze_medical(self, stage: Stage, card: Card, person: Person | None = None) -> bool:
        """A person's new card reaches the medical account at once: a freeze left by a written report
        on the old card is lifted in the same transaction."""
        if card.kind is not CardKind.INDIVIDUAL:
            return False
        if self.ledger.get(PERSONS, card.holder.encode("ascii")) is None:
            return False  # registered in this very unit of work: the account opens in it, unfrozen
        account_id = (person or self._staged_person(stage, card.holder)).medical_account_id
        if not self.account_frozen(account_id):
            return False
        stage.changes.append((account_id, ChangeAction.UNFREEZE))
        return True

    def _next_card_number(self, stage: Stage) -> str:
        # Numbers run A00000001 .. Z99999999; a number a migrated card already holds is skipped.
        for _ in range(CARD_NUMBER_TRIES_MAX):
            sequence = stage.next_seq("card_number")
            letter_index, digits = divmod(sequence, 10**8)
            if letter_index >= 26:
                raise RegistryError("card_number", "the card number range is exhausted",
                                    code=ErrorCode.FAILED_PRECONDITION)
            number = f"{chr(ord('A') + letter_index)}{digits:08d}"
            if stage.get(CARDS, number.encode("ascii")) is None:
                return number
        raise RegistryError("card_number", f"{CARD_NUMBER_TRIES_MAX} generated numbers in a row are taken",
                            code=ErrorCode.FAILED_PRECONDITION)

    def _stage_transition(self, stage: Stage, card: Card, event: CardEvent, *, actor: str, channel: Channel,
                          at: _dt.datetime, reason: str | None = None, updates: Mapping[str, Any] | None = None,
                          details: Mapping[str, Any] | None = None, audit: bool = True) -> Card:
        """Stage one lifecycle transition with everything that goes with it: the card row, its history,
        its timers, its denylist entry and the audit entry. Refused transitions raise, staging nothing
        that could be committed."""
        try:
            transition = lifecycle.apply(card.state, event, actor=actor, channel=channel, reason=reason, at=at)
        except ForbiddenTransition as exc:
            raise RegistryError("state", str(exc), subject=card.subject, code=ErrorCode.FAILED_PRECONDITION) from None
        except LifecycleInputError as exc:
            raise RegistryError(exc.field, exc.reason, subject=card.subject) from None
        at_ns = instant_ns(at)
        if at_ns < card.changed_at_ns:
            raise RegistryError("at", f"{at.isoformat()} is before the card's last change ({card.changed_at})",
                                subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
        changed = replace(card, state=transition.to_state, changed_at=at.isoformat(), changed_at_ns=at_ns,
                          history_count=card.history_count + 1, **(updates or {}))
        stage.put_json(CARD_HISTORY, history_key(card.card_number, changed.history_count), _history_row(
            changed.history_count, card.state, event.value, changed.state, actor, channel, transition.reason, at))
        self._stage_timers(stage, card, changed)
        version = denylist.stage_state(stage, card_number=card.card_number, card_id_code=card.card_id_code,
                                       state=changed.state, at=at)
        stage.put_json(CARDS, card.card_number.encode("ascii"), changed.to_json())
        if audit:
            stage.audit(actor=actor, channel=channel, action=f"card.{event.value}", subject=card.subject, at=at,
                        details={"from": card.state.value, "to": changed.state.value, "reason": transition.reason,
                                 "denylist_version": version, **(details or {})})
        return changed

    @staticmethod
    def _stage_timers(stage: Stage, before: Card, after: Card) -> None:
        stopped_key = b"stopped:" + after.card_number.encode("ascii")
        if after.state is CardState.STOPPED:
            stage.put(TIMERS, stopped_key, b"")
        elif before.state is CardState.STOPPED:
            stage.put(TIMERS, stopped_key, None)
        if after.state in (CardState.REPLACED, CardState.CANCELLED, CardState.EXPIRED):
            stage.put(TIMERS, _expiry_key(after), None)

    # -- settlement ---------------------------------------------------------------------------------

    def card_may_settle(self, card_number: str, at: _dt.datetime | int) -> tuple[bool, str]:
        """Whether a transaction of this card made at ``at`` (an aware datetime, or ns since the epoch
        as the ledger's timestamps are) may settle, and why.

        True only if the card was active at that instant. A loss report counts from the instant it was
        accepted: what was done before stands, from that instant on the card is refused."""
        try:
            number = normalise_card_number(card_number)
        except RegistryError as exc:
            return False, str(exc)
        if self._read(CARDS, number.encode("ascii")) is None:
            return False, f"card {number} is unknown"
        at_ns = at if isinstance(at, int) and not isinstance(at, bool) else instant_ns(as_instant(at))
        state_then = None
        for row in self.history(number):
            if row["at_ns"] > at_ns:
                break
            state_then = row
        if state_then is None:
            return False, f"card {number} was not issued yet at that time"
        if state_then["to"] == CardState.ACTIVE:
            return True, f"card {number} is active"
        return False, (f"card {number} is {state_then['to']} since {state_then['at']} "
                       f"({state_then['event']} through {state_then['channel']})")

    def credit_contribution(self, id_number: str, amount_fen: int, *, actor: str,
                            channel: Channel | str = Channel.BATCH, at: _dt.datetime | None = None) -> int:
        """Book the individual share of a medical contribution: FUND -> the person's medical account."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        person = self.person(id_number)
        amount = checked_amount(amount_fen)
        return self._book(at, actor, channel, "medical.contribution", person.subject, LedgerId.MEDICAL,
                          TransferCode.CONTRIBUTION, self.fund_account_id, person.medical_account_id, amount)

    def load_purse(self, card_number: str, amount_fen: int, *, actor: str,
                   channel: Channel | str = Channel.COUNTER, at: _dt.datetime | None = None) -> int:
        """Book a load of the card's e-purse shadow from the operator's load account."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        card = self.card(card_number)
        amount = checked_amount(amount_fen)
        may_settle, why = self.card_may_settle(card.card_number, at)
        if not may_settle:
            raise RegistryError("state", why, subject=card.subject, code=ErrorCode.FAILED_PRECONDITION)
        return self._book(at, actor, channel, "purse.load", card.subject, LedgerId.PURSE, TransferCode.LOAD,
                          self.load_account_id, card.purse_account_id, amount)

    def _book(self, at: _dt.datetime, actor: str, channel: Channel, action: str, subject: str, ledger: LedgerId,
              code: TransferCode, debit_id: int, credit_id: int, amount: int) -> int:
        stage = self._begin(at)
        booked_id = transfer_id(stage.next_seq("transfer"))
        stage.transfers.append({"id": booked_id, "debit_account_id": debit_id, "credit_account_id": credit_id,
                                    "amount": amount, "ledger": ledger, "code": code})
        stage.audit(actor=actor, channel=channel, action=action, subject=subject, at=at, details={
            "transfer": f"{booked_id:032x}", "amount_fen": amount, "debit_account": f"{debit_id:032x}",
            "credit_account": f"{credit_id:032x}"})
        stage.commit(action)
        return booked_id

    # -- denylist and audit -------------------------------------------------------------------------

    def denylist_version(self) -> int:
        return denylist.current_version(self.ledger)

    def denylist_delta(self, since: int = 0) -> denylist.DenylistDelta:
        return denylist.delta(self.ledger, since)

    def audit_entries(self, limit: int = -1) -> list[AuditEntry]:
        return [AuditEntry.from_bytes(value) for _, value in self.ledger.scan(AUDIT, limit=limit)]

    def audit_entry_count(self) -> int:
        return len(self.ledger.scan(AUDIT))

    def verify_audit(self) -> list[AuditProblem]:
        """Every problem in the stored audit log: edited, removed, reordered entries, and a log cut
        short of the head the registry recorded with its last commit."""
        anchor = self._read(META, AUDIT_HEAD_KEY)
        expected_head = None if anchor is None else (int(anchor["seq"]), str(anchor["hash"]))
        return AuditChain().verify(self.ledger.scan(AUDIT), expected_head=expected_head)

    def record_operator_action(self, action: str, subject: str, *, actor: str,
                               channel: Channel | str = Channel.COUNTER, details: Mapping[str, Any] | None = None,
                               at: _dt.datetime | None = None) -> None:
        """Audit an operator action that changes nothing else (showing an unmasked ID number, say)."""
        at = as_instant(at)
        channel = check_actor(actor, channel)
        stage = self._begin(at)
        stage.audit(actor=actor, channel=channel, action=action, subject=subject, at=at, details=details)
        stage.commit(action)

    # -- reading ------------------------------------------------------------------------------------

    def _read(self, table: str, key: bytes) -> dict[str, Any] | None:
        value = self.ledger.get(table, key)
        return None if value is None else decode(value, table, key)


class OrderedCard(NamedTuple):
    """What a production batch row takes from the card ordered for it."""

    card_number: str
    card_id_code: str
    issue_date: str  # YYYY-MM-DD
    expiry_date: str

    @classmethod
    def of(cls, card: Card) -> OrderedCard:
        return cls(card.card_number, card.card_id_code, card.issue_date.isoformat(), card.expiry_date.isoformat())


class BulkEnrolment:
    """Persons registered and their cards ordered, many in one unit of work: what
    ``stage_person(prechecked=True, audit=False)`` and ``stage_card(prechecked=True, audit=False)`` stage
    (the same rows, accounts in the same order, the same bytes: tests pin them), for a production batch
    of thousands. What every row shares is worked out once, not once a row: the instant and the actor's
    checks, the issue and expiry dates, the order's history row (the same bytes for every card), the
    records' fixed fields; a new person's record is written without building a Person, a card's without
    building a Card, and a person registered here is not looked up again when their card is ordered.

        bulk = registry.bulk_enrolment(stage, actor="op1", at=at)
        if not bulk.register(id_number=..., name=..., ...):   # registered before: update them instead
            ...
        card = bulk.order_card(id_number)                      # an OrderedCard

    The caller has checked what ``prechecked`` says (the ID number and the name; the holder's cards)."""

    def __init__(self, registry: Registry, stage: Stage, *, actor: str, channel: Channel | str,
                 at: _dt.datetime) -> None:
        at = as_instant(at)
        self._channel = check_actor(actor, channel)
        if self._channel is Channel.COUNTER:
            raise RegistryError("channel", "a counter makes a card on the spot; bulk orders go to production")
        self._registry, self._stage, self._actor, self._at = registry, stage, actor, at
        self._registered_here: set[str] = set()  # no frozen medical account to lift for these
        issue_date = at.date()
        expiry_date = _add_years(issue_date, registry.settings.card_validity_years)
        self._card_id_prefix = f"{registry.settings.issuer_region_code}{CARD_ID_RID}"
        self._history = encode(_history_row(1, None, "issue", CardState.ORDERED, actor, self._channel, None, at))
        self._expiry_prefix = b"expires:" + expiry_date.isoformat().encode("ascii") + b":"
        # The fixed fields of the records, as their to_json writes them; each row sets the rest.
        self._person_fields = Person(
            id_number="", name="", gender=Gender.MALE, date_of_birth=issue_date, nationality="", residence="",
            household_registration="", employer=None, status=PersonStatus.EMPLOYED, categories=(), seq=0,
            medical_account_id=0, registered_at=at.isoformat()).to_json()
        self._card_fields = Card(
            card_number="", card_id_code="", kind=CardKind.INDIVIDUAL, technology=Technology.CPU, holder="",
            state=CardState.ORDERED, seq=0, purse_account_id=0, issue_date=issue_date, expiry_date=expiry_date,
            changed_at=at.isoformat(), changed_at_ns=instant_ns(at), history_count=1).to_json()
        self._card_dates = (issue_date.isoformat(), expiry_date.isoformat())

    def register(self, *, id_number: str, name: str, date_of_birth: _dt.date | str, residence: str,
                 household_registration: str, status: PersonStatus | str, nationality: str = NATIONALITY_DEFAULT,
                 employer: str | None = None) -> bool:
        """Register a new person with their medical account, as ``stage_person(prechecked=True)`` does;
        False, staging nothing, when the person is registered already (committed or in this unit)."""
        birth = _parse_date(date_of_birth, "date_of_birth")
        number, gender = _prechecked_citizen_id(id_number)
        if not isinstance(name, str):
            raise RegistryError("name", "a prechecked name must be text", subject=f"person {mask_id(number)}")
        key = number.encode("ascii")
        stage = self._stage
        if stage.get(PERSONS, key) is not None:
            return False
        subject = f"person {mask_id(number)}"
        if type(status) is not PersonStatus:  # a member given is taken as it is: a bulk passes one for all
            status = parse_enum(PersonStatus, status, "status", subject)
        unit_code = self._registry._check_person_employer(employer, status, subject)
        seq = stage.next_seq("person")
        account_id = medical_account_id(seq)
        record = {**self._person_fields, "id_number": number, "name": name, "gender": gender,
                  "date_of_birth": birth.isoformat(), "nationality": _nationality(nationality, subject),
                  "residence": check_text(residence, "residence", subject=subject),
                  "household_registration": check_text(household_registration, "household_registration",
                                                       subject=subject),
                  "employer": unit_code, "status": status, "seq": seq, "medical_account_id": str(account_id)}
        stage.accounts.append({"id": account_id, "ledger": LedgerId.MEDICAL, "code": AccountKind.PERSON_MEDICAL,
                               "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS, "owner": seq})
        stage.put(PERSONS, key, encode_plain(record))
        self._registered_here.add(number)
        return True

    def order_card(self, holder: Person | str) -> OrderedCard:
        """Order a card for a person registered before or in this unit (the caller has read their cards
        and found none that is not retired), as ``stage_card(prechecked=True)`` does."""
        number_of_holder = holder.id_number if isinstance(holder, Person) else holder
        if number_of_holder not in self._registered_here:
            # Registered before this unit: their medical account may be frozen (a written loss report).
            return OrderedCard.of(self._registry.stage_card(
                self._stage, holder, actor=self._actor, channel=self._channel, at=self._at, audit=False,
                prechecked=True))
        stage = self._stage
        seq = stage.next_seq("card")
        number = self._registry._next_card_number(stage)  # a number no card holds, committed or staged
        card_id_code = f"{self._card_id_prefix}{seq:016X}"
        account_id = purse_account_id(seq)
        key = number.encode("ascii")
        stage.accounts.append({"id": account_id, "ledger": LedgerId.PURSE, "code": AccountKind.CARD_PURSE,
                               "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS, "owner": seq})
        stage.put(CARDS, key, encode_plain({**self._card_fields, "card_number": number, "card_id_code": card_id_code,
                                            "holder": number_of_holder, "seq": seq,
                                            "purse_account_id": str(account_id)}))
        stage.put(CARD_INDEX, b"holder:" + number_of_holder.encode("ascii") + b":" + key, b"")
        stage.put(CARD_INDEX, b"code:" + card_id_code.encode("ascii"), key)
        stage.put(TIMERS, self._expiry_prefix + key, b"")
        stage.put(CARD_HISTORY, history_key(number, 1), self._history)
        return OrderedCard(number, card_id_code, *self._card_dates)


def _parse_date(value: _dt.date | str, field_name: str) -> _dt.date:
    if isinstance(value, _dt.datetime):
        raise RegistryError(field_name, "must be a date, not an instant")
    if isinstance(value, _dt.date):
        return value
    if isinstance(value, str) and len(value.strip()) == len("YYYY-MM-DD"):
        try:
            return _dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise RegistryError(field_name, f"{value!r} is not a date written YYYY-MM-DD")


def _prechecked_citizen_id(id_number: str) -> tuple[str, Gender]:
    """A citizen ID the caller validated (``stage_person(prechecked=True)``) and the gender its
    sequence digits give, as ``validate_citizen_id`` derives it. Its shape is still asserted: a caller's
    mistake must not become a key."""
    if not (isinstance(id_number, str) and len(id_number) == CITIZEN_ID_LENGTH and id_number.isascii()
            and id_number[:-1].isdigit() and (id_number[-1].isdigit() or id_number[-1] == "X")):
        raise RegistryError("id_number", "a prechecked citizen ID must be 17 digits and a digit or X",
                            subject=f"person {mask_id(str(id_number))}")
    return id_number, Gender.MALE if int(id_number[14:17]) % 2 == 1 else Gender.FEMALE


def _nationality(value: str, subject: str) -> str:
    code = value.strip().upper() if isinstance(value, str) else ""
    if len(code) != 3 or not (code.isascii() and code.isalpha()):
        raise RegistryError("nationality", f"{value!r} is not an ISO 3166 three-letter country code", subject=subject)
    return code


def _add_years(day: _dt.date, years: int) -> _dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February into a common year
        return day.replace(year=day.year + years, day=28)


def _expiry_key(card: Card) -> bytes:
    return b"expires:" + card.expiry_date.isoformat().encode("ascii") + b":" + card.card_number.encode("ascii")


def _history_row(seq: int, from_state: CardState | None, event: str, to_state: CardState, actor: str,
                 channel: Channel, reason: str | None, at: _dt.datetime) -> dict[str, Any]:
    return {"seq": seq, "from": None if from_state is None else from_state.value, "event": event,
            "to": to_state.value, "actor": actor, "channel": channel.value, "reason": reason,
            "at": at.isoformat(), "at_ns": instant_ns(at)}


def _lock(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RegistryError("data", f"{data_dir} is in use by another citycard process; try again",
                            code=ErrorCode.FAILED_PRECONDITION) from None
    return fd
