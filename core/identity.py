"""Who a person or an employer is: citizen ID numbers, names and unit codes, checked on the way in.

A person is identified by the social security number, which is the 18-character citizen ID of
GB 11643-1999::

    370102 19800501 123 X
    region  birth    seq check

- region: 6 digits; the first two are a province-level code (the list below, the real one);
- birth date: YYYYMMDD, a real date, not before 1900-01-01 and not after "today";
- sequence: 3 digits, odd for men and even for women;
- check character: ISO 7064 MOD 11-2 over the first 17 digits, 0-9 or X (lower-case x is read as X).

An employer (insured unit) is identified by its 18-character unified social credit code of
GB 32100-2015, which carries its own MOD 31 check character.

Every error names the field that is wrong and shows an ID number only masked (first 6 and last 4
characters), so the messages are safe for logs and command output.
"""

from __future__ import annotations

import datetime as _dt
import enum
import unicodedata
from dataclasses import dataclass, field

from citycard.core import clock

__all__ = [
    "CitizenId",
    "Gender",
    "IdentityError",
    "UnitCode",
    "check_character",
    "mask_id",
    "unit_check_character",
    "validate_citizen_id",
    "validate_name",
    "validate_unit_code",
]

CITIZEN_ID_LENGTH = 18
BIRTH_DATE_MIN = _dt.date(1900, 1, 1)

# Province-level codes of GB/T 2260, the first two digits of every region code. 71 (Taiwan), 81 (Hong
# Kong), 82 (Macao) and 83 (residence permits of Taiwan residents on the mainland) appear on residence
# permits, which carry the same 18-character number.
PROVINCE_CODES = frozenset(
    {"11", "12", "13", "14", "15"}
    | {"21", "22", "23"}
    | {"31", "32", "33", "34", "35", "36", "37"}
    | {"41", "42", "43", "44", "45", "46"}
    | {"50", "51", "52", "53", "54"}
    | {"61", "62", "63", "64", "65"}
    | {"71", "81", "82", "83"}
)

# ISO 7064 MOD 11-2: weight of position i (0-based, left to right) is 2**(17 - i) mod 11.
_ID_WEIGHTS = tuple(pow(2, CITIZEN_ID_LENGTH - 1 - i, 11) for i in range(CITIZEN_ID_LENGTH - 1))
_ID_CHECK_CHARACTERS = "10X98765432"  # indexed by (sum of weighted digits) mod 11

# Masking keeps the region (first 6) and the tail (last 4) of a full-length number.
MASK_HEAD_KEPT = 6
MASK_TAIL_KEPT = 4
MASK_CHARACTER = "*"

NAME_LENGTH_MAX = 30
MIDDLE_DOT = "\u00b7"  # '·', the separator of transliterated minority and foreign names
# Characters people type in place of the middle dot; they are read as the middle dot.
_MIDDLE_DOT_LOOKALIKES = {ord(char): MIDDLE_DOT for char in "\u2022\u30fb\u2027\u22c5"}  # • ・ ‧ ⋅

UNIT_CODE_LENGTH = 18
# GB 32100-2015: the 31 characters of the code (no I, O, S, V, Z), and the weight of each of the first
# 17 positions, 3**i mod 31.
UNIT_CODE_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_UNIT_WEIGHTS = tuple(pow(3, i, len(UNIT_CODE_ALPHABET)) for i in range(UNIT_CODE_LENGTH - 1))
_UNIT_REGION_SLICE = slice(2, 8)


class IdentityError(ValueError):
    """An identity value is wrong; ``field`` says which part, ``reason`` says how.

    Fields of a citizen ID: ``length``, ``characters``, ``region``, ``birth_date`` (the date inside the
    number), ``check_character``, and the two declared values it is compared with, ``date_of_birth``
    and ``gender``. Names use ``name``; unit codes use ``unit_code``.
    """

    def __init__(self, field: str, reason: str, *, subject: str = "") -> None:
        self.field = field
        self.reason = reason
        self.subject = subject  # already masked where it is an ID number
        prefix = f"{subject}: " if subject else ""
        super().__init__(f"{prefix}{field}: {reason}")


class Gender(enum.StrEnum):
    MALE = "male"
    FEMALE = "female"


