"""``citycard lifecycle tick``: restore cards whose written loss report did not follow in time, and
expire cards past their expiry date, as of now (CITYCARD_NOW pins it). Calendar warnings (a year the
official calendar does not cover) are printed with the result."""

from __future__ import annotations

import argparse
from typing import Any

from citycard.commands.common import add_common_options, command, emit, open_registry, table
from citycard.core.registry import tick

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lifecycle", help="the card lifecycle's timers")
    commands = parser.add_subparsers(dest="lifecycle_command", required=True, metavar="LIFECYCLE_COMMAND")
    tick_parser = commands.add_parser("tick", help="restore and expire the cards that are due now")
    add_common_options(tick_parser, unmask=False)
    tick_parser.set_defaults(handler=run_tick)


@command
def run_tick(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        report = tick(registry)
    document = report.to_json()

    def render(out: Any) -> None:
        for warning in report.warnings:
            out.print(f"warning: {warning}")
        out.print(f"tick at {report.at.isoformat()}: {len(report.restored)} restored, {len(report.expired)} expired, "
                  f"{report.waiting} stopped card(s) waiting")
        if report.restored:
            out.print(table("restored", ("card", "report accepted", "deadline (end of)", "restored at"),
                            ((r.card_number, r.report_accepted_at, r.restore_deadline, r.restored_at.isoformat())
                             for r in report.restored)))
        if report.expired:
            out.print(f"expired: {', '.join(report.expired)}")
        if report.more:
            out.print("more cards are due: run the tick again")

    emit(args, document, render)
    return 0
