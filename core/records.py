"""The ledger's vocabulary: record layouts, flags, result codes, ledgers, account kinds, movements.

This module is the single source of the numbers. The compiled core (`_ledger.pyx`) declares the same
values as C enums in `_ledger.pxd`; `tests/core/test_records.py` pins that both agree. The table of
allowed movements is data, defined here once and handed to the compiled core and to the reference
model alike, so both check exactly the same rules.

Records are fixed 128-byte little-endian structs (TigerBeetle's model, adapted):
ids and references are u128 held as two u64 words ``[lo, hi]``; money is u64 fen.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACCOUNT_DTYPE", "TRANSFER_DTYPE", "RESULT_DTYPE", "CHANGE_DTYPE",
    "BATCH_EVENTS_MAX", "AMOUNT_MAX", "ID_MAX",
    "AccountFlags", "TransferFlags", "AccountResult", "TransferResult", "ChangeResult", "ChangeAction",
    "LedgerId", "AccountKind", "TransferCode", "Movement", "BUILTIN_MOVEMENTS", "HOME_LEDGER_OF_KIND",
    "movements_array", "MOVEMENT_DTYPE",
]

# TigerBeetle's limit: 1 MiB message minus header, over 128-byte events.
BATCH_EVENTS_MAX = 8189
AMOUNT_MAX = 2**64 - 1  # a balance may not exceed it either; overflow is a result code, never a wrap
ID_MAX = 2**128 - 1  # reserved, like zero

_U128 = ("<u8", (2,))

ACCOUNT_DTYPE = np.dtype(
    [
        ("id", _U128),
        ("debits_pending", "<u8"),
        ("debits_posted", "<u8"),
        ("credits_pending", "<u8"),
        ("credits_posted", "<u8"),
        ("owner", _U128),  # owner reference: the person (medical) or card (purse) in the registry
        ("user_data", "<u8"),
        ("timestamp", "<u8"),  # set by the ledger
        ("ledger", "<u4"),
        ("code", "<u2"),  # AccountKind
        ("flags", "<u2"),
        ("reserved", "V40"),
    ],
    align=False,
)

TRANSFER_DTYPE = np.dtype(
    [
        ("id", _U128),
        ("debit_account_id", _U128),
        ("credit_account_id", _U128),
        ("pending_id", _U128),  # the pending transfer a post or void resolves
        ("ref_id", _U128),  # the original transfer a refund reverses
        ("user_data", _U128),  # terminal or merchant reference
        ("amount", "<u8"),  # fen
        ("timestamp", "<u8"),  # set by the ledger, strictly increasing
        ("timeout", "<u4"),  # seconds, pending transfers only
        ("ledger", "<u4"),
        ("code", "<u2"),  # TransferCode
        ("flags", "<u2"),
        ("reserved", "<u4"),
    ],
    align=False,
)

# One result per event, dense: the event's timestamp (or the original's for `exists`) and its status.
RESULT_DTYPE = np.dtype([("timestamp", "<u8"), ("status", "<u4"), ("reserved", "<u4")])

# Account state changes (the card lifecycle freezes and closes accounts), also logged and replayed.
CHANGE_DTYPE = np.dtype([("account_id", _U128), ("action", "<u4"), ("reserved", "<u4")])

for _dtype, _size in ((ACCOUNT_DTYPE, 128), (TRANSFER_DTYPE, 128), (RESULT_DTYPE, 16), (CHANGE_DTYPE, 24)):
    if _dtype.itemsize != _size:  # explicit: layouts are a contract with the compiled core and the disk
        raise ImportError(f"record layout drifted: {_dtype.itemsize} != {_size}")


class AccountFlags(enum.IntFlag):
    LINKED = 1 << 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1 << 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 1 << 2
    FROZEN = 1 << 3  # no debits (the lifecycle's written loss report); credits still arrive
    CLOSED = 1 << 4  # nothing moves any more, except voids of holds made before


class TransferFlags(enum.IntFlag):
    LINKED = 1 << 0
    PENDING = 1 << 1
    POST_PENDING_TRANSFER = 1 << 2
    VOID_PENDING_TRANSFER = 1 << 3


class ChangeAction(enum.IntEnum):
    FREEZE = 1
    UNFREEZE = 2
    CLOSE = 3


class AccountResult(enum.IntEnum):
    """Result of creating one account, in order of precedence (the first that applies is returned)."""

    OK = 0
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    TIMESTAMP_MUST_BE_ZERO = 3
    RESERVED_FIELD = 4
    ID_MUST_NOT_BE_ZERO = 5
    ID_MUST_NOT_BE_INT_MAX = 6
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    BALANCES_MUST_BE_ZERO = 8
    LEDGER_MUST_NOT_BE_ZERO = 9
    CODE_MUST_NOT_BE_ZERO = 10
    EXISTS_WITH_DIFFERENT_FLAGS = 11
    EXISTS_WITH_DIFFERENT_OWNER = 12
    EXISTS_WITH_DIFFERENT_USER_DATA = 13
    EXISTS_WITH_DIFFERENT_LEDGER = 14
    EXISTS_WITH_DIFFERENT_CODE = 15
    EXISTS = 16
    LEDGER_NOT_REGISTERED = 17
    KIND_NOT_ALLOWED_ON_LEDGER = 18
    KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS = 19


class TransferResult(enum.IntEnum):
    """Result of one transfer, in order of precedence (the first that applies is returned)."""

    OK = 0
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    TIMESTAMP_MUST_BE_ZERO = 3
    RESERVED_FIELD = 4
    ID_MUST_NOT_BE_ZERO = 5
    ID_MUST_NOT_BE_INT_MAX = 6
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    PENDING_ID_MUST_NOT_BE_ZERO = 8
    PENDING_ID_MUST_BE_DIFFERENT = 9
    PENDING_ID_MUST_BE_ZERO = 10
    TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 11
    REF_ID_MUST_BE_ZERO_ON_POST_OR_VOID = 12
    DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 13
    CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 14
    ACCOUNTS_MUST_BE_DIFFERENT = 15
    LEDGER_MUST_NOT_BE_ZERO = 16
    CODE_MUST_NOT_BE_ZERO = 17
    AMOUNT_MUST_NOT_BE_ZERO = 18
    EXISTS_WITH_DIFFERENT_FLAGS = 19
    EXISTS_WITH_DIFFERENT_PENDING_ID = 20
    EXISTS_WITH_DIFFERENT_TIMEOUT = 21
    EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = 22
    EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = 23
    EXISTS_WITH_DIFFERENT_AMOUNT = 24
    EXISTS_WITH_DIFFERENT_REF_ID = 25
    EXISTS_WITH_DIFFERENT_USER_DATA = 26
    EXISTS_WITH_DIFFERENT_LEDGER = 27
    EXISTS_WITH_DIFFERENT_CODE = 28
    EXISTS = 29
    DEBIT_ACCOUNT_NOT_FOUND = 30
    CREDIT_ACCOUNT_NOT_FOUND = 31
    ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER = 32
    TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS = 33
    DEBIT_ACCOUNT_CLOSED = 34
    CREDIT_ACCOUNT_CLOSED = 35
    DEBIT_ACCOUNT_FROZEN = 36
    MOVEMENT_NOT_ALLOWED = 37
    REFUND_MUST_NOT_BE_PENDING = 38
    REF_ID_MUST_BE_ZERO = 39
    REF_ID_MUST_NOT_BE_ZERO = 40
    REF_TRANSFER_NOT_FOUND = 41
    REF_TRANSFER_NOT_REFUNDABLE = 42
    REF_TRANSFER_HAS_DIFFERENT_ACCOUNTS = 43
    EXCEEDS_REFUNDABLE_AMOUNT = 44
    PENDING_TRANSFER_NOT_FOUND = 45
    PENDING_TRANSFER_NOT_PENDING = 46
    PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID = 47
    PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID = 48
    PENDING_TRANSFER_HAS_DIFFERENT_LEDGER = 49
    PENDING_TRANSFER_HAS_DIFFERENT_CODE = 50
    PENDING_TRANSFER_ALREADY_POSTED = 51
    PENDING_TRANSFER_ALREADY_VOIDED = 52
    PENDING_TRANSFER_EXPIRED = 53
    EXCEEDS_PENDING_TRANSFER_AMOUNT = 54
    PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 55
    OVERFLOWS_DEBITS_PENDING = 56
    OVERFLOWS_CREDITS_PENDING = 57
    OVERFLOWS_DEBITS_POSTED = 58
    OVERFLOWS_CREDITS_POSTED = 59
    OVERFLOWS_DEBITS = 60
    OVERFLOWS_CREDITS = 61
    OVERFLOWS_TIMEOUT = 62
    EXCEEDS_CREDITS = 63
    EXCEEDS_DEBITS = 64


class ChangeResult(enum.IntEnum):
    OK = 0
    ACCOUNT_NOT_FOUND = 1
    ACTION_UNKNOWN = 2
    RESERVED_FIELD = 3
    ACCOUNT_CLOSED = 4
    ACCOUNT_ALREADY_FROZEN = 5
    ACCOUNT_NOT_FROZEN = 6
    LINKED_EVENT_FAILED = 7  # rolled back because another event of an atomic call failed


class LedgerId(enum.IntEnum):
    """Built-in ledgers. Apps register more (BANK, ...) with numbers from FIRST_REGISTERED up."""

    MEDICAL = 1  # the medical insurance personal accounts: record-only, belong to the person
    PURSE = 2  # the e-purse shadow: cash-like, belongs to the card

    @classmethod
    def first_registered(cls) -> int:
        return 16


class AccountKind(enum.IntEnum):
    """An account's `code`: what kind of account it is (the chart of accounts)."""

    PERSON_MEDICAL = 1  # a person's medical personal account (MEDICAL only)
    CARD_PURSE = 2  # a card's e-purse shadow (PURSE only)
    INSTITUTION_SETTLEMENT = 3  # a designated hospital or pharmacy, or a merchant
    FUND = 4  # a fund: the individual-account fund, the pooled fund
    OPERATOR_SETTLEMENT = 5  # a transit operator, a utility, a bank: partners who load or are paid
    SUSPENSE = 6  # unmatched or unclaimed money awaiting a decision


