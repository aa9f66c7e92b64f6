"""``citycard medical ...`` and ``citycard contributions import FILE``: the Medical service from the shell.

The commands are gRPC clients of ``citycard.v1.Medical``, which the medical application serves from its
own process (apps/medical/README.md). They find it through ``DATA/medical/ready.json`` (or
``--medical HOST:PORT``). Operator commands use ``DATA/medical/operator.token``; the institution's own
commands (settle, admit, discharge, cancel-admission, refund) need ``--token-file`` with the token
``medical institutions add`` printed once.

    citycard medical institutions add P3701001 --name 漱玉平民大药房 --kind pharmacy --services pharmacy
    citycard contributions import 2026-10.csv
    citycard medical settle --token-file p.token --institution P3701001 --bill-no B1 --card A00000001 \\
        --id-number 370102198503120038 --visit pharmacy --item XA01:2:1250 --item XC01:1:2800
    citycard medical records 370102198503120038 --json
    citycard medical partners add 110000 --name 北京市 --from 2026-01-01 --outpatient-rate-per-mille 700 \
        --b-self-paid-per-mille 150 --deductible-fen 30000,60000,130000 --rate-per-mille 900,870,850 \
        --annual-cap-fen 50000000
    citycard medical settle-out-of-city --token-file p.token --institution P3701001 --bill-no Y1 \
        --home-city 110000 --home-number 110105198001010012 --visit pharmacy --item XA01:2:1250
    citycard medical clearing-report 110000 --from 2026-11-01 --to 2026-11-30 --csv beijing-2026-11.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from citycard.commands.common import EXIT_REFUSED, add_common_options, emit, fen, table
from citycard.v1 import medical_pb2, medical_pb2_grpc

__all__ = ["register"]

TIMEOUT_S = 30.0
VISITS: dict[str, medical_pb2.VisitType] = {"outpatient": medical_pb2.VISIT_TYPE_OUTPATIENT, "pharmacy": medical_pb2.VISIT_TYPE_PHARMACY,
          "inpatient": medical_pb2.VISIT_TYPE_INPATIENT}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("medical", help="medical insurance: settlement, records, statements")
    commands = parser.add_subparsers(dest="medical_command", required=True, metavar="MEDICAL_COMMAND")

    institutions = commands.add_parser("institutions", help="designated hospitals, clinics and pharmacies")
    inst_commands = institutions.add_subparsers(dest="institutions_command", required=True, metavar="COMMAND")
    add = inst_commands.add_parser("add", help="designate an institution; prints its terminal token once")
    add.add_argument("code")
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=("hospital", "clinic", "pharmacy"))
    add.add_argument("--level", type=int, default=0, choices=(0, 1, 2, 3))
    add.add_argument("--services", required=True, help="comma-separated: outpatient, pharmacy, inpatient")
    add.add_argument("--opened", default="2020-01-01", metavar="YYYY-MM-DD")
    add.add_argument("--closed", default="", metavar="YYYY-MM-DD")
    _client_options(add)
    add.set_defaults(handler=_handler(_add_institution))
    close = inst_commands.add_parser("close", help="end a designation: from that day its bills are refused")
    close.add_argument("code")
    close.add_argument("--on", required=True, metavar="YYYY-MM-DD", help="the first day it may no longer bill")
    _client_options(close)
    close.set_defaults(handler=_handler(_close_institution))
    listing = inst_commands.add_parser("list", help="the designated institutions")
    _client_options(listing)
    listing.set_defaults(handler=_handler(_list_institutions))

    settle = commands.add_parser("settle", help="settle an outpatient or pharmacy bill (an institution's call)")
    _bill_options(settle, number="--bill-no")
    settle.add_argument("--card", required=True)
    settle.add_argument("--id-number", required=True)
    settle.add_argument("--visit", required=True, choices=("outpatient", "pharmacy"))
    settle.add_argument("--epurse", action="store_true", help="hold the insured's share on the card's e-purse "
                        "shadow; the counter terminal debits the chip and completes the payment")
    settle.set_defaults(handler=_handler(_settle))

    release = commands.add_parser("epurse-release", help="the chip was not debited: release a bill's e-purse "
                                                         "hold (the share is paid in cash)")
    release.add_argument("--institution", required=True)
    release.add_argument("--bill-no", required=True)
    _client_options(release, token=True)
    release.set_defaults(handler=_handler(_release_epurse))

    admit = commands.add_parser("admit", help="admit an inpatient: a hold on the pooled fund")
    admit.add_argument("--institution", required=True)
    admit.add_argument("--admission-no", required=True)
    admit.add_argument("--card", required=True)
    admit.add_argument("--id-number", required=True)
    admit.add_argument("--expected-cost-fen", type=int, required=True)
    _client_options(admit, token=True)
    admit.set_defaults(handler=_handler(_admit))

    discharge = commands.add_parser("discharge", help="settle a stay with the real bill")
    _bill_options(discharge, number="--admission-no")
    discharge.set_defaults(handler=_handler(_discharge))

    cancel = commands.add_parser("cancel-admission", help="cancel an admission; its hold is released")
    cancel.add_argument("--institution", required=True)
    cancel.add_argument("--admission-no", required=True)
    _client_options(cancel, token=True)
    cancel.set_defaults(handler=_handler(_cancel))

    refund = commands.add_parser("refund", help="give back (part of) a settled bill")
    refund.add_argument("--institution", required=True)
    refund.add_argument("--refund-no", required=True)
    refund.add_argument("--bill-no", required=True)
    refund.add_argument("--amount-fen", type=int, default=0, help="default: all that is left")
    _client_options(refund, token=True)
    refund.set_defaults(handler=_handler(_refund))

    for name, help_text, handler in (("records", "the insured's expense records", _records),
                                     ("contributions", "payment history of the five insurances", _contributions),
                                     ("statement", "the personal account statement", _statement)):
        query = commands.add_parser(name, help=help_text)
        query.add_argument("id_number")
        _client_options(query)
        query.set_defaults(handler=_handler(handler))

    _register_out_of_city(commands)

    contributions = subparsers.add_parser("contributions", help="monthly contribution files of the employers")
    contribution_commands = contributions.add_subparsers(dest="contributions_command", required=True,
                                                         metavar="COMMAND")
    importer = contribution_commands.add_parser("import", help="import a CSV file: all rows or none")
    importer.add_argument("file", type=Path)
    _client_options(importer)
    importer.set_defaults(handler=_handler(_import))


def _register_out_of_city(commands: argparse._SubParsersAction) -> None:
    partners = commands.add_parser("partners", help="partner cities whose insured settle here (out-of-city)")
    partner_commands = partners.add_subparsers(dest="partners_command", required=True, metavar="COMMAND")
    add = partner_commands.add_parser("add", help="register a partner city, or a new version of its terms")
    add.add_argument("code", help="the city's region code (6 digits)")
    add.add_argument("--name", required=True)
    add.add_argument("--from", dest="effective_from", required=True, metavar="YYYY-MM-DD")
    add.add_argument("--outpatient-rate-per-mille", type=int, required=True)
    add.add_argument("--b-self-paid-per-mille", type=int, required=True)
    add.add_argument("--deductible-fen", required=True, metavar="L1,L2,L3", help="inpatient, per hospital level")
    add.add_argument("--rate-per-mille", required=True, metavar="L1,L2,L3", help="inpatient, per hospital level")
    add.add_argument("--annual-cap-fen", type=int, required=True)
    _client_options(add)
    add.set_defaults(handler=_handler(_add_partner))
    listing = partner_commands.add_parser("list", help="the partner cities and their terms")
    _client_options(listing)
    listing.set_defaults(handler=_handler(_list_partners))

    settle = commands.add_parser("settle-out-of-city", help="settle the bill of a partner city's insured "
                                                            "(an institution's call)")
    _bill_options(settle, number="--bill-no")
    settle.add_argument("--home-city", required=True, help="the partner city's region code")
    settle.add_argument("--home-number", required=True, help="the insured's number in the home city")
    settle.add_argument("--visit", required=True, choices=tuple(VISITS))
    settle.set_defaults(handler=_handler(_settle_out_of_city))

    report = commands.add_parser("clearing-report", help="bills of a partner city's insured in a period, "
                                                         "reconciled with the clearing account")
    report.add_argument("partner_city")
    report.add_argument("--from", dest="first_day", required=True, metavar="YYYY-MM-DD")
    report.add_argument("--to", dest="last_day", required=True, metavar="YYYY-MM-DD")
    report.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write the report as CSV")
    _client_options(report)
    report.set_defaults(handler=_handler(_clearing_report))


def _client_options(parser: argparse.ArgumentParser, *, token: bool = False) -> None:
    add_common_options(parser, unmask=False)
    parser.add_argument("--medical", default=None, metavar="HOST:PORT",
                        help="the Medical service (default: from DATA/medical/ready.json)")
    if token:
        parser.add_argument("--token-file", type=Path, required=True, help="the institution's token file")


def _bill_options(parser: argparse.ArgumentParser, *, number: str) -> None:
    parser.add_argument("--institution", required=True)
    parser.add_argument(number, required=True)
    parser.add_argument("--item", action="append", required=True, metavar="CODE:QUANTITY:UNIT_PRICE_FEN")
    _client_options(parser, token=True)


class _Refused(Exception):
    pass


def _handler(work):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        try:
            return int(work(args) or 0)
        except _Refused as exc:
            print(f"citycard: error: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except grpc.RpcError as exc:
            from citycard.apps.medical.counter import refusal_reason

            reason = refusal_reason(exc) or exc.code().name  # type: ignore[attr-defined]
            print(f"citycard: error: {reason}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return EXIT_REFUSED
    return run


def _stub(args: argparse.Namespace) -> medical_pb2_grpc.MedicalStub:
    address = args.medical
    if address is None:
        ready = Path(args.data) / "medical" / "ready.json"
        if not ready.exists():
            raise _Refused(f"{ready} not found: is `citycard serve` running with the medical application "
                           "(CITYCARD_MEDICAL_DIR set)? or give --medical HOST:PORT")
        address = json.loads(ready.read_text(encoding="utf-8"))["address"]
    return medical_pb2_grpc.MedicalStub(grpc.insecure_channel(address))


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    path = getattr(args, "token_file", None) or Path(args.data) / "medical" / "operator.token"
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise _Refused(f"cannot read the token in {path}: {exc.strerror}") from None
    return (("authorization", f"Bearer {token}"),)


def _items(texts: list[str]) -> list[medical_pb2.BillItem]:
    items = []
    for index, text in enumerate(texts):
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise _Refused(f"--item {index + 1}: {text!r} is not CODE:QUANTITY:UNIT_PRICE_FEN")
        items.append(medical_pb2.BillItem(code=parts[0], quantity=int(parts[1]), unit_price_fen=int(parts[2])))
    return items


def _document(message: Any) -> dict[str, Any]:
    """The message as JSON, with amounts as numbers (protobuf's JSON writes int64 as strings)."""
    return _fen_numbers(json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True))


