"""Terminal flows over the in-memory transport: holder data, trace masking, and torn purchases recovered
with GET TRANSACTION PROVE."""

from __future__ import annotations

import pytest
from citycard.card import (
    ApduEvent,
    CardRemoved,
    MasterKeys,
    MemoryTransport,
    PurchaseInterrupted,
    RecoveryError,
    Terminal,
    TxType,
    VirtualCard,
    commands,
    flows,
    personalize,
    profile_from_json,
    verify_tac,
)
from citycard.card.apdu import encode_command
from citycard.card.channel import CardChannel
from citycard.card.commands import bcd_date_time
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.sam import IssuerHost, SoftSam
from citycard.card.state import MemoryStore

from .helpers import PIN, TERMINAL_ID, make_terminal

DEBIT_INS = 0x54


class TearingTransport(MemoryTransport):
    """Pulls the card at the next DEBIT: after the card processed it (`processed`) or before it saw it."""

    def __init__(self, card: VirtualCard, *, processed: bool) -> None:
        super().__init__(card)
        self.processed = processed
        self.armed = False

    def transmit(self, apdu: bytes) -> bytes:
        if self.armed and apdu[1] == DEBIT_INS:
            self.armed = False
            if self.processed:
                self.card.process(apdu)
            raise CardRemoved("card pulled during DEBIT")
        return super().transmit(apdu)


def tearing_terminal(card: VirtualCard, master_keys: MasterKeys, *, processed: bool) -> tuple[Terminal, TearingTransport]:
    transport = TearingTransport(card, processed=processed)
    terminal = Terminal(CardChannel(transport), SoftSam(master_keys, TERMINAL_ID), host=IssuerHost(master_keys))
    terminal.verify_pin(PIN)
    terminal.load(1_000)
    return terminal, transport


def test_read_holder_matches_the_profile(terminal: Terminal) -> None:
    data = terminal.read_holder()
    assert data.holder.ssn == SAMPLE_PROFILE["holder"]["ssn"]
    assert data.holder.name == "张三"
    assert data.holder.birth_date == "1985-03-07"
    assert data.holder.birthplace == "330302"
    assert data.identity.card_number == "A00000001"
    assert data.identity.card_id_code == SAMPLE_PROFILE["ssse"]["card_id_code"]
    assert data.identity.spec_version == "3.00"
    assert data.holder.ssn_masked == "330302********0011"


def test_trace_masks_the_pin(card: VirtualCard, master_keys: MasterKeys) -> None:
    events: list[ApduEvent] = []
    terminal = make_terminal(card, master_keys, (events.append,))
    terminal.verify_pin(PIN)
    terminal.change_pin(PIN, "975310")
    text = "\n".join(e.describe() for e in events)
    assert "12 34 56" not in text and "97 53 10" not in text
    assert "VERIFY" in text and "** ** **" in text


@pytest.mark.parametrize("tx", ["purchase", "composite"])
def test_torn_purchase_that_happened_is_recovered(card: VirtualCard, master_keys: MasterKeys, tx: str) -> None:
    terminal, transport = tearing_terminal(card, master_keys, processed=True)
    transport.armed = True
    with pytest.raises(PurchaseInterrupted) as torn:
        if tx == "purchase":
            terminal.purchase(300)
        else:
            terminal.composite_purchase(300, bytes((0x02, 46)) + bytes(46))
    pending = torn.value.pending
    transport.reset()  # the card comes back: a new session
    receipt = terminal.recover_purchase(pending)
    assert receipt is not None
    assert receipt.balance_after_fen == 700 and receipt.tx_type == (TxType.PURCHASE_EP if tx == "purchase" else 9)
    assert verify_tac(master_keys, receipt.tac_fields(), receipt.tac)
    assert terminal.balance() == 700


def test_torn_purchase_that_did_not_happen(card: VirtualCard, master_keys: MasterKeys) -> None:
    terminal, transport = tearing_terminal(card, master_keys, processed=False)
    transport.armed = True
    with pytest.raises(PurchaseInterrupted) as torn:
        terminal.purchase(300)
    transport.reset()
    assert terminal.recover_purchase(torn.value.pending) is None
    assert terminal.balance() == 1_000
    assert terminal.purchase(300).balance_after_fen == 700  # and the retry goes through


def test_recovery_refuses_another_card(card: VirtualCard, master_keys: MasterKeys) -> None:
    terminal, transport = tearing_terminal(card, master_keys, processed=True)
    transport.armed = True
    with pytest.raises(PurchaseInterrupted) as torn:
        terminal.purchase(300)
    profile = dict(SAMPLE_PROFILE, purse=dict(SAMPLE_PROFILE["purse"], app_serial="33030000000000000002"))
    other = VirtualCard(personalize(profile_from_json(profile), master_keys), MemoryStore())
    other_terminal = make_terminal(other, master_keys)
    with pytest.raises(RecoveryError, match="different card"):
        other_terminal.recover_purchase(torn.value.pending)


def test_recovery_after_further_purchases_is_refused(card: VirtualCard, master_keys: MasterKeys) -> None:
    terminal, transport = tearing_terminal(card, master_keys, processed=True)
    transport.armed = True
    with pytest.raises(PurchaseInterrupted) as torn:
        terminal.purchase(300)
    terminal.purchase(100)
    with pytest.raises(RecoveryError, match="other purchases"):
        terminal.recover_purchase(torn.value.pending)


def test_the_purchase_commands_are_the_bytes_encode_command_makes() -> None:
    """initialize_for_purchase and debit_for_purchase spell their APDUs out; they must be the generic ones."""
    for purse, key_index, amount_fen in ((1, 1, 0), (2, 1, 123_456), (2, 0xFF, 0x7FFFFFFF)):
        data = bytes((key_index,)) + amount_fen.to_bytes(4, "big") + TERMINAL_ID
        assert commands.initialize_for_purchase(purse, key_index, amount_fen, TERMINAL_ID).raw == \
            encode_command(0x80, 0x50, 0x01, purse, data, 0x0F)
    for seq, date_time, mac1 in ((1, bytes.fromhex("20250115120000"), bytes(4)), (2**32 - 1, b"\x99" * 7, b"abcd"),
                                 (5, b"\x20\x25", b"ab")):  # a short field still gets its true Lc
        assert commands.debit_for_purchase(seq, date_time, mac1).raw == \
            encode_command(0x80, 0x54, 0x01, 0x00, seq.to_bytes(4, "big") + date_time + mac1, 8)
    for bad in ((256, 1, 0), (2, 256, 0), (2, 1, -1), (2, 1, 2**31)):
        with pytest.raises(ValueError):
            commands.initialize_for_purchase(*bad, TERMINAL_ID)


def test_the_terminal_clock_in_bcd_is_now() -> None:
    """The default clock's BCD form is made once per second: it is the second bcd_date_time(now) names."""
    cached = flows._CityNowBcd()
    for _ in range(3):
        before = bcd_date_time(flows._city_now())
        made = cached()
        after = bcd_date_time(flows._city_now())
        assert made in (before, after) and len(made) == 7
