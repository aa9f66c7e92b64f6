"""Fuzz the chip with 100,000+ generated APDUs, straight into the card object (no PC/SC, so it stays fast).

Each APDU is a mutation of a real command (truncated, padded, wrong Lc or Le, extended-length
re-encodings and abuse, other CLA / INS / P1 P2, random data) or plain random bytes, sent while the
card sits in varied states (MF, SSSE, purse, after an INITIALIZE, after GET CHALLENGE, PIN verified).
For every APDU: nothing escapes `process`, the answer carries a status word, there is never an
internal fault (6F 00), and a refused APDU leaves the card exactly as it was (persistent image,
selection, security status, and no write to the store). The only refusals that may change state are
the 63 Cx of a wrong PIN or key, which spend a try by design. After every APDU that wrote, the
journal replayed from its whole image equals the card's memory: no command changes a part it does
not record.
"""

from __future__ import annotations

import random

import pytest
from citycard.card import MasterKeys, VirtualCard, personalize, profile_from_json
from citycard.card.apdu import CARD_NC_MAX, encode_command, parse_command
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import PURSE_AID
from citycard.card.ssse import SSSE_AID
from citycard.card.state import MemoryStore
from citycard.card.sw import Refusal

from .helpers import seeded_random

SEED = 20250115
APDUS_TOTAL = 100_000
FRESH_CARD_EVERY = 5_000  # start over now and then so a blocked PIN does not hide the verified paths
SELECT_SSSE = "00A404000F" + SSSE_AID.hex()
SELECT_PURSE = "00A4040009" + PURSE_AID.hex()

TEMPLATES = [
    "00A40000023F00", "00A4000000", SELECT_SSSE + "00", SELECT_PURSE + "00", "00A4040C09" + PURSE_AID.hex(),
    "00A4020002EF05", "00A4020002EF06", "00A40000021001", "00A408000410010018", "00A4030000",
    "00B095001E", "00B0950A0A", "00B0960000", "00B0000000", "00B2010400", "00B2080014", "00B2070411",
    "00B201C417", "00B202B800", "00D6950001FF", "00DC07040B0709413030303030303032",
    "00E2000003070141", "0020000003123456", "0020000003654321", "0020000000", "0084000008", "0084000004",
    "00820001080011223344556677", "0088000108010203040506070808", "805E010007123456FF123456",
    "805E00000712345601020304", "805C000204", "805C000104", "805000020B0100000064001122334455 10",
    "805001020B0100000001001122334455 0F", "805003020B0100000000001122334455 0F",
    "805200000B2025011512000001020304 04", "805401000F000000012025011512000001020304 08",
    "80DC02B830022E" + "00" * 46, "805A0006020001 08", "00C0000008",
]
SETUP_SEQUENCES = [
    [SELECT_PURSE],
    [SELECT_SSSE, "00A4020002EF05"],
    [SELECT_PURSE, "805001020B0100000000001122334455 0F"],
    [SELECT_PURSE, "805003020B0100000000001122334455 0F"],
    [SELECT_PURSE, "0084000008"],
    ["0020000003123456", SELECT_PURSE],
    ["00A40000023F00"],
]


