"""The registry's records (persons, employers, cards, PIN reset requests), their vocabulary, and the
one exception family of the registry. Pure: no storage; core/registry_store.py keeps them.

Every record is stored as one JSON object (UTF-8, ``ensure_ascii=False``, sorted keys) and read back
through ``from_json``, which checks it again: what comes back from disk is not trusted blindly.
Citizen ID numbers are stored whole (the registry is where they belong) and leave it masked unless
an operator asks otherwise (``public`` views).
"""

from __future__ import annotations

import datetime as _dt
import enum
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from citycard.core import clock
from citycard.core.identity import Gender, IdentityError, mask_id, validate_citizen_id, validate_unit_code
from citycard.core.lifecycle import ACTOR_LENGTH_MAX, SYSTEM_ACTOR, CardState, Channel

__all__ = [
    "CARD_NUMBER_LENGTH",
    "CancelReason",
    "Card",
    "CardKind",
    "Category",
    "Employer",
    "ErrorCode",
    "LossReport",
    "Person",
    "PersonStatus",
    "PinReset",
    "PinResetState",
    "RegistryError",
    "Technology",
    "as_instant",
    "check_actor",
    "check_text",
    "checked_amount",
    "checked_citizen_id",
    "checked_unit_code",
    "from_identity_error",
    "normalise_card_number",
    "normalise_legacy_number",
    "stored_record",
]

CARD_NUMBER_LENGTH = 9
CARD_ID_CODE_BYTES = 16
LEGACY_NUMBER_LENGTH_MIN = 4
LEGACY_NUMBER_LENGTH_MAX = 32
TEXT_LENGTH_MAX = 100  # residence, household registration, employer names, notes
MASKED_DATE = "****-**-**"
_Record = TypeVar("_Record")
AMOUNT_FEN_MAX = 10**11  # one booking of a billion yuan is a typo, not a contribution


