"""The counter flow at a designated hospital or pharmacy: the card identifies the insured, the PIN proves
the holder is present, the bill settles over gRPC.

    holder = read_insured(terminal, pin)            # SSSE EF05/EF06 over PC/SC, then VERIFY on the card
    receipt = settle_at_counter(stub, metadata, holder, institution=..., bill_no=..., visit=..., items=...)

A wrong or blocked PIN stops the flow at the card, before anything reaches the server. The PIN goes to
the card only (the channel's trace masks it); it is never logged nor sent over gRPC.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from citycard.apps.medical.card_profile import card_profile_for
from citycard.card import Terminal
from citycard.card.flows import PurchaseInterrupted, PurchaseReceipt
from citycard.card.sw import AuthenticationBlocked, InsufficientBalance, VerificationFailed
from citycard.core.identity import mask_id

from citycard.v1 import medical_pb2, medical_pb2_grpc

__all__ = ["CounterRefused", "InsuredAtCounter", "card_profile_for", "chip_message", "pay_share_from_chip",
           "read_insured", "settle_at_counter"]

CALL_TIMEOUT_S = 30.0


class CounterRefused(Exception):
    """The flow stopped at the counter; ``reason``: wrong_pin, pin_blocked, card_expired."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InsuredAtCounter:
    card_number: str
    id_number: str
    name: str

    def __repr__(self) -> str:  # never the whole ID number
        return f"InsuredAtCounter({self.card_number}, {mask_id(self.id_number)})"


def read_insured(terminal: Terminal, pin: str, *, today: _dt.date | None = None) -> InsuredAtCounter:
    """Read the holder from the card and VERIFY the PIN the holder typed on the PIN pad."""
    data = terminal.read_holder()
    if today is not None and data.identity.expiry_date < today.isoformat():
        raise CounterRefused("card_expired", f"card {data.identity.card_number} expired on "
                                             f"{data.identity.expiry_date}")
    try:
        terminal.verify_pin(pin)
    except VerificationFailed as exc:
        raise CounterRefused("wrong_pin", f"wrong PIN; {exc.tries_left} tries left before it is blocked") from None
    except AuthenticationBlocked:
        raise CounterRefused("pin_blocked", "the PIN is blocked; the holder must have it reset at a service "
                                            "counter") from None
    return InsuredAtCounter(data.identity.card_number, data.holder.ssn, data.holder.name)


def settle_at_counter(stub: medical_pb2_grpc.MedicalStub, metadata: tuple[tuple[str, str], ...],
                      insured: InsuredAtCounter, *, institution: str, bill_no: str, visit: medical_pb2.VisitType,
                      items: Sequence[medical_pb2.BillItem], epurse: bool = False) -> medical_pb2.Receipt:
    """Send the itemised bill; the platform splits and books it and answers the receipt."""
    request = medical_pb2.SettleRequest(institution=institution, bill_no=bill_no, card_number=insured.card_number,
                                        id_number=insured.id_number, visit=visit, items=list(items),
                                        pay_insured_share_from_epurse=epurse)
    response: medical_pb2.SettleResponse = stub.Settle(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    return response.receipt


def chip_message(card_number: str, chip: PurchaseReceipt) -> medical_pb2.ChipPurchase:
    return medical_pb2.ChipPurchase(
        card_number=card_number, app_serial=chip.app_serial.hex().upper(), offline_counter=chip.offline_counter,
        amount_fen=chip.amount_fen, tx_type=chip.tx_type, terminal_id=chip.terminal_id.hex().upper(),
        terminal_seq=chip.terminal_seq, date_time=chip.date_time.hex().upper(), tac=chip.tac.hex().upper(),
        mac2=chip.mac2.hex().upper())


def pay_share_from_chip(stub: medical_pb2_grpc.MedicalStub, metadata: tuple[tuple[str, str], ...],
                        terminal: Terminal, receipt: medical_pb2.Receipt) -> medical_pb2.Receipt:
    """After a Settle that held the insured's share on the e-purse shadow: debit the chip for exactly that
    amount (EP purchase; the SAM checks the card's MAC2) and post the hold with the chip's record. If the
    chip refuses (its balance is short) the hold is released and the share is paid in cash. A purchase
    torn by the card leaving the reader is recovered first (the card must be back): the chip's counter
    says whether it debited. Sending the completion again is harmless (the same answer)."""
    if not receipt.epurse_held_fen:
        return receipt
    request = medical_pb2.CompleteEpursePaymentRequest(institution=receipt.institution, bill_no=receipt.bill_no)
    chip: PurchaseReceipt | None
    try:
        chip = terminal.purchase(receipt.epurse_held_fen)
    except PurchaseInterrupted as torn:
        chip = terminal.recover_purchase(torn.pending)
    except InsufficientBalance:
        chip = None
    if chip is None:
        request.card_not_debited = True
    else:
        request.chip.CopyFrom(chip_message(receipt.card_number, chip))
    response: medical_pb2.SettleResponse = stub.CompleteEpursePayment(request, metadata=metadata,
                                                                      timeout=CALL_TIMEOUT_S)
    return response.receipt


def admit_at_counter(stub: medical_pb2_grpc.MedicalStub, metadata: tuple[tuple[str, str], ...],
                     insured: InsuredAtCounter, *, institution: str, admission_no: str,
                     expected_cost_fen: int) -> medical_pb2.AdmitResponse:
    request = medical_pb2.AdmitRequest(institution=institution, admission_no=admission_no,
                                       card_number=insured.card_number, id_number=insured.id_number,
                                       expected_cost_fen=expected_cost_fen)
    response: medical_pb2.AdmitResponse = stub.Admit(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    return response


def refusal_reason(exc: grpc.RpcError) -> str:
    """The MedicalErrorReason name of a refused call (empty if it carries none)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""
