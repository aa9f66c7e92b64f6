"""DES/3DES, the ED/EP MAC, session keys and diversification against card-standards.md §2.4's verified vectors.

Every test runs on both implementations of card/crypto.py (the compiled card/_des.pyx and its pure
twin PyDesCipher), and a differential test drives both with the same random keys and inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from citycard.card import _des, crypto
from citycard.card.crypto import (
    CipherCache,
    PyDesCipher,
    diversification_factor,
    diversify,
    pboc_mac,
    session_key,
    tac_key,
    tdes_decrypt,
    tdes_encrypt,
)
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import given
from hypothesis import strategies as st

IMPLEMENTATIONS = {
    "compiled": (_des.DesCipher, _des.ecb_encrypt),
    "python": (PyDesCipher, crypto._py_ecb_encrypt),
}


@pytest.fixture(scope="module", autouse=True, params=sorted(IMPLEMENTATIONS))
def DesCipher(request: pytest.FixtureRequest) -> Iterator[type[PyDesCipher]]:
    """Runs the module once per implementation: crypto's functions and CipherCache use the one chosen here.

    Named after the class it yields, so a test reads as it would against crypto.DesCipher. Module-scoped
    (and patched by hand rather than with monkeypatch) so hypothesis's tests may use it.
    """
    saved = crypto.DesCipher, crypto._ecb_encrypt
    crypto.DesCipher, crypto._ecb_encrypt = IMPLEMENTATIONS[request.param]
    yield crypto.DesCipher
    crypto.DesCipher, crypto._ecb_encrypt = saved


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


def _reference_mac(key8: bytes, data: bytes, iv: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 1, padding method 2, the textbook way: one CBC pass over the padded data."""
    padded = data + b"\x80" + bytes(-(len(data) + 1) % 8)
    encryptor = Cipher(TripleDES(key8 * 3), modes.CBC(iv)).encryptor()
    return (encryptor.update(padded) + encryptor.finalize())[-8:][:4]


@given(st.binary(min_size=8, max_size=8), st.binary(max_size=40), st.binary(min_size=8, max_size=8))
def test_block_by_block_mac_is_cbc_mac(DesCipher: type[PyDesCipher], key: bytes, data: bytes, iv: bytes) -> None:
    cipher = DesCipher(key)
    assert cipher.mac(data, iv) == _reference_mac(key, data, iv)
    assert cipher.mac(data, iv) == cipher.mac(data, iv), "a kept cipher gives the same answer every time"


@given(st.binary(min_size=8, max_size=8),
       st.lists(st.tuples(st.binary(max_size=40), st.binary(min_size=8, max_size=8)), min_size=2, max_size=6))
def test_a_kept_mac_key_starts_every_mac_afresh(DesCipher: type[PyDesCipher], key: bytes,
                                                messages: list[tuple[bytes, bytes]]) -> None:
    """A kept MAC key chains one CBC context through all its MACs; each must still equal a fresh CBC-MAC,
    whatever came before it (lengths and IVs mixed, as MAC1, TAC and MAC2 of a purchase are)."""
    cipher = DesCipher(key)
    for data, iv in messages:
        assert cipher.mac(data, iv) == _reference_mac(key, data, iv)


def test_a_kept_cipher_serves_every_operation_of_its_key(DesCipher: type[PyDesCipher]) -> None:
    cipher = DesCipher(VECTOR_KEY)
    assert cipher.session_key(h("11223344 0000 0001")) == h("003238ABC57659DD")
    assert cipher.session_key(h("11223344 0000 8000")) == h("9B1D924E05595603")
    assert cipher.diversify(h("0102030405060708")) == diversify(VECTOR_KEY, h("0102030405060708"))
    with pytest.raises(ValueError, match="8-byte key"):
        cipher.mac(b"abc")
    with pytest.raises(ValueError, match="session key"):
        DesCipher(h("0123456789ABCDEF")).session_key(bytes(8))
    with pytest.raises(ValueError, match="only makes MACs"):
        DesCipher(h("0123456789ABCDEF")).encrypt(bytes(8))
    assert cipher.encrypt(h("0102030405060708")) == tdes_encrypt(VECTOR_KEY, h("0102030405060708"))


def test_ciphers_never_show_their_key(DesCipher: type[PyDesCipher]) -> None:
    cache = CipherCache(4)
    cipher = cache.get(VECTOR_KEY)
    assert isinstance(cipher, DesCipher)
    assert VECTOR_KEY.hex() not in (repr(cipher) + repr(cache)).lower()
    assert repr(cipher) == "DesCipher(<16-byte key redacted>)"


