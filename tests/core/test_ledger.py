"""One test per result code and per rule of the settlement core, against LMDB on disk."""

from __future__ import annotations

import numpy as np
import pytest

from citycard.core.ledger import (
    BatchResult,
    Ledger,
    LedgerInputError,
    accounts_array,
    changes_array,
    transfers_array,
    u128_value,
)
from citycard.core.records import (
    BATCH_EVENTS_MAX,
    ID_MAX,
    TRANSFER_DTYPE,
    AccountFlags as AF,
    AccountKind as K,
    AccountResult as AR,
    ChangeAction as CA,
    ChangeResult as CR,
    LedgerId as L,
    TransferCode as C,
    TransferFlags as F,
    TransferResult as TR,
)

NOW = 1_800_000_000_000_000_000
S = 1_000_000_000
LIMIT = AF.DEBITS_MUST_NOT_EXCEED_CREDITS
BANK = 16

# The chart every test starts from.
FUND, ALICE, BOB, PHARMACY, HOSPITAL = 1, 2, 3, 4, 5
OPERATOR, PURSE_A, PURSE_B, SHOP, SUSPENSE = 11, 12, 13, 14, 15
BANK_ISSUER, BANK_HOLDER = 21, 22
CHART = [
    (FUND, L.MEDICAL, K.FUND, 0),
    (ALICE, L.MEDICAL, K.PERSON_MEDICAL, LIMIT),
    (BOB, L.MEDICAL, K.PERSON_MEDICAL, LIMIT),
    (PHARMACY, L.MEDICAL, K.INSTITUTION_SETTLEMENT, 0),
    (HOSPITAL, L.MEDICAL, K.INSTITUTION_SETTLEMENT, 0),
    (OPERATOR, L.PURSE, K.OPERATOR_SETTLEMENT, 0),
    (PURSE_A, L.PURSE, K.CARD_PURSE, LIMIT),
    (PURSE_B, L.PURSE, K.CARD_PURSE, LIMIT),
    (SHOP, L.PURSE, K.INSTITUTION_SETTLEMENT, 0),
    (SUSPENSE, L.PURSE, K.SUSPENSE, 0),
    (BANK_ISSUER, BANK, K.OPERATOR_SETTLEMENT, 0),
    (BANK_HOLDER, BANK, K.SUSPENSE, AF.CREDITS_MUST_NOT_EXCEED_DEBITS),
]


class Clock:
    def __init__(self) -> None:
        self.ns = NOW

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path, clock):
    with Ledger(tmp_path / "ledger", map_size_bytes=2**26, now_ns=clock) as opened:
        opened.register_ledger(BANK, "BANK", [(0, 0, 0)])
        results = opened.create_accounts(accounts_array(dict(id=i, ledger=l, code=k, flags=f) for i, l, k, f in CHART))
        assert results["status"].tolist() == [AR.OK] * len(CHART)
        yield opened


def t(id, debit=ALICE, credit=PHARMACY, amount=100, ledger=L.MEDICAL, code=C.SETTLEMENT, **fields):
    return dict(id=id, debit_account_id=debit, credit_account_id=credit, amount=amount, ledger=ledger, code=code,
                **fields)


def contribution(id, person=ALICE, amount=10_000):
    return t(id, FUND, person, amount, code=C.CONTRIBUTION)


def load(id, purse=PURSE_A, amount=10_000):
    return t(id, OPERATOR, purse, amount, ledger=L.PURSE, code=C.LOAD)


def book(ledger: Ledger, *rows) -> list[TR]:
    return [TR(status) for status in ledger.create_transfers(transfers_array(rows))["status"]]


def balance(ledger: Ledger, account: int) -> tuple[int, int, int, int]:
    b = ledger.balance(account)
    return b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted


# -- accounts ---------------------------------------------------------------------------------------

def account_status(opened: Ledger, row: dict) -> AR:
    base = dict(id=100, ledger=L.MEDICAL, code=K.INSTITUTION_SETTLEMENT)
    array = accounts_array([base | {k: v for k, v in row.items() if k != "reserved"}])
    if "reserved" in row:
        array[0]["reserved"] = row["reserved"]
    return AR(opened.create_accounts(array)[0]["status"])


