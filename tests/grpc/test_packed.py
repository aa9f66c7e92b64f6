"""The packed form (``packed_transfers``: 128-byte records, ledger.proto) against a real server: booked exactly
like Transfer messages, checked as strictly (every malformed payload is INVALID_ARGUMENT naming the record and
field, nothing written), and held to the same manifest scope."""

from __future__ import annotations

import grpc
import pytest
from grpc_helpers import (
    CALL_TIMEOUT_S,
    add_person_with_card,
    auth,
    citizen_id,
    packed_record,
    purse_manifest,
    refusal,
    refusal_field,
    register,
)

from citycard.v1 import cards_pb2, ledger_pb2

C = grpc.StatusCode
PURSE, PURCHASE, REFUND = 2, 11, 4
LINKED, PENDING = 1, 2


@pytest.fixture(scope="module")
def world(server):
    """A card with 100.00 on its e-purse, a purse application that books fares, and another application."""
    card_number = add_person_with_card(server, citizen_id(sequence=151), load_fen=10_000)
    card = server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card_number),
                                  metadata=auth(server.operator_token)).card
    bike = register(server, purse_manifest("packedbike"))
    other = register(server, purse_manifest("packedother"))
    return {"purse": int(card.purse_account_id, 16), "purse_hex": card.purse_account_id,
            "settlement": int(bike.application.accounts[0].id, 16), "settlement_hex": bike.application.accounts[0].id,
            "other_settlement": int(other.application.accounts[0].id, 16), "auth": auth(bike.bearer_token)}


def fare(world, transfer_id: int, amount: int = 100, **fields) -> bytes:
    values = {"id": transfer_id, "debit_account_id": world["purse"], "credit_account_id": world["settlement"],
              "amount_fen": amount, "ledger": PURSE, "code": PURCHASE, **fields}
    return packed_record(**values)


def book(server, world, payload: bytes) -> ledger_pb2.CreateTransfersResponse:
    return server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(packed_transfers=payload),
                                           metadata=world["auth"], timeout=CALL_TIMEOUT_S)


def lookup(server, *ids: int) -> list[ledger_pb2.Transfer]:
    return list(server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=[f"{i:x}" for i in ids]),
                                                metadata=auth(server.operator_token)).transfers)


def balance(server, account_hex: str) -> ledger_pb2.Balance:
    return server.ledger().GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=account_hex),
                                             metadata=auth(server.operator_token)).balance


def test_packed_transfers_are_booked_and_read_back_field_by_field(server, world):
    before = balance(server, world["purse_hex"]).available_fen
    payload = (fare(world, 0x1001, 120, user_data=(7 << 100) | 42)
               + fare(world, 0x1002, 80)
               + fare(world, 0x1003, 10**9))  # more than the purse holds: that transfer's own result
    answer = book(server, world, payload)
    assert [(e.index, e.result) for e in answer.errors] == [(2, ledger_pb2.TRANSFER_RESULT_EXCEEDS_CREDITS)]
    assert balance(server, world["purse_hex"]).available_fen == before - 200
    first, second = lookup(server, 0x1001, 0x1002)
    assert (first.id, first.debit_account_id, first.credit_account_id) == \
        ("1001", world["purse_hex"], world["settlement_hex"])
    assert (first.amount_fen, first.ledger, first.code, first.user_data) == \
        (120, PURSE, PURCHASE, f"{(7 << 100) | 42:x}")
    assert second.amount_fen == 80 and first.timestamp.seconds > 0
    # The same records again: ids are idempotency keys in the packed form too.
    again = book(server, world, payload[:256])
    assert [(e.index, e.result) for e in again.errors] == [(0, ledger_pb2.TRANSFER_RESULT_EXISTS),
                                                          (1, ledger_pb2.TRANSFER_RESULT_EXISTS)]


def test_packed_flags_hold_and_post(server, world):
    hold = fare(world, 0x2001, 300, flags=PENDING, timeout_seconds=3600)
    post = fare(world, 0x2002, 0, pending_id=0x2001, flags=4)  # post_pending_transfer, the whole amount
    assert list(book(server, world, hold).errors) == []
    held = lookup(server, 0x2001)[0]
    assert held.pending and held.timeout_seconds == 3600
    assert list(book(server, world, post).errors) == []
    posted = lookup(server, 0x2002)[0]
    assert posted.post_pending_transfer and posted.pending_id == "2001" and posted.amount_fen == 300


def test_a_stream_takes_packed_and_message_requests_in_order(server, world):
    message = ledger_pb2.Transfer(id="3002", debit_account_id=world["purse_hex"],
                                  credit_account_id=world["settlement_hex"], amount_fen=1, ledger=PURSE, code=PURCHASE)
    requests = [ledger_pb2.CreateTransfersStreamRequest(request_id=1, packed_transfers=fare(world, 0x3001, 1)),
                ledger_pb2.CreateTransfersStreamRequest(request_id=2, transfers=[message]),
                ledger_pb2.CreateTransfersStreamRequest(
                    request_id=3, packed_transfers=b"".join(fare(world, 0x3003 + n, 1) for n in range(50))),
                ledger_pb2.CreateTransfersStreamRequest(request_id=4, packed_transfers=fare(world, 0x3001, 1))]
    answers = list(server.ledger().CreateTransfersStream(iter(requests), metadata=world["auth"],
                                                         timeout=CALL_TIMEOUT_S))
    assert [a.request_id for a in answers] == [1, 2, 3, 4]
    assert [list(a.errors) for a in answers[:3]] == [[], [], []]
    assert [e.result for e in answers[3].errors] == [ledger_pb2.TRANSFER_RESULT_EXISTS]
    assert len(lookup(server, *range(0x3001, 0x3003 + 50))) == 52