class ErrorCode(enum.StrEnum):
    """What kind of refusal a RegistryError is; the gRPC layer maps these to status codes in one place."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"  # e.g. a forbidden lifecycle transition
    UNAUTHENTICATED = "unauthenticated"  # self-service credentials wrong or locked
    ABORTED = "aborted"  # the ledger refused the batch; nothing was kept


class RegistryError(ValueError):
    """A registry operation was refused and changed nothing.

    ``field`` names the input or the property that is wrong, ``subject`` what it concerns (a card, a
    person with the ID number masked), ``reason`` how; the message never holds a secret or a whole ID.
    """

    def __init__(self, field: str, reason: str, *, subject: str = "",
                 code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
        self.field = field
        self.reason = reason
        self.subject = subject
        self.code = code
        prefix = f"{subject}: " if subject else ""
        super().__init__(f"{prefix}{field}: {reason}")


class PersonStatus(enum.StrEnum):
    EMPLOYED = "employed"
    FLEXIBLY_EMPLOYED = "flexibly_employed"
    UNEMPLOYED = "unemployed"
    RETIRED = "retired"
    CHILD = "child"
    LOW_INCOME = "low_income"


class Category(enum.StrEnum):
    """Categories that concessions (fares, fees) are granted for."""

    SENIOR = "senior"
    STUDENT = "student"
    DISABLED = "disabled"


class CardKind(enum.StrEnum):
    INDIVIDUAL = "individual"  # held by a person: medical account, e-purse
    EMPLOYER = "employer"  # held by an insured unit for its own business: e-purse only


class Technology(enum.StrEnum):
    CPU = "cpu"  # every card the registry issues
    BARCODE = "barcode"  # legacy: kept as an alias of the CPU card that took its place
    MAGSTRIPE = "magstripe"  # legacy, likewise


LEGACY_TECHNOLOGIES = (Technology.BARCODE, Technology.MAGSTRIPE)


class CancelReason(enum.StrEnum):
    DEATH = "death"
    EMIGRATION = "emigration"
    DUPLICATE = "duplicate"


class PinResetState(enum.StrEnum):
    REQUESTED = "requested"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


def parse_enum(kind: type[enum.StrEnum], value: Any, field_name: str, subject: str = "") -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise RegistryError(field_name, f"{value!r} is not one of {choices}", subject=subject) from None


def as_instant(at: _dt.datetime | None) -> _dt.datetime:
    """The instant of an operation: ``at`` in city time, or now from the one clock."""
    instant = clock.now() if at is None else at
    if not isinstance(instant, _dt.datetime) or instant.tzinfo is None:
        raise RegistryError("at", "must be an aware datetime (with a zone)")
    return instant.astimezone(clock.CITY_ZONE)


def check_actor(actor: str, channel: Channel | str) -> Channel:
    """Who acts, through which channel; the system actor and the system channel go together."""
    channel = parse_enum(Channel, channel, "channel")
    if not isinstance(actor, str) or not actor.strip() or len(actor) > ACTOR_LENGTH_MAX:
        raise RegistryError("actor", f"must be a non-empty name of at most {ACTOR_LENGTH_MAX} characters")
    if (actor == SYSTEM_ACTOR) != (channel is Channel.SYSTEM):
        raise RegistryError("actor", f"only the {SYSTEM_ACTOR!r} actor uses the system channel, and it uses no other")
    return channel


def from_identity_error(exc: IdentityError) -> RegistryError:
    return RegistryError(exc.field, exc.reason, subject=exc.subject)


def checked_citizen_id(text: Any, field_name: str = "id_number") -> str:
    """A citizen ID given to find someone: checked for shape and check character, any birth date."""
    if not isinstance(text, str):
        raise RegistryError(field_name, "must be text")
    try:
        return validate_citizen_id(text, today=_dt.date.max).number
    except IdentityError as exc:
        field_of_number = field_name if exc.field in ("length", "characters") else exc.field
        raise RegistryError(field_of_number, exc.reason, subject=exc.subject) from None


def checked_unit_code(text: Any) -> str:
    if not isinstance(text, str):
        raise RegistryError("unit_code", "must be text")
    try:
        return validate_unit_code(text).code
    except IdentityError as exc:
        raise RegistryError("unit_code", exc.reason, subject=f"employer {exc.subject}".strip()) from None


def checked_amount(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= AMOUNT_FEN_MAX:
        raise RegistryError("amount_fen", f"{value!r} must be a whole number of fen from 1 to {AMOUNT_FEN_MAX}")
    return value


def check_text(value: Any, field_name: str, *, required: bool = True, subject: str = "") -> str:
    """Free text of the registry (addresses, names of units, notes): stripped, at most 100 characters,
    no control characters, and writable in GBK, the card's character set."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RegistryError(field_name, f"must be text, not {type(value).__name__}", subject=subject)
    text = value.strip()
    if required and not text:
        raise RegistryError(field_name, "is empty", subject=subject)
    if len(text) > TEXT_LENGTH_MAX:
        raise RegistryError(field_name, f"has {len(text)} characters, at most {TEXT_LENGTH_MAX} are allowed",
                            subject=subject)
    if text.isprintable() and _encodes_in_gbk(text):
        return text  # the common case, checked whole; the loop below finds the character that is wrong
    for position, char in enumerate(text, start=1):
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise RegistryError(field_name, f"character {position} (U+{ord(char):04X}) is a control character",
                                subject=subject)
        try:
            char.encode("gbk")
        except UnicodeEncodeError:
            raise RegistryError(field_name, f"character {position} (U+{ord(char):04X}) cannot be written in GBK",
                                subject=subject) from None
    return text


def _encodes_in_gbk(text: str) -> bool:
    try:
        text.encode("gbk")
    except UnicodeEncodeError:
        return False
    return True


