"""The medical application's side of the core: the calls it makes over gRPC with its own credential.

Everything the application books goes through ``Ledger.CreateTransfers``, where the server holds it to
the medical manifest (MEDICAL, its four codes, its own funds and institutions account); nothing here can
book outside that, whatever a bug above does.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from citycard.v1 import cards_pb2, cards_pb2_grpc, ledger_pb2, ledger_pb2_grpc

__all__ = ["Booking", "CoreClient", "CoreError"]

CALL_TIMEOUT_S = 30.0
TRANSFERS_PAGE = 8189
PAGES_MAX = 10_000
ACCOUNT_NAMES = ("individual_fund", "pooled_fund", "institutions")


class CoreError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Booking:
    """The ledger's answer to one request: ``errors`` maps the index of each transfer not booked to its result."""

    errors: dict[int, str]

    @property
    def booked(self) -> bool:
        return not self.errors

    @property
    def replayed(self) -> bool:
        """Every transfer existed already, identical: the request was booked before (an idempotent resend)."""
        return bool(self.errors) and all(result == "TRANSFER_RESULT_EXISTS" for result in self.errors.values())

    def first_failure(self) -> str:
        return self.failure()[1]

    def failure(self) -> tuple[int, str]:
        """The index of the transfer that failed the chain, and why (without the TRANSFER_RESULT_ prefix)."""
        for index, result in sorted(self.errors.items()):
            if result not in ("TRANSFER_RESULT_LINKED_EVENT_FAILED", "TRANSFER_RESULT_EXISTS"):
                return index, result.removeprefix("TRANSFER_RESULT_")
        return -1, "LINKED_EVENT_FAILED"


class CoreClient:
    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...],
                 accounts: dict[str, str]) -> None:
        missing = [name for name in ACCOUNT_NAMES if name not in accounts]
        if missing:
            raise ValueError(f"the medical application owns no account named {', '.join(missing)}")
        self.metadata = metadata
        self.ledger = ledger_pb2_grpc.LedgerStub(channel)
        self.cards = cards_pb2_grpc.CardsStub(channel)
        self.individual_fund = accounts["individual_fund"]
        self.pooled_fund = accounts["pooled_fund"]
        self.institutions = accounts["institutions"]
        # PURSE: what the insured pays from the e-purse; absent in a registration made before it existed
        self.institutions_purse = accounts.get("institutions_purse", "")
        # MEDICAL: pays institutions for partner cities' insured; absent in a registration made before it existed
        self.clearing = accounts.get("clearing", "")

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            reason = "not_found" if code == grpc.StatusCode.NOT_FOUND else "core_unavailable" \
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED) else "core_refused"
            raise CoreError(reason, f"{code.name}: {exc.details()}") from None  # type: ignore[attr-defined]

    def person(self, id_number: str) -> cards_pb2.Person:
        return self._call(self.cards.GetPerson, cards_pb2.GetPersonRequest(id_number=id_number)).person

    def card(self, card_number: str) -> cards_pb2.Card:
        return self._call(self.cards.GetCard, cards_pb2.GetCardRequest(card_number=card_number)).card

    def account(self, account_id: str) -> ledger_pb2.Account | None:
        found = self._call(self.ledger.LookupAccounts, ledger_pb2.LookupAccountsRequest(ids=[account_id])).accounts
        return found[0] if found else None

    def accounts(self, account_ids: list[str]) -> list[ledger_pb2.Account]:
        return list(self._call(self.ledger.LookupAccounts, ledger_pb2.LookupAccountsRequest(ids=account_ids)).accounts)

    def available_fen(self, account_id: str) -> int:
        answer = self._call(self.ledger.GetAccountBalance, ledger_pb2.GetAccountBalanceRequest(account_id=account_id))
        return int(answer.balance.available_fen)

    def balance(self, account_id: str) -> ledger_pb2.Balance:
        return self._call(self.ledger.GetAccountBalance,
                          ledger_pb2.GetAccountBalanceRequest(account_id=account_id)).balance

    def book(self, transfers: list[ledger_pb2.Transfer]) -> Booking:
        answer = self._call(self.ledger.CreateTransfers, ledger_pb2.CreateTransfersRequest(transfers=transfers))
        return Booking({error.index: ledger_pb2.TransferResult.Name(error.result) for error in answer.errors})

    def account_transfers(self, account_id: str) -> list[ledger_pb2.Transfer]:
        return list(self._call(self.ledger.GetAccountTransfers,
                               ledger_pb2.GetAccountTransfersRequest(account_id=account_id)).transfers)

    def all_account_transfers(self, account_id: str) -> list[ledger_pb2.Transfer]:
        """Every transfer of the account, oldest first, asked for a page at a time."""
        out: list[ledger_pb2.Transfer] = []
        request = ledger_pb2.GetAccountTransfersRequest(account_id=account_id, limit=TRANSFERS_PAGE)
        for _ in range(PAGES_MAX):
            page = self._call(self.ledger.GetAccountTransfers, request).transfers
            out.extend(page)
            if len(page) < TRANSFERS_PAGE:
                return out
            request.since.FromNanoseconds(page[-1].timestamp.ToNanoseconds() + 1)
        raise CoreError("core_refused", f"account {account_id} has more than {PAGES_MAX * TRANSFERS_PAGE} transfers")