def _h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _mutate(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    kind = rng.randrange(11)
    if kind == 0:
        return "truncate", raw[: rng.randrange(len(raw))]
    if kind == 1:
        return "extend", raw + rng.randbytes(rng.randint(1, 3))
    if kind == 2 and len(raw) > 4:
        i = 4
        return "lc", raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1 :]
    if kind == 3 and len(raw) > 4:
        return "le", raw[:-1] + bytes([rng.randrange(256)])
    if kind == 4:
        return "cla", bytes([rng.choice([0x01, 0x04, 0x0C, 0x40, 0x84, 0x90, 0xA0, 0xC0, 0xFF])]) + raw[1:]
    if kind == 5:
        return "ins", raw[:1] + bytes([rng.randrange(256)]) + raw[2:]
    if kind == 6:
        return "p1p2", raw[:2] + rng.randbytes(2) + raw[4:]
    if kind == 7:
        try:
            c = parse_command(raw)
        except Refusal:
            return "random", rng.randbytes(rng.randint(0, 40))
        return "extended", encode_command(c.cla, c.ins, c.p1, c.p2, c.data, c.ne, extended=True)
    if kind == 8:  # extended-length abuse: any Lc / Le field, any body length
        lc = rng.choice([0, 1, 2, 0x0B, 0x0F, 255, 256, CARD_NC_MAX, CARD_NC_MAX + 1, 65535])
        body = rng.randbytes(min(lc, CARD_NC_MAX + 2) + rng.choice([-1, 0, 0, 1, 2]) if lc else rng.randint(0, 3))
        return "extended-abuse", raw[:4] + b"\x00" + lc.to_bytes(2, "big") + body
    if kind == 9:
        return "data", raw[:4] + bytes([len(d := rng.randbytes(rng.randint(1, 40)))]) + d
    return "random", rng.randbytes(rng.randint(0, 300))


def _fresh_card(master_keys: MasterKeys, seed: int) -> tuple[VirtualCard, MemoryStore]:
    store = MemoryStore()
    card = VirtualCard(personalize(profile_from_json(SAMPLE_PROFILE), master_keys), store, random=seeded_random(seed))
    return card, store


@pytest.mark.slow
def test_fuzz_100k_apdus_never_crash_and_refusals_change_nothing(master_keys: MasterKeys) -> None:
    rng = random.Random(SEED)
    templates = [_h(t) for t in TEMPLATES]
    card, store = _fresh_card(master_keys, SEED)
    kinds_seen: dict[str, int] = {}
    refused = writes = 0
    snapshot = card.snapshot()
    for n in range(APDUS_TOTAL):
        if n % FRESH_CARD_EVERY == 0 and n:
            card, store = _fresh_card(master_keys, SEED + n)
            snapshot = card.snapshot()
        if rng.random() < 0.05:  # walk the card into another state with real commands
            for step in rng.choice(SETUP_SEQUENCES):
                card.process(_h(step))
            snapshot = card.snapshot()
        kind, apdu = _mutate(rng, rng.choice(templates))
        kinds_seen[kind] = kinds_seen.get(kind, 0) + 1
        saves = store.saves
        try:
            response = card.process(apdu)
        except Exception as exc:  # noqa: BLE001 - any escape is the failure this test looks for
            pytest.fail(f"APDU #{n} ({kind}) {apdu.hex()} raised {exc!r}")
        context = f"APDU #{n} ({kind}) {apdu.hex().upper()} -> {response.hex().upper()}"
        assert len(response) >= 2, context
        sw = int.from_bytes(response[-2:], "big")
        assert sw != 0x6F00, f"internal fault: {context}"
        _check_expected_sw(apdu, sw, context)
        if store.saves != saves:
            writes += 1
            assert store.load().to_bytes() == card.image.to_bytes(), f"journal and memory differ: {context}"
        if sw in (0x9000, 0x6282) or sw & 0xFFF0 == 0x63C0:
            snapshot = card.snapshot()
            continue
        refused += 1
        assert len(response) == 2, f"a refusal carries no data: {context}"
        assert store.saves == saves, f"a refused APDU wrote the store: {context}"
        after = card.snapshot()
        assert after == snapshot, f"a refused APDU changed the card: {context}"
    assert refused > APDUS_TOTAL // 2
    assert writes > 100, "the run must exercise state-changing commands"
    assert set(kinds_seen) >= {"truncate", "extend", "lc", "le", "cla", "ins", "p1p2", "extended",
                               "extended-abuse", "data", "random"}


def _check_expected_sw(apdu: bytes, sw: int, context: str) -> None:
    """Where the right answer is certain, check it; the rest is covered by the unit tests."""
    if len(apdu) < 4:
        assert sw == 0x6700, context
        return
    if apdu[0] not in (0x00, 0x80):
        assert sw == 0x6E00, context
        return
    try:
        parse_command(apdu)
    except Refusal:
        assert sw in (0x6700, 0x6D00), context  # wrong length, unless the INS is unknown here first