def _fen_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: int(item) if key.endswith("_fen") and isinstance(item, str) else _fen_numbers(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_fen_numbers(item) for item in value]
    return value


def _show_receipt(args: argparse.Namespace, receipt: medical_pb2.Receipt) -> int:
    def render(out: Any) -> None:
        out.print(f"{receipt.bill} {receipt.institution_name} {receipt.at} holder {receipt.holder_masked}"
                  f"{' (replayed)' if receipt.replayed else ''}")
        out.print(table("items", ("code", "name", "cat.", "qty", "amount", "covered", "self-paid"), (
            (i.code, i.name, i.category, i.quantity, fen(i.amount_fen), fen(i.covered_fen), fen(i.self_paid_fen))
            for i in receipt.items)))
        if receipt.home_city:
            out.print(f"total {fen(receipt.total_fen)}: {receipt.home_city_name} ({receipt.home_city}) fund "
                      f"{fen(receipt.pooled_fund_fen)} through the clearing account, insured {fen(receipt.insured_fen)}")
            return
        held = f", held on the e-purse {fen(receipt.epurse_held_fen)}" if receipt.epurse_held_fen else ""
        out.print(f"total {fen(receipt.total_fen)}: pooled fund {fen(receipt.pooled_fund_fen)}, personal account "
                  f"{fen(receipt.personal_account_fen)}, insured {fen(receipt.insured_fen)} (e-purse "
                  f"{fen(receipt.epurse_fen)}{held}); "
                  f"balance after {fen(receipt.balance_after_fen)}")

    emit(args, _document(receipt), render)
    return 0