# Kinds that live on exactly one ledger: a person's medical account can never be opened on PURSE.
HOME_LEDGER_OF_KIND = {AccountKind.PERSON_MEDICAL: LedgerId.MEDICAL, AccountKind.CARD_PURSE: LedgerId.PURSE}

# Kinds that must carry DEBITS_MUST_NOT_EXCEED_CREDITS: a person's money never goes below zero.
KINDS_REQUIRING_DEBIT_LIMIT = (AccountKind.PERSON_MEDICAL, AccountKind.CARD_PURSE)


class TransferCode(enum.IntEnum):
    CONTRIBUTION = 1  # the individual share of medical contributions, fund -> personal account
    SETTLEMENT = 2  # the insured pays a designated institution from the personal account
    POOLED_FUND_PAYMENT = 3  # the pooled fund pays an institution its share of a bill
    REFUND = 4  # reverses (part of) an original transfer, up to its amount
    LOAD = 10  # money onto an e-purse
    PURCHASE = 11  # an e-purse pays (fare, bill, shop)
    REDEMPTION = 12  # an e-purse balance paid back out (only where a city allows it)


@dataclass(frozen=True)
class Movement:
    """One allowed movement on a ledger: transfer `code` from a `debit_kind` to a `credit_kind`.

    A movement with `refund_of` set is a refund: it needs `ref_id` naming an original transfer with that
    code, in the opposite direction, and refunds may add up to the original's amount and no more.
    Zero in `code`, `debit_kind` or `credit_kind` is a wildcard (only registered ledgers may use it).
    """

    ledger: int
    code: int
    debit_kind: int
    credit_kind: int
    refund_of: int = 0


