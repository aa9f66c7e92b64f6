"""Settlement booked on the real ledger through the server, with the numbers written out
(policy in force on 2026-11-25: B self-paid 10 %; level 3 deductible 80,000 fen, rate 82 %; cap 25,000,000 fen)."""

from __future__ import annotations

import grpc
import pytest
from citycard.apps.medical.contributions import ImportRefused
from citycard.apps.medical.service import MedicalError
from citycard.apps.medical.split import BillItem
from grpc_helpers import CALL_TIMEOUT_S, auth, purse_manifest, refusal, register
from medical_helpers import CLOSED_PHARMACY, HOSPITAL, PHARMACY, World

from citycard.v1 import applications_pb2, cards_pb2, common_pb2, ledger_pb2

PHARMACY_ITEMS = [BillItem("XA01", 2, 1_250), BillItem("XB01", 3, 4_385), BillItem("XC01", 1, 2_800)]  # 18,455
INPATIENT_ITEMS = [BillItem("S101", 10, 6_000), BillItem("S103", 1, 350_000), BillItem("S102", 2, 45_000),
                   BillItem("S199", 5, 10_000)]  # 550,000; covered 491,000


def fund(world: World, id_number: str, fen: int, tag: str) -> None:
    """Credit the personal account directly (the contribution import is tested on its own)."""
    account = world.service.core.person(id_number).medical_account_id
    answer = world.server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[ledger_pb2.Transfer(
        id=f"f{abs(hash(tag)) % 10**12:x}", debit_account_id=world.accounts["individual_fund"],
        credit_account_id=account, amount_fen=fen, ledger=1, code=1)]), metadata=world.metadata, timeout=30)
    assert not answer.errors


def available(world: World, id_number: str) -> int:
    return world.service.core.available_fen(world.service.core.person(id_number).medical_account_id)


def account(world: World, name: str) -> ledger_pb2.Account:
    found = world.service.core.account(world.accounts[name])
    assert found is not None
    return found


def settle(world: World, id_number: str, card: str, bill_no: str, items=PHARMACY_ITEMS, institution=PHARMACY,
           visit="pharmacy"):
    return world.service.settle(institution=institution, bill_no=bill_no, card_number=card, id_number=id_number,
                                visit=visit, items=items)


def test_pharmacy_purchase_settled_and_recorded(world: World):
    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + "a")
    institutions_before = account(world, "institutions").credits_posted_fen
    receipt = settle(world, id_number, card, "B0001")
    assert (receipt["total_fen"], receipt["pooled_fund_fen"], receipt["personal_account_fen"],
            receipt["insured_fen"]) == (18_455, 0, 15_655, 2_800)
    assert receipt["balance_after_fen"] == 34_345
    assert available(world, id_number) == 34_345
    assert account(world, "institutions").credits_posted_fen - institutions_before == 15_655
    again = settle(world, id_number, card, "B0001")  # the terminal resends: same receipt, nothing booked
    assert again["replayed"] and again["personal_account_fen"] == 15_655
    assert available(world, id_number) == 34_345
    with pytest.raises(MedicalError) as caught:
        settle(world, id_number, card, "B0001", items=PHARMACY_ITEMS[:1])
    assert caught.value.reason == "already_exists"
    records = world.service.expense_records(id_number)
    assert [(r["bill"], r["institution_name"], r["personal_account_fen"], r["insured_fen"], r["refunded_fen"])
            for r in records] == [("P3701001/B0001", "漱玉平民大药房", 15_655, 2_800, 0)]
    assert records[0]["holder"] == id_number[:6] + "********" + id_number[-4:]
    assert [i["category"] for i in records[0]["items"]] == ["A", "B", "C"]


def test_a_settlement_that_would_overdraw_the_personal_account(world: World):
    id_number, card = world.person()
    fund(world, id_number, 10_000, id_number + "b")
    receipt = settle(world, id_number, card, "B0002")
    assert (receipt["personal_account_fen"], receipt["insured_fen"]) == (10_000, 8_455)
    assert available(world, id_number) == 0


def test_outpatient_visit_at_a_hospital(world: World):
    id_number, card = world.person()
    fund(world, id_number, 100_000, id_number + "o")
    receipt = settle(world, id_number, card, "O0001", institution=HOSPITAL, visit="outpatient",
                     items=[BillItem("S001", 1, 1_000), BillItem("S002", 1, 2_500), BillItem("XB02", 2, 3_333)])
    assert (receipt["total_fen"], receipt["category_b_self_paid_fen"], receipt["personal_account_fen"]) == \
        (10_166, 667, 10_166)
    assert available(world, id_number) == 89_834


