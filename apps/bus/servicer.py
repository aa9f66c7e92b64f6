"""``citycard.v1.Transit`` over gRPC (asyncio: a thousand gates keep a stream open each), credentials, and
the one place where a ``TransitError`` becomes a status code.

Hosted by the transit application's own process (``serve_transit``), beside its connection to the core.
Two bearer tokens, created on first start in the application's directory: ``gate.token`` for gates (taps,
uploads, the denylist) and ``operator.token`` for the transit operator (settlement, and everything a gate
may do).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from citycard.apps.bus.denylist import delta_message
from citycard.apps.bus.service import TransitError, TransitService
from citycard.core import clock
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from citycard.v1 import transit_pb2, transit_pb2_grpc

__all__ = ["DOMAIN", "GATE_TOKEN_FILE", "OPERATOR_TOKEN_FILE", "READY_FILE", "TransitServicer", "settlement_csv",
           "write_ready"]

DOMAIN = "citycard.v1.transit"
TOKEN_PREFIX = "cct_"
GATE_TOKEN_FILE = "gate.token"
OPERATOR_TOKEN_FILE = "operator.token"
READY_FILE = "ready.json"
GATE, OPERATOR = "gate", "operator"
OPERATOR_ONLY = {"GetSettlement"}
STATUS_OF_REASON = {
    "INVALID": grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE": grpc.StatusCode.INVALID_ARGUMENT,
    "CREDENTIAL_REFUSED": grpc.StatusCode.UNAUTHENTICATED, "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "CORE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE, "BATCH_CONFLICT": grpc.StatusCode.ALREADY_EXISTS,
    "NOT_CONFIGURED": grpc.StatusCode.FAILED_PRECONDITION,
}
log = logging.getLogger("citycard.apps.bus")


async def _abort(context: grpc.aio.ServicerContext, reason: str, message: str, field: str | None = None,
                 code: grpc.StatusCode | None = None) -> NoReturn:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(domain=DOMAIN, reason="TRANSIT_" + reason))
    details = [info]
    if field:
        bad = any_pb2.Any()
        bad.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message[:500])]))
        details.append(bad)
    status_code = code or STATUS_OF_REASON.get(reason, grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=getattr(code_pb2, status_code.name), message=message[:1000], details=details)
    await context.abort(status_code, message[:1000], trailing_metadata=rpc_status.to_status(status).trailing_metadata)
    raise AssertionError("unreachable")  # context.abort raises


def _token(directory: Path, name: str) -> str:
    path = directory / name
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(TOKEN_PREFIX + secrets.token_urlsafe(32) + "\n")
    return path.read_text(encoding="ascii").strip()


class TransitServicer(transit_pb2_grpc.TransitServicer):
    def __init__(self, service: TransitService, directory: Path) -> None:
        self.service = service
        self._digests = {hashlib.sha256(_token(directory, GATE_TOKEN_FILE).encode()).hexdigest(): GATE,
                         hashlib.sha256(_token(directory, OPERATOR_TOKEN_FILE).encode()).hexdigest(): OPERATOR}

    async def _caller(self, context: grpc.aio.ServicerContext, method: str) -> str:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value.startswith("Bearer "):
                token = value[len("Bearer "):].strip()
        if not token:
            await _abort(context, "CREDENTIAL_REFUSED", "no credential (metadata authorization: Bearer <token>)")
        digest = hashlib.sha256(token.encode()).hexdigest()
        caller = next((who for known, who in self._digests.items() if secrets.compare_digest(known, digest)), None)
        if caller is None:
            await _abort(context, "CREDENTIAL_REFUSED", "the credential is not one this service knows")
        if method in OPERATOR_ONLY and caller != OPERATOR:
            await _abort(context, "CREDENTIAL_REFUSED", f"{method} is for the transit operator",
                         code=grpc.StatusCode.PERMISSION_DENIED)
        return caller  # type: ignore[return-value]

    async def Taps(self, request_iterator: AsyncIterator[transit_pb2.TapRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[transit_pb2.TapDecision]:
        await self._caller(context, "Taps")
        async for request in request_iterator:
            arrived = time.perf_counter_ns()
            yield await self.service.tap(request, arrived)

    async def UploadRecords(self, request: transit_pb2.UploadRecordsRequest,
                            context: grpc.aio.ServicerContext) -> transit_pb2.UploadRecordsResponse:
        await self._caller(context, "UploadRecords")
        try:
            return await self.service.upload(request)
        except TransitError as exc:
            await _abort(context, exc.reason, str(exc), exc.field)

    async def StreamDenylist(self, request: transit_pb2.StreamGateDenylistRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[transit_pb2.StreamGateDenylistResponse]:
        await self._caller(context, "StreamDenylist")
        async for delta in self.service.relay.subscribe(request.since_version, request.follow):
            yield delta_message(delta, time.time_ns())

    async def GetSettlement(self, request: transit_pb2.GetSettlementRequest,
                            context: grpc.aio.ServicerContext) -> transit_pb2.GetSettlementResponse:
        await self._caller(context, "GetSettlement")
        try:
            day = _dt.date.fromisoformat(request.date) if request.date else clock.today()
        except ValueError:
            await _abort(context, "INVALID", f"date: {request.date!r} is not YYYY-MM-DD", "date")
        try:
            found = await self.service.settlement(request.agency_id, day)
        except TransitError as exc:
            await _abort(context, exc.reason, str(exc), exc.field)
        return settlement_message(request.agency_id, day, found)

    async def GetFareNetwork(self, request: transit_pb2.GetFareNetworkRequest,
                             context: grpc.aio.ServicerContext) -> transit_pb2.GetFareNetworkResponse:
        await self._caller(context, "GetFareNetwork")
        network = self.service.network
        return transit_pb2.GetFareNetworkResponse(
            operators=[transit_pb2.Operator(agency_id=agency.agency_id, name=agency.name,
                                            settlement_account_id=f"{self.service.operator_accounts[agency.agency_id]:x}")
                       for agency in network.agencies.values() if agency.agency_id in self.service.operator_accounts],
            route_ids=sorted(network.routes), rider_category_ids=list(network.rider_categories),
            hold_minutes=network.policy.hold_limit_s // 60)


def settlement_message(agency_id: str, day: _dt.date, found: dict[str, Any]) -> transit_pb2.GetSettlementResponse:
    summary = found["summary"]
    concessions: dict[str, transit_pb2.ConcessionTotal] = {}
    online_taps = amount = 0
    for category, _mode, taps, fare, discount in summary["taps"]:
        total = concessions.setdefault(category, transit_pb2.ConcessionTotal(rider_category_id=category))
        total.taps += taps
        total.amount_fen += fare or 0
        total.discount_fen += discount or 0
        online_taps += taps
        amount += fare or 0
    for category, _reason, _count, fare in summary["charges"]:
        concessions.setdefault(category, transit_pb2.ConcessionTotal(rider_category_id=category)).amount_fen += fare
        amount += fare or 0
    _batches, records, _booked, booked_fen = summary["batches"]
    amount += booked_fen
    response = transit_pb2.GetSettlementResponse(
        agency_id=agency_id, date=day.isoformat(), online_taps=online_taps, offline_records=records,
        amount_fen=amount, ledger_received_fen=found["ledger_received_fen"],
        reconciled=amount == found["ledger_received_fen"],
        concessions=[concessions[key] for key in sorted(concessions)],
        rejected=[transit_pb2.RecordProblem(index=index, app_serial=serial, card_counter=counter,
                                            outcome=transit_pb2.RecordOutcome.Value("RECORD_" + outcome),
                                            message=f"{batch}: {message}")
                  for batch, index, serial, counter, outcome, message in summary["rejected"]])
    response.csv = settlement_csv(response, summary)
    return response


def settlement_csv(response: transit_pb2.GetSettlementResponse, summary: dict[str, Any]) -> str:
    """The operator's settlement file: one line per kind of income, then the totals and the rejections."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["agency_id", "date", "source", "rider_category", "count", "amount_fen", "discount_fen", "note"])
    for category, mode, taps, fare, discount in summary["taps"]:
        writer.writerow([response.agency_id, response.date, f"online_{mode}", category, taps, fare or 0,
                         discount or 0, ""])
    for category, reason, count, fare in summary["charges"]:
        writer.writerow([response.agency_id, response.date, "missing_tap_off", category, count, fare or 0, 0, reason])
    batches, records, booked, booked_fen = summary["batches"]
    writer.writerow([response.agency_id, response.date, "offline_records", "", booked, booked_fen, 0,
                     f"{batches} batches, {records} records uploaded"])
    writer.writerow([response.agency_id, response.date, "total", "", "", response.amount_fen, "",
                     f"ledger received {response.ledger_received_fen}; "
                     + ("reconciled" if response.reconciled else "NOT RECONCILED")])
    for batch, index, serial, counter, outcome, message in summary["rejected"]:
        writer.writerow([response.agency_id, response.date, "rejected_record", "", 1, 0, 0,
                         f"{batch}#{index} serial {serial} counter {counter}: {outcome}: {message}"])
    for key, card, amount, reason in summary.get("unbooked", ()):
        writer.writerow([response.agency_id, response.date, "unbooked_tap", "", 1, amount, 0,
                         (f"tap {key} of card {card}: the ledger refused its booking ({reason}); the gate's upload of "
                         "the chip record retries it")])
    return out.getvalue()


@dataclass
class ReadyFile:
    directory: Path

    def write(self, address: str) -> None:
        write_ready(self.directory, address)

    def remove(self) -> None:
        (self.directory / READY_FILE).unlink(missing_ok=True)


def write_ready(directory: Path, address: str) -> None:
    ready = directory / READY_FILE
    scratch = ready.with_name(READY_FILE + ".tmp")
    scratch.write_text(json.dumps({"address": address, "pid": os.getpid(),
                                   "gate_token_file": str(directory / GATE_TOKEN_FILE),
                                   "operator_token_file": str(directory / OPERATOR_TOKEN_FILE)}), encoding="utf-8")
    scratch.replace(ready)
