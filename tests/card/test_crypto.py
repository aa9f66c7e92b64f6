"""DES/3DES, the ED/EP MAC, session keys and diversification against card-standards.md §2.4's verified vectors."""

from __future__ import annotations

import pytest
from citycard.card.crypto import (
    diversification_factor,
    diversify,
    pboc_mac,
    session_key,
    tac_key,
    tdes_decrypt,
    tdes_encrypt,
)
from hypothesis import given
from hypothesis import strategies as st

VECTOR_KEY = bytes.fromhex("11223344556677888877665544332211")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_load_session_key_vector() -> None:
    assert session_key(VECTOR_KEY, h("11223344 0000 8000")) == h("9B1D924E05595603")


def test_load_mac1_and_mac2_vectors() -> None:
    sk = h("9B1D924E05595603")
    assert pboc_mac(sk, h("00000000 00001000 01 001122334455")) == h("2988AE5A")
    assert pboc_mac(sk, h("00001000 01 001122334455 20111221 214822")) == h("3A845BF0")


def test_purchase_session_key_vector() -> None:
    assert session_key(VECTOR_KEY, h("11223344 0000 0001")) == h("003238ABC57659DD")


def test_purchase_mac1_and_mac2_vectors() -> None:
    sk = h("003238ABC57659DD")
    assert pboc_mac(sk, h("00001000 06 001122334455 20120229135100")) == h("F15CAB75")
    assert pboc_mac(sk, h("00001000")) == h("56988A13")


def test_tac_key_vector() -> None:
    assert tac_key(h("00112233445566778899AABBCCDDEEFF")) == h("8888888888888888")


def test_mac_padding_always_appends_a_block() -> None:
    # An input that is already a multiple of 8 gets a whole 80 00.. block, so x and x||80 00.. differ.
    key = h("0123456789ABCDEF")
    block = h("0011223344556677")
    # The MAC of 8 bytes is the CBC-MAC of two blocks: the data, then 80 00 00 00 00 00 00 00.
    first = tdes_encrypt(key, block)
    second = tdes_encrypt(key, bytes(a ^ b for a, b in zip(first, h("8000000000000000"))))
    assert pboc_mac(key, block) == second[:4]


def test_mac_iv_is_used() -> None:
    key = h("0123456789ABCDEF")
    assert pboc_mac(key, b"abc") != pboc_mac(key, b"abc", iv=h("1111111111111111"))


def test_diversification_is_the_standard_method() -> None:
    factor = h("0102030405060708")
    derived = diversify(VECTOR_KEY, factor)
    assert derived[:8] == tdes_encrypt(VECTOR_KEY, factor)
    assert derived[8:] == tdes_encrypt(VECTOR_KEY, h("FEFDFCFBFAF9F8F7"))


def test_factor_is_rightmost_8_bytes() -> None:
    assert diversification_factor(h("33030000000000000001")) == h("0000000000000001")
    with pytest.raises(ValueError):
        diversification_factor(h("00112233"))


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=64).filter(lambda b: len(b) % 8 == 0))
def test_tdes_round_trip(key: bytes, data: bytes) -> None:
    assert tdes_decrypt(key, tdes_encrypt(key, data)) == data


@pytest.mark.parametrize("bad_key", [b"", b"\x00" * 7, b"\x00" * 24])
def test_wrong_key_sizes_are_refused(bad_key: bytes) -> None:
    with pytest.raises(ValueError):
        tdes_encrypt(bad_key, bytes(8))