@pytest.mark.parametrize("row, expected", [
    (dict(timestamp=1), AR.TIMESTAMP_MUST_BE_ZERO),
    (dict(flags=AF.FROZEN), AR.RESERVED_FIELD),
    (dict(reserved=b"\x01" + b"\x00" * 39), AR.RESERVED_FIELD),
    (dict(id=0), AR.ID_MUST_NOT_BE_ZERO),
    (dict(id=ID_MAX), AR.ID_MUST_NOT_BE_INT_MAX),
    (dict(flags=AF.DEBITS_MUST_NOT_EXCEED_CREDITS | AF.CREDITS_MUST_NOT_EXCEED_DEBITS), AR.FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (dict(credits_posted=5), AR.BALANCES_MUST_BE_ZERO),
    (dict(ledger=0), AR.LEDGER_MUST_NOT_BE_ZERO),
    (dict(code=0), AR.CODE_MUST_NOT_BE_ZERO),
    (dict(id=ALICE, ledger=L.MEDICAL, code=K.PERSON_MEDICAL, flags=0), AR.EXISTS_WITH_DIFFERENT_FLAGS),
    (dict(id=ALICE, code=K.PERSON_MEDICAL, flags=LIMIT, owner=9), AR.EXISTS_WITH_DIFFERENT_OWNER),
    (dict(id=ALICE, code=K.PERSON_MEDICAL, flags=LIMIT, user_data=9), AR.EXISTS_WITH_DIFFERENT_USER_DATA),
    (dict(id=ALICE, code=K.PERSON_MEDICAL, flags=LIMIT, ledger=L.PURSE), AR.EXISTS_WITH_DIFFERENT_LEDGER),
    (dict(id=ALICE, code=K.FUND, flags=LIMIT), AR.EXISTS_WITH_DIFFERENT_CODE),
    (dict(id=ALICE, code=K.PERSON_MEDICAL, flags=LIMIT), AR.EXISTS),
    (dict(ledger=99), AR.LEDGER_NOT_REGISTERED),
    (dict(ledger=L.PURSE, code=K.PERSON_MEDICAL, flags=LIMIT), AR.KIND_NOT_ALLOWED_ON_LEDGER),
    (dict(ledger=L.MEDICAL, code=K.CARD_PURSE, flags=LIMIT), AR.KIND_NOT_ALLOWED_ON_LEDGER),
    (dict(ledger=L.MEDICAL, code=K.OPERATOR_SETTLEMENT), AR.KIND_NOT_ALLOWED_ON_LEDGER),
    (dict(ledger=BANK, code=K.PERSON_MEDICAL, flags=LIMIT), AR.KIND_NOT_ALLOWED_ON_LEDGER),
    (dict(code=K.PERSON_MEDICAL), AR.KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS),
    (dict(ledger=L.PURSE, code=K.CARD_PURSE), AR.KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS),
    (dict(), AR.OK),
])
def test_account_result(ledger, row, expected):
    assert account_status(ledger, row) == expected


def test_account_exists_returns_original_timestamp_and_ignores_freeze(ledger):
    first = int(ledger.account(ALICE)["timestamp"])
    assert ledger.freeze(ALICE) == CR.OK
    again = ledger.create_accounts(accounts_array([dict(id=ALICE, ledger=L.MEDICAL, code=K.PERSON_MEDICAL, flags=LIMIT)]))
    assert (AR(again[0]["status"]), int(again[0]["timestamp"])) == (AR.EXISTS, first)


def test_linked_accounts_commit_or_fail_as_one(ledger):
    rows = [dict(id=200, ledger=L.MEDICAL, code=K.FUND, flags=AF.LINKED),
            dict(id=201, ledger=L.MEDICAL, code=K.FUND, flags=AF.LINKED),
            dict(id=202, ledger=L.MEDICAL, code=0)]
    results = ledger.create_accounts(accounts_array(rows))
    assert [AR(s) for s in results["status"]] == [AR.LINKED_EVENT_FAILED, AR.LINKED_EVENT_FAILED, AR.CODE_MUST_NOT_BE_ZERO]
    assert ledger.account(200) is None and ledger.account(201) is None
    open_chain = ledger.create_accounts(accounts_array([dict(id=203, ledger=L.MEDICAL, code=K.FUND, flags=AF.LINKED)]))
    assert AR(open_chain[0]["status"]) == AR.LINKED_EVENT_CHAIN_OPEN
    assert ledger.account(203) is None


# -- transfers: field checks ------------------------------------------------------------------------

def transfer_status(ledger, row, reserved=0):
    array = transfers_array([row])
    array[0]["reserved"] = reserved
    return TR(ledger.create_transfers(array)[0]["status"])


@pytest.mark.parametrize("row, expected", [
    (t(1, timestamp=5), TR.TIMESTAMP_MUST_BE_ZERO),
    (t(1, flags=1 << 9), TR.RESERVED_FIELD),
    (t(0), TR.ID_MUST_NOT_BE_ZERO),
    (t(ID_MAX), TR.ID_MUST_NOT_BE_INT_MAX),
    (t(1, flags=F.PENDING | F.POST_PENDING_TRANSFER), TR.FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (t(1, flags=F.POST_PENDING_TRANSFER | F.VOID_PENDING_TRANSFER, pending_id=7), TR.FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (t(1, flags=F.POST_PENDING_TRANSFER), TR.PENDING_ID_MUST_NOT_BE_ZERO),
    (t(1, flags=F.VOID_PENDING_TRANSFER, pending_id=1), TR.PENDING_ID_MUST_BE_DIFFERENT),
    (t(1, pending_id=7), TR.PENDING_ID_MUST_BE_ZERO),
    (t(1, timeout=5), TR.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
    (t(1, flags=F.POST_PENDING_TRANSFER, pending_id=7, timeout=5), TR.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
    (t(1, flags=F.POST_PENDING_TRANSFER, pending_id=7, ref_id=3), TR.REF_ID_MUST_BE_ZERO_ON_POST_OR_VOID),
    (t(1, debit=0), TR.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO),
    (t(1, credit=0), TR.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO),
    (t(1, credit=ALICE), TR.ACCOUNTS_MUST_BE_DIFFERENT),
    (t(1, ledger=0), TR.LEDGER_MUST_NOT_BE_ZERO),
    (t(1, code=0), TR.CODE_MUST_NOT_BE_ZERO),
    (t(1, amount=0), TR.AMOUNT_MUST_NOT_BE_ZERO),
    (t(1, debit=99), TR.DEBIT_ACCOUNT_NOT_FOUND),
    (t(1, credit=99), TR.CREDIT_ACCOUNT_NOT_FOUND),
    (t(1, debit=PURSE_A, credit=PHARMACY), TR.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER),
    (t(1, ledger=L.PURSE), TR.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS),
])
def test_transfer_field_checks(ledger, row, expected):
    assert transfer_status(ledger, row) == expected
    assert ledger.transfer(1) is None


def test_reserved_bytes_refused(ledger):
    assert transfer_status(ledger, contribution(1), reserved=1) == TR.RESERVED_FIELD


# -- the two kinds of money never meet, and MEDICAL allows its table only ---------------------------

@pytest.mark.parametrize("row", [
    t(1, FUND, PURSE_A, ledger=L.MEDICAL, code=C.CONTRIBUTION),  # medical money onto a purse
    t(1, ALICE, SHOP, ledger=L.MEDICAL, code=C.SETTLEMENT),  # paying a shop from the medical account
    t(1, PURSE_A, PHARMACY, ledger=L.PURSE, code=C.PURCHASE),
    t(1, ALICE, BANK_HOLDER, ledger=BANK, code=1),
])
def test_nothing_crosses_ledgers(ledger, row):
    assert transfer_status(ledger, row) in (TR.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER,
                                            TR.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS)


@pytest.mark.parametrize("debit, credit, code, allowed", [
    (FUND, ALICE, C.CONTRIBUTION, True),
    (ALICE, PHARMACY, C.SETTLEMENT, True),
    (FUND, HOSPITAL, C.POOLED_FUND_PAYMENT, True),
    (ALICE, BOB, C.SETTLEMENT, False),  # person to person: never
    (ALICE, FUND, C.CONTRIBUTION, False),  # money back to the fund
    (PHARMACY, ALICE, C.CONTRIBUTION, False),
    (ALICE, PHARMACY, C.PURCHASE, False),  # a purse code on MEDICAL
    (FUND, ALICE, C.SETTLEMENT, False),
    (ALICE, HOSPITAL, C.POOLED_FUND_PAYMENT, False),
    (PHARMACY, HOSPITAL, C.SETTLEMENT, False),
])
def test_medical_movement_table(ledger, debit, credit, code, allowed):
    book(ledger, contribution(90, ALICE, 50_000))
    expected = TR.OK if allowed else TR.MOVEMENT_NOT_ALLOWED
    assert transfer_status(ledger, t(1, debit, credit, 100, code=code)) == expected


def test_registered_open_ledger_accepts_any_code(ledger):
    assert book(ledger, t(1, BANK_HOLDER, BANK_ISSUER, 500, ledger=BANK, code=42)) == [TR.OK]
    assert book(ledger, t(2, BANK_ISSUER, BANK_HOLDER, 600, ledger=BANK, code=43)) == [TR.EXCEEDS_DEBITS]
    assert book(ledger, t(3, BANK_ISSUER, BANK_HOLDER, 500, ledger=BANK, code=43)) == [TR.OK]


# -- limits, freeze, close ----------------------------------------------------------------------------

def test_debits_must_not_exceed_credits(ledger):
    assert book(ledger, contribution(1, ALICE, 1_000), t(2, amount=1_001), t(3, amount=1_000)) == [
        TR.OK, TR.EXCEEDS_CREDITS, TR.OK]
    assert balance(ledger, ALICE) == (0, 1_000, 0, 1_000)


def test_holds_count_against_the_limit(ledger):
    assert book(ledger, contribution(1, ALICE, 1_000), t(2, amount=800, flags=F.PENDING), t(3, amount=300)) == [
        TR.OK, TR.OK, TR.EXCEEDS_CREDITS]


def test_frozen_account_takes_credits_not_debits(ledger):
    book(ledger, contribution(1))
    assert ledger.freeze(ALICE) == CR.OK
    assert book(ledger, t(2), contribution(3)) == [TR.DEBIT_ACCOUNT_FROZEN, TR.OK]
    assert ledger.freeze(ALICE) == CR.ACCOUNT_ALREADY_FROZEN
    assert ledger.unfreeze(ALICE) == CR.OK
    assert ledger.unfreeze(ALICE) == CR.ACCOUNT_NOT_FROZEN
    assert book(ledger, t(4)) == [TR.OK]


def test_closed_account_takes_nothing(ledger):
    book(ledger, load(1))
    assert ledger.change_accounts(changes_array([(PURSE_A, CA.CLOSE)]))[0]["status"] == CR.OK
    assert book(ledger, load(2), t(3, PURSE_A, SHOP, ledger=L.PURSE, code=C.PURCHASE)) == [
        TR.CREDIT_ACCOUNT_CLOSED, TR.DEBIT_ACCOUNT_CLOSED]
    assert ledger.freeze(PURSE_A) == CR.ACCOUNT_CLOSED


def test_change_checks(ledger):
    results = ledger.change_accounts(changes_array([(99, CA.FREEZE), (ALICE, 9)]))
    assert [CR(s) for s in results["status"]] == [CR.ACCOUNT_NOT_FOUND, CR.ACTION_UNKNOWN]
    array = changes_array([(ALICE, CA.FREEZE)])
    array[0]["reserved"] = 1
    assert ledger.change_accounts(array)[0]["status"] == CR.RESERVED_FIELD


# -- idempotency --------------------------------------------------------------------------------------

def test_identical_resend_is_exists_with_the_original_timestamp(ledger):
    first = ledger.create_transfers(transfers_array([contribution(1)]))
    again = ledger.create_transfers(transfers_array([contribution(1)]))
    assert TR(again[0]["status"]) == TR.EXISTS
    assert again[0]["timestamp"] == first[0]["timestamp"]
    assert balance(ledger, ALICE) == (0, 0, 0, 10_000)


@pytest.mark.parametrize("change, expected", [
    (dict(flags=F.PENDING), TR.EXISTS_WITH_DIFFERENT_FLAGS),
    (dict(debit=HOSPITAL), TR.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
    (dict(credit=BOB), TR.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
    (dict(amount=1), TR.EXISTS_WITH_DIFFERENT_AMOUNT),
    (dict(ref_id=5), TR.EXISTS_WITH_DIFFERENT_REF_ID),
    (dict(user_data=5), TR.EXISTS_WITH_DIFFERENT_USER_DATA),
    (dict(ledger=L.PURSE), TR.EXISTS_WITH_DIFFERENT_LEDGER),
    (dict(code=C.SETTLEMENT), TR.EXISTS_WITH_DIFFERENT_CODE),
])
def test_resend_with_a_different_field(ledger, change, expected):
    book(ledger, contribution(1))
    row = contribution(1)
    if "debit" in change:
        row["debit_account_id"] = change.pop("debit")
    if "credit" in change:
        row["credit_account_id"] = change.pop("credit")
    assert book(ledger, row | change) == [expected]


def test_resend_of_a_hold_with_a_different_timeout(ledger):
    book(ledger, contribution(1), t(2, flags=F.PENDING, timeout=60))
    assert book(ledger, t(2, flags=F.PENDING, timeout=61)) == [TR.EXISTS_WITH_DIFFERENT_TIMEOUT]


def test_resend_of_a_post_with_a_different_pending_id(ledger):
    book(ledger, contribution(1), t(2, flags=F.PENDING), t(3, flags=F.PENDING),
         t(4, flags=F.POST_PENDING_TRANSFER, pending_id=2, amount=0))
    assert book(ledger, t(4, flags=F.POST_PENDING_TRANSFER, pending_id=3, amount=0)) == [
        TR.EXISTS_WITH_DIFFERENT_PENDING_ID]
    assert book(ledger, dict(id=4, flags=F.POST_PENDING_TRANSFER, pending_id=2)) == [TR.EXISTS]


# -- two-phase ----------------------------------------------------------------------------------------

def test_hold_post_partial_releases_the_rest(ledger):
    book(ledger, contribution(1, ALICE, 5_000))
    assert book(ledger, t(2, amount=3_000, flags=F.PENDING)) == [TR.OK]
    assert balance(ledger, ALICE) == (3_000, 0, 0, 5_000)
    assert book(ledger, dict(id=3, pending_id=2, amount=1_200, flags=F.POST_PENDING_TRANSFER)) == [TR.OK]
    assert balance(ledger, ALICE) == (0, 1_200, 0, 5_000)
    assert balance(ledger, PHARMACY) == (0, 0, 0, 1_200)
    stored = ledger.transfer(3)
    assert (u128_value(stored["debit_account_id"]), int(stored["amount"]), int(stored["code"])) == (
        ALICE, 1_200, C.SETTLEMENT)
    assert ledger.pending_state(2) == "posted"


def test_void_releases_the_hold(ledger):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=3_000, flags=F.PENDING))
    assert book(ledger, dict(id=3, pending_id=2, flags=F.VOID_PENDING_TRANSFER, amount=2_999)) == [
        TR.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT]
    assert book(ledger, dict(id=3, pending_id=2, flags=F.VOID_PENDING_TRANSFER)) == [TR.OK]
    assert balance(ledger, ALICE) == (0, 0, 0, 5_000)
    assert ledger.pending_state(2) == "voided"


@pytest.mark.parametrize("row, expected", [
    (dict(id=9, pending_id=77, flags=F.POST_PENDING_TRANSFER), TR.PENDING_TRANSFER_NOT_FOUND),
    (dict(id=9, pending_id=1, flags=F.POST_PENDING_TRANSFER), TR.PENDING_TRANSFER_NOT_PENDING),
    (dict(id=9, pending_id=2, flags=F.POST_PENDING_TRANSFER, debit_account_id=BOB),
     TR.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID),
    (dict(id=9, pending_id=2, flags=F.POST_PENDING_TRANSFER, credit_account_id=HOSPITAL),
     TR.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID),
    (dict(id=9, pending_id=2, flags=F.POST_PENDING_TRANSFER, ledger=L.PURSE), TR.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER),
    (dict(id=9, pending_id=2, flags=F.POST_PENDING_TRANSFER, code=C.REFUND), TR.PENDING_TRANSFER_HAS_DIFFERENT_CODE),
    (dict(id=9, pending_id=2, flags=F.POST_PENDING_TRANSFER, amount=3_001), TR.EXCEEDS_PENDING_TRANSFER_AMOUNT),
])
def test_post_checks(ledger, row, expected):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=3_000, flags=F.PENDING))
    assert book(ledger, row) == [expected]
    assert balance(ledger, ALICE) == (3_000, 0, 0, 5_000)


def test_posting_twice_and_after_void(ledger):
    book(ledger, contribution(1, ALICE, 5_000), t(2, flags=F.PENDING), t(3, flags=F.PENDING))
    assert book(ledger, dict(id=4, pending_id=2, flags=F.POST_PENDING_TRANSFER),
                dict(id=5, pending_id=2, flags=F.POST_PENDING_TRANSFER),
                dict(id=6, pending_id=3, flags=F.VOID_PENDING_TRANSFER),
                dict(id=7, pending_id=3, flags=F.POST_PENDING_TRANSFER)) == [
        TR.OK, TR.PENDING_TRANSFER_ALREADY_POSTED, TR.OK, TR.PENDING_TRANSFER_ALREADY_VOIDED]


def test_hold_expires_at_its_timeout(ledger, clock):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=3_000, flags=F.PENDING, timeout=60))
    clock.ns += 59 * S
    assert balance(ledger, ALICE) == (3_000, 0, 0, 5_000)
    clock.ns += 2 * S
    assert book(ledger, dict(id=3, pending_id=2, flags=F.POST_PENDING_TRANSFER)) == [TR.PENDING_TRANSFER_EXPIRED]
    assert balance(ledger, ALICE) == (0, 0, 0, 5_000)
    assert ledger.pending_state(2) == "expired"


def test_expired_hold_stays_expired_after_reopen(ledger, clock, tmp_path):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=3_000, flags=F.PENDING, timeout=1))
    clock.ns += 2 * S
    ledger.execute()  # a batch with no events still expires what fell due
    ledger.close()
    with Ledger(tmp_path / "ledger", map_size_bytes=2**26, now_ns=clock) as reopened:
        assert reopened.pending_state(2) == "expired"
        assert balance(reopened, ALICE) == (0, 0, 0, 5_000)