_M, _K, _T = LedgerId, AccountKind, TransferCode

BUILTIN_MOVEMENTS: tuple[Movement, ...] = (
    # MEDICAL: these and nothing else.
    Movement(_M.MEDICAL, _T.CONTRIBUTION, _K.FUND, _K.PERSON_MEDICAL),
    Movement(_M.MEDICAL, _T.SETTLEMENT, _K.PERSON_MEDICAL, _K.INSTITUTION_SETTLEMENT),
    Movement(_M.MEDICAL, _T.POOLED_FUND_PAYMENT, _K.FUND, _K.INSTITUTION_SETTLEMENT),
    Movement(_M.MEDICAL, _T.REFUND, _K.INSTITUTION_SETTLEMENT, _K.PERSON_MEDICAL, refund_of=_T.SETTLEMENT),
    Movement(_M.MEDICAL, _T.REFUND, _K.INSTITUTION_SETTLEMENT, _K.FUND, refund_of=_T.POOLED_FUND_PAYMENT),
    # PURSE: loads in from partners, purchases out to them, refunds of purchases, redemption.
    Movement(_M.PURSE, _T.LOAD, _K.OPERATOR_SETTLEMENT, _K.CARD_PURSE),
    Movement(_M.PURSE, _T.LOAD, _K.SUSPENSE, _K.CARD_PURSE),
    Movement(_M.PURSE, _T.PURCHASE, _K.CARD_PURSE, _K.OPERATOR_SETTLEMENT),
    Movement(_M.PURSE, _T.PURCHASE, _K.CARD_PURSE, _K.INSTITUTION_SETTLEMENT),
    Movement(_M.PURSE, _T.REFUND, _K.OPERATOR_SETTLEMENT, _K.CARD_PURSE, refund_of=_T.PURCHASE),
    Movement(_M.PURSE, _T.REFUND, _K.INSTITUTION_SETTLEMENT, _K.CARD_PURSE, refund_of=_T.PURCHASE),
    Movement(_M.PURSE, _T.REDEMPTION, _K.CARD_PURSE, _K.SUSPENSE),
)

MOVEMENT_DTYPE = np.dtype(
    [("ledger", "<u4"), ("code", "<u2"), ("debit_kind", "<u2"), ("credit_kind", "<u2"), ("refund_of", "<u2")]
)


def movements_array(movements: tuple[Movement, ...] | list[Movement]) -> np.ndarray:
    """The movement table in the layout the compiled core reads."""
    table = np.zeros(len(movements), dtype=MOVEMENT_DTYPE)
    for row, movement in enumerate(movements):
        table[row] = (movement.ledger, movement.code, movement.debit_kind, movement.credit_kind, movement.refund_of)
    return table
