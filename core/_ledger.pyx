# cython: language_level=3
"""The compiled settlement core: a double-entry ledger over LMDB.

Design (see DESIGN.md, "The settlement core"):

* One writer. Account state is hot in memory (a C array of 128-byte records and an id index); the
  disk holds an append-only log in three LMDB databases, each keyed by the big-endian timestamp of the
  last record of a block: ``accounts`` (account records as created), ``transfers`` (transfers as
  booked, with post/void fields resolved), ``events`` (freezes, unfreezes, closes, expiries).
* A batch is one LMDB write transaction and one fsync: when ``execute`` returns, the batch is on disk.
  A batch's records are appended as one block per log, the cheapest write LMDB offers.
* Opening replays the log. Balances, the id index and the pending holds are derived state; the log is
  the only truth, so a process killed at any instant reopens exactly at its last acknowledged batch.
* Every check that guards money is explicit code, never ``assert`` (compiled out under ``-O``).

Only core/ledger.py imports this module.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, UINT64_MAX
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset, memcmp
from cpython.bytes cimport PyBytes_FromStringAndSize

from lmdb_api cimport *

import numpy as np

from citycard.core import records as _records

cdef extern from *:
    """
    static inline uint64_t citycard_be64(uint64_t x) { return __builtin_bswap64(x); }
    static inline void citycard_prefetch(const void *p) { __builtin_prefetch(p, 1, 1); }
    #include <time.h>
    static inline uint64_t citycard_monotonic_ns(void) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    }
    """
    uint64_t monotonic_ns "citycard_monotonic_ns"() nogil

cdef extern from *:
    """
    #include <sys/mman.h>
    /* The account array and the id indexes reach gigabytes and are touched at random: transparent
       huge pages spare a page-table walk on most touches. mmap'd memory also arrives zeroed, and
       mremap grows the account array without copying it. */
    static void *citycard_big_alloc(size_t bytes) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        madvise(p, bytes, MADV_HUGEPAGE);
        return p;
    }
    static void *citycard_big_realloc(void *old, size_t old_bytes, size_t new_bytes) {
        void *p;
        if (old == NULL) return citycard_big_alloc(new_bytes);
        p = mremap(old, old_bytes, new_bytes, MREMAP_MAYMOVE);
        if (p == MAP_FAILED) return NULL;
        madvise(p, new_bytes, MADV_HUGEPAGE);
        return p;
    }
    static void citycard_big_free(void *p, size_t bytes) { if (p != NULL) munmap(p, bytes); }
    """
    void *big_alloc "citycard_big_alloc"(size_t bytes) nogil
    void *big_realloc "citycard_big_realloc"(void *old, size_t old_bytes, size_t new_bytes) nogil
    void big_free "citycard_big_free"(void *p, size_t bytes) nogil
    uint64_t be64 "citycard_be64"(uint64_t x) nogil
    void prefetch "citycard_prefetch"(const void *p) nogil

cdef uint64_t NS_PER_S = 1000000000

cdef enum:
    UNDO_BALANCES = 1          # an account's four counters and flags before a change
    UNDO_ACCOUNT_CREATED = 2   # the last account in the array, and its id in the index
    UNDO_TRANSFER_INSERTED = 3 # a transfer id in the index
    UNDO_TRANSFER_AUX = 4      # a transfer slot's `b` before a change (pending state, refunded sum)

cdef enum:
    FATAL_NONE = 0
    FATAL_NO_MEMORY = 1
    FATAL_LMDB = 2
    FATAL_CORRUPT = 3          # a record the index points at is not in the log

ACCOUNT_CREATE_FLAGS = ACCOUNT_LINKED | ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS | ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS
cdef uint16_t ACCOUNT_CREATE_FLAGS_C = ACCOUNT_LINKED | ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS | ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS
cdef uint16_t TRANSFER_KNOWN_FLAGS = TRANSFER_LINKED | TRANSFER_PENDING | TRANSFER_POST_PENDING | TRANSFER_VOID_PENDING


class LedgerError(Exception):
    """The ledger could not do what was asked (not a per-event result: those are result codes)."""


class LedgerIOError(LedgerError):
    """LMDB failed. The in-memory state may be ahead of the disk: the ledger refuses further work
    and must be reopened, which rebuilds it from the log."""


class CorruptionError(LedgerError):
    """What was read back from disk breaks an invariant (for example debits != credits on a ledger)."""


class MapFullError(LedgerIOError):
    """The LMDB map is full: reopen with a larger map size."""


cdef object _lmdb_error(int rc, str what):
    message = f"{what}: {mdb_strerror(rc).decode('utf-8', 'replace')} (LMDB error {rc})"
    if rc == MDB_MAP_FULL:
        return MapFullError(message)
    if rc == MDB_CORRUPTED or rc == MDB_PANIC:
        return CorruptionError(message)
    return LedgerIOError(message)


def lmdb_version():
    cdef int major, minor, patch
    mdb_version(&major, &minor, &patch)
    return (major, minor, patch)


# ---------------------------------------------------------------------------------------------------
# u128 and the id index

cdef inline bint u128_is_zero(U128 x) noexcept nogil:
    return x.lo == 0 and x.hi == 0

cdef inline bint u128_is_max(U128 x) noexcept nogil:
    return x.lo == UINT64_MAX and x.hi == UINT64_MAX

cdef inline bint u128_eq(U128 x, U128 y) noexcept nogil:
    return x.lo == y.lo and x.hi == y.hi

cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64's finalizer: sequential ids spread evenly over the table.
    x ^= x >> 30
    x *= <uint64_t>0xbf58476d1ce4e5b9
    x ^= x >> 27
    x *= <uint64_t>0x94d049bb133111eb
    x ^= x >> 31
    return x

cdef inline uint64_t hash_u128(U128 key) noexcept nogil:
    return mix64(key.lo ^ (key.hi * <uint64_t>0x9e3779b97f4a7c15))

cdef int idmap_init(IdMap *m, uint64_t capacity) noexcept nogil:
    cdef uint64_t cap = 1024
    while cap < capacity:
        cap <<= 1
    m.slots = <Slot*>big_alloc(cap * sizeof(Slot))
    if m.slots == NULL:
        return -1
    m.mask = cap - 1
    m.count = 0
    return 0

cdef void idmap_free(IdMap *m) noexcept nogil:
    if m.slots != NULL:
        big_free(m.slots, (m.mask + 1) * sizeof(Slot))
    m.slots = NULL
    m.mask = 0
    m.count = 0

cdef inline Slot* idmap_find(IdMap *m, U128 key) noexcept nogil:
    cdef uint64_t i = hash_u128(key) & m.mask
    cdef Slot *s
    while True:
        s = &m.slots[i]
        if s.key.lo == key.lo and s.key.hi == key.hi:
            return s
        if s.key.lo == 0 and s.key.hi == 0:
            return NULL
        i = (i + 1) & m.mask

cdef inline void idmap_prefetch(IdMap *m, U128 key) noexcept nogil:
    prefetch(&m.slots[hash_u128(key) & m.mask])

cdef int idmap_grow(IdMap *m, uint64_t new_cap) noexcept nogil:
    cdef uint64_t old_cap = m.mask + 1
    cdef Slot *old = m.slots
    cdef Slot *fresh = <Slot*>big_alloc(new_cap * sizeof(Slot))
    cdef uint64_t k, i
    if fresh == NULL:
        return -1
    for k in range(old_cap):
        if old[k].key.lo != 0 or old[k].key.hi != 0:
            i = hash_u128(old[k].key) & (new_cap - 1)
            while fresh[i].key.lo != 0 or fresh[i].key.hi != 0:
                i = (i + 1) & (new_cap - 1)
            fresh[i] = old[k]
    big_free(old, old_cap * sizeof(Slot))
    m.slots = fresh
    m.mask = new_cap - 1
    return 0

cdef int idmap_insert(IdMap *m, U128 key, uint64_t a, uint64_t b) noexcept nogil:
    """Insert a key known to be absent. Keeps the load factor at or below one half."""
    cdef uint64_t i
    if (m.count + 1) * 2 > m.mask + 1:
        if idmap_grow(m, (m.mask + 1) * 2) != 0:
            return -1
    i = hash_u128(key) & m.mask
    while m.slots[i].key.lo != 0 or m.slots[i].key.hi != 0:
        i = (i + 1) & m.mask
    m.slots[i].key = key
    m.slots[i].a = a
    m.slots[i].b = b
    m.count += 1
    return 0

cdef int idmap_reserve(IdMap *m, uint64_t count) noexcept nogil:
    """Make room for `count` keys in all, so that loading them never rehashes."""
    cdef uint64_t cap = m.mask + 1
    while count * 2 > cap:
        cap *= 2
    if cap == m.mask + 1:
        return 0
    return idmap_grow(m, cap)

cdef void idmap_remove(IdMap *m, U128 key) noexcept nogil:
    """Backward-shift deletion: keeps every other key reachable from its home slot."""
    cdef uint64_t i = hash_u128(key) & m.mask
    cdef uint64_t j, home
    while not u128_eq(m.slots[i].key, key):
        if u128_is_zero(m.slots[i].key):
            return
        i = (i + 1) & m.mask
    j = i
    while True:
        j = (j + 1) & m.mask
        if u128_is_zero(m.slots[j].key):
            break
        home = hash_u128(m.slots[j].key) & m.mask
        # Move slot j back into the hole at i unless its home lies cyclically in (i, j].
        if (i <= j and (home <= i or home > j)) or (i > j and (home <= i and home > j)):
            m.slots[i] = m.slots[j]
            i = j
    memset(&m.slots[i], 0, sizeof(Slot))
    m.count -= 1


# ---------------------------------------------------------------------------------------------------
# The expiry heap: pending transfers with a timeout, ordered by (expires_at, timestamp).

cdef inline bint expiry_less(Expiry *x, Expiry *y) noexcept nogil:
    if x.expires_at != y.expires_at:
        return x.expires_at < y.expires_at
    return x.timestamp < y.timestamp


# ---------------------------------------------------------------------------------------------------

cdef inline void u128_from_py(object value, U128 *out):
    out.lo = value & 0xFFFFFFFFFFFFFFFF
    out.hi = value >> 64

cdef inline object u128_to_py(U128 value):
    return (<object>value.hi << 64) | <object>value.lo

cdef object u128_sum_to_py(u128_t value):
    cdef uint64_t lo = <uint64_t>value
    cdef uint64_t hi = <uint64_t>(value >> 64)
    return (<object>hi << 64) | <object>lo


cdef class LogReader:
    """Reads one of the logs block by block, checking what it reads back from disk: blocks of whole
    records under 8-byte keys, timestamps strictly increasing."""

    cdef MDB_cursor *cursor
    cdef size_t record_size
    cdef str name
    cdef bint started
    cdef void *records          # the current block
    cdef uint64_t count         # ... and how many records it holds
    cdef uint64_t last_timestamp

    def __cinit__(self, size_t txn_address, MDB_dbi dbi, size_t record_size, str name):
        cdef int rc = mdb_cursor_open(<MDB_txn*>txn_address, dbi, &self.cursor)
        if rc:
            self.cursor = NULL
            raise _lmdb_error(rc, f"opening the {name} log")
        self.record_size = record_size
        self.name = name

    cdef bint next_block(self) except -1:
        cdef MDB_val key, value
        cdef int rc = mdb_cursor_get(self.cursor, &key, &value, MDB_NEXT if self.started else MDB_FIRST)
        self.started = True
        if rc == MDB_NOTFOUND:
            return False
        if rc:
            raise _lmdb_error(rc, f"reading the {self.name} log")
        if key.mv_size != 8 or value.mv_size == 0 or value.mv_size % self.record_size:
            raise CorruptionError(f"a {self.name} block of {value.mv_size} bytes is not whole records")
        self.records = value.mv_data
        self.count = value.mv_size // self.record_size
        return True

    cdef inline void check_order(self, uint64_t timestamp) except *:
        if timestamp <= self.last_timestamp:
            raise CorruptionError(f"the {self.name} log is out of order")
        self.last_timestamp = timestamp

    cdef void close(self):
        if self.cursor != NULL:
            mdb_cursor_close(self.cursor)
            self.cursor = NULL

    def __dealloc__(self):
        self.close()


cdef class Core:
    """The ledger's state and its log. Not thread-safe: one thread owns a Core (the writer)."""

    cdef MDB_env *env
    cdef MDB_dbi dbi_accounts
    cdef MDB_dbi dbi_transfers
    cdef MDB_dbi dbi_events
    cdef dict kv_dbis

    cdef Account *accounts
    cdef uint64_t accounts_count
    cdef uint64_t accounts_capacity
    cdef IdMap account_index
    cdef IdMap transfer_index

    cdef Expiry *heap
    cdef uint64_t heap_count
    cdef uint64_t heap_capacity

    cdef Movement *movements
    cdef uint32_t movements_count
    cdef uint32_t *open_ledgers         # registered ledgers whose movements are wildcards
    cdef uint32_t *known_ledgers
    cdef uint32_t known_ledgers_count
    cdef uint32_t medical_ledger
    cdef uint32_t purse_ledger
    cdef uint16_t kind_person_medical
    cdef uint16_t kind_card_purse

    cdef readonly uint64_t last_timestamp
    cdef readonly uint64_t last_process_ns   # the last batch's time in the rules (no disk)
    cdef readonly uint64_t last_write_ns     # ... in appending to the log
    cdef readonly uint64_t last_commit_ns    # ... in LMDB's commit (write-out and fsync)
    cdef public bint broken
    cdef int fatal

    # Per batch.
    cdef MDB_txn *txn
    cdef Undo *undo
    cdef bint undo_enabled              # only atomic calls and linked chains can need an undo
    cdef uint64_t undo_count
    cdef uint64_t undo_capacity
    cdef Transfer *batch_stored         # the resolved record of each transfer event of the batch
    cdef uint64_t batch_stored_capacity
    cdef uint64_t batch_first_timestamp  # timestamp of the batch's first transfer event
    cdef uint64_t batch_count
    cdef LogEvent *events_out
    cdef uint64_t events_count
    cdef uint64_t events_capacity

    def __cinit__(self):
        self.env = NULL
        self.accounts = NULL
        self.heap = NULL
        self.movements = NULL
        self.known_ledgers = NULL
        self.undo = NULL
        self.batch_stored = NULL
        self.events_out = NULL
        self.txn = NULL
        memset(&self.account_index, 0, sizeof(IdMap))
        memset(&self.transfer_index, 0, sizeof(IdMap))

    def __init__(self, str path not None, *, uint64_t map_size_bytes, object movements not None,
                 uint32_t medical_ledger, uint32_t purse_ledger,
                 uint16_t kind_person_medical, uint16_t kind_card_purse):
        cdef int rc
        cdef MDB_txn *txn = NULL
        self.kv_dbis = {}
        self.medical_ledger = medical_ledger
        self.purse_ledger = purse_ledger
        self.kind_person_medical = kind_person_medical
        self.kind_card_purse = kind_card_purse
        self.fatal = FATAL_NONE
        if idmap_init(&self.account_index, 1024) != 0 or idmap_init(&self.transfer_index, 1024) != 0:
            raise MemoryError()
        self.set_movements(movements)

        rc = mdb_env_create(&self.env)
        if rc:
            raise _lmdb_error(rc, "mdb_env_create")
        mdb_env_set_mapsize(self.env, map_size_bytes)
        mdb_env_set_maxdbs(self.env, 64)
        mdb_env_set_maxreaders(self.env, 256)
        # NOTLS: read transactions are not tied to a thread, so the gRPC server's readers can use them.
        rc = mdb_env_open(self.env, path.encode(), MDB_NOTLS | MDB_NORDAHEAD, 0o644)
        if rc:
            mdb_env_close(self.env)
            self.env = NULL
            raise _lmdb_error(rc, f"opening the ledger at {path}")
        rc = mdb_txn_begin(self.env, NULL, 0, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        rc = mdb_dbi_open(txn, b"accounts", MDB_CREATE, &self.dbi_accounts)
        if not rc:
            rc = mdb_dbi_open(txn, b"transfers", MDB_CREATE, &self.dbi_transfers)
        if not rc:
            rc = mdb_dbi_open(txn, b"events", MDB_CREATE, &self.dbi_events)
        if rc:
            mdb_txn_abort(txn)
            raise _lmdb_error(rc, "opening the ledger's databases")
        rc = mdb_txn_commit(txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_commit")
        self._replay()

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        if self.txn != NULL:
            mdb_txn_abort(self.txn)
            self.txn = NULL
        if self.env != NULL:
            mdb_env_close(self.env)
            self.env = NULL
        if self.accounts != NULL:
            big_free(self.accounts, self.accounts_capacity * sizeof(Account))
            self.accounts = NULL
            self.accounts_capacity = 0
        free(self.heap); self.heap = NULL
        free(self.movements); self.movements = NULL
        free(self.known_ledgers); self.known_ledgers = NULL
        free(self.undo); self.undo = NULL
        free(self.batch_stored); self.batch_stored = NULL
        free(self.events_out); self.events_out = NULL
        idmap_free(&self.account_index)
        idmap_free(&self.transfer_index)

    def close(self):
        self._release()
        self.broken = True

    # -----------------------------------------------------------------------------------------------
    # Configuration: the table of allowed movements.

    def set_movements(self, object table not None):
        """Install the movement table (records.MOVEMENT_DTYPE). Ledgers are the ones it names."""
        if table.dtype != _records.MOVEMENT_DTYPE or table.ndim != 1:
            raise TypeError("movements must be a 1-d array of records.MOVEMENT_DTYPE")
        cdef uint32_t n = len(table)
        cdef Movement *fresh = <Movement*>malloc(max(n, 1) * sizeof(Movement))
        cdef uint32_t *ledgers = <uint32_t*>malloc(max(n, 1) * sizeof(uint32_t))
        cdef uint32_t i, k, count = 0
        cdef bint seen
        if fresh == NULL or ledgers == NULL:
            free(fresh); free(ledgers)
            raise MemoryError()
        table = np.ascontiguousarray(table)
        if n:
            memcpy(fresh, <void*><size_t>table.ctypes.data, n * sizeof(Movement))
        for i in range(n):
            seen = False
            for k in range(count):
                if ledgers[k] == fresh[i].ledger:
                    seen = True
            if not seen:
                ledgers[count] = fresh[i].ledger
                count += 1
        free(self.movements)
        free(self.known_ledgers)
        self.movements = fresh
        self.movements_count = n
        self.known_ledgers = ledgers
        self.known_ledgers_count = count

    cdef bint ledger_known(self, uint32_t ledger) noexcept nogil:
        cdef uint32_t k
        for k in range(self.known_ledgers_count):
            if self.known_ledgers[k] == ledger:
                return True
        return False

    cdef bint kind_allowed(self, uint32_t ledger, uint16_t kind) noexcept nogil:
        """A kind may be opened on a ledger whose table names it (or a wildcard), never away from home."""
        cdef uint32_t k
        cdef Movement *m
        if kind == self.kind_person_medical:
            return ledger == self.medical_ledger
        if kind == self.kind_card_purse:
            return ledger == self.purse_ledger
        for k in range(self.movements_count):
            m = &self.movements[k]
            if m.ledger == ledger and (m.debit_kind == 0 or m.debit_kind == kind
                                       or m.credit_kind == 0 or m.credit_kind == kind):
                return True
        return False

    cdef Movement* find_movement(self, uint32_t ledger, uint16_t code, uint16_t debit_kind,
                                 uint16_t credit_kind) noexcept nogil:
        cdef uint32_t k
        cdef Movement *m
        for k in range(self.movements_count):
            m = &self.movements[k]
            if (m.ledger == ledger and (m.code == 0 or m.code == code)
                    and (m.debit_kind == 0 or m.debit_kind == debit_kind)
                    and (m.credit_kind == 0 or m.credit_kind == credit_kind)):
                return m
        return NULL

    # -----------------------------------------------------------------------------------------------
    # Memory: accounts, undo log, per-batch buffers, the expiry heap.

    cdef int reserve_accounts(self, uint64_t extra) noexcept nogil:
        cdef uint64_t want = self.accounts_count + extra
        cdef uint64_t cap = self.accounts_capacity if self.accounts_capacity else 1024
        cdef Account *fresh
        if want <= self.accounts_capacity:
            return 0
        while cap < want:
            cap *= 2
        fresh = <Account*>big_realloc(self.accounts, self.accounts_capacity * sizeof(Account), cap * sizeof(Account))
        if fresh == NULL:
            return -1
        self.accounts = fresh
        self.accounts_capacity = cap
        return 0

    cdef int reserve_batch(self, uint64_t accounts, uint64_t changes, uint64_t transfers) noexcept nogil:
        cdef uint64_t undo_want = accounts + 3 * changes + 4 * transfers + 16
        cdef uint64_t events_want = changes + 16
        cdef Undo *u
        cdef Transfer *t
        cdef LogEvent *e
        if self.reserve_accounts(accounts) != 0:
            return -1
        if undo_want > self.undo_capacity:
            u = <Undo*>realloc(self.undo, undo_want * sizeof(Undo))
            if u == NULL:
                return -1
            self.undo = u
            self.undo_capacity = undo_want
        if transfers + 1 > self.batch_stored_capacity:
            t = <Transfer*>realloc(self.batch_stored, (transfers + 1) * sizeof(Transfer))
            if t == NULL:
                return -1
            self.batch_stored = t
            self.batch_stored_capacity = transfers + 1
        if events_want > self.events_capacity:
            e = <LogEvent*>realloc(self.events_out, events_want * sizeof(LogEvent))
            if e == NULL:
                return -1
            self.events_out = e
            self.events_capacity = events_want
        return 0

    cdef int push_event(self, U128 id, uint64_t timestamp, uint32_t kind) noexcept nogil:
        cdef LogEvent *e
        cdef uint64_t cap
        if self.events_count == self.events_capacity:
            cap = self.events_capacity * 2 + 16
            e = <LogEvent*>realloc(self.events_out, cap * sizeof(LogEvent))
            if e == NULL:
                return -1
            self.events_out = e
            self.events_capacity = cap
        e = &self.events_out[self.events_count]
        e.id = id
        e.timestamp = timestamp
        e.kind = kind
        e.reserved = 0
        self.events_count += 1
        return 0

    cdef int heap_push(self, uint64_t expires_at, uint64_t timestamp, U128 id) noexcept nogil:
        cdef uint64_t i, parent
        cdef Expiry item, tmp
        cdef Expiry *fresh
        if self.heap_count == self.heap_capacity:
            fresh = <Expiry*>realloc(self.heap, (self.heap_capacity * 2 + 64) * sizeof(Expiry))
            if fresh == NULL:
                return -1
            self.heap = fresh
            self.heap_capacity = self.heap_capacity * 2 + 64
        item.expires_at = expires_at
        item.timestamp = timestamp
        item.id = id
        i = self.heap_count
        self.heap[i] = item
        self.heap_count += 1
        while i > 0:
            parent = (i - 1) // 2
            if not expiry_less(&self.heap[i], &self.heap[parent]):
                break
            tmp = self.heap[i]; self.heap[i] = self.heap[parent]; self.heap[parent] = tmp
            i = parent
        return 0

    cdef Expiry heap_pop(self) noexcept nogil:
        cdef Expiry top = self.heap[0]
        cdef Expiry tmp
        cdef uint64_t i = 0, left, right, smallest
        self.heap_count -= 1
        self.heap[0] = self.heap[self.heap_count]
        while True:
            left = 2 * i + 1
            right = left + 1
            smallest = i
            if left < self.heap_count and expiry_less(&self.heap[left], &self.heap[smallest]):
                smallest = left
            if right < self.heap_count and expiry_less(&self.heap[right], &self.heap[smallest]):
                smallest = right
            if smallest == i:
                break
            tmp = self.heap[i]; self.heap[i] = self.heap[smallest]; self.heap[smallest] = tmp
            i = smallest
        return top

    # -----------------------------------------------------------------------------------------------
    # Undo: a linked chain that fails, or an atomic call that fails, leaves no trace.

    cdef inline void save_account(self, uint64_t index) noexcept nogil:
        cdef Undo *u
        cdef Account *a
        if not self.undo_enabled:
            return
        u = &self.undo[self.undo_count]
        a = &self.accounts[index]
        u.kind = UNDO_BALANCES
        u.index = <uint32_t>index
        u.saved[0] = a.debits_pending
        u.saved[1] = a.debits_posted
        u.saved[2] = a.credits_pending
        u.saved[3] = a.credits_posted
        u.saved_flags = a.flags
        self.undo_count += 1

    cdef inline void save_mark(self, uint32_t kind, U128 key, uint64_t saved_b) noexcept nogil:
        cdef Undo *u
        if not self.undo_enabled:
            return
        u = &self.undo[self.undo_count]
        u.kind = kind
        u.key = key
        u.saved_b = saved_b
        self.undo_count += 1

    cdef void undo_to(self, uint64_t mark) noexcept nogil:
        cdef Undo *u
        cdef Account *a
        cdef Slot *s
        while self.undo_count > mark:
            self.undo_count -= 1
            u = &self.undo[self.undo_count]
            if u.kind == UNDO_BALANCES:
                a = &self.accounts[u.index]
                a.debits_pending = u.saved[0]
                a.debits_posted = u.saved[1]
                a.credits_pending = u.saved[2]
                a.credits_posted = u.saved[3]
                a.flags = u.saved_flags
            elif u.kind == UNDO_ACCOUNT_CREATED:
                idmap_remove(&self.account_index, u.key)
                self.accounts_count -= 1
            elif u.kind == UNDO_TRANSFER_INSERTED:
                idmap_remove(&self.transfer_index, u.key)
            elif u.kind == UNDO_TRANSFER_AUX:
                s = idmap_find(&self.transfer_index, u.key)
                if s != NULL:
                    s.b = u.saved_b

    # -----------------------------------------------------------------------------------------------
    # Reading stored transfers back: from this batch's buffer, or from the log.

    cdef int load_transfer(self, MDB_txn *txn, uint64_t timestamp, Transfer *out) noexcept nogil:
        """Copy the stored transfer with this timestamp into `out`. 0 on success, -1 when missing."""
        cdef uint64_t index
        cdef MDB_cursor *cursor = NULL
        cdef MDB_val key, data
        cdef uint64_t key_be = be64(timestamp)
        cdef Transfer *block
        cdef uint64_t lo, hi, mid, n
        cdef int rc
        if self.batch_count and timestamp >= self.batch_first_timestamp:
            index = timestamp - self.batch_first_timestamp
            if index < self.batch_count:
                out[0] = self.batch_stored[index]
                return 0
            return -1
        if mdb_cursor_open(txn, self.dbi_transfers, &cursor) != 0:
            return -1
        key.mv_size = 8
        key.mv_data = &key_be
        rc = mdb_cursor_get(cursor, &key, &data, MDB_SET_RANGE)
        mdb_cursor_close(cursor)
        if rc != 0 or data.mv_size % sizeof(Transfer) != 0:
            return -1
        block = <Transfer*>data.mv_data
        n = data.mv_size // sizeof(Transfer)
        lo = 0
        hi = n
        while lo < hi:
            mid = (lo + hi) // 2
            if block[mid].timestamp < timestamp:
                lo = mid + 1
            else:
                hi = mid
        if lo < n and block[lo].timestamp == timestamp:
            memcpy(out, &block[lo], sizeof(Transfer))
            return 0
        return -1

    # -----------------------------------------------------------------------------------------------
    # Accounts

    cdef uint32_t create_account(self, Account *ev, uint64_t timestamp) noexcept nogil:
        cdef Slot *s
        cdef Account *a
        cdef uint16_t creation = ev.flags & (ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS
                                             | ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS)
        cdef uint32_t k
        if ev.timestamp != 0:
            return AR_TIMESTAMP_MUST_BE_ZERO
        if ev.flags & ~ACCOUNT_CREATE_FLAGS_C:
            return AR_RESERVED_FIELD
        for k in range(40):
            if ev.reserved[k] != 0:
                return AR_RESERVED_FIELD
        if u128_is_zero(ev.id):
            return AR_ID_MUST_NOT_BE_ZERO
        if u128_is_max(ev.id):
            return AR_ID_MUST_NOT_BE_INT_MAX
        if (ev.flags & ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS) and (ev.flags & ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS):
            return AR_FLAGS_ARE_MUTUALLY_EXCLUSIVE
        if ev.debits_pending or ev.debits_posted or ev.credits_pending or ev.credits_posted:
            return AR_BALANCES_MUST_BE_ZERO
        if ev.ledger == 0:
            return AR_LEDGER_MUST_NOT_BE_ZERO
        if ev.code == 0:
            return AR_CODE_MUST_NOT_BE_ZERO
        s = idmap_find(&self.account_index, ev.id)
        if s != NULL:
            a = &self.accounts[s.a]
            # Freezing and closing change an account's flags later; a resend compares creation flags.
            if (a.flags & (ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS | ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS)) != creation:
                return AR_EXISTS_WITH_DIFFERENT_FLAGS
            if not u128_eq(a.owner, ev.owner):
                return AR_EXISTS_WITH_DIFFERENT_OWNER
            if a.user_data != ev.user_data:
                return AR_EXISTS_WITH_DIFFERENT_USER_DATA
            if a.ledger != ev.ledger:
                return AR_EXISTS_WITH_DIFFERENT_LEDGER
            if a.code != ev.code:
                return AR_EXISTS_WITH_DIFFERENT_CODE
            return AR_EXISTS
        if not self.ledger_known(ev.ledger):
            return AR_LEDGER_NOT_REGISTERED
        if not self.kind_allowed(ev.ledger, ev.code):
            return AR_KIND_NOT_ALLOWED_ON_LEDGER
        if ((ev.code == self.kind_person_medical or ev.code == self.kind_card_purse)
                and not (ev.flags & ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS)):
            return AR_KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS
        if idmap_insert(&self.account_index, ev.id, self.accounts_count, 0) != 0:
            self.fatal = FATAL_NO_MEMORY
            return AR_RESERVED_FIELD
        a = &self.accounts[self.accounts_count]
        a[0] = ev[0]
        a.flags = creation
        a.timestamp = timestamp
        self.accounts_count += 1
        self.save_mark(UNDO_ACCOUNT_CREATED, ev.id, 0)
        return AR_OK

    # -----------------------------------------------------------------------------------------------
    # Account changes: freeze, unfreeze, close

    cdef uint32_t change_account(self, Change *ev, uint64_t timestamp) noexcept nogil:
        cdef Slot *s
        cdef Account *a
        if ev.reserved != 0:
            return CR_RESERVED_FIELD
        if ev.action < CHANGE_FREEZE or ev.action > CHANGE_CLOSE:
            return CR_ACTION_UNKNOWN
        s = idmap_find(&self.account_index, ev.account_id)
        if s == NULL:
            return CR_ACCOUNT_NOT_FOUND
        a = &self.accounts[s.a]
        if a.flags & ACCOUNT_CLOSED:
            return CR_ACCOUNT_CLOSED
        if ev.action == CHANGE_FREEZE and (a.flags & ACCOUNT_FROZEN):
            return CR_ACCOUNT_ALREADY_FROZEN
        if ev.action == CHANGE_UNFREEZE and not (a.flags & ACCOUNT_FROZEN):
            return CR_ACCOUNT_NOT_FROZEN
        if self.push_event(ev.account_id, timestamp, ev.action) != 0:
            self.fatal = FATAL_NO_MEMORY
            return CR_RESERVED_FIELD
        self.save_account(s.a)
        apply_change(a, ev.action)
        return CR_OK

    # -----------------------------------------------------------------------------------------------
    # Transfers

    cdef uint32_t transfer_exists(self, Transfer *ev, Slot *slot) noexcept nogil:
        cdef Transfer stored
        cdef bint resolves = (ev.flags & (TRANSFER_POST_PENDING | TRANSFER_VOID_PENDING)) != 0
        if self.load_transfer(self.txn, slot.a, &stored) != 0:
            self.fatal = FATAL_CORRUPT
            return TR_EXISTS
        if ev.flags != stored.flags:
            return TR_EXISTS_WITH_DIFFERENT_FLAGS
        if not u128_eq(ev.pending_id, stored.pending_id):
            return TR_EXISTS_WITH_DIFFERENT_PENDING_ID
        if ev.timeout != stored.timeout:
            return TR_EXISTS_WITH_DIFFERENT_TIMEOUT
        # A post or void may leave fields at zero, meaning "as the pending transfer": compare the rest.
        if not (resolves and u128_is_zero(ev.debit_account_id)) and not u128_eq(ev.debit_account_id, stored.debit_account_id):
            return TR_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if not (resolves and u128_is_zero(ev.credit_account_id)) and not u128_eq(ev.credit_account_id, stored.credit_account_id):
            return TR_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if not (resolves and ev.amount == 0) and ev.amount != stored.amount:
            return TR_EXISTS_WITH_DIFFERENT_AMOUNT
        if not u128_eq(ev.ref_id, stored.ref_id):
            return TR_EXISTS_WITH_DIFFERENT_REF_ID
        if not (resolves and u128_is_zero(ev.user_data)) and not u128_eq(ev.user_data, stored.user_data):
            return TR_EXISTS_WITH_DIFFERENT_USER_DATA
        if not (resolves and ev.ledger == 0) and ev.ledger != stored.ledger:
            return TR_EXISTS_WITH_DIFFERENT_LEDGER
        if not (resolves and ev.code == 0) and ev.code != stored.code:
            return TR_EXISTS_WITH_DIFFERENT_CODE
        return TR_EXISTS

    cdef uint32_t create_transfer(self, Transfer *ev, uint64_t timestamp, Transfer *out) noexcept nogil:
        cdef uint16_t flags = ev.flags
        cdef uint16_t phase = flags & (TRANSFER_PENDING | TRANSFER_POST_PENDING | TRANSFER_VOID_PENDING)
        cdef Slot *s
        if ev.timestamp != 0:
            return TR_TIMESTAMP_MUST_BE_ZERO
        if ev.reserved != 0 or (flags & ~TRANSFER_KNOWN_FLAGS):
            return TR_RESERVED_FIELD
        if u128_is_zero(ev.id):
            return TR_ID_MUST_NOT_BE_ZERO
        if u128_is_max(ev.id):
            return TR_ID_MUST_NOT_BE_INT_MAX
        if phase & (phase - 1):
            return TR_FLAGS_ARE_MUTUALLY_EXCLUSIVE
        if phase & (TRANSFER_POST_PENDING | TRANSFER_VOID_PENDING):
            return self.resolve_pending(ev, timestamp, out)
        if not u128_is_zero(ev.pending_id):
            return TR_PENDING_ID_MUST_BE_ZERO
        if ev.timeout != 0 and not (flags & TRANSFER_PENDING):
            return TR_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if u128_is_zero(ev.debit_account_id):
            return TR_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if u128_is_zero(ev.credit_account_id):
            return TR_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if u128_eq(ev.debit_account_id, ev.credit_account_id):
            return TR_ACCOUNTS_MUST_BE_DIFFERENT
        if ev.ledger == 0:
            return TR_LEDGER_MUST_NOT_BE_ZERO
        if ev.code == 0:
            return TR_CODE_MUST_NOT_BE_ZERO
        if ev.amount == 0:
            return TR_AMOUNT_MUST_NOT_BE_ZERO
        s = idmap_find(&self.transfer_index, ev.id)
        if s != NULL:
            return self.transfer_exists(ev, s)
        return self.book_transfer(ev, timestamp, out)

    cdef uint32_t book_transfer(self, Transfer *ev, uint64_t timestamp, Transfer *out) noexcept nogil:
        """The account-level checks and the booking of a single-phase or pending transfer."""
        cdef Slot *ds = idmap_find(&self.account_index, ev.debit_account_id)
        cdef Slot *cs
        cdef Slot *rs
        cdef Account *d
        cdef Account *c
        cdef Movement *movement
        cdef Transfer original
        cdef uint64_t amount = ev.amount
        cdef uint64_t debit_index, credit_index
        cdef bint pending = (ev.flags & TRANSFER_PENDING) != 0
        if ds == NULL:
            return TR_DEBIT_ACCOUNT_NOT_FOUND
        debit_index = ds.a
        cs = idmap_find(&self.account_index, ev.credit_account_id)
        if cs == NULL:
            return TR_CREDIT_ACCOUNT_NOT_FOUND
        credit_index = cs.a
        d = &self.accounts[debit_index]
        c = &self.accounts[credit_index]
        if d.ledger != c.ledger:
            return TR_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if ev.ledger != d.ledger:
            return TR_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
        if d.flags & ACCOUNT_CLOSED:
            return TR_DEBIT_ACCOUNT_CLOSED
        if c.flags & ACCOUNT_CLOSED:
            return TR_CREDIT_ACCOUNT_CLOSED
        if d.flags & ACCOUNT_FROZEN:
            return TR_DEBIT_ACCOUNT_FROZEN
        movement = self.find_movement(ev.ledger, ev.code, d.code, c.code)
        if movement == NULL:
            return TR_MOVEMENT_NOT_ALLOWED
        if movement.refund_of:
            if pending:
                return TR_REFUND_MUST_NOT_BE_PENDING
            if u128_is_zero(ev.ref_id):
                return TR_REF_ID_MUST_NOT_BE_ZERO
            rs = idmap_find(&self.transfer_index, ev.ref_id)
            if rs == NULL:
                return TR_REF_TRANSFER_NOT_FOUND
            if self.load_transfer(self.txn, rs.a, &original) != 0:
                self.fatal = FATAL_CORRUPT
                return TR_REF_TRANSFER_NOT_FOUND
            if (original.code != movement.refund_of or original.ledger != ev.ledger
                    or (original.flags & (TRANSFER_PENDING | TRANSFER_VOID_PENDING))):
                return TR_REF_TRANSFER_NOT_REFUNDABLE
            if (not u128_eq(original.debit_account_id, ev.credit_account_id)
                    or not u128_eq(original.credit_account_id, ev.debit_account_id)):
                return TR_REF_TRANSFER_HAS_DIFFERENT_ACCOUNTS
            if amount > original.amount - rs.b:
                return TR_EXCEEDS_REFUNDABLE_AMOUNT
        elif not u128_is_zero(ev.ref_id):
            return TR_REF_ID_MUST_BE_ZERO
        if pending:
            if d.debits_pending > UINT64_MAX - amount:
                return TR_OVERFLOWS_DEBITS_PENDING
            if c.credits_pending > UINT64_MAX - amount:
                return TR_OVERFLOWS_CREDITS_PENDING
        else:
            if d.debits_posted > UINT64_MAX - amount:
                return TR_OVERFLOWS_DEBITS_POSTED
            if c.credits_posted > UINT64_MAX - amount:
                return TR_OVERFLOWS_CREDITS_POSTED
        if <u128_t>d.debits_pending + d.debits_posted + amount > UINT64_MAX:
            return TR_OVERFLOWS_DEBITS
        if <u128_t>c.credits_pending + c.credits_posted + amount > UINT64_MAX:
            return TR_OVERFLOWS_CREDITS
        if pending and ev.timeout and <u128_t>timestamp + <u128_t>ev.timeout * NS_PER_S > UINT64_MAX:
            return TR_OVERFLOWS_TIMEOUT
        if ((d.flags & ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS)
                and <u128_t>d.debits_pending + d.debits_posted + amount > d.credits_posted):
            return TR_EXCEEDS_CREDITS
        if ((c.flags & ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS)
                and <u128_t>c.credits_pending + c.credits_posted + amount > c.debits_posted):
            return TR_EXCEEDS_DEBITS

        if idmap_insert(&self.transfer_index, ev.id, timestamp, PENDING_STATE_PENDING) != 0:
            self.fatal = FATAL_NO_MEMORY
            return TR_RESERVED_FIELD
        self.save_mark(UNDO_TRANSFER_INSERTED, ev.id, 0)
        self.save_account(debit_index)
        self.save_account(credit_index)
        if pending:
            d.debits_pending += amount
            c.credits_pending += amount
            if ev.timeout and self.heap_push(timestamp + <uint64_t>ev.timeout * NS_PER_S, timestamp, ev.id) != 0:
                self.fatal = FATAL_NO_MEMORY
        else:
            d.debits_posted += amount
            c.credits_posted += amount
        if movement.refund_of:
            rs = idmap_find(&self.transfer_index, ev.ref_id)  # again: the insert may have moved it
            self.save_mark(UNDO_TRANSFER_AUX, ev.ref_id, rs.b)
            rs.b += amount
        out[0] = ev[0]
        out.timestamp = timestamp
        return TR_OK

    cdef uint32_t resolve_pending(self, Transfer *ev, uint64_t timestamp, Transfer *out) noexcept nogil:
        """Post (all or part of) or void a pending transfer."""
        cdef bint post = (ev.flags & TRANSFER_POST_PENDING) != 0
        cdef Slot *s
        cdef Slot *ps
        cdef Transfer p
        cdef Account *d
        cdef Account *c
        cdef uint64_t amount, debit_index, credit_index
        if u128_is_zero(ev.pending_id):
            return TR_PENDING_ID_MUST_NOT_BE_ZERO
        if u128_eq(ev.pending_id, ev.id):
            return TR_PENDING_ID_MUST_BE_DIFFERENT
        if ev.timeout != 0:
            return TR_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if not u128_is_zero(ev.ref_id):
            return TR_REF_ID_MUST_BE_ZERO_ON_POST_OR_VOID
        s = idmap_find(&self.transfer_index, ev.id)
        if s != NULL:
            return self.transfer_exists(ev, s)
        ps = idmap_find(&self.transfer_index, ev.pending_id)
        if ps == NULL:
            return TR_PENDING_TRANSFER_NOT_FOUND
        if self.load_transfer(self.txn, ps.a, &p) != 0:
            self.fatal = FATAL_CORRUPT
            return TR_PENDING_TRANSFER_NOT_FOUND
        if not (p.flags & TRANSFER_PENDING):
            return TR_PENDING_TRANSFER_NOT_PENDING
        if not u128_is_zero(ev.debit_account_id) and not u128_eq(ev.debit_account_id, p.debit_account_id):
            return TR_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
        if not u128_is_zero(ev.credit_account_id) and not u128_eq(ev.credit_account_id, p.credit_account_id):
            return TR_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
        if ev.ledger != 0 and ev.ledger != p.ledger:
            return TR_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
        if ev.code != 0 and ev.code != p.code:
            return TR_PENDING_TRANSFER_HAS_DIFFERENT_CODE
        if ps.b == PENDING_STATE_POSTED:
            return TR_PENDING_TRANSFER_ALREADY_POSTED
        if ps.b == PENDING_STATE_VOIDED:
            return TR_PENDING_TRANSFER_ALREADY_VOIDED
        if ps.b == PENDING_STATE_EXPIRED:
            return TR_PENDING_TRANSFER_EXPIRED
        if p.timeout and p.timestamp + <uint64_t>p.timeout * NS_PER_S <= timestamp:
            return TR_PENDING_TRANSFER_EXPIRED
        if post:
            amount = ev.amount if ev.amount != 0 else p.amount
            if amount > p.amount:
                return TR_EXCEEDS_PENDING_TRANSFER_AMOUNT
        else:
            if ev.amount != 0 and ev.amount != p.amount:
                return TR_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
            amount = p.amount
        debit_index = idmap_find(&self.account_index, p.debit_account_id).a
        credit_index = idmap_find(&self.account_index, p.credit_account_id).a
        d = &self.accounts[debit_index]
        c = &self.accounts[credit_index]
        if post:
            # A hold made before a freeze may still be posted: liability was fixed when it was made.
            if d.flags & ACCOUNT_CLOSED:
                return TR_DEBIT_ACCOUNT_CLOSED
            if c.flags & ACCOUNT_CLOSED:
                return TR_CREDIT_ACCOUNT_CLOSED
            if d.debits_posted > UINT64_MAX - amount:
                return TR_OVERFLOWS_DEBITS_POSTED
            if c.credits_posted > UINT64_MAX - amount:
                return TR_OVERFLOWS_CREDITS_POSTED

        if idmap_insert(&self.transfer_index, ev.id, timestamp, 0) != 0:
            self.fatal = FATAL_NO_MEMORY
            return TR_RESERVED_FIELD
        self.save_mark(UNDO_TRANSFER_INSERTED, ev.id, 0)
        self.save_account(debit_index)
        self.save_account(credit_index)
        d.debits_pending -= p.amount
        c.credits_pending -= p.amount
        if post:
            d.debits_posted += amount
            c.credits_posted += amount
        ps = idmap_find(&self.transfer_index, ev.pending_id)  # again: the insert may have moved it
        self.save_mark(UNDO_TRANSFER_AUX, ev.pending_id, ps.b)
        ps.b = PENDING_STATE_POSTED if post else PENDING_STATE_VOIDED

        out[0] = ev[0]
        out.debit_account_id = p.debit_account_id
        out.credit_account_id = p.credit_account_id
        out.amount = amount
        out.ledger = p.ledger
        out.code = p.code
        if u128_is_zero(ev.user_data):
            out.user_data = p.user_data
        out.timestamp = timestamp
        return TR_OK

    cdef int expire_due(self, uint64_t now, uint64_t *clock) noexcept nogil:
        """Expire every pending transfer whose timeout has passed by `now`. Logged, never undone."""
        cdef Expiry due
        cdef Slot *s
        cdef Transfer p
        while self.heap_count and self.heap[0].expires_at <= now:
            due = self.heap_pop()
            s = idmap_find(&self.transfer_index, due.id)
            if s == NULL or s.a != due.timestamp or s.b != PENDING_STATE_PENDING:
                continue  # resolved already, or left behind by a chain that was rolled back
            if self.load_transfer(self.txn, s.a, &p) != 0:
                self.fatal = FATAL_CORRUPT
                return -1
            self.release_pending(&p)
            s.b = PENDING_STATE_EXPIRED
            clock[0] += 1
            if self.push_event(due.id, clock[0], EVENT_EXPIRE) != 0:
                self.fatal = FATAL_NO_MEMORY
                return -1
        return 0

    cdef void release_pending(self, Transfer *p) noexcept nogil:
        self.accounts[idmap_find(&self.account_index, p.debit_account_id).a].debits_pending -= p.amount
        self.accounts[idmap_find(&self.account_index, p.credit_account_id).a].credits_pending -= p.amount

    # -----------------------------------------------------------------------------------------------
    # Batches

    cdef void run_accounts(self, Account *events, uint64_t n, Result *results, uint64_t *clock,
                           bint atomic) noexcept nogil:
        cdef uint64_t i, k
        cdef int64_t chain_start = -1
        cdef uint64_t chain_undo = 0
        cdef bint chain_failed = False
        cdef uint32_t status
        for i in range(n):
            clock[0] += 1
            if chain_start < 0 and (events[i].flags & ACCOUNT_LINKED):
                chain_start = <int64_t>i
                chain_undo = self.undo_count
            self.undo_enabled = atomic or chain_start >= 0
            if chain_failed:
                status = AR_LINKED_EVENT_FAILED
            elif (events[i].flags & ACCOUNT_LINKED) and i == n - 1:
                status = AR_LINKED_EVENT_CHAIN_OPEN
            else:
                status = self.create_account(&events[i], clock[0])
            results[i].status = status
            results[i].reserved = 0
            if status == AR_OK:
                results[i].timestamp = clock[0]
            elif status == AR_EXISTS:
                results[i].timestamp = self.accounts[idmap_find(&self.account_index, events[i].id).a].timestamp
            else:
                results[i].timestamp = 0
            if status != AR_OK and chain_start >= 0 and not chain_failed:
                chain_failed = True
                self.undo_to(chain_undo)
                for k in range(<uint64_t>chain_start, i):
                    results[k].status = AR_LINKED_EVENT_FAILED
                    results[k].timestamp = 0
            if not (events[i].flags & ACCOUNT_LINKED):
                chain_start = -1
                chain_failed = False

    cdef inline void prefetch_account(self, U128 id) noexcept nogil:
        cdef Slot *s = idmap_find(&self.account_index, id)
        if s != NULL:  # an account record spans two cache lines: balances in one, ledger and flags in the other
            prefetch(&self.accounts[s.a])
            prefetch(<char*>&self.accounts[s.a] + 64)

    cdef void run_transfers(self, Transfer *events, uint64_t n, Result *results, uint64_t *clock,
                            bint atomic) noexcept nogil:
        cdef uint64_t i, k
        cdef int64_t chain_start = -1
        cdef uint64_t chain_undo = 0
        cdef bint chain_failed = False
        cdef uint32_t status
        cdef Slot *s
        self.batch_first_timestamp = clock[0] + 1
        self.batch_count = n
        for i in range(n):
            clock[0] += 1
            # The tables are far larger than the caches: fetch the index slots of the event 8 ahead,
            # then the account records of the event 4 ahead (whose slots have arrived by now).
            if i + 8 < n:
                idmap_prefetch(&self.account_index, events[i + 8].debit_account_id)
                idmap_prefetch(&self.account_index, events[i + 8].credit_account_id)
                idmap_prefetch(&self.transfer_index, events[i + 8].id)
            if i + 4 < n:
                self.prefetch_account(events[i + 4].debit_account_id)
                self.prefetch_account(events[i + 4].credit_account_id)
            if chain_start < 0 and (events[i].flags & TRANSFER_LINKED):
                chain_start = <int64_t>i
                chain_undo = self.undo_count
            self.undo_enabled = atomic or chain_start >= 0
            if chain_failed:
                status = TR_LINKED_EVENT_FAILED
            elif (events[i].flags & TRANSFER_LINKED) and i == n - 1:
                status = TR_LINKED_EVENT_CHAIN_OPEN
            else:
                status = self.create_transfer(&events[i], clock[0], &self.batch_stored[i])
            results[i].status = status
            results[i].reserved = 0
            if status == TR_OK:
                results[i].timestamp = clock[0]
            elif status == TR_EXISTS:
                results[i].timestamp = idmap_find(&self.transfer_index, events[i].id).a
            else:
                results[i].timestamp = 0
            if status != TR_OK and chain_start >= 0 and not chain_failed:
                chain_failed = True
                self.undo_to(chain_undo)
                for k in range(<uint64_t>chain_start, i):
                    results[k].status = TR_LINKED_EVENT_FAILED
                    results[k].timestamp = 0
            if not (events[i].flags & TRANSFER_LINKED):
                chain_start = -1
                chain_failed = False

    cdef int append_block(self, MDB_dbi dbi, void *records, size_t record_size, size_t count,
                          uint64_t last_timestamp) noexcept nogil:
        cdef MDB_val key, data
        cdef uint64_t key_be = be64(last_timestamp)
        if count == 0:
            return 0
        key.mv_size = 8
        key.mv_data = &key_be
        data.mv_size = record_size * count
        data.mv_data = records
        return mdb_put(self.txn, dbi, &key, &data, MDB_APPEND)

    cdef uint64_t gather_ok(self, void *records, size_t record_size, Result *results, uint64_t n) noexcept nogil:
        """Compact the records whose result is OK to the front, in order. Returns how many."""
        cdef uint64_t i, kept = 0
        cdef char *base = <char*>records
        for i in range(n):
            if results[i].status == 0:
                if kept != i:
                    memcpy(base + kept * record_size, base + i * record_size, record_size)
                kept += 1
        return kept

    def execute(self, object accounts, object changes, object transfers, list puts, bint atomic,
                uint64_t now_ns):
        """Run one batch in one LMDB write transaction with one fsync.

        `accounts`, `changes`, `transfers` are numpy arrays of the records' dtypes (or None); the
        facade has checked their dtype, shape and size. Returns three result arrays. With `atomic`,
        any failed event rolls back every event of the call (expiries that fell due still commit).
        `puts` are (database name, key bytes, value bytes or None to delete), written only if the
        events were accepted (all of them when atomic).
        """
        cdef uint64_t n_accounts = 0 if accounts is None else len(accounts)
        cdef uint64_t n_changes = 0 if changes is None else len(changes)
        cdef uint64_t n_transfers = 0 if transfers is None else len(transfers)
        cdef Account *account_events = NULL
        cdef Change *change_events = NULL
        cdef Transfer *transfer_events = NULL
        cdef uint64_t clock, i, kept, undo_mark, events_mark
        cdef uint64_t accounts_before = self.accounts_count
        cdef bint failed = False
        cdef int rc
        cdef MDB_txn *txn = NULL
        if self.broken:
            raise LedgerIOError("the ledger failed earlier and must be reopened")
        for array, dtype in ((accounts, _records.ACCOUNT_DTYPE), (changes, _records.CHANGE_DTYPE),
                             (transfers, _records.TRANSFER_DTYPE)):
            if array is not None and (array.dtype != dtype or array.ndim != 1 or len(array) > BATCH_EVENTS_MAX):
                raise TypeError("events must be 1-d arrays of the record dtypes, at most BATCH_EVENTS_MAX long")
        account_results = np.zeros(n_accounts, dtype=_records.RESULT_DTYPE)
        change_results = np.zeros(n_changes, dtype=_records.RESULT_DTYPE)
        transfer_results = np.zeros(n_transfers, dtype=_records.RESULT_DTYPE)
        # The events are only read: what is logged is built apart (the account array, batch_stored).
        if n_accounts:
            accounts = np.ascontiguousarray(accounts)
            account_events = <Account*><size_t>accounts.ctypes.data
        if n_changes:
            changes = np.ascontiguousarray(changes)
            change_events = <Change*><size_t>changes.ctypes.data
        if n_transfers:
            transfers = np.ascontiguousarray(transfers)
            transfer_events = <Transfer*><size_t>transfers.ctypes.data
        cdef Result *ra = <Result*><size_t>account_results.ctypes.data
        cdef Result *rc_ = <Result*><size_t>change_results.ctypes.data
        cdef Result *rt = <Result*><size_t>transfer_results.ctypes.data
        kv = [(self._kv_dbi(name), key, value) for name, key, value in puts]

        if self.reserve_batch(n_accounts, n_changes, n_transfers) != 0:
            raise MemoryError()
        rc = mdb_txn_begin(self.env, NULL, 0, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        self.txn = txn
        self.undo_count = 0
        self.events_count = 0
        self.batch_count = 0
        clock = now_ns if now_ns > self.last_timestamp else self.last_timestamp
        cdef uint64_t started_ns = monotonic_ns()
        with nogil:
            self.expire_due(clock, &clock)
            undo_mark = self.undo_count
            events_mark = self.events_count
            self.run_accounts(account_events, n_accounts, ra, &clock, atomic)
            self.undo_enabled = atomic
            for i in range(n_changes):
                clock += 1
                rc_[i].status = self.change_account(&change_events[i], clock)
                rc_[i].timestamp = clock if rc_[i].status == CR_OK else 0
            self.run_transfers(transfer_events, n_transfers, rt, &clock, atomic)
            if atomic:
                for i in range(n_accounts):
                    failed = failed or ra[i].status != AR_OK
                for i in range(n_changes):
                    failed = failed or rc_[i].status != CR_OK
                for i in range(n_transfers):
                    failed = failed or rt[i].status != TR_OK
                if failed:
                    self.undo_to(undo_mark)
                    self.events_count = events_mark
                    mark_rolled_back(ra, n_accounts, AR_LINKED_EVENT_FAILED)
                    mark_rolled_back(rc_, n_changes, CR_LINKED_EVENT_FAILED)
                    mark_rolled_back(rt, n_transfers, TR_LINKED_EVENT_FAILED)
        if self.fatal != FATAL_NONE:
            self._abort_batch()
            self.broken = True
            raise (MemoryError() if self.fatal == FATAL_NO_MEMORY
                   else CorruptionError("a transfer in the id index is missing from the log"))
        self.last_process_ns = monotonic_ns() - started_ns
        started_ns = monotonic_ns()
        try:
            rc = 0
            if not failed:
                rc = self._append_accounts(accounts_before)
                if not rc:
                    kept = self.gather_ok(self.batch_stored, sizeof(Transfer), rt, n_transfers)
                    if kept:
                        rc = self.append_block(self.dbi_transfers, self.batch_stored, sizeof(Transfer), kept,
                                               self.batch_stored[kept - 1].timestamp)
            if not rc and self.events_count:
                rc = self.append_block(self.dbi_events, self.events_out, sizeof(LogEvent), self.events_count,
                                       self.events_out[self.events_count - 1].timestamp)
            if rc:
                raise _lmdb_error(rc, "appending to the ledger log")
            if not failed:
                self._kv_write(kv)
            self.last_write_ns = monotonic_ns() - started_ns
            started_ns = monotonic_ns()
            with nogil:
                rc = mdb_txn_commit(txn)
            self.last_commit_ns = monotonic_ns() - started_ns
            self.txn = NULL
            if rc:
                raise _lmdb_error(rc, "committing a batch")
        except BaseException:
            self._abort_batch()
            self.broken = True
            raise
        self.last_timestamp = clock
        self.batch_count = 0
        return account_results, change_results, transfer_results

    cdef int _append_accounts(self, uint64_t first_index) noexcept:
        """Append the accounts this batch created: they sit at the end of the account array, in order,
        with their timestamps and creation flags (a freeze in the same batch is logged as an event)."""
        cdef uint64_t kept = self.accounts_count - first_index
        cdef uint64_t i
        cdef Account *created
        cdef int rc
        if kept == 0:
            return 0
        created = <Account*>malloc(kept * sizeof(Account))
        if created == NULL:
            return -1
        memcpy(created, &self.accounts[first_index], kept * sizeof(Account))
        for i in range(kept):
            created[i].flags &= ~(ACCOUNT_FROZEN | ACCOUNT_CLOSED)
        rc = self.append_block(self.dbi_accounts, created, sizeof(Account), kept, created[kept - 1].timestamp)
        free(created)
        return rc

    cdef void _abort_batch(self):
        if self.txn != NULL:
            mdb_txn_abort(self.txn)
            self.txn = NULL
        self.batch_count = 0

    # -----------------------------------------------------------------------------------------------
    # Key-value tables that live beside the log (the registry, configuration): same environment, same
    # transaction as a batch, so a state change and its ledger side effect commit together.

    cdef MDB_dbi _kv_dbi(self, str name) except? 0:
        cdef MDB_dbi dbi
        cdef MDB_txn *txn = NULL
        cdef int rc
        if name in self.kv_dbis:
            return self.kv_dbis[name]
        if not name or name in ("accounts", "transfers", "events"):
            raise ValueError(f"{name!r} is not a key-value table name")
        if self.txn != NULL:
            raise LedgerError("key-value tables must be opened outside a batch")
        rc = mdb_txn_begin(self.env, NULL, 0, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        rc = mdb_dbi_open(txn, ("kv:" + name).encode(), MDB_CREATE, &dbi)
        if rc:
            mdb_txn_abort(txn)
            raise _lmdb_error(rc, f"opening table {name}")
        rc = mdb_txn_commit(txn)
        if rc:
            raise _lmdb_error(rc, f"opening table {name}")
        self.kv_dbis[name] = dbi
        return dbi

    def open_table(self, str name not None):
        self._kv_dbi(name)

    cdef void _kv_write(self, list kv) except *:
        cdef MDB_val key, data
        cdef const unsigned char[::1] key_view
        cdef const unsigned char[::1] value_view
        cdef int rc
        for dbi, key_bytes, value in kv:
            key_view = key_bytes
            if len(key_bytes) == 0 or len(key_bytes) > 511:
                raise ValueError("a key must be 1 to 511 bytes")
            key.mv_size = len(key_bytes)
            key.mv_data = <void*>&key_view[0]
            if value is None:
                rc = mdb_del(self.txn, <MDB_dbi>dbi, &key, NULL)
                if rc == MDB_NOTFOUND:
                    rc = 0
            else:
                data.mv_size = len(value)
                if len(value):
                    value_view = value
                    data.mv_data = <void*>&value_view[0]
                else:
                    data.mv_data = NULL
                rc = mdb_put(self.txn, <MDB_dbi>dbi, &key, &data, 0)
            if rc:
                raise _lmdb_error(rc, "writing a table row")

    def kv_get(self, str table not None, bytes key not None):
        cdef MDB_dbi dbi = self._kv_dbi(table)
        cdef MDB_txn *txn = NULL
        cdef MDB_val k, v
        cdef int rc
        if not key:
            raise ValueError("a key must not be empty")
        rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        k.mv_size = len(key)
        k.mv_data = <char*>key
        rc = mdb_get(txn, dbi, &k, &v)
        result = None
        if rc == 0:
            result = PyBytes_FromStringAndSize(<char*>v.mv_data, v.mv_size)
        mdb_txn_abort(txn)
        if rc and rc != MDB_NOTFOUND:
            raise _lmdb_error(rc, f"reading table {table}")
        return result

    def kv_scan(self, str table not None, bytes start=b"", bytes stop=None, Py_ssize_t limit=-1):
        """Rows with start <= key < stop, in key order, as a list of (key, value)."""
        cdef MDB_dbi dbi = self._kv_dbi(table)
        cdef MDB_txn *txn = NULL
        cdef MDB_cursor *cursor = NULL
        cdef MDB_val k, v
        cdef int rc
        rows = []
        rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        try:
            rc = mdb_cursor_open(txn, dbi, &cursor)
            if rc:
                raise _lmdb_error(rc, "mdb_cursor_open")
            if start:
                k.mv_size = len(start)
                k.mv_data = <char*>start
                rc = mdb_cursor_get(cursor, &k, &v, MDB_SET_RANGE)
            else:
                rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
            while rc == 0 and (limit < 0 or len(rows) < limit):
                key = PyBytes_FromStringAndSize(<char*>k.mv_data, k.mv_size)
                if stop is not None and key >= stop:
                    break
                rows.append((key, PyBytes_FromStringAndSize(<char*>v.mv_data, v.mv_size)))
                rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
            if rc and rc != MDB_NOTFOUND:
                raise _lmdb_error(rc, f"scanning table {table}")
        finally:
            if cursor != NULL:
                mdb_cursor_close(cursor)
            mdb_txn_abort(txn)
        return rows

    # -----------------------------------------------------------------------------------------------
    # Replay: rebuild the state from the log.

    cdef void _replay(self) except *:
        cdef MDB_txn *txn = NULL
        cdef int rc
        rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        try:
            # Size the indexes and the account array for what the log holds, so loading never rehashes.
            accounts_max = self._records_at_most(txn, self.dbi_accounts, sizeof(Account))
            if (idmap_reserve(&self.account_index, accounts_max) != 0
                    or idmap_reserve(&self.transfer_index, self._records_at_most(txn, self.dbi_transfers, sizeof(Transfer))) != 0
                    or self.reserve_accounts(accounts_max) != 0):
                raise MemoryError()
            self._replay_accounts(txn)
            self._replay_transfers(txn)
            self._replay_events(txn)
        finally:
            mdb_txn_abort(txn)
        self._check_invariants()

    cdef uint64_t _records_at_most(self, MDB_txn *txn, MDB_dbi dbi, size_t record_size) except? 0:
        """An upper bound of the records in a log: its pages' bytes over the record size."""
        cdef MDB_stat stat
        cdef int rc = mdb_stat(txn, dbi, &stat)
        if rc:
            raise _lmdb_error(rc, "mdb_stat")
        return (stat.ms_leaf_pages + stat.ms_overflow_pages) * stat.ms_psize // record_size + 1

    cdef void _replay_accounts(self, MDB_txn *txn) except *:
        cdef LogReader reader = LogReader(<size_t>txn, self.dbi_accounts, sizeof(Account), "accounts")
        cdef Account *block
        cdef uint64_t i
        try:
            while reader.next_block():
                block = <Account*>reader.records
                if self.reserve_accounts(reader.count) != 0:
                    raise MemoryError()
                for i in range(reader.count):
                    reader.check_order(block[i].timestamp)
                    if idmap_find(&self.account_index, block[i].id) != NULL:
                        raise CorruptionError("the accounts log repeats an id")
                    if idmap_insert(&self.account_index, block[i].id, self.accounts_count, 0) != 0:
                        raise MemoryError()
                    self.accounts[self.accounts_count] = block[i]
                    self.accounts_count += 1
        finally:
            reader.close()
        self.last_timestamp = max(self.last_timestamp, reader.last_timestamp)

    cdef void _replay_transfers(self, MDB_txn *txn) except *:
        cdef LogReader reader = LogReader(<size_t>txn, self.dbi_transfers, sizeof(Transfer), "transfers")
        cdef Transfer *block
        cdef uint64_t i
        try:
            while reader.next_block():
                block = <Transfer*>reader.records
                for i in range(reader.count):
                    reader.check_order(block[i].timestamp)
                    self._replay_transfer(txn, &block[i])
        finally:
            reader.close()
        self.last_timestamp = max(self.last_timestamp, reader.last_timestamp)

    cdef void _replay_transfer(self, MDB_txn *txn, Transfer *t) except *:
        """Apply a stored transfer's effect. It was checked when booked; here only the log's integrity is."""
        cdef Slot *ds = idmap_find(&self.account_index, t.debit_account_id)
        cdef Slot *cs = idmap_find(&self.account_index, t.credit_account_id)
        cdef Slot *ps
        cdef Account *d
        cdef Account *c
        cdef Transfer p
        if ds == NULL or cs == NULL or idmap_find(&self.transfer_index, t.id) != NULL:
            raise CorruptionError("a logged transfer names an unknown account or repeats an id")
        d = &self.accounts[ds.a]
        c = &self.accounts[cs.a]
        if idmap_insert(&self.transfer_index, t.id, t.timestamp, PENDING_STATE_PENDING) != 0:
            raise MemoryError()
        if t.flags & (TRANSFER_POST_PENDING | TRANSFER_VOID_PENDING):
            ps = idmap_find(&self.transfer_index, t.pending_id)
            if ps == NULL or self.load_transfer(txn, ps.a, &p) != 0:
                raise CorruptionError("a logged post or void names a missing pending transfer")
            d.debits_pending -= p.amount
            c.credits_pending -= p.amount
            if t.flags & TRANSFER_POST_PENDING:
                d.debits_posted += t.amount
                c.credits_posted += t.amount
                ps.b = PENDING_STATE_POSTED
            else:
                ps.b = PENDING_STATE_VOIDED
        elif t.flags & TRANSFER_PENDING:
            d.debits_pending += t.amount
            c.credits_pending += t.amount
            if t.timeout and self.heap_push(t.timestamp + <uint64_t>t.timeout * NS_PER_S, t.timestamp, t.id) != 0:
                raise MemoryError()
        else:
            d.debits_posted += t.amount
            c.credits_posted += t.amount
            if not u128_is_zero(t.ref_id):
                ps = idmap_find(&self.transfer_index, t.ref_id)
                if ps == NULL:
                    raise CorruptionError("a logged refund names a missing original")
                ps.b += t.amount

    cdef void _replay_events(self, MDB_txn *txn) except *:
        # Events commute with transfers for balances (sums) and hold states (an expiry follows its
        # pending transfer and excludes a post or void), so replaying them after the transfers is exact.
        cdef LogReader reader = LogReader(<size_t>txn, self.dbi_events, sizeof(LogEvent), "events")
        cdef LogEvent *block
        cdef uint64_t i
        cdef Slot *s
        cdef Transfer p
        try:
            while reader.next_block():
                block = <LogEvent*>reader.records
                for i in range(reader.count):
                    reader.check_order(block[i].timestamp)
                    if block[i].kind == EVENT_EXPIRE:
                        s = idmap_find(&self.transfer_index, block[i].id)
                        if s == NULL or self.load_transfer(txn, s.a, &p) != 0 or s.b != PENDING_STATE_PENDING:
                            raise CorruptionError("a logged expiry names a transfer that is not pending")
                        self.release_pending(&p)
                        s.b = PENDING_STATE_EXPIRED
                    else:
                        s = idmap_find(&self.account_index, block[i].id)
                        if s == NULL or block[i].kind < CHANGE_FREEZE or block[i].kind > CHANGE_CLOSE:
                            raise CorruptionError("a logged account change names an unknown account or action")
                        apply_change(&self.accounts[s.a], block[i].kind)
        finally:
            reader.close()
        self.last_timestamp = max(self.last_timestamp, reader.last_timestamp)

    cdef void _check_invariants(self) except *:
        totals = self.totals()
        for ledger, (debits_pending, debits_posted, credits_pending, credits_posted) in totals.items():
            if debits_posted != credits_posted or debits_pending != credits_pending:
                raise CorruptionError(
                    f"ledger {ledger}: debits {debits_posted}+{debits_pending} pending != "
                    f"credits {credits_posted}+{credits_pending} pending")

    # -----------------------------------------------------------------------------------------------
    # Queries

    def totals(self):
        """Per ledger: (debits_pending, debits_posted, credits_pending, credits_posted), exact ints."""
        cdef uint64_t i
        cdef uint32_t k, slot
        cdef uint32_t ledgers[256]
        cdef u128_t sums[256][4]
        cdef uint32_t count = 0
        cdef Account *a
        memset(sums, 0, sizeof(sums))
        for i in range(self.accounts_count):
            a = &self.accounts[i]
            slot = count
            for k in range(count):
                if ledgers[k] == a.ledger:
                    slot = k
                    break
            if slot == count:
                if count == 256:
                    raise LedgerError("more than 256 ledgers")
                ledgers[count] = a.ledger
                count += 1
            sums[slot][0] += a.debits_pending
            sums[slot][1] += a.debits_posted
            sums[slot][2] += a.credits_pending
            sums[slot][3] += a.credits_posted
        return {ledgers[k]: tuple(u128_sum_to_py(sums[k][j]) for j in range(4)) for k in range(count)}

    def lookup_accounts(self, object ids not None):
        """Accounts for the given ids ((n, 2) uint64 array); ids not found are left out."""
        cdef uint64_t[:, ::1] view = np.ascontiguousarray(ids, dtype=np.uint64).reshape(-1, 2)
        cdef Py_ssize_t i, n = view.shape[0], found = 0
        cdef U128 key
        cdef Slot *s
        out = np.zeros(n, dtype=_records.ACCOUNT_DTYPE)
        cdef Account *dest = <Account*><size_t>out.ctypes.data
        for i in range(n):
            key.lo = view[i, 0]
            key.hi = view[i, 1]
            s = idmap_find(&self.account_index, key)
            if s != NULL:
                dest[found] = self.accounts[s.a]
                found += 1
        return out[:found].copy()

    def lookup_transfers(self, object ids not None):
        """Transfers for the given ids, as stored (post/void with their resolved fields)."""
        cdef uint64_t[:, ::1] view = np.ascontiguousarray(ids, dtype=np.uint64).reshape(-1, 2)
        cdef Py_ssize_t i, n = view.shape[0], found = 0
        cdef U128 key
        cdef Slot *s
        cdef MDB_txn *txn = NULL
        out = np.zeros(n, dtype=_records.TRANSFER_DTYPE)
        cdef Transfer *dest = <Transfer*><size_t>out.ctypes.data
        cdef int rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        try:
            for i in range(n):
                key.lo = view[i, 0]
                key.hi = view[i, 1]
                s = idmap_find(&self.transfer_index, key)
                if s != NULL:
                    if self.load_transfer(txn, s.a, &dest[found]) != 0:
                        raise CorruptionError("a transfer in the id index is missing from the log")
                    found += 1
        finally:
            mdb_txn_abort(txn)
        return out[:found].copy()

    def pending_state(self, object pending_id):
        """0 pending, 1 posted, 2 voided, 3 expired; None if no such transfer."""
        cdef U128 key
        u128_from_py(pending_id, &key)
        cdef Slot *s = idmap_find(&self.transfer_index, key)
        return None if s == NULL else s.b

    def refunded(self, object transfer_id):
        cdef U128 key
        u128_from_py(transfer_id, &key)
        cdef Slot *s = idmap_find(&self.transfer_index, key)
        return None if s == NULL else s.b

    def scan_transfers(self, object account_id, uint64_t timestamp_min, uint64_t timestamp_max,
                       Py_ssize_t limit):
        """Stored transfers in [timestamp_min, timestamp_max] in time order, touching `account_id` when
        it is not None, at most `limit` of them. Cost: a sequential read of that stretch of the log."""
        cdef U128 key
        cdef bint filtered = account_id is not None
        cdef MDB_txn *txn = NULL
        cdef MDB_cursor *cursor = NULL
        cdef MDB_val k, v
        cdef uint64_t start_be = be64(timestamp_min)
        cdef Transfer *block
        cdef uint64_t i, n
        cdef Py_ssize_t found = 0
        cdef int rc
        if filtered:
            u128_from_py(account_id, &key)
        out = np.zeros(max(limit, 0), dtype=_records.TRANSFER_DTYPE)
        cdef Transfer *dest = <Transfer*><size_t>out.ctypes.data
        rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        rc = mdb_cursor_open(txn, self.dbi_transfers, &cursor)
        if rc:
            mdb_txn_abort(txn)
            raise _lmdb_error(rc, "mdb_cursor_open")
        k.mv_size = 8
        k.mv_data = &start_be
        rc = mdb_cursor_get(cursor, &k, &v, MDB_SET_RANGE)
        with nogil:
            while rc == 0 and found < limit:
                block = <Transfer*>v.mv_data
                n = v.mv_size // sizeof(Transfer)
                if n and block[0].timestamp > timestamp_max:
                    break
                for i in range(n):
                    if block[i].timestamp < timestamp_min:
                        continue
                    if block[i].timestamp > timestamp_max or found == limit:
                        break
                    if (not filtered or u128_eq(block[i].debit_account_id, key)
                            or u128_eq(block[i].credit_account_id, key)):
                        dest[found] = block[i]
                        found += 1
                rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        mdb_cursor_close(cursor)
        mdb_txn_abort(txn)
        if rc and rc != MDB_NOTFOUND:
            raise _lmdb_error(rc, "reading the transfers log")
        return out[:found].copy()

    def scan_events(self, uint64_t timestamp_max):
        """Logged account changes and expiries up to a time: a list of (timestamp, kind, id)."""
        cdef MDB_txn *txn = NULL
        cdef LogReader reader
        cdef LogEvent *block
        cdef uint64_t i
        cdef int rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _lmdb_error(rc, "mdb_txn_begin")
        rows = []
        try:
            reader = LogReader(<size_t>txn, self.dbi_events, sizeof(LogEvent), "events")
            try:
                while reader.next_block():
                    block = <LogEvent*>reader.records
                    if block[0].timestamp > timestamp_max:
                        break
                    for i in range(reader.count):
                        if block[i].timestamp <= timestamp_max:
                            rows.append((block[i].timestamp, block[i].kind, u128_to_py(block[i].id)))
            finally:
                reader.close()
        finally:
            mdb_txn_abort(txn)
        return rows

    def stats(self):
        cdef MDB_envinfo info
        mdb_env_info(self.env, &info)
        return {
            "accounts": self.accounts_count,
            "transfers": self.transfer_index.count,
            "pending_timeouts_queued": self.heap_count,
            "last_timestamp": self.last_timestamp,
            "last_batch_process_ns": self.last_process_ns,
            "last_batch_write_ns": self.last_write_ns,
            "last_batch_commit_ns": self.last_commit_ns,
            "map_size_bytes": info.me_mapsize,
            "map_used_bytes": (info.me_last_pgno + 1) * 4096,
        }


cdef inline void mark_rolled_back(Result *results, uint64_t n, uint32_t status) noexcept nogil:
    cdef uint64_t i
    for i in range(n):
        if results[i].status == 0:
            results[i].status = status
            results[i].timestamp = 0


cdef inline void apply_change(Account *a, uint32_t action) noexcept nogil:
    if action == CHANGE_FREEZE:
        a.flags |= ACCOUNT_FROZEN
    elif action == CHANGE_UNFREEZE:
        a.flags &= ~ACCOUNT_FROZEN
    elif action == CHANGE_CLOSE:
        a.flags |= ACCOUNT_CLOSED


def constants():
    """The numbers compiled into this module, for the test that pins them to core/records.py."""
    return {
        "BATCH_EVENTS_MAX": BATCH_EVENTS_MAX,
        "AccountFlags": {"LINKED": ACCOUNT_LINKED, "DEBITS_MUST_NOT_EXCEED_CREDITS": ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                         "CREDITS_MUST_NOT_EXCEED_DEBITS": ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS,
                         "FROZEN": ACCOUNT_FROZEN, "CLOSED": ACCOUNT_CLOSED},
        "TransferFlags": {"LINKED": TRANSFER_LINKED, "PENDING": TRANSFER_PENDING,
                          "POST_PENDING_TRANSFER": TRANSFER_POST_PENDING, "VOID_PENDING_TRANSFER": TRANSFER_VOID_PENDING},
        "ChangeAction": {"FREEZE": CHANGE_FREEZE, "UNFREEZE": CHANGE_UNFREEZE, "CLOSE": CHANGE_CLOSE},
        "AccountResult": {"OK": AR_OK, "EXISTS": AR_EXISTS,
                          "KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS": AR_KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS},
        "TransferResult": {"OK": TR_OK, "EXISTS": TR_EXISTS, "MOVEMENT_NOT_ALLOWED": TR_MOVEMENT_NOT_ALLOWED,
                           "EXCEEDS_DEBITS": TR_EXCEEDS_DEBITS},
        "ChangeResult": {"OK": CR_OK, "ACCOUNT_NOT_FROZEN": CR_ACCOUNT_NOT_FROZEN},
        "sizes": {"Account": sizeof(Account), "Transfer": sizeof(Transfer), "Result": sizeof(Result),
                  "Change": sizeof(Change), "Movement": sizeof(Movement), "LogEvent": sizeof(LogEvent)},
    }
