# cython: language_level=3
"""The compiled TAC check of offline records: a whole batch of packed 48-byte records in one C loop.

Why it exists: clearing an offline batch has to keep up with the ledger (issue 8: at least half its
in-process rate), and a TAC check through card/crypto.py is three Python-level cipher calls per record
(~10 us). Here the issuer's TAC master key is scheduled once, and per record the loop runs, over
libcrypto's low-level DES with the GIL released:

    DTK     = 3DES(MK, factor) || 3DES(MK, NOT factor)   factor = the app serial's rightmost 8 bytes
    key     = DTK_left XOR DTK_right                      (card/crypto.py tac_key)
    TAC     = leftmost 4 bytes of single-DES CBC, zero IV, over the 22 covered bytes || 80 00
                                                          (card/crypto.py pboc_mac, ISO 9797-1 alg. 1 / pad 2)

which is card/sam.py compute_tac for a PurchaseTacFields, bit for bit (tests/transit/test_tac.py checks it
against card.sam.verify_tac). The record layout is the one in proto/citycard/v1/transit.proto and
apps/bus/records.py; the offsets below must stay in step with RECORD_DTYPE there.

Cards repeat within a batch (a commuter's morning and evening taps, a gate's regulars), so a call keeps a
small table of the card TAC key schedules it derived, for that call only: it lives in memory this call
allocates and is cleansed and freed before the call returns. The master key schedules are cleansed when
the object goes away. No key material ever reaches a Python object, a repr or an error.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

cdef enum:
    RECORD_BYTES = 48
    SERIAL_AT = 0            # app_serial, 10 bytes; the factor is its rightmost 8
    FACTOR_AT = 2
    COVERED_AT = 12          # amount .. date_time: the 22 bytes the TAC covers
    COVERED_BYTES = 22
    TAC_AT = 34
    MASTER_KEY_BYTES = 16
    # Card keys remembered within one call: a direct-mapped table by the factor, of at most
    # 2**CARD_KEYS_BITS_MAX slots; 1,024 slots of ~140 bytes stay within L2 (a batch is at most 8,189
    # records). A small batch gets a table its size, so a single record does not pay for 140 KiB.
    CARD_KEYS_BITS_MIN = 3
    CARD_KEYS_BITS_MAX = 10


cdef extern from *:
    """static const uint64_t FIBONACCI_64 = 0x9E3779B97F4A7C15ULL;"""
    const uint64_t FIBONACCI_64


cdef struct CardKey:
    uint64_t factor
    int filled
    DES_key_schedule schedule


cdef inline uint32_t _le32(const unsigned char *p) noexcept nogil:
    # des.h's c2l: a DES_LONG is the block's bytes read little-endian.
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _store_le32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef class TacBatchVerifier:
    """The issuer's purse TAC master key, scheduled once, checking the TACs of packed record batches."""

    cdef DES_key_schedule _master_left
    cdef DES_key_schedule _master_right
    cdef bint _keyed

    def __cinit__(self, *args, **kwargs):
        self._keyed = False

    def __init__(self, const unsigned char[::1] master_tac_key not None):
        cdef DES_cblock half
        if master_tac_key.shape[0] != MASTER_KEY_BYTES:
            raise ValueError("the TAC master key is 16 bytes (2-key 3DES)")
        memcpy(half, &master_tac_key[0], 8)
        DES_set_key_unchecked(&half, &self._master_left)
        memcpy(half, &master_tac_key[8], 8)
        DES_set_key_unchecked(&half, &self._master_right)
        OPENSSL_cleanse(half, 8)
        self._keyed = True

    def __dealloc__(self):
        OPENSSL_cleanse(&self._master_left, sizeof(DES_key_schedule))
        OPENSSL_cleanse(&self._master_right, sizeof(DES_key_schedule))

    def __repr__(self):
        return "TacBatchVerifier(<key redacted>)"

    def __reduce__(self):
        raise TypeError("a TacBatchVerifier holds a key and is not pickled")

    def verify_into(self, const unsigned char[::1] packed not None, unsigned char[::1] ok not None,
                    Py_ssize_t start, Py_ssize_t stop):
        """Set ok[i] to 1 where record i's TAC verifies, else 0, for start <= i < stop; return how many did.

        `packed` holds whole 48-byte records; `ok` one byte per record. Runs without the GIL, so two
        threads may check disjoint ranges of one batch at once.
        """
        cdef Py_ssize_t records = packed.shape[0] // RECORD_BYTES
        cdef Py_ssize_t verified
        cdef CardKey *card_keys
        cdef int bits = CARD_KEYS_BITS_MIN
        if not self._keyed:
            raise ValueError("the verifier has no key")
        if packed.shape[0] % RECORD_BYTES:
            raise ValueError(f"packed records are {RECORD_BYTES} bytes each")
        if ok.shape[0] != records:
            raise ValueError("one result byte per record")
        if not 0 <= start <= stop <= records:
            raise ValueError("the range must lie within the batch")
        if start == stop:
            return 0
        while bits < CARD_KEYS_BITS_MAX and (1 << bits) < stop - start:
            bits += 1
        card_keys = <CardKey *>calloc(1 << bits, sizeof(CardKey))
        if card_keys is NULL:
            raise MemoryError()
        with nogil:
            verified = self._verify_range(&packed[0], &ok[0], start, stop, card_keys, bits)
            OPENSSL_cleanse(card_keys, (1 << bits) * sizeof(CardKey))
        free(card_keys)
        return verified

    cdef Py_ssize_t _verify_range(self, const unsigned char *packed, unsigned char *ok, Py_ssize_t start,
                                  Py_ssize_t stop, CardKey *card_keys, int bits) noexcept nogil:
        cdef Py_ssize_t i, verified = 0
        cdef const unsigned char *record
        cdef DES_LONG block[2]
        cdef DES_LONG chain[2]
        cdef CardKey *card
        for i in range(start, stop):
            record = packed + i * RECORD_BYTES
            card = self._card_key(record, card_keys, bits)
            # CBC over amount(4) type(1) terminal(6) seq(4) date_time(7) || 80 00: three blocks.
            chain[0] = _le32(record + COVERED_AT)
            chain[1] = _le32(record + COVERED_AT + 4)
            DES_encrypt1(chain, &card.schedule, DES_ENCRYPT)
            chain[0] ^= _le32(record + COVERED_AT + 8)
            chain[1] ^= _le32(record + COVERED_AT + 12)
            DES_encrypt1(chain, &card.schedule, DES_ENCRYPT)
            chain[0] ^= _le32(record + COVERED_AT + 16)
            chain[1] ^= <uint32_t>record[COVERED_AT + 20] | (<uint32_t>record[COVERED_AT + 21] << 8) | (0x80 << 16)
            DES_encrypt1(chain, &card.schedule, DES_ENCRYPT)
            # The leftmost 4 MAC bytes are chain[0] (little-endian form): one word compare, no early exit.
            ok[i] = (chain[0] ^ _le32(record + TAC_AT)) == 0
            verified += ok[i]
        return verified

    cdef CardKey *_card_key(self, const unsigned char *record, CardKey *card_keys, int bits) noexcept nogil:
        """The schedule of this record's card TAC key: from this call's table, or derived into it."""
        cdef DES_LONG left[2]
        cdef DES_LONG right[2]
        cdef DES_cblock key
        cdef uint32_t factor_low = _le32(record + FACTOR_AT)
        cdef uint32_t factor_high = _le32(record + FACTOR_AT + 4)
        cdef uint64_t factor = <uint64_t>factor_low | (<uint64_t>factor_high << 32)
        # Fibonacci hashing: the top bits of factor * 2**64/phi spread serials that differ in any digit.
        cdef CardKey *card = &card_keys[(factor * FIBONACCI_64) >> (64 - bits)]
        if card.filled and card.factor == factor:
            return card
        left[0] = factor_low
        left[1] = factor_high
        right[0] = ~left[0]
        right[1] = ~left[1]
        DES_encrypt3(left, &self._master_left, &self._master_right, &self._master_left)
        DES_encrypt3(right, &self._master_left, &self._master_right, &self._master_left)
        _store_le32(key, left[0] ^ right[0])
        _store_le32(key + 4, left[1] ^ right[1])
        DES_set_key_unchecked(&key, &card.schedule)
        card.factor = factor
        card.filled = 1
        OPENSSL_cleanse(key, 8)
        OPENSSL_cleanse(left, sizeof(left))
        OPENSSL_cleanse(right, sizeof(right))
        return card
