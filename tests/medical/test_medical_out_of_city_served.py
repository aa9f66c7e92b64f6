"""Out-of-city treatment through the served Medical service: the CLI (`citycard medical partners ...`,
`settle-out-of-city`, `clearing-report`) over gRPC, and a data directory whose medical registration predates
the clearing account (opened on the old registration at the next start)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from citycard.apps.medical import MedicalPlugin
from grpc_helpers import add_person_with_card, auth, citizen_id, register, start_server
from test_medical_cli import run
from test_medical_grpc import medical_reason

from citycard.v1 import medical_pb2, medical_pb2_grpc

TIMEOUT_S = 30.0
BEIJING = ["--name", "北京市", "--from", "2026-01-01", "--outpatient-rate-per-mille", "700",
           "--b-self-paid-per-mille", "150", "--deductible-fen", "30000,60000,130000",
           "--rate-per-mille", "900,870,850", "--annual-cap-fen", "50000000"]


def test_cli_partner_settlement_and_clearing_report(plugin_server, tmp_path, capsys, monkeypatch):
    server, _ = plugin_server
    data = str(server.data_dir)
    assert run(["medical", "partners", "add", "110000", *BEIJING, "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["partner"]["versions"][0]["outpatient_rate_per_mille"] == 700
    with pytest.raises(SystemExit) as exited:   # argparse refuses it before any call
        run(["medical", "partners", "add", "110000", *BEIJING[:-1], "x", "--data", data])
    assert exited.value.code == 2 and "--annual-cap-fen: invalid int value: 'x'" in capsys.readouterr().err
    assert run(["medical", "partners", "add", "110000", *BEIJING[:9], "30000,60000", *BEIJING[10:],
                "--data", data]) == 2
    assert "--deductible-fen: '30000,60000' is not three whole numbers" in capsys.readouterr().err
    assert run(["medical", "partners", "add", "110000", *BEIJING[:7], "1200", *BEIJING[8:], "--data", data]) == 2
    assert "MEDICAL_INVALID" in capsys.readouterr().err   # 120 % is no rate
    assert run(["medical", "partners", "list", "--data", data]) == 0
    assert "北京市" in capsys.readouterr().out
    assert run(["medical", "institutions", "add", "P3701301", "--name", "异地结算药房", "--kind", "pharmacy",
                "--services", "pharmacy", "--data", data, "--json"]) == 0
    token_file = tmp_path / "pharmacy.token"
    token_file.write_text(json.loads(capsys.readouterr().out)["bearer_token"])
    bill = ["--institution", "P3701301", "--bill-no", "Y1", "--home-city", "110000", "--home-number",
            "110105198001010012", "--visit", "pharmacy", "--item", "XA01:2:1250", "--item", "XB01:3:4385",
            "--item", "XC01:1:2800", "--token-file", str(token_file), "--data", data]
    assert run(["medical", "settle-out-of-city", *bill, "--json"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert (receipt["total_fen"], receipt["pooled_fund_fen"], receipt["insured_fen"], receipt["home_city"]) == \
        (18_455, 9_576, 8_879, "110000")
    assert run(["medical", "settle-out-of-city", *bill, "--json"]) == 0        # resent: the same, replayed
    assert json.loads(capsys.readouterr().out)["replayed"] is True
    assert run(["medical", "settle-out-of-city", *bill[:3], "Y2", bill[4], "440300", *bill[6:]]) == 2
    err = capsys.readouterr().err
    assert "MEDICAL_NOT_FOUND" in err and "'440300' is not a registered partner city" in err

    # the server's clock is today's; the report covers every day the bill can carry
    csv_file = tmp_path / "clearing.csv"
    assert run(["medical", "clearing-report", "110000", "--from", receipt["at"][:10], "--to", receipt["at"][:10],
                "--csv", str(csv_file), "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["bills"], report["home_fund_fen"], report["insured_fen"], report["owed_by_partner_fen"],
            report["ledger_period_fen"], report["clearing_account_net_fen"], report["reconciled"]) == \
        (1, 9_576, 8_879, 9_576, 9_576, 9_576, True)
    lines = csv_file.read_text(encoding="utf-8").splitlines()
    transfer_id = receipt["payments"][0]["transfer_id"]
    assert lines[1].startswith("110000,P3701301/Y1,P3701301,") and lines[1].endswith(f",9576,8879,{transfer_id},yes")
    assert lines[-1].endswith(",18455,9576,8879,,yes")
    assert run(["medical", "clearing-report", "110000", "--from", "2026-13-01", "--to", "2026-12-31",
                "--data", data]) == 2
    assert "MEDICAL_INVALID" in capsys.readouterr().err


def test_a_registration_from_before_the_clearing_account_gets_it_at_the_next_start(tmp_path):
    """A data directory registered before the clearing account existed keeps settling local bills, and the next
    `citycard serve` opens the account the newer manifest names, so out-of-city bills settle too."""
    data = tmp_path / "data"
    first = start_server(data)
    old_manifest = MedicalPlugin().manifest()
    del old_manifest.accounts[-1]   # the manifest as it was: no clearing account
    assert [account.name for account in old_manifest.accounts][-1] == "institutions_purse"
    register(first, old_manifest)
    assert first.stop() == 0
    served = start_server(data, plugins="medical", env={"CITYCARD_MEDICAL_DIR": str(data / "medical")})
    try:
        ready_file = data / "medical" / "ready.json"
        deadline = time.monotonic() + 60
        while not ready_file.exists():
            assert time.monotonic() < deadline, served.log_text()
            time.sleep(0.05)
        ready = json.loads(ready_file.read_text())
        operator = auth(Path(ready["operator_token_file"]).read_text().strip())
        medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(ready["address"]))
        pharmacy = auth(medical.AddInstitution(medical_pb2.AddInstitutionRequest(institution=medical_pb2.Institution(
            code="P3701401", name="老药房", kind="pharmacy", services=[medical_pb2.VISIT_TYPE_PHARMACY],
            opened="2020-01-01")), metadata=operator, timeout=TIMEOUT_S).bearer_token)
        id_number = citizen_id("19700101", 654)
        card = add_person_with_card(served, id_number)
        items = [medical_pb2.BillItem(code="XC01", quantity=1, unit_price_fen=2_800)]
        local = medical.Settle(medical_pb2.SettleRequest(
            institution="P3701401", bill_no="B1", card_number=card, id_number=id_number,
            visit=medical_pb2.VISIT_TYPE_PHARMACY, items=items), metadata=pharmacy, timeout=TIMEOUT_S).receipt
        assert (local.total_fen, local.insured_fen) == (2_800, 2_800)
        medical.RegisterPartnerCity(medical_pb2.RegisterPartnerCityRequest(code="110000", name="北京市", terms=(
            medical_pb2.PartnerTerms(effective_from="2026-01-01", outpatient_rate_per_mille=700,
                                     category_b_self_paid_per_mille=150, inpatient_deductible_fen=[1, 2, 3],
                                     inpatient_rate_per_mille=[900, 870, 850], annual_cap_fen=1))),
            metadata=operator, timeout=TIMEOUT_S)
        # `citycard serve` opened the clearing account the newer manifest names on the old registration.
        receipt = medical.SettleOutOfCity(medical_pb2.SettleOutOfCityRequest(
            institution="P3701401", bill_no="Y1", home_city="110000", home_insurance_number="110105198001010012",
            visit=medical_pb2.VISIT_TYPE_PHARMACY, items=items), metadata=pharmacy, timeout=TIMEOUT_S).receipt
        assert receipt.total_fen == 2_800
        assert "plugin accounts opened" in served.log_text()
    finally:
        assert served.stop() == 0, served.log_text()