def _add_institution(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.services.split(",")]
    if any(name not in VISITS for name in names):
        raise _Refused(f"--services: {args.services!r}; choose from {', '.join(VISITS)}")
    services = [VISITS[name] for name in names]
    answer = _stub(args).AddInstitution(medical_pb2.AddInstitutionRequest(institution=medical_pb2.Institution(
        code=args.code, name=args.name, kind=args.kind, level=args.level, services=services, opened=args.opened,
        closed=args.closed)), metadata=_metadata(args), timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(
        f"designated {answer.institution.code} {answer.institution.name}; its terminal token (shown once):\n"
        f"{answer.bearer_token}"))
    return 0


def _close_institution(args: argparse.Namespace) -> int:
    answer = _stub(args).CloseInstitution(medical_pb2.CloseInstitutionRequest(code=args.code, closed_on=args.on),
                                          metadata=_metadata(args), timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(
        f"{answer.institution.code} {answer.institution.name}: designated until {answer.institution.closed}"))
    return 0


def _list_institutions(args: argparse.Namespace) -> int:
    answer = _stub(args).ListInstitutions(medical_pb2.ListInstitutionsRequest(), metadata=_metadata(args),
                                          timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(table("designated institutions", (
        "code", "name", "kind", "level", "services", "opened", "closed"), (
        (i.code, i.name, i.kind, i.level, ", ".join(medical_pb2.VisitType.Name(s)[11:].lower() for s in i.services),
         i.opened, i.closed or "-") for i in answer.institutions))))
    return 0