def test_timeout_overflow(ledger, clock):
    clock.ns = 2**64 - 10 * S
    assert book(ledger, contribution(1, ALICE, 5_000), t(2, flags=F.PENDING, timeout=2**32 - 1)) == [
        TR.OK, TR.OVERFLOWS_TIMEOUT]


# -- refunds ------------------------------------------------------------------------------------------

def test_refund_up_to_the_original(ledger):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=1_000))
    refund = dict(debit=PHARMACY, credit=ALICE, code=C.REFUND, ref_id=2)
    assert book(ledger, t(3, amount=600, **refund), t(4, amount=401, **refund), t(5, amount=400, **refund)) == [
        TR.OK, TR.EXCEEDS_REFUNDABLE_AMOUNT, TR.OK]
    assert balance(ledger, ALICE) == (0, 1_000, 0, 6_000)
    assert book(ledger, t(6, amount=1, **refund)) == [TR.EXCEEDS_REFUNDABLE_AMOUNT]


@pytest.mark.parametrize("row, expected", [
    (t(3, PHARMACY, ALICE, code=C.REFUND), TR.REF_ID_MUST_NOT_BE_ZERO),
    (t(3, PHARMACY, ALICE, code=C.REFUND, ref_id=77), TR.REF_TRANSFER_NOT_FOUND),
    (t(3, PHARMACY, ALICE, code=C.REFUND, ref_id=1), TR.REF_TRANSFER_NOT_REFUNDABLE),  # a contribution
    (t(3, HOSPITAL, ALICE, code=C.REFUND, ref_id=2), TR.REF_TRANSFER_HAS_DIFFERENT_ACCOUNTS),
    (t(3, PHARMACY, BOB, code=C.REFUND, ref_id=2), TR.REF_TRANSFER_HAS_DIFFERENT_ACCOUNTS),
    (t(3, PHARMACY, ALICE, code=C.REFUND, ref_id=2, flags=F.PENDING), TR.REFUND_MUST_NOT_BE_PENDING),
    (t(3, ref_id=2), TR.REF_ID_MUST_BE_ZERO),
])
def test_refund_checks(ledger, row, expected):
    book(ledger, contribution(1, ALICE, 5_000), contribution(10, BOB, 5_000), t(2, amount=1_000))
    assert book(ledger, row) == [expected]


