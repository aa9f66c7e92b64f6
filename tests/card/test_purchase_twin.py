"""The compiled purchase path (card/_purchase.pyx) against its Python twin, byte for byte.

Two identical cards with the same random source, one served by each path (the card's INITIALIZE and
DEBIT, the APDU parser, the SAM, the channel and the terminal's flow), run the same purchases, loads,
composite purchases and malformed commands: every answer, receipt, journal line and final image must
be the same. The rest of tests/card runs on whichever path serves (the compiled one in `make test`).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from citycard.card import (
    EP,
    CardChannel,
    IssuerHost,
    MasterKeys,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    apdu,
    channel,
    cos,
    flows,
    personalize,
    profile_from_json,
    purse,
    sam,
)
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.state import MemoryStore
from citycard.card.sw import InsufficientBalance, Refusal, StatusWordError
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import PIN, TERMINAL_ID, seeded_random

pytestmark = pytest.mark.skipif(purse.COMPILED is None, reason="the compiled path is off (CITYCARD_NO_EXTENSIONS=1)")

WHEN = dt.datetime(2026, 3, 14, 9, 26, 53, tzinfo=flows.CITY_ZONE)
SELECT_PURSE = "00A4040009" + purse.PURSE_AID.hex()


@contextmanager
def python_path() -> Iterator[None]:
    """Every piece of the purchase path on its Python twin, for the duration."""
    compiled = purse.COMPILED
    saved = (purse.HANDLERS, cos._parse_command, sam.SoftSam.init_for_purchase, sam.SoftSam.check_mac2,
             channel.CardChannel.send, flows.Terminal.purchase)
    purse.HANDLERS = purse.PY_HANDLERS
    cos._parse_command = apdu.parse_command
    sam.SoftSam.init_for_purchase = sam.SoftSam.py_init_for_purchase  # type: ignore[method-assign]
    sam.SoftSam.check_mac2 = sam.SoftSam.py_check_mac2  # type: ignore[method-assign]
    channel.CardChannel.send = channel.CardChannel.py_send  # type: ignore[method-assign]
    flows.Terminal.purchase = flows.Terminal.py_purchase  # type: ignore[method-assign]
    try:
        yield
    finally:
        (purse.HANDLERS, cos._parse_command, sam.SoftSam.init_for_purchase, sam.SoftSam.check_mac2,
         channel.CardChannel.send, flows.Terminal.purchase) = saved
        assert purse.COMPILED is compiled


def _pair(master_keys: MasterKeys) -> tuple[tuple[VirtualCard, Terminal], tuple[VirtualCard, Terminal]]:
    def one() -> tuple[VirtualCard, Terminal]:
        card = VirtualCard(personalize(profile_from_json(SAMPLE_PROFILE), master_keys), MemoryStore(),
                           random=seeded_random(11))
        terminal = Terminal(CardChannel(MemoryTransport(card)), SoftSam(master_keys, TERMINAL_ID),
                            host=IssuerHost(master_keys), clock=lambda: WHEN)
        return card, terminal
    return one(), one()


def _run(terminal: Terminal, card: VirtualCard) -> list[object]:
    """A day of a terminal: loads, purchases on both purses, composite ones, refusals; what each gave."""
    out: list[object] = []

    def step(action: object) -> None:
        try:
            out.append(action())  # type: ignore[operator]
        except (StatusWordError, ValueError) as exc:
            out.append((type(exc).__name__, str(exc)))

    step(lambda: terminal.purchase(1))  # nothing loaded yet: 94 01
    step(lambda: terminal.verify_pin(PIN))
    step(lambda: terminal.load(50_000))
    step(lambda: terminal.load(20_000, purse=purse.ED))
    for amount in (1, 0, 99, 12_345, 0x7FFFFFFF, -1):
        step(lambda amount=amount: terminal.purchase(amount))
    for amount in (2, 700):
        step(lambda amount=amount: terminal.purchase(amount, purse=purse.ED))
    step(lambda: terminal.composite_purchase(0, bytes((0x02, 46)) + b"ENTRY 0117".ljust(46, b"\x00")))
    step(lambda: terminal.composite_purchase(400, bytes((0x02, 46)) + b"EXIT 0342".ljust(46, b"\x00")))
    step(lambda: terminal.purchase(1, purse=7))
    step(lambda: terminal.transactions())
    for _ in range(12):  # past the ten detail records and the eight proofs
        step(lambda: terminal.purchase(3))
    return out


def test_the_purchase_path_is_compiled_unless_turned_off() -> None:
    """A build that failed would fall back to the twin silently; this makes it loud."""
    expected = "python" if os.environ.get("CITYCARD_NO_EXTENSIONS") == "1" else "compiled"
    assert purse.PURCHASE_IMPLEMENTATION == expected
    code = ("from citycard.card import purse, flows; "
            "print(purse.PURCHASE_IMPLEMENTATION, flows.Terminal.purchase is flows.Terminal.py_purchase)")
    for setting, answer in (("1", "python True"), ("", "compiled False")):
        env = {**os.environ, "CITYCARD_NO_EXTENSIONS": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == answer.split()


def test_both_paths_answer_journal_and_receipt_alike(master_keys: MasterKeys) -> None:
    (card_c, terminal_c), (card_p, terminal_p) = _pair(master_keys)
    compiled = _run(terminal_c, card_c)
    with python_path():
        python = _run(terminal_p, card_p)
    assert compiled == python
    assert any(isinstance(result, flows.PurchaseReceipt) for result in compiled)
    assert ("InsufficientBalance", str(InsufficientBalance(0x9401, "INITIALIZE FOR PURCHASE"))) in compiled
    assert isinstance(card_c.store, MemoryStore) and isinstance(card_p.store, MemoryStore)
    assert card_c.store.saves == card_p.store.saves > 20
    assert bytes(card_c.store.journal) == bytes(card_p.store.journal)  # every journal line, byte for byte
    assert card_c.snapshot() == card_p.snapshot()
    assert card_c.store.load().to_json() == card_c.image.to_json()  # the lines replay to the card's state


# Raw APDUs around a purchase: out of sequence, wrong P1 P2, lengths, Le, a forged MAC1, non-BCD dates.
RAW_SESSIONS = [
    ["805401000F" + "00000001" + "20260314092653" + "00000000" + "08"],  # DEBIT with no INITIALIZE
    ["805001020B01000000010011223344550F", "805401000F0000000120260314092653DEADBEEF08"],  # forged MAC1
    ["805001020B01000000010011223344550F", "805401000F00000001202603140926AA0000000008"],  # not BCD
    ["805001020B01000000010011223344550F", "805403000F0000000120260314092653DEADBEEF08"],  # unload
    ["805001020B01000000010011223344550F", "805401010F0000000120260314092653DEADBEEF08"],  # P2
    ["805001020B01000000010011223344550F", "805401000E00000001202603140926530000000008"],  # Lc 14
    ["805001020B01000000010011223344550F", "805401000F0000000120260314092653DEADBEEF04"],  # Le 4
    ["805001020B0100000001001122334455", "805001020B010000000100112233445504"],  # no Le, Le 4
    ["805001020A010000000100112233440F", "805001030B01000000010011223344550F"],  # Lc 10, CAPP
    ["805001010B01000000010011223344550F", "805001020B09000000010011223344550F"],  # ED no PIN, key 9
    ["805001020B01000FFFFF0011223344550F", "805002020B01000000010011223344550F"],  # too much, cash
    ["805001030B01000000010011223344550F", "805001FF0B01000000010011223344550F", "8050010200"],
    ["80500102000B01000000010011223344550F", "805001020B01000000010011223344550F00"],  # extended, 4S Le
]


@pytest.mark.parametrize("session", RAW_SESSIONS)
def test_both_paths_refuse_alike(master_keys: MasterKeys, session: list[str]) -> None:
    (card_c, _), (card_p, _) = _pair(master_keys)

    def answers(card: VirtualCard) -> list[str]:
        card.image.purse.balances[EP] = 0x2000  # type: ignore[union-attr]
        return [card.process(bytes.fromhex(hex_apdu)).hex().upper() for hex_apdu in [SELECT_PURSE, *session]]

    compiled = answers(card_c)
    with python_path():
        python = answers(card_p)
    assert compiled == python
    assert compiled[-1] != "9000" or len(session) > 1
    assert card_c.snapshot() == card_p.snapshot()


def _parsed(parse: object, raw: bytes) -> object:
    try:
        return parse(raw)  # type: ignore[operator]
    except Refusal as refusal:
        return refusal.sw


@settings(max_examples=3_000, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.binary(min_size=4, max_size=4), st.integers(0, 4200), st.booleans(), st.integers(0, 3)).map(
        lambda t: t[0] + (b"\x00" + t[1].to_bytes(2, "big") if t[2] else bytes((t[1] & 0xFF,)))
        + bytes(t[1] if t[2] else t[1] & 0xFF) + bytes(t[3])),
))
def test_the_compiled_parser_reads_every_apdu_as_apdu_py_does(raw: bytes) -> None:
    assert purse.COMPILED is not None
    assert _parsed(purse.COMPILED.parse_command, raw) == _parsed(apdu.parse_command, raw)
    assert _parsed(purse.COMPILED.parse_command, bytearray(raw)) == _parsed(apdu.parse_command, raw)


def test_the_compiled_path_keeps_a_card_s_memo_bounded(master_keys: MasterKeys) -> None:
    """What the purchase path memoises per card (its context, its journal line's pieces) is made once."""
    (card, terminal), _ = _pair(master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    terminal.purchase(1)
    entries = len(card.memo)
    for _ in range(50):
        terminal.purchase(1)
    assert len(card.memo) == entries