def _settle(args: argparse.Namespace) -> int:
    answer = _stub(args).Settle(medical_pb2.SettleRequest(
        institution=args.institution, bill_no=args.bill_no, card_number=args.card, id_number=args.id_number,
        visit=VISITS[args.visit], items=_items(args.item), pay_insured_share_from_epurse=args.epurse),
        metadata=_metadata(args), timeout=TIMEOUT_S)
    return _show_receipt(args, answer.receipt)


def _release_epurse(args: argparse.Namespace) -> int:
    answer = _stub(args).CompleteEpursePayment(medical_pb2.CompleteEpursePaymentRequest(
        institution=args.institution, bill_no=args.bill_no, card_not_debited=True), metadata=_metadata(args),
        timeout=TIMEOUT_S)
    return _show_receipt(args, answer.receipt)


def _admit(args: argparse.Namespace) -> int:
    answer = _stub(args).Admit(medical_pb2.AdmitRequest(
        institution=args.institution, admission_no=args.admission_no, card_number=args.card,
        id_number=args.id_number, expected_cost_fen=args.expected_cost_fen), metadata=_metadata(args),
        timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(
        f"admitted {answer.admission} ({answer.holder_masked}); pooled fund hold {fen(answer.hold_fen)}"))
    return 0


def _discharge(args: argparse.Namespace) -> int:
    answer = _stub(args).Discharge(medical_pb2.DischargeRequest(
        institution=args.institution, admission_no=args.admission_no, items=_items(args.item)),
        metadata=_metadata(args), timeout=TIMEOUT_S)
    return _show_receipt(args, answer.receipt)


def _cancel(args: argparse.Namespace) -> int:
    answer = _stub(args).CancelAdmission(medical_pb2.CancelAdmissionRequest(
        institution=args.institution, admission_no=args.admission_no), metadata=_metadata(args), timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(
        f"cancelled {answer.admission}; released {fen(answer.released_fen)}"))
    return 0


def _refund(args: argparse.Namespace) -> int:
    answer = _stub(args).Refund(medical_pb2.RefundRequest(
        institution=args.institution, refund_no=args.refund_no, bill_no=args.bill_no, amount_fen=args.amount_fen),
        metadata=_metadata(args), timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(
        f"refund {answer.refund} of {answer.bill}: {fen(answer.amount_fen)} (pooled fund "
        f"{fen(answer.pooled_fund_fen)}, personal account {fen(answer.personal_account_fen)}, insured "
        f"{fen(answer.insured_fen)})"))
    return 0


