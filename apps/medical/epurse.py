"""The insured's share paid from the e-purse, on the chip: hold, chip debit, post (or release).

The e-purse's truth is the chip; ledger PURSE is its shadow. So the share is booked in two steps that keep
them agreeing whatever fails in between:

1. ``Settle`` with the e-purse: the bill's chain books the MEDICAL transfers *and* a pending PURCHASE on the
   card's shadow for the insured's share (a hold: the shadow's available balance drops, nothing is paid
   yet). A shadow short of money refuses the whole bill.
2. The terminal debits the chip for exactly the held amount (PBOC purchase through the SAM), then
   ``CompleteEpursePayment`` posts the hold with the chip's record: the post's ``user_data`` carries the
   card number, the card's offline counter, the TAC and the terminal's sequence number, and its id is
   derived from the card's application serial and offline counter, so one chip purchase can be posted
   once on the whole ledger (a resend answers EXISTS; the same chip record for another bill is refused).
   If the chip was not debited (refused, or a torn purchase that recovery shows never happened), the hold
   is voided and the share is paid in cash.

A hold whose completion never arrives stays held (no timeout: if it expired after the chip was debited,
the shadow and the chip would disagree); the operator resolves it from the chip's detail records.
Refunds give the e-purse part back in cash: crediting the shadow without loading the chip would make
them disagree.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from citycard.apps.medical.service import MedicalError, MedicalService, _digest, _hex, _number, transfer_id
from citycard.apps.medical.store import dumps
from citycard.core import clock
from citycard.core.records import LedgerId, TransferCode

__all__ = ["ChipPurchase", "EpursePayments", "chip_tag"]

EP_PURCHASE_TX_TYPE = 0x06
HEX = re.compile(r"^[0-9A-F]*$")
CARD_NUMBER = re.compile(r"^[0-9A-Z]{9}$")
COUNTER_MAX = 0xFFFF
SEQ_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class ChipPurchase:
    """The chip's answer to the purchase, as the terminal reports it (bytes as upper-case hex)."""

    card_number: str
    app_serial: str
    offline_counter: int
    amount_fen: int
    tx_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    tac: str
    mac2: str

    def checked(self) -> ChipPurchase:
        hexes = {"app_serial": 10, "terminal_id": 6, "date_time": 7, "tac": 4, "mac2": 4}
        for name, size in hexes.items():
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) != 2 * size or not HEX.match(value.upper()):
                raise MedicalError("invalid", f"chip.{name}: {size} bytes written as hex", field=f"chip.{name}")
        if not isinstance(self.card_number, str) or not CARD_NUMBER.match(self.card_number.upper()):
            raise MedicalError("invalid", "chip.card_number: 9 letters or digits", field="chip.card_number")
        for name, high in (("offline_counter", COUNTER_MAX), ("terminal_seq", SEQ_MAX), ("amount_fen", 2**31 - 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise MedicalError("invalid", f"chip.{name}: an integer from 0 to {high}", field=f"chip.{name}")
        if self.tx_type != EP_PURCHASE_TX_TYPE:
            raise MedicalError("invalid", f"chip.tx_type: {self.tx_type} is not an EP purchase (6)",
                               field="chip.tx_type")
        return ChipPurchase(**{**asdict(self), **{name: getattr(self, name).upper() for name in (*hexes, "card_number")}})


def chip_tag(chip: ChipPurchase) -> str:
    """The post's ``user_data``: card number (base 36) << 80 | offline counter << 64 | TAC << 32 | terminal seq."""
    return _hex(int(chip.card_number, 36) << 80 | chip.offline_counter << 64 | int(chip.tac, 16) << 32
                | chip.terminal_seq)


class EpursePayments:
    def __init__(self, medical: MedicalService) -> None:
        self.medical = medical
        self.store = medical.store

    def complete(self, *, institution: str, bill_no: str, chip: ChipPurchase | None,
                 card_not_debited: bool = False) -> dict[str, Any]:
        """Post the bill's e-purse hold with the chip's record, or release it (``card_not_debited``)."""
        key = f"{_number(institution, 'institution')}/{_number(bill_no, 'bill_no')}"
        if (chip is None) == (not card_not_debited):
            raise MedicalError("invalid", "give the chip's record, or card_not_debited, not both", field="chip")
        checked = chip.checked() if chip is not None else None
        row = self.store.one("SELECT body, card_number, status FROM bills WHERE key = ?", key)
        if row is None or row["status"] != "booked":
            raise MedicalError("not_found", f"no settled bill {key}")
        bill = json.loads(row["body"])
        hold = next((p for p in bill["payments"] if p["payer"] == "epurse_hold"), None)
        if hold is None:
            raise MedicalError("precondition_failed", f"{key} holds no e-purse share", field="bill_no")
        digest = _digest({"chip": asdict(checked) if checked else None})
        if self.medical._replay("epurse_payments", key, digest) is not None:
            return {**self.medical.receipt_of_bill(key), "replayed": True}
        if checked is not None:
            if checked.card_number != row["card_number"]:
                raise MedicalError("invalid", f"chip.card_number: the bill was settled with card {row['card_number']}",
                                   field="chip.card_number")
            if checked.amount_fen != hold["amount_fen"]:
                raise MedicalError("invalid", f"chip.amount_fen: {checked.amount_fen} fen, but {hold['amount_fen']} "
                                   "fen is held", field="chip.amount_fen")
        original = next(t for t in bill["transfers"] if t["id"] == hold["transfer_id"])
        transfer = {"debit_account_id": original["debit_account_id"],
                    "credit_account_id": original["credit_account_id"], "ledger": int(LedgerId.PURSE),
                    "code": int(TransferCode.PURCHASE), "pending_id": hold["transfer_id"]}
        if checked is not None:
            transfer.update(id=_hex(transfer_id("chip", checked.app_serial, str(checked.offline_counter))),
                            amount_fen=hold["amount_fen"], post_pending_transfer=True, user_data=chip_tag(checked))
        else:
            transfer.update(id=_hex(transfer_id("bill", key, "epurse_release")), amount_fen=0,
                            void_pending_transfer=True)
        body = {"bill": key, "status": "paid" if checked else "released", "amount_fen": hold["amount_fen"],
                "chip": asdict(checked) if checked else None, "transfers": [transfer],
                "at": clock.now().isoformat(timespec="seconds")}
        chip_key = f"{checked.app_serial}/{checked.offline_counter}" if checked else f"released:{key}"
        try:
            with self.store.transaction() as db:
                db.execute("INSERT INTO epurse_payments (key, chip_key, digest, body, status) VALUES "
                           "(?, ?, ?, ?, 'intent')", (key, chip_key, digest, dumps(body)))
        except sqlite3.IntegrityError:
            if self.medical._replay("epurse_payments", key, digest) is not None:  # a concurrent resend won
                return {**self.medical.receipt_of_bill(key), "replayed": True}
            raise MedicalError("already_exists", f"chip purchase {chip_key} paid another bill") from None
        self.medical._send([transfer], "epurse_payments", key)
        return self.medical.receipt_of_bill(key)
