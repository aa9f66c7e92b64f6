"""`citycard medical ...` and `citycard contributions import FILE` against the served Medical service."""

from __future__ import annotations

import argparse
import json

from citycard.core.identity import unit_check_character
from grpc_helpers import add_person_with_card, citizen_id

from citycard.commands import medical as medical_commands

UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="citycard")
    medical_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_import_settle_and_query(plugin_server, tmp_path, capsys):
    server, _ = plugin_server
    data = str(server.data_dir)
    id_number = citizen_id("19800101", 501)
    card = add_person_with_card(server, id_number)
    header = "month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n"
    bad = tmp_path / "bad.csv"
    bad.write_text(header + f"2026-10,{UNIT},{id_number},medical,1000000,60000,20000\n"
                   f"2026-10,{UNIT},{id_number},dental,1000000,60000,20000\n", encoding="utf-8")
    assert run(["contributions", "import", str(bad), "--data", data]) == 2
    err = capsys.readouterr().err
    assert "nothing imported, 1 problem(s)" in err and f"{bad}:3: insurance: 'dental'" in err
    assert run(["medical", "statement", id_number, "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["available_fen"] == 0

    good = tmp_path / "good.csv"
    good.write_text(header + f"2026-10,{UNIT},{id_number},medical,1000000,60000,20000\n"
                    f"2026-10,{UNIT},{id_number},pension,1000000,160000,80000\n", encoding="utf-8")
    assert run(["contributions", "import", str(good), "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["imported"], report["rows"], report["credited_fen"]) == (True, 2, 20_000)

    assert run(["medical", "institutions", "add", "P3701201", "--name", "平价药房", "--kind", "pharmacy",
                "--services", "pharmacy", "--data", data, "--json"]) == 0
    token = json.loads(capsys.readouterr().out)["bearer_token"]
    token_file = tmp_path / "pharmacy.token"
    token_file.write_text(token + "\n")
    assert run(["medical", "settle", "--institution", "P3701201", "--bill-no", "B9", "--card", card,
                "--id-number", id_number, "--visit", "pharmacy", "--item", "XA01:2:1250", "--item", "XC01:1:2800",
                "--token-file", str(token_file), "--data", data, "--json"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert (receipt["personal_account_fen"], receipt["insured_fen"]) == (2_500, 2_800)
    assert run(["medical", "settle", "--institution", "P3701201", "--bill-no", "B10", "--card", card,
                "--id-number", id_number, "--visit", "pharmacy", "--item", "NOPE:1:100",
                "--token-file", str(token_file), "--data", data]) == 2
    assert "MEDICAL_INVALID" in capsys.readouterr().err
    assert run(["medical", "records", id_number, "--data", data]) == 0
    assert "P3701201/B9" in capsys.readouterr().out
    assert run(["medical", "contributions", id_number, "--data", data, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accumulated_pension_fen"] == 240_000
    assert summary["accumulated_medical_credited_fen"] == 20_000


def test_cli_close_institution_then_its_bills_are_refused(plugin_server, tmp_path, capsys):
    server, _ = plugin_server
    data = str(server.data_dir)
    id_number = citizen_id("19800101", 502)
    card = add_person_with_card(server, id_number)
    assert run(["medical", "institutions", "add", "P3701202", "--name", "关停药房", "--kind", "pharmacy",
                "--services", "pharmacy", "--data", data, "--json"]) == 0
    token_file = tmp_path / "pharmacy.token"
    token_file.write_text(json.loads(capsys.readouterr().out)["bearer_token"])
    assert run(["medical", "institutions", "close", "P3701202", "--on", "2026-01-01", "--data", data]) == 0
    assert "designated until 2026-01-01" in capsys.readouterr().out
    assert run(["medical", "settle", "--institution", "P3701202", "--bill-no", "B1", "--card", card,
                "--id-number", id_number, "--visit", "pharmacy", "--item", "XA01:1:100",
                "--token-file", str(token_file), "--data", data]) == 2
    assert "MEDICAL_CLOSED" in capsys.readouterr().err
    assert run(["medical", "institutions", "close", "P9999999", "--on", "2026-01-01", "--data", data]) == 2
    assert "MEDICAL_NOT_FOUND" in capsys.readouterr().err
    assert run(["medical", "institutions", "close", "P3701202", "--on", "2019-01-01", "--data", data]) == 2
    assert "MEDICAL_INVALID" in capsys.readouterr().err


def test_cli_epurse_hold_released_when_the_chip_was_not_debited(plugin_server, tmp_path, capsys):
    server, _ = plugin_server
    data = str(server.data_dir)
    id_number = citizen_id("19800101", 503)
    card = add_person_with_card(server, id_number, load_fen=5_000)
    assert run(["medical", "institutions", "add", "P3701203", "--name", "电子钱包药房", "--kind", "pharmacy",
                "--services", "pharmacy", "--data", data, "--json"]) == 0
    token_file = tmp_path / "pharmacy.token"
    token_file.write_text(json.loads(capsys.readouterr().out)["bearer_token"])
    assert run(["medical", "settle", "--institution", "P3701203", "--bill-no", "E1", "--card", card,
                "--id-number", id_number, "--visit", "pharmacy", "--item", "XC01:1:2800", "--epurse",
                "--token-file", str(token_file), "--data", data, "--json"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert (held["insured_fen"], held["epurse_held_fen"], held["epurse_status"]) == (2_800, 2_800, "held")
    release = ["medical", "epurse-release", "--institution", "P3701203", "--bill-no", "E1",
               "--token-file", str(token_file), "--data", data]
    assert run([*release, "--json"]) == 0
    released = json.loads(capsys.readouterr().out)
    assert (released["epurse_status"], released["epurse_fen"], released["epurse_held_fen"]) == ("released", 0, 0)
    assert run(release) == 0 and "(replayed)" in capsys.readouterr().out   # again: the same, nothing more
    assert run([*release[:5], "E2", *release[6:]]) == 2
    assert "MEDICAL_NOT_FOUND" in capsys.readouterr().err