def test_refund_of_a_posted_hold(ledger):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=3_000, flags=F.PENDING),
         dict(id=3, pending_id=2, amount=2_000, flags=F.POST_PENDING_TRANSFER))
    assert book(ledger, t(4, PHARMACY, ALICE, 2_000, code=C.REFUND, ref_id=2)) == [TR.REF_TRANSFER_NOT_REFUNDABLE]
    assert book(ledger, t(4, PHARMACY, ALICE, 2_000, code=C.REFUND, ref_id=3)) == [TR.OK]


# -- linked chains --------------------------------------------------------------------------------------

def test_linked_chain_fails_as_one(ledger):
    book(ledger, contribution(1, ALICE, 1_000), load(2, PURSE_A, 1_000))
    # A bill paid partly from each ledger: one transfer per ledger, linked.
    results = book(ledger, t(3, amount=800, flags=F.LINKED),
                   t(4, PURSE_A, SHOP, 1_200, ledger=L.PURSE, code=C.PURCHASE), t(5, amount=100))
    assert results == [TR.LINKED_EVENT_FAILED, TR.EXCEEDS_CREDITS, TR.OK]
    assert balance(ledger, ALICE) == (0, 100, 0, 1_000)
    assert balance(ledger, PURSE_A) == (0, 0, 0, 1_000)
    assert ledger.transfer(3) is None


