"""citycard.v1.Cards: the registry's person, card and lifecycle operations, and the denylist stream.

Each call is one registry operation run on the writer thread; the registry checks every input and
refuses with a RegistryError, which errors.py turns into a status (a forbidden transition is
FAILED_PRECONDITION with reason TRANSITION_FORBIDDEN). Here, only enums and timestamps are translated.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
from collections.abc import AsyncIterator
from typing import Any

import grpc

from citycard.core.denylist import DenylistDelta
from citycard.core.identity import mask_id
from citycard.core.lifecycle import CardState
from citycard.core.registry import LossReportResult, Registry
from citycard.core.registry_records import Card, CardKind, Person
from citycard.core.registry_store import instant_ns
from citycard.server.auth import Principal
from citycard.server.common import Services, deadline_of, server_streaming, unary
from citycard.server.convert import format_int_id, timestamp
from citycard.server.errors import FieldError
from citycard.v1 import cards_pb2, cards_pb2_grpc

__all__ = ["CardsService", "DenylistWatch"]

_GENDERS = {cards_pb2.GENDER_MALE: "male", cards_pb2.GENDER_FEMALE: "female"}
_STATUSES = {value: name.removeprefix("PERSON_STATUS_").lower()
             for name, value in cards_pb2.PersonStatus.items() if value}
_CANCEL_REASONS = {value: name.removeprefix("CANCEL_REASON_").lower()
                   for name, value in cards_pb2.CancelReason.items() if value}
_CARD_STATES = {CardState(name.removeprefix("CARD_STATE_").lower()): value
                for name, value in cards_pb2.CardState.items() if value}
COUNTER = "counter"


def _enum(mapping: dict[int, str], value: int, field: str, enum_name: str) -> str:
    if value not in mapping:
        problem = "is required" if value == 0 else f"{value} is not a {enum_name} value"
        raise FieldError(field, problem)
    return mapping[value]


def _instant(text: str) -> Any:
    return timestamp(instant_ns(_dt.datetime.fromisoformat(text)))


def card_message(card: Card) -> cards_pb2.Card:
    holder = mask_id(card.holder) if card.kind is CardKind.INDIVIDUAL else card.holder
    return cards_pb2.Card(
        card_number=card.card_number, card_id_code=card.card_id_code, state=_CARD_STATES[card.state],
        holder_masked=holder, purse_account_id=format_int_id(card.purse_account_id),
        issue_date=card.issue_date.isoformat(), expiry_date=card.expiry_date.isoformat(),
        changed_at=timestamp(card.changed_at_ns), replaces=card.replaces or "", replaced_by=card.replaced_by or "")


def _card_and_categories(registry: Registry, card_number: str) -> tuple[Card, list[str]]:
    """A card and its holder's concession categories (an employer's card has none)."""
    card = registry.card(card_number)
    if card.kind is not CardKind.INDIVIDUAL:
        return card, []
    return card, [category.value for category in registry.person(card.holder).categories]


def person_message(person: Person) -> cards_pb2.Person:
    return cards_pb2.Person(
        id_number_masked=person.masked_id, name=person.name,
        gender=cards_pb2.GENDER_MALE if person.gender.value == "male" else cards_pb2.GENDER_FEMALE,
        status=cards_pb2.PersonStatus.Value("PERSON_STATUS_" + person.status.value.upper()),
        employer_unit_code=person.employer or "", medical_account_id=format_int_id(person.medical_account_id),
        registered_at=_instant(person.registered_at))


def delta_message(delta: DenylistDelta) -> cards_pb2.StreamDenylistResponse:
    return cards_pb2.StreamDenylistResponse(
        since_version=delta.since, version=delta.version, removed=list(delta.removed),
        added=[cards_pb2.DenylistEntry(card_number=entry.card_number, card_id_code=entry.card_id_code,
                                       state=_CARD_STATES[CardState(entry.state)], version=entry.version)
               for entry in delta.added])


class DenylistWatch:
    """The denylist's current version, and a way to wait until it moves past a given one (event loop side)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self._changed = asyncio.Event()

    def publish(self, version: int) -> None:
        self.version = version
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_beyond(self, version: int) -> int:
        while self.version <= version:
            await self._changed.wait()
        return self.version


