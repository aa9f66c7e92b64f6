"""Medical insurance policy parameters, versioned by effective date (a city changes them yearly).

All money is integer fen; all rates are integer per mille (1000 = 100 %), so no float ever touches money.
A ``PolicyBook`` holds the versions; ``PolicyBook.at(day)`` is the version in force on that day (the latest
one whose ``effective_from`` is on or before it). A bill is split with the version in force on its date.

The catalogue (drugs and services by code) is part of a version: an item's category is the catalogue's,
never the institution's say.
"""

from __future__ import annotations

import datetime as _dt
import enum
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_POLICY_BOOK",
    "PER_MILLE",
    "CatalogueEntry",
    "Category",
    "HospitalLevel",
    "Policy",
    "PolicyBook",
    "PolicyError",
]

PER_MILLE = 1000


class PolicyError(ValueError):
    """A policy parameter or a look-up in the policy is wrong; the message names which."""


class Category(enum.Enum):
    """The national catalogue's categories (甲/乙/丙 类)."""

    A = "A"  # fully covered
    B = "B"  # covered after a self-paid share (乙类先行自付)
    C = "C"  # self-paid


class HospitalLevel(enum.IntEnum):
    """A hospital's grade; the inpatient deductible and reimbursement rate depend on it."""

    NONE = 0  # pharmacies and clinics without a grade
    LEVEL_1 = 1
    LEVEL_2 = 2
    LEVEL_3 = 3


@dataclass(frozen=True)
class CatalogueEntry:
    code: str
    name: str
    category: Category


@dataclass(frozen=True)
class Policy:
    """One version of the parameters.

    - ``category_b_self_paid_per_mille``: the share of a category B item the insured pays first.
    - ``inpatient_deductible_fen`` / ``inpatient_rate_per_mille``: per hospital level; the pooled fund pays
      ``rate`` of the covered inpatient cost above the deductible (per admission) ...
    - ``annual_cap_fen``: ... and at most this much per person per calendar year.
    - ``personal_account_rate_per_mille``: the part of a person's contribution base credited to their
      medical personal account each month (the individual medical share).
    """

    effective_from: _dt.date
    category_b_self_paid_per_mille: int
    inpatient_deductible_fen: Mapping[HospitalLevel, int]
    inpatient_rate_per_mille: Mapping[HospitalLevel, int]
    annual_cap_fen: int
    personal_account_rate_per_mille: int
    catalogue: Mapping[str, CatalogueEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _per_mille("category_b_self_paid_per_mille", self.category_b_self_paid_per_mille)
        _per_mille("personal_account_rate_per_mille", self.personal_account_rate_per_mille)
        _fen("annual_cap_fen", self.annual_cap_fen)
        for level in (HospitalLevel.LEVEL_1, HospitalLevel.LEVEL_2, HospitalLevel.LEVEL_3):
            if level not in self.inpatient_deductible_fen or level not in self.inpatient_rate_per_mille:
                raise PolicyError(f"policy from {self.effective_from}: no inpatient parameters for {level.name}")
            _fen(f"inpatient_deductible_fen[{level.name}]", self.inpatient_deductible_fen[level])
            _per_mille(f"inpatient_rate_per_mille[{level.name}]", self.inpatient_rate_per_mille[level])
        for code, entry in self.catalogue.items():
            if code != entry.code:
                raise PolicyError(f"catalogue entry {code!r} holds code {entry.code!r}")

    def category_of(self, code: str) -> Category:
        entry = self.catalogue.get(code)
        if entry is None:
            raise PolicyError(f"item code {code!r} is not in the catalogue in force from {self.effective_from}")
        return entry.category

    def deductible_fen(self, level: HospitalLevel) -> int:
        return self._inpatient(self.inpatient_deductible_fen, level)

    def rate_per_mille(self, level: HospitalLevel) -> int:
        return self._inpatient(self.inpatient_rate_per_mille, level)

    def _inpatient(self, table: Mapping[HospitalLevel, int], level: HospitalLevel) -> int:
        if level not in table or level == HospitalLevel.NONE:
            raise PolicyError(f"no inpatient care at an institution of level {HospitalLevel(level).name}")
        return table[level]


def _per_mille(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= PER_MILLE:
        raise PolicyError(f"{name} must be an integer from 0 to {PER_MILLE} per mille, not {value!r}")


def _fen(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyError(f"{name} must be a non-negative integer number of fen, not {value!r}")


class PolicyBook:
    """The versions of the policy, each in force from its ``effective_from`` until the next one."""

    def __init__(self, versions: Iterable[Policy]) -> None:
        ordered = sorted(versions, key=lambda policy: policy.effective_from)
        if not ordered:
            raise PolicyError("a policy book needs at least one version")
        for earlier, later in itertools.pairwise(ordered):
            if earlier.effective_from == later.effective_from:
                raise PolicyError(f"two policy versions take effect on {later.effective_from}")
        self.versions: tuple[Policy, ...] = tuple(ordered)

    def at(self, day: _dt.date) -> Policy:
        in_force = None
        for policy in self.versions:
            if policy.effective_from > day:
                break
            in_force = policy
        if in_force is None:
            raise PolicyError(f"no policy is in force on {day} (the first takes effect on "
                              f"{self.versions[0].effective_from})")
        return in_force


def _catalogue(*entries: tuple[str, str, Category]) -> dict[str, CatalogueEntry]:
    return {code: CatalogueEntry(code, name, category) for code, name, category in entries}


# A small sample catalogue, enough for the demo and the tests; a city loads its own.
SAMPLE_CATALOGUE = _catalogue(
    ("XA01", "阿莫西林胶囊 0.25g", Category.A),
    ("XA02", "布洛芬缓释胶囊 0.3g", Category.A),
    ("XB01", "阿托伐他汀钙片 20mg", Category.B),
    ("XB02", "奥美拉唑肠溶胶囊 20mg", Category.B),
    ("XC01", "维生素C泡腾片", Category.C),
    ("S001", "门诊诊查费", Category.A),
    ("S002", "血常规检查", Category.A),
    ("S101", "床位费（三人间）", Category.A),
    ("S102", "CT 检查", Category.B),
    ("S103", "阑尾切除术", Category.A),
    ("S199", "特需病房差价", Category.C),
)

_LEVELS_1_2_3 = (HospitalLevel.LEVEL_1, HospitalLevel.LEVEL_2, HospitalLevel.LEVEL_3)

DEFAULT_POLICY_BOOK = PolicyBook([
    Policy(effective_from=_dt.date(2025, 1, 1), category_b_self_paid_per_mille=100,
           inpatient_deductible_fen=dict(zip(_LEVELS_1_2_3, (30_000, 60_000, 90_000))),
           inpatient_rate_per_mille=dict(zip(_LEVELS_1_2_3, (900, 850, 800))),
           annual_cap_fen=20_000_000, personal_account_rate_per_mille=20, catalogue=SAMPLE_CATALOGUE),
    Policy(effective_from=_dt.date(2026, 1, 1), category_b_self_paid_per_mille=100,
           inpatient_deductible_fen=dict(zip(_LEVELS_1_2_3, (20_000, 50_000, 80_000))),
           inpatient_rate_per_mille=dict(zip(_LEVELS_1_2_3, (920, 870, 820))),
           annual_cap_fen=25_000_000, personal_account_rate_per_mille=20, catalogue=SAMPLE_CATALOGUE),
])
