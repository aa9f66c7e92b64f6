"""Out-of-city treatment, booked on the real ledger: partner cities, their insured's bills paid by the
clearing account, the clearing report reconciled with the ledger. Worked numbers:

Beijing (110000), terms from 2026-01-01: outpatient and pharmacy 70 % of the covered part; B self-paid 15 %;
inpatient deductible 300.00 / 600.00 / 1,300.00 and rate 90 / 87 / 85 % at levels 1 / 2 / 3; cap 500,000.00.
- pharmacy bill 18,455: A 2,500; B 13,155 -> covered floor(13,155 x 0.85) = 11,181; C 2,800. Covered 13,681;
  Beijing pays floor(13,681 x 0.7) = 9,576; the insured 8,879.
- inpatient bill 550,000 at level 3: A 60,000 + 350,000; B 90,000 -> 76,500; C 50,000. Covered 486,500;
  above the deductible 356,500 x 0.85 = 303,025 from Beijing; the insured 246,975.
Shanghai (310000), outpatient 60 %: outpatient bill 5,500 (all A) -> 3,300 from Shanghai, 2,200 the insured.
Beijing owes 9,576 + 303,025 = 312,601 for November; the clearing account is 315,901 in debit.
"""

from __future__ import annotations

import datetime as dt

import pytest
from citycard.apps.medical.out_of_city import OutOfCity, partner_of_tag, report_csv
from citycard.apps.medical.partners import PartnerTerms
from citycard.apps.medical.service import MedicalError
from citycard.apps.medical.split import BillItem
from grpc_helpers import CALL_TIMEOUT_S
from medical_helpers import HOSPITAL, PHARMACY, World
from test_medical_booking import INPATIENT_ITEMS, PHARMACY_ITEMS, account

from citycard.v1 import ledger_pb2

BEIJING = PartnerTerms(dt.date(2026, 1, 1), 700, 150, (30_000, 60_000, 130_000), (900, 870, 850), 50_000_000)
SHANGHAI = PartnerTerms(dt.date(2026, 1, 1), 600, 100, (20_000, 50_000, 100_000), (900, 880, 860), 40_000_000)
OUTPATIENT_ITEMS = [BillItem("S001", 1, 2_000), BillItem("S002", 1, 3_500)]


@pytest.fixture
def out_of_city(world: World) -> OutOfCity:
    service = OutOfCity(world.service)
    service.register_partner("110000", "北京市", BEIJING)
    service.register_partner("310000", "上海市", SHANGHAI)
    return service


def test_settlement_and_clearing_report_reconciled_with_the_ledger(world: World, out_of_city: OutOfCity):
    clearing_before = account(world, "clearing")
    assert (clearing_before.debits_posted_fen, clearing_before.credits_posted_fen) == (0, 0)
    pharmacy = out_of_city.settle(institution=PHARMACY, bill_no="Y1", home_city="110000",
                                  home_number="110105198001010012", visit="pharmacy", items=PHARMACY_ITEMS)
    assert (pharmacy["total_fen"], pharmacy["covered_fen"], pharmacy["pooled_fund_fen"], pharmacy["insured_fen"],
            pharmacy["personal_account_fen"]) == (18_455, 13_681, 9_576, 8_879, 0)
    assert (pharmacy["home_city"], pharmacy["holder"]) == ("110000", "110105********0012")
    stay = out_of_city.settle(institution=HOSPITAL, bill_no="Y2", home_city="110000",
                              home_number="110105198001010012", visit="inpatient", items=INPATIENT_ITEMS)
    assert (stay["covered_fen"], stay["deductible_fen"], stay["pooled_fund_fen"], stay["insured_fen"]) == \
        (486_500, 130_000, 303_025, 246_975)
    clinic = out_of_city.settle(institution=HOSPITAL, bill_no="Y3", home_city="310000", home_number="SH0000123",
                                visit="outpatient", items=OUTPATIENT_ITEMS)
    assert (clinic["pooled_fund_fen"], clinic["insured_fen"]) == (3_300, 2_200)

    again = out_of_city.settle(institution=PHARMACY, bill_no="Y1", home_city="110000",
                               home_number="110105198001010012", visit="pharmacy", items=PHARMACY_ITEMS)
    assert again["replayed"] and again["pooled_fund_fen"] == 9_576           # the resend books nothing
    clearing = account(world, "clearing")
    assert (clearing.debits_posted_fen, clearing.credits_posted_fen) == (315_901, 0)
    booked = world.server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(
        ids=[stay["payments"][0]["transfer_id"]]), metadata=world.metadata, timeout=CALL_TIMEOUT_S).transfers[0]
    assert (partner_of_tag(booked.user_data), booked.amount_fen, booked.code) == ("110000", 303_025, 3)

    report = out_of_city.report("110000", "2026-11-01", "2026-11-30")
    assert [(line["bill"], line["total_fen"], line["home_fund_fen"], line["insured_fen"], line["on_ledger"])
            for line in report["lines"]] == [("P3701001/Y1", 18_455, 9_576, 8_879, True),
                                             ("H3701001/Y2", 550_000, 303_025, 246_975, True)]
    assert (report["bills"], report["total_fen"], report["home_fund_fen"], report["insured_fen"],
            report["owed_by_partner_fen"]) == (2, 568_455, 312_601, 255_854, 312_601)
    assert (report["ledger_period_fen"], report["ledger_all_time_fen"], report["records_all_time_fen"],
            report["clearing_account_net_fen"], report["records_all_partners_fen"]) == \
        (312_601, 312_601, 312_601, 315_901, 315_901)
    assert report["reconciled"] and report["unmatched_transfer_ids"] == []
    assert report_csv(report).splitlines() == [
        "partner_city,bill,institution,day,holder,visit,total_fen,home_fund_fen,insured_fen,transfer_id,on_ledger",
        (f"110000,P3701001/Y1,P3701001,2026-11-25,110105********0012,pharmacy,18455,9576,8879,"
        f"{pharmacy['payments'][0]['transfer_id']},yes"),
        (f"110000,H3701001/Y2,H3701001,2026-11-25,110105********0012,inpatient,550000,303025,246975,"
        f"{stay['payments'][0]['transfer_id']},yes"),
        "110000,TOTAL,,2026-11-01..2026-11-30,2 bills,,568455,312601,255854,,yes"]
    october = out_of_city.report("110000", "2026-10-01", "2026-10-31")
    assert (october["bills"], october["owed_by_partner_fen"], october["reconciled"]) == (0, 0, True)

    # A movement on the clearing account that no record explains breaks the reconciliation, and is named.
    stray = f"{0x5A17 + (110000 << 96):x}"
    answer = world.server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[ledger_pb2.Transfer(
        id=stray, debit_account_id=world.accounts["clearing"], credit_account_id=world.accounts["institutions"],
        amount_fen=100, ledger=1, code=3, user_data=f"{110000 << 96 | 1:x}")]),
        metadata=world.metadata, timeout=CALL_TIMEOUT_S)
    assert not answer.errors
    broken = out_of_city.report("110000", "2026-11-01", "2026-11-30")
    assert (broken["reconciled"], broken["unmatched_transfer_ids"], broken["ledger_all_time_fen"]) == \
        (False, [stray], 312_701)
    assert report_csv(broken).splitlines()[-1].endswith(",NO")