MALFORMED = [
    ("a record cut short", lambda w: fare(w, 0x4001)[:-1], "FIELD_INVALID", "packed_transfers"),
    ("a byte too many", lambda w: fare(w, 0x4001) + b"\0", "FIELD_INVALID", "packed_transfers"),
    ("over the batch limit", lambda w: fare(w, 0x4001) * 8190, "BATCH_TOO_LARGE", "packed_transfers"),
    ("a zero id", lambda w: fare(w, 0), "FIELD_INVALID", "packed_transfers[1].id"),
    ("a platform id", lambda w: fare(w, 1 << 124), "ID_RESERVED", "packed_transfers[1].id"),
    ("no debit account", lambda w: fare(w, 0x4001, debit_account_id=0), "FIELD_INVALID",
     "packed_transfers[1].debit_account_id"),
    ("no credit account", lambda w: fare(w, 0x4001, credit_account_id=0), "FIELD_INVALID",
     "packed_transfers[1].credit_account_id"),
    ("an amount over int64", lambda w: fare(w, 0x4001, amount=2**63), "FIELD_INVALID", "packed_transfers[1].amount_fen"),
    ("no ledger", lambda w: fare(w, 0x4001, ledger=0), "FIELD_INVALID", "packed_transfers[1].ledger"),
    ("no code", lambda w: fare(w, 0x4001, code=0), "FIELD_INVALID", "packed_transfers[1].code"),
    ("a reserved flag bit", lambda w: fare(w, 0x4001, flags=1 << 4), "FIELD_INVALID", "packed_transfers[1].flags"),
    ("bytes 104 to 111 set", lambda w: fare(w, 0x4001, reserved_104=1), "FIELD_INVALID", "packed_transfers[1].reserved"),
    ("bytes 124 to 127 set", lambda w: fare(w, 0x4001, reserved_124=1 << 31), "FIELD_INVALID",
     "packed_transfers[1].reserved"),
]


@pytest.mark.parametrize(("what", "bad", "reason", "field"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_packed_payload_is_invalid_argument_and_nothing_is_written(server, world, what, bad, reason,
                                                                              field):
    good = fare(world, 0x4000)  # the request's first record is fine; it must not be booked either
    payload = bad(world) if field == "packed_transfers" else good + bad(world)
    with pytest.raises(grpc.RpcError) as refused:
        book(server, world, payload)
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, reason, field)
    assert lookup(server, 0x4000, 0x4001) == []


def test_transfers_and_packed_transfers_together_are_refused(server, world):
    message = ledger_pb2.Transfer(id="4101", debit_account_id=world["purse_hex"],
                                  credit_account_id=world["settlement_hex"], amount_fen=1, ledger=PURSE, code=PURCHASE)
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(
            transfers=[message], packed_transfers=fare(world, 0x4102)), metadata=world["auth"], timeout=CALL_TIMEOUT_S)
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "packed_transfers")
    assert lookup(server, 0x4101, 0x4102) == []


def test_a_malformed_packed_request_ends_a_stream_after_the_good_ones(server, world):
    requests = [ledger_pb2.CreateTransfersStreamRequest(request_id=1, packed_transfers=fare(world, 0x4201, 1)),
                ledger_pb2.CreateTransfersStreamRequest(request_id=2, packed_transfers=fare(world, 0x4202, 1)[:100])]
    answers = []
    with pytest.raises(grpc.RpcError) as refused:
        for answer in server.ledger().CreateTransfersStream(iter(requests), metadata=world["auth"],
                                                            timeout=CALL_TIMEOUT_S):
            answers.append(answer.request_id)
    assert answers == [1]
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "requests[1].packed_transfers")
    assert len(lookup(server, 0x4201)) == 1


SCOPE = [
    ("the MEDICAL ledger", {"ledger": 1}, "MEDICAL_LEDGER_RESERVED", "packed_transfers[1].ledger"),
    ("a ledger outside the manifest", {"ledger": 16}, "LEDGER_OUT_OF_SCOPE", "packed_transfers[1].ledger"),
    ("a code outside the manifest", {"code": 10}, "CODE_OUT_OF_SCOPE", "packed_transfers[1].code"),
    ("another application's account", {"credit_account_id": "OTHER"}, "ACCOUNT_OUT_OF_SCOPE", "packed_transfers[1]"),
    ("no account of its own", {"credit_account_id": (3 << 120) | (2 << 16) | 5}, "ACCOUNT_OUT_OF_SCOPE",
     "packed_transfers[1]"),
]


@pytest.mark.parametrize(("what", "change", "reason", "field"), SCOPE, ids=[case[0] for case in SCOPE])
def test_packed_transfers_outside_the_manifest_are_denied_and_nothing_is_booked(server, world, what, change, reason,
                                                                               field):
    values = dict(change)
    if values.get("credit_account_id") == "OTHER":
        values["credit_account_id"] = world["other_settlement"]
    purse_before = balance(server, world["purse_hex"])
    with pytest.raises(grpc.RpcError) as refused:
        book(server, world, fare(world, 0x5000, 1) + fare(world, 0x5100, 1, **values))
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, reason)
    assert refusal_field(refused.value) == field
    assert lookup(server, 0x5000, 0x5100) == []
    assert balance(server, world["purse_hex"]) == purse_before