def test_linked_chain_sees_its_own_effects(ledger):
    results = book(ledger, contribution(1, ALICE, 500) | dict(flags=F.LINKED), t(2, amount=500, flags=F.LINKED),
                   t(3, PHARMACY, ALICE, 200, code=C.REFUND, ref_id=2))
    assert results == [TR.OK, TR.OK, TR.OK]


def test_linked_chain_open_at_the_end(ledger):
    assert book(ledger, contribution(1) | dict(flags=F.LINKED), contribution(2) | dict(flags=F.LINKED)) == [
        TR.LINKED_EVENT_FAILED, TR.LINKED_EVENT_CHAIN_OPEN]
    assert balance(ledger, ALICE) == (0, 0, 0, 0)


def test_atomic_call_keeps_nothing_when_one_event_fails(ledger):
    before = ledger.totals()
    result = ledger.execute(changes=changes_array([(ALICE, CA.FREEZE)]), transfers=transfers_array([t(1, BOB)]),
                            puts=[("cards", b"card:1", b"frozen")], atomic=True)
    assert [CR(s) for s in result.changes["status"]] == [CR.LINKED_EVENT_FAILED]
    assert [TR(s) for s in result.transfers["status"]] == [TR.EXCEEDS_CREDITS]
    assert not result.ok
    assert ledger.get("cards", b"card:1") is None
    assert not ledger.account(ALICE)["flags"] & AF.FROZEN
    assert ledger.totals() == before


