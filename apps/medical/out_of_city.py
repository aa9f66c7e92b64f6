"""Out-of-city treatment: partner cities, settling a bill of a partner city's insured, the clearing report.

Booking: the medical application's ``clearing`` account (a FUND on MEDICAL) pays the institution what the
home city's fund owes for the bill (``POOLED_FUND_PAYMENT``, one transfer); the insured pays the rest at
the counter. The clearing account is one for all partners; each of its transfers carries the partner in
its ``user_data`` (``region code << 96 | 96 bits of the bill's reference``), so the ledger alone says
which partner owes what, and the clearing report reconciles the records with the ledger per partner.
The clearing account runs into debit: its net debit is what the partner cities owe this city.

Intent before booking, idempotent resend, recovery at start: as for local bills (service.py), in the
store's ``out_of_city_bills`` table. A bill number is one namespace per institution for local and
out-of-city bills together.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import re
from collections.abc import Sequence
from typing import Any

from citycard.apps.medical.core_client import CoreError
from citycard.apps.medical.partners import PartnerCity, PartnerError, PartnerTerms, split_for_partner
from citycard.apps.medical.service import MedicalError, MedicalService, _digest, _hex, _number, transfer_id
from citycard.apps.medical.split import BillItem, Split, VisitType
from citycard.apps.medical.store import dumps
from citycard.core import clock
from citycard.core.identity import mask_id
from citycard.core.records import LedgerId, TransferCode

__all__ = ["CSV_COLUMNS", "OutOfCity", "clearing_tag", "partner_of_tag", "report_csv"]

HOME_NUMBER = re.compile(r"^[0-9A-Z]{6,30}$")
TAG_SHIFT = 96
REPORT_DAYS_MAX = 366
INTENT_SQL = ("INSERT INTO out_of_city_bills (key, partner, home_number, institution, digest, visit, day, year, at_ns, "
              "total_fen, home_fund_fen, insured_fen, body, status) VALUES "
              "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent')")
CSV_COLUMNS = ("partner_city", "bill", "institution", "day", "holder", "visit", "total_fen", "home_fund_fen",
               "insured_fen", "transfer_id", "on_ledger")


def clearing_tag(partner: str, key: str) -> str:
    """The ``user_data`` of a clearing transfer: the partner's region code, then the bill's reference."""
    return _hex(int(partner) << TAG_SHIFT | transfer_id("ref", key) & ((1 << TAG_SHIFT) - 1))


def partner_of_tag(user_data: str) -> str:
    value = int(user_data or "0", 16) >> TAG_SHIFT
    return f"{value:06d}" if value else ""


def _day(text: str, field: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise MedicalError("invalid", f"{field}: {text!r} is not a date written YYYY-MM-DD", field=field) from None


class OutOfCity:
    def __init__(self, medical: MedicalService) -> None:
        self.medical = medical
        self.store = medical.store
        self.core = medical.core

    # -- partner cities --------------------------------------------------------------------------------

    def register_partner(self, code: str, name: str, terms: PartnerTerms) -> PartnerCity:
        """Register a partner city, or add a version of its terms (the same version again changes nothing)."""
        try:
            terms.policy(self.medical.policies.at(terms.effective_from))  # every parameter checked
            with self.store.transaction() as db:
                row = db.execute("SELECT body FROM partner_cities WHERE code = ?", (code,)).fetchone()
                if row is None:
                    partner = PartnerCity(code, name, (terms,))
                else:
                    partner = PartnerCity.from_json(json.loads(row["body"]))
                    if partner.name != name:
                        raise PartnerError(f"partner city {code} is registered as {partner.name!r}", field="name")
                    partner = partner.with_version(terms)
                db.execute("INSERT OR REPLACE INTO partner_cities (code, body) VALUES (?, ?)",
                           (code, dumps(partner.to_json())))
        except PartnerError as exc:
            raise MedicalError("invalid", str(exc), field=exc.field) from None
        except ValueError as exc:  # the local policy has no version on that date
            raise MedicalError("invalid", f"terms.effective_from: {exc}", field="terms.effective_from") from None
        return partner

    def partners(self) -> list[PartnerCity]:
        return [PartnerCity.from_json(json.loads(row["body"]))
                for row in self.store.all("SELECT body FROM partner_cities ORDER BY code")]

    def partner(self, code: str) -> PartnerCity:
        row = self.store.one("SELECT body FROM partner_cities WHERE code = ?", code)
        if row is None:
            raise MedicalError("not_found", f"{code!r} is not a registered partner city", field="home_city")
        return PartnerCity.from_json(json.loads(row["body"]))

    # -- settlement ------------------------------------------------------------------------------------

    def settle(self, *, institution: str, bill_no: str, home_city: str, home_number: str, visit: VisitType | str,
               items: Sequence[BillItem]) -> dict[str, Any]:
        """Settle the bill of an insured person of ``home_city`` identified by their home insurance number."""
        bill = self.medical._bill(visit, items)
        key = f"{_number(institution, 'institution')}/{_number(bill_no, 'bill_no')}"
        if not isinstance(home_number, str) or not HOME_NUMBER.match(home_number):
            raise MedicalError("invalid", "home_insurance_number: 6 to 30 upper-case letters or digits",
                               field="home_insurance_number")
        if not self.core.clearing:
            raise MedicalError("precondition_failed", "this registration of the medical application has no "
                               "clearing account (registered before out-of-city treatment existed); the core must "
                               "open it before out-of-city bills can settle", field="home_city")
        digest = _digest({"i": institution, "b": bill_no, "h": home_city, "n": home_number, "v": bill.visit.value,
                          "items": [item.__dict__ for item in bill.items]})
        if self.store.one("SELECT 1 FROM bills WHERE key = ?", key) is not None:
            raise MedicalError("already_exists", f"{key} is the number of a local bill")
        replay = self.medical._replay("out_of_city_bills", key, digest)
        if replay is not None:
            return replay
        partner = self.partner(home_city)
        now = clock.now()
        place = self.medical._institution(institution, bill.visit, now.date())
        with self.medical._person_lock(f"{home_city}/{home_number}"):
            replay = self.medical._replay("out_of_city_bills", key, digest)
            if replay is not None:
                return replay
            split = self._split(partner, bill, place.level, home_number, now.date())
            transfers = []
            if split.pooled_fund_fen:
                transfers.append({
                    "id": _hex(transfer_id("bill", key, "clearing")), "debit_account_id": self.core.clearing,
                    "credit_account_id": _hex(place.settlement_account_id), "amount_fen": split.pooled_fund_fen,
                    "ledger": int(LedgerId.MEDICAL), "code": int(TransferCode.POOLED_FUND_PAYMENT),
                    "user_data": clearing_tag(home_city, key)})
            receipt = self._receipt(key, institution, bill_no, place.name, partner, home_number, split, now,
                                    transfers)
            self.medical.booker.book("out_of_city_bills", key, transfers,
                                     self._intent(key, digest, partner.code, home_number, institution, split, now,
                                                  receipt))
            return receipt

    def _split(self, partner: PartnerCity, bill: Any, level: Any, home_number: str, day: _dt.date) -> Split:
        paid = self.store.one("SELECT COALESCE(SUM(home_fund_fen), 0) AS fen FROM out_of_city_bills WHERE "
                              "partner = ? AND home_number = ? AND year = ? AND visit = 'inpatient' AND "
                              "status = 'booked'", partner.code, home_number, day.year)
        try:
            return split_for_partner(bill, partner.terms_at(day), self.medical.policies.at(day), level=level,
                                     pooled_paid_this_year_fen=int(paid["fen"]))  # type: ignore[index]
        except PartnerError as exc:
            raise MedicalError("precondition_failed", str(exc), field=exc.field) from None
        except ValueError as exc:
            raise MedicalError("invalid", str(exc), field="items") from None

    @staticmethod
    def _receipt(key: str, institution: str, bill_no: str, place_name: str, partner: PartnerCity, home_number: str,
                 split: Split, now: _dt.datetime, transfers: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "bill": key, "institution": institution, "institution_name": place_name, "bill_no": bill_no,
            "holder": mask_id(home_number), "card_number": "", "visit": split.visit.value,
            "home_city": partner.code, "home_city_name": partner.name,
            "at": now.isoformat(timespec="seconds"), "total_fen": split.total_fen, "covered_fen": split.covered_fen,
            "category_b_self_paid_fen": split.category_b_self_paid_fen, "category_c_fen": split.category_c_fen,
            "deductible_fen": split.deductible_fen, "pooled_fund_fen": split.pooled_fund_fen,
            "personal_account_fen": 0, "insured_fen": split.insured_fen, "capped": split.capped, "epurse_fen": 0,
            "items": [{"code": i.code, "name": i.name, "category": i.category.value, "quantity": i.quantity,
                       "unit_price_fen": i.unit_price_fen, "amount_fen": i.amount_fen, "covered_fen": i.covered_fen,
                       "self_paid_fen": i.self_paid_fen} for i in split.items],
            "payments": [{"payer": "home_city_fund", "transfer_id": t["id"], "amount_fen": t["amount_fen"]}
                         for t in transfers],
            "transfers": transfers}

    @staticmethod
    def _intent(key: str, digest: str, partner: str, home_number: str, institution: str, split: Split,
                now: _dt.datetime, receipt: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        return (INTENT_SQL,
                (key, partner, home_number, institution, digest, split.visit.value, now.date().isoformat(), now.year,
                 clock.now_ns(), split.total_fen, split.pooled_fund_fen, split.insured_fen, dumps(receipt)))

    # -- the clearing report ---------------------------------------------------------------------------

    def report(self, partner_code: str, first_day: str, last_day: str) -> dict[str, Any]:
        """The bills settled for ``partner_code``'s insured from ``first_day`` to ``last_day`` (inclusive),
        amounts by payer, and their reconciliation with the clearing account's movements on the ledger."""
        first, last = _day(first_day, "first_day"), _day(last_day, "last_day")
        if last < first or (last - first).days >= REPORT_DAYS_MAX:
            raise MedicalError("invalid", f"last_day: from {first} to {last}: 1 to {REPORT_DAYS_MAX} days",
                               field="last_day")
        partner = self.partner(partner_code)
        if not self.core.clearing:
            raise MedicalError("precondition_failed", "this registration has no clearing account",
                               field="partner_city")
        on_ledger, ledger_all_time, debits, credits = self._ledger_movements(partner.code)
        lines = []
        for row in self.store.all("SELECT * FROM out_of_city_bills WHERE partner = ? AND day BETWEEN ? AND ? AND "
                                  "status = 'booked' ORDER BY at_ns", partner.code, first.isoformat(), last.isoformat()):
            body = json.loads(row["body"])
            transfer = body["transfers"][0]["id"] if body["transfers"] else ""
            lines.append({"bill": row["key"], "institution": row["institution"], "day": row["day"],
                          "holder": body["holder"], "visit": row["visit"], "total_fen": row["total_fen"],
                          "home_fund_fen": row["home_fund_fen"], "insured_fen": row["insured_fen"],
                          "transfer_id": transfer,
                          "on_ledger": not transfer or on_ledger.get(transfer) == row["home_fund_fen"]})
        recorded = self.store.one("SELECT COALESCE(SUM(home_fund_fen), 0) AS fen FROM out_of_city_bills WHERE "
                                  "partner = ? AND status = 'booked'", partner.code)
        everyone = self.store.one("SELECT COALESCE(SUM(home_fund_fen), 0) AS fen FROM out_of_city_bills WHERE "
                                  "status = 'booked'")
        known = {row["id"] for row in self._transfer_ids(partner.code)}
        unmatched = sorted(set(on_ledger) - known)
        home_fund = sum(line["home_fund_fen"] for line in lines)
        report = {
            "partner_city": partner.code, "partner_name": partner.name, "first_day": first.isoformat(),
            "last_day": last.isoformat(), "lines": lines, "bills": len(lines),
            "total_fen": sum(line["total_fen"] for line in lines), "home_fund_fen": home_fund,
            "insured_fen": sum(line["insured_fen"] for line in lines), "owed_by_partner_fen": home_fund,
            "ledger_period_fen": sum(on_ledger.get(line["transfer_id"], 0) for line in lines),
            "ledger_all_time_fen": ledger_all_time, "records_all_time_fen": int(recorded["fen"]),  # type: ignore[index]
            "unmatched_transfer_ids": unmatched, "clearing_account_id": self.core.clearing,
            "clearing_account_net_fen": debits - credits,
            "records_all_partners_fen": int(everyone["fen"])}  # type: ignore[index]
        report["reconciled"] = (all(line["on_ledger"] for line in lines) and not unmatched
                                and report["ledger_period_fen"] == home_fund
                                and ledger_all_time == report["records_all_time_fen"]
                                and report["clearing_account_net_fen"] == report["records_all_partners_fen"])
        return report

    def _transfer_ids(self, partner: str) -> list[dict[str, Any]]:
        out = []
        for row in self.store.all("SELECT body FROM out_of_city_bills WHERE partner = ? AND status = 'booked'",
                                  partner):
            out.extend(json.loads(row["body"])["transfers"])
        return out

    def _ledger_movements(self, partner: str) -> tuple[dict[str, int], int, int, int]:
        """The clearing account's posted movements: this partner's (id -> signed amount, and their sum),
        and the whole account's debits and credits."""
        mine: dict[str, int] = {}
        debits = credits = 0
        try:
            transfers = self.core.all_account_transfers(self.core.clearing)
        except CoreError as exc:
            raise MedicalError(exc.reason, f"the ledger did not answer: {exc}") from None
        for transfer in transfers:
            if transfer.pending or transfer.void_pending_transfer:
                continue
            outgoing = int(transfer.debit_account_id, 16) == int(self.core.clearing, 16)
            debits += transfer.amount_fen if outgoing else 0
            credits += 0 if outgoing else transfer.amount_fen
            if partner_of_tag(transfer.user_data) == partner:
                mine[transfer.id] = transfer.amount_fen if outgoing else -transfer.amount_fen
        return mine, sum(mine.values()), debits, credits


def report_csv(report: dict[str, Any]) -> str:
    """The report as CSV: one row per bill, then a TOTAL row (amounts in fen)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in report["lines"]:
        writer.writerow([report["partner_city"], *(line[name] for name in CSV_COLUMNS[1:-1]),
                         "yes" if line["on_ledger"] else "NO"])
    writer.writerow([report["partner_city"], "TOTAL", "", f"{report['first_day']}..{report['last_day']}",
                     f"{report['bills']} bills", "", report["total_fen"], report["home_fund_fen"],
                     report["insured_fen"], "", "yes" if report["reconciled"] else "NO"])
    return out.getvalue()
