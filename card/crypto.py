"""DES / 2-key 3DES primitives of PBOC ED/EP (JR/T 0025) and the standard key diversification.

Everything here is a pure function of bytes; card, SAM and tests share it. The algorithms and the
vectors that pin them are in card-standards.md §2.4 (checked in tests/card/test_crypto.py):

* ED/EP MAC: ISO 9797-1 MAC algorithm 1 with padding method 2 over single DES (8-byte key),
  IV 8 x 00 unless given, leftmost 4 bytes.
* session key: 2-key 3DES-ECB of one 8-byte block under the 16-byte application key.
* TAC key: left half XOR right half of the 16-byte DTK.
* diversification: left = 3DES(MK, factor), right = 3DES(MK, NOT factor).

`cryptography` deprecates 8- and 16-byte TripleDES keys; we always hand it the 24-byte form
(K1 K2 K1 for 2-key 3DES, K K K for single DES), which computes the same function.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

__all__ = [
    "BLOCK_BYTES",
    "MAC_BYTES",
    "des_encrypt",
    "diversification_factor",
    "diversify",
    "macs_equal",
    "pboc_mac",
    "session_key",
    "tac_key",
    "tdes_decrypt",
    "tdes_encrypt",
]

BLOCK_BYTES = 8
MAC_BYTES = 4
SINGLE_KEY_BYTES = 8
DOUBLE_KEY_BYTES = 16
ZERO_IV = bytes(BLOCK_BYTES)


def _key24(key: bytes) -> bytes:
    if len(key) == SINGLE_KEY_BYTES:
        return key * 3
    if len(key) == DOUBLE_KEY_BYTES:
        return key + key[:8]
    raise ValueError("a DES key is 8 bytes and a 2-key 3DES key 16 bytes")


def _blocks(data: bytes) -> None:
    if not data or len(data) % BLOCK_BYTES:
        raise ValueError("ECB input must be a non-empty multiple of 8 bytes")


def tdes_encrypt(key: bytes, data: bytes) -> bytes:
    """ECB encryption with an 8-byte (single DES) or 16-byte (2-key 3DES) key."""
    _blocks(data)
    encryptor = Cipher(TripleDES(_key24(key)), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def tdes_decrypt(key: bytes, data: bytes) -> bytes:
    _blocks(data)
    decryptor = Cipher(TripleDES(_key24(key)), modes.ECB()).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def des_encrypt(key8: bytes, data: bytes) -> bytes:
    if len(key8) != SINGLE_KEY_BYTES:
        raise ValueError("single DES takes an 8-byte key")
    return tdes_encrypt(key8, data)


def pboc_mac(key8: bytes, data: bytes, iv: bytes = ZERO_IV) -> bytes:
    """The ED/EP MAC (MAC1, MAC2, TAC, PIN reload MAC): 4 bytes.

    Padding always appends 80 then 00s, so an input that is already a multiple of 8 grows by a
    whole block; that is what makes MAC(x) differ from MAC(x || 80 00 ..).
    """
    if len(key8) != SINGLE_KEY_BYTES:
        raise ValueError("the ED/EP MAC takes an 8-byte key")
    if len(iv) != BLOCK_BYTES:
        raise ValueError("the IV is one 8-byte block")
    padded = data + b"\x80" + bytes(-(len(data) + 1) % BLOCK_BYTES)
    encryptor = Cipher(TripleDES(_key24(key8)), modes.CBC(iv)).encryptor()
    last_block = (encryptor.update(padded) + encryptor.finalize())[-BLOCK_BYTES:]
    return last_block[:MAC_BYTES]


def session_key(app_key16: bytes, block8: bytes) -> bytes:
    """A process (session) key: 3DES-ECB of one block under the 16-byte application key."""
    if len(app_key16) != DOUBLE_KEY_BYTES or len(block8) != BLOCK_BYTES:
        raise ValueError("session key = 3DES(16-byte key, 8-byte block)")
    return tdes_encrypt(app_key16, block8)


def tac_key(dtk16: bytes) -> bytes:
    """TAC is single DES under the XOR of the two halves of the 16-byte DTK."""
    if len(dtk16) != DOUBLE_KEY_BYTES:
        raise ValueError("the TAC key is derived from a 16-byte key")
    return bytes(a ^ b for a, b in zip(dtk16[:8], dtk16[8:]))


def diversification_factor(serial: bytes) -> bytes:
    """The rightmost 8 bytes of an application serial number (or card identification code)."""
    if len(serial) < BLOCK_BYTES:
        raise ValueError("a diversification source has at least 8 bytes")
    return bytes(serial[-BLOCK_BYTES:])


def diversify(master16: bytes, factor8: bytes) -> bytes:
    """Per-card key from an issuer master key: 3DES(MK, factor) || 3DES(MK, NOT factor)."""
    if len(master16) != DOUBLE_KEY_BYTES or len(factor8) != BLOCK_BYTES:
        raise ValueError("diversify(16-byte master key, 8-byte factor)")
    inverted = bytes(b ^ 0xFF for b in factor8)
    return tdes_encrypt(master16, factor8 + inverted)


def macs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison, so a wrong MAC's timing says nothing about its correct prefix."""
    return hmac.compare_digest(a, b)
