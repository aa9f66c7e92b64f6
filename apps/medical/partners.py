"""Partner cities (异地就医): insured persons of another city settle here under their home city's rates.

A partner city is registered with its region code, its name and the parameters of its policy that decide
what its fund pays for a bill settled here; the *catalogue* (an item's category) is this city's, the
*rates* are the home city's (the national rule for direct out-of-city settlement: 就医地目录, 参保地政策).
A partner's parameters are versioned by effective date like the local policy; a bill is split with the
version in force on its date.

What the home city's fund pays (through this city's clearing account, squared up later between the two
cities) and what the insured pays here:

- outpatient and pharmacy: ``outpatient_rate_per_mille`` of the covered part (A items, B items after
  their self-paid share), rounded down; the insured pays the rest (cash at the counter). The home city
  settles the insured's own personal account on its side; this platform holds none for them.
- inpatient: as the local rule, with the home city's deductible, rate per hospital level and annual cap
  (the pooled total counted here is what this platform paid for the person this year).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from citycard.apps.medical.policy import PER_MILLE, HospitalLevel, Policy, PolicyError
from citycard.apps.medical.split import Bill, Split, VisitType, split_bill, split_items

__all__ = ["CITY_CODE", "PartnerCity", "PartnerError", "PartnerTerms", "split_for_partner"]

CITY_CODE = re.compile(r"^[1-8][0-9]{5}$")  # a GB/T 2260 region code: 6 digits
NAME_LENGTH_MAX = 40
LEVELS = (HospitalLevel.LEVEL_1, HospitalLevel.LEVEL_2, HospitalLevel.LEVEL_3)


class PartnerError(ValueError):
    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PartnerTerms:
    """One version of a partner city's parameters (integer fen, rates per mille)."""

    effective_from: _dt.date
    outpatient_rate_per_mille: int
    category_b_self_paid_per_mille: int
    inpatient_deductible_fen: tuple[int, int, int]  # levels 1, 2, 3
    inpatient_rate_per_mille: tuple[int, int, int]
    annual_cap_fen: int

    def policy(self, local: Policy) -> Policy:
        """The policy to split with: the home city's rates over this city's catalogue. Checks every value."""
        try:
            return Policy(effective_from=self.effective_from,
                          category_b_self_paid_per_mille=self.category_b_self_paid_per_mille,
                          inpatient_deductible_fen=dict(zip(LEVELS, self.inpatient_deductible_fen, strict=True)),
                          inpatient_rate_per_mille=dict(zip(LEVELS, self.inpatient_rate_per_mille, strict=True)),
                          annual_cap_fen=self.annual_cap_fen, personal_account_rate_per_mille=0,
                          catalogue=local.catalogue)
        except (PolicyError, ValueError) as exc:
            raise PartnerError(f"terms: {exc}", field="terms") from None

    def to_json(self) -> dict[str, Any]:
        return {"effective_from": self.effective_from.isoformat(),
                "outpatient_rate_per_mille": self.outpatient_rate_per_mille,
                "category_b_self_paid_per_mille": self.category_b_self_paid_per_mille,
                "inpatient_deductible_fen": list(self.inpatient_deductible_fen),
                "inpatient_rate_per_mille": list(self.inpatient_rate_per_mille),
                "annual_cap_fen": self.annual_cap_fen}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> PartnerTerms:
        return cls(_dt.date.fromisoformat(row["effective_from"]), int(row["outpatient_rate_per_mille"]),
                   int(row["category_b_self_paid_per_mille"]),
                   tuple(int(v) for v in row["inpatient_deductible_fen"]),  # type: ignore[arg-type]
                   tuple(int(v) for v in row["inpatient_rate_per_mille"]),  # type: ignore[arg-type]
                   int(row["annual_cap_fen"]))


@dataclass(frozen=True)
class PartnerCity:
    code: str
    name: str
    versions: tuple[PartnerTerms, ...]  # oldest first

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not CITY_CODE.match(self.code):
            raise PartnerError(f"code {self.code!r}: a region code of 6 digits (GB/T 2260)", field="code")
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > NAME_LENGTH_MAX:
            raise PartnerError(f"name: 1 to {NAME_LENGTH_MAX} characters", field="name")
        if not self.versions:
            raise PartnerError("terms are missing", field="terms")
        for terms in self.versions:
            if not isinstance(terms.outpatient_rate_per_mille, int) or isinstance(terms.outpatient_rate_per_mille, bool) \
                    or not 0 <= terms.outpatient_rate_per_mille <= PER_MILLE:
                raise PartnerError(f"outpatient_rate_per_mille must be 0 to {PER_MILLE}, not "
                                   f"{terms.outpatient_rate_per_mille!r}", field="terms.outpatient_rate_per_mille")

    def terms_at(self, day: _dt.date) -> PartnerTerms:
        in_force = [terms for terms in self.versions if terms.effective_from <= day]
        if not in_force:
            raise PartnerError(f"partner city {self.code} has no terms in force on {day} (the first take effect "
                               f"on {self.versions[0].effective_from})", field="home_city")
        return in_force[-1]

    def with_version(self, terms: PartnerTerms) -> PartnerCity:
        """A new version; the same date again must carry the same terms (an idempotent resend)."""
        same_day = [v for v in self.versions if v.effective_from == terms.effective_from]
        if same_day:
            if same_day[0] != terms:
                raise PartnerError(f"partner city {self.code} has other terms from {terms.effective_from}",
                                   field="terms.effective_from")
            return self
        return PartnerCity(self.code, self.name, tuple(sorted((*self.versions, terms),
                                                              key=lambda v: v.effective_from)))

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "versions": [v.to_json() for v in self.versions]}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> PartnerCity:
        return cls(row["code"], row["name"], tuple(PartnerTerms.from_json(v) for v in row["versions"]))


def split_for_partner(bill: Bill, terms: PartnerTerms, local: Policy, *, level: HospitalLevel,
                      pooled_paid_this_year_fen: int) -> Split:
    """Amounts by payer for an out-of-city insured: ``pooled_fund_fen`` is what the home city's fund pays
    (through the clearing account), ``insured_fen`` the rest; ``personal_account_fen`` is always 0."""
    policy = terms.policy(local)
    if bill.visit is VisitType.INPATIENT:
        return split_bill(bill, policy, level=level, personal_available_fen=0,
                          pooled_paid_this_year_fen=pooled_paid_this_year_fen)
    items = split_items(bill.items, policy)
    total = sum(item.amount_fen for item in items)
    covered = sum(item.covered_fen for item in items)
    home = covered * terms.outpatient_rate_per_mille // PER_MILLE  # rounded down: fractions fall to the insured
    return Split(visit=bill.visit, total_fen=total, covered_fen=covered,
                 category_b_self_paid_fen=sum(i.self_paid_fen for i in items if i.category.value == "B"),
                 category_c_fen=sum(i.amount_fen for i in items if i.category.value == "C"), deductible_fen=0,
                 pooled_fund_fen=home, personal_account_fen=0, insured_fen=total - home, capped=False, items=items)
