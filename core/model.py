"""A pure-Python reference model of the ledger's rules: small, slow and obviously correct.

It keeps everything in dicts, has no disk, and exists to be compared with the compiled core event by
event (tests/core/test_differential.py). It takes and returns the same numpy records and result codes,
and follows the same order of checks, written as plainly as possible.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from citycard.core.records import (
    AMOUNT_MAX,
    HOME_LEDGER_OF_KIND,
    ID_MAX,
    KINDS_REQUIRING_DEBIT_LIMIT,
    RESULT_DTYPE,
    AccountFlags as AF,
    AccountResult as AR,
    ChangeAction,
    ChangeResult as CR,
    Movement,
    TransferFlags as TF,
    TransferResult as TR,
)

__all__ = ["ReferenceLedger"]

NS_PER_S = 1_000_000_000
U64_MAX = 2**64 - 1
_CREATION_FLAGS = AF.DEBITS_MUST_NOT_EXCEED_CREDITS | AF.CREDITS_MUST_NOT_EXCEED_DEBITS


def _u128(words) -> int:
    return int(words[0]) | (int(words[1]) << 64)


@dataclass
class _Account:
    id: int
    ledger: int
    code: int
    flags: int
    owner: int
    user_data: int
    timestamp: int
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0


@dataclass(frozen=True)
class _Transfer:
    id: int
    debit: int
    credit: int
    pending_id: int
    ref_id: int
    user_data: int
    amount: int
    timestamp: int
    timeout: int
    ledger: int
    code: int
    flags: int


@dataclass
class ReferenceLedger:
    movements: list[Movement]
    accounts: dict[int, _Account] = field(default_factory=dict)
    transfers: dict[int, _Transfer] = field(default_factory=dict)
    pending_state: dict[int, str] = field(default_factory=dict)
    refunded: dict[int, int] = field(default_factory=dict)
    expiries: list[tuple[int, int, int]] = field(default_factory=list)
    last_timestamp: int = 0

    # -- the rules ---------------------------------------------------------------------------------

    def _movement(self, ledger: int, code: int, debit_kind: int, credit_kind: int) -> Movement | None:
        for m in self.movements:
            if (m.ledger == ledger and m.code in (0, code) and m.debit_kind in (0, debit_kind)
                    and m.credit_kind in (0, credit_kind)):
                return m
        return None

    def _kind_allowed(self, ledger: int, kind: int) -> bool:
        if kind in HOME_LEDGER_OF_KIND:
            return HOME_LEDGER_OF_KIND[kind] == ledger
        return any(m.ledger == ledger and (kind in (m.debit_kind, m.credit_kind) or 0 in (m.debit_kind, m.credit_kind))
                   for m in self.movements)

    # -- one batch ---------------------------------------------------------------------------------

    def execute(self, accounts, changes, transfers, atomic: bool, now_ns: int):
        snapshot = self._snapshot()
        clock = max(now_ns, self.last_timestamp)
        clock = self._expire_due(clock)
        after_expiry = self._snapshot()
        account_results = self._run_chains(accounts, clock, self._create_account, AR)
        clock += 0 if accounts is None else len(accounts)
        change_results = np.zeros(0 if changes is None else len(changes), dtype=RESULT_DTYPE)
        for index in range(len(change_results)):
            clock += 1
            status = self._change(changes[index], clock)
            change_results[index] = (clock if status == CR.OK else 0, status, 0)
        transfer_results = self._run_chains(transfers, clock, self._create_transfer, TR)
        clock += 0 if transfers is None else len(transfers)
        if atomic and any((r["status"] != 0).any() for r in (account_results, change_results, transfer_results)):
            self._restore(after_expiry)
            for results, code in ((account_results, AR.LINKED_EVENT_FAILED), (change_results, CR.LINKED_EVENT_FAILED),
                                  (transfer_results, TR.LINKED_EVENT_FAILED)):
                ok = results["status"] == 0
                results["status"][ok] = code
                results["timestamp"][ok] = 0
        del snapshot
        self.last_timestamp = clock
        return account_results, change_results, transfer_results

    def _snapshot(self):
        return ({k: _Account(**vars(v)) for k, v in self.accounts.items()}, dict(self.transfers),
                dict(self.pending_state), dict(self.refunded), list(self.expiries))

    def _restore(self, snapshot) -> None:
        self.accounts, self.transfers, self.pending_state, self.refunded, self.expiries = snapshot

    def _run_chains(self, events, clock: int, apply, codes):
        n = 0 if events is None else len(events)
        results = np.zeros(n, dtype=RESULT_DTYPE)
        index = 0
        while index < n:
            end = index
            while end < n - 1 and events[end]["flags"] & 1:
                end += 1
            chain_open = bool(events[end]["flags"] & 1)  # the batch ended inside a chain
            saved = self._snapshot()
            failed_at = None
            for position in range(index, end + 1):
                timestamp = clock + position + 1
                if chain_open and position == end:
                    status = codes.LINKED_EVENT_CHAIN_OPEN
                else:
                    status, stamp = apply(events[position], timestamp)
                    results[position] = (stamp, status, 0)
                if status != 0:
                    results[position] = (0, status, 0) if status not in (codes.EXISTS,) else results[position]
                    failed_at = position
                    break
            if failed_at is not None and end > index or (failed_at is not None and chain_open):
                self._restore(saved)
                for position in range(index, end + 1):
                    if position != failed_at:
                        results[position] = (0, codes.LINKED_EVENT_FAILED, 0)
            index = end + 1
        return results

    def _expire_due(self, clock: int) -> int:
        while self.expiries and self.expiries[0][0] <= clock:
            _, timestamp, transfer_id = heapq.heappop(self.expiries)
            stored = self.transfers.get(transfer_id)
            if stored is None or stored.timestamp != timestamp or self.pending_state.get(transfer_id) != "pending":
                continue
            self.accounts[stored.debit].debits_pending -= stored.amount
            self.accounts[stored.credit].credits_pending -= stored.amount
            self.pending_state[transfer_id] = "expired"
            clock += 1
        return clock

    # -- accounts ----------------------------------------------------------------------------------

    def _create_account(self, ev, timestamp: int) -> tuple[int, int]:
        account_id, flags = _u128(ev["id"]), int(ev["flags"])
        if ev["timestamp"]:
            return AR.TIMESTAMP_MUST_BE_ZERO, 0
        if flags & ~(AF.LINKED | _CREATION_FLAGS) or any(bytes(ev["reserved"])):
            return AR.RESERVED_FIELD, 0
        if account_id == 0:
            return AR.ID_MUST_NOT_BE_ZERO, 0
        if account_id == ID_MAX:
            return AR.ID_MUST_NOT_BE_INT_MAX, 0
        if flags & _CREATION_FLAGS == _CREATION_FLAGS:
            return AR.FLAGS_ARE_MUTUALLY_EXCLUSIVE, 0
        if ev["debits_pending"] or ev["debits_posted"] or ev["credits_pending"] or ev["credits_posted"]:
            return AR.BALANCES_MUST_BE_ZERO, 0
        if ev["ledger"] == 0:
            return AR.LEDGER_MUST_NOT_BE_ZERO, 0
        if ev["code"] == 0:
            return AR.CODE_MUST_NOT_BE_ZERO, 0
        existing = self.accounts.get(account_id)
        if existing is not None:
            for status, same in ((AR.EXISTS_WITH_DIFFERENT_FLAGS, existing.flags & _CREATION_FLAGS == flags & _CREATION_FLAGS),
                                 (AR.EXISTS_WITH_DIFFERENT_OWNER, existing.owner == _u128(ev["owner"])),
                                 (AR.EXISTS_WITH_DIFFERENT_USER_DATA, existing.user_data == int(ev["user_data"])),
                                 (AR.EXISTS_WITH_DIFFERENT_LEDGER, existing.ledger == int(ev["ledger"])),
                                 (AR.EXISTS_WITH_DIFFERENT_CODE, existing.code == int(ev["code"]))):
                if not same:
                    return status, 0
            return AR.EXISTS, existing.timestamp
        ledger, kind = int(ev["ledger"]), int(ev["code"])
        if not any(m.ledger == ledger for m in self.movements):
            return AR.LEDGER_NOT_REGISTERED, 0
        if not self._kind_allowed(ledger, kind):
            return AR.KIND_NOT_ALLOWED_ON_LEDGER, 0
        if kind in KINDS_REQUIRING_DEBIT_LIMIT and not flags & AF.DEBITS_MUST_NOT_EXCEED_CREDITS:
            return AR.KIND_REQUIRES_DEBITS_MUST_NOT_EXCEED_CREDITS, 0
        self.accounts[account_id] = _Account(account_id, ledger, kind, flags & _CREATION_FLAGS, _u128(ev["owner"]),
                                             int(ev["user_data"]), timestamp)
        return AR.OK, timestamp

    def _change(self, ev, timestamp: int) -> int:
        action = int(ev["action"])
        if ev["reserved"]:
            return CR.RESERVED_FIELD
        if action not in (ChangeAction.FREEZE, ChangeAction.UNFREEZE, ChangeAction.CLOSE):
            return CR.ACTION_UNKNOWN
        account = self.accounts.get(_u128(ev["account_id"]))
        if account is None:
            return CR.ACCOUNT_NOT_FOUND
        if account.flags & AF.CLOSED:
            return CR.ACCOUNT_CLOSED
        if action == ChangeAction.FREEZE and account.flags & AF.FROZEN:
            return CR.ACCOUNT_ALREADY_FROZEN
        if action == ChangeAction.UNFREEZE and not account.flags & AF.FROZEN:
            return CR.ACCOUNT_NOT_FROZEN
        account.flags = {ChangeAction.FREEZE: account.flags | AF.FROZEN, ChangeAction.UNFREEZE: account.flags & ~AF.FROZEN,
                         ChangeAction.CLOSE: account.flags | AF.CLOSED}[action]
        return CR.OK

    # -- transfers ---------------------------------------------------------------------------------

    def _create_transfer(self, ev, timestamp: int) -> tuple[int, int]:
        t = _Transfer(_u128(ev["id"]), _u128(ev["debit_account_id"]), _u128(ev["credit_account_id"]),
                      _u128(ev["pending_id"]), _u128(ev["ref_id"]), _u128(ev["user_data"]), int(ev["amount"]),
                      int(ev["timestamp"]), int(ev["timeout"]), int(ev["ledger"]), int(ev["code"]), int(ev["flags"]))
        phase = t.flags & (TF.PENDING | TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER)
        if t.timestamp:
            return TR.TIMESTAMP_MUST_BE_ZERO, 0
        if ev["reserved"] or t.flags & ~0xF:
            return TR.RESERVED_FIELD, 0
        if t.id == 0:
            return TR.ID_MUST_NOT_BE_ZERO, 0
        if t.id == ID_MAX:
            return TR.ID_MUST_NOT_BE_INT_MAX, 0
        if bin(phase).count("1") > 1:
            return TR.FLAGS_ARE_MUTUALLY_EXCLUSIVE, 0
        if phase & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER):
            return self._resolve(t, timestamp)
        for status, bad in ((TR.PENDING_ID_MUST_BE_ZERO, t.pending_id != 0),
                            (TR.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, t.timeout and not t.flags & TF.PENDING),
                            (TR.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, t.debit == 0),
                            (TR.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, t.credit == 0),
                            (TR.ACCOUNTS_MUST_BE_DIFFERENT, t.debit == t.credit),
                            (TR.LEDGER_MUST_NOT_BE_ZERO, t.ledger == 0),
                            (TR.CODE_MUST_NOT_BE_ZERO, t.code == 0),
                            (TR.AMOUNT_MUST_NOT_BE_ZERO, t.amount == 0)):
            if bad:
                return status, 0
        if t.id in self.transfers:
            return self._exists(t)
        return self._book(t, timestamp)

    def _exists(self, t: _Transfer) -> tuple[int, int]:
        s = self.transfers[t.id]
        resolves = bool(t.flags & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER))

        def differs(mine, theirs) -> bool:
            return not (resolves and mine == 0) and mine != theirs

        for status, bad in ((TR.EXISTS_WITH_DIFFERENT_FLAGS, t.flags != s.flags),
                            (TR.EXISTS_WITH_DIFFERENT_PENDING_ID, t.pending_id != s.pending_id),
                            (TR.EXISTS_WITH_DIFFERENT_TIMEOUT, t.timeout != s.timeout),
                            (TR.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID, differs(t.debit, s.debit)),
                            (TR.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID, differs(t.credit, s.credit)),
                            (TR.EXISTS_WITH_DIFFERENT_AMOUNT, differs(t.amount, s.amount)),
                            (TR.EXISTS_WITH_DIFFERENT_REF_ID, t.ref_id != s.ref_id),
                            (TR.EXISTS_WITH_DIFFERENT_USER_DATA, differs(t.user_data, s.user_data)),
                            (TR.EXISTS_WITH_DIFFERENT_LEDGER, differs(t.ledger, s.ledger)),
                            (TR.EXISTS_WITH_DIFFERENT_CODE, differs(t.code, s.code))):
            if bad:
                return status, 0
        return TR.EXISTS, s.timestamp

    def _book(self, t: _Transfer, timestamp: int) -> tuple[int, int]:
        d, c = self.accounts.get(t.debit), self.accounts.get(t.credit)
        if d is None:
            return TR.DEBIT_ACCOUNT_NOT_FOUND, 0
        if c is None:
            return TR.CREDIT_ACCOUNT_NOT_FOUND, 0
        pending = bool(t.flags & TF.PENDING)
        movement = self._movement(t.ledger, t.code, d.code, c.code)
        for status, bad in ((TR.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER, d.ledger != c.ledger),
                            (TR.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS, t.ledger != d.ledger),
                            (TR.DEBIT_ACCOUNT_CLOSED, d.flags & AF.CLOSED),
                            (TR.CREDIT_ACCOUNT_CLOSED, c.flags & AF.CLOSED),
                            (TR.DEBIT_ACCOUNT_FROZEN, d.flags & AF.FROZEN),
                            (TR.MOVEMENT_NOT_ALLOWED, movement is None)):
            if bad:
                return status, 0
        if movement.refund_of:
            status = self._check_refund(t, movement, pending)
            if status:
                return status, 0
        elif t.ref_id:
            return TR.REF_ID_MUST_BE_ZERO, 0
        a = t.amount
        for status, bad in ((TR.OVERFLOWS_DEBITS_PENDING, pending and d.debits_pending + a > U64_MAX),
                            (TR.OVERFLOWS_CREDITS_PENDING, pending and c.credits_pending + a > U64_MAX),
                            (TR.OVERFLOWS_DEBITS_POSTED, not pending and d.debits_posted + a > U64_MAX),
                            (TR.OVERFLOWS_CREDITS_POSTED, not pending and c.credits_posted + a > U64_MAX),
                            (TR.OVERFLOWS_DEBITS, d.debits_pending + d.debits_posted + a > U64_MAX),
                            (TR.OVERFLOWS_CREDITS, c.credits_pending + c.credits_posted + a > U64_MAX),
                            (TR.OVERFLOWS_TIMEOUT, pending and t.timeout and timestamp + t.timeout * NS_PER_S > U64_MAX),
                            (TR.EXCEEDS_CREDITS, d.flags & AF.DEBITS_MUST_NOT_EXCEED_CREDITS
                             and d.debits_pending + d.debits_posted + a > d.credits_posted),
                            (TR.EXCEEDS_DEBITS, c.flags & AF.CREDITS_MUST_NOT_EXCEED_DEBITS
                             and c.credits_pending + c.credits_posted + a > c.debits_posted)):
            if bad:
                return status, 0
        if pending:
            d.debits_pending += a
            c.credits_pending += a
            self.pending_state[t.id] = "pending"
            if t.timeout:
                heapq.heappush(self.expiries, (timestamp + t.timeout * NS_PER_S, timestamp, t.id))
        else:
            d.debits_posted += a
            c.credits_posted += a
        if movement.refund_of:
            self.refunded[t.ref_id] = self.refunded.get(t.ref_id, 0) + a
        self.transfers[t.id] = _replace(t, timestamp=timestamp)
        return TR.OK, timestamp

    def _check_refund(self, t: _Transfer, movement: Movement, pending: bool) -> int:
        if pending:
            return TR.REFUND_MUST_NOT_BE_PENDING
        if t.ref_id == 0:
            return TR.REF_ID_MUST_NOT_BE_ZERO
        original = self.transfers.get(t.ref_id)
        if original is None:
            return TR.REF_TRANSFER_NOT_FOUND
        if (original.code != movement.refund_of or original.ledger != t.ledger
                or original.flags & (TF.PENDING | TF.VOID_PENDING_TRANSFER)):
            return TR.REF_TRANSFER_NOT_REFUNDABLE
        if original.debit != t.credit or original.credit != t.debit:
            return TR.REF_TRANSFER_HAS_DIFFERENT_ACCOUNTS
        if t.amount > original.amount - self.refunded.get(t.ref_id, 0):
            return TR.EXCEEDS_REFUNDABLE_AMOUNT
        return 0

    def _resolve(self, t: _Transfer, timestamp: int) -> tuple[int, int]:
        post = bool(t.flags & TF.POST_PENDING_TRANSFER)
        for status, bad in ((TR.PENDING_ID_MUST_NOT_BE_ZERO, t.pending_id == 0),
                            (TR.PENDING_ID_MUST_BE_DIFFERENT, t.pending_id == t.id),
                            (TR.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, t.timeout != 0),
                            (TR.REF_ID_MUST_BE_ZERO_ON_POST_OR_VOID, t.ref_id != 0)):
            if bad:
                return status, 0
        if t.id in self.transfers:
            return self._exists(t)
        p = self.transfers.get(t.pending_id)
        if p is None:
            return TR.PENDING_TRANSFER_NOT_FOUND, 0
        state = self.pending_state.get(p.id)
        amount = (t.amount or p.amount) if post else p.amount
        d, c = self.accounts[p.debit], self.accounts[p.credit]
        for status, bad in ((TR.PENDING_TRANSFER_NOT_PENDING, not p.flags & TF.PENDING),
                            (TR.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID, t.debit not in (0, p.debit)),
                            (TR.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID, t.credit not in (0, p.credit)),
                            (TR.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER, t.ledger not in (0, p.ledger)),
                            (TR.PENDING_TRANSFER_HAS_DIFFERENT_CODE, t.code not in (0, p.code)),
                            (TR.PENDING_TRANSFER_ALREADY_POSTED, state == "posted"),
                            (TR.PENDING_TRANSFER_ALREADY_VOIDED, state == "voided"),
                            (TR.PENDING_TRANSFER_EXPIRED, state == "expired"),
                            (TR.PENDING_TRANSFER_EXPIRED, p.timeout and p.timestamp + p.timeout * NS_PER_S <= timestamp),
                            (TR.EXCEEDS_PENDING_TRANSFER_AMOUNT, post and amount > p.amount),
                            (TR.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT, not post and t.amount not in (0, p.amount)),
                            (TR.DEBIT_ACCOUNT_CLOSED, post and d.flags & AF.CLOSED),
                            (TR.CREDIT_ACCOUNT_CLOSED, post and c.flags & AF.CLOSED),
                            (TR.OVERFLOWS_DEBITS_POSTED, post and d.debits_posted + amount > U64_MAX),
                            (TR.OVERFLOWS_CREDITS_POSTED, post and c.credits_posted + amount > U64_MAX)):
            if bad:
                return status, 0
        d.debits_pending -= p.amount
        c.credits_pending -= p.amount
        if post:
            d.debits_posted += amount
            c.credits_posted += amount
        self.pending_state[p.id] = "posted" if post else "voided"
        self.transfers[t.id] = _replace(t, debit=p.debit, credit=p.credit, amount=amount, ledger=p.ledger,
                                        code=p.code, user_data=t.user_data or p.user_data, timestamp=timestamp)
        return TR.OK, timestamp

    # -- what tests compare ------------------------------------------------------------------------

    def balances(self) -> dict[int, tuple[int, int, int, int, int]]:
        return {a.id: (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted, a.flags)
                for a in self.accounts.values()}


def _replace(t: _Transfer, **changes) -> _Transfer:
    values = vars(t) | changes
    return _Transfer(**values)


assert AMOUNT_MAX == U64_MAX  # noqa: S101 - a module-level consistency note, not a money guard