def test_atomic_call_commits_state_rows_with_the_freeze(ledger, tmp_path, clock):
    result = ledger.execute(changes=changes_array([(ALICE, CA.FREEZE)]), puts=[("cards", b"card:1", b"frozen")],
                            atomic=True)
    assert isinstance(result, BatchResult) and result.ok
    ledger.close()
    with Ledger(tmp_path / "ledger", map_size_bytes=2**26, now_ns=clock) as reopened:
        assert reopened.get("cards", b"card:1") == b"frozen"
        assert reopened.account(ALICE)["flags"] & AF.FROZEN


# -- overflow -----------------------------------------------------------------------------------------

BIG = 2**64 - 1


@pytest.mark.parametrize("first_pending, second, second_pending, expected", [
    (False, "same debit", False, TR.OVERFLOWS_DEBITS_POSTED),
    (False, "same credit", False, TR.OVERFLOWS_CREDITS_POSTED),
    (True, "same debit", True, TR.OVERFLOWS_DEBITS_PENDING),
    (True, "same credit", True, TR.OVERFLOWS_CREDITS_PENDING),
    (True, "same debit", False, TR.OVERFLOWS_DEBITS),
    (True, "same credit", False, TR.OVERFLOWS_CREDITS),
])
def test_overflow_is_a_result_never_a_wrap(ledger, first_pending, second, second_pending, expected):
    x, y, h, h2 = 30, 31, 32, 33
    plain = accounts_array([dict(id=n, ledger=BANK, code=K.SUSPENSE) for n in (x, y, h, h2)])
    assert (ledger.create_accounts(plain)["status"] == 0).all()
    first = t(1, x, h, BIG, ledger=BANK, code=1, flags=F.PENDING if first_pending else 0)
    debit, credit = (x, h2) if second == "same debit" else (y, h)
    assert book(ledger, first) == [TR.OK]
    assert book(ledger, t(2, debit, credit, 1, ledger=BANK, code=1, flags=F.PENDING if second_pending else 0)) == [
        expected]
    assert ledger.totals()[BANK] == ((BIG, 0, BIG, 0) if first_pending else (0, BIG, 0, BIG))


