# C-level declarations of the compiled settlement core. Values mirror core/records.py, which is the
# single source of the numbers; tests/core/test_records.py pins that they agree.

from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    typedef unsigned __int128 citycard_u128_t;
    """
    ctypedef unsigned long long u128_t "citycard_u128_t"

ctypedef struct U128:
    uint64_t lo
    uint64_t hi

ctypedef struct Account:            # 128 bytes, records.ACCOUNT_DTYPE
    U128 id
    uint64_t debits_pending
    uint64_t debits_posted
    uint64_t credits_pending
    uint64_t credits_posted
    U128 owner
    uint64_t user_data
    uint64_t timestamp
    uint32_t ledger
    uint16_t code
    uint16_t flags
    unsigned char reserved[40]

ctypedef struct Transfer:           # 128 bytes, records.TRANSFER_DTYPE
    U128 id
    U128 debit_account_id
    U128 credit_account_id
    U128 pending_id
    U128 ref_id
    U128 user_data
    uint64_t amount
    uint64_t timestamp
    uint32_t timeout
    uint32_t ledger
    uint16_t code
    uint16_t flags
    uint32_t reserved

ctypedef struct Result:             # 16 bytes, records.RESULT_DTYPE
    uint64_t timestamp
    uint32_t status
    uint32_t reserved

ctypedef struct Change:             # 24 bytes, records.CHANGE_DTYPE
    U128 account_id
    uint32_t action
    uint32_t reserved

ctypedef struct LogEvent:           # 32 bytes: what the events log stores (changes and expiries)
    U128 id
    uint64_t timestamp
    uint32_t kind
    uint32_t reserved

ctypedef struct Movement:           # 12 bytes, records.MOVEMENT_DTYPE
    uint32_t ledger
    uint16_t code
    uint16_t debit_kind
    uint16_t credit_kind
    uint16_t refund_of

cdef enum:
    BATCH_EVENTS_MAX = 8189

    ACCOUNT_LINKED = 1
    ACCOUNT_DEBITS_MUST_NOT_EXCEED_CREDITS = 2
    ACCOUNT_CREDITS_MUST_NOT_EXCEED_DEBITS = 4
    ACCOUNT_FROZEN = 8
    ACCOUNT_CLOSED = 16

    TRANSFER_LINKED = 1
    TRANSFER_PENDING = 2
    TRANSFER_POST_PENDING = 4
    TRANSFER_VOID_PENDING = 8

    CHANGE_FREEZE = 1
    CHANGE_UNFREEZE = 2
    CHANGE_CLOSE = 3
    EVENT_EXPIRE = 4               # log-only: a pending transfer reached its timeout

    # What a pending transfer's slot in the id index says about it.
    PENDING_STATE_PENDING = 0
    PENDING_STATE_POSTED = 1
    PENDING_STATE_VOIDED = 2
    PENDING_STATE_EXPIRED = 3

cdef enum AccountResult:
    AR_OK = 0
    AR_LINKED_EVENT_FAILED = 1
    AR_LINKED_EVENT_CHAIN_OPEN = 2
    AR_TIMESTAMP_MUST_BE_ZERO = 3
    AR_RESERVED_FIELD = 4
    AR_ID_MUST_NOT_BE_ZERO = 5
    AR_ID_MUST_NOT_BE_INT_MAX = 6
    AR_FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    AR_BALANCES_MUST_BE_ZERO = 8
    AR_LEDGER_MUST_NOT_BE_ZERO = 9
    AR_CODE_MUST_NOT_BE_ZERO = 10
    AR_EXISTS_WITH_DIFFERENT_FLAGS = 11
    AR_EXISTS_WITH_DIFFERENT_OWNER = 12
    AR_EXISTS_WITH_DIFFERENT_USER_DATA = 13
    AR_EXISTS_WITH_DIFFERENT_LEDGER = 14
    AR_EXISTS_WITH_DIFFERENT_CODE = 15
    AR_EXISTS = 16
    AR_LEDGER_NOT_REGISTERED = 17
    AR_KIND_NOT_ALLOWED_ON_LEDGER = 18
    AR_KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS = 19

cdef enum TransferResult:
    TR_OK = 0
    TR_LINKED_EVENT_FAILED = 1
    TR_LINKED_EVENT_CHAIN_OPEN = 2
    TR_TIMESTAMP_MUST_BE_ZERO = 3
    TR_RESERVED_FIELD = 4
    TR_ID_MUST_NOT_BE_ZERO = 5
    TR_ID_MUST_NOT_BE_INT_MAX = 6
    TR_FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    TR_PENDING_ID_MUST_NOT_BE_ZERO = 8
    TR_PENDING_ID_MUST_BE_DIFFERENT = 9
    TR_PENDING_ID_MUST_BE_ZERO = 10
    TR_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 11
    TR_REF_ID_MUST_BE_ZERO_ON_POST_OR_VOID = 12
    TR_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 13
    TR_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 14
    TR_ACCOUNTS_MUST_BE_DIFFERENT = 15
    TR_LEDGER_MUST_NOT_BE_ZERO = 16
    TR_CODE_MUST_NOT_BE_ZERO = 17
    TR_AMOUNT_MUST_NOT_BE_ZERO = 18
    TR_EXISTS_WITH_DIFFERENT_FLAGS = 19
    TR_EXISTS_WITH_DIFFERENT_PENDING_ID = 20
    TR_EXISTS_WITH_DIFFERENT_TIMEOUT = 21
    TR_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = 22
    TR_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = 23
    TR_EXISTS_WITH_DIFFERENT_AMOUNT = 24
    TR_EXISTS_WITH_DIFFERENT_REF_ID = 25
    TR_EXISTS_WITH_DIFFERENT_USER_DATA = 26
    TR_EXISTS_WITH_DIFFERENT_LEDGER = 27
    TR_EXISTS_WITH_DIFFERENT_CODE = 28
    TR_EXISTS = 29
    TR_DEBIT_ACCOUNT_NOT_FOUND = 30
    TR_CREDIT_ACCOUNT_NOT_FOUND = 31
    TR_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER = 32
    TR_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS = 33
    TR_DEBIT_ACCOUNT_CLOSED = 34
    TR_CREDIT_ACCOUNT_CLOSED = 35
    TR_DEBIT_ACCOUNT_FROZEN = 36
    TR_MOVEMENT_NOT_ALLOWED = 37
    TR_REFUND_MUST_NOT_BE_PENDING = 38
    TR_REF_ID_MUST_BE_ZERO = 39
    TR_REF_ID_MUST_NOT_BE_ZERO = 40
    TR_REF_TRANSFER_NOT_FOUND = 41
    TR_REF_TRANSFER_NOT_REFUNDABLE = 42
    TR_REF_TRANSFER_HAS_DIFFERENT_ACCOUNTS = 43
    TR_EXCEEDS_REFUNDABLE_AMOUNT = 44
    TR_PENDING_TRANSFER_NOT_FOUND = 45
    TR_PENDING_TRANSFER_NOT_PENDING = 46
    TR_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID = 47
    TR_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID = 48
    TR_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER = 49
    TR_PENDING_TRANSFER_HAS_DIFFERENT_CODE = 50
    TR_PENDING_TRANSFER_ALREADY_POSTED = 51
    TR_PENDING_TRANSFER_ALREADY_VOIDED = 52
    TR_PENDING_TRANSFER_EXPIRED = 53
    TR_EXCEEDS_PENDING_TRANSFER_AMOUNT = 54
    TR_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 55
    TR_OVERFLOWS_DEBITS_PENDING = 56
    TR_OVERFLOWS_CREDITS_PENDING = 57
    TR_OVERFLOWS_DEBITS_POSTED = 58
    TR_OVERFLOWS_CREDITS_POSTED = 59
    TR_OVERFLOWS_DEBITS = 60
    TR_OVERFLOWS_CREDITS = 61
    TR_OVERFLOWS_TIMEOUT = 62
    TR_EXCEEDS_CREDITS = 63
    TR_EXCEEDS_DEBITS = 64

cdef enum ChangeResult:
    CR_OK = 0
    CR_ACCOUNT_NOT_FOUND = 1
    CR_ACTION_UNKNOWN = 2
    CR_RESERVED_FIELD = 3
    CR_ACCOUNT_CLOSED = 4
    CR_ACCOUNT_ALREADY_FROZEN = 5
    CR_ACCOUNT_NOT_FROZEN = 6
    CR_LINKED_EVENT_FAILED = 7

# The id index: open addressing over u128 keys (zero is the empty marker: ids are never zero).
ctypedef struct Slot:
    U128 key
    uint64_t a          # accounts: index into the account array; transfers: timestamp
    uint64_t b          # transfers: pending state, or the amount refunded so far

ctypedef struct IdMap:
    Slot *slots
    uint64_t mask
    uint64_t count

ctypedef struct Undo:
    uint32_t kind
    uint32_t index
    U128 key
    uint64_t saved[4]
    uint64_t saved_b
    uint16_t saved_flags

ctypedef struct Expiry:
    uint64_t expires_at
    uint64_t timestamp
    U128 id