def test_bad_input_is_refused_and_books_nothing(world: World, out_of_city: OutOfCity):
    clearing = account(world, "clearing").debits_posted_fen

    def refused(**changes) -> MedicalError:
        request = {"institution": PHARMACY, "bill_no": "Z1", "home_city": "110000", "home_number": "110105198001010012",
                       "visit": "pharmacy", "items": PHARMACY_ITEMS} | changes
        with pytest.raises(MedicalError) as caught:
            out_of_city.settle(**request)
        return caught.value

    assert (refused(home_city="440300").reason, refused(home_city="440300").field) == ("not_found", "home_city")
    assert refused(home_number="12/34").field == "home_insurance_number"
    assert refused(items=[BillItem("NOPE", 1, 100)]).field == "items"
    assert refused(items=[BillItem("XA01", 0, 100)]).field == "items"
    assert refused(institution="P9999999").reason == "not_designated"
    assert refused(visit="inpatient").reason == "service_not_allowed"   # a pharmacy admits nobody
    assert refused(visit="dental").field == "visit"
    id_number, card = world.person()
    world.service.settle(institution=PHARMACY, bill_no="L1", card_number=card, id_number=id_number, visit="pharmacy",
                         items=PHARMACY_ITEMS)   # a local bill: its number is taken for out-of-city bills too
    assert refused(bill_no="L1").reason == "already_exists"
    out_of_city.settle(institution=PHARMACY, bill_no="Z2", home_city="310000", home_number="SH0000999",
                       visit="pharmacy", items=[BillItem("XC01", 1, 2_800)])   # all C: nothing to clear
    assert refused(bill_no="Z2", items=[BillItem("XC01", 2, 2_800)], home_city="310000",
                   home_number="SH0000999").reason == "already_exists"
    assert account(world, "clearing").debits_posted_fen == clearing

    for code, name, terms, field in (
            ("11000", "北京市", BEIJING, "code"),
            ("110000", "", BEIJING, "name"),
            ("120000", "天津市", PartnerTerms(dt.date(2026, 1, 1), 1_001, 100, (1, 2, 3), (900, 900, 900), 1), "terms"),
            ("120000", "天津市", PartnerTerms(dt.date(2026, 1, 1), 700, 100, (1, 2, 3), (900, 1_200, 900), 1), "terms"),
            ("110000", "北京市", PartnerTerms(dt.date(2026, 1, 1), 650, 150, (1, 2, 3), (900, 870, 850), 1),
             "terms.effective_from"),
            ("110000", "北京", BEIJING, "name")):
        with pytest.raises(MedicalError) as caught:
            out_of_city.register_partner(code, name, terms)
        assert (caught.value.reason, caught.value.field.split(".")[0]) == ("invalid", field.split(".")[0]), code
    assert [p.code for p in out_of_city.partners()] == ["110000", "310000"]
    assert out_of_city.register_partner("110000", "北京市", BEIJING).versions == (BEIJING,)  # the same again
    later = PartnerTerms(dt.date(2027, 1, 1), 750, 150, (30_000, 60_000, 120_000), (900, 870, 860), 50_000_000)
    assert out_of_city.register_partner("110000", "北京市", later).versions == (BEIJING, later)

    for first, last, field in (("2026-11-31", "2026-12-01", "first_day"), ("2026-11-30", "2026-11-01", "last_day"),
                               ("2025-01-01", "2026-12-31", "last_day")):
        with pytest.raises(MedicalError) as caught:
            out_of_city.report("110000", first, last)
        assert caught.value.field == field
    with pytest.raises(MedicalError) as caught:
        out_of_city.report("999999", "2026-11-01", "2026-11-30")
    assert caught.value.reason == "not_found"
