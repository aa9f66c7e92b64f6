"""The ED/EP purse on the chip: the reference's MAC vectors through real commands, and every refusal the
reference lists (94 01, 93 02, 69 85, 94 03, ...), each leaving the card unchanged."""

from __future__ import annotations

import pytest
from citycard.card import ED, EP, MasterKeys, Terminal, TxType, VirtualCard, commands, verify_tac
from citycard.card.crypto import pboc_mac, tac_key
from citycard.card.keys import KeyUsage, SecretKey
from citycard.card.personalize import SAMPLE_PROFILE, personalize, profile_from_json
from citycard.card.purse import PURSE_AID
from citycard.card.state import MemoryStore
from citycard.card.sw import (
    ConditionsOfUseNotSatisfied,
    InsufficientBalance,
    KeyIndexNotSupported,
    MacInvalid,
    SecurityStatusNotSatisfied,
)

from .helpers import PIN, send

SELECT_PURSE = "00A4040009" + PURSE_AID.hex()
VECTOR_KEY = bytes.fromhex("11223344556677888877665544332211")
VECTOR_DTK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")


@pytest.fixture
def vector_card(master_keys: MasterKeys) -> VirtualCard:
    """A card whose DLK/DPK/DTK are the published vector keys and whose random is 11223344."""
    image = personalize(profile_from_json(SAMPLE_PROFILE), master_keys)
    purse_df = next(df for df in image.mf.walk() if df.application == "purse")
    for key in purse_df.keys:
        if key.usage in (KeyUsage.LOAD, KeyUsage.PURCHASE):
            key.value = SecretKey(VECTOR_KEY)
        elif key.usage is KeyUsage.TAC:
            key.value = SecretKey(VECTOR_DTK)
    return VirtualCard(image, MemoryStore(), random=lambda n: bytes.fromhex("11223344")[:n])


def test_load_vector_end_to_end(vector_card: VirtualCard) -> None:
    card = vector_card
    send(card, SELECT_PURSE)
    assert send(card, "0020000003" + PIN) == "9000"
    # INITIALIZE FOR LOAD, ED, key 01, 0x1000 fen, terminal 001122334455: MAC1 = 2988AE5A (§2.4)
    answer = send(card, "805000010B 01 00001000 001122334455 10")
    assert answer == "00000000" + "0000" + "02" + "00" + "11223344" + "2988AE5A" + "9000"
    # CREDIT FOR LOAD with the published MAC2 3A845BF0
    answer = send(card, "805200000B 20111221 214822 3A845BF0 04")
    tac_input = bytes.fromhex("00001000 0000 00001000 01 001122334455 20111221 214822".replace(" ", ""))
    assert answer == pboc_mac(tac_key(VECTOR_DTK), tac_input).hex().upper() + "9000"
    assert card.image.purse.balances[ED] == 0x1000
    assert card.image.purse.online_counters[ED] == 1


def test_purchase_vector_end_to_end(vector_card: VirtualCard) -> None:
    card = vector_card
    card.image.purse.balances[EP] = 0x2000
    send(card, SELECT_PURSE)
    answer = send(card, "805001020B 01 00001000 001122334455 0F")
    assert answer == "00002000" + "0000" + "000000" + "01" + "00" + "11223344" + "9000"
    # DEBIT: terminal seq 00000001, 2012-02-29 13:51:00, MAC1 F15CAB75 -> MAC2 56988A13 (§2.4)
    answer = send(card, "805401000F 00000001 20120229 135100 F15CAB75 08")
    tac_input = bytes.fromhex("00001000 06 001122334455 00000001 20120229 135100".replace(" ", ""))
    assert answer == pboc_mac(tac_key(VECTOR_DTK), tac_input).hex().upper() + "56988A13" + "9000"
    assert card.image.purse.balances[EP] == 0x1000
    assert card.image.purse.offline_counters[EP] == 1
    record = send(card, "00B201C417")
    assert record == "0000" + "000000" + "00001000" + "06" + "001122334455" + "20120229135100" + "9000"


def test_forged_mac1_is_refused_and_changes_nothing(vector_card: VirtualCard) -> None:
    card = vector_card
    card.image.purse.balances[EP] = 0x2000
    send(card, SELECT_PURSE)
    send(card, "805001020B 01 00001000 001122334455 0F")
    before = card.snapshot()
    assert send(card, "805401000F 00000001 20120229 135100 F15CAB76 08") == "9302"
    assert card.snapshot() == before
    assert card.image.purse.offline_counters[EP] == 0
    # the session is burned: the right MAC1 now finds no INITIALIZE before it
    assert send(card, "805401000F 00000001 20120229 135100 F15CAB75 08") == "6985"
    assert card.image.purse.balances[EP] == 0x2000