def mask_id(text: str) -> str:
    """``text`` with all but its first 6 and last 4 characters replaced by '*'.

    A text shorter than a full ID number (a typo, a truncated field) keeps at most a quarter of its
    length at each end, so a short text is never shown whole.
    """
    length = len(text)
    if length >= CITIZEN_ID_LENGTH:
        head, tail = MASK_HEAD_KEPT, MASK_TAIL_KEPT
    else:
        head = min(MASK_HEAD_KEPT, length // 4)
        tail = min(MASK_TAIL_KEPT, length // 4)
    hidden = length - head - tail
    return text[:head] + MASK_CHARACTER * hidden + text[length - tail :]


def check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character ('0'-'9' or 'X') of the first 17 digits of a citizen ID."""
    if len(first17) != CITIZEN_ID_LENGTH - 1 or not _is_ascii_digits(first17):
        raise IdentityError(
            "characters", f"need exactly {CITIZEN_ID_LENGTH - 1} digits 0-9", subject=_id_subject(first17)
        )
    weighted_sum = sum(int(digit) * weight for digit, weight in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK_CHARACTERS[weighted_sum % 11]


@dataclass(frozen=True)
class CitizenId:
    """A checked citizen ID. Its repr shows the number masked, so it may be logged."""

    number: str = field(repr=False)  # normalised: 18 characters, upper-case X
    region: str
    birth_date: _dt.date = field(repr=False)
    gender: Gender

    @property
    def masked(self) -> str:
        return mask_id(self.number)

    @property
    def province(self) -> str:
        return self.region[:2]

    def __repr__(self) -> str:
        return f"CitizenId({self.masked}, region={self.region}, gender={self.gender.value})"

    def __str__(self) -> str:
        return self.masked


def validate_citizen_id(
    text: str,
    *,
    date_of_birth: _dt.date | None = None,
    gender: Gender | str | None = None,
    today: _dt.date | None = None,
) -> CitizenId:
    """Check ``text`` as a citizen ID and, when given, against the declared date of birth and gender.

    Surrounding whitespace is ignored and a lower-case x is read as X. ``today`` (default: the city's
    date from the clock) bounds the birth date. Raises IdentityError naming the first wrong field, in
    the order length, characters, region, birth_date, check_character, date_of_birth, gender.
    """
    number = _normalise_id(text)
    subject = _id_subject(number)
    _check_id_shape(number, subject)
    region = _check_region(number, subject)
    birth_date = _check_birth_date(number, subject, today if today is not None else clock.today())
    if check_character(number[:-1]) != number[-1]:
        raise IdentityError(
            "check_character", "check character does not match the other 17 digits", subject=subject
        )
    holder_gender = Gender.MALE if int(number[14:17]) % 2 == 1 else Gender.FEMALE
    if date_of_birth is not None and date_of_birth != birth_date:
        raise IdentityError(
            "date_of_birth", "does not match the birth date in the ID number", subject=subject
        )
    if gender is not None and _parse_gender(gender, subject) != holder_gender:
        raise IdentityError("gender", "does not match the sequence digits of the ID number", subject=subject)
    return CitizenId(number=number, region=region, birth_date=birth_date, gender=holder_gender)


def _normalise_id(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"a citizen ID is a str, not {type(text).__name__}")
    number = text.strip()
    if number.endswith("x"):
        number = number[:-1] + "X"
    return number


def _id_subject(number: str) -> str:
    return f"citizen ID {mask_id(number)}"


def _check_id_shape(number: str, subject: str) -> None:
    if len(number) != CITIZEN_ID_LENGTH:
        raise IdentityError(
            "length", f"has {len(number)} characters, a citizen ID has {CITIZEN_ID_LENGTH}", subject=subject
        )
    body, last = number[:-1], number[-1]
    if not _is_ascii_digits(body):
        position = next(i for i, char in enumerate(body) if not _is_ascii_digits(char)) + 1
        raise IdentityError("characters", f"character {position} is not a digit 0-9", subject=subject)
    if not (_is_ascii_digits(last) or last == "X"):
        raise IdentityError("characters", "the last character is neither a digit 0-9 nor X", subject=subject)


def _check_region(number: str, subject: str) -> str:
    region = number[:6]
    if region[0] not in "12345678":
        raise IdentityError("region", f"region code {region} must start with a digit 1 to 8", subject=subject)
    if region[:2] not in PROVINCE_CODES:
        raise IdentityError(
            "region", f"region code {region} does not start with a province-level code", subject=subject
        )
    return region


def _check_birth_date(number: str, subject: str, today: _dt.date) -> _dt.date:
    # The date itself sits in the masked part of the number, so messages say what is wrong, not the date.
    digits = number[6:14]
    try:
        birth_date = _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise IdentityError("birth_date", "is not a real calendar date", subject=subject) from None
    if birth_date < BIRTH_DATE_MIN:
        raise IdentityError("birth_date", f"is before {BIRTH_DATE_MIN.isoformat()}", subject=subject)
    if birth_date > today:
        raise IdentityError("birth_date", f"is after today ({today.isoformat()})", subject=subject)
    return birth_date


def _parse_gender(gender: Gender | str, subject: str) -> Gender:
    try:
        return Gender(gender)
    except ValueError:
        raise IdentityError("gender", f"{gender!r} is neither 'male' nor 'female'", subject=subject) from None


def _is_ascii_digits(text: str) -> bool:
    # str.isdigit() also accepts full-width and other Unicode digits, which an ID number never holds.
    return text.isascii() and text.isdigit()


def validate_name(text: str) -> str:
    """A person's name as printed on the card, checked and returned without surrounding whitespace.

    A name is 1 to 30 characters, representable in GBK (the card's character set), without control
    or format characters. The middle dot of minority and foreign names is allowed between parts, and
    its common look-alikes ('•', '・', '‧', '⋅') are read as it.
    """
    if not isinstance(text, str):
        raise TypeError(f"a name is a str, not {type(text).__name__}")
    name = text.strip().translate(_MIDDLE_DOT_LOOKALIKES)
    if not name:
        raise IdentityError("name", "is empty")
    if len(name) > NAME_LENGTH_MAX:
        raise IdentityError("name", f"has {len(name)} characters, at most {NAME_LENGTH_MAX} are allowed")
    for position, char in enumerate(name, start=1):
        _check_name_character(position, char)
    if name.startswith(MIDDLE_DOT) or name.endswith(MIDDLE_DOT) or MIDDLE_DOT * 2 in name:
        raise IdentityError(
            "name", "the middle dot '\u00b7' may only stand alone between two parts of a name"
        )
    return name


def _check_name_character(position: int, char: str) -> None:
    code_point = f"U+{ord(char):04X}"
    if unicodedata.category(char) in ("Cc", "Cf"):
        raise IdentityError("name", f"character {position} ({code_point}) is a control character")
    try:
        char.encode("gbk")
    except UnicodeEncodeError:
        raise IdentityError("name", f"character {position} ({code_point}) cannot be written in GBK") from None


@dataclass(frozen=True)
class UnitCode:
    """A checked unified social credit code of an employer (insured unit)."""

    code: str
    registration_authority: str  # position 1, e.g. 9 = market regulation (companies)
    institution_type: str  # position 2, e.g. 1 = enterprise
    region: str  # positions 3-8, the registering administration's region code


def unit_check_character(first17: str) -> str:
    """The GB 32100-2015 check character of the first 17 characters of a unified social credit code."""
    if len(first17) != UNIT_CODE_LENGTH - 1 or any(char not in UNIT_CODE_ALPHABET for char in first17):
        raise IdentityError(
            "unit_code",
            f"need exactly {UNIT_CODE_LENGTH - 1} characters of {UNIT_CODE_ALPHABET}",
            subject=first17,
        )
    modulus = len(UNIT_CODE_ALPHABET)
    weighted_sum = sum(
        UNIT_CODE_ALPHABET.index(char) * weight for char, weight in zip(first17, _UNIT_WEIGHTS, strict=True)
    )
    return UNIT_CODE_ALPHABET[(modulus - weighted_sum % modulus) % modulus]


def validate_unit_code(text: str) -> UnitCode:
    """Check ``text`` as an 18-character unified social credit code (GB 32100-2015); nothing else is accepted.

    Surrounding whitespace is ignored and lower-case letters are read as upper-case. The older 9- and
    15-character organisation and registration numbers are refused: every unit has had a credit code
    since 2017, and one form keeps the registry free of duplicates.
    """
    if not isinstance(text, str):
        raise TypeError(f"a unit code is a str, not {type(text).__name__}")
    code = text.strip().upper()
    if len(code) != UNIT_CODE_LENGTH:
        raise IdentityError(
            "unit_code",
            f"has {len(code)} characters, a unified social credit code has {UNIT_CODE_LENGTH}",
            subject=code,
        )
    for position, char in enumerate(code, start=1):
        if char not in UNIT_CODE_ALPHABET:
            raise IdentityError(
                "unit_code",
                f"character {position} ({char!r}) is not one of {UNIT_CODE_ALPHABET}",
                subject=code,
            )
    region = code[_UNIT_REGION_SLICE]
    if not _is_ascii_digits(region):
        raise IdentityError(
            "unit_code", f"region code {region} (characters 3-8) must be 6 digits", subject=code
        )
    if unit_check_character(code[:-1]) != code[-1]:
        raise IdentityError(
            "unit_code", "check character does not match the other 17 characters", subject=code
        )
    return UnitCode(code=code, registration_authority=code[0], institution_type=code[1], region=region)
