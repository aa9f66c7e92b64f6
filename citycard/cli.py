"""The `citycard` command: thin wiring of the parts' own sub-commands.

Each part registers its commands with a `register(subparsers)` function; this module only builds the
top-level parser, the common options (--data, --json) and dispatches. Every command takes
`--data DIR` (default ./var) and honours CITYCARD_NOW (core/clock.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from citycard import demo

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citycard", description="A city's citizen / social security card platform.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_parser = commands.add_parser("demo", help="book a small realistic day and show what happened")
    demo_parser.add_argument("--data", default="var", help="data directory (default: ./var)")
    demo_parser.set_defaults(handler=demo.run)

    card_parser = commands.add_parser("card", help="cards: the virtual card, issue, loss reports, replacement")
    card_commands = card_parser.add_subparsers(dest="card_command", required=True, metavar="CARD_COMMAND")
    _register_optional("citycard.card.cli", card_commands)
    _register_optional("citycard.commands.cards", card_commands)
    _register_optional("citycard.commands.card_activation", card_commands)

    for module in ("citycard.commands.person", "citycard.commands.employer", "citycard.commands.lifecycle",
                   "citycard.commands.denylist", "citycard.commands.audit", "citycard.commands.serve",
                   "citycard.commands.roster", "citycard.commands.batch", "citycard.commands.medical"):
        _register_optional(module, commands)
    _register_optional("citycard.commands.transit", commands)
    return parser


def _register_optional(module_name: str, subparsers: argparse._SubParsersAction) -> None:
    """Commands of parts that are not built yet are simply absent, never stubs."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return
        raise
    module.register(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
