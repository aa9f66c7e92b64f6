"""``citycard.v1.Medical`` over gRPC: translation between messages and ``MedicalService``, credentials,
and the one place where a ``MedicalError`` becomes a status code.

Hosted by the medical application's own process (``serve_medical``), beside its connection to the core.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from citycard.apps.medical.contributions import ImportRefused
from citycard.apps.medical.core_client import CoreClient, CoreError
from citycard.apps.medical.epurse import ChipPurchase, EpursePayments
from citycard.apps.medical.institutions import Institution, InstitutionError, InstitutionKind
from citycard.apps.medical.out_of_city import OutOfCity, report_csv
from citycard.apps.medical.partners import PartnerCity, PartnerTerms
from citycard.apps.medical.policy import HospitalLevel
from citycard.apps.medical.service import MedicalError, MedicalService
from citycard.apps.medical.split import BillItem, VisitType
from citycard.apps.medical.store import Store
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from citycard.v1 import medical_pb2, medical_pb2_grpc

__all__ = ["DOMAIN", "OPERATOR_TOKEN_FILE", "READY_FILE", "MedicalServicer", "RunningMedical", "serve_medical"]

DOMAIN = "citycard.v1.medical"
TOKEN_PREFIX = "ccm_"
OPERATOR_TOKEN_FILE = "operator.token"
READY_FILE = "ready.json"
STORE_FILE = "medical.sqlite"
WORKERS = 64  # requests in progress at once; most wait on the core, and the more wait, the larger the groups
log = logging.getLogger("citycard.apps.medical")

STATUS_OF_REASON = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT, "import_refused": grpc.StatusCode.INVALID_ARGUMENT,
    "not_designated": grpc.StatusCode.FAILED_PRECONDITION, "closed": grpc.StatusCode.FAILED_PRECONDITION,
    "not_open_yet": grpc.StatusCode.FAILED_PRECONDITION, "service_not_allowed": grpc.StatusCode.FAILED_PRECONDITION,
    "card_refused": grpc.StatusCode.FAILED_PRECONDITION, "account_frozen": grpc.StatusCode.FAILED_PRECONDITION,
    "exceeds_refundable": grpc.StatusCode.FAILED_PRECONDITION,
    "epurse_insufficient": grpc.StatusCode.FAILED_PRECONDITION,
    "precondition_failed": grpc.StatusCode.FAILED_PRECONDITION,
    "balance_changed": grpc.StatusCode.ABORTED, "ledger_refused": grpc.StatusCode.ABORTED,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS, "not_found": grpc.StatusCode.NOT_FOUND,
    "core_unavailable": grpc.StatusCode.UNAVAILABLE, "core_refused": grpc.StatusCode.ABORTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED, "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}
ENUM_OF_REASON = {"unauthenticated": "CREDENTIAL_REFUSED", "forbidden": "CREDENTIAL_REFUSED",
                  "core_refused": "LEDGER_REFUSED"}
VISIT_OF_ENUM = {medical_pb2.VISIT_TYPE_OUTPATIENT: VisitType.OUTPATIENT,
                 medical_pb2.VISIT_TYPE_PHARMACY: VisitType.PHARMACY,
                 medical_pb2.VISIT_TYPE_INPATIENT: VisitType.INPATIENT}
ENUM_OF_VISIT = {value: key for key, value in VISIT_OF_ENUM.items()}
OPERATOR = "operator"
INSTITUTION_METHODS = {"Settle", "Admit", "Discharge", "CancelAdmission", "Refund", "CompleteEpursePayment",
                       "SettleOutOfCity"}


def _abort(context: grpc.ServicerContext, reason: str, message: str, field: str | None = None,
           extra: list[Any] | None = None) -> None:
    code = STATUS_OF_REASON.get(reason, grpc.StatusCode.INTERNAL)
    name = "MEDICAL_" + ENUM_OF_REASON.get(reason, reason.upper())
    if name not in medical_pb2.MedicalErrorReason.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
        name = "MEDICAL_ERROR_REASON_UNSPECIFIED"
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(domain=DOMAIN, reason=name))
    details.append(info)
    if field:
        bad = any_pb2.Any()
        bad.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message[:500])]))
        details.append(bad)
    for message_extra in extra or []:
        packed = any_pb2.Any()
        packed.Pack(message_extra)
        details.append(packed)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message[:1000], details=details)
    context.abort_with_status(rpc_status.to_status(status))


def _items(items: Any) -> list[BillItem]:
    return [BillItem(item.code, int(item.quantity), int(item.unit_price_fen), item.name) for item in items]


def _receipt(body: dict[str, Any]) -> medical_pb2.Receipt:
    return medical_pb2.Receipt(
        bill=body["bill"], institution=body["institution"], institution_name=body["institution_name"],
        bill_no=body["bill_no"], holder_masked=body["holder"], card_number=body["card_number"],
        visit=ENUM_OF_VISIT[VisitType(body["visit"])], at=body["at"],
        **{name: body[name] for name in ("total_fen", "covered_fen", "category_b_self_paid_fen", "category_c_fen",
                                         "deductible_fen", "pooled_fund_fen", "personal_account_fen", "insured_fen",
                                         "capped")},
        items=[medical_pb2.ItemLine(**item) for item in body["items"]],
        payments=[medical_pb2.Payment(**payment) for payment in body["payments"]],
        balance_after_fen=body.get("balance_after_fen", 0), refunded_fen=body.get("refunded_fen", 0),
        replayed=bool(body.get("replayed")), epurse_fen=body.get("epurse_fen", 0),
        home_city=body.get("home_city", ""), home_city_name=body.get("home_city_name", ""),
        epurse_held_fen=body.get("epurse_held_fen", 0), epurse_status=body.get("epurse_status", ""),
        chip=medical_pb2.ChipPurchase(**body["chip"]) if body.get("chip") else None)


def _institution_message(institution: Institution) -> medical_pb2.Institution:
    return medical_pb2.Institution(
        code=institution.code, name=institution.name, kind=institution.kind.value, level=int(institution.level),
        services=sorted(ENUM_OF_VISIT[service] for service in institution.services),
        opened=institution.opened.isoformat(), closed=institution.closed.isoformat() if institution.closed else "",
        settlement_account_id=f"{institution.settlement_account_id:x}")


def _chip(message: medical_pb2.ChipPurchase) -> ChipPurchase:
    return ChipPurchase(**{field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields})


def _terms(message: medical_pb2.PartnerTerms) -> PartnerTerms:
    levels = (list(message.inpatient_deductible_fen), list(message.inpatient_rate_per_mille))
    if any(len(values) != 3 for values in levels):
        raise MedicalError("invalid", "terms: give the inpatient deductible and rate for hospital levels 1, 2 and 3",
                           field="terms.inpatient_deductible_fen")
    try:
        effective_from = _dt.date.fromisoformat(message.effective_from)
    except ValueError:
        raise MedicalError("invalid", f"terms.effective_from: {message.effective_from!r} is not YYYY-MM-DD",
                           field="terms.effective_from") from None
    return PartnerTerms(effective_from, int(message.outpatient_rate_per_mille),
                        int(message.category_b_self_paid_per_mille), tuple(levels[0]),  # type: ignore[arg-type]
                        tuple(levels[1]), int(message.annual_cap_fen))  # type: ignore[arg-type]


def _partner_message(partner: PartnerCity) -> medical_pb2.PartnerCity:
    return medical_pb2.PartnerCity(code=partner.code, name=partner.name, versions=[
        medical_pb2.PartnerTerms(**terms.to_json()) for terms in partner.versions])


def _clearing_report(report: dict[str, Any]) -> medical_pb2.ClearingReport:
    lines = [medical_pb2.ClearingLine(**{name: value for name, value in line.items() if name not in ("holder", "visit")},
                                      holder_masked=line["holder"], visit=ENUM_OF_VISIT[VisitType(line["visit"])])
             for line in report["lines"]]
    scalars = {name: value for name, value in report.items() if name not in ("lines", "reconciled")}
    return medical_pb2.ClearingReport(**scalars, lines=lines, reconciled=report["reconciled"],
                                      csv=report_csv(report).encode())


class MedicalServicer(medical_pb2_grpc.MedicalServicer):
    def __init__(self, service: MedicalService, operator_token: str) -> None:
        self.service = service
        self.out_of_city = OutOfCity(service)
        self.epurse = EpursePayments(service)
        self._operator_sha256 = hashlib.sha256(operator_token.encode()).hexdigest()

    def _caller(self, context: grpc.ServicerContext, method: str) -> str:
        """OPERATOR, or the code of the institution whose token was presented."""
        token = ""
        for key, value in context.invocation_metadata():
            if key == "authorization" and value.startswith("Bearer "):
                token = value[len("Bearer "):].strip()
        if not token:
            _abort(context, "unauthenticated", "no credential (metadata authorization: Bearer <token>)")
        digest = hashlib.sha256(token.encode()).hexdigest()
        if secrets.compare_digest(digest, self._operator_sha256):
            if method in INSTITUTION_METHODS:
                _abort(context, "forbidden", f"{method} is for a designated institution's terminal")
            return OPERATOR
        code = self.service.institution_of_token(digest)
        if code is None:
            _abort(context, "unauthenticated", "the credential is not one this service knows")
        if method not in INSTITUTION_METHODS:
            _abort(context, "forbidden", f"an institution may not call {method}")
        return code  # type: ignore[return-value]

    def _run(self, context: grpc.ServicerContext, method: str, institution: str | None,
             work: Callable[[], Any]) -> Any:
        caller = self._caller(context, method)
        if institution is not None and caller != institution:
            _abort(context, "forbidden", f"the credential is institution {caller}'s, not {institution!r}'s",
                   field="institution")
        try:
            return work()
        except MedicalError as exc:
            _abort(context, exc.reason, str(exc), exc.field)
        except ImportRefused as exc:
            problems = medical_pb2.ImportContributionsResponse(problems=[
                medical_pb2.ImportProblem(source=s, row=r, field=f, reason=why) for s, r, f, why in exc.problems])
            _abort(context, "import_refused", str(exc), extra=[problems])
        except CoreError as exc:
            _abort(context, exc.reason, str(exc))
        except InstitutionError as exc:
            _abort(context, "invalid" if exc.reason == "invalid" else exc.reason, str(exc))

    def Settle(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "Settle", request.institution, lambda: self.service.settle(
            institution=request.institution, bill_no=request.bill_no, card_number=request.card_number,
            id_number=request.id_number, visit=VISIT_OF_ENUM.get(request.visit, "unspecified"),
            items=_items(request.items), epurse=request.pay_insured_share_from_epurse))
        return medical_pb2.SettleResponse(receipt=_receipt(body))

    def Admit(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "Admit", request.institution, lambda: self.service.admit(
            institution=request.institution, admission_no=request.admission_no, card_number=request.card_number,
            id_number=request.id_number, expected_cost_fen=int(request.expected_cost_fen)))
        return medical_pb2.AdmitResponse(admission=body["admission"], holder_masked=body["holder"],
                                         hold_fen=body["hold_fen"], hold_transfer_id=body["hold_transfer_id"],
                                         replayed=bool(body.get("replayed")))

    def Discharge(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "Discharge", request.institution, lambda: self.service.discharge(
            institution=request.institution, admission_no=request.admission_no, items=_items(request.items)))
        return medical_pb2.SettleResponse(receipt=_receipt(body))

    def CancelAdmission(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "CancelAdmission", request.institution, lambda: self.service.cancel_admission(
            institution=request.institution, admission_no=request.admission_no))
        return medical_pb2.CancelAdmissionResponse(admission=body["admission"], released_fen=body["released_fen"])

    def Refund(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "Refund", request.institution, lambda: self.service.refund(
            institution=request.institution, refund_no=request.refund_no, bill_no=request.bill_no,
            amount_fen=int(request.amount_fen)))
        return medical_pb2.RefundResponse(
            refund=body["refund"], bill=body["bill"], amount_fen=body["amount_fen"],
            pooled_fund_fen=body["pooled_fund_fen"], personal_account_fen=body["personal_account_fen"],
            insured_fen=body["insured_fen"], replayed=bool(body.get("replayed")))

    def ListExpenseRecords(self, request, context):  # type: ignore[no-untyped-def]
        records = self._run(context, "ListExpenseRecords", None, lambda: self.service.expense_records(
            request.id_number, year=request.year or None))
        return medical_pb2.ListExpenseRecordsResponse(records=[_receipt(record) for record in records])

    def ImportContributions(self, request, context):  # type: ignore[no-untyped-def]
        def work() -> dict[str, Any]:
            try:
                text = request.csv.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MedicalError("invalid", f"{request.source or 'csv'}: not UTF-8 ({exc})", field="csv") from None
            return self.service.import_contributions(text, source=request.source or "<upload>")

        report = self._run(context, "ImportContributions", None, work)
        return medical_pb2.ImportContributionsResponse(rows=report["rows"], credits=report["credits"],
                                                       credited_fen=report["credited_fen"])

    def GetContributions(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "GetContributions", None, lambda: self.service.contributions(request.id_number))
        return medical_pb2.GetContributionsResponse(
            holder_masked=body["holder"],
            insurances=[medical_pb2.InsuranceHistory(
                insurance=name, months_paid=entry["months_paid"], employer_fen=entry["employer_fen"],
                individual_fen=entry["individual_fen"],
                history=[medical_pb2.ContributionMonth(**month) for month in entry["history"]])
                for name, entry in body["insurances"].items()],
            accumulated_pension_fen=body["accumulated_pension_fen"],
            accumulated_pension_individual_fen=body["accumulated_pension_individual_fen"],
            accumulated_medical_credited_fen=body["accumulated_medical_credited_fen"])

    def GetStatement(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "GetStatement", None, lambda: self.service.statement(request.id_number))
        return medical_pb2.GetStatementResponse(
            holder_masked=body["holder"], account_id=body["account_id"], available_fen=body["available_fen"],
            lines=[medical_pb2.StatementLine(**line) for line in body["lines"]])

    def AddInstitution(self, request, context):  # type: ignore[no-untyped-def]
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)

        def work() -> Institution:
            given = request.institution
            try:
                institution = Institution(
                    code=given.code, name=given.name, kind=InstitutionKind(given.kind),
                    level=HospitalLevel(given.level),
                    services=frozenset(VISIT_OF_ENUM[s] for s in given.services if s in VISIT_OF_ENUM),
                    opened=_dt.date.fromisoformat(given.opened),
                    closed=_dt.date.fromisoformat(given.closed) if given.closed else None,
                    settlement_account_id=int(given.settlement_account_id or self.service.core.institutions, 16))
            except ValueError as exc:
                raise MedicalError("invalid", f"institution: {exc}", field="institution") from None
            self.service.add_institution(institution, hashlib.sha256(token.encode()).hexdigest())
            return institution

        institution = self._run(context, "AddInstitution", None, work)
        return medical_pb2.AddInstitutionResponse(institution=_institution_message(institution), bearer_token=token)

    def CloseInstitution(self, request, context):  # type: ignore[no-untyped-def]
        def work() -> Institution:
            try:
                day = _dt.date.fromisoformat(request.closed_on)
            except ValueError:
                raise MedicalError("invalid", f"closed_on: {request.closed_on!r} is not YYYY-MM-DD",
                                   field="closed_on") from None
            return self.service.close_institution(request.code, day)

        institution = self._run(context, "CloseInstitution", None, work)
        return medical_pb2.CloseInstitutionResponse(institution=_institution_message(institution))

    def ListInstitutions(self, request, context):  # type: ignore[no-untyped-def]
        registry = self._run(context, "ListInstitutions", None, self.service.institutions)
        return medical_pb2.ListInstitutionsResponse(institutions=[_institution_message(i) for i in registry])


    def CompleteEpursePayment(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "CompleteEpursePayment", request.institution, lambda: self.epurse.complete(
            institution=request.institution, bill_no=request.bill_no,
            chip=_chip(request.chip) if request.HasField("chip") else None,
            card_not_debited=request.card_not_debited))
        return medical_pb2.SettleResponse(receipt=_receipt(body))

    def RegisterPartnerCity(self, request, context):  # type: ignore[no-untyped-def]
        partner = self._run(context, "RegisterPartnerCity", None, lambda: self.out_of_city.register_partner(
            request.code, request.name, _terms(request.terms)))
        return medical_pb2.RegisterPartnerCityResponse(partner=_partner_message(partner))

    def ListPartnerCities(self, request, context):  # type: ignore[no-untyped-def]
        partners = self._run(context, "ListPartnerCities", None, self.out_of_city.partners)
        return medical_pb2.ListPartnerCitiesResponse(partners=[_partner_message(p) for p in partners])

    def SettleOutOfCity(self, request, context):  # type: ignore[no-untyped-def]
        body = self._run(context, "SettleOutOfCity", request.institution, lambda: self.out_of_city.settle(
            institution=request.institution, bill_no=request.bill_no, home_city=request.home_city,
            home_number=request.home_insurance_number, visit=VISIT_OF_ENUM.get(request.visit, "unspecified"),
            items=_items(request.items)))
        return medical_pb2.SettleResponse(receipt=_receipt(body))

    def GetClearingReport(self, request, context):  # type: ignore[no-untyped-def]
        report = self._run(context, "GetClearingReport", None, lambda: self.out_of_city.report(
            request.partner_city, request.first_day, request.last_day))
        return _clearing_report(report)


def _operator_token(directory: Path) -> str:
    path = directory / OPERATOR_TOKEN_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(TOKEN_PREFIX + secrets.token_urlsafe(32) + "\n")
    return path.read_text(encoding="ascii").strip()


@dataclass
class RunningMedical:
    server: grpc.Server
    service: MedicalService
    address: str
    directory: Path

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()
        (self.directory / READY_FILE).unlink(missing_ok=True)
        self.service.store.close()


def serve_medical(core: CoreClient, directory: Path, listen: str = "127.0.0.1:0") -> RunningMedical:
    """Open the store in ``directory``, bind the Medical service, start it; ``directory/ready.json`` then
    tells clients its address (and where the operator's token is)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = _operator_token(directory)
    service = MedicalService(Store(directory / STORE_FILE), core)
    recovered = service.recover()
    if recovered:
        log.info("finished bookings left by a crash: %s", recovered)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="medical"))
    medical_pb2_grpc.add_MedicalServicer_to_server(MedicalServicer(service, token), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    host = listen.rpartition(":")[0] or "127.0.0.1"
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"
    ready = directory / READY_FILE
    scratch = ready.with_name(READY_FILE + ".tmp")
    scratch.write_text(json.dumps({"address": address, "pid": os.getpid(),
                                   "operator_token_file": str(directory / OPERATOR_TOKEN_FILE)}), encoding="utf-8")
    scratch.replace(ready)
    log.info("Medical service on %s", address)
    return RunningMedical(server, service, address, directory)
