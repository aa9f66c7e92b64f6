"""Worked settlement examples, with every number written out (policy in force from 2026-01-01:
category B self-paid share 10 %; level 3 deductible 800.00 CNY, rate 82 %; annual cap 250,000.00 CNY)."""

from __future__ import annotations

import datetime as dt

import pytest
from citycard.apps.medical.institutions import Institution, InstitutionError, InstitutionKind, Institutions
from citycard.apps.medical.policy import DEFAULT_POLICY_BOOK, Category, HospitalLevel, Policy, PolicyError
from citycard.apps.medical.split import Bill, BillError, BillItem, VisitType, split_bill

POLICY_2026 = DEFAULT_POLICY_BOOK.at(dt.date(2026, 11, 25))
L3 = HospitalLevel.LEVEL_3


def pharmacy_bill() -> Bill:
    return Bill(VisitType.PHARMACY, (
        BillItem("XA01", 2, 1_250),    # A: 2,500 fen, all covered
        BillItem("XB01", 3, 4_385),    # B: 13,155 fen; covered floor(13,155 x 0.9) = 11,839; self-paid 1,316
        BillItem("XC01", 1, 2_800),    # C: 2,800 fen, self-paid
    ))


def test_policy_versions_by_effective_date():
    assert DEFAULT_POLICY_BOOK.at(dt.date(2025, 12, 31)).deductible_fen(L3) == 90_000
    assert DEFAULT_POLICY_BOOK.at(dt.date(2026, 1, 1)).deductible_fen(L3) == 80_000
    assert POLICY_2026.rate_per_mille(HospitalLevel.LEVEL_1) == 920
    with pytest.raises(PolicyError, match="no policy is in force on 2024-12-31"):
        DEFAULT_POLICY_BOOK.at(dt.date(2024, 12, 31))
    with pytest.raises(PolicyError, match="per mille"):
        Policy(effective_from=dt.date(2027, 1, 1), category_b_self_paid_per_mille=1001,
               inpatient_deductible_fen=POLICY_2026.inpatient_deductible_fen,
               inpatient_rate_per_mille=POLICY_2026.inpatient_rate_per_mille, annual_cap_fen=1,
               personal_account_rate_per_mille=20)


def test_pharmacy_purchase_paid_from_the_personal_account_except_category_c():
    split = split_bill(pharmacy_bill(), POLICY_2026, level=HospitalLevel.NONE, personal_available_fen=50_000)
    assert split.total_fen == 18_455
    assert [(i.category, i.amount_fen, i.covered_fen, i.self_paid_fen) for i in split.items] == [
        (Category.A, 2_500, 2_500, 0), (Category.B, 13_155, 11_839, 1_316), (Category.C, 2_800, 0, 2_800)]
    assert split.category_b_self_paid_fen == 1_316
    assert split.category_c_fen == 2_800
    assert split.pooled_fund_fen == 0
    assert split.personal_account_fen == 15_655   # A and B, including B's self-paid share
    assert split.insured_fen == 2_800              # the C item, in cash or from the e-purse


def test_a_bill_that_would_overdraw_the_personal_account_pays_the_rest_in_cash():
    split = split_bill(pharmacy_bill(), POLICY_2026, level=HospitalLevel.NONE, personal_available_fen=10_000)
    assert split.personal_account_fen == 10_000
    assert split.insured_fen == 8_455


def test_outpatient_visit():
    bill = Bill(VisitType.OUTPATIENT, (BillItem("S001", 1, 1_000), BillItem("S002", 1, 2_500),
                                       BillItem("XB02", 2, 3_333)))  # B: 6,666 -> covered 5,999, self 667
    split = split_bill(bill, POLICY_2026, level=HospitalLevel.LEVEL_2, personal_available_fen=100_000)
    assert (split.total_fen, split.covered_fen, split.category_b_self_paid_fen) == (10_166, 9_499, 667)
    assert (split.pooled_fund_fen, split.personal_account_fen, split.insured_fen) == (0, 10_166, 0)


def inpatient_bill() -> Bill:
    return Bill(VisitType.INPATIENT, (
        BillItem("S101", 10, 6_000),    # A: 60,000
        BillItem("S103", 1, 350_000),   # A: 350,000
        BillItem("S102", 2, 45_000),    # B: 90,000 -> covered 81,000, self-paid 9,000
        BillItem("S199", 5, 10_000),    # C: 50,000
    ))


def test_inpatient_stay_above_the_deductible():
    split = split_bill(inpatient_bill(), POLICY_2026, level=L3, personal_available_fen=1_000_000)
    assert split.total_fen == 550_000
    assert split.covered_fen == 491_000
    assert split.deductible_fen == 80_000
    assert split.pooled_fund_fen == 337_020       # (491,000 - 80,000) x 82 %
    assert split.personal_account_fen == 0
    assert split.insured_fen == 212_980
    assert not split.capped


