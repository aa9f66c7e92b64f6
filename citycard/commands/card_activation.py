"""``citycard card activate``: a holder activates a production card at a designated institution.

    citycard card activate A00000012 --id-number 370102198503120038 --name 张伟 --institution 济南市社保服务中心
    citycard card activate A00000012 --financial --bank 中国工商银行济南分行

The holder shows the ID card (``--id-number``, ``--name``: checked against the card's holder) and types a
new six-digit PIN, twice at a terminal or once on standard input, never as an argument: the chip's
initial PIN is replaced by it, then the card is active in the registry. ``--reader`` talks to the card
in a PC/SC reader; without it the chip file of the card (DIR/production/chips) is used. ``--financial``
records the bank's later, separate activation of the card's financial functions.
"""

from __future__ import annotations

import argparse
import sys

from citycard.apps.production import activate, activate_financial
from citycard.card import PcscTransport
from citycard.commands.batch import production, production_command
from citycard.commands.common import (
    EXIT_REFUSED,
    add_common_options,
    emit,
    fields_table,
    operator,
    read_secret,
)

__all__ = ["register"]


def register(card_commands: argparse._SubParsersAction) -> None:
    parser = card_commands.add_parser("activate", help="activate a production card for its holder (new PIN), or "
                                                       "record the bank's financial activation")
    parser.add_argument("card")
    parser.add_argument("--id-number", default=None, help="from the ID card the holder shows")
    parser.add_argument("--name", default=None, help="from the ID card the holder shows")
    parser.add_argument("--institution", default=None, help="the designated institution where this happens")
    parser.add_argument("--reader", default=None, help="the PC/SC reader holding the card (default: the chip file)")
    parser.add_argument("--financial", action="store_true", help="record the bank's financial activation instead")
    parser.add_argument("--bank", default=None, help="with --financial: the bank (branch)")
    add_common_options(parser, unmask=False)
    parser.set_defaults(handler=activate_command)


@production_command
def activate_command(args: argparse.Namespace) -> int:
    if args.financial:
        return _financial(args)
    missing = [flag for flag, value in (("--id-number", args.id_number), ("--name", args.name),
                                        ("--institution", args.institution)) if not value]
    if missing:
        print(f"citycard: error: card activate needs {', '.join(missing)}", file=sys.stderr)
        return EXIT_REFUSED
    pin = read_secret("new PIN (6 digits): ")
    if sys.stdin.isatty() and read_secret("the new PIN again: ") != pin:
        print("citycard: error: pin: the two entries differ; nothing was changed", file=sys.stderr)
        return EXIT_REFUSED
    transport = PcscTransport(args.reader) if args.reader else None
    with production(args) as ctx:
        row = activate(ctx.registry, ctx.store, args.card, id_number=args.id_number, name=args.name,
                       institution=args.institution, new_pin=pin, actor=operator(args), transport=transport)
    document = {"card": row.card_number, "state": "active", "institution": row.activated["institution"],
                "holder": row.masked_id}
    emit(args, document, lambda out: out.print(fields_table(f"card {row.card_number} activated", document)))
    return 0


def _financial(args: argparse.Namespace) -> int:
    if not args.bank:
        print("citycard: error: card activate --financial needs --bank", file=sys.stderr)
        return EXIT_REFUSED
    with production(args) as ctx:
        row = activate_financial(ctx.registry, ctx.store, args.card, bank=args.bank, actor=operator(args))
    document = {"card": row.card_number, "financial_activation": row.bank_activation, "holder": row.masked_id}
    emit(args, document, lambda out: out.print(fields_table(f"card {row.card_number}: financial functions open",
                                                            document)))
    return 0