@pytest.mark.parametrize("institution, reason", [("P9999999", "not_designated"), (CLOSED_PHARMACY, "closed")])
def test_non_designated_or_closed_institution_is_refused(world: World, institution, reason):
    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + reason)
    with pytest.raises(MedicalError) as caught:
        settle(world, id_number, card, "B0003", institution=institution)
    assert caught.value.reason == reason
    assert available(world, id_number) == 50_000
    assert world.service.expense_records(id_number) == []


def test_stopped_frozen_and_replaced_cards(world: World):
    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + "f")
    cards = world.server.cards()
    operator = auth(world.server.operator_token)
    cards.ReportLoss(cards_pb2.ReportLossRequest(actor="op1", card_number=card, written=cards_pb2.WrittenReport(
        holder_id_number=id_number, holder_name="张三")), metadata=operator, timeout=CALL_TIMEOUT_S)
    with pytest.raises(MedicalError, match="frozen by a written loss report") as caught:
        settle(world, id_number, card, "B0004")
    assert caught.value.reason == "card_refused"
    assert world.service.core.account(world.service.core.person(id_number).medical_account_id).frozen
    assert available(world, id_number) == 50_000
    new_card = cards.ReplaceCard(cards_pb2.ReplaceCardRequest(actor="op1", card_number=card), metadata=operator,
                                 timeout=CALL_TIMEOUT_S).new_card.card_number
    with pytest.raises(MedicalError, match="replaced"):
        settle(world, id_number, card, "B0005")
    receipt = settle(world, id_number, new_card, "B0005")  # the same account, reached at once
    assert receipt["personal_account_fen"] == 15_655 and available(world, id_number) == 34_345


def test_a_card_that_settled_before_is_refused_at_once_after_a_loss_report(world: World):
    """A report accepted before a settlement is seen by it, whatever the card did before; a restored card
    settles again."""
    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + "k")
    assert settle(world, id_number, card, "K1")["personal_account_fen"] == 15_655
    cards = world.server.cards()
    operator = auth(world.server.operator_token)
    gender = cards_pb2.GENDER_MALE if int(id_number[16]) % 2 else cards_pb2.GENDER_FEMALE
    cards.ReportLoss(cards_pb2.ReportLossRequest(actor="op1", card_number=card, phone=cards_pb2.PhoneReport(
        id_number=id_number, name="张三", gender=gender)), metadata=operator, timeout=CALL_TIMEOUT_S)
    with pytest.raises(MedicalError, match="stopped by a phone or online loss report") as caught:
        settle(world, id_number, card, "K2")
    assert caught.value.reason == "card_refused" and available(world, id_number) == 34_345
    cards.RestoreCard(cards_pb2.RestoreCardRequest(actor="op1", card_number=card, reason="found it"),
                      metadata=operator, timeout=CALL_TIMEOUT_S)
    assert settle(world, id_number, card, "K2")["personal_account_fen"] == 15_655   # restored: settles again
    cards.ReportLoss(cards_pb2.ReportLossRequest(actor="op1", card_number=card, written=cards_pb2.WrittenReport(
        holder_id_number=id_number, holder_name="张三")), metadata=operator, timeout=CALL_TIMEOUT_S)
    with pytest.raises(MedicalError, match="frozen by a written loss report"):
        settle(world, id_number, card, "K3")
    assert available(world, id_number) == 50_000 - 2 * 15_655


def test_someone_elses_card_is_refused(world: World):
    id_number, _ = world.person()
    _, other_card = world.person()
    with pytest.raises(MedicalError, match="does not belong to") as caught:
        settle(world, id_number, other_card, "B0006")
    assert caught.value.reason == "card_refused"
    from grpc_helpers import citizen_id
    stranger = citizen_id("19990909", 999)   # a valid ID number of nobody the registry knows
    with pytest.raises(MedicalError, match="does not belong to") as caught:
        settle(world, stranger, other_card, "B0007")
    assert caught.value.reason == "card_refused"


def test_refunds_up_to_the_original_and_idempotent(world: World):
    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + "r")
    settle(world, id_number, card, "B0007")
    part = world.service.refund(institution=PHARMACY, refund_no="R1", bill_no="B0007", amount_fen=5_000)
    # 5,000 of 18,455: personal floor(5,000 x 15,655 / 18,455) = 4,241; cash 759
    assert (part["personal_account_fen"], part["insured_fen"]) == (4_241, 759)
    assert available(world, id_number) == 34_345 + 4_241
    assert world.service.refund(institution=PHARMACY, refund_no="R1", bill_no="B0007", amount_fen=5_000)["replayed"]
    assert available(world, id_number) == 34_345 + 4_241
    with pytest.raises(MedicalError) as caught:
        world.service.refund(institution=PHARMACY, refund_no="R2", bill_no="B0007", amount_fen=13_456)
    assert caught.value.reason == "exceeds_refundable"
    rest = world.service.refund(institution=PHARMACY, refund_no="R3", bill_no="B0007")
    assert (rest["amount_fen"], rest["personal_account_fen"]) == (13_455, 11_414)
    assert available(world, id_number) == 50_000
    assert world.service.expense_records(id_number)[0]["refunded_fen"] == 18_455


