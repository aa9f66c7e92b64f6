"""Helpers shared by the card tests (fixtures live in conftest.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from citycard.card import CardChannel, IssuerHost, MasterKeys, MemoryTransport, SoftSam, Terminal, VirtualCard
from citycard.card.personalize import SAMPLE_PROFILE

DATA = Path(__file__).parent / "data"
TEST_KEYS_PATH = DATA / "test-master-keys.json"
TERMINAL_ID = bytes.fromhex("001122334455")
PIN = SAMPLE_PROFILE["initial_pin"]


def seeded_random(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def make_terminal(card: VirtualCard, master_keys: MasterKeys, observers: tuple = ()) -> Terminal:
    channel = CardChannel(MemoryTransport(card), observers)
    return Terminal(channel, SoftSam(master_keys, TERMINAL_ID), host=IssuerHost(master_keys))


def send(card: VirtualCard, hex_apdu: str) -> str:
    """Send spaced or unspaced hex, get the response as unspaced upper-case hex."""
    return card.process(bytes.fromhex(hex_apdu.replace(" ", ""))).hex().upper()
