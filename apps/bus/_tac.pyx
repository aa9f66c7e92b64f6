# cython: language_level=3
"""The compiled clearing pass over packed 48-byte offline records: field checks, TAC check, transfers.

Why it exists: clearing an offline batch has to keep up with the ledger (issue 8: at least half its
in-process rate), and a TAC check through card/crypto.py is three Python-level cipher calls per record
(~10 us). Here, with the GIL released, per record:

    fields  the checks records.validate makes (BCD serial, transaction type, SAM sequence, a real date and
            time, reserved bytes zero): MALFORMED when one fails (the Python side names the field);
    TAC     DTK = 3DES(MK, factor) || 3DES(MK, NOT factor)   factor = the app serial's rightmost 8 bytes
            key = DTK_left XOR DTK_right                      (card/crypto.py tac_key)
            TAC = leftmost 4 bytes of single-DES CBC, zero IV, over the 22 covered bytes || 80 00
            (card/sam.py compute_tac, bit for bit): FORGED when it does not verify;
    card    a serial of another region, or sequence 0, is CARD_UNKNOWN; amount 0 is ENTRY_ONLY;

and `write_transfers` turns the records left (BOOK) into the ledger's 128-byte transfer records
(core.records.TRANSFER_DTYPE) under their chip transaction ids (ids.chip_transfer_id, the same splitmix64
rounds). The record layout is proto/citycard/v1/transit.proto's and apps/bus/records.py's; the offsets below
must stay in step with RECORD_DTYPE there (tests/transit/test_clearing.py compares both paths).

Card keys are kept across batches: commuters' cards come back every day, so a clearing server with warm keys
runs only the 3-block MAC per record (~0.4 us) instead of deriving the card key first (~1.2 us). The cache is
set-associative (4 ways per bucket, a clock bit per way), holds `card_keys_max` cards (a quarter million by
default), and is split into `parts` partitions by a hash of the factor: a call checks only the records of its
partition, so `parts` threads check one batch at once, each in memory no other thread touches (a lock per
partition keeps two calls on the same partition apart). A key schedule is wiped when its card is evicted and
every one when the verifier is closed or freed; none ever reaches a Python object, a repr or an error.
"""