def test_admission_hold_posted_at_discharge(world: World):
    id_number, card = world.person()
    pooled_before = account(world, "pooled_fund")
    admission = world.service.admit(institution=HOSPITAL, admission_no="A0001", card_number=card,
                                    id_number=id_number, expected_cost_fen=500_000)
    assert admission["hold_fen"] == 344_400   # (500,000 - 80,000) x 82 %
    held = account(world, "pooled_fund")
    assert held.debits_pending_fen - pooled_before.debits_pending_fen == 344_400
    receipt = world.service.discharge(institution=HOSPITAL, admission_no="A0001", items=INPATIENT_ITEMS)
    assert (receipt["total_fen"], receipt["pooled_fund_fen"], receipt["insured_fen"]) == (550_000, 337_020, 212_980)
    after = account(world, "pooled_fund")
    assert after.debits_pending_fen == pooled_before.debits_pending_fen
    assert after.debits_posted_fen - pooled_before.debits_posted_fen == 337_020
    refund = world.service.refund(institution=HOSPITAL, refund_no="RA1", bill_no="A0001")
    assert refund["pooled_fund_fen"] == 337_020
    assert account(world, "pooled_fund").credits_posted_fen - pooled_before.credits_posted_fen == 337_020


def test_admission_cancelled_voids_the_hold(world: World):
    id_number, card = world.person()
    before = account(world, "pooled_fund").debits_pending_fen
    world.service.admit(institution=HOSPITAL, admission_no="A0002", card_number=card, id_number=id_number,
                        expected_cost_fen=200_000)   # hold (200,000 - 80,000) x 82 % = 98,400
    assert account(world, "pooled_fund").debits_pending_fen - before == 98_400
    assert world.service.cancel_admission(institution=HOSPITAL, admission_no="A0002")["released_fen"] == 98_400
    assert account(world, "pooled_fund").debits_pending_fen == before
    with pytest.raises(MedicalError) as caught:
        world.service.discharge(institution=HOSPITAL, admission_no="A0002", items=INPATIENT_ITEMS)
    assert caught.value.reason == "precondition_failed"


def test_inpatient_stays_crossing_the_annual_cap(world: World):
    id_number, card = world.person()
    world.service.admit(institution=HOSPITAL, admission_no="A0003", card_number=card, id_number=id_number,
                        expected_cost_fen=0)
    big = world.service.discharge(institution=HOSPITAL, admission_no="A0003",
                                  items=[BillItem("S103", 100, 350_000)])  # 35,000,000 -> uncapped 28,634,400
    assert (big["pooled_fund_fen"], big["insured_fen"], big["capped"]) == (25_000_000, 10_000_000, True)
    world.service.admit(institution=HOSPITAL, admission_no="A0004", card_number=card, id_number=id_number,
                        expected_cost_fen=500_000)
    second = world.service.discharge(institution=HOSPITAL, admission_no="A0004", items=INPATIENT_ITEMS)
    assert (second["pooled_fund_fen"], second["insured_fen"]) == (0, 550_000)


def test_no_other_plugin_may_touch_medical(world: World):
    """A partner's manifest may not name MEDICAL; a partner's transfer on MEDICAL is refused."""
    manifest = applications_pb2.Manifest(name="sneaky", aid="F0534E45414B59", ledgers=[1], transfer_codes=[2],
                                         accounts=[applications_pb2.AccountSpec(
                                             name="settlement", ledger=1,
                                             kind=common_pb2.ACCOUNT_KIND_INSTITUTION_SETTLEMENT)])
    with pytest.raises(grpc.RpcError) as caught:
        register(world.server, manifest)
    assert refusal(caught.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "MEDICAL_LEDGER_RESERVED")
    partner = register(world.server, purse_manifest("pharmacychain"))
    id_number, _ = world.person()
    person_account = world.service.core.person(id_number).medical_account_id
    with pytest.raises(grpc.RpcError) as caught:
        world.server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[ledger_pb2.Transfer(
            id="5e77", debit_account_id=person_account, credit_account_id=world.accounts["institutions"],
            amount_fen=1, ledger=1, code=2)]), metadata=auth(partner.bearer_token), timeout=CALL_TIMEOUT_S)
    assert refusal(caught.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "MEDICAL_LEDGER_RESERVED")


