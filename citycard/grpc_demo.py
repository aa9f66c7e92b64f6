"""The gRPC act of ``citycard demo``: ``citycard serve`` with its built-in plugins, a day driven through
gRPC, and a plugin refused outside its scope.

``run_grpc_demo(data_dir, out)`` starts the server as its own process on a free loopback port (with the
medical and transit applications as processes of their own), acts as the operator's counter (persons,
cards, e-purse loads, a loss report), registers a third-party application at run time with the enrolment
credential and books its fares (unary and streamed), shows the denylist delta and a balance as of a past
instant, has the application try the MEDICAL ledger and another application's account (PERMISSION_DENIED,
nothing booked), and stops everything it started.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from citycard.core.identity import check_character
from citycard.v1 import (
    applications_pb2,
    applications_pb2_grpc,
    cards_pb2,
    cards_pb2_grpc,
    common_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
)

__all__ = ["run_grpc_demo"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0
PURSE, MEDICAL = 2, 1
PURCHASE = 11
PEOPLE = (("张伟", "19750312", 131, 5_000), ("李娜", "19880921", 142, 2_000))


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _reason(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return "-"


class _Server:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        ready = data_dir / "server.ready.json"
        ready.unlink(missing_ok=True)
        self.log_path = data_dir / "server.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "citycard.server", "--data", str(data_dir), "--listen", "127.0.0.1:0",
                 "--plugins", "medical,transit", "--ready-file", str(ready)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; see {self.log_path}")
            time.sleep(0.05)
        self.ready = json.loads(ready.read_text())

    def token(self, kind: str) -> tuple[tuple[str, str], ...]:
        token = Path(self.ready[f"{kind}_token_file"]).read_text().strip()
        return (("authorization", f"Bearer {token}"),)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def run_grpc_demo(data_dir: Path, out: Callable[[str], None]) -> None:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    server = _Server(data_dir)
    try:
        out(f"citycard serve is listening on {server.ready['address']} (its own process, pid {server.ready['pid']}); "
            f"built-in applications running as processes: "
            + ", ".join(f"{name} (pid {pid})" for name, pid in sorted(server.ready["plugins"].items())))
        with grpc.insecure_channel(server.ready["address"]) as channel:
            _day(channel, server, out)
    finally:
        code = server.stop()
        out(f"server stopped gracefully (exit code {code}); its plugins stopped with it. Logs: {server.log_path}")


def _day(channel: grpc.Channel, server: _Server, out: Callable[[str], None]) -> None:
    cards = cards_pb2_grpc.CardsStub(channel)
    ledger = ledger_pb2_grpc.LedgerStub(channel)
    apps = applications_pb2_grpc.ApplicationsStub(channel)
    operator = server.token("operator")
    listed = apps.ListApplications(applications_pb2.ListApplicationsRequest(), metadata=operator,
                                   timeout=CALL_TIMEOUT_S)
    for app in listed.applications:
        out(f"  registered: {app.manifest.name:8} AID {app.manifest.aid}, ledgers {list(app.manifest.ledgers)}, "
            f"codes {list(app.manifest.transfer_codes)}")

    out("At the counter (operator credential): persons, cards made on the spot, e-purse loads")
    purses: dict[str, str] = {}
    card_numbers: dict[str, str] = {}
    for name, birth, sequence, load in PEOPLE:
        body = f"370102{birth}{sequence:03d}"
        id_number = body + check_character(body)
        gender = cards_pb2.GENDER_MALE if sequence % 2 else cards_pb2.GENDER_FEMALE
        person = cards.AddPerson(cards_pb2.AddPersonRequest(
            actor="counter-01", id_number=id_number, name=name, gender=gender,
            date_of_birth=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", residence="济南市历下区",
            household_registration="济南市", status=cards_pb2.PERSON_STATUS_RETIRED),
            metadata=operator, timeout=CALL_TIMEOUT_S).person
        card = cards.IssueCard(cards_pb2.IssueCardRequest(actor="counter-01", holder_id_number=id_number),
                               metadata=operator, timeout=CALL_TIMEOUT_S).card
        cards.LoadPurse(cards_pb2.LoadPurseRequest(actor="counter-01", card_number=card.card_number,
                                                   amount_fen=load), metadata=operator, timeout=CALL_TIMEOUT_S)
        purses[name], card_numbers[name] = card.purse_account_id, card.card_number
        out(f"  {name} ({person.id_number_masked}): card {card.card_number} "
            f"{cards_pb2.CardState.Name(card.state)}, e-purse loaded with {_yuan(load)}")

    out("A partner registers its application at run time (enrolment credential): a public bike-share")
    registered = apps.RegisterApplication(applications_pb2.RegisterApplicationRequest(manifest=applications_pb2.Manifest(
        name="bikeshare", aid="F00000000142494B45", ledgers=[PURSE], transfer_codes=[PURCHASE],
        accounts=[applications_pb2.AccountSpec(name="settlement", ledger=PURSE,
                                               kind=common_pb2.ACCOUNT_KIND_OPERATOR_SETTLEMENT)])),
        metadata=server.token("enrolment"), timeout=CALL_TIMEOUT_S)
    bike = (("authorization", f"Bearer {registered.bearer_token}"),)
    settlement = registered.application.accounts[0].id
    out(f"  bikeshare: its own settlement account {settlement} opened; its bearer token was returned once")

    def fare(transfer_id: str, who: str, fen: int) -> ledger_pb2.Transfer:
        return ledger_pb2.Transfer(id=transfer_id, debit_account_id=purses[who], credit_account_id=settlement,
                                   amount_fen=fen, ledger=PURSE, code=PURCHASE)

    answer = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare("b1001", "张伟", 150)]),
                                    metadata=bike, timeout=CALL_TIMEOUT_S)
    morning = ledger.LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["b1001"]), metadata=bike,
                                     timeout=CALL_TIMEOUT_S).transfers[0].timestamp
    out(f"  morning ride, 张伟, 1.50: {'booked' if not answer.errors else 'refused'}")
    rides = [ledger_pb2.CreateTransfersStreamRequest(request_id=n, transfers=[fare(f"b2{n:03d}", who, 150)])
             for n, who in enumerate(["李娜", "张伟", "李娜", "李娜"], start=1)]
    rides.append(ledger_pb2.CreateTransfersStreamRequest(request_id=99, transfers=[fare("b2099", "李娜", 5_000)]))
    for response in ledger.CreateTransfersStream(iter(rides), metadata=bike, timeout=CALL_TIMEOUT_S):
        results = [ledger_pb2.TransferResult.Name(error.result) for error in response.errors]
        out(f"  streamed ride request {response.request_id}: {', '.join(results) if results else 'booked'}")

    report = cards.ReportLoss(cards_pb2.ReportLossRequest(
        actor="hotline-02", card_number=card_numbers["李娜"],
        phone=cards_pb2.PhoneReport(id_number=f"370102{PEOPLE[1][1]}{PEOPLE[1][2]:03d}"
                                    + check_character(f"370102{PEOPLE[1][1]}{PEOPLE[1][2]:03d}"),
                                    name="李娜", gender=cards_pb2.GENDER_FEMALE)), metadata=operator,
        timeout=CALL_TIMEOUT_S)
    delta = next(iter(cards.StreamDenylist(cards_pb2.StreamDenylistRequest(since_version=0), metadata=bike,
                                           timeout=CALL_TIMEOUT_S)))
    out(f"  李娜 reports her card lost by phone: {cards_pb2.CardState.Name(report.card.state)}; denylist version "
        f"{delta.version} lists {[entry.card_number for entry in delta.added]} for every gate")

    out("The bike-share tries to book outside its manifest:")
    purse_before = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=purses["张伟"]),
                                            metadata=operator, timeout=CALL_TIMEOUT_S).balance.available_fen
    transit_account = next(app.accounts[0].id for app in listed.applications if app.manifest.name == "transit")
    attempts = [
        ("a fare from the MEDICAL ledger", ledger_pb2.Transfer(
            id="b3001", debit_account_id="1", credit_account_id=settlement, amount_fen=150, ledger=MEDICAL,
            code=PURCHASE)),
        ("a fare paid into the transit application's account", ledger_pb2.Transfer(
            id="b3002", debit_account_id=purses["张伟"], credit_account_id=transit_account, amount_fen=150,
            ledger=PURSE, code=PURCHASE)),
        ("a load (code 10), which its manifest does not name", ledger_pb2.Transfer(
            id="b3003", debit_account_id=settlement, credit_account_id=purses["张伟"], amount_fen=150,
            ledger=PURSE, code=10)),
    ]
    for what, transfer in attempts:
        try:
            ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[transfer]), metadata=bike,
                                   timeout=CALL_TIMEOUT_S)
            out(f"  {what}: BOOKED (this must never happen)")
        except grpc.RpcError as exc:
            out(f"  {what}: {exc.code().name} ({_reason(exc)})")
    booked = ledger.LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["b3001", "b3002", "b3003"]),
                                    metadata=operator, timeout=CALL_TIMEOUT_S).transfers
    purse_after = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=purses["张伟"]),
                                           metadata=operator, timeout=CALL_TIMEOUT_S).balance.available_fen
    out(f"  nothing was booked: {len(booked)} of those transfers exist; 张伟's purse {_yuan(purse_before)} -> "
        f"{_yuan(purse_after)}")

    out("Balances at the end of the day (and as of the morning ride):")
    for name, account in (("张伟's e-purse", purses["张伟"]), ("李娜's e-purse", purses["李娜"]),
                          ("bikeshare settlement", settlement)):
        now = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=account), metadata=operator,
                                       timeout=CALL_TIMEOUT_S).balance
        then = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=account, as_of=morning),
                                        metadata=operator, timeout=CALL_TIMEOUT_S).balance
        out(f"  {name:22} {_yuan(now.available_fen if 'purse' in name else now.credits_posted_fen):>8}   "
            f"(after the morning ride: {_yuan(then.available_fen if 'purse' in name else then.credits_posted_fen)})")