def normalise_card_number(value: Any) -> str:
    """A card number as stored: 9 characters, digits and upper-case letters."""
    if not isinstance(value, str):
        raise RegistryError("card_number", f"must be text, not {type(value).__name__}")
    number = value.strip().upper()
    if len(number) != CARD_NUMBER_LENGTH or not (number.isascii() and number.isalnum()):
        raise RegistryError("card_number", f"{number!r} is not a card number ({CARD_NUMBER_LENGTH} letters or digits)")
    return number


def normalise_legacy_number(value: Any, technology: Technology) -> str:
    """A legacy bar-code or magnetic-stripe card number: 4 to 32 digits or upper-case letters."""
    field_name = f"legacy_{technology.value}"
    if not isinstance(value, str):
        raise RegistryError(field_name, f"must be text, not {type(value).__name__}")
    number = value.strip().upper()
    if not (LEGACY_NUMBER_LENGTH_MIN <= len(number) <= LEGACY_NUMBER_LENGTH_MAX) or not (
        number.isascii() and number.isalnum()
    ):
        raise RegistryError(field_name, f"{number!r} must be {LEGACY_NUMBER_LENGTH_MIN} to "
                                        f"{LEGACY_NUMBER_LENGTH_MAX} letters or digits")
    return number


def stored_record(kind: type[_Record], record: dict[str, Any], where: str) -> _Record:
    """A record read back from disk, checked by its ``from_json``; a row that does not fit is an error
    naming where it lies, never a half-read record."""
    try:
        return kind.from_json(record)  # type: ignore[attr-defined, no-any-return]
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError("stored_row", f"{where} is not a valid {kind.__name__} ({exc})",
                            code=ErrorCode.FAILED_PRECONDITION) from None


