"""Running a real ``citycard serve`` in a process of its own, and reading the statuses it answers with."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from citycard.v1 import (
    applications_pb2,
    applications_pb2_grpc,
    cards_pb2,
    cards_pb2_grpc,
    common_pb2,
    ledger_pb2_grpc,
)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    data_dir: Path
    address: str
    ready: dict[str, Any]
    log_path: Path
    _channel: grpc.Channel | None = None

    @property
    def operator_token(self) -> str:
        return Path(self.ready["operator_token_file"]).read_text().strip()

    @property
    def enrolment_token(self) -> str:
        return Path(self.ready["enrolment_token_file"]).read_text().strip()

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def ledger(self) -> ledger_pb2_grpc.LedgerStub:
        return ledger_pb2_grpc.LedgerStub(self.channel)

    def cards(self) -> cards_pb2_grpc.CardsStub:
        return cards_pb2_grpc.CardsStub(self.channel)

    def applications(self) -> applications_pb2_grpc.ApplicationsStub:
        return applications_pb2_grpc.ApplicationsStub(self.channel)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT_S)


def start_server(data_dir: Path, *, plugins: str = "", extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> RunningServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    ready_file = data_dir / "ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = data_dir / "server.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - the server process owns it
    command = [sys.executable, "-m", "citycard.server", "--data", str(data_dir), "--listen", "127.0.0.1:0",
               "--plugins", plugins, "--ready-file", str(ready_file), *(extra or [])]
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    log_file.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start in time:\n{log_path.read_text()}")
        time.sleep(0.05)
    ready = json.loads(ready_file.read_text())
    return RunningServer(process, data_dir, ready["address"], ready, log_path)


# The packed form's 128-byte record exactly as ledger.proto documents it, written with struct and NOT with the
# server's own dtype, so that the tests hold the server to the documented layout.
PACKED_RECORD = struct.Struct("<16s16s16s16s16s16sQQIIHHI")
assert PACKED_RECORD.size == 128


def packed_record(*, id: int, debit_account_id: int, credit_account_id: int, amount_fen: int, ledger: int,
                  code: int, pending_id: int = 0, ref_id: int = 0, user_data: int = 0, timeout_seconds: int = 0,
                  flags: int = 0, reserved_104: int = 0, reserved_124: int = 0) -> bytes:
    """One packed transfer (ids as ints: u128, low 64 bits first, little-endian)."""
    def u128(value: int) -> bytes:
        return value.to_bytes(16, "little")

    return PACKED_RECORD.pack(u128(id), u128(debit_account_id), u128(credit_account_id), u128(pending_id),
                              u128(ref_id), u128(user_data), amount_fen, reserved_104, timeout_seconds, ledger,
                              code, flags, reserved_124)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def refusal(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, str | None]:
    """(status code, ErrorInfo reason, BadRequest field) of a refused call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    reason, field = "", None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                assert info.domain == "citycard.v1"
                assert info.reason in common_pb2.ErrorReason.keys(), info.reason
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                field = bad.field_violations[0].field
    return exc.code(), reason, field


def refusal_field(exc: grpc.RpcError) -> str | None:
    """The field named in a refusal's ErrorInfo metadata (PERMISSION_DENIED names one too, without BadRequest)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.metadata.get("field")
    return None


# -- a small world: a person with a card and money on its e-purse, and a partner application ---------------

def citizen_id(birth: str = "19800501", sequence: int = 123, region: str = "370102") -> str:
    from citycard.core.identity import check_character

    body = f"{region}{birth}{sequence:03d}"
    return body + check_character(body)


def add_person_with_card(server: RunningServer, id_number: str, name: str = "张三", *, load_fen: int = 0) -> str:
    """Register a retired person, issue a card at the counter, load its purse; the card number."""
    cards = server.cards()
    operator = auth(server.operator_token)
    birth = id_number[6:14]
    gender = cards_pb2.GENDER_MALE if int(id_number[14:17]) % 2 else cards_pb2.GENDER_FEMALE
    cards.AddPerson(cards_pb2.AddPersonRequest(
        actor="op1", id_number=id_number, name=name, gender=gender,
        date_of_birth=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", residence="济南市历下区",
        household_registration="济南市", status=cards_pb2.PERSON_STATUS_RETIRED), metadata=operator,
        timeout=CALL_TIMEOUT_S)
    card = cards.IssueCard(cards_pb2.IssueCardRequest(actor="op1", holder_id_number=id_number),
                           metadata=operator, timeout=CALL_TIMEOUT_S).card
    if load_fen:
        cards.LoadPurse(cards_pb2.LoadPurseRequest(actor="op1", card_number=card.card_number, amount_fen=load_fen),
                        metadata=operator, timeout=CALL_TIMEOUT_S)
    return card.card_number


def purse_manifest(name: str = "bikeshare", codes: tuple[int, ...] = (11, 4)) -> applications_pb2.Manifest:
    return applications_pb2.Manifest(
        name=name, aid=("F0" + name.encode().hex().upper())[:32], ledgers=[2], transfer_codes=list(codes),
        accounts=[applications_pb2.AccountSpec(name="settlement", ledger=2,
                                               kind=common_pb2.ACCOUNT_KIND_OPERATOR_SETTLEMENT)])


def register(server: RunningServer, manifest: applications_pb2.Manifest, *, token: str | None = None
             ) -> applications_pb2.RegisterApplicationResponse:
    return server.applications().RegisterApplication(
        applications_pb2.RegisterApplicationRequest(manifest=manifest),
        metadata=auth(token or server.enrolment_token), timeout=CALL_TIMEOUT_S)