def test_cipher_cache_is_bounded_and_keeps_the_newest() -> None:
    cache = CipherCache(2)
    first, second = cache.get(bytes(8)), cache.get(bytes(7) + b"\x01")
    assert cache.get(bytes(8)) is first
    third = cache.get(bytes(7) + b"\x02")  # evicts the oldest entry
    assert len(cache) == 2
    assert cache.get(bytes(7) + b"\x01") is second and cache.get(bytes(7) + b"\x02") is third
    assert cache.get(bytes(8)) is not first
    with pytest.raises(ValueError):
        CipherCache(0)


def test_rekey_gives_a_fresh_cipher_of_the_new_key(DesCipher: type[PyDesCipher]) -> None:
    cipher = DesCipher(h("9B1D924E05595603"))
    cipher.mac(b"abc")
    cipher.rekey(h("003238ABC57659DD"))
    assert cipher.mac(h("00001000")) == h("56988A13")
    cipher.rekey(VECTOR_KEY)
    assert cipher.key_bytes == 16
    assert cipher.session_key(h("11223344 0000 8000")) == h("9B1D924E05595603")
    with pytest.raises(ValueError):
        cipher.rekey(bytes(24))
    assert cipher.session_key(h("11223344 0000 0001")) == h("003238ABC57659DD"), "a refused key changes nothing"


@pytest.mark.parametrize("bad_key", [b"", b"\x00" * 7, b"\x00" * 15, b"\x00" * 24])
def test_a_cipher_refuses_wrong_key_sizes(DesCipher: type[PyDesCipher], bad_key: bytes) -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        DesCipher(bad_key)


def test_operations_refuse_wrong_sizes(DesCipher: type[PyDesCipher]) -> None:
    with pytest.raises(ValueError, match="ECB input"):
        DesCipher(VECTOR_KEY).encrypt(bytes(12))
    with pytest.raises(ValueError, match="ECB input"):
        tdes_encrypt(VECTOR_KEY, b"")
    with pytest.raises(ValueError, match="diversify"):
        DesCipher(VECTOR_KEY).diversify(bytes(7))
    with pytest.raises(ValueError, match="IV"):
        DesCipher(bytes(8)).mac(b"abc", bytes(4))


# -- the two implementations against each other --------------------------------------------------------

_KEY8 = st.binary(min_size=8, max_size=8)
_KEY16 = st.binary(min_size=16, max_size=16)
_BLOCKS = st.integers(1, 6).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n))
_OPERATION = st.one_of(
    st.tuples(st.just("mac"), st.binary(max_size=64), _KEY8),
    st.tuples(st.just("encrypt"), _BLOCKS, _KEY8),
    st.tuples(st.just("session_key"), _KEY8, _KEY8),
    st.tuples(st.just("diversify"), _KEY8, _KEY8),
)


@given(_KEY8, _KEY16, st.lists(_OPERATION, min_size=1, max_size=12))
def test_compiled_and_pure_give_identical_results(mac_key: bytes, block_key: bytes,
                                                  operations: list[tuple[str, bytes, bytes]]) -> None:
    """Kept ciphers of both implementations, driven with the same random sequence, answer the same bytes;
    so do the one-shot functions (which run on the fixture's implementation, compared with the other)."""
    compiled = _des.DesCipher(mac_key), _des.DesCipher(block_key)
    pure = PyDesCipher(mac_key), PyDesCipher(block_key)
    for name, data, extra in operations:
        if name == "mac":
            assert compiled[0].mac(data, extra) == pure[0].mac(data, extra)
            assert pboc_mac(mac_key, data, extra) == pure[0].mac(data, extra)
        elif name == "encrypt":
            assert compiled[1].encrypt(data) == pure[1].encrypt(data)
            assert _des.ecb_encrypt(mac_key, data) == crypto._py_ecb_encrypt(mac_key, data)
            assert tdes_encrypt(block_key, data) == pure[1].encrypt(data)
        else:
            assert getattr(compiled[1], name)(data) == getattr(pure[1], name)(data)


def test_the_compiled_core_serves_unless_turned_off() -> None:
    """A build that failed would fall back to the twin silently; this makes it loud."""
    expected = "python" if os.environ.get("CITYCARD_NO_EXTENSIONS") == "1" else "compiled"
    assert crypto.IMPLEMENTATION == expected
    code = "from citycard.card import _des, crypto; print(crypto.IMPLEMENTATION, crypto.DesCipher is _des.DesCipher)"
    for setting, answer in (("1", "python False"), ("", "compiled True")):
        env = {**os.environ, "CITYCARD_NO_EXTENSIONS": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == answer.split()