def _records(args: argparse.Namespace) -> int:
    answer = _stub(args).ListExpenseRecords(medical_pb2.ListExpenseRecordsRequest(id_number=args.id_number),
                                            metadata=_metadata(args), timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(table("expense records", (
        "bill", "institution", "at", "visit", "total", "pooled fund", "personal account", "insured", "refunded"), (
        (r.bill, r.institution_name, r.at, medical_pb2.VisitType.Name(r.visit)[11:].lower(), fen(r.total_fen),
         fen(r.pooled_fund_fen), fen(r.personal_account_fen), fen(r.insured_fen), fen(r.refunded_fen))
        for r in answer.records))))
    return 0


def _contributions(args: argparse.Namespace) -> int:
    answer = _stub(args).GetContributions(medical_pb2.GetContributionsRequest(id_number=args.id_number),
                                          metadata=_metadata(args), timeout=TIMEOUT_S)

    def render(out: Any) -> None:
        out.print(table(f"contributions of {answer.holder_masked}", (
            "insurance", "months paid", "employer part", "individual part"), (
            (i.insurance, i.months_paid, fen(i.employer_fen), fen(i.individual_fen)) for i in answer.insurances)))
        out.print(f"accumulated pension {fen(answer.accumulated_pension_fen)} (individual "
                  f"{fen(answer.accumulated_pension_individual_fen)}); credited to the medical personal account "
                  f"{fen(answer.accumulated_medical_credited_fen)}")

    emit(args, _document(answer), render)
    return 0


def _statement(args: argparse.Namespace) -> int:
    answer = _stub(args).GetStatement(medical_pb2.GetStatementRequest(id_number=args.id_number),
                                      metadata=_metadata(args), timeout=TIMEOUT_S)

    def render(out: Any) -> None:
        out.print(table(f"personal account of {answer.holder_masked}", ("at", "movement", "amount", "balance"), (
            (line.at, line.code, fen(line.amount_fen), fen(line.balance_fen)) for line in answer.lines)))
        out.print(f"available {fen(answer.available_fen)}")

    emit(args, _document(answer), render)
    return 0


