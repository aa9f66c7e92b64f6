"""The citycard.v1 API against a real server process: booking within a manifest, look-ups, streams,
health and reflection, and every kind of bad input answered with the right status and reason, nothing written."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import (
    CALL_TIMEOUT_S,
    add_person_with_card,
    auth,
    citizen_id,
    purse_manifest,
    refusal,
    register,
)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from citycard.v1 import applications_pb2, cards_pb2, common_pb2, ledger_pb2

C = grpc.StatusCode


@pytest.fixture(scope="module")
def world(server):
    """A person with a card holding 100.00 on its e-purse, and two registered purse applications."""
    card_number = add_person_with_card(server, citizen_id(sequence=111), load_fen=10_000)
    bike = register(server, purse_manifest("bikeshare"))
    other = register(server, purse_manifest("library"))
    card = server.cards().GetCard(cards_pb2.GetCardRequest(card_number=card_number),
                                  metadata=auth(server.operator_token)).card
    return {"card": card, "bike": bike, "other": other, "bike_auth": auth(bike.bearer_token),
            "settlement": bike.application.accounts[0].id, "other_settlement": other.application.accounts[0].id}


def fare(world, transfer_id: str, amount: int = 150, **fields) -> ledger_pb2.Transfer:
    values = dict(id=transfer_id, debit_account_id=world["card"].purse_account_id,
                  credit_account_id=world["settlement"], amount_fen=amount, ledger=2, code=11)
    values.update(fields)
    return ledger_pb2.Transfer(**values)


def balance(server, account_id: str) -> ledger_pb2.Balance:
    return server.ledger().GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=account_id),
                                             metadata=auth(server.operator_token)).balance


def assert_not_booked(server, *ids: str) -> None:
    found = server.ledger().LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=list(ids)),
                                            metadata=auth(server.operator_token))
    assert list(found.transfers) == []


def test_health_and_reflection_name_the_services(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "citycard.v1.Ledger", "citycard.v1.Cards", "citycard.v1.Applications"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {service.name for service in answer.list_services_response.service}
    assert {"citycard.v1.Ledger", "citycard.v1.Cards", "citycard.v1.Applications", "grpc.health.v1.Health"} <= names


def test_an_application_books_fares_into_its_own_account(server, world):
    ledger = server.ledger()
    before = balance(server, world["card"].purse_account_id).available_fen
    answer = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "a1"), fare(world, "a2")]),
                                    metadata=world["bike_auth"])
    assert list(answer.errors) == []
    assert balance(server, world["card"].purse_account_id).available_fen == before - 300
    # The same ids again: nothing moves twice.
    again = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "a1")]),
                                   metadata=world["bike_auth"])
    assert [(e.index, e.result) for e in again.errors] == [(0, ledger_pb2.TRANSFER_RESULT_EXISTS)]
    # A fare larger than the purse holds is that transfer's own result; the others are booked.
    mixed = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(
        transfers=[fare(world, "a3"), fare(world, "a4", amount=10**9)]), metadata=world["bike_auth"])
    assert [(e.index, e.result) for e in mixed.errors] == [(1, ledger_pb2.TRANSFER_RESULT_EXCEEDS_CREDITS)]
    booked = ledger.LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["a1", "a3"]), metadata=world["bike_auth"])
    assert [t.id for t in booked.transfers] == ["a1", "a3"]
    assert all(t.amount_fen == 150 and t.timestamp.seconds > 0 for t in booked.transfers)


def test_balance_as_of_a_past_instant_and_an_accounts_transfers(server, world):
    ledger = server.ledger()
    ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "b1", amount=200)]),
                           metadata=world["bike_auth"])
    stamp = ledger.LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["b1"]),
                                   metadata=world["bike_auth"]).transfers[0].timestamp
    ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "b2", amount=300)]),
                           metadata=world["bike_auth"])
    now = balance(server, world["settlement"]).credits_posted_fen
    then = ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=world["settlement"], as_of=stamp),
                                    metadata=world["bike_auth"]).balance.credits_posted_fen
    assert now - then == 300
    history = ledger.GetAccountTransfers(ledger_pb2.GetAccountTransfersRequest(account_id=world["settlement"],
                                                                               since=stamp),
                                         metadata=world["bike_auth"]).transfers
    assert [t.id for t in history] == ["b1", "b2"]


def test_the_stream_answers_every_request_in_order(server, world):
    requests = [ledger_pb2.CreateTransfersStreamRequest(request_id=100 + n, transfers=[fare(world, f"5{n:02x}", amount=1)])
                for n in range(20)]
    requests.append(ledger_pb2.CreateTransfersStreamRequest(request_id=999, transfers=[fare(world, "500", amount=1)]))
    answers = list(server.ledger().CreateTransfersStream(iter(requests), metadata=world["bike_auth"],
                                                         timeout=CALL_TIMEOUT_S))
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    assert all(not a.errors for a in answers[:-1])
    assert [e.result for e in answers[-1].errors] == [ledger_pb2.TRANSFER_RESULT_EXISTS]


def test_a_bad_request_in_a_stream_ends_it_after_the_good_ones(server, world):
    requests = [ledger_pb2.CreateTransfersStreamRequest(request_id=1, transfers=[fare(world, "7001", amount=1)]),
                ledger_pb2.CreateTransfersStreamRequest(request_id=2, transfers=[fare(world, "7002", amount=-5)])]
    call = server.ledger().CreateTransfersStream(iter(requests), metadata=world["bike_auth"], timeout=CALL_TIMEOUT_S)
    answers = []
    with pytest.raises(grpc.RpcError) as refused:
        for answer in call:
            answers.append(answer.request_id)
    assert answers == [1]
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "requests[1].transfers[0].amount_fen")
    assert_not_booked(server, "7002")


BAD_FIELDS = [
    ({"id": "xyz"}, "transfers[0].id"),
    ({"id": ""}, "transfers[0].id"),
    ({"id": "1" * 33}, "transfers[0].id"),
    ({"debit_account_id": ""}, "transfers[0].debit_account_id"),
    ({"amount": -1}, "transfers[0].amount_fen"),
    ({"code": 0}, "transfers[0].code"),
    ({"code": 70_000}, "transfers[0].code"),
    ({"ledger": 0}, "transfers[0].ledger"),
    ({"pending_id": "g"}, "transfers[0].pending_id"),
]


@pytest.mark.parametrize(("change", "field"), BAD_FIELDS)
def test_a_malformed_or_missing_field_is_invalid_argument_naming_it(server, world, change, field):
    values = {"transfer_id": "bad1"}
    transfer = fare(world, values["transfer_id"])
    for name, value in change.items():
        setattr(transfer, "amount_fen" if name == "amount" else name, value)
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "0c1"), transfer]),
                                        metadata=world["bike_auth"])
    code, reason, named = refusal(refused.value)
    assert (code, reason) == (C.INVALID_ARGUMENT, "FIELD_INVALID")
    assert named == field.replace("[0]", "[1]")
    assert_not_booked(server, "0c1", "bad1")


def test_a_reserved_id_and_an_empty_batch_are_refused(server, world):
    big = "f" + "0" * 31
    for request, expected in ((ledger_pb2.CreateTransfersRequest(transfers=[fare(world, big)]),
                               (C.INVALID_ARGUMENT, "ID_RESERVED", "transfers[0].id")),
                              (ledger_pb2.CreateTransfersRequest(), (C.INVALID_ARGUMENT, "FIELD_INVALID", "transfers"))):
        with pytest.raises(grpc.RpcError) as refused:
            server.ledger().CreateTransfers(request, metadata=world["bike_auth"])
        assert refusal(refused.value) == expected
    assert_not_booked(server, big)


def test_a_batch_over_the_limit_is_refused_whole(server, world):
    transfers = [fare(world, f"{n + 1:x}0000", amount=1) for n in range(8190)]
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=transfers),
                                        metadata=world["bike_auth"], timeout=CALL_TIMEOUT_S)
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "BATCH_TOO_LARGE", "transfers")
    assert_not_booked(server, transfers[0].id, transfers[-1].id)


def test_an_oversized_message_is_refused_by_the_transport(server, world):
    transfer = fare(world, "4e6e", user_data="")
    request = ledger_pb2.CreateTransfersRequest(transfers=[transfer] * 60_000)
    assert request.ByteSize() > 4 * 2**20
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().CreateTransfers(request, metadata=world["bike_auth"], timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == C.RESOURCE_EXHAUSTED
    assert_not_booked(server, "4e6e")


def test_missing_and_wrong_credentials_are_unauthenticated(server, world):
    request = ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "c1")])
    for metadata, reason in (((), "CREDENTIAL_MISSING"), (auth("cc1_not-a-token"), "CREDENTIAL_INVALID"),
                             ((("authorization", "Basic abc"),), "CREDENTIAL_INVALID")):
        with pytest.raises(grpc.RpcError) as refused:
            server.ledger().CreateTransfers(request, metadata=metadata)
        assert refusal(refused.value)[:2] == (C.UNAUTHENTICATED, reason)
    assert_not_booked(server, "c1")
    assert world["bike"].bearer_token not in server.log_text()


SCOPE_CASES = [
    ("the MEDICAL ledger", {"ledger": 1}, "MEDICAL_LEDGER_RESERVED"),
    ("a ledger outside the manifest", {"ledger": 16}, "LEDGER_OUT_OF_SCOPE"),
    ("a code outside the manifest", {"code": 10}, "CODE_OUT_OF_SCOPE"),
    ("another application's account", {"credit_account_id": "OTHER"}, "ACCOUNT_OUT_OF_SCOPE"),
    ("no account of its own", {"credit_account_id": "OPERATOR"}, "ACCOUNT_OUT_OF_SCOPE"),
]


@pytest.mark.parametrize(("what", "change", "reason"), SCOPE_CASES, ids=[case[0] for case in SCOPE_CASES])
def test_an_application_outside_its_manifest_is_denied_and_nothing_is_booked(server, world, what, change, reason):
    purse_before = balance(server, world["card"].purse_account_id)
    values = dict(change)
    if values.get("credit_account_id") == "OTHER":
        values["credit_account_id"] = world["other_settlement"]
    elif values.get("credit_account_id") == "OPERATOR":
        values["credit_account_id"] = f"{(3 << 120) | (2 << 16) | 5:x}"  # the registry's load account
    good, bad = fare(world, "ff01"), fare(world, "ff02", **values)
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[good, bad]),
                                        metadata=world["bike_auth"])
    code, got, _ = refusal(refused.value)
    assert (code, got) == (C.PERMISSION_DENIED, reason)
    assert_not_booked(server, "ff01", "ff02")
    assert balance(server, world["card"].purse_account_id) == purse_before


def test_an_application_reads_only_within_its_scope(server, world):
    ledger = server.ledger()
    with pytest.raises(grpc.RpcError) as refused:
        ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=world["other_settlement"]),
                                 metadata=world["bike_auth"])
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, "ACCOUNT_OUT_OF_SCOPE")
    with pytest.raises(grpc.RpcError) as refused:
        ledger.GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id="123456"), metadata=world["bike_auth"])
    assert refusal(refused.value)[:2] == (C.NOT_FOUND, "NOT_FOUND")
    with pytest.raises(grpc.RpcError) as refused:
        server.cards().GetPerson(cards_pb2.GetPersonRequest(id_number=citizen_id(sequence=111)),
                                 metadata=world["bike_auth"])
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")


def test_each_credential_calls_only_its_methods(server, world):
    with pytest.raises(grpc.RpcError) as refused:  # the operator books no raw transfers
        server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "ee01")]),
                                        metadata=auth(server.operator_token))
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    with pytest.raises(grpc.RpcError) as refused:  # the enrolment credential only registers
        server.cards().GetCard(cards_pb2.GetCardRequest(card_number=world["card"].card_number),
                               metadata=auth(server.enrolment_token))
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    with pytest.raises(grpc.RpcError) as refused:  # an application changes no card
        server.cards().CancelCard(cards_pb2.CancelCardRequest(actor="x", card_number=world["card"].card_number,
                                                              reason=cards_pb2.CANCEL_REASON_DEATH),
                                  metadata=world["bike_auth"])
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    assert_not_booked(server, "ee01")


def test_registration_is_checked(server):
    apps = server.applications()
    manifest = purse_manifest("healthapp")
    manifest.ledgers.append(1)
    for bad, expected in (
        (manifest, (C.PERMISSION_DENIED, "MEDICAL_LEDGER_RESERVED")),
        (purse_manifest("bikeshare"), (C.ALREADY_EXISTS, "ALREADY_EXISTS")),
        (applications_pb2.Manifest(name="x"), (C.INVALID_ARGUMENT, "FIELD_INVALID")),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            register(server, bad)
        assert refusal(refused.value)[:2] == expected
    unknown_kind = purse_manifest("kindly")
    unknown_kind.accounts[0].kind = 42
    with pytest.raises(grpc.RpcError) as refused:
        register(server, unknown_kind)
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "manifest.accounts[0].kind")
    defines = purse_manifest("ledgerer")
    defines.ledger_definitions.add(number=20, name="BIKE", movements=[applications_pb2.Movement(code=1)])
    with pytest.raises(grpc.RpcError) as refused:
        register(server, defines)  # with the enrolment credential
    assert refusal(refused.value)[:2] == (C.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    listed = apps.ListApplications(applications_pb2.ListApplicationsRequest(), metadata=auth(server.operator_token))
    assert "healthapp" not in {app.manifest.name for app in listed.applications}


def test_only_the_medical_application_books_on_medical(server):
    id_number = citizen_id(sequence=113)
    add_person_with_card(server, id_number, "李四")
    person = server.cards().GetPerson(cards_pb2.GetPersonRequest(id_number=id_number),
                                      metadata=auth(server.operator_token)).person
    assert person.id_number_masked == id_number[:6] + "*" * 8 + id_number[-4:]
    medical = register(server, applications_pb2.Manifest(
        name="medical", aid="D15600000503", ledgers=[1], transfer_codes=[1, 2],
        accounts=[applications_pb2.AccountSpec(name="individual_fund", ledger=1, kind=common_pb2.ACCOUNT_KIND_FUND)]),
        token=server.operator_token)
    fund = medical.application.accounts[0].id
    contribution = ledger_pb2.Transfer(id="e1", debit_account_id=fund, credit_account_id=person.medical_account_id,
                                       amount_fen=26_840, ledger=1, code=1)
    answer = server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[contribution]),
                                             metadata=auth(medical.bearer_token))
    assert list(answer.errors) == []
    assert balance(server, person.medical_account_id).available_fen == 26_840


def test_card_operations_map_their_refusals(server):
    cards = server.cards()
    operator = auth(server.operator_token)
    card_number = add_person_with_card(server, citizen_id(sequence=115), "王五")
    with pytest.raises(grpc.RpcError) as refused:  # a replacement needs a written report first
        cards.ReplaceCard(cards_pb2.ReplaceCardRequest(actor="op1", card_number=card_number), metadata=operator)
    assert refusal(refused.value)[:2] == (C.FAILED_PRECONDITION, "TRANSITION_FORBIDDEN")
    with pytest.raises(grpc.RpcError) as refused:
        cards.GetCard(cards_pb2.GetCardRequest(card_number="Z99999999"), metadata=operator)
    assert refusal(refused.value)[:2] == (C.NOT_FOUND, "NOT_FOUND")
    with pytest.raises(grpc.RpcError) as refused:
        cards.AddPerson(cards_pb2.AddPersonRequest(actor="op1", id_number=citizen_id(sequence=117), name="赵六",
                                                   gender=7, date_of_birth="1980-05-01", residence="x",
                                                   household_registration="x",
                                                   status=cards_pb2.PERSON_STATUS_RETIRED), metadata=operator)
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "gender")
    with pytest.raises(grpc.RpcError) as refused:
        cards.ReportLoss(cards_pb2.ReportLossRequest(actor="op1", card_number=card_number), metadata=operator)
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "report")
    state = cards.GetCard(cards_pb2.GetCardRequest(card_number=card_number), metadata=operator).card.state
    assert state == cards_pb2.CARD_STATE_ACTIVE
    full_id = citizen_id(sequence=117)
    assert full_id not in server.log_text()


def test_the_denylist_stream_follows_loss_reports(server, world):
    cards = server.cards()
    operator = auth(server.operator_token)
    id_number = citizen_id(sequence=119)
    card_number = add_person_with_card(server, id_number, "孙七")
    follow = cards.StreamDenylist(cards_pb2.StreamDenylistRequest(since_version=0, follow=True),
                                  metadata=world["bike_auth"], timeout=CALL_TIMEOUT_S)
    first = next(follow)
    assert card_number not in {entry.card_number for entry in first.added}
    report = cards.ReportLoss(cards_pb2.ReportLossRequest(
        actor="op2", card_number=card_number,
        phone=cards_pb2.PhoneReport(id_number=id_number, name="孙七", gender=cards_pb2.GENDER_MALE)),
        metadata=operator)
    assert report.card.state == cards_pb2.CARD_STATE_STOPPED and report.restore_at.seconds > 0
    change = next(follow)
    follow.cancel()
    assert change.since_version == first.version
    assert [(e.card_number, e.state) for e in change.added] == [(card_number, cards_pb2.CARD_STATE_STOPPED)]


def test_a_passed_deadline_writes_nothing(server, world):
    # A deadline already past when the call starts is refused before anything is sent. (timeout=0 is not "past":
    # grpc sends it as a timeout of about a millisecond, within which the server can answer a lone transfer.)
    # The writer's dropping of requests whose deadline passes while they wait in its queue is tested in-process
    # in test_writer.py.
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "d1")]),
                                        metadata=world["bike_auth"], timeout=-1)
    assert refused.value.code() == C.DEADLINE_EXCEEDED
    assert_not_booked(server, "d1")


def test_a_transfer_retried_after_a_deadline_is_booked_once(server, world):
    # What a gate does after DEADLINE_EXCEEDED: it cannot know whether the server wrote the transfer, so it sends
    # the same id again. Whichever way the racing first call went, the fare is booked exactly once.
    ledger = server.ledger()
    try:
        first = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "d2")]),
                                       metadata=world["bike_auth"], timeout=0)
        assert list(first.errors) == []
    except grpc.RpcError as late:
        assert late.code() == C.DEADLINE_EXCEEDED
    again = ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=[fare(world, "d2")]),
                                   metadata=world["bike_auth"], timeout=CALL_TIMEOUT_S)
    assert [e.result for e in again.errors] in ([], [ledger_pb2.TRANSFER_RESULT_EXISTS])
    booked = ledger.LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=["d2"]), metadata=world["bike_auth"])
    assert [(t.id, t.amount_fen) for t in booked.transfers] == [("d2", 150)]


def test_a_balance_as_of_before_the_epoch_is_refused(server, world):
    stamp = timestamp_pb2.Timestamp(seconds=-5)
    with pytest.raises(grpc.RpcError) as refused:
        server.ledger().GetAccountBalance(ledger_pb2.GetAccountBalanceRequest(account_id=world["settlement"],
                                                                              as_of=stamp),
                                          metadata=world["bike_auth"])
    assert refusal(refused.value) == (C.INVALID_ARGUMENT, "FIELD_INVALID", "as_of")
