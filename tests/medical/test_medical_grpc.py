"""citycard.v1.Medical served by the medical plugin process that `citycard serve` starts, called over gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from citycard.core.identity import unit_check_character
from google.rpc import error_details_pb2
from grpc_helpers import add_person_with_card, auth, citizen_id
from grpc_status import rpc_status

from citycard.v1 import medical_pb2, medical_pb2_grpc

TIMEOUT_S = 30.0
UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")


def medical_reason(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "citycard.v1.medical"
            return exc.code(), info.reason
    raise AssertionError("no ErrorInfo")


def test_counter_settlement_over_grpc(plugin_server):
    server, ready = plugin_server
    operator = auth(Path(ready["operator_token_file"]).read_text().strip())
    medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(ready["address"]))
    added = medical.AddInstitution(medical_pb2.AddInstitutionRequest(institution=medical_pb2.Institution(
        code="P3701001", name="漱玉平民大药房", kind="pharmacy", services=[medical_pb2.VISIT_TYPE_PHARMACY],
        opened="2020-01-01")), metadata=operator, timeout=TIMEOUT_S)
    pharmacy = auth(added.bearer_token)
    id_number = citizen_id("19700101", 321)
    card = add_person_with_card(server, id_number)
    csv = ("month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n"
           f"2026-10,{UNIT},{id_number},medical,2500000,150000,50000\n")   # credits 2 %: 50,000 fen
    report = medical.ImportContributions(medical_pb2.ImportContributionsRequest(source="oct.csv", csv=csv.encode()),
                                         metadata=operator, timeout=TIMEOUT_S)
    assert (report.rows, report.credits, report.credited_fen) == (1, 1, 50_000)

    request = medical_pb2.SettleRequest(
        institution="P3701001", bill_no="B1", card_number=card, id_number=id_number,
        visit=medical_pb2.VISIT_TYPE_PHARMACY, items=[
            medical_pb2.BillItem(code="XA01", quantity=2, unit_price_fen=1_250),
            medical_pb2.BillItem(code="XB01", quantity=3, unit_price_fen=4_385),
            medical_pb2.BillItem(code="XC01", quantity=1, unit_price_fen=2_800)])
    receipt = medical.Settle(request, metadata=pharmacy, timeout=TIMEOUT_S).receipt
    assert (receipt.total_fen, receipt.personal_account_fen, receipt.insured_fen, receipt.balance_after_fen) == \
        (18_455, 15_655, 2_800, 34_345)
    assert receipt.holder_masked == id_number[:6] + "********" + id_number[-4:]

    with pytest.raises(grpc.RpcError) as caught:   # the operator is no terminal
        medical.Settle(request, metadata=operator, timeout=TIMEOUT_S)
    assert medical_reason(caught.value) == (grpc.StatusCode.PERMISSION_DENIED, "MEDICAL_CREDENTIAL_REFUSED")
    other = medical_pb2.SettleRequest()
    other.CopyFrom(request)
    other.institution = "H9999999"
    with pytest.raises(grpc.RpcError) as caught:   # a pharmacy cannot bill in another's name
        medical.Settle(other, metadata=pharmacy, timeout=TIMEOUT_S)
    assert medical_reason(caught.value) == (grpc.StatusCode.PERMISSION_DENIED, "MEDICAL_CREDENTIAL_REFUSED")

    records = medical.ListExpenseRecords(medical_pb2.ListExpenseRecordsRequest(id_number=id_number),
                                         metadata=operator, timeout=TIMEOUT_S).records
    assert [(r.bill, r.personal_account_fen) for r in records] == [("P3701001/B1", 15_655)]
    statement = medical.GetStatement(medical_pb2.GetStatementRequest(id_number=id_number), metadata=operator,
                                     timeout=TIMEOUT_S)
    assert [(line.code, line.amount_fen, line.balance_fen) for line in statement.lines] == [
        ("contribution", 50_000, 50_000), ("settlement", -15_655, 34_345)]
    assert statement.available_fen == 34_345


def test_bad_contribution_file_is_reported_over_grpc(plugin_server):
    _, ready = plugin_server
    operator = auth(Path(ready["operator_token_file"]).read_text().strip())
    medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(ready["address"]))
    csv = ("month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n"
           f"2026-10,{UNIT},{citizen_id('19700101', 322)},medical,-5,0,0\n")
    with pytest.raises(grpc.RpcError) as caught:
        medical.ImportContributions(medical_pb2.ImportContributionsRequest(source="bad.csv", csv=csv.encode()),
                                    metadata=operator, timeout=TIMEOUT_S)
    assert medical_reason(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MEDICAL_IMPORT_REFUSED")
    assert "bad.csv:2: base_fen" in caught.value.details()


def test_admission_discharge_refund_and_cancel_over_grpc(plugin_server):
    server, ready = plugin_server
    operator = auth(Path(ready["operator_token_file"]).read_text().strip())
    medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(ready["address"]))
    added = medical.AddInstitution(medical_pb2.AddInstitutionRequest(institution=medical_pb2.Institution(
        code="H3701001", name="济南市第一人民医院", kind="hospital", level=3, opened="2020-01-01",
        services=[medical_pb2.VISIT_TYPE_OUTPATIENT, medical_pb2.VISIT_TYPE_INPATIENT])),
        metadata=operator, timeout=TIMEOUT_S)
    hospital = auth(added.bearer_token)
    listed = medical.ListInstitutions(medical_pb2.ListInstitutionsRequest(), metadata=operator, timeout=TIMEOUT_S)
    assert "H3701001" in [i.code for i in listed.institutions]
    id_number = citizen_id("19700101", 323)
    card = add_person_with_card(server, id_number)
    admitted = medical.Admit(medical_pb2.AdmitRequest(institution="H3701001", admission_no="ZY1", card_number=card,
                                                      id_number=id_number, expected_cost_fen=500_000),
                             metadata=hospital, timeout=TIMEOUT_S)
    assert admitted.hold_fen == 344_400
    receipt = medical.Discharge(medical_pb2.DischargeRequest(institution="H3701001", admission_no="ZY1", items=[
        medical_pb2.BillItem(code="S101", quantity=10, unit_price_fen=6_000),
        medical_pb2.BillItem(code="S103", quantity=1, unit_price_fen=350_000),
        medical_pb2.BillItem(code="S102", quantity=2, unit_price_fen=45_000),
        medical_pb2.BillItem(code="S199", quantity=5, unit_price_fen=10_000)]), metadata=hospital,
        timeout=TIMEOUT_S).receipt
    assert (receipt.pooled_fund_fen, receipt.insured_fen, receipt.deductible_fen) == (337_020, 212_980, 80_000)
    assert [(p.payer, p.amount_fen) for p in receipt.payments] == [("pooled_fund", 337_020)]
    refund = medical.Refund(medical_pb2.RefundRequest(institution="H3701001", refund_no="R1", bill_no="ZY1",
                                                      amount_fen=55_000), metadata=hospital, timeout=TIMEOUT_S)
    assert (refund.pooled_fund_fen, refund.insured_fen) == (33_702, 21_298)   # 10 % of the bill
    medical.Admit(medical_pb2.AdmitRequest(institution="H3701001", admission_no="ZY2", card_number=card,
                                           id_number=id_number, expected_cost_fen=100_000),
                  metadata=hospital, timeout=TIMEOUT_S)
    cancelled = medical.CancelAdmission(medical_pb2.CancelAdmissionRequest(institution="H3701001",
                                                                           admission_no="ZY2"),
                                        metadata=hospital, timeout=TIMEOUT_S)
    assert cancelled.released_fen == 16_400   # (100,000 - 80,000) x 82 %
    with pytest.raises(grpc.RpcError) as caught:
        medical.Discharge(medical_pb2.DischargeRequest(institution="H3701001", admission_no="ZY2", items=[
            medical_pb2.BillItem(code="S101", quantity=1, unit_price_fen=6_000)]), metadata=hospital,
            timeout=TIMEOUT_S)
    assert medical_reason(caught.value) == (grpc.StatusCode.FAILED_PRECONDITION, "MEDICAL_PRECONDITION_FAILED")