def _import(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise _Refused(f"{args.file}: {exc.strerror}") from None
    stub = _stub(args)
    try:
        answer = stub.ImportContributions(medical_pb2.ImportContributionsRequest(source=str(args.file), csv=data),
                                          metadata=_metadata(args), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        problems = _import_problems(exc)
        if not problems:
            raise
        if args.json:
            print(json.dumps({"imported": False, "problems": problems}, ensure_ascii=False, indent=2))
        else:
            print(f"citycard: error: {args.file}: nothing imported, {len(problems)} problem(s):", file=sys.stderr)
            for problem in problems:
                print(f"  {problem['source']}:{problem['row']}: {problem['field']}: {problem['reason']}",
                      file=sys.stderr)
        return EXIT_REFUSED
    emit(args, {"imported": True, **_document(answer)}, lambda out: out.print(
        f"imported {answer.rows} rows from {args.file}; {answer.credits} personal accounts credited "
        f"{fen(answer.credited_fen)}"))
    return 0


def _import_problems(exc: grpc.RpcError) -> list[dict[str, Any]]:
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(medical_pb2.ImportContributionsResponse.DESCRIPTOR):
            report = medical_pb2.ImportContributionsResponse()
            detail.Unpack(report)
            return [{"source": p.source, "row": p.row, "field": p.field, "reason": p.reason} for p in report.problems]
    return []


def _three(text: str, option: str) -> list[int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise _Refused(f"{option}: {text!r} is not three whole numbers L1,L2,L3")
    return [int(part) for part in parts]


def _add_partner(args: argparse.Namespace) -> int:
    terms = medical_pb2.PartnerTerms(
        effective_from=args.effective_from, outpatient_rate_per_mille=_non_negative(args.outpatient_rate_per_mille,
                                                                                 "--outpatient-rate-per-mille"),
        category_b_self_paid_per_mille=_non_negative(args.b_self_paid_per_mille, "--b-self-paid-per-mille"),
        inpatient_deductible_fen=_three(args.deductible_fen, "--deductible-fen"),
        inpatient_rate_per_mille=_three(args.rate_per_mille, "--rate-per-mille"),
        annual_cap_fen=_non_negative(args.annual_cap_fen, "--annual-cap-fen"))
    answer = _stub(args).RegisterPartnerCity(medical_pb2.RegisterPartnerCityRequest(
        code=args.code, name=args.name, terms=terms), metadata=_metadata(args), timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(
        f"partner city {answer.partner.code} {answer.partner.name}: {len(answer.partner.versions)} version(s) "
        f"of its terms, the latest from {answer.partner.versions[-1].effective_from}"))
    return 0


def _non_negative(value: int, option: str) -> int:
    if value < 0:
        raise _Refused(f"{option}: {value} is negative")
    return value


def _list_partners(args: argparse.Namespace) -> int:
    answer = _stub(args).ListPartnerCities(medical_pb2.ListPartnerCitiesRequest(), metadata=_metadata(args),
                                           timeout=TIMEOUT_S)
    emit(args, _document(answer), lambda out: out.print(table("partner cities", (
        "code", "name", "from", "outpatient", "B self-paid", "deductible L1/L2/L3", "rate L1/L2/L3", "annual cap"), (
        (p.code, p.name, t.effective_from, f"{t.outpatient_rate_per_mille}‰", f"{t.category_b_self_paid_per_mille}‰",
         "/".join(fen(v) for v in t.inpatient_deductible_fen), "/".join(f"{v}‰" for v in t.inpatient_rate_per_mille),
         fen(t.annual_cap_fen)) for p in answer.partners for t in p.versions))))
    return 0


def _settle_out_of_city(args: argparse.Namespace) -> int:
    answer = _stub(args).SettleOutOfCity(medical_pb2.SettleOutOfCityRequest(
        institution=args.institution, bill_no=args.bill_no, home_city=args.home_city,
        home_insurance_number=args.home_number, visit=VISITS[args.visit], items=_items(args.item)),
        metadata=_metadata(args), timeout=TIMEOUT_S)
    return _show_receipt(args, answer.receipt)


def _clearing_report(args: argparse.Namespace) -> int:
    answer = _stub(args).GetClearingReport(medical_pb2.ClearingReportRequest(
        partner_city=args.partner_city, first_day=args.first_day, last_day=args.last_day),
        metadata=_metadata(args), timeout=TIMEOUT_S)
    if args.csv is not None:
        try:
            args.csv.write_bytes(answer.csv)
        except OSError as exc:
            raise _Refused(f"{args.csv}: {exc.strerror}") from None
    document = _document(answer)
    document.pop("csv")

    def render(out: Any) -> None:
        out.print(table(f"clearing with {answer.partner_city} {answer.partner_name}, {answer.first_day} to "
                        f"{answer.last_day}", ("bill", "day", "holder", "visit", "total", "home fund", "insured",
                                               "on ledger"), (
            (line.bill, line.day, line.holder_masked, medical_pb2.VisitType.Name(line.visit)[11:].lower(),
             fen(line.total_fen), fen(line.home_fund_fen), fen(line.insured_fen), "yes" if line.on_ledger else "NO")
            for line in answer.lines)))
        out.print(f"{answer.bills} bills, total {fen(answer.total_fen)}: home city's fund {fen(answer.home_fund_fen)}, "
                  f"insured {fen(answer.insured_fen)}; {answer.partner_name} owes {fen(answer.owed_by_partner_fen)}")
        out.print(f"ledger: this period {fen(answer.ledger_period_fen)}, all time {fen(answer.ledger_all_time_fen)} "
                  f"(records {fen(answer.records_all_time_fen)}); clearing account net "
                  f"{fen(answer.clearing_account_net_fen)} (records, all partners "
                  f"{fen(answer.records_all_partners_fen)}): {'reconciled' if answer.reconciled else 'NOT RECONCILED'}"
                  + (f"; on the ledger only: {', '.join(answer.unmatched_transfer_ids)}"
                     if answer.unmatched_transfer_ids else ""))

    emit(args, document, render)
    return 0 if answer.reconciled else EXIT_REFUSED