# -- time, look-ups -----------------------------------------------------------------------------------

def test_timestamps_strictly_increase_even_when_the_clock_stands_still(ledger):
    stamps = []
    for n in range(3):
        stamps += ledger.create_transfers(transfers_array([contribution(10 + n)]))["timestamp"].tolist()
    assert stamps == sorted(set(stamps)) and stamps[0] > NOW


def test_account_transfers_in_a_time_range_and_balance_as_of_a_time(ledger, clock):
    book(ledger, contribution(1, ALICE, 5_000))
    clock.ns += 10 * S
    book(ledger, t(2, amount=1_000), t(3, amount=500, flags=F.PENDING), contribution(4, BOB, 70))
    clock.ns += 10 * S
    book(ledger, dict(id=5, pending_id=3, flags=F.POST_PENDING_TRANSFER, amount=200))
    assert [u128_value(r["id"]) for r in ledger.account_transfers(ALICE)] == [1, 2, 3, 5]
    middle = ledger.account_transfers(ALICE, since_ns=NOW + 5 * S, until_ns=NOW + 15 * S)
    assert [u128_value(r["id"]) for r in middle] == [2, 3]
    assert ledger.balance_at(ALICE, NOW + 5 * S).credits_posted == 5_000
    at_middle = ledger.balance_at(ALICE, NOW + 15 * S)
    assert (at_middle.debits_pending, at_middle.debits_posted) == (500, 1_000)
    now = ledger.balance_at(ALICE, clock.ns + S)
    assert (now.debits_pending, now.debits_posted, now.credit_balance) == (0, 1_200, 3_800)


# -- bad input: a clear error and nothing changes -----------------------------------------------------

