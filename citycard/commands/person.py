"""``citycard person add|show|set-password``."""

from __future__ import annotations

import argparse
from typing import Any

from citycard.commands.common import (
    add_common_options,
    command,
    emit,
    fen,
    fields_table,
    open_registry,
    operator,
    read_secret,
    record_unmask,
    table,
)
from citycard.core.registry import Registry
from citycard.core.registry_records import Category, Person, PersonStatus

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("person", help="insured persons: add, show, set-password")
    commands = parser.add_subparsers(dest="person_command", required=True, metavar="PERSON_COMMAND")

    add = commands.add_parser("add", help="register a person and open the medical personal account")
    add.add_argument("--id-number", required=True, help="the 18-character citizen ID (social security number)")
    add.add_argument("--name", required=True)
    add.add_argument("--gender", required=True, choices=["male", "female"])
    add.add_argument("--birth-date", required=True, metavar="YYYY-MM-DD", help="must match the ID number")
    add.add_argument("--nationality", default="CHN", help="ISO 3166 three-letter code (default: CHN)")
    add.add_argument("--residence", required=True)
    add.add_argument("--household", required=True, help="household registration (hukou)")
    add.add_argument("--employer", default=None, metavar="UNIT_CODE", help="the insured unit, if employed")
    add.add_argument("--status", required=True, choices=[status.value for status in PersonStatus])
    add.add_argument("--category", action="append", default=[], choices=[c.value for c in Category],
                     help="a concession category; repeat for more")
    add_common_options(add)
    add.set_defaults(handler=add_person)

    show = commands.add_parser("show", help="a person, the medical account and the cards")
    show.add_argument("id_number")
    add_common_options(show)
    show.set_defaults(handler=show_person)

    password = commands.add_parser("set-password",
                                   help="register the self-service password (read from stdin or a prompt)")
    password.add_argument("id_number")
    add_common_options(password, unmask=False)
    password.set_defaults(handler=set_password)



@command
def add_person(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        person = registry.add_person(
            id_number=args.id_number, name=args.name, gender=args.gender, date_of_birth=args.birth_date,
            nationality=args.nationality, residence=args.residence, household_registration=args.household,
            employer=args.employer, status=args.status, categories=args.category, actor=operator(args))
        record_unmask(registry, args, person.subject)
        document = person_document(registry, person, unmask=args.unmask)
    emit(args, document, lambda out: render_person(out, document, "person registered"))
    return 0


@command
def show_person(args: argparse.Namespace) -> int:
    with open_registry(args, write=args.unmask) as registry:
        person = registry.person(args.id_number)
        record_unmask(registry, args, person.subject)
        document = person_document(registry, person, unmask=args.unmask)
    emit(args, document, lambda out: render_person(out, document, "person"))
    return 0


@command
def set_password(args: argparse.Namespace) -> int:
    password = read_secret("self-service password: ")
    with open_registry(args) as registry:
        person = registry.person(args.id_number)
        registry.set_self_service_password(person.id_number, password, actor=operator(args))
    document = {"person": person.masked_id, "self_service_password": "set"}
    emit(args, document, lambda out: out.print(f"self-service password set for {person.masked_id}"))
    return 0


def person_document(registry: Registry, person: Person, *, unmask: bool) -> dict[str, Any]:
    balance = registry.ledger.balance(person.medical_account_id)
    return {
        "person": person.public(unmask=unmask),
        "employer": None if person.employer is None else registry.employer(person.employer).to_json(),
        "medical_account": {"id": f"{person.medical_account_id:032x}", "balance_fen": balance.credit_balance,
                            "frozen": registry.account_frozen(person.medical_account_id)},
        "cards": [card.public(unmask=unmask) for card in registry.cards_of(person.id_number)],
    }


def render_person(out: Any, document: dict[str, Any], title: str) -> None:
    out.print(fields_table(title, document["person"]))
    if document["employer"] is not None:
        out.print(f"employer: {document['employer']['name']} ({document['employer']['unit_code']})")
    account = document["medical_account"]
    out.print(f"medical account {account['id']}: balance {fen(account['balance_fen'])} yuan"
              + (", FROZEN" if account["frozen"] else ""))
    if document["cards"]:
        out.print(table("cards", ("card", "state", "issued", "expires"),
                        ((c["card_number"], c["state"], c["issue_date"], c["expiry_date"]) for c in document["cards"])))
