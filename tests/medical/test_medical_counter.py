"""The counter flow through the virtual card: read the holder, VERIFY the PIN on the card, Medical.Settle
over gRPC to the plugin the server started. Once with an in-memory reader (wrong and blocked PINs), once
through real pcscd + vsmartcard-vpcd."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from citycard.apps.medical.card_profile import card_in_pcsc_reader, card_profile_for
from citycard.apps.medical.counter import (
    CounterRefused,
    pay_share_from_chip,
    read_insured,
    refusal_reason,
    settle_at_counter,
)
from citycard.card import (
    CardChannel,
    IssuerHost,
    MasterKeys,
    MemoryStore,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
)
from citycard.core.identity import unit_check_character
from grpc_helpers import CALL_TIMEOUT_S, add_person_with_card, auth, citizen_id

from citycard.v1 import cards_pb2, ledger_pb2, medical_pb2, medical_pb2_grpc

UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")
PIN = "246810"
TERMINAL_ID = bytes.fromhex("370100000001")
ITEMS = [medical_pb2.BillItem(code="XA01", quantity=2, unit_price_fen=1_250),
         medical_pb2.BillItem(code="XB01", quantity=3, unit_price_fen=4_385),
         medical_pb2.BillItem(code="XC01", quantity=1, unit_price_fen=2_800)]


class Counter:
    def __init__(self, server, ready, sequence: int, code: str, *, load_fen: int = 0) -> None:
        self.server = server
        self.operator = auth(Path(ready["operator_token_file"]).read_text().strip())
        self.medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(ready["address"]))
        self.id_number = citizen_id("19750101", sequence)
        self.card_number = add_person_with_card(server, self.id_number, "李四", load_fen=load_fen)
        card = server.cards().GetCard(cards_pb2.GetCardRequest(card_number=self.card_number),
                                      metadata=auth(server.operator_token), timeout=CALL_TIMEOUT_S).card
        self.profile = card_profile_for(card_number=self.card_number, card_id_code=card.card_id_code,
                                        id_number=self.id_number, name="李四", pin=PIN,
                                        app_serial=f"3701{sequence:016d}")
        self.keys = MasterKeys.generate()
        token = self.medical.AddInstitution(medical_pb2.AddInstitutionRequest(institution=medical_pb2.Institution(
            code=code, name="社区药房", kind="pharmacy", services=[medical_pb2.VISIT_TYPE_PHARMACY],
            opened="2020-01-01")), metadata=self.operator, timeout=CALL_TIMEOUT_S).bearer_token
        self.pharmacy = auth(token)
        csv = ("month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n"
               f"2026-10,{UNIT},{self.id_number},medical,2500000,150000,50000\n")
        self.medical.ImportContributions(medical_pb2.ImportContributionsRequest(source=f"{code}.csv",
                                                                                csv=csv.encode()),
                                         metadata=self.operator, timeout=CALL_TIMEOUT_S)

    def terminal(self, transport) -> Terminal:
        return Terminal(CardChannel(transport), SoftSam(self.keys, TERMINAL_ID), host=IssuerHost(self.keys))


def test_counter_flow_in_memory_with_wrong_and_blocked_pin(plugin_server):
    counter = Counter(*plugin_server, 401, "P3701101")
    card = VirtualCard(personalize(counter.profile, counter.keys), MemoryStore())
    terminal = counter.terminal(MemoryTransport(card))
    with pytest.raises(CounterRefused, match="2 tries left") as caught:
        read_insured(terminal, "000000")
    assert caught.value.reason == "wrong_pin"
    insured = read_insured(terminal, PIN)   # a right PIN resets the counter
    assert (insured.card_number, insured.id_number) == (counter.card_number, counter.id_number)
    assert counter.id_number not in repr(insured)
    receipt = settle_at_counter(counter.medical, counter.pharmacy, insured, institution="P3701101", bill_no="C1",
                                visit=medical_pb2.VISIT_TYPE_PHARMACY, items=ITEMS)
    assert (receipt.personal_account_fen, receipt.insured_fen, receipt.balance_after_fen) == (15_655, 2_800, 34_345)
    for _ in range(3):
        with pytest.raises(CounterRefused):
            read_insured(terminal, "999999")
    with pytest.raises(CounterRefused, match="blocked") as caught:
        read_insured(terminal, PIN)
    assert caught.value.reason == "pin_blocked"


def test_counter_flow_refuses_a_stopped_card(plugin_server):
    counter = Counter(*plugin_server, 402, "P3701102")
    counter.server.cards().ReportLoss(cards_pb2.ReportLossRequest(
        actor="op1", card_number=counter.card_number, phone=cards_pb2.PhoneReport(
            id_number=counter.id_number, name="李四",
            gender=cards_pb2.GENDER_MALE if int(counter.id_number[16]) % 2 else cards_pb2.GENDER_FEMALE)),
        metadata=auth(counter.server.operator_token), timeout=CALL_TIMEOUT_S)
    card = VirtualCard(personalize(counter.profile, counter.keys), MemoryStore())
    insured = read_insured(counter.terminal(MemoryTransport(card)), PIN)
    with pytest.raises(grpc.RpcError) as caught:
        settle_at_counter(counter.medical, counter.pharmacy, insured, institution="P3701102", bill_no="C2",
                          visit=medical_pb2.VISIT_TYPE_PHARMACY, items=ITEMS)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refusal_reason(caught.value) == "MEDICAL_CARD_REFUSED"
    assert "stopped by a phone or online loss report" in caught.value.details()


@pytest.mark.pcsc
def test_counter_flow_through_pcsc(plugin_server, tmp_path):
    counter = Counter(*plugin_server, 403, "P3701103")
    with card_in_pcsc_reader(counter.profile, counter.keys, tmp_path) as transport:
        insured = read_insured(counter.terminal(transport), PIN)
        receipt = settle_at_counter(counter.medical, counter.pharmacy, insured, institution="P3701103",
                                    bill_no="C3", visit=medical_pb2.VISIT_TYPE_PHARMACY, items=ITEMS)
    assert (receipt.total_fen, receipt.personal_account_fen, receipt.balance_after_fen) == (18_455, 15_655, 34_345)


@pytest.mark.pcsc
def test_insured_share_debited_on_the_chip_through_pcsc(plugin_server, tmp_path):
    """18,455 fen at the pharmacy: personal account 15,655, the insured's 2,800 from the e-purse: held on
    the shadow (5,000 -> 2,200 available), debited on the chip through pcscd (5,000 -> 2,200), posted with
    the chip's record; a resend of the completion books nothing."""
    counter = Counter(*plugin_server, 404, "P3701104", load_fen=5_000)
    operator = auth(counter.server.operator_token)
    purse_account = counter.server.cards().GetCard(cards_pb2.GetCardRequest(card_number=counter.card_number),
                                                   metadata=operator, timeout=CALL_TIMEOUT_S).card.purse_account_id

    def shadow() -> int:
        return counter.server.ledger().GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(
            account_id=purse_account), metadata=operator, timeout=CALL_TIMEOUT_S).balance.available_fen

    with card_in_pcsc_reader(counter.profile, counter.keys, tmp_path) as transport:
        terminal = counter.terminal(transport)
        insured = read_insured(terminal, PIN)
        terminal.load(5_000)   # the chip's e-purse, loaded like the shadow
        held = settle_at_counter(counter.medical, counter.pharmacy, insured, institution="P3701104", bill_no="C4",
                                 visit=medical_pb2.VISIT_TYPE_PHARMACY, items=ITEMS, epurse=True)
        assert (held.personal_account_fen, held.epurse_held_fen, held.epurse_status, shadow()) == \
            (15_655, 2_800, "held", 2_200)
        paid = pay_share_from_chip(counter.medical, counter.pharmacy, terminal, held)
        chip_balance = terminal.balance()
    assert (paid.epurse_fen, paid.epurse_status, paid.chip.card_number, paid.chip.offline_counter) == \
        (2_800, "paid", counter.card_number, 0)
    assert chip_balance == shadow() == 2_200   # the chip and its shadow agree
    again = counter.medical.CompleteEpursePayment(medical_pb2.CompleteEpursePaymentRequest(
        institution="P3701104", bill_no="C4", chip=paid.chip), metadata=counter.pharmacy,
        timeout=CALL_TIMEOUT_S).receipt
    assert again.replayed and again.epurse_fen == 2_800 and shadow() == 2_200