class CardsService(cards_pb2_grpc.CardsServicer):
    def __init__(self, services: Services, watch: DenylistWatch) -> None:
        self.services = services
        self.watch = watch

    async def _run(self, context: grpc.aio.ServicerContext, operation: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.services.writer.call(operation, *args, deadline=deadline_of(context), **kwargs)

    @unary("Cards.AddEmployer")
    async def AddEmployer(self, request: cards_pb2.AddEmployerRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> cards_pb2.AddEmployerResponse:
        employer = await self._run(context, Registry.add_employer, request.unit_code, request.name,
                                   actor=request.actor, channel=COUNTER)
        return cards_pb2.AddEmployerResponse(unit_code=employer.unit_code)

    @unary("Cards.AddPerson")
    async def AddPerson(self, request: cards_pb2.AddPersonRequest, context: grpc.aio.ServicerContext,
                        principal: Principal) -> cards_pb2.AddPersonResponse:
        gender = _enum(_GENDERS, request.gender, "gender", "Gender")
        status = _enum(_STATUSES, request.status, "status", "PersonStatus")
        person = await self._run(
            context, Registry.add_person, id_number=request.id_number, name=request.name, gender=gender,
            date_of_birth=request.date_of_birth, residence=request.residence,
            household_registration=request.household_registration, status=status,
            employer=request.employer_unit_code or None, categories=list(request.categories), actor=request.actor,
            channel=COUNTER)
        return cards_pb2.AddPersonResponse(person=person_message(person))

    @unary("Cards.GetPerson")
    async def GetPerson(self, request: cards_pb2.GetPersonRequest, context: grpc.aio.ServicerContext,
                        principal: Principal) -> cards_pb2.GetPersonResponse:
        person = await self._run(context, Registry.person, request.id_number)
        return cards_pb2.GetPersonResponse(person=person_message(person))

    @unary("Cards.IssueCard")
    async def IssueCard(self, request: cards_pb2.IssueCardRequest, context: grpc.aio.ServicerContext,
                        principal: Principal) -> cards_pb2.IssueCardResponse:
        card = await self._run(context, Registry.issue_card, request.holder_id_number, actor=request.actor,
                               channel=COUNTER)
        return cards_pb2.IssueCardResponse(card=card_message(card))

    @unary("Cards.GetCard")
    async def GetCard(self, request: cards_pb2.GetCardRequest, context: grpc.aio.ServicerContext,
                      principal: Principal) -> cards_pb2.GetCardResponse:
        card, categories = await self._run(context, _card_and_categories, request.card_number)
        message = card_message(card)
        message.categories.extend(categories)
        return cards_pb2.GetCardResponse(card=message)

    @unary("Cards.ReportLoss")
    async def ReportLoss(self, request: cards_pb2.ReportLossRequest, context: grpc.aio.ServicerContext,
                         principal: Principal) -> cards_pb2.ReportLossResponse:
        kind = request.WhichOneof("report")
        card_number = request.card_number or None
        if kind == "phone":
            phone = request.phone
            result: LossReportResult = await self._run(
                context, Registry.report_loss_phone, id_number=phone.id_number, name=phone.name,
                gender=_enum(_GENDERS, phone.gender, "phone.gender", "Gender"), employer=phone.employer or None,
                card_number=card_number, actor=request.actor)
        elif kind == "online":
            result = await self._run(context, Registry.report_loss_online, id_number=request.online.id_number,
                                     password=request.online.password, card_number=card_number)
        elif kind == "written":
            written = request.written
            if card_number is None:
                raise FieldError("card_number", "a written report names the card")
            result = await self._run(
                context, Registry.report_loss_written, card_number, holder_id=written.holder_id_number,
                holder_name=written.holder_name, agent_id=written.agent_id_number or None,
                agent_name=written.agent_name or None, actor=request.actor)
        else:
            raise FieldError("report", "give a phone, online or written report")
        response = cards_pb2.ReportLossResponse(card=card_message(result.card),
                                                accepted_at=timestamp(instant_ns(result.accepted_at)),
                                                warnings=list(result.warnings))
        if result.restore_at is not None:
            response.restore_at.CopyFrom(timestamp(instant_ns(result.restore_at)))
        return response

    @unary("Cards.RestoreCard")
    async def RestoreCard(self, request: cards_pb2.RestoreCardRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> cards_pb2.RestoreCardResponse:
        card = await self._run(context, Registry.restore, request.card_number, reason=request.reason,
                               actor=request.actor, channel=COUNTER)
        return cards_pb2.RestoreCardResponse(card=card_message(card))

    @unary("Cards.ReplaceCard")
    async def ReplaceCard(self, request: cards_pb2.ReplaceCardRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> cards_pb2.ReplaceCardResponse:
        old, new = await self._run(context, Registry.replace, request.card_number, actor=request.actor,
                                   channel=COUNTER)
        return cards_pb2.ReplaceCardResponse(old_card=card_message(old), new_card=card_message(new))

    @unary("Cards.CancelCard")
    async def CancelCard(self, request: cards_pb2.CancelCardRequest, context: grpc.aio.ServicerContext,
                         principal: Principal) -> cards_pb2.CancelCardResponse:
        reason = _enum(_CANCEL_REASONS, request.reason, "reason", "CancelReason")
        card = await self._run(context, Registry.cancel, request.card_number, reason=reason,
                               note=request.note or None, actor=request.actor, channel=COUNTER)
        return cards_pb2.CancelCardResponse(card=card_message(card))

    @unary("Cards.LoadPurse")
    async def LoadPurse(self, request: cards_pb2.LoadPurseRequest, context: grpc.aio.ServicerContext,
                        principal: Principal) -> cards_pb2.LoadPurseResponse:
        def load(registry: Registry) -> tuple[int, int]:
            transfer_id = registry.load_purse(request.card_number, request.amount_fen, actor=request.actor,
                                              channel=COUNTER)
            return transfer_id, registry.card(request.card_number).purse_account_id

        transfer_id, purse_id = await self._run(context, load)
        return cards_pb2.LoadPurseResponse(transfer_id=format_int_id(transfer_id),
                                           purse_account_id=format_int_id(purse_id))

    @server_streaming("Cards.StreamDenylist")
    async def StreamDenylist(self, request: cards_pb2.StreamDenylistRequest, context: grpc.aio.ServicerContext,
                             principal: Principal) -> AsyncIterator[cards_pb2.StreamDenylistResponse]:
        delta = await self._run(context, Registry.denylist_delta, request.since_version)
        yield delta_message(delta)
        version = delta.version
        while request.follow:
            await self.watch.wait_beyond(version)
            delta = await self._run(context, Registry.denylist_delta, version)
            version = delta.version
            yield delta_message(delta)
