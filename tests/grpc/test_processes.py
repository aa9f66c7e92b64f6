"""``citycard serve`` as an operator runs it: built-in applications in their own processes, the
auto-restore job inside the server, graceful shutdown, and a third party's plugin from examples/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_helpers import CALL_TIMEOUT_S, add_person_with_card, auth, citizen_id, start_server

from citycard.v1 import applications_pb2, cards_pb2, ledger_pb2

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bikeshare" / "bikeshare.py"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_serve_starts_the_builtin_plugins_and_stops_everything_on_sigterm(fresh_dir):
    server = start_server(fresh_dir, plugins="medical,transit")
    try:
        plugins = server.ready["plugins"]
        assert set(plugins) == {"medical", "transit"}
        assert all(alive(pid) for pid in plugins.values())
        listed = server.applications().ListApplications(applications_pb2.ListApplicationsRequest(),
                                                        metadata=auth(server.operator_token), timeout=CALL_TIMEOUT_S)
        by_name = {app.manifest.name: app for app in listed.applications}
        assert list(by_name["medical"].manifest.ledgers) == [1, 2]  # MEDICAL, and PURSE for the e-purse share
        assert list(by_name["transit"].manifest.ledgers) == [2]
        deadline = time.monotonic() + 30
        expected = ("running as application medical", "running as application transit")
        while not all(line in server.log_text() for line in expected) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "running as application medical" in server.log_text()
        assert "running as application transit" in server.log_text()
    finally:
        code = server.stop()
    assert code == 0
    assert not any(alive(pid) for pid in plugins.values())
    # A second start rotates the built-ins' credentials instead of registering them again.
    again = start_server(fresh_dir, plugins="medical")
    try:
        names = [app.manifest.name for app in again.applications().ListApplications(
            applications_pb2.ListApplicationsRequest(), metadata=auth(again.operator_token)).applications]
        assert sorted(names) == ["medical", "transit"]
    finally:
        assert again.stop() == 0


def test_the_server_restores_a_card_when_no_written_report_follows(fresh_dir):
    monday = {"CITYCARD_NOW": "2026-03-02T10:00:00+08:00"}
    id_number = citizen_id(sequence=131)
    server = start_server(fresh_dir, env=monday)
    try:
        card_number = add_person_with_card(server, id_number, "周八")
        report = server.cards().ReportLoss(cards_pb2.ReportLossRequest(
            actor="op2", card_number=card_number,
            phone=cards_pb2.PhoneReport(id_number=id_number, name="周八", gender=cards_pb2.GENDER_MALE)),
            metadata=auth(server.operator_token), timeout=CALL_TIMEOUT_S)
        assert report.card.state == cards_pb2.CARD_STATE_STOPPED
    finally:
        assert server.stop() == 0
    friday = {"CITYCARD_NOW": "2026-03-06T10:00:00+08:00"}  # past the end of the 2nd working day
    server = start_server(fresh_dir, env=friday, extra=["--tick-interval", "3600"])
    try:
        card = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            card = server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card_number),
                                          metadata=auth(server.operator_token), timeout=CALL_TIMEOUT_S).card
            if card.state == cards_pb2.CARD_STATE_ACTIVE:
                break
            time.sleep(0.1)
        assert card is not None and card.state == cards_pb2.CARD_STATE_ACTIVE
        assert '"msg": "lifecycle tick"' in server.log_text()
    finally:
        assert server.stop() == 0


def test_a_third_party_plugin_registers_itself_and_books_fares(fresh_dir):
    server = start_server(fresh_dir)
    try:
        card_number = add_person_with_card(server, citizen_id(sequence=133), load_fen=1_000)
        command = [sys.executable, str(EXAMPLE), "--server", server.address,
                   "--enrolment-token-file", server.ready["enrolment_token_file"],
                   "--credential-file", str(fresh_dir / "bikeshare.token"), "--card", card_number,
                   "--fare-fen", "150", "--rides", "3", "--try-medical"]
        first = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert [fare["result"] for fare in report["fares"]] == ["OK"] * 3
        assert report["settlement_credits_fen"] == 450
        assert report["medical_attempt"].startswith("PERMISSION_DENIED/MEDICAL_LEDGER_RESERVED")
        assert (fresh_dir / "bikeshare.token").stat().st_mode & 0o077 == 0
        # Run again: it uses its saved credential, and the same rides are not booked twice.
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        again = json.loads(second.stdout)
        assert [fare["result"] for fare in again["fares"]] == ["TRANSFER_RESULT_EXISTS"] * 3
        purse = server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card_number),
                                       metadata=auth(server.operator_token)).card.purse_account_id
        balance = server.ledger().GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=purse),
                                                    metadata=auth(server.operator_token)).balance
        assert balance.available_fen == 1_000 - 450
        token = (fresh_dir / "bikeshare.token").read_text().strip()
        assert token not in server.log_text()
    finally:
        assert server.stop() == 0


def test_a_second_server_on_the_same_port_fails_instead_of_sharing_it(fresh_dir, tmp_path):
    server = start_server(fresh_dir)
    try:
        clash = subprocess.run([sys.executable, "-m", "citycard.server", "--data", str(tmp_path / "other"),
                                "--listen", server.address, "--plugins", ""],
                               capture_output=True, text=True, timeout=60)
        assert clash.returncode != 0
        channel = grpc.insecure_channel(server.address)
        grpc.channel_ready_future(channel).result(timeout=10)
        channel.close()
    finally:
        assert server.stop() == 0
