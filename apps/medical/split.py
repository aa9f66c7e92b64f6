"""Who pays what of one bill: the pooled fund, the personal account, and the insured (cash or e-purse).

Rules (the parameters come from the ``Policy`` in force on the bill's date):

- Each item costs ``quantity x unit_price_fen``. Its catalogue category decides its covered part:
  A all of it, B all but the self-paid share, C nothing.
- Outpatient and pharmacy bills: the pooled fund pays nothing; the personal account pays the in-catalogue
  part (A and B items, including B's self-paid share) up to its available balance; the insured pays the
  rest (category C items and whatever the balance does not cover).
- Inpatient bills: the pooled fund pays ``rate(level)`` of the covered part above the ``deductible(level)``
  (per admission), and no more than what is left of the person's annual cap; the insured pays the rest.
  (The personal account does not pay inpatient bills in this policy.)

Rounding, one rule everywhere: an insurance payer's amount is rounded *down* to the fen, so any fraction
of a fen falls to the insured's share. A category B item's covered part is ``floor(amount x (1000 -
share) / 1000)`` and its self-paid part is the remainder; the pooled payment is ``floor(above x rate /
1000)``. The parts always add up to the bill's total exactly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from citycard.apps.medical.policy import PER_MILLE, Category, HospitalLevel, Policy

__all__ = ["ITEMS_MAX", "Bill", "BillError", "BillItem", "ItemSplit", "Split", "VisitType", "split_bill"]

ITEMS_MAX = 500  # items on one bill
QUANTITY_MAX = 100_000
UNIT_PRICE_FEN_MAX = 10**10  # 100 million CNY
BILL_FEN_MAX = 10**12


class BillError(ValueError):
    """A bill cannot be split; the message names the item and the field."""


class VisitType(enum.Enum):
    OUTPATIENT = "outpatient"
    PHARMACY = "pharmacy"
    INPATIENT = "inpatient"


@dataclass(frozen=True)
class BillItem:
    code: str
    quantity: int
    unit_price_fen: int
    name: str = ""

    @property
    def amount_fen(self) -> int:
        return self.quantity * self.unit_price_fen


@dataclass(frozen=True)
class Bill:
    visit: VisitType
    items: tuple[BillItem, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.visit, VisitType):
            raise BillError(f"visit must be one of {[v.value for v in VisitType]}, not {self.visit!r}")
        if not 1 <= len(self.items) <= ITEMS_MAX:
            raise BillError(f"a bill has 1 to {ITEMS_MAX} items, this one has {len(self.items)}")
        for index, item in enumerate(self.items):
            where = f"items[{index}]"
            if not isinstance(item.code, str) or not item.code.strip():
                raise BillError(f"{where}.code: missing")
            if not _int_in(item.quantity, 1, QUANTITY_MAX):
                raise BillError(f"{where}.quantity: must be an integer from 1 to {QUANTITY_MAX}, not {item.quantity!r}")
            if not _int_in(item.unit_price_fen, 0, UNIT_PRICE_FEN_MAX):
                raise BillError(f"{where}.unit_price_fen: must be an integer from 0 to {UNIT_PRICE_FEN_MAX}, "
                                f"not {item.unit_price_fen!r}")
        if self.total_fen > BILL_FEN_MAX:
            raise BillError(f"the bill's total {self.total_fen} fen exceeds {BILL_FEN_MAX}")

    @property
    def total_fen(self) -> int:
        return sum(item.amount_fen for item in self.items)


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class ItemSplit:
    code: str
    name: str
    category: Category
    quantity: int
    unit_price_fen: int
    amount_fen: int
    covered_fen: int  # the part the insurance recognises (A: all, B: after the self-paid share, C: none)
    self_paid_fen: int  # B's self-paid share, or all of a C item


@dataclass(frozen=True)
class Split:
    visit: VisitType
    total_fen: int
    covered_fen: int
    category_b_self_paid_fen: int
    category_c_fen: int
    deductible_fen: int  # inpatient: the deductible that applied (0 otherwise)
    pooled_fund_fen: int
    personal_account_fen: int
    insured_fen: int  # cash or e-purse
    capped: bool  # the annual cap cut the pooled payment
    items: tuple[ItemSplit, ...]

    def __post_init__(self) -> None:
        # Explicit (not assert): the payers must add up to the bill, whatever the parameters.
        if self.pooled_fund_fen + self.personal_account_fen + self.insured_fen != self.total_fen:
            raise ArithmeticError(f"split does not add up: {self}")
        if min(self.pooled_fund_fen, self.personal_account_fen, self.insured_fen) < 0:
            raise ArithmeticError(f"negative share in split: {self}")


def split_items(items: Iterable[BillItem], policy: Policy) -> tuple[ItemSplit, ...]:
    """Each item's covered and self-paid parts by its catalogue category."""
    out = []
    share = policy.category_b_self_paid_per_mille
    for index, item in enumerate(items):
        try:
            category = policy.category_of(item.code)
        except ValueError as exc:
            raise BillError(f"items[{index}].code: {exc}") from None
        amount = item.amount_fen
        if category is Category.A:
            covered = amount
        elif category is Category.B:
            covered = amount * (PER_MILLE - share) // PER_MILLE
        else:
            covered = 0
        name = item.name or policy.catalogue[item.code].name
        out.append(ItemSplit(item.code, name, category, item.quantity, item.unit_price_fen, amount, covered,
                             amount - covered))
    return tuple(out)


def split_bill(bill: Bill, policy: Policy, *, level: HospitalLevel, personal_available_fen: int,
               pooled_paid_this_year_fen: int = 0) -> Split:
    """Amounts by payer for ``bill`` under ``policy`` at an institution of ``level``.

    ``personal_available_fen``: what the personal account may still spend; ``pooled_paid_this_year_fen``:
    what the pooled fund has paid for this person this calendar year (for the annual cap)."""
    if personal_available_fen < 0 or pooled_paid_this_year_fen < 0:
        raise BillError("balances must not be negative")
    items = split_items(bill.items, policy)
    total = sum(item.amount_fen for item in items)
    covered = sum(item.covered_fen for item in items)
    b_self = sum(item.self_paid_fen for item in items if item.category is Category.B)
    c_total = sum(item.amount_fen for item in items if item.category is Category.C)
    deductible = pooled = personal = 0
    capped = False
    if bill.visit is VisitType.INPATIENT:
        try:
            deductible = policy.deductible_fen(level)
            rate = policy.rate_per_mille(level)
        except ValueError as exc:
            raise BillError(str(exc)) from None
        uncapped = max(0, covered - deductible) * rate // PER_MILLE
        cap_left = max(0, policy.annual_cap_fen - pooled_paid_this_year_fen)
        pooled = min(uncapped, cap_left)
        capped = pooled < uncapped
    else:
        personal = min(personal_available_fen, total - c_total)
    return Split(visit=bill.visit, total_fen=total, covered_fen=covered, category_b_self_paid_fen=b_self,
                 category_c_fen=c_total, deductible_fen=deductible, pooled_fund_fen=pooled,
                 personal_account_fen=personal, insured_fen=total - pooled - personal, capped=capped,
                 items=items)