def test_forged_mac2_on_load_is_refused(vector_card: VirtualCard) -> None:
    card = vector_card
    send(card, SELECT_PURSE)
    send(card, "0020000003" + PIN)
    send(card, "805000010B 01 00001000 001122334455 10")
    before = card.snapshot()
    assert send(card, "805200000B 20111221 214822 3A845BF1 04") == "9302"
    assert card.snapshot() == before


@pytest.mark.parametrize(
    ("setup", "apdu", "sw"),
    [
        ([], "805401000F 00000001 20120229 135100 F15CAB75 08", "6985"),  # DEBIT with no INITIALIZE
        ([], "805200000B 20111221 214822 3A845BF0 04", "6985"),  # CREDIT with no INITIALIZE
        (["805001020B 01 00001000 001122334455 0F"], "805200000B 20111221 214822 3A845BF0 04", "6985"),
        (["805001020B 01 00001000 001122334455 0F", "805C000204"],  # something in between
         "805401000F 00000001 20120229 135100 F15CAB75 08", "6985"),
        ([], "805001020B 02 00001000 001122334455 0F", "9403"),  # key index 02 does not exist
        ([], "805001020B 01 00003000 001122334455 0F", "9401"),  # more than the balance
        ([], "805001010B 01 00000001 001122334455 0F", "6982"),  # ED purchase needs the PIN
        ([], "805000020B 01 00000001 001122334455 10", "6982"),  # load needs the PIN
        (["0020000003" + PIN], "805000020B 01 7FFFFFFF 001122334455 10", "6A80"),  # above the purse maximum
        (["0020000003" + PIN], "805000020B 01 00000000 001122334455 10", "6A80"),  # loading nothing
        ([], "805001030B 01 00000001 001122334455 0F", "6A86"),  # purse 03
        ([], "805002010B 01 00000001 001122334455 0F", "6A81"),  # cash withdrawal: not built
        ([], "805003010B 01 00000001 001122334455 0F", "6A86"),  # CAPP on the ED
        ([], "805001020A 01 00000001 0011223344 0F", "6700"),  # 10 bytes of data
        ([], "805001020B 01 00001000 001122334455 05", "6C0F"),  # Le too short: 15 bytes to give
        ([], "805C000304", "6A86"),
        ([], "805C010204", "6A86"),
        ([], "805C000104", "6982"),  # ED balance needs the PIN
        ([], "805C00020100", "6700"),  # GET BALANCE with data
        ([], "805A0002020001 08", "9406"),  # no proof for counter 1
        ([], "805A0007020001 08", "6A86"),  # type 07 not provable here
        ([], "8050010200000B0100001000001122334455000F", "6700"),  # extended length on ED/EP
    ],
)
def test_purse_refusals_change_nothing(vector_card: VirtualCard, setup: list[str], apdu: str, sw: str) -> None:
    card = vector_card
    card.image.purse.balances[EP] = 0x2000
    send(card, SELECT_PURSE)
    for step in setup:
        assert send(card, step)[-4:] == "9000", step
    before = card.snapshot()
    assert send(card, apdu) == sw
    assert card.snapshot() == before


def test_bcd_date_is_checked(vector_card: VirtualCard) -> None:
    card = vector_card
    card.image.purse.balances[EP] = 0x2000
    send(card, SELECT_PURSE)
    send(card, "805001020B 01 00001000 001122334455 0F")
    assert send(card, "805401000F 00000001 2012022A 135100 F15CAB75 08") == "6A80"


def test_counter_at_its_maximum(vector_card: VirtualCard) -> None:
    card = vector_card
    card.image.purse.offline_counters[EP] = 0xFFFF
    send(card, SELECT_PURSE)
    assert send(card, "805001020B 01 00000000 001122334455 0F") == "9402"


def test_flows_load_and_purchase(terminal: Terminal, card: VirtualCard, master_keys: MasterKeys) -> None:
    terminal.verify_pin(PIN)
    load = terminal.load(10_000)
    assert (load.balance_before_fen, load.balance_after_fen, load.online_counter) == (0, 10_000, 0)
    sale = terminal.purchase(1_250)
    assert (sale.balance_before_fen, sale.balance_after_fen, sale.offline_counter) == (10_000, 8_750, 0)
    assert terminal.balance() == 8_750
    assert verify_tac(master_keys, sale.tac_fields(), sale.tac)
    assert verify_tac(master_keys, load.tac_fields(), load.tac)
    records = terminal.transactions()
    assert [(r.tx_type, r.amount_fen, r.counter) for r in records] == [(TxType.PURCHASE_EP, 1_250, 0),
                                                                       (TxType.LOAD_EP, 10_000, 0)]


def test_ed_purse_is_separate(terminal: Terminal) -> None:
    terminal.verify_pin(PIN)
    terminal.load(500, purse=ED)
    terminal.purchase(200, purse=ED)
    assert terminal.balance(ED) == 300
    assert terminal.balance(EP) == 0
    with pytest.raises(InsufficientBalance):
        terminal.purchase(1, purse=EP)


