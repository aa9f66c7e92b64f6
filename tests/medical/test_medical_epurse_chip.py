"""The insured's share from the e-purse, debited on the chip: the bill's chain holds the share on the
card's PURSE shadow, the terminal's purchase debits a virtual card (in memory here, through pcscd in
test_medical_counter.py), and the hold is posted carrying the chip's record. The numbers: the pharmacy
bill of test_medical_booking (18,455 fen: personal account 15,655, insured 2,800), an e-purse of 5,000
fen on the chip and on the shadow."""

from __future__ import annotations

import dataclasses

import pytest
from citycard.apps.medical.card_profile import card_profile_for
from citycard.apps.medical.counter import chip_message
from citycard.apps.medical.epurse import ChipPurchase, EpursePayments, chip_tag
from citycard.apps.medical.service import MedicalError
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
from citycard.card.sam import PurchaseTacFields, verify_tac
from grpc_helpers import CALL_TIMEOUT_S, add_person_with_card, citizen_id
from medical_helpers import PHARMACY, World
from test_medical_booking import PHARMACY_ITEMS, account, available, fund

from citycard.v1 import cards_pb2, ledger_pb2

PIN = "112233"
TERMINAL_ID = bytes.fromhex("370100000077")


@dataclasses.dataclass
class Holder:
    id_number: str
    card: str
    purse_account: str
    terminal: Terminal
    keys: MasterKeys


def holder(world: World, sequence: int, *, chip_fen: int = 5_000, shadow_fen: int = 5_000) -> Holder:
    """A person with a card whose chip holds ``chip_fen`` and whose shadow holds ``shadow_fen``."""
    id_number = citizen_id("19560606", sequence)
    card = add_person_with_card(world.server, id_number, load_fen=shadow_fen)
    fund(world, id_number, 50_000, id_number + "chip")
    issued = world.server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card), metadata=world.metadata,
                                          timeout=CALL_TIMEOUT_S).card
    keys = MasterKeys.generate()
    profile = card_profile_for(card_number=card, card_id_code=issued.card_id_code, id_number=id_number,
                               name="王五", pin=PIN, app_serial=f"3303{sequence:016d}")
    chip = VirtualCard(personalize(profile, keys), MemoryStore())
    terminal = Terminal(CardChannel(MemoryTransport(chip)), SoftSam(keys, TERMINAL_ID), host=IssuerHost(keys))
    if chip_fen:
        terminal.verify_pin(PIN)
        terminal.load(chip_fen)
    return Holder(id_number, card, issued.purse_account_id, terminal, keys)


def chip_record(who: Holder, amount_fen: int) -> ChipPurchase:
    message = chip_message(who.card, who.terminal.purchase(amount_fen))
    return ChipPurchase(**{field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields})


def shadow(world: World, who: Holder) -> int:
    return world.service.core.available_fen(who.purse_account)


def settle(world: World, who: Holder, bill_no: str) -> dict:
    return world.service.settle(institution=PHARMACY, bill_no=bill_no, card_number=who.card,
                                id_number=who.id_number, visit="pharmacy", items=PHARMACY_ITEMS, epurse=True)


def test_share_held_then_debited_on_the_chip_and_posted_with_its_record(world: World):
    who = holder(world, 801)
    payments = EpursePayments(world.service)
    received_before = account(world, "institutions_purse").credits_posted_fen
    receipt = settle(world, who, "E1")
    assert (receipt["personal_account_fen"], receipt["insured_fen"]) == (15_655, 2_800)
    assert (receipt["epurse_held_fen"], receipt["epurse_fen"], receipt["epurse_status"]) == (2_800, 0, "held")
    assert (available(world, who.id_number), shadow(world, who)) == (34_345, 2_200)  # held: 5,000 - 2,800
    assert account(world, "institutions_purse").credits_posted_fen == received_before  # nothing paid yet

    chip = chip_record(who, 2_800)
    assert who.terminal.balance() == 2_200
    done = payments.complete(institution=PHARMACY, bill_no="E1", chip=chip)
    assert (done["epurse_fen"], done["epurse_held_fen"], done["epurse_status"]) == (2_800, 0, "paid")
    assert done["chip"]["offline_counter"] == chip.offline_counter == 0
    assert account(world, "institutions_purse").credits_posted_fen - received_before == 2_800
    assert shadow(world, who) == who.terminal.balance() == 2_200  # the ledger and the chip agree

    post_id = done["payments"][-1]["transfer_id"]
    booked = world.server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=[post_id]),
                                                   metadata=world.metadata, timeout=CALL_TIMEOUT_S).transfers[0]
    tag = int(booked.user_data, 16)   # card number (base 36), offline counter, TAC, terminal sequence
    assert (tag >> 80, tag >> 64 & 0xFFFF, tag >> 32 & 0xFFFFFFFF, tag & 0xFFFFFFFF) == \
        (int(who.card, 36), 0, int(chip.tac, 16), chip.terminal_seq)
    assert booked.user_data == chip_tag(chip).lower() and booked.amount_fen == 2_800
    fields = PurchaseTacFields(bytes.fromhex(chip.app_serial), chip.amount_fen, chip.tx_type,
                               bytes.fromhex(chip.terminal_id), chip.terminal_seq, bytes.fromhex(chip.date_time))
    assert verify_tac(who.keys, fields, bytes.fromhex(chip.tac))   # the back office can check what was booked

    again = payments.complete(institution=PHARMACY, bill_no="E1", chip=chip)   # the terminal resends
    assert again["replayed"] and again["epurse_fen"] == 2_800
    assert shadow(world, who) == 2_200 and account(world, "institutions_purse").credits_posted_fen \
        - received_before == 2_800
    assert settle(world, who, "E1")["epurse_status"] == "paid"   # the bill's own resend shows the outcome
    [record] = world.service.expense_records(who.id_number)
    assert (record["epurse_fen"], record["chip"]["tac"]) == (2_800, chip.tac)


