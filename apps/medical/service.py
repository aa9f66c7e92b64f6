"""The medical application's operations: settle a bill, admit and discharge, refund, contributions, queries.

Each operation checks everything it can before it books (institution, card, account, bill), books one
request of linked transfers on MEDICAL through the core (all of it or none of it), and keeps its record in
the application's store (``store.py``: intent before booking, booked after). Requests carry the caller's
number for the bill, admission, refund or import; the same request sent again answers the same receipt and
books nothing more; the same number with different content is refused.

Errors are ``MedicalError(reason, message)``; the servicer maps reasons to status codes in one place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from citycard.apps.medical.contributions import ContributionImport, ImportRefused, parse_contributions
from citycard.apps.medical.core_client import CoreClient, CoreError
from citycard.apps.medical.errors import MedicalError
from citycard.apps.medical.group_commit import AccountLookups, Booker
from citycard.apps.medical.institutions import Institution, InstitutionError, Institutions
from citycard.apps.medical.policy import DEFAULT_POLICY_BOOK, PER_MILLE, PolicyBook
from citycard.apps.medical.split import Bill, BillError, BillItem, Split, VisitType, split_bill
from citycard.apps.medical.store import Store, dumps
from citycard.core import clock
from citycard.core.identity import IdentityError, mask_id, validate_citizen_id
from citycard.core.records import LedgerId, TransferCode

from citycard.v1 import cards_pb2, ledger_pb2

__all__ = ["MedicalError", "MedicalService", "transfer_id"]

NUMBER_LENGTH_MAX = 40
ACCOUNT_CACHE_MAX = 1_000_000
PERSON_LOCKS = 1024
CALL_THREADS = 64  # core calls made beside a settlement's own (its card while its account is looked up)
BILL_INTENT_SQL = ("INSERT INTO bills (key, institution, bill_no, digest, id_number, card_number, visit, day, year, "
                   "at_ns, total_fen, pooled_fen, personal_fen, insured_fen, body, status) VALUES "
                   "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent')")


def transfer_id(*parts: str) -> int:
    """A deterministic transfer id (120 bits, below the platform's reserved 2^124) for a booking's part:
    the same request always books the same ids, so a resend is answered EXISTS and books nothing."""
    value = int.from_bytes(hashlib.sha256("\x1f".join(("citycard.medical", *parts)).encode()).digest()[:15], "big")
    return value or 1


def _hex(value: int) -> str:
    return f"{value:x}"


def _digest(value: Any) -> str:
    return hashlib.sha256(dumps(value).encode()).hexdigest()


def _number(value: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > NUMBER_LENGTH_MAX or "/" in value:
        raise MedicalError("invalid", f"{field}: 1 to {NUMBER_LENGTH_MAX} characters, no '/'", field=field)
    return value.strip()


@dataclass(frozen=True)
class Insured:
    id_number: str
    card_number: str
    account_id: str
    available_fen: int = 0  # what the personal account could spend when the card was checked
    purse_account_id: str = ""  # the card's e-purse shadow (PURSE)

    @property
    def masked(self) -> str:
        return mask_id(self.id_number)


CARD_STATE_WORDS = {cards_pb2.CARD_STATE_STOPPED: "stopped by a phone or online loss report",
                    cards_pb2.CARD_STATE_FROZEN: "frozen by a written loss report",
                    cards_pb2.CARD_STATE_REPLACED: "replaced by a new card",
                    cards_pb2.CARD_STATE_CANCELLED: "cancelled", cards_pb2.CARD_STATE_EXPIRED: "expired"}


class MedicalService:
    def __init__(self, store: Store, core: CoreClient, policies: PolicyBook = DEFAULT_POLICY_BOOK) -> None:
        self.store = store
        self.core = core
        self.policies = policies
        # Striped: a person's bills are split and booked one at a time (the split reads the balance), with
        # a bounded number of locks however many people are insured.
        self._person_locks = tuple(threading.Lock() for _ in range(PERSON_LOCKS))
        self._account_ids: dict[str, str] = {}
        self._registry: Institutions | None = None  # read once, dropped when an institution changes
        self._institution_of_token: dict[str, str] = {}  # a token never changes hands (only SHA-256s kept)
        self.booker = Booker(store, core)
        self.lookups = AccountLookups(core)
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="medical-core")

    def recover(self) -> dict[str, int]:
        """Finish the bookings a crash left as intents (at start, before serving): each is sent again with
        its own transfer ids, so the ledger books what it never got and answers EXISTS for what it had.
        Contribution imports are finished by importing the same file again."""
        import json
        done: dict[str, int] = {}
        for table in ("bills", "admissions", "refunds", "out_of_city_bills", "epurse_payments"):
            for row in self.store.all(f"SELECT key, body FROM {table} WHERE status = 'intent'"):
                try:
                    self._send(json.loads(row["body"])["transfers"], table, row["key"])
                    done[table] = done.get(table, 0) + 1
                except MedicalError:
                    pass  # refused by the ledger: nothing was booked, the intent is gone
        return done

    # -- institutions ------------------------------------------------------------------------------

    def institutions(self) -> Institutions:
        import json
        registry = self._registry
        if registry is None:
            registry = Institutions(Institution.from_json(json.loads(row["body"]))
                                    for row in self.store.all("SELECT body FROM institutions"))
            self._registry = registry
        return registry

    def add_institution(self, institution: Institution, token_sha256: str = "") -> None:
        import sqlite3
        try:
            with self.store.transaction() as db:
                db.execute("INSERT INTO institutions (code, body, token_sha256) VALUES (?, ?, ?)",
                           (institution.code, dumps(institution.to_json()), token_sha256))
                self._registry = None
        except sqlite3.IntegrityError:
            raise MedicalError("already_exists", f"institution {institution.code} is registered already") from None

    def close_institution(self, code: str, on: _dt.date) -> Institution:
        registry = Institutions(self.institutions())  # a copy: the cached one changes only once stored
        try:
            closed = registry.close(code, on)
        except InstitutionError as exc:
            reason = "not_found" if exc.reason == "not_designated" else exc.reason
            raise MedicalError(reason, str(exc), field="code") from None
        with self.store.transaction() as db:
            db.execute("UPDATE institutions SET body = ? WHERE code = ?", (dumps(closed.to_json()), code))
            self._registry = None
        return closed

    def institution_of_token(self, token_sha256: str) -> str | None:
        code = self._institution_of_token.get(token_sha256)  # every terminal request asks: kept once found
        if code is None:
            row = self.store.one("SELECT code FROM institutions WHERE token_sha256 = ? AND token_sha256 != ''",
                                 token_sha256)
            if row is None:
                return None
            code = self._institution_of_token[token_sha256] = row["code"]
        return code

    def _institution(self, code: str, visit: VisitType, day: _dt.date) -> Institution:
        try:
            return self.institutions().check(code, visit, day)
        except InstitutionError as exc:
            raise MedicalError(exc.reason, str(exc), field="institution") from None

    # -- the insured -------------------------------------------------------------------------------

    def _person_lock(self, id_number: str) -> threading.Lock:
        digest = hashlib.blake2b(id_number.encode(), digest_size=4).digest()
        return self._person_locks[int.from_bytes(digest, "big") % PERSON_LOCKS]

    def insured(self, card_number: str, id_number: str, *, check_frozen: bool = True) -> Insured:
        """The card's holder if the card may settle now: active, theirs, their account not frozen."""
        try:
            number = validate_citizen_id(id_number).number
        except (IdentityError, TypeError) as exc:
            raise MedicalError("invalid", f"id_number: {exc}", field="id_number") from None
        asked = self._calls.submit(self.core.card, card_number)  # overlaps the account's look-up below
        unanswered: CoreError | None = None  # the card's verdict comes first, then this
        try:
            account_id = self.medical_account_id(number)
            account = self.lookups.account(account_id)  # one LookupAccounts for concurrent settlements' accounts
        except CoreError as exc:
            account_id, account, unanswered = "", None, exc
        try:
            card = asked.result()
        except CoreError as exc:
            raise MedicalError("card_refused", f"card {card_number!r} is unknown ({exc})") from None
        if card.holder_masked != mask_id(number):
            raise MedicalError("card_refused", f"card {card.card_number} does not belong to {mask_id(number)}")
        if card.state != cards_pb2.CARD_STATE_ACTIVE:
            why = CARD_STATE_WORDS.get(card.state, cards_pb2.CardState.Name(card.state))
            raise MedicalError("card_refused", f"card {card.card_number} is {why}; it may not settle")
        if unanswered is not None:
            raise unanswered
        if account is None:
            raise MedicalError("not_found", f"{mask_id(number)} has no medical account")
        if check_frozen and account.frozen:
            raise MedicalError("account_frozen", f"the medical account of {mask_id(number)} is frozen "
                                                 "(written loss report); it may not pay")
        return Insured(number, card.card_number, account_id,
                       int(account.credits_posted_fen - account.debits_posted_fen - account.debits_pending_fen),
                       card.purse_account_id)

    def medical_account_id(self, id_number: str) -> str:
        """A person's medical account id; it never changes (a new card reaches the same account), so it is
        asked of the core once per person and process."""
        account_id = self._account_ids.get(id_number)
        if account_id is None:
            account_id = self.core.person(id_number).medical_account_id
            if len(self._account_ids) >= ACCOUNT_CACHE_MAX:
                self._account_ids.clear()
            self._account_ids[id_number] = account_id
        return account_id

    def _pooled_paid(self, id_number: str, year: int) -> int:
        paid = self.store.one("SELECT COALESCE(SUM(pooled_fen), 0) AS fen FROM bills WHERE id_number = ? AND "
                              "year = ? AND status = 'booked'", id_number, year)
        refunded = self.store.one(
            "SELECT COALESCE(SUM(r.pooled_fen), 0) AS fen FROM refunds r JOIN bills b ON r.bill_key = b.key "
            "WHERE b.id_number = ? AND b.year = ? AND r.status = 'booked'", id_number, year)
        return int(paid["fen"]) - int(refunded["fen"])  # type: ignore[index]

    # -- settlement --------------------------------------------------------------------------------

    def settle(self, *, institution: str, bill_no: str, card_number: str, id_number: str, visit: VisitType | str,
               items: Sequence[BillItem], epurse: bool = False) -> dict[str, Any]:
        """Settle one outpatient or pharmacy bill (inpatient bills settle through admit and discharge).

        ``epurse``: the insured's share is paid from the card's e-purse, a PURCHASE on PURSE linked with
        the MEDICAL transfers: the whole bill books, or none of it (an e-purse short of money refuses it)."""
        bill = self._bill(visit, items)
        if bill.visit is VisitType.INPATIENT:
            raise MedicalError("invalid", "an inpatient bill settles at discharge (admit first)", field="visit")
        key = f"{_number(institution, 'institution')}/{_number(bill_no, 'bill_no')}"
        digest = _digest({"i": institution, "b": bill_no, "c": card_number, "p": id_number, "v": bill.visit.value,
                          "items": [item.__dict__ for item in bill.items], **({"e": True} if epurse else {})})
        if epurse and not self.core.institutions_purse:
            raise MedicalError("precondition_failed", "this registration of the medical application has no "
                               "e-purse account (institutions_purse); pay the insured's share in cash", field="epurse")
        replay = self._replay("bills", key, digest)
        if replay is not None:
            return replay
        now = clock.now()
        place = self._institution(institution, bill.visit, now.date())
        with self._person_lock(self._checked_id(id_number)):
            replay = self._replay("bills", key, digest)
            if replay is not None:
                return replay
            insured = self.insured(card_number, id_number)
            split = self._split(bill, place, insured, now.date())
            payments: list[tuple[Any, ...]] = []
            if split.pooled_fund_fen:
                payments.append(("pooled_fund", transfer_id("bill", key, "pooled"), self.core.pooled_fund,
                                 split.pooled_fund_fen, TransferCode.POOLED_FUND_PAYMENT, {}))
            if split.personal_account_fen:
                payments.append(("personal_account", transfer_id("bill", key, "personal"), insured.account_id,
                                 split.personal_account_fen, TransferCode.SETTLEMENT, {}))
            if epurse and split.insured_fen:  # a hold on the shadow; the chip debit posts it (epurse.py)
                payments.append(("epurse_hold", transfer_id("bill", key, "epurse"), insured.purse_account_id,
                                 split.insured_fen, TransferCode.PURCHASE,
                                 {"ledger": int(LedgerId.PURSE), "credit_account_id": self.core.institutions_purse,
                                  "pending": True}))
            return self._book_bill(key, digest, institution, bill_no, place, insured, split, payments, now)

    def _bill(self, visit: VisitType | str, items: Sequence[BillItem]) -> Bill:
        try:
            return Bill(VisitType(visit), tuple(items))
        except ValueError as exc:
            raise MedicalError("invalid", str(exc), field="items" if isinstance(exc, BillError) else "visit") from None

    def _split(self, bill: Bill, place: Institution, insured: Insured, day: _dt.date) -> Split:
        # The balance read with the card check; if it moved since (a concurrent bill of the same person is
        # excluded by the person lock; a contribution only adds), the ledger still refuses an overdraft.
        inpatient = bill.visit is VisitType.INPATIENT
        available = 0 if inpatient else insured.available_fen
        try:  # the pooled fund pays inpatient bills only: the year's total is read for those
            return split_bill(bill, self.policies.at(day), level=place.level, personal_available_fen=available,
                              pooled_paid_this_year_fen=self._pooled_paid(insured.id_number, day.year) if inpatient
                              else 0)
        except ValueError as exc:
            raise MedicalError("invalid", str(exc), field="items") from None

    def _replay(self, table: str, key: str, digest: str) -> dict[str, Any] | None:
        """The stored receipt of an identical earlier request; a resumed booking for an interrupted one."""
        import json
        row = self.store.one(f"SELECT digest, body, status FROM {table} WHERE key = ?", key)
        if row is None:
            return None
        if row["digest"] != digest:
            raise MedicalError("already_exists", f"{key} was submitted before with different content")
        body: dict[str, Any] = json.loads(row["body"])
        if row["status"] == "intent":
            self._send(body["transfers"], table, key)
        body["replayed"] = True
        return self._with_epurse(body) if table == "bills" else body

    def _with_epurse(self, body: dict[str, Any]) -> dict[str, Any]:
        """A bill's receipt with its e-purse payment's outcome (epurse.py), once it has one."""
        import json
        if not body.get("epurse_held_fen"):
            return body
        row = self.store.one("SELECT body FROM epurse_payments WHERE key = ? AND status = 'booked'", body["bill"])
        if row is not None:
            paid = json.loads(row["body"])
            body.update(epurse_status=paid["status"], epurse_held_fen=0, chip=paid["chip"],
                        epurse_fen=paid["amount_fen"] if paid["status"] == "paid" else 0)
            if paid["status"] == "paid":
                body["payments"] = [*body["payments"], {"payer": "epurse", "transfer_id": paid["transfers"][0]["id"],
                                                        "amount_fen": paid["amount_fen"]}]
        return body

    def receipt_of_bill(self, key: str) -> dict[str, Any]:
        import json
        row = self.store.one("SELECT body FROM bills WHERE key = ? AND status = 'booked'", key)
        if row is None:
            raise MedicalError("not_found", f"no settled bill {key}")
        return self._with_epurse(json.loads(row["body"]))

    def _send(self, transfers: list[dict[str, Any]], table: str, key: str) -> None:
        """Book a request of linked transfers (as stored in an intent) and mark the intent booked; on a
        refusal drop the intent and raise the ledger's reason. Grouped with concurrent requests."""
        self.booker.book(table, key, transfers)

    def _book_bill(self, key: str, digest: str, institution: str, bill_no: str, place: Institution,
                   insured: Insured, split: Split, payments: list[tuple[Any, ...]], now: _dt.datetime,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        transfers = [self._transfer(tid, debit, place, amount, code, key, **fields)
                     for _, tid, debit, amount, code, fields in payments]
        receipt = {
            "bill": key, "institution": institution, "institution_name": place.name, "bill_no": bill_no,
            "holder": insured.masked, "card_number": insured.card_number, "visit": split.visit.value,
            "at": now.isoformat(timespec="seconds"), "total_fen": split.total_fen,
            "covered_fen": split.covered_fen, "category_b_self_paid_fen": split.category_b_self_paid_fen,
            "category_c_fen": split.category_c_fen, "deductible_fen": split.deductible_fen,
            "pooled_fund_fen": split.pooled_fund_fen, "personal_account_fen": split.personal_account_fen,
            "insured_fen": split.insured_fen, "capped": split.capped,
            "epurse_fen": 0, "epurse_held_fen": sum(amount for payer, _, _, amount, _, _ in payments
                                                    if payer == "epurse_hold"),
            "items": [{"code": i.code, "name": i.name, "category": i.category.value, "quantity": i.quantity,
                       "unit_price_fen": i.unit_price_fen, "amount_fen": i.amount_fen, "covered_fen": i.covered_fen,
                       "self_paid_fen": i.self_paid_fen} for i in split.items],
            "payments": [{"payer": payer, "transfer_id": _hex(tid), "amount_fen": amount}
                         for payer, tid, _, amount, _, _ in payments],
            "transfers": transfers, **(extra or {})}
        receipt["epurse_status"] = "held" if receipt["epurse_held_fen"] else ""
        intent = (BILL_INTENT_SQL,
                  (key, institution, bill_no, digest, insured.id_number, insured.card_number, split.visit.value,
                   now.date().isoformat(), now.year, clock.now_ns(), split.total_fen, split.pooled_fund_fen,
                   split.personal_account_fen, split.insured_fen, dumps(receipt)))
        self.booker.book("bills", key, transfers, intent)  # the intent, then the chain, grouped (group_commit.py)
        if split.visit is VisitType.INPATIENT:  # the card was checked at admission, not now
            receipt["balance_after_fen"] = self.core.available_fen(insured.account_id)
        else:
            receipt["balance_after_fen"] = insured.available_fen - split.personal_account_fen
        return receipt

    def _transfer(self, tid: int, debit: str, place: Institution, amount: int, code: int, key: str,
                  **fields: Any) -> dict[str, Any]:
        return {"id": _hex(tid), "debit_account_id": debit, "credit_account_id": _hex(place.settlement_account_id),
                "amount_fen": amount, "ledger": int(LedgerId.MEDICAL), "code": int(code),
                "user_data": _hex(transfer_id("ref", key)), **fields}

    # -- admission -----------------------------------------------------------------------------------

    def admit(self, *, institution: str, admission_no: str, card_number: str, id_number: str,
              expected_cost_fen: int) -> dict[str, Any]:
        """Admit an inpatient: a pending hold on the pooled fund for its expected share of the stay."""
        if not isinstance(expected_cost_fen, int) or isinstance(expected_cost_fen, bool) \
                or not 0 <= expected_cost_fen <= 10**12:
            raise MedicalError("invalid", "expected_cost_fen: an integer from 0 to 10^12", field="expected_cost_fen")
        key = f"{_number(institution, 'institution')}/{_number(admission_no, 'admission_no')}"
        digest = _digest({"i": institution, "a": admission_no, "c": card_number, "p": id_number,
                          "e": expected_cost_fen})
        replay = self._replay("admissions", key, digest)
        if replay is not None:
            return replay
        now = clock.now()
        place = self._institution(institution, VisitType.INPATIENT, now.date())
        insured = self.insured(card_number, id_number)
        policy = self.policies.at(now.date())
        cap_left = max(0, policy.annual_cap_fen - self._pooled_paid(insured.id_number, now.year))
        hold = min(max(0, expected_cost_fen - policy.deductible_fen(place.level))
                   * policy.rate_per_mille(place.level) // PER_MILLE, cap_left)
        hold_id = transfer_id("admission", key, "hold")
        transfers = [] if hold == 0 else [
            self._transfer(hold_id, self.core.pooled_fund, place, hold, TransferCode.POOLED_FUND_PAYMENT, key,
                           pending=True)]
        body = {"admission": key, "institution": institution, "institution_name": place.name,
                "admission_no": admission_no, "holder": insured.masked, "card_number": insured.card_number,
                "at": now.isoformat(timespec="seconds"), "expected_cost_fen": expected_cost_fen,
                "hold_fen": hold, "hold_transfer_id": _hex(hold_id) if hold else "", "transfers": transfers}
        with self.store.transaction() as db:
            db.execute("INSERT INTO admissions (key, institution, admission_no, digest, id_number, card_number, "
                       "expected_fen, hold_fen, hold_id, at_ns, body, status) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent')",
                       (key, institution, admission_no, digest, insured.id_number, insured.card_number,
                        expected_cost_fen, hold, _hex(hold_id) if hold else "", clock.now_ns(), dumps(body)))
        self._send(transfers, "admissions", key)
        return body

    def _admission(self, institution: str, admission_no: str) -> Any:
        key = f"{_number(institution, 'institution')}/{_number(admission_no, 'admission_no')}"
        row = self.store.one("SELECT * FROM admissions WHERE key = ?", key)
        if row is None or row["status"] == "intent":
            raise MedicalError("not_found", f"no admission {key}")
        return row

    def discharge(self, *, institution: str, admission_no: str, items: Sequence[BillItem]) -> dict[str, Any]:
        """Settle the stay with the real bill: the hold is posted (up to its amount; more is paid beside
        it, less is posted partly) or voided when the pooled fund owes nothing. The card's state is not
        checked again: liability was fixed at admission."""
        admission = self._admission(institution, admission_no)
        bill = self._bill(VisitType.INPATIENT, items)
        key = f"{institution}/{admission_no}"
        digest = _digest({"admission": key, "items": [item.__dict__ for item in bill.items]})
        replay = self._replay("bills", key, digest)
        if replay is not None:
            return replay
        if admission["status"] != "booked":
            raise MedicalError("precondition_failed", f"admission {key} is {admission['status']}")
        now = clock.now()
        place = self.institutions().get(institution)
        insured = Insured(admission["id_number"], admission["card_number"],
                          self.medical_account_id(admission["id_number"]))
        with self._person_lock(insured.id_number):
            split = self._split(bill, place, insured, now.date())
            hold, hold_id = int(admission["hold_fen"]), admission["hold_id"]
            pooled, payments = split.pooled_fund_fen, []
            post_id = transfer_id("admission", key, "post")
            if hold:
                resolved = min(pooled, hold)
                flags = {"pending_id": hold_id, "post_pending_transfer": True} if resolved \
                    else {"pending_id": hold_id, "void_pending_transfer": True, "amount_fen": 0}
                payments.append(("pooled_fund" if resolved else "hold_voided", post_id, self.core.pooled_fund,
                                 resolved if resolved else hold, TransferCode.POOLED_FUND_PAYMENT, flags))
            if pooled > hold:
                payments.append(("pooled_fund", transfer_id("admission", key, "beyond_hold"), self.core.pooled_fund,
                                 pooled - hold, TransferCode.POOLED_FUND_PAYMENT, {}))
            receipt = self._book_bill(key, digest, institution, admission_no, place, insured, split, payments, now,
                                      extra={"admission": key, "hold_fen": hold})
        with self.store.transaction() as db:
            db.execute("UPDATE admissions SET status = 'discharged' WHERE key = ?", (key,))
        return receipt

    def cancel_admission(self, *, institution: str, admission_no: str) -> dict[str, Any]:
        """Cancel an admission before discharge: its hold is voided."""
        admission = self._admission(institution, admission_no)
        key = admission["key"]
        if admission["status"] == "cancelled":
            return {"admission": key, "status": "cancelled", "released_fen": int(admission["hold_fen"]),
                    "replayed": True}
        if admission["status"] != "booked":
            raise MedicalError("precondition_failed", f"admission {key} is {admission['status']}")
        if admission["hold_fen"]:
            place = self.institutions().get(institution)
            void = self._transfer(transfer_id("admission", key, "void"), self.core.pooled_fund, place,
                                  int(admission["hold_fen"]), TransferCode.POOLED_FUND_PAYMENT, key,
                                  pending_id=admission["hold_id"], void_pending_transfer=True, amount_fen=0)
            booking = self.core.book([ledger_pb2.Transfer(**void)])
            if not booking.booked and not booking.replayed:
                raise MedicalError("ledger_refused", f"{key}: the ledger refused the void ({booking.first_failure()})")
        with self.store.transaction() as db:
            db.execute("UPDATE admissions SET status = 'cancelled' WHERE key = ?", (key,))
        return {"admission": key, "status": "cancelled", "released_fen": int(admission["hold_fen"])}

    # -- refunds -------------------------------------------------------------------------------------

    def refund(self, *, institution: str, refund_no: str, bill_no: str, amount_fen: int = 0) -> dict[str, Any]:
        """Give back (part of) a settled bill: ``amount_fen`` of its total (0: all that is left), shared
        between the payers in the bill's proportions (insurance shares rounded down; the last refund takes
        exact remainders), each part a REFUND naming the original transfer."""
        import json
        bill_key = f"{_number(institution, 'institution')}/{_number(bill_no, 'bill_no')}"
        key = f"{institution}/{_number(refund_no, 'refund_no')}"
        if not isinstance(amount_fen, int) or isinstance(amount_fen, bool) or amount_fen < 0:
            raise MedicalError("invalid", "amount_fen: a non-negative integer", field="amount_fen")
        digest = _digest({"bill": bill_key, "amount": amount_fen})
        replay = self._replay("refunds", key, digest)
        if replay is not None:
            return replay
        row = self.store.one("SELECT * FROM bills WHERE key = ? AND status = 'booked'", bill_key)
        if row is None:
            raise MedicalError("not_found", f"no settled bill {bill_key}")
        bill = json.loads(row["body"])
        with self._person_lock(row["id_number"]):
            done = self.store.one("SELECT COALESCE(SUM(amount_fen), 0) a, COALESCE(SUM(pooled_fen), 0) p, "
                                  "COALESCE(SUM(personal_fen), 0) s FROM refunds WHERE bill_key = ? AND "
                                  "status = 'booked'", bill_key)
            left = int(row["total_fen"]) - int(done["a"])  # type: ignore[index]
            amount = amount_fen or left
            if amount == 0 or amount > left:
                raise MedicalError("exceeds_refundable", f"{bill_key}: {left} fen is left to refund, not {amount}")
            if amount == left:
                pooled = int(row["pooled_fen"]) - int(done["p"])  # type: ignore[index]
                personal = int(row["personal_fen"]) - int(done["s"])  # type: ignore[index]
            else:
                pooled = amount * int(row["pooled_fen"]) // int(row["total_fen"])
                personal = amount * int(row["personal_fen"]) // int(row["total_fen"])
            transfers = self._refund_transfers(bill, key, pooled, personal)
            body = {"refund": key, "bill": bill_key, "holder": bill["holder"], "amount_fen": amount,
                    "pooled_fund_fen": pooled, "personal_account_fen": personal,
                    "insured_fen": amount - pooled - personal, "at": clock.now().isoformat(timespec="seconds"),
                    "transfers": transfers}
            with self.store.transaction() as db:
                db.execute("INSERT INTO refunds (key, bill_key, digest, amount_fen, pooled_fen, personal_fen, "
                           "insured_fen, at_ns, body, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent')",
                           (key, bill_key, digest, amount, pooled, personal, amount - pooled - personal,
                            clock.now_ns(), dumps(body)))
            self._send(transfers, "refunds", key)
        return body

    def _refund_transfers(self, bill: dict[str, Any], key: str, pooled: int, personal: int) -> list[dict[str, Any]]:
        """REFUND transfers naming each original payment, pooled payments in order, until the parts are met."""
        import json  # noqa: F401
        originals = {t["id"]: t for t in bill["transfers"]}
        refunded = self._refunded_by_transfer(bill["bill"])
        out: list[dict[str, Any]] = []
        # The insured's part goes back in cash, also what they paid from the e-purse: crediting the shadow
        # without loading the chip would make the two disagree (epurse.py).
        wanted = {"pooled_fund": pooled, "personal_account": personal}
        for payment in bill["payments"]:
            payer = payment["payer"]
            if payer not in wanted or wanted[payer] == 0:
                continue
            original = originals[payment["transfer_id"]]
            room = payment["amount_fen"] - refunded.get(payment["transfer_id"], 0)
            part = min(room, wanted[payer])
            if part <= 0:
                continue
            wanted[payer] -= part
            out.append({"id": _hex(transfer_id("refund", key, payment["transfer_id"])),
                        "debit_account_id": original["credit_account_id"],
                        "credit_account_id": original["debit_account_id"], "amount_fen": part,
                        "ledger": original["ledger"], "code": int(TransferCode.REFUND),
                        "ref_id": payment["transfer_id"], "user_data": original["user_data"]})
        if any(wanted.values()):
            raise MedicalError("exceeds_refundable", f"{bill['bill']}: the payments cannot cover this refund")
        return out

    def _refunded_by_transfer(self, bill_key: str) -> dict[str, int]:
        import json
        out: dict[str, int] = {}
        for row in self.store.all("SELECT body FROM refunds WHERE bill_key = ? AND status = 'booked'", bill_key):
            for transfer in json.loads(row["body"])["transfers"]:
                out[transfer["ref_id"]] = out.get(transfer["ref_id"], 0) + transfer["amount_fen"]
        return out

    # -- records and statements ----------------------------------------------------------------------

    def _checked_id(self, id_number: str) -> str:
        try:
            return validate_citizen_id(id_number).number
        except (IdentityError, TypeError) as exc:
            raise MedicalError("invalid", f"id_number: {exc}", field="id_number") from None

    def expense_records(self, id_number: str, *, year: int | None = None) -> list[dict[str, Any]]:
        """Every settled bill of the person, oldest first, with amounts by payer and what was refunded."""
        import json
        number = self._checked_id(id_number)
        sql = "SELECT key, body FROM bills WHERE id_number = ? AND status = 'booked'"
        args: list[Any] = [number]
        if year is not None:
            sql += " AND year = ?"
            args.append(year)
        records = []
        for row in self.store.all(sql + " ORDER BY at_ns", *args):
            body = self._with_epurse(json.loads(row["body"]))
            refunded = self.store.one("SELECT COALESCE(SUM(amount_fen), 0) a FROM refunds WHERE bill_key = ? "
                                      "AND status = 'booked'", row["key"])
            body.pop("transfers", None)
            body["refunded_fen"] = int(refunded["a"])  # type: ignore[index]
            records.append(body)
        return records

    def statement(self, id_number: str) -> dict[str, Any]:
        """The personal account statement: every movement with its running balance."""
        number = self._checked_id(id_number)
        person = self.core.person(number)
        running = 0
        lines = []
        for transfer in self.core.account_transfers(person.medical_account_id):
            incoming = transfer.credit_account_id.lstrip("0") == person.medical_account_id.lstrip("0")
            if transfer.pending or transfer.void_pending_transfer:
                continue
            running += transfer.amount_fen if incoming else -transfer.amount_fen
            lines.append({"at": transfer.timestamp.ToDatetime(tzinfo=_dt.UTC).astimezone(clock.CITY_ZONE)
                          .isoformat(timespec="seconds"), "transfer_id": transfer.id,
                          "code": TransferCode(transfer.code).name.lower(),
                          "amount_fen": transfer.amount_fen if incoming else -transfer.amount_fen,
                          "balance_fen": running})
        balance = self.core.balance(person.medical_account_id)
        return {"holder": mask_id(number), "account_id": person.medical_account_id,
                "available_fen": int(balance.available_fen), "lines": lines}

    # -- contributions ------------------------------------------------------------------------------

    def import_contributions(self, text: str, *, source: str = "<input>") -> dict[str, Any]:
        """Import a month's contribution rows (CSV); credits the individual medical share of each person.

        All or nothing: any bad row (reported with file, row, field and reason) and nothing is imported."""
        parsed: ContributionImport = parse_contributions(text, source=source)
        errors = list(parsed.errors)
        known: dict[str, str] = {}
        for row in parsed.rows:
            exists = self.store.one("SELECT 1 FROM contributions WHERE month = ? AND employer = ? AND id_number = ? "
                                    "AND insurance = ?", row.month, row.employer, row.id_number, row.insurance)
            if exists:
                why = (f"{row.insurance} for {mask_id(row.id_number)}, {row.month}, employer {row.employer} "
                       "was imported before")
                errors.append((source, row.line, "id_number", why))
            if row.id_number not in known:
                try:
                    known[row.id_number] = self.core.person(row.id_number).medical_account_id
                except CoreError as exc:
                    if exc.reason != "not_found":
                        raise MedicalError("core_unavailable", str(exc)) from None
                    known[row.id_number] = ""
            if not known[row.id_number]:
                errors.append((source, row.line, "id_number", f"{mask_id(row.id_number)} is not an insured person"))
        if errors:
            raise ImportRefused(sorted(set(errors), key=lambda e: (e[1], e[2])))
        key = hashlib.sha256(text.encode()).hexdigest()
        credits = []
        for row in parsed.rows:
            if row.insurance != "medical":
                continue
            rate = self.policies.at(_dt.date.fromisoformat(row.month + "-01")).personal_account_rate_per_mille
            row.credited_fen = row.base_fen * rate // PER_MILLE
            if row.credited_fen:
                credits.append({"id": _hex(transfer_id("contribution", row.month, row.employer, row.id_number)),
                                "debit_account_id": self.core.individual_fund,
                                "credit_account_id": known[row.id_number], "amount_fen": row.credited_fen,
                                "ledger": int(LedgerId.MEDICAL), "code": int(TransferCode.CONTRIBUTION)})
        if len(credits) > 8189:
            raise ImportRefused([(source, 0, "rows", f"{len(credits)} medical rows; at most 8,189 per file")])
        body = {"source": source, "rows": len(parsed.rows), "credits": len(credits),
                "credited_fen": sum(c["amount_fen"] for c in credits), "transfers": credits}
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO imports (key, digest, body, status) VALUES (?, ?, ?, 'intent')",
                       (key, key, dumps(body)))
        self._send(credits, "imports", key)
        with self.store.transaction() as db:
            db.executemany("INSERT INTO contributions (month, employer, id_number, insurance, base_fen, employer_fen, "
                           "individual_fen, credited_fen, import_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(r.month, r.employer, r.id_number, r.insurance, r.base_fen, r.employer_fen,
                             r.individual_fen, r.credited_fen, key) for r in parsed.rows])
        body.pop("transfers")
        return body

    def contributions(self, id_number: str) -> dict[str, Any]:
        """Payment history per insurance, months paid, accumulated pension and medical amounts."""
        number = self._checked_id(id_number)
        per: dict[str, dict[str, Any]] = {}
        for row in self.store.all("SELECT * FROM contributions WHERE id_number = ? ORDER BY month, insurance", number):
            entry = per.setdefault(row["insurance"], {"months": [], "employer_fen": 0, "individual_fen": 0,
                                                      "history": []})
            if row["month"] not in entry["months"]:
                entry["months"].append(row["month"])
            entry["employer_fen"] += row["employer_fen"]
            entry["individual_fen"] += row["individual_fen"]
            entry["history"].append({"month": row["month"], "employer": row["employer"], "base_fen": row["base_fen"],
                                     "employer_fen": row["employer_fen"], "individual_fen": row["individual_fen"],
                                     "credited_fen": row["credited_fen"]})
        for entry in per.values():
            entry["months_paid"] = len(entry["months"])
        medical = per.get("medical", {})
        return {"holder": mask_id(number), "insurances": per,
                "accumulated_pension_fen": per.get("pension", {}).get("individual_fen", 0)
                + per.get("pension", {}).get("employer_fen", 0),
                "accumulated_pension_individual_fen": per.get("pension", {}).get("individual_fen", 0),
                "accumulated_medical_credited_fen": sum(h["credited_fen"] for h in medical.get("history", []))}