def _shallow_fields(record: Any) -> dict[str, Any]:
    """A record's fields by name, one level deep: ``asdict`` copies recursively, which costs a bulk
    import of a hundred thousand rows seconds; the ``to_json`` methods convert the nested values.
    The names of a record class's fields are read once (``fields`` builds them anew at every call)."""
    kind = type(record)
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(item.name for item in fields(record))
    return {name: getattr(record, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # record class -> its field names (a handful of classes)


@dataclass(frozen=True)
class Employer:
    unit_code: str
    name: str
    registered_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Employer:
        return cls(**record)


@dataclass(frozen=True)
class Person:
    id_number: str  # the social security number: the 18-character citizen ID
    name: str
    gender: Gender
    date_of_birth: _dt.date
    nationality: str  # ISO 3166-1 alpha-3
    residence: str
    household_registration: str
    employer: str | None  # the insured unit's unit code
    status: PersonStatus
    categories: tuple[Category, ...]
    seq: int  # registry number; the medical account id is derived from it
    medical_account_id: int
    registered_at: str

    @property
    def masked_id(self) -> str:
        return mask_id(self.id_number)

    @property
    def subject(self) -> str:
        return f"person {self.masked_id}"

    def to_json(self) -> dict[str, Any]:
        record = _shallow_fields(self)
        record["date_of_birth"] = self.date_of_birth.isoformat()
        record["categories"] = [category.value for category in self.categories]
        record["medical_account_id"] = str(self.medical_account_id)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Person:
        values = dict(record)
        values["gender"] = Gender(values["gender"])
        values["date_of_birth"] = _dt.date.fromisoformat(values["date_of_birth"])
        values["status"] = PersonStatus(values["status"])
        values["categories"] = tuple(Category(category) for category in values["categories"])
        values["medical_account_id"] = int(values["medical_account_id"])
        return cls(**values)

    def public(self, *, unmask: bool = False) -> dict[str, Any]:
        """The person as commands show it: the ID number and the birth date (which the masked middle of
        the ID number is) only when unmasked."""
        record = self.to_json()
        if not unmask:
            record["id_number"] = self.masked_id
            record["date_of_birth"] = MASKED_DATE
        record["medical_account_id"] = f"{self.medical_account_id:032x}"
        del record["seq"]
        return record


@dataclass(frozen=True)
class LossReport:
    """The report that stopped or froze a card. ``accepted_at`` fixes liability."""

    channel: str  # phone, online, written
    accepted_at: str  # ISO 8601 with offset
    accepted_at_ns: int
    actor: str
    restore_workdays: int | None = None  # N in force when a phone or online report was accepted
    restore_deadline: str | None = None  # the day at whose end the card is restored, as computed then
    agent_id: str | None = None  # a written report made on the holder's behalf
    agent_name: str | None = None
    previous: LossReport | None = None  # the phone or online report a written report followed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any] | None) -> LossReport | None:
        if record is None:
            return None
        values = dict(record)
        values["previous"] = cls.from_json(values.get("previous"))
        return cls(**values)

    def public(self, *, unmask: bool = False) -> dict[str, Any]:
        record = self.to_json()
        if self.agent_id and not unmask:
            record["agent_id"] = mask_id(self.agent_id)
        if self.previous is not None:
            record["previous"] = self.previous.public(unmask=unmask)
        del record["accepted_at_ns"]
        return record


@dataclass(frozen=True)
class Card:
    card_number: str
    card_id_code: str  # 16 bytes as 32 upper-case hex digits; the first 6 are the issuing region
    kind: CardKind
    technology: Technology
    holder: str  # a citizen ID (individual card) or a unit code (employer card)
    state: CardState
    seq: int  # registry number; the e-purse account id is derived from it
    purse_account_id: int
    issue_date: _dt.date
    expiry_date: _dt.date
    changed_at: str  # the instant of the last transition
    changed_at_ns: int
    history_count: int  # transitions recorded so far, the key of the next one
    legacy_aliases: dict[str, str] = field(default_factory=dict)  # technology -> legacy number
    loss_report: LossReport | None = None
    replaces: str | None = None
    replaced_by: str | None = None
    cancel_reason: str | None = None
    open_pin_reset: int | None = None  # the id of a PIN reset request not yet completed

    @property
    def subject(self) -> str:
        return f"card {self.card_number}"

    def to_json(self) -> dict[str, Any]:
        record = _shallow_fields(self)
        record["legacy_aliases"] = dict(self.legacy_aliases)
        record["issue_date"] = self.issue_date.isoformat()
        record["expiry_date"] = self.expiry_date.isoformat()
        record["purse_account_id"] = str(self.purse_account_id)
        record["loss_report"] = None if self.loss_report is None else self.loss_report.to_json()
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Card:
        values = dict(record)
        values["kind"] = CardKind(values["kind"])
        values["technology"] = Technology(values["technology"])
        values["state"] = CardState(values["state"])
        values["purse_account_id"] = int(values["purse_account_id"])
        values["issue_date"] = _dt.date.fromisoformat(values["issue_date"])
        values["expiry_date"] = _dt.date.fromisoformat(values["expiry_date"])
        values["loss_report"] = LossReport.from_json(values.get("loss_report"))
        return cls(**values)

    def public(self, *, unmask: bool = False) -> dict[str, Any]:
        record = self.to_json()
        if self.kind is CardKind.INDIVIDUAL and not unmask:
            record["holder"] = mask_id(self.holder)
        record["purse_account_id"] = f"{self.purse_account_id:032x}"
        record["loss_report"] = None if self.loss_report is None else self.loss_report.public(unmask=unmask)
        for internal in ("seq", "changed_at_ns", "history_count"):
            del record[internal]
        return record


@dataclass(frozen=True)
class PinReset:
    """A holder's request to reset the card's PIN; the chip side completes it at a terminal."""

    request_id: int
    card_number: str
    state: PinResetState
    requested_at: str
    actor: str
    channel: str
    closed_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PinReset:
        values = dict(record)
        values["state"] = PinResetState(values["state"])
        return cls(**values)
