"""What every registry command shares: its options, opening the registry, errors, and output.

Options: ``--data DIR`` (default ./var; the ledger and the registry live in DIR/ledger), ``--json``
(one JSON document on stdout instead of tables), ``--unmask`` (show whole ID numbers; the showing is
audited under the operator's name) and ``--operator NAME`` (who acts: default $CITYCARD_OPERATOR, else
the login name). Time comes from the one clock, so CITYCARD_NOW pins it.

A refused command prints one line on stderr, ``citycard: error: <subject>: <field>: <reason>``, exits
with code 2 and has changed nothing.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from citycard.core.clock import ClockError
from citycard.core.identity import IdentityError
from citycard.core.lifecycle import LifecycleError
from citycard.core.registry import Registry
from citycard.core.registry_records import RegistryError
from citycard.core.settings import SettingsError
from citycard.core.workdays import HolidayTableError

__all__ = ["add_common_options", "command", "emit", "open_registry", "operator", "read_secret", "table"]

EXIT_REFUSED = 2
OPERATOR_ENV = "CITYCARD_OPERATOR"
SECRET_LENGTH_MAX = 1024
_REFUSALS = (RegistryError, SettingsError, IdentityError, ClockError, LifecycleError, HolidayTableError)


def add_common_options(parser: argparse.ArgumentParser, *, unmask: bool = True) -> None:
    parser.add_argument("--data", default="var", metavar="DIR", help="data directory (default: ./var)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--operator", default=None, metavar="NAME",
                        help=f"who acts (default: ${OPERATOR_ENV}, else the login name)")
    if unmask:
        parser.add_argument("--unmask", action="store_true", help="show whole ID numbers (audited)")


def operator(args: argparse.Namespace) -> str:
    return args.operator or os.environ.get(OPERATOR_ENV) or getpass.getuser()


def open_registry(args: argparse.Namespace, *, write: bool = True) -> Registry:
    """The registry in --data; a read-only command does not create one and takes no lock."""
    return Registry.open(Path(args.data), create=write, write=write)


def command(handler: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Run a command handler; a refusal becomes one line on stderr and exit code 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args) or 0)
        except _REFUSALS as exc:
            message = " ".join(str(exc).split())
            print(f"citycard: error: {message}", file=sys.stderr)
            return EXIT_REFUSED

    return run


def read_secret(prompt: str) -> str:
    """A password from the terminal (not echoed) or the first line of standard input; never an argument,
    which every user of the machine could read in the process list."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    line = sys.stdin.readline(SECRET_LENGTH_MAX + 1)
    return line.rstrip("\r\n")


def record_unmask(registry: Registry, args: argparse.Namespace, subject: str) -> None:
    if getattr(args, "unmask", False):
        registry.record_operator_action("operator.unmask", subject, actor=operator(args))


PIPE_WIDTH = 160  # output read by a program or a log is not wrapped to a guessed 80 columns


def console() -> Console:
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def emit(args: argparse.Namespace, document: Mapping[str, Any], render: Callable[[Console], None]) -> None:
    """JSON with --json, else what ``render`` draws."""
    if args.json:
        print(json.dumps(document, ensure_ascii=False, indent=2, default=str))
    else:
        render(console())


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    grid = Table(title=title, title_justify="left")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("" if value is None else str(value) for value in row))
    return grid


def fields_table(title: str, record: Mapping[str, Any]) -> Table:
    return table(title, ("field", "value"), ((name, _text(value)) for name, value in record.items()))


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{key}={_text(item)}" for key, item in value.items() if item is not None) or "-"
    return str(value)


def fen(amount: int) -> str:
    """Fen as yuan for people: 12345 -> '123.45'."""
    sign = "-" if amount < 0 else ""
    yuan, cents = divmod(abs(amount), 100)
    return f"{sign}{yuan}.{cents:02d}"
