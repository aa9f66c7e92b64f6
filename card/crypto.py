"""DES / 2-key 3DES primitives of PBOC ED/EP (JR/T 0025) and the standard key diversification.

Card, SAM and tests share this module. The algorithms and the vectors that pin them are in
card-standards.md §2.4 (checked in tests/card/test_crypto.py):

* ED/EP MAC: ISO 9797-1 MAC algorithm 1 with padding method 2 over single DES (8-byte key),
  IV 8 x 00 unless given, leftmost 4 bytes.
* session key: 2-key 3DES-ECB of one 8-byte block under the 16-byte application key.
* TAC key: left half XOR right half of the 16-byte DTK.
* diversification: left = 3DES(MK, factor), right = 3DES(MK, NOT factor).

`DesCipher` is one key with its cipher context kept open. Opening an OpenSSL context costs about
6-10 µs through `cryptography` (1-2 µs compiled), encrypting through an open one about 1 µs, and a
PBOC operation is one to four blocks; so whoever uses a key more than once keeps its `DesCipher`
(the card per card key, the SAM per card it serves) and `CipherCache` bounds such a collection,
and whoever goes through many short-lived keys (purchase session keys) keeps one and `rekey`s it.
The module-level functions are the same operations for a key used once.

`cryptography` deprecates 8- and 16-byte TripleDES keys; we always hand it the 24-byte form
(K1 K2 K1 for 2-key 3DES, K K K for single DES), which computes the same function.

Two implementations, one API (the aiohttp / propcache pattern): `DesCipher` is the compiled
`card/_des.pyx` (one libcrypto EVP context per cipher, keyed from C in ~1 µs, the MAC loop in C)
when it is built, and `PyDesCipher` below, its pure-Python twin over `cryptography`, otherwise or
when `CITYCARD_NO_EXTENSIONS=1` is set at import time. `IMPLEMENTATION` says which one serves. Both
compute the same bytes (tests/card/test_crypto.py runs every case on both and compares them on random
input); the twin stays because it is small, obviously built on a reviewed library, and the reference
the compiled one is checked against.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

__all__ = [
    "BLOCK_BYTES",
    "IMPLEMENTATION",
    "MAC_BYTES",
    "CipherCache",
    "DesCipher",
    "PyDesCipher",
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
MAC_PADDING = b"\x80" + bytes(BLOCK_BYTES - 1)
_ECB = modes.ECB()  # mode objects hold no state; one serves every cipher
_CBC_ZERO_IV = modes.CBC(ZERO_IV)


def _key24(key: bytes) -> bytes:
    if len(key) == SINGLE_KEY_BYTES:
        return key * 3
    if len(key) == DOUBLE_KEY_BYTES:
        return key + key[:8]
    raise ValueError("a DES key is 8 bytes and a 2-key 3DES key 16 bytes")


def _blocks(data: bytes) -> None:
    if not data or len(data) % BLOCK_BYTES:
        raise ValueError("ECB input must be a non-empty multiple of 8 bytes")


class PyDesCipher:
    """One single-DES (8-byte) or 2-key 3DES (16-byte) key, ready to use. The key never shows in repr.

    A 16-byte key (application and master keys) encrypts blocks: it keeps one ECB context that is
    never finalised, since ECB carries nothing from one block to the next.

    An 8-byte key is a MAC key (session keys, the TAC key, the PIN reload key). The ED/EP MAC is the
    last block of a CBC encryption of the padded input, so the key keeps a CBC context and a MAC is
    one call into OpenSSL however long the input. A CBC context that is never finalised chains on
    from the last block it produced (`_cbc_last`): XORing that block, and the MAC's own IV, into the
    first input block makes the context start this MAC exactly as a fresh one with that IV would.
    That state is why a DesCipher is not thread-safe: each card, SAM and session owns its own.
    """

    __slots__ = ("_cbc_last", "_encrypt_cbc", "_encrypt_ecb", "key_bytes")

    def __init__(self, key: bytes) -> None:
        algorithm = TripleDES(_key24(key))  # first: a wrong key size leaves a re-keyed cipher as it was
        self.key_bytes = len(key)
        self._encrypt_ecb: Callable[[bytes], bytes] | None = None
        self._encrypt_cbc: Callable[[bytes], bytes] | None = None
        self._cbc_last = ZERO_IV  # what the CBC context chains on from: its IV, then its last output
        if self.key_bytes == SINGLE_KEY_BYTES:
            self._encrypt_cbc = Cipher(algorithm, _CBC_ZERO_IV).encryptor().update
        else:
            self._encrypt_ecb = Cipher(algorithm, _ECB).encryptor().update

    def __repr__(self) -> str:
        return f"DesCipher(<{self.key_bytes}-byte key redacted>)"

    def rekey(self, key: bytes) -> None:
        """Use `key` from now on (the compiled twin re-keys its context in place; this opens new ones)."""
        PyDesCipher.__init__(self, key)

    def encrypt(self, data: bytes) -> bytes:
        """ECB encryption of whole blocks under this 16-byte key."""
        if self._encrypt_ecb is None:
            raise ValueError("a kept 8-byte key only makes MACs; use des_encrypt for single DES")
        _blocks(data)
        return self._encrypt_ecb(data)

    def session_key(self, block8: bytes) -> bytes:
        """A process (session) key: 3DES-ECB of one block under this 16-byte application key."""
        if self._encrypt_ecb is None or len(block8) != BLOCK_BYTES:
            raise ValueError("session key = 3DES(16-byte key, 8-byte block)")
        return self._encrypt_ecb(block8)

    def diversify(self, factor8: bytes) -> bytes:
        """A per-card key from this 16-byte master key: 3DES(MK, factor) || 3DES(MK, NOT factor)."""
        if self._encrypt_ecb is None or len(factor8) != BLOCK_BYTES:
            raise ValueError("diversify(16-byte master key, 8-byte factor)")
        inverted = (int.from_bytes(factor8, "big") ^ 0xFFFF_FFFF_FFFF_FFFF).to_bytes(BLOCK_BYTES, "big")
        return self._encrypt_ecb(factor8 + inverted)

    def mac(self, data: bytes, iv: bytes = ZERO_IV) -> bytes:
        """The ED/EP MAC (MAC1, MAC2, TAC, PIN reload MAC) under this 8-byte key: 4 bytes.

        Padding always appends 80 then 00s, so an input that is already a multiple of 8 grows by a
        whole block; that is what makes MAC(x) differ from MAC(x || 80 00 ..).
        """
        if self._encrypt_cbc is None:
            raise ValueError("the ED/EP MAC takes an 8-byte key")
        if len(iv) != BLOCK_BYTES:
            raise ValueError("the IV is one 8-byte block")
        padded = data + MAC_PADDING[: BLOCK_BYTES - len(data) % BLOCK_BYTES]
        # The context will XOR its last output into the first block; giving it (first ^ last ^ iv)
        # leaves first ^ iv, which is CBC with this MAC's IV (see the class docstring).
        first = int.from_bytes(padded[:BLOCK_BYTES], "big") ^ int.from_bytes(self._cbc_last, "big")
        first ^= int.from_bytes(iv, "big")
        out = self._encrypt_cbc(first.to_bytes(BLOCK_BYTES, "big") + padded[BLOCK_BYTES:])
        self._cbc_last = out[-BLOCK_BYTES:]
        return self._cbc_last[:MAC_BYTES]


class CipherCache:
    """A `DesCipher` per key for keys used again and again; at most `keys_max`, the oldest goes first."""

    __slots__ = ("_ciphers", "keys_max")

    def __init__(self, keys_max: int) -> None:
        if keys_max < 1:
            raise ValueError("a cipher cache holds at least one key")
        self.keys_max = keys_max
        self._ciphers: dict[bytes, DesCipher] = {}

    def __repr__(self) -> str:
        return f"CipherCache({len(self._ciphers)} of {self.keys_max} keys)"

    def __len__(self) -> int:
        return len(self._ciphers)

    def get(self, key: bytes) -> DesCipher:
        cipher = self._ciphers.get(key)
        if cipher is None:
            if len(self._ciphers) >= self.keys_max:
                del self._ciphers[next(iter(self._ciphers))]  # dicts keep insertion order
            cipher = self._ciphers[key] = DesCipher(key)
        return cipher


def _py_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    _blocks(data)
    return Cipher(TripleDES(_key24(key)), _ECB).encryptor().update(data)


# The implementation is chosen once, here. A missing build falls back to the twin, as aiohttp does,
# so a source checkout works before `make compile`; IMPLEMENTATION (and tests/card/test_crypto.py,
# which fails on it) keep that fallback from going unnoticed.
# For the type checker DesCipher is the twin: the compiled class has the same methods (card/_des.pyi).
NO_EXTENSIONS = os.environ.get("CITYCARD_NO_EXTENSIONS") == "1"
if TYPE_CHECKING:
    DesCipher = PyDesCipher
    _ecb_encrypt = _py_ecb_encrypt
    IMPLEMENTATION = "python"
else:
    try:
        if NO_EXTENSIONS:
            raise ImportError("CITYCARD_NO_EXTENSIONS=1")
        from ._des import DesCipher
        from ._des import ecb_encrypt as _ecb_encrypt
        IMPLEMENTATION = "compiled"
    except ImportError:
        DesCipher, _ecb_encrypt = PyDesCipher, _py_ecb_encrypt
        IMPLEMENTATION = "python"


def tdes_encrypt(key: bytes, data: bytes) -> bytes:
    """ECB encryption with an 8-byte (single DES) or 16-byte (2-key 3DES) key."""
    return _ecb_encrypt(key, data)


def tdes_decrypt(key: bytes, data: bytes) -> bytes:
    _blocks(data)
    decryptor = Cipher(TripleDES(_key24(key)), modes.ECB()).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def des_encrypt(key8: bytes, data: bytes) -> bytes:
    if len(key8) != SINGLE_KEY_BYTES:
        raise ValueError("single DES takes an 8-byte key")
    return tdes_encrypt(key8, data)


def pboc_mac(key8: bytes, data: bytes, iv: bytes = ZERO_IV) -> bytes:
    """The ED/EP MAC under a key used once (see DesCipher.mac)."""
    if len(key8) != SINGLE_KEY_BYTES:
        raise ValueError("the ED/EP MAC takes an 8-byte key")
    return DesCipher(key8).mac(data, iv)


def session_key(app_key16: bytes, block8: bytes) -> bytes:
    """A process (session) key: 3DES-ECB of one block under the 16-byte application key."""
    if len(app_key16) != DOUBLE_KEY_BYTES:
        raise ValueError("session key = 3DES(16-byte key, 8-byte block)")
    return DesCipher(app_key16).session_key(block8)


def tac_key(dtk16: bytes) -> bytes:
    """TAC is single DES under the XOR of the two halves of the 16-byte DTK."""
    if len(dtk16) != DOUBLE_KEY_BYTES:
        raise ValueError("the TAC key is derived from a 16-byte key")
    left, right = int.from_bytes(dtk16[:8], "big"), int.from_bytes(dtk16[8:], "big")
    return (left ^ right).to_bytes(SINGLE_KEY_BYTES, "big")


def diversification_factor(serial: bytes) -> bytes:
    """The rightmost 8 bytes of an application serial number (or card identification code)."""
    if len(serial) < BLOCK_BYTES:
        raise ValueError("a diversification source has at least 8 bytes")
    return bytes(serial[-BLOCK_BYTES:])


def diversify(master16: bytes, factor8: bytes) -> bytes:
    """Per-card key from an issuer master key: 3DES(MK, factor) || 3DES(MK, NOT factor)."""
    if len(master16) != DOUBLE_KEY_BYTES:
        raise ValueError("diversify(16-byte master key, 8-byte factor)")
    return DesCipher(master16).diversify(factor8)


def macs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison, so a wrong MAC's timing says nothing about its correct prefix."""
    return hmac.compare_digest(a, b)
