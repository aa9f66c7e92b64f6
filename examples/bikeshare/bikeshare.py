"""A city's public bike-share as a third-party application on the citizen card.

It knows nothing of citycard's Python package: it compiles its own stubs from the .proto files, registers
itself with the enrolment credential the card operator gave it, and books bike fares from riders' e-purses
into its own settlement account.

    python bikeshare.py --server 127.0.0.1:50051 --enrolment-token-file var/server/enrolment.token \
        --credential-file bikeshare.token --card A00000001 --fare-fen 150 --rides 2

Prints one JSON document: what it registered, what it booked, what its account holds. Exit code 0 if every
fare was booked (or had been booked before: fares are idempotent by ride id), 1 if any was refused.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto"
NAME = "bikeshare"
AID = "F00000000142494B45"  # a proprietary AID (F0...) with "BIKE" in it
PURSE_LEDGER = 2  # ledger.proto: 2 = PURSE, the cards' e-purses
PURCHASE, REFUND = 11, 4  # ledger.proto: built-in transfer codes
OPERATOR_SETTLEMENT = 5  # common.proto: ACCOUNT_KIND_OPERATOR_SETTLEMENT
TIMEOUT_S = 10.0


def compile_stubs(proto_dir: Path) -> dict[str, object]:
    """Generate Python stubs from the .proto files into a scratch folder and import them."""
    from importlib import resources

    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="bikeshare-stubs-"))
    protos = sorted(str(path) for path in (proto_dir / "citycard" / "v1").glob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    if protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                    f"--grpc_python_out={out}", *protos]) != 0:
        raise SystemExit("protoc failed")
    # Our own copy of the citycard.v1 package, not citycard's: put it first on the path.
    sys.path.insert(0, str(out))
    for name in [module for module in sys.modules if module == "citycard" or module.startswith("citycard.")]:
        del sys.modules[name]
    names = ("applications_pb2", "applications_pb2_grpc", "cards_pb2", "cards_pb2_grpc", "ledger_pb2",
             "ledger_pb2_grpc", "common_pb2")
    return {name: importlib.import_module(f"citycard.v1.{name}") for name in names}


def why(exc: grpc.RpcError) -> str:
    """The status code and the machine-readable reason of a refused call."""
    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return f"{exc.code().name}/{info.reason}: {exc.details()}"
    return f"{exc.code().name}: {exc.details()}"


def credential(api: dict, channel: grpc.Channel, args: argparse.Namespace) -> tuple[str, object]:
    """Our bearer token: the saved one, or a new registration with the operator's enrolment token."""
    applications = api["applications_pb2"]
    stub = api["applications_pb2_grpc"].ApplicationsStub(channel)
    saved = Path(args.credential_file)
    if saved.exists():
        token = saved.read_text().strip()
        found = stub.GetApplication(applications.GetApplicationRequest(name=NAME),
                                    metadata=[("authorization", f"Bearer {token}")], timeout=TIMEOUT_S)
        return token, found.application
    manifest = applications.Manifest(
        name=NAME, aid=AID, ledgers=[PURSE_LEDGER], transfer_codes=[PURCHASE, REFUND],
        accounts=[applications.AccountSpec(name="settlement", ledger=PURSE_LEDGER, kind=OPERATOR_SETTLEMENT)])
    enrolment = Path(args.enrolment_token_file).read_text().strip()
    registered = stub.RegisterApplication(applications.RegisterApplicationRequest(manifest=manifest),
                                          metadata=[("authorization", f"Bearer {enrolment}")], timeout=TIMEOUT_S)
    descriptor = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a secret: only we read it
    with os.fdopen(descriptor, "w") as file:
        file.write(registered.bearer_token + "\n")
    return registered.bearer_token, registered.application


def ride_id(card: str, ride: int, namespace: str) -> str:
    """A transfer id per ride, the same every time for the same ride (so a retry is never booked twice);
    below 2^124, as the API asks of applications."""
    return f"{uuid.uuid5(uuid.NAMESPACE_URL, f'{namespace}/{card}/{ride}').int >> 4:x}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--enrolment-token-file", required=True)
    parser.add_argument("--credential-file", required=True)
    parser.add_argument("--card", required=True, help="the rider's card number")
    parser.add_argument("--fare-fen", type=int, default=150)
    parser.add_argument("--rides", type=int, default=1)
    parser.add_argument("--ride-namespace", default="bikeshare-demo")
    parser.add_argument("--try-medical", action="store_true",
                        help="also try to take a fare from the MEDICAL ledger (refused: out of scope)")
    args = parser.parse_args(argv)
    api = compile_stubs(PROTO_DIR)
    ledger_pb2, cards_pb2 = api["ledger_pb2"], api["cards_pb2"]
    report: dict[str, object] = {"application": NAME}
    with grpc.insecure_channel(args.server) as channel:
        token, application = credential(api, channel, args)
        auth = [("authorization", f"Bearer {token}")]
        settlement = next(account.id for account in application.accounts if account.name == "settlement")
        report["settlement_account"] = settlement
        cards = api["cards_pb2_grpc"].CardsStub(channel)
        ledger = api["ledger_pb2_grpc"].LedgerStub(channel)
        card = cards.GetCard(cards_pb2.GetCardRequest(card_number=args.card), metadata=auth, timeout=TIMEOUT_S).card
        fares = [ledger_pb2.Transfer(id=ride_id(args.card, ride, args.ride_namespace),
                                     debit_account_id=card.purse_account_id, credit_account_id=settlement,
                                     amount_fen=args.fare_fen, ledger=PURSE_LEDGER, code=PURCHASE)
                 for ride in range(1, args.rides + 1)]
        answer = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=fares), metadata=auth,
                                        timeout=TIMEOUT_S)
        results = {error.index: ledger_pb2.TransferResult.Name(error.result) for error in answer.errors}
        report["fares"] = [{"id": fare.id, "amount_fen": fare.amount_fen, "result": results.get(index, "OK")}
                           for index, fare in enumerate(fares)]
        if args.try_medical:
            medical_fare = ledger_pb2.Transfer(id=ride_id(args.card, 0, "medical"), debit_account_id="1",
                                               credit_account_id=settlement, amount_fen=args.fare_fen, ledger=1,
                                               code=PURCHASE)
            try:
                ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[medical_fare]), metadata=auth,
                                       timeout=TIMEOUT_S)
                report["medical_attempt"] = "booked (this must never happen)"
            except grpc.RpcError as exc:
                report["medical_attempt"] = why(exc)
        balance = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=settlement),
                                           metadata=auth, timeout=TIMEOUT_S).balance
        report["settlement_credits_fen"] = balance.credits_posted_fen
    print(json.dumps(report, indent=2))
    refused = [fare for fare in report["fares"] if fare["result"] not in ("OK", "TRANSFER_RESULT_EXISTS")]
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
