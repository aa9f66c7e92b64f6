# cython: language_level=3
"""The compiled twin of card/crypto.py's DesCipher: DES / 2-key 3DES ECB and the ED/EP MAC over libcrypto's EVP API.

Why it exists: a purchase needs a cipher for two fresh session keys (card and SAM), and opening a
context through `cryptography`'s wrappers costs ~6 µs hot and ~24 µs after a wake-up, more than the
DES work itself. Here a cipher is one EVP context keyed straight from C, and a MAC is a short C loop.

* A 16-byte key runs as 3DES-EDE-ECB with the 24-byte key K1 K2 K1 in an EVP context. An 8-byte key
  (single DES) runs on libcrypto's low-level DES API with its key schedule: EVP would need OpenSSL 3's
  legacy provider for single DES, which is not loaded by default (`openssl enc -des-ecb` fails on
  Debian 12), or 3DES with K K K (which this module used before: three times the DES work, and ~0.4
  µs to key a context against ~0.1 µs for a schedule, on every purchase session key).
* The MAC is CBC done by hand over that ECB context: XOR a block into the chain, encrypt the chain.
  The context therefore carries nothing from one call to the next (we only ever give it whole blocks),
  so unlike the pure twin one cipher can serve any sequence of MACs and encryptions in any order.
* `rekey()` keys the same context again in place, for an owner that goes through many short-lived
  keys (session keys): no allocation, no cipher lookup.

Key material lives only in the EVP context, the key schedule (cleansed on re-key and on release) and
in stack buffers that are cleansed after use; it never
shows in a repr or an error message. Keep the checks and messages in step with card/crypto.py: the
tests run every case against both.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

cdef enum:
    BLOCK = 8
    SINGLE_KEY = 8
    DOUBLE_KEY = 16
    TRIPLE_KEY = 24
    MAC_BYTES = 4

# Fetched once: EVP_EncryptInit_ex with a fetched cipher skips the by-name lookup that the legacy
# EVP_des_ede3_ecb() handle costs on every init in OpenSSL 3. Held for the life of the process.
cdef EVP_CIPHER *_TDES_ECB = EVP_CIPHER_fetch(NULL, b"DES-EDE3-ECB", NULL)
if _TDES_ECB is NULL:
    raise ImportError("libcrypto has no DES-EDE3-ECB in its default provider")

_ZERO_IV = bytes(BLOCK)


cdef inline DES_LONG _le32(const unsigned char *p) noexcept nogil:
    # des.h's c2l: a DES_LONG holds 4 bytes of the block read little-endian.
    return <DES_LONG>p[0] | (<DES_LONG>p[1] << 8) | (<DES_LONG>p[2] << 16) | (<DES_LONG>p[3] << 24)


cdef inline void _store_le32(unsigned char *p, DES_LONG v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef class DesCipher:
    """One single-DES (8-byte) or 2-key 3DES (16-byte) key, ready to use. The key never shows in repr.

    A 16-byte key (application and master keys) encrypts blocks; an 8-byte key (session keys, the TAC
    key, the PIN reload key) makes ED/EP MACs. Each method runs whole under the GIL and leaves no
    chaining state behind, so a cipher that is never re-keyed may be shared between threads; one that
    is re-keyed belongs to its owner, who decides which key is in it.
    """

    def __cinit__(self, *args, **kwargs):
        # The context exists from allocation on, so __dealloc__ and every method may rely on it; until
        # __init__ gives it a key, key_bytes is 0 and every operation refuses.
        self._ctx = EVP_CIPHER_CTX_new()
        if self._ctx is NULL:
            raise MemoryError()
        if EVP_EncryptInit_ex(self._ctx, _TDES_ECB, NULL, NULL, NULL) != 1:
            raise RuntimeError("EVP_EncryptInit_ex refused DES-EDE3-ECB")
        # ECB over whole blocks never needs padding; a context that pads would hold back a block.
        EVP_CIPHER_CTX_set_padding(self._ctx, 0)

    def __init__(self, bytes key not None):
        self._set_key(<const unsigned char *>PyBytes_AS_STRING(key), len(key))

    def __dealloc__(self):
        OPENSSL_cleanse(&self._schedule, sizeof(DES_key_schedule))
        if self._ctx is not NULL:
            EVP_CIPHER_CTX_free(self._ctx)  # cleanses the key schedule
            self._ctx = NULL

    def __repr__(self):
        return f"DesCipher(<{self.key_bytes}-byte key redacted>)"

    def __reduce__(self):
        raise TypeError("a DesCipher holds a key and is not pickled")

    def rekey(self, bytes key not None):
        """Use `key` from now on, in the same context: for an owner that goes through many keys."""
        self._set_key(<const unsigned char *>PyBytes_AS_STRING(key), len(key))

    cdef int _set_key(self, const unsigned char *key, Py_ssize_t key_len) except -1:
        cdef unsigned char key24[TRIPLE_KEY]
        cdef int status
        if key_len == SINGLE_KEY:  # the low-level schedule only (see _des.pxd); the context stays unused
            DES_set_key_unchecked(<const_DES_cblock *>key, &self._schedule)
            self.key_bytes = SINGLE_KEY
            return 0
        OPENSSL_cleanse(&self._schedule, sizeof(DES_key_schedule))  # no 8-byte key outlives a re-key
        if key_len == DOUBLE_KEY:
            memcpy(key24, key, DOUBLE_KEY)
            memcpy(key24 + 16, key, SINGLE_KEY)
        else:
            raise ValueError("a DES key is 8 bytes and a 2-key 3DES key 16 bytes")
        status = EVP_EncryptInit_ex(self._ctx, NULL, NULL, key24, NULL)
        OPENSSL_cleanse(key24, TRIPLE_KEY)
        if status != 1:
            raise RuntimeError("EVP_EncryptInit_ex could not set the key")
        self.key_bytes = <int>key_len
        return 0

    cdef int _ecb(self, const unsigned char *data, unsigned char *out, Py_ssize_t length) except -1:
        cdef int written = 0
        cdef DES_LONG block[2]
        cdef Py_ssize_t offset
        if self.key_bytes == SINGLE_KEY:
            for offset in range(0, length, BLOCK):
                block[0] = _le32(data + offset)
                block[1] = _le32(data + offset + 4)
                DES_encrypt1(block, &self._schedule, DES_ENCRYPT)
                _store_le32(out + offset, block[0])
                _store_le32(out + offset + 4, block[1])
            return 0
        if EVP_EncryptUpdate(self._ctx, out, &written, data, <int>length) != 1 or written != length:
            raise RuntimeError("EVP_EncryptUpdate failed")
        return 0

    cdef bytes _ecb_bytes(self, bytes data):
        cdef Py_ssize_t length = len(data)
        if length == 0 or length % BLOCK or length > 0x7FFF_FFF8:
            raise ValueError("ECB input must be a non-empty multiple of 8 bytes")
        out = PyBytes_FromStringAndSize(NULL, length)
        self._ecb(<const unsigned char *>PyBytes_AS_STRING(data), <unsigned char *>PyBytes_AS_STRING(out), length)
        return out

    def encrypt(self, bytes data not None):
        """ECB encryption of whole blocks under this 16-byte key."""
        if self.key_bytes != DOUBLE_KEY:
            raise ValueError("a kept 8-byte key only makes MACs; use des_encrypt for single DES")
        return self._ecb_bytes(data)

    def session_key(self, bytes block8 not None):
        """A process (session) key: 3DES-ECB of one block under this 16-byte application key."""
        if self.key_bytes != DOUBLE_KEY or len(block8) != BLOCK:
            raise ValueError("session key = 3DES(16-byte key, 8-byte block)")
        out = PyBytes_FromStringAndSize(NULL, BLOCK)
        self._ecb(<const unsigned char *>PyBytes_AS_STRING(block8), <unsigned char *>PyBytes_AS_STRING(out), BLOCK)
        return out

    def diversify(self, bytes factor8 not None):
        """A per-card key from this 16-byte master key: 3DES(MK, factor) || 3DES(MK, NOT factor)."""
        cdef const unsigned char *factor = <const unsigned char *>PyBytes_AS_STRING(factor8)
        cdef unsigned char both[2 * BLOCK]
        cdef int i
        if self.key_bytes != DOUBLE_KEY or len(factor8) != BLOCK:
            raise ValueError("diversify(16-byte master key, 8-byte factor)")
        for i in range(BLOCK):
            both[i] = factor[i]
            both[BLOCK + i] = factor[i] ^ 0xFF
        out = PyBytes_FromStringAndSize(NULL, 2 * BLOCK)
        self._ecb(both, <unsigned char *>PyBytes_AS_STRING(out), 2 * BLOCK)
        return out

    def mac(self, bytes data not None, bytes iv not None = _ZERO_IV):
        """The ED/EP MAC (MAC1, MAC2, TAC, PIN reload MAC) under this 8-byte key: 4 bytes.

        ISO 9797-1 MAC algorithm 1, padding method 2: CBC from `iv` over data || 80 00.., where the
        padding always adds at least one byte, so a whole-block input grows by a block; the MAC is
        the leftmost 4 bytes of the last CBC block.
        """
        cdef const unsigned char *message = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef const unsigned char *start = <const unsigned char *>PyBytes_AS_STRING(iv)
        cdef unsigned char chain[BLOCK]
        cdef unsigned char block[BLOCK]
        cdef Py_ssize_t length = len(data), offset = 0, tail, i
        if self.key_bytes != SINGLE_KEY:
            raise ValueError("the ED/EP MAC takes an 8-byte key")
        if len(iv) != BLOCK:
            raise ValueError("the IV is one 8-byte block")
        for i in range(BLOCK):
            chain[i] = start[i]
        while length - offset >= BLOCK:
            for i in range(BLOCK):
                block[i] = chain[i] ^ message[offset + i]
            self._ecb(block, chain, BLOCK)
            offset += BLOCK
        tail = length - offset  # 0..7 bytes left, then 80 and 00s to the end of the block
        for i in range(BLOCK):
            if i < tail:
                block[i] = chain[i] ^ message[offset + i]
            elif i == tail:
                block[i] = chain[i] ^ 0x80
            else:
                block[i] = chain[i]
        self._ecb(block, chain, BLOCK)
        return PyBytes_FromStringAndSize(<char *>chain, MAC_BYTES)


def ecb_encrypt(bytes key not None, bytes data not None):
    """ECB encryption under a key used once: 8 bytes (single DES) or 16 (2-key 3DES): tdes_encrypt."""
    cdef DesCipher cipher = DesCipher(key)
    return cipher._ecb_bytes(data)