def test_flow_errors_are_named(terminal: Terminal) -> None:
    with pytest.raises(SecurityStatusNotSatisfied):
        terminal.load(100)
    with pytest.raises(InsufficientBalance):
        terminal.purchase(1)


def test_composite_purchase_writes_the_capp_record(terminal: Terminal, card: VirtualCard) -> None:
    terminal.verify_pin(PIN)
    terminal.load(1_000)
    entry = bytes((0x02, 46)) + b"ENTRY station 0117".ljust(46, b"\x00")
    receipt = terminal.composite_purchase(0, entry)
    assert receipt.tx_type == TxType.CAPP and receipt.balance_after_fen == 1_000
    assert send(card, "00B202B800") == entry.hex().upper() + "9000"  # CAPP file SFI 17, tag 02
    exit_record = bytes((0x02, 46)) + b"EXIT station 0342".ljust(46, b"\x00")
    receipt = terminal.composite_purchase(400, exit_record)
    assert receipt.balance_after_fen == 600
    assert send(card, "00B201BC00")[:-4] == exit_record.hex().upper()  # record 1 of SFI 17, by number
    assert [r.tx_type for r in terminal.transactions()][:2] == [TxType.CAPP, TxType.CAPP]


def test_capp_cache_rules(vector_card: VirtualCard) -> None:
    card = vector_card
    card.image.purse.balances[EP] = 0x2000
    send(card, SELECT_PURSE)
    record = "022E" + "11" * 46
    assert send(card, "80DC02B830" + record) == "6985"  # no INITIALIZE FOR CAPP PURCHASE
    send(card, "805001020B 01 00000001 001122334455 0F")
    assert send(card, "80DC02B830" + record) == "6985"  # a plain purchase is not a CAPP purchase
    send(card, "805003020B 01 00000001 001122334455 0F")
    assert send(card, "80DC03B830" + "032E" + "11" * 46) == "6A83"  # no record with tag 03
    send(card, "805003020B 01 00000001 001122334455 0F")
    assert send(card, "80DC02B82F" + record[:-2]) == "6700"  # 47 bytes into 48-byte records
    send(card, "805003020B 01 00000001 001122334455 0F")
    assert send(card, "80DC02C030" + record) == "6981"  # SFI 18 holds no TLV records
    send(card, "805003020B 01 00000001 001122334455 0F")
    assert send(card, "80DC02B830" + record) == "9000"
    assert send(card, "80DC02B830" + record) == "6985"  # one cache per purchase


def test_capp_cache_is_dropped_when_the_debit_fails(vector_card: VirtualCard) -> None:
    card = vector_card
    card.image.purse.balances[EP] = 0x2000
    send(card, SELECT_PURSE)
    before = send(card, "00B202B800")
    send(card, "805003020B 01 00000001 001122334455 0F")
    send(card, "80DC02B830" + "022E" + "11" * 46)
    assert send(card, "805401000F 00000001 20120229 135100 00000000 08") == "9302"
    assert send(card, "00B202B800") == before


def test_transaction_proof_after_purchase(terminal: Terminal, card: VirtualCard) -> None:
    terminal.verify_pin(PIN)
    terminal.load(1_000)
    sale = terminal.purchase(100)
    proof = send(card, f"805A000602{sale.offline_counter + 1:04X}08")
    assert proof == (sale.mac2 + sale.tac).hex().upper() + "9000"
    assert send(card, f"805A000502{sale.offline_counter + 1:04X}08") == "9406"  # right counter, wrong type


def test_proofs_are_bounded(terminal: Terminal, card: VirtualCard) -> None:
    terminal.verify_pin(PIN)
    terminal.load(1_000)
    for _ in range(12):
        terminal.purchase(1)
    assert len(card.image.purse.proofs) == 8
    assert send(card, "805A0006020001 08") == "9406"  # the oldest fell out
    assert send(card, "805A000602000C 08").endswith("9000")


def test_detail_file_is_cyclic(terminal: Terminal) -> None:
    terminal.verify_pin(PIN)
    terminal.load(1_000)
    for _ in range(11):
        terminal.purchase(3)
    records = terminal.transactions()
    assert len(records) == 10
    assert [r.counter for r in records] == list(range(10, 0, -1))


def test_refusals_reach_the_terminal_as_named_errors(terminal: Terminal) -> None:
    when = bytes.fromhex("20250101120000")
    terminal.select_purse()
    with pytest.raises(ConditionsOfUseNotSatisfied):
        terminal.channel.send(commands.debit_for_purchase(1, when, bytes(4)))
    with pytest.raises(KeyIndexNotSupported):
        terminal.channel.send(commands.initialize_for_purchase(EP, 9, 0, bytes(6)))
    terminal.channel.send(commands.initialize_for_purchase(EP, 1, 0, bytes(6)))
    with pytest.raises(MacInvalid):
        terminal.channel.send(commands.debit_for_purchase(1, when, bytes(4)))