from cpython.pythread cimport (
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

cdef enum:
    RECORD_BYTES = 48
    SERIAL_AT = 0            # app_serial, 10 BCD bytes: region (3), card sequence (7); the factor is the last 8
    SERIAL_BYTES = 10
    FACTOR_AT = 2
    REGION_BYTES = 3
    SEQ_AT = 3
    SEQ_BYTES = 7
    COUNTER_AT = 10
    AMOUNT_AT = 12
    TX_TYPE_AT = 16
    TERMINAL_AT = 17
    TERMINAL_SEQ_AT = 23
    DATE_TIME_AT = 27
    DATE_TIME_BYTES = 7
    COVERED_AT = 12          # amount .. date_time: the 22 bytes the TAC covers
    TAC_AT = 34
    RESERVED_AT = 42
    RESERVED_BYTES = 6
    MASTER_KEY_BYTES = 16
    TRANSFER_BYTES = 128     # core.records.TRANSFER_DTYPE, little-endian
    TX_PURCHASE = 6          # card.purse.TxType.PURCHASE_EP
    TX_CAPP = 9              # card.purse.TxType.CAPP
    YEAR_MIN = 2000          # records.YEAR_MIN
    WAYS = 4                 # cards per cache bucket
    PARTS_MAX = 8

# Per-record status: the caller's array starts UNCHECKED (or MALFORMED for a record it already refused).
cdef enum:
    S_UNCHECKED = 0
    S_BOOK = 1
    S_MALFORMED = 2
    S_FORGED = 3
    S_CARD_UNKNOWN = 4
    S_ENTRY_ONLY = 5

STATUS_CODES = {"UNCHECKED": S_UNCHECKED, "BOOK": S_BOOK, "MALFORMED": S_MALFORMED, "FORGED": S_FORGED,
                "CARD_UNKNOWN": S_CARD_UNKNOWN, "ENTRY_ONLY": S_ENTRY_ONLY}
CARD_KEYS_DEFAULT = 262_144          # a quarter million cards, ~34 MiB of key schedules once all are seen
CARD_KEYS_LIMIT = 4_194_304
PARTS_LIMIT = PARTS_MAX


cdef extern from *:
    """
    static const uint64_t MIX_M1 = 0xBF58476D1CE4E5B9ULL;
    static const uint64_t MIX_M2 = 0x94D049BB133111EBULL;
    static const uint64_t ID_K1 = 0x9E3779B97F4A7C15ULL;
    static const uint64_t ID_K2 = 0xD1B54A32D192ED03ULL;
    static const uint64_t ID_K3 = 0x8CB92BA72F3D8DD7ULL;
    static const uint64_t ID_K4 = 0xA0761D6478BD642FULL;
    static const unsigned char DAYS_IN_MONTH[13] = {0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    """
    const uint64_t MIX_M1
    const uint64_t MIX_M2
    const uint64_t ID_K1
    const uint64_t ID_K2
    const uint64_t ID_K3
    const uint64_t ID_K4
    const unsigned char DAYS_IN_MONTH[13]


cdef struct PartCounters:
    # One per partition, a cache line each: the threads of one batch count without sharing a line.
    uint64_t derived
    uint64_t reused
    char padding[48]


cdef struct Bucket:
    uint64_t factor[WAYS]
    uint8_t filled           # a bit per way
    uint8_t referenced       # the clock's second chance, a bit per way
    uint8_t hand


# -- bytes ------------------------------------------------------------------------------------------------

cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    # des.h's c2l: a DES_LONG is the block's bytes read little-endian.
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _store_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline void _store_le64(uint8_t *p, uint64_t v) noexcept nogil:
    _store_le32(p, <uint32_t>v)
    _store_le32(p + 4, <uint32_t>(v >> 32))


cdef inline uint64_t _big_endian(const uint8_t *p, int size) noexcept nogil:
    cdef uint64_t value = 0
    cdef int j
    for j in range(size):
        value = (value << 8) | p[j]
    return value


cdef inline uint64_t _bcd(const uint8_t *p, int size) noexcept nogil:
    """The decimal value of `size` BCD bytes (checked to be BCD before)."""
    cdef uint64_t value = 0
    cdef int j
    for j in range(size):
        value = value * 100 + (p[j] >> 4) * 10 + (p[j] & 0x0F)
    return value


cdef inline bint _is_bcd(const uint8_t *p, int size) noexcept nogil:
    cdef int j
    for j in range(size):
        if (p[j] >> 4) > 9 or (p[j] & 0x0F) > 9:
            return False
    return True


cdef inline int _two_digits(uint8_t byte) noexcept nogil:
    return (byte >> 4) * 10 + (byte & 0x0F)


cdef inline uint64_t _mix(uint64_t value) noexcept nogil:
    # splitmix64's finaliser, as ids._mix.
    value = (value ^ (value >> 30)) * MIX_M1
    value = (value ^ (value >> 27)) * MIX_M2
    return value ^ (value >> 31)


# -- the checks records.validate makes, per record ---------------------------------------------------------

cdef inline bint _date_time_ok(const uint8_t *p) noexcept nogil:
    cdef int year, month, day, days
    if not _is_bcd(p, DATE_TIME_BYTES):
        return False
    year = _two_digits(p[0]) * 100 + _two_digits(p[1])
    month = _two_digits(p[2])
    day = _two_digits(p[3])
    if year < YEAR_MIN or month < 1 or month > 12:
        return False
    days = DAYS_IN_MONTH[month]
    if month == 2 and ((year % 4 == 0 and year % 100 != 0) or year % 400 == 0):
        days += 1
    return (1 <= day <= days and _two_digits(p[4]) <= 23 and _two_digits(p[5]) <= 59
            and _two_digits(p[6]) <= 59)


cdef inline bint _fields_ok(const uint8_t *record) noexcept nogil:
    cdef int j
    if not _is_bcd(record + SERIAL_AT, SERIAL_BYTES):
        return False
    if record[TX_TYPE_AT] != TX_PURCHASE and record[TX_TYPE_AT] != TX_CAPP:
        return False
    if _big_endian(record + TERMINAL_SEQ_AT, 4) == 0:
        return False
    if not _date_time_ok(record + DATE_TIME_AT):
        return False
    for j in range(RESERVED_BYTES):
        if record[RESERVED_AT + j]:
            return False
    return True


cdef inline bint _mac_ok(const uint8_t *record, DES_key_schedule *schedule) noexcept nogil:
    cdef DES_LONG chain[2]
    # CBC over amount(4) type(1) terminal(6) seq(4) date_time(7) || 80 00: three blocks.
    chain[0] = _le32(record + COVERED_AT)
    chain[1] = _le32(record + COVERED_AT + 4)
    DES_encrypt1(chain, schedule, DES_ENCRYPT)
    chain[0] ^= _le32(record + COVERED_AT + 8)
    chain[1] ^= _le32(record + COVERED_AT + 12)
    DES_encrypt1(chain, schedule, DES_ENCRYPT)
    chain[0] ^= _le32(record + COVERED_AT + 16)
    chain[1] ^= <uint32_t>record[COVERED_AT + 20] | (<uint32_t>record[COVERED_AT + 21] << 8) | (0x80 << 16)
    DES_encrypt1(chain, schedule, DES_ENCRYPT)
    # The leftmost 4 MAC bytes are chain[0] (little-endian form): one word compare, no early exit.
    return (chain[0] ^ _le32(record + TAC_AT)) == 0


cdef inline uint64_t _factor(const uint8_t *record) noexcept nogil:
    return <uint64_t>_le32(record + FACTOR_AT) | (<uint64_t>_le32(record + FACTOR_AT + 4) << 32)


cdef inline int _part_of(uint64_t hashed, int parts) noexcept nogil:
    return <int>(((hashed >> 32) * <uint64_t>parts) >> 32)


cdef class TacBatchVerifier:
    """The issuer's purse TAC master key, scheduled once, and the card keys derived from it, kept across
    batches in a bounded cache; checks packed record batches one partition per call."""

    cdef DES_key_schedule _master_left
    cdef DES_key_schedule _master_right
    cdef bint _keyed
    cdef int _parts
    cdef Py_ssize_t _buckets_per_part
    cdef Bucket *_buckets
    cdef DES_key_schedule *_schedules
    cdef PyThread_type_lock _locks[PARTS_MAX]
    cdef PartCounters _counters[PARTS_MAX]

    def __cinit__(self, *args, **kwargs):
        self._keyed = False
        self._parts = 0
        self._buckets = NULL
        self._schedules = NULL
        memset(self._locks, 0, sizeof(self._locks))
        memset(self._counters, 0, sizeof(self._counters))

    def __init__(self, const unsigned char[::1] master_tac_key not None, *,
                 Py_ssize_t card_keys_max=CARD_KEYS_DEFAULT, int parts=1):
        cdef DES_cblock half
        cdef Py_ssize_t buckets, part
        if master_tac_key.shape[0] != MASTER_KEY_BYTES:
            raise ValueError("the TAC master key is 16 bytes (2-key 3DES)")
        if not 1 <= parts <= PARTS_MAX:
            raise ValueError(f"parts must be 1..{PARTS_MAX}")
        if not WAYS * parts <= card_keys_max <= CARD_KEYS_LIMIT:
            raise ValueError(f"card_keys_max must be {WAYS * parts}..{CARD_KEYS_LIMIT}")
        if self._parts:
            raise TypeError("a TacBatchVerifier is initialised once")
        buckets = (card_keys_max + WAYS - 1) // WAYS
        self._buckets_per_part = (buckets + parts - 1) // parts
        # calloc: the kernel maps the pages as they are first written, so an idle cache costs no memory.
        self._buckets = <Bucket *>calloc(self._buckets_per_part * parts, sizeof(Bucket))
        self._schedules = <DES_key_schedule *>calloc(self._buckets_per_part * parts * WAYS,
                                                     sizeof(DES_key_schedule))
        if self._buckets is NULL or self._schedules is NULL:
            self._release()
            raise MemoryError()
        for part in range(parts):
            self._locks[part] = PyThread_allocate_lock()
            if self._locks[part] is NULL:
                self._release()
                raise MemoryError()
        self._parts = parts
        memcpy(half, &master_tac_key[0], 8)
        DES_set_key_unchecked(&half, &self._master_left)
        memcpy(half, &master_tac_key[8], 8)
        DES_set_key_unchecked(&half, &self._master_right)
        OPENSSL_cleanse(half, 8)
        self._keyed = True

    def __dealloc__(self):
        self._wipe()
        self._release()

    def __repr__(self):
        return "TacBatchVerifier(<key redacted>)"

    def __reduce__(self):
        raise TypeError("a TacBatchVerifier holds a key and is not pickled")

    @property
    def parts(self) -> int:
        return self._parts

    @property
    def card_keys_max(self) -> int:
        return self._buckets_per_part * self._parts * WAYS

    @property
    def card_keys_derived(self) -> int:
        """Card keys derived from the master key so far (a card first seen, or seen again after eviction)."""
        cdef uint64_t total = 0
        cdef int part
        for part in range(PARTS_MAX):
            total += self._counters[part].derived
        return total

    @property
    def card_keys_reused(self) -> int:
        """Records checked with a card key the cache already held."""
        cdef uint64_t total = 0
        cdef int part
        for part in range(PARTS_MAX):
            total += self._counters[part].reused
        return total

    def close(self):
        """Wipe the master key and every card key; later calls are refused."""
        cdef int part
        with nogil:
            for part in range(self._parts):
                PyThread_acquire_lock(self._locks[part], WAIT_LOCK)
            self._wipe()
            for part in range(self._parts):
                PyThread_release_lock(self._locks[part])

    cdef void _wipe(self) noexcept nogil:
        """Cleanse the master schedules and each card schedule in use (untouched pages stay unmapped)."""
        cdef Py_ssize_t index, way
        cdef Bucket *bucket
        if self._buckets is not NULL and self._schedules is not NULL:
            for index in range(self._buckets_per_part * self._parts):
                bucket = &self._buckets[index]
                for way in range(WAYS):
                    if bucket.filled & (1 << way):
                        OPENSSL_cleanse(&self._schedules[index * WAYS + way], sizeof(DES_key_schedule))
                bucket.filled = 0
                bucket.referenced = 0
        OPENSSL_cleanse(&self._master_left, sizeof(DES_key_schedule))
        OPENSSL_cleanse(&self._master_right, sizeof(DES_key_schedule))
        self._keyed = False

    cdef void _release(self) noexcept:
        cdef int part
        free(self._buckets)
        free(self._schedules)
        self._buckets = NULL
        self._schedules = NULL
        for part in range(PARTS_MAX):
            if self._locks[part] is not NULL:
                PyThread_free_lock(self._locks[part])
                self._locks[part] = NULL

    cdef Py_ssize_t _checked_records(self, const unsigned char[::1] packed, Py_ssize_t per_record_bytes,
                                     Py_ssize_t given, int part) except -1:
        cdef Py_ssize_t records = packed.shape[0] // RECORD_BYTES
        if not 0 <= part < self._parts:
            raise ValueError(f"part must be 0..{self._parts - 1}")
        if packed.shape[0] % RECORD_BYTES:
            raise ValueError(f"packed records are {RECORD_BYTES} bytes each")
        if given != records * per_record_bytes:
            raise ValueError("one result byte per record")
        return records

    def verify_into(self, const unsigned char[::1] packed not None, unsigned char[::1] ok not None, int part):
        """Set ok[i] to 1 where record i's TAC verifies, else 0, for the records of partition `part`; return
        how many verified. Every record's TAC is checked, whatever its other fields hold."""
        return self._each_record(packed, ok, part, 0, False)

    def classify_into(self, const unsigned char[::1] packed not None, unsigned char[::1] status not None,
                      int part, uint64_t region):
        """Decide each UNCHECKED record of partition `part`: MALFORMED, FORGED, CARD_UNKNOWN (a serial not of
        `region`, or sequence 0), ENTRY_ONLY (amount 0) or BOOK, in that order; records already decided are
        left as they are. Return how many are BOOK."""
        return self._each_record(packed, status, part, region, True)

    cdef Py_ssize_t _each_record(self, const unsigned char[::1] packed, unsigned char[::1] out, int part,
                                 uint64_t region, bint classify) except -1:
        """The loop of verify_into (out: ok bytes) and classify_into (out: status bytes), one partition, under
        its lock and without the GIL."""
        cdef Py_ssize_t records = self._checked_records(packed, 1, out.shape[0], part)
        cdef Py_ssize_t i, counted = 0
        cdef const uint8_t *record
        cdef uint64_t factor, hashed
        cdef bint keyed
        if records == 0:
            return 0
        with nogil:
            PyThread_acquire_lock(self._locks[part], WAIT_LOCK)
            keyed = self._keyed
            if keyed:
                for i in range(records):
                    if classify and out[i] != S_UNCHECKED:
                        continue
                    record = &packed[i * RECORD_BYTES]
                    factor = _factor(record)
                    hashed = _mix(factor)
                    if _part_of(hashed, self._parts) != part:
                        continue
                    if classify:
                        out[i] = self._classify(record, factor, hashed, part, region)
                        counted += out[i] == S_BOOK
                    else:
                        out[i] = _mac_ok(record, self._card_schedule(factor, hashed, part))
                        counted += out[i]
            PyThread_release_lock(self._locks[part])
        if not keyed:
            raise ValueError("the verifier is closed")
        return counted

    cdef inline uint8_t _classify(self, const uint8_t *record, uint64_t factor, uint64_t hashed, int part,
                                  uint64_t region) noexcept nogil:
        if not _fields_ok(record):
            return S_MALFORMED
        if not _mac_ok(record, self._card_schedule(factor, hashed, part)):
            return S_FORGED
        if _bcd(record + SERIAL_AT, REGION_BYTES) != region or _bcd(record + SEQ_AT, SEQ_BYTES) == 0:
            return S_CARD_UNKNOWN
        if _big_endian(record + AMOUNT_AT, 4) == 0:
            return S_ENTRY_ONLY
        return S_BOOK

    cdef DES_key_schedule *_card_schedule(self, uint64_t factor, uint64_t hashed, int part) noexcept nogil:
        """This card's TAC key schedule: from the cache, or derived into it (evicting by the bucket's clock)."""
        cdef Py_ssize_t index = part * self._buckets_per_part + <Py_ssize_t>(
            (<uint64_t><uint32_t>hashed * <uint64_t>self._buckets_per_part) >> 32)
        cdef Bucket *bucket = &self._buckets[index]
        cdef DES_key_schedule *schedule
        cdef int way
        for way in range(WAYS):
            if bucket.factor[way] == factor and bucket.filled & (1 << way):
                bucket.referenced |= 1 << way
                self._counters[part].reused += 1
                return &self._schedules[index * WAYS + way]
        way = _victim(bucket)
        schedule = &self._schedules[index * WAYS + way]
        if bucket.filled & (1 << way):
            OPENSSL_cleanse(schedule, sizeof(DES_key_schedule))  # the evicted card's key
        self._derive(factor, schedule)
        bucket.factor[way] = factor
        bucket.filled |= 1 << way
        bucket.referenced &= ~(1 << way)
        self._counters[part].derived += 1
        return schedule

    cdef void _derive(self, uint64_t factor, DES_key_schedule *schedule) noexcept nogil:
        cdef DES_LONG left[2]
        cdef DES_LONG right[2]
        cdef DES_cblock key
        left[0] = <uint32_t>factor
        left[1] = <uint32_t>(factor >> 32)
        right[0] = ~left[0]
        right[1] = ~left[1]
        DES_encrypt3(left, &self._master_left, &self._master_right, &self._master_left)
        DES_encrypt3(right, &self._master_left, &self._master_right, &self._master_left)
        _store_le32(key, left[0] ^ right[0])
        _store_le32(key + 4, left[1] ^ right[1])
        DES_set_key_unchecked(&key, schedule)
        OPENSSL_cleanse(key, 8)
        OPENSSL_cleanse(left, sizeof(left))
        OPENSSL_cleanse(right, sizeof(right))


cdef inline int _victim(Bucket *bucket) noexcept nogil:
    """The way a new card takes: a free one, else the first the clock finds not referenced since its last pass."""
    cdef int way
    for way in range(WAYS):
        if not bucket.filled & (1 << way):
            return way
    while True:
        way = bucket.hand
        bucket.hand = (bucket.hand + 1) % WAYS
        if bucket.referenced & (1 << way):
            bucket.referenced &= ~(1 << way)
        else:
            return way


# -- the transfers of the records to book ---------------------------------------------------------------------

cdef inline void _chip_transfer_id(uint64_t card_seq, uint64_t terminal_id, uint64_t terminal_seq,
                                   uint64_t *low, uint64_t *high) noexcept nogil:
    # ids.chip_transfer_id, word for word (tests/transit/test_clearing.py holds them to one answer).
    cdef uint64_t x = _mix(terminal_id + ID_K1)
    cdef uint64_t y = _mix(x ^ (card_seq + ID_K2))
    low[0] = _mix(y ^ (terminal_seq + ID_K3))
    high[0] = _mix(low[0] ^ ID_K4 ^ card_seq) >> 4   # the high lane keeps 60 bits
    if low[0] == 0 and high[0] == 0:
        low[0] = 1


def write_transfers(const unsigned char[::1] packed not None, const unsigned char[::1] status not None,
                    unsigned char[::1] transfers not None, int64_t[::1] booked_index not None,
                    uint64_t credit_low, uint64_t credit_high, uint64_t debit_high, uint32_t ledger,
                    uint16_t code):
    """Write the ledger transfer of each BOOK record, in record order, into `transfers` (128 bytes each,
    room for every record) and its record index into `booked_index`; return how many were written.

    A transfer: its chip transaction id; from the card's e-purse account (the card sequence, under
    `debit_high`) to the operator's (`credit_*`); the amount; user_data = counter << 32 | SAM sequence;
    every other field zero."""
    cdef Py_ssize_t records = packed.shape[0] // RECORD_BYTES
    cdef Py_ssize_t i, written = 0
    cdef const uint8_t *record
    cdef uint8_t *out
    cdef uint64_t seq, low, high
    if packed.shape[0] % RECORD_BYTES:
        raise ValueError(f"packed records are {RECORD_BYTES} bytes each")
    if status.shape[0] != records or booked_index.shape[0] != records:
        raise ValueError("one status and one index slot per record")
    if transfers.shape[0] != records * TRANSFER_BYTES:
        raise ValueError(f"room for one {TRANSFER_BYTES}-byte transfer per record")
    with nogil:
        for i in range(records):
            if status[i] != S_BOOK:
                continue
            record = &packed[i * RECORD_BYTES]
            out = &transfers[written * TRANSFER_BYTES]
            seq = _bcd(record + SEQ_AT, SEQ_BYTES)
            _chip_transfer_id(seq, _big_endian(record + TERMINAL_AT, 6), _big_endian(record + TERMINAL_SEQ_AT, 4),
                              &low, &high)
            memset(out, 0, TRANSFER_BYTES)
            _store_le64(out, low)
            _store_le64(out + 8, high)
            _store_le64(out + 16, seq)                 # debit_account_id: purse_account_id(seq)
            _store_le64(out + 24, debit_high)
            _store_le64(out + 32, credit_low)
            _store_le64(out + 40, credit_high)
            _store_le64(out + 80, (_big_endian(record + COUNTER_AT, 2) << 32)   # user_data
                        | _big_endian(record + TERMINAL_SEQ_AT, 4))
            _store_le64(out + 96, _big_endian(record + AMOUNT_AT, 4))          # amount
            _store_le32(out + 116, ledger)
            out[120] = code & 0xFF
            out[121] = code >> 8
            booked_index[written] = i
            written += 1
    return written