def test_bad_input_changes_nothing(ledger):
    before = (ledger.totals(), ledger.stats())
    wrong_dtype = np.zeros(3, dtype=[("id", "<u8")])
    with pytest.raises(LedgerInputError, match="wrong dtype"):
        ledger.create_transfers(wrong_dtype)
    with pytest.raises(LedgerInputError, match="1-d"):
        ledger.create_transfers(np.zeros((2, 2), dtype=TRANSFER_DTYPE))
    with pytest.raises(LedgerInputError, match="over the limit"):
        ledger.create_transfers(np.zeros(BATCH_EVENTS_MAX + 1, dtype=TRANSFER_DTYPE))
    with pytest.raises(LedgerInputError, match="numpy array"):
        ledger.create_transfers([contribution(1)])
    with pytest.raises(LedgerInputError, match="not an unsigned integer"):
        transfers_array([contribution(1, amount=-5)])
    with pytest.raises(LedgerInputError, match="not an unsigned integer"):
        transfers_array([contribution(1, amount=2**64)])
    with pytest.raises(LedgerInputError, match="not an unsigned integer"):
        transfers_array([contribution(1, amount=12.5)])
    with pytest.raises(LedgerInputError, match="not a u128"):
        transfers_array([contribution(2**128)])
    with pytest.raises(LedgerInputError):
        ledger.execute(puts=[("cards", b"", b"x")])
    zero_ids = ledger.create_transfers(np.zeros(4, dtype=TRANSFER_DTYPE))
    assert set(zero_ids["status"].tolist()) == {TR.ID_MUST_NOT_BE_ZERO}
    assert (ledger.totals(), ledger.stats()["transfers"]) == (before[0], before[1]["transfers"])


def test_full_batch_of_8189(ledger):
    rows = np.zeros(BATCH_EVENTS_MAX, dtype=TRANSFER_DTYPE)
    rows["id"][:, 0] = np.arange(1, BATCH_EVENTS_MAX + 1)
    rows["debit_account_id"][:, 0] = FUND
    rows["credit_account_id"][:, 0] = ALICE
    rows["amount"] = 3
    rows["ledger"] = L.MEDICAL
    rows["code"] = C.CONTRIBUTION
    results = ledger.create_transfers(rows)
    assert (results["status"] == 0).all()
    assert balance(ledger, ALICE) == (0, 0, 0, 3 * BATCH_EVENTS_MAX)


def test_register_ledger_checks(ledger):
    with pytest.raises(LedgerInputError, match="from 16"):
        ledger.register_ledger(2, "PURSE2", [(1, 0, 0)])
    with pytest.raises(LedgerInputError, match="live only on"):
        ledger.register_ledger(17, "UTILITY", [(1, K.PERSON_MEDICAL, K.SUSPENSE)])
    with pytest.raises(LedgerInputError, match="another table"):
        ledger.register_ledger(BANK, "BANK", [(1, 0, 0)])
    ledger.register_ledger(BANK, "BANK", [(0, 0, 0)])  # the same again changes nothing
    assert ledger.ledgers() == {1: "MEDICAL", 2: "PURSE", BANK: "BANK"}


def test_reopen_rebuilds_the_same_state(ledger, tmp_path, clock):
    book(ledger, contribution(1, ALICE, 5_000), t(2, amount=3_000, flags=F.PENDING, timeout=600),
         t(3, amount=1_000), t(4, PHARMACY, ALICE, 300, code=C.REFUND, ref_id=3), load(5))
    ledger.freeze(BOB)
    before = ledger.lookup_accounts([row[0] for row in CHART])
    ledger.close()
    with Ledger(tmp_path / "ledger", map_size_bytes=2**26, now_ns=clock) as reopened:
        after = reopened.lookup_accounts([row[0] for row in CHART])
        assert after.tobytes() == before.tobytes()
        assert reopened.pending_state(2) == "pending"
        assert book(reopened, t(6, PHARMACY, ALICE, 701, code=C.REFUND, ref_id=3)) == [TR.EXCEEDS_REFUNDABLE_AMOUNT]
        assert book(reopened, contribution(1, ALICE, 5_000)) == [TR.EXISTS]


# -- what is read back from disk is checked -----------------------------------------------------------

def _rewrite_last_transfer_block(path, change):
    import lmdb

    env = lmdb.open(str(path), max_dbs=64)
    transfers = env.open_db(b"transfers")
    with env.begin(write=True, db=transfers) as txn:
        cursor = txn.cursor()
        cursor.last()
        key, value = cursor.key(), bytes(cursor.value())
        txn.put(key, change(value))
    env.close()


@pytest.mark.parametrize("change, message", [
    (lambda block: block[:-5], "is not whole records"),
    (lambda block: block[:16] + (99).to_bytes(16, "little") + block[32:], "unknown account"),
    (lambda block: block[:128 + 104] + (1).to_bytes(8, "little") + block[128 + 112:], "out of order"),
])
def test_a_damaged_log_is_refused_on_open(ledger, tmp_path, clock, change, message):
    from citycard.core.ledger import CorruptionError

    book(ledger, contribution(1), contribution(2, BOB))
    ledger.close()
    _rewrite_last_transfer_block(tmp_path / "ledger", change)
    with pytest.raises(CorruptionError, match=message):
        Ledger(tmp_path / "ledger", map_size_bytes=2**26, now_ns=clock)
