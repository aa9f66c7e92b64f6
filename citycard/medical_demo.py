"""The medical act of ``citycard demo``: an insured person's pharmacy purchase and hospital stay settled
through the card and gRPC, their contributions and expense records queried, and their medical balance
surviving a lost card and its replacement.

``run_medical_demo(data_dir, out)`` starts ``citycard serve`` (its own process, on a free loopback port)
with the medical application, whose process serves ``citycard.v1.Medical`` from ``DATA/medical``. It
expects a fresh ``data_dir``. The card is a virtual CPU card personalised for the person and read through
real PC/SC (pcscd + vsmartcard-vpcd); the holder's PIN is verified on the card and never leaves it.
Everything it started is stopped before it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from citycard.apps.medical.card_profile import card_in_pcsc_reader, card_profile_for
from citycard.apps.medical.counter import (
    CounterRefused,
    admit_at_counter,
    pay_share_from_chip,
    read_insured,
    refusal_reason,
    settle_at_counter,
)
from citycard.card import CardChannel, IssuerHost, MasterKeys, SoftSam, Terminal
from citycard.core.identity import check_character, mask_id, unit_check_character
from citycard.v1 import cards_pb2, cards_pb2_grpc, medical_pb2, medical_pb2_grpc

__all__ = ["run_medical_demo"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
PIN = "135790"
TERMINAL_ID = bytes.fromhex("370100000009")
UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")
PHARMACY, HOSPITAL = "P3701001", "H3701001"
V = medical_pb2


def _yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


@contextlib.contextmanager
def _server(data_dir: Path, out: Callable[[str], None]) -> Iterator[tuple[dict, dict]]:
    ready_file = data_dir / "server.ready.json"
    medical_ready = data_dir / "medical" / "ready.json"
    log_path = data_dir / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "citycard.server", "--data", str(data_dir), "--listen", "127.0.0.1:0",
             "--plugins", "medical", "--ready-file", str(ready_file)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "CITYCARD_MEDICAL_DIR": str(data_dir / "medical")})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (ready_file.exists() and medical_ready.exists()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server or the medical application did not start; see {log_path}")
            time.sleep(0.05)
        core, medical = json.loads(ready_file.read_text()), json.loads(medical_ready.read_text())
        out(f"citycard serve on {core['address']} (pid {process.pid}); the medical application serves "
            f"citycard.v1.Medical on {medical['address']} from {data_dir / 'medical'}")
        yield core, medical
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(STOP_TIMEOUT_S)
        out(f"server stopped (exit code {process.returncode})")


def _auth(path: str | Path) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {Path(path).read_text().strip()}"),)


def run_medical_demo(data_dir: Path, out: Callable[[str], None]) -> None:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _server(data_dir, out) as (core, medical_ready), tempfile.TemporaryDirectory(prefix="citycard-med-") as tmp:
        operator = _auth(core["operator_token_file"])
        medical_operator = _auth(medical_ready["operator_token_file"])
        cards = cards_pb2_grpc.CardsStub(grpc.insecure_channel(core["address"]))
        medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(medical_ready["address"]))
        _Act(out, cards, medical, operator, medical_operator, Path(tmp)).run()


class _Act:
    def __init__(self, out, cards, medical, operator, medical_operator, workdir: Path) -> None:  # type: ignore[no-untyped-def]
        self.out, self.cards, self.medical = out, cards, medical
        self.operator, self.medical_operator, self.workdir = operator, medical_operator, workdir
        self.keys = MasterKeys.generate()  # a throw-away issuer: no key is written anywhere
        body = "370102" + "19850312" + "003"
        self.id_number = body + check_character(body)
        self.masked = mask_id(self.id_number)

    def run(self) -> None:
        card = self.register()
        tokens = self.designate()
        self.contributions()
        with self.reader(card) as terminal:
            insured = self.at_counter(terminal)
            self.pharmacy(insured, tokens[PHARMACY], terminal)
            self.hospital(insured, tokens[HOSPITAL])
        self.queries()
        self.out_of_city(tokens[PHARMACY])
        self.lost_and_replaced(card, tokens[PHARMACY])

    def register(self) -> cards_pb2.Card:
        self.cards.AddEmployer(cards_pb2.AddEmployerRequest(actor="demo", unit_code=UNIT, name="济南示例科技有限公司"),
                               metadata=self.operator, timeout=CALL_TIMEOUT_S)
        self.cards.AddPerson(cards_pb2.AddPersonRequest(
            actor="demo", id_number=self.id_number, name="张伟", gender=cards_pb2.GENDER_MALE,
            date_of_birth="1985-03-12", residence="济南市历下区", household_registration="济南市",
            status=cards_pb2.PERSON_STATUS_EMPLOYED, employer_unit_code=UNIT), metadata=self.operator,
            timeout=CALL_TIMEOUT_S)
        card = self.cards.IssueCard(cards_pb2.IssueCardRequest(actor="demo", holder_id_number=self.id_number),
                                    metadata=self.operator, timeout=CALL_TIMEOUT_S).card
        self.cards.LoadPurse(cards_pb2.LoadPurseRequest(actor="demo", card_number=card.card_number, amount_fen=5_000),
                             metadata=self.operator, timeout=CALL_TIMEOUT_S)
        self.out(f"-- 张伟 ({self.masked}) is insured through his employer; card {card.card_number} issued, "
                 "50.00 loaded onto its e-purse at the counter")
        return card

    def designate(self) -> dict[str, tuple[tuple[str, str], ...]]:
        tokens: dict[str, tuple[tuple[str, str], ...]] = {}
        for code, name, kind, level, services in (
                (PHARMACY, "漱玉平民大药房（定点零售药店）", "pharmacy", 0, [V.VISIT_TYPE_PHARMACY]),
                (HOSPITAL, "济南市第一人民医院（三级）", "hospital", 3, [V.VISIT_TYPE_OUTPATIENT, V.VISIT_TYPE_INPATIENT])):
            answer = self.medical.AddInstitution(V.AddInstitutionRequest(institution=V.Institution(
                code=code, name=name, kind=kind, level=level, services=services, opened="2020-01-01")),
                metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
            tokens[code] = (("authorization", f"Bearer {answer.bearer_token}"),)
            self.out(f"-- designated {code} {name}; its terminal gets its own credential")
        return tokens

    def contributions(self) -> None:
        header = "month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n"
        bad = header + f"2026-08,{UNIT},{self.id_number},medical,800000,48000,16000\n" \
                       f"2026-08,{UNIT},{self.id_number[:-1]}0,pension,800000,128000,64000\n"
        self.out("-- the employer's August file has a mistyped ID number:")
        try:
            self.medical.ImportContributions(V.ImportContributionsRequest(source="2026-08.csv", csv=bad.encode()),
                                             metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            self.out(f"   refused, {refusal_reason(exc)}: {exc.details()}")
        rows = "".join(f"{month},{UNIT},{self.id_number},{insurance},800000,{employer},{individual}\n"
                       for month in ("2026-08", "2026-09", "2026-10")
                       for insurance, employer, individual in (
                           ("pension", 128_000, 64_000), ("medical", 48_000, 16_000), ("unemployment", 5_600, 1_600),
                           ("work_injury", 4_000, 0), ("maternity", 6_400, 0)))
        report = self.medical.ImportContributions(V.ImportContributionsRequest(source="2026-08-10.csv",
                                                                               csv=(header + rows).encode()),
                                                  metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
        self.out(f"-- the corrected file: {report.rows} rows imported; the individual medical share (2 % of the "
                 f"8,000.00 base) credited to the personal account: {_yuan(report.credited_fen)}")

    @contextlib.contextmanager
    def reader(self, card: cards_pb2.Card) -> Iterator[Terminal]:
        profile = card_profile_for(card_number=card.card_number, card_id_code=card.card_id_code,
                                   id_number=self.id_number, name="张伟", pin=PIN)
        with card_in_pcsc_reader(profile, self.keys, self.workdir / card.card_number,
                                 lambda line: self.out(f"   {line}")) as transport:
            yield Terminal(CardChannel(transport), SoftSam(self.keys, TERMINAL_ID), host=IssuerHost(self.keys))

    def at_counter(self, terminal: Terminal) -> object:
        self.out("-- at the pharmacy counter: the terminal reads the holder from the card (PC/SC), "
                 "the holder types the PIN")
        try:
            read_insured(terminal, "000000")
        except CounterRefused as refused:
            self.out(f"   a mistyped PIN: {refused}")
        insured = read_insured(terminal, PIN)
        self.out(f"   card {insured.card_number}, holder {mask_id(insured.id_number)}: PIN verified on the card")
        return insured

    def pharmacy(self, insured, token, terminal: Terminal) -> None:  # type: ignore[no-untyped-def]
        terminal.load(5_000)  # the chip's e-purse gets the 50.00 its shadow got at the counter
        held = settle_at_counter(self.medical, token, insured, institution=PHARMACY, bill_no="2026112500017",
                                 visit=V.VISIT_TYPE_PHARMACY, epurse=True, items=[
                                     V.BillItem(code="XA01", quantity=2, unit_price_fen=1_250),
                                     V.BillItem(code="XB01", quantity=3, unit_price_fen=4_385),
                                     V.BillItem(code="XC01", quantity=1, unit_price_fen=2_800)])
        self.out(f"-- the bill's chain holds the insured's {_yuan(held.epurse_held_fen)} on the e-purse shadow; "
                 "the terminal debits the chip")
        receipt = pay_share_from_chip(self.medical, token, terminal, held)
        self.receipt("pharmacy purchase (the insured's share from the e-purse, debited on the chip)", receipt)
        self.out(f"   chip purchase: card {receipt.chip.card_number}, offline counter {receipt.chip.offline_counter}, "
                 f"TAC {receipt.chip.tac}; the chip's e-purse now holds {_yuan(terminal.balance())}")

    def hospital(self, insured, token) -> None:  # type: ignore[no-untyped-def]
        admitted = admit_at_counter(self.medical, token, insured, institution=HOSPITAL, admission_no="ZY0042",
                                    expected_cost_fen=500_000)
        self.out(f"-- admitted to {HOSPITAL} as ZY0042: the pooled fund holds {_yuan(admitted.hold_fen)} "
                 "(expected 5,000.00; deductible 800.00; 82 % at level 3)")
        receipt = self.medical.Discharge(V.DischargeRequest(institution=HOSPITAL, admission_no="ZY0042", items=[
            V.BillItem(code="S101", quantity=10, unit_price_fen=6_000),
            V.BillItem(code="S103", quantity=1, unit_price_fen=350_000),
            V.BillItem(code="S102", quantity=2, unit_price_fen=45_000),
            V.BillItem(code="S199", quantity=5, unit_price_fen=10_000)]), metadata=token,
            timeout=CALL_TIMEOUT_S).receipt
        self.receipt("discharge (the hold posted with the real bill)", receipt)

    def receipt(self, what: str, receipt: medical_pb2.Receipt) -> None:
        self.out(f"-- {what} {receipt.bill}, {receipt.institution_name}:")
        for item in receipt.items:
            self.out(f"   {item.code} {item.name} x{item.quantity} {_yuan(item.amount_fen):>9} [{item.category}] "
                     f"covered {_yuan(item.covered_fen)}")
        self.out(f"   total {_yuan(receipt.total_fen)} = pooled fund {_yuan(receipt.pooled_fund_fen)} + personal "
                 f"account {_yuan(receipt.personal_account_fen)} + insured {_yuan(receipt.insured_fen)} "
                 f"(e-purse {_yuan(receipt.epurse_fen)}, cash {_yuan(receipt.insured_fen - receipt.epurse_fen)}); "
                 f"personal account now {_yuan(receipt.balance_after_fen)}")

    def queries(self) -> None:
        records = self.medical.ListExpenseRecords(V.ListExpenseRecordsRequest(id_number=self.id_number),
                                                  metadata=self.medical_operator, timeout=CALL_TIMEOUT_S).records
        self.out(f"-- expense records of {self.masked}:")
        for record in records:
            self.out(f"   {record.at} {record.institution_name}: {_yuan(record.total_fen)} (pooled "
                     f"{_yuan(record.pooled_fund_fen)}, personal {_yuan(record.personal_account_fen)}, insured "
                     f"{_yuan(record.insured_fen)})")
        summary = self.medical.GetContributions(V.GetContributionsRequest(id_number=self.id_number),
                                                metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
        self.out("-- contributions: " + "; ".join(f"{i.insurance} {i.months_paid} months" for i in summary.insurances))
        self.out(f"   accumulated pension {_yuan(summary.accumulated_pension_fen)}, credited to the medical "
                 f"account {_yuan(summary.accumulated_medical_credited_fen)}")
        self.statement()

    def out_of_city(self, token) -> None:  # type: ignore[no-untyped-def]
        """An insured of Beijing at the same pharmacy: Beijing's fund pays through the clearing account."""
        self.medical.RegisterPartnerCity(V.RegisterPartnerCityRequest(code="110000", name="北京市", terms=(
            V.PartnerTerms(effective_from="2026-01-01", outpatient_rate_per_mille=700,
                           category_b_self_paid_per_mille=150, inpatient_deductible_fen=[30_000, 60_000, 130_000],
                           inpatient_rate_per_mille=[900, 870, 850], annual_cap_fen=50_000_000))),
            metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
        receipt = self.medical.SettleOutOfCity(V.SettleOutOfCityRequest(
            institution=PHARMACY, bill_no="2026112500021", home_city="110000",
            home_insurance_number="110105198001010012", visit=V.VISIT_TYPE_PHARMACY, items=[
                V.BillItem(code="XA01", quantity=2, unit_price_fen=1_250),
                V.BillItem(code="XB01", quantity=3, unit_price_fen=4_385),
                V.BillItem(code="XC01", quantity=1, unit_price_fen=2_800)]), metadata=token,
            timeout=CALL_TIMEOUT_S).receipt
        self.out(f"-- out-of-city: an insured of {receipt.home_city_name} ({receipt.holder_masked}) at {PHARMACY}: "
                 f"total {_yuan(receipt.total_fen)} = {receipt.home_city_name} fund {_yuan(receipt.pooled_fund_fen)} "
                 f"(70 % of the covered part, through the clearing account) + insured {_yuan(receipt.insured_fen)}")
        day = receipt.at[:10]
        report = self.medical.GetClearingReport(V.ClearingReportRequest(partner_city="110000", first_day=day,
                                                                        last_day=day),
                                                metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
        self.out(f"   clearing report with {report.partner_name} for {day}: {report.bills} bill(s), "
                 f"{report.partner_name} owes {_yuan(report.owed_by_partner_fen)}; the clearing account on the "
                 f"ledger: {_yuan(report.clearing_account_net_fen)} in debit; "
                 f"{'reconciled' if report.reconciled else 'NOT reconciled'}")

    def statement(self, *, show: bool = True) -> int:
        statement = self.medical.GetStatement(V.GetStatementRequest(id_number=self.id_number),
                                              metadata=self.medical_operator, timeout=CALL_TIMEOUT_S)
        if not show:
            return int(statement.available_fen)
        self.out("-- personal account statement:")
        for line in statement.lines:
            self.out(f"   {line.at} {line.code:<13} {_yuan(line.amount_fen):>9}  balance {_yuan(line.balance_fen)}")
        return int(statement.available_fen)

    def lost_and_replaced(self, card: cards_pb2.Card, token) -> None:  # type: ignore[no-untyped-def]
        before = self.statement(show=False)
        self.cards.ReportLoss(cards_pb2.ReportLossRequest(actor="demo", card_number=card.card_number,
                                                          written=cards_pb2.WrittenReport(
                                                              holder_id_number=self.id_number, holder_name="张伟")),
                              metadata=self.operator, timeout=CALL_TIMEOUT_S)
        self.out(f"-- card {card.card_number} reported lost in writing: card and medical account frozen")
        bill = [V.BillItem(code="XA02", quantity=1, unit_price_fen=1_880)]
        from citycard.apps.medical.counter import InsuredAtCounter

        old = InsuredAtCounter(card.card_number, self.id_number, "张伟")  # whoever holds the lost card
        try:
            settle_at_counter(self.medical, token, old, institution=PHARMACY, bill_no="2026112500031",
                              visit=V.VISIT_TYPE_PHARMACY, items=bill)
        except grpc.RpcError as exc:
            self.out(f"   the lost card at a pharmacy: refused, {refusal_reason(exc)}: {exc.details()}")
        new = self.cards.ReplaceCard(cards_pb2.ReplaceCardRequest(actor="demo", card_number=card.card_number),
                                     metadata=self.operator, timeout=CALL_TIMEOUT_S).new_card
        self.out(f"-- replacement card {new.card_number} issued; it reaches the same medical account at once")
        with self.reader(new) as terminal:
            insured = read_insured(terminal, PIN)
            receipt = settle_at_counter(self.medical, token, insured, institution=PHARMACY, bill_no="2026112500032",
                                        visit=V.VISIT_TYPE_PHARMACY, items=bill)
        self.out(f"   balance before the loss {_yuan(before)}; with the new card a purchase of "
                 f"{_yuan(receipt.total_fen)} leaves {_yuan(receipt.balance_after_fen)}: nothing was lost")
