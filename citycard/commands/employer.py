"""``citycard employer add|show``: the insured units persons are employed by (registered by person.py)."""

from __future__ import annotations

import argparse

from citycard.commands.common import add_common_options, command, emit, fields_table, open_registry, operator

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("employer", help="insured units: add, show")
    commands = parser.add_subparsers(dest="employer_command", required=True, metavar="EMPLOYER_COMMAND")

    add = commands.add_parser("add", help="register an insured unit")
    add.add_argument("unit_code", help="the 18-character unified social credit code")
    add.add_argument("--name", required=True, help="the unit's registered name")
    add_common_options(add, unmask=False)
    add.set_defaults(handler=add_employer)

    show = commands.add_parser("show", help="show an insured unit")
    show.add_argument("unit_code")
    add_common_options(show, unmask=False)
    show.set_defaults(handler=show_employer)


@command
def add_employer(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        employer = registry.add_employer(args.unit_code, args.name, actor=operator(args))
    emit(args, employer.to_json(), lambda out: out.print(fields_table("employer registered", employer.to_json())))
    return 0


@command
def show_employer(args: argparse.Namespace) -> int:
    with open_registry(args, write=False) as registry:
        employer = registry.employer(args.unit_code)
    emit(args, employer.to_json(), lambda out: out.print(fields_table("employer", employer.to_json())))
    return 0