UNIT = "91370100MA3C5LQX6"


def _unit() -> str:
    from citycard.core.identity import unit_check_character
    return UNIT + unit_check_character(UNIT)


def test_contribution_import_with_bad_rows_imports_nothing(world: World, tmp_path):
    id_number, _ = world.person()
    unit = _unit()
    header = "month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n"
    bad = header + (f"2026-10,{unit},{id_number},medical,800000,48000,16000\n"
                    f"2026-13,{unit},{id_number},pension,800000,128000,64000\n"
                    f"2026-10,{unit},{id_number[:-1]}0,medical,800000,48000,16000\n"
                    f"2026-10,{unit},{id_number},work_injury,800000,4000,100\n"
                    f"2026-10,{unit},{id_number},medical,800000,48000,16000\n")
    with pytest.raises(ImportRefused) as caught:
        world.service.import_contributions(bad, source="oct.csv")
    problems = caught.value.problems
    assert ("oct.csv", 3, "month") == problems[0][:3]
    assert {(row, name) for _, row, name, _ in problems} == {(3, "month"), (4, "id_number"),
                                                             (5, "individual_fen"), (6, "id_number")}
    assert available(world, id_number) == 0
    assert world.service.contributions(id_number)["insurances"] == {}
    good = header + "".join(f"{month},{unit},{id_number},{insurance},800000,{employer},{individual}\n"
                            for month in ("2026-09", "2026-10")
                            for insurance, employer, individual in (
                                ("pension", 128_000, 64_000), ("medical", 48_000, 16_000),
                                ("unemployment", 5_600, 1_600), ("work_injury", 4_000, 0), ("maternity", 6_400, 0)))
    report = world.service.import_contributions(good, source="sep-oct.csv")
    assert (report["rows"], report["credits"], report["credited_fen"]) == (10, 2, 32_000)  # 2 % of 8,000.00 x 2
    assert available(world, id_number) == 32_000
    summary = world.service.contributions(id_number)
    assert summary["insurances"]["pension"]["months_paid"] == 2
    assert summary["accumulated_pension_fen"] == 2 * (128_000 + 64_000)
    assert summary["accumulated_medical_credited_fen"] == 32_000
    with pytest.raises(ImportRefused, match="imported before"):
        world.service.import_contributions(good, source="sep-oct.csv")
    assert available(world, id_number) == 32_000
    lines = world.service.statement(id_number)["lines"]
    assert [(line["code"], line["amount_fen"], line["balance_fen"]) for line in lines] == [
        ("contribution", 16_000, 16_000), ("contribution", 16_000, 32_000)]


class _LostAnswer:
    """A core client whose first booking reaches the ledger but whose answer is lost (a crash, a cut line)."""

    def __init__(self, core) -> None:
        self._core = core
        self.lost = 0

    def __getattr__(self, name):
        return getattr(self._core, name)

    def book(self, transfers):
        answer = self._core.book(transfers)
        if not self.lost:
            self.lost += 1
            from citycard.apps.medical.core_client import CoreError
            raise CoreError("core_unavailable", "UNAVAILABLE: connection lost")
        return answer


def test_a_booking_whose_answer_was_lost_completes_on_resend_without_booking_twice(world: World):
    from citycard.apps.medical.core_client import CoreError

    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + "l")
    world.service.core = world.service.booker.core = _LostAnswer(world.service.core)
    with pytest.raises(CoreError):
        settle(world, id_number, card, "B0100")
    assert available(world, id_number) == 34_345          # booked in the ledger ...
    assert world.service.expense_records(id_number) == []  # ... the record is still an intent
    again = settle(world, id_number, card, "B0100")       # the terminal sends it again
    assert again["replayed"] and again["personal_account_fen"] == 15_655
    assert available(world, id_number) == 34_345          # not booked twice
    assert [r["bill"] for r in world.service.expense_records(id_number)] == ["P3701001/B0100"]


def test_intents_left_by_a_crash_are_finished_at_start(world: World):
    id_number, card = world.person()
    fund(world, id_number, 50_000, id_number + "c")
    world.service.core = world.service.booker.core = _LostAnswer(world.service.core)
    with pytest.raises(Exception, match="connection lost"):
        settle(world, id_number, card, "B0200")
    assert world.service.expense_records(id_number) == []
    assert world.service.recover() == {"bills": 1}
    assert [r["bill"] for r in world.service.expense_records(id_number)] == ["P3701001/B0200"]
    assert available(world, id_number) == 34_345
    assert world.service.recover() == {}