def test_a_chip_record_pays_one_bill_only_and_must_match_the_hold(world: World):
    who = holder(world, 802, chip_fen=10_000, shadow_fen=10_000)
    payments = EpursePayments(world.service)
    settle(world, who, "E2")
    settle(world, who, "E3")
    with pytest.raises(MedicalError) as caught:   # the chip debited 27.99 for a 28.00 share
        payments.complete(institution=PHARMACY, bill_no="E2", chip=chip_record(who, 2_799))
    assert (caught.value.reason, caught.value.field) == ("invalid", "chip.amount_fen")
    chip = chip_record(who, 2_800)
    payments.complete(institution=PHARMACY, bill_no="E2", chip=chip)
    with pytest.raises(MedicalError) as caught:   # the same chip purchase for the other bill
        payments.complete(institution=PHARMACY, bill_no="E3", chip=chip)
    assert caught.value.reason == "already_exists" and "paid another bill" in str(caught.value)
    with pytest.raises(MedicalError) as caught:
        payments.complete(institution=PHARMACY, bill_no="E3", chip=dataclasses.replace(chip, tac="XYZ"))
    assert caught.value.field == "chip.tac"
    with pytest.raises(MedicalError) as caught:
        payments.complete(institution=PHARMACY, bill_no="E3", chip=dataclasses.replace(chip, card_number="A00000009",
                                                                                      offline_counter=9))
    assert caught.value.field == "chip.card_number"
    with pytest.raises(MedicalError) as caught:
        payments.complete(institution=PHARMACY, bill_no="E3", chip=None)
    assert caught.value.field == "chip"
    # shadow: 10,000 - 2,800 (paid) - 2,800 (E3 still held); chip: 10,000 - 2,799 - 2,800
    assert (shadow(world, who), who.terminal.balance()) == (4_400, 4_401)


def test_chip_short_releases_the_hold_and_the_share_is_paid_in_cash(world: World):
    who = holder(world, 803, chip_fen=1_000, shadow_fen=5_000)   # the chip spent offline what the shadow still shows
    settle(world, who, "E4")
    assert shadow(world, who) == 2_200
    from citycard.card.sw import InsufficientBalance
    with pytest.raises(InsufficientBalance):
        who.terminal.purchase(2_800)
    released = EpursePayments(world.service).complete(institution=PHARMACY, bill_no="E4", chip=None,
                                                      card_not_debited=True)
    assert (released["epurse_status"], released["epurse_fen"], released["insured_fen"]) == ("released", 0, 2_800)
    assert (shadow(world, who), who.terminal.balance()) == (5_000, 1_000)


def test_a_shadow_short_of_the_share_refuses_the_whole_bill(world: World):
    who = holder(world, 804, chip_fen=2_200, shadow_fen=2_200)
    with pytest.raises(MedicalError) as caught:
        settle(world, who, "E5")
    assert caught.value.reason == "epurse_insufficient"
    assert (available(world, who.id_number), shadow(world, who)) == (50_000, 2_200)   # MEDICAL untouched too
    assert world.service.expense_records(who.id_number) == []


def test_refund_gives_the_e_purse_part_back_in_cash(world: World):
    who = holder(world, 805)
    settle(world, who, "E6")
    chip = chip_record(who, 2_800)
    EpursePayments(world.service).complete(institution=PHARMACY, bill_no="E6", chip=chip)
    refund = world.service.refund(institution=PHARMACY, refund_no="ER6", bill_no="E6")
    assert (refund["personal_account_fen"], refund["insured_fen"]) == (15_655, 2_800)
    assert (available(world, who.id_number), shadow(world, who), who.terminal.balance()) == (50_000, 2_200, 2_200)