def test_inpatient_stay_crossing_the_annual_cap():
    split = split_bill(inpatient_bill(), POLICY_2026, level=L3, personal_available_fen=0,
                       pooled_paid_this_year_fen=24_800_000)   # 2,000.00 CNY of the cap left
    assert split.pooled_fund_fen == 200_000
    assert split.insured_fen == 350_000
    assert split.capped
    exhausted = split_bill(inpatient_bill(), POLICY_2026, level=L3, personal_available_fen=0,
                           pooled_paid_this_year_fen=25_000_000)
    assert (exhausted.pooled_fund_fen, exhausted.insured_fen) == (0, 550_000)


def test_inpatient_stay_below_the_deductible_and_rate_by_level():
    bill = Bill(VisitType.INPATIENT, (BillItem("S101", 5, 6_000), BillItem("S103", 1, 50_000)))  # 80,000
    assert split_bill(bill, POLICY_2026, level=L3, personal_available_fen=0).pooled_fund_fen == 0
    level_1 = split_bill(bill, POLICY_2026, level=HospitalLevel.LEVEL_1, personal_available_fen=0)
    assert level_1.pooled_fund_fen == 55_200      # (80,000 - 20,000) x 92 %
    assert level_1.insured_fen == 24_800


def test_rounding_falls_to_the_insured():
    bill = Bill(VisitType.INPATIENT, (BillItem("S102", 1, 100_001),))   # B: covered floor(90,000.9) = 90,000
    split = split_bill(bill, POLICY_2026, level=HospitalLevel.LEVEL_1, personal_available_fen=0)
    assert split.covered_fen == 90_000
    assert split.pooled_fund_fen == 64_400          # 70,000 x 0.92
    assert split.insured_fen == 35_601


@pytest.mark.parametrize("item, message", [
    (BillItem("NOPE", 1, 100), r"items\[0\].code: item code 'NOPE' is not in the catalogue"),
    (BillItem("XA01", 0, 100), r"items\[0\].quantity"),
    (BillItem("XA01", 1, -5), r"items\[0\].unit_price_fen"),
])
def test_bad_items_are_refused_naming_the_field(item, message):
    with pytest.raises(BillError, match=message):
        split_bill(Bill(VisitType.PHARMACY, (item,)), POLICY_2026, level=HospitalLevel.NONE,
                   personal_available_fen=0)


def test_inpatient_care_needs_a_graded_hospital():
    with pytest.raises(BillError, match="no inpatient care"):
        split_bill(inpatient_bill(), POLICY_2026, level=HospitalLevel.NONE, personal_available_fen=0)


def _institutions() -> Institutions:
    return Institutions([
        Institution("H3701001", "济南市第一人民医院", InstitutionKind.HOSPITAL, L3,
                    frozenset({VisitType.OUTPATIENT, VisitType.INPATIENT}), dt.date(2020, 1, 1), None, 7),
        Institution("P3701001", "漱玉平民大药房", InstitutionKind.PHARMACY, HospitalLevel.NONE,
                    frozenset({VisitType.PHARMACY}), dt.date(2020, 1, 1), dt.date(2026, 6, 1), 7),
    ])


def test_designated_institutions_refuse_the_non_designated_and_the_closed():
    registry = _institutions()
    assert registry.check("H3701001", VisitType.INPATIENT, dt.date(2026, 11, 25)).level == L3
    assert registry.check("P3701001", VisitType.PHARMACY, dt.date(2026, 5, 31)).code == "P3701001"
    for code, visit, day, reason in [
        ("X0000001", VisitType.PHARMACY, dt.date(2026, 1, 1), "not_designated"),
        ("P3701001", VisitType.PHARMACY, dt.date(2026, 6, 1), "closed"),
        ("H3701001", VisitType.OUTPATIENT, dt.date(2019, 12, 31), "not_open_yet"),
        ("H3701001", VisitType.PHARMACY, dt.date(2026, 1, 1), "service_not_allowed"),
    ]:
        with pytest.raises(InstitutionError) as caught:
            registry.check(code, visit, day)
        assert caught.value.reason == reason


def test_institution_definitions_are_checked():
    with pytest.raises(InstitutionError, match="only a graded hospital admits inpatients"):
        Institution("C3701001", "社区诊所", InstitutionKind.CLINIC, HospitalLevel.NONE,
                    frozenset({VisitType.INPATIENT}), dt.date(2020, 1, 1), None, 7)
    with pytest.raises(InstitutionError, match="pharmacy sales only"):
        Institution("P3701002", "药房", InstitutionKind.PHARMACY, HospitalLevel.NONE,
                    frozenset({VisitType.OUTPATIENT}), dt.date(2020, 1, 1), None, 7)
    registry = _institutions()
    closed = registry.close("H3701001", dt.date(2026, 12, 1))
    assert Institution.from_json(closed.to_json()) == closed
