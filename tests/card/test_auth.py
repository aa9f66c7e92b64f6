"""GET CHALLENGE, EXTERNAL AUTHENTICATE (with its own retry counter) and INTERNAL AUTHENTICATE."""

from __future__ import annotations

import pytest
from citycard.card import IssuerHost, MasterKeys, VirtualCard
from citycard.card.purse import PURSE_AID

from .helpers import send

SELECT_PURSE = "00A4040009" + PURSE_AID.hex()
SERIAL = bytes.fromhex("33030000000000000001")  # the sample profile's application serial


def external_auth(card: VirtualCard, host: IssuerHost, *, forge: bool = False) -> str:
    challenge = bytes.fromhex(send(card, "0084000008")[:-4])
    cryptogram = host.external_auth_cryptogram("purse", SERIAL, challenge)
    if forge:
        cryptogram = bytes([cryptogram[0] ^ 1]) + cryptogram[1:]
    return send(card, "0082000108" + cryptogram.hex())


@pytest.mark.parametrize(("apdu", "sw"), [("0084000005", "6700"), ("0084000000", "6700"), ("00840000", "6700"),
                                          ("0084010008", "6A86")])
def test_get_challenge_lengths(card: VirtualCard, apdu: str, sw: str) -> None:
    assert send(card, apdu) == sw


def test_challenges_differ(card: VirtualCard) -> None:
    first, second = send(card, "0084000008"), send(card, "0084000008")
    assert len(first) == 20 and first.endswith("9000") and first != second


def test_external_authenticate_counts_and_blocks(card: VirtualCard, master_keys: MasterKeys) -> None:
    host = IssuerHost(master_keys)
    send(card, SELECT_PURSE)
    assert external_auth(card, host, forge=True) == "63C2"
    assert external_auth(card, host) == "9000"  # success gives the tries back
    assert external_auth(card, host, forge=True) == "63C2"
    assert external_auth(card, host, forge=True) == "63C1"
    assert external_auth(card, host, forge=True) == "63C0"
    assert external_auth(card, host) == "6983"
    assert send(card, "00D6950001FF") == "6982"  # no authentication, no update


@pytest.mark.parametrize(("apdu", "sw"), [("0082000108" + "00" * 8, "6984"),  # no challenge before it
                                          ("0082000508" + "00" * 8, "6A88"),  # no key 05
                                          ("0082000107" + "00" * 7, "6700"),
                                          ("0082010108" + "00" * 8, "6A86")])
def test_external_authenticate_errors(card: VirtualCard, apdu: str, sw: str) -> None:
    send(card, SELECT_PURSE)
    before = card.snapshot()
    assert send(card, apdu) == sw
    assert card.snapshot() == before


def test_internal_authenticate_proves_the_card(card: VirtualCard, master_keys: MasterKeys) -> None:
    host = IssuerHost(master_keys)
    send(card, SELECT_PURSE)
    challenge = bytes.fromhex("0102030405060708")
    answer = send(card, "0088000108" + challenge.hex() + "08")
    assert answer.endswith("9000")
    assert host.check_internal_auth("purse", SERIAL, challenge, bytes.fromhex(answer[:-4]))
    other = bytes.fromhex("33030000000000000002")
    assert not host.check_internal_auth("purse", other, challenge, bytes.fromhex(answer[:-4]))
    assert send(card, "0088000208" + challenge.hex()) == "6A88"
    assert send(card, "0088000104" + challenge[:4].hex()) == "6700"
