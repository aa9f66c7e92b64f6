"""``citycard denylist show [--since VERSION]``: the cards terminals must refuse, or what changed since
a version a terminal already has."""

from __future__ import annotations

import argparse
from typing import Any

from citycard.commands.common import add_common_options, command, emit, open_registry, table

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("denylist", help="the versioned list of cards terminals refuse")
    commands = parser.add_subparsers(dest="denylist_command", required=True, metavar="DENYLIST_COMMAND")
    show = commands.add_parser("show", help="the whole list, or the delta since a version")
    show.add_argument("--since", type=int, default=0, metavar="VERSION",
                      help="only what changed after this version (default 0: the whole list)")
    add_common_options(show, unmask=False)
    show.set_defaults(handler=show_denylist)


@command
def show_denylist(args: argparse.Namespace) -> int:
    with open_registry(args, write=False) as registry:
        delta = registry.denylist_delta(args.since)
    document = delta.to_json()

    def render(out: Any) -> None:
        scope = "whole list" if delta.since == 0 else f"changes since version {delta.since}"
        out.print(f"denylist version {delta.version} ({scope}): {len(delta.added)} added, {len(delta.removed)} removed")
        if delta.added:
            out.print(table("added", ("card", "card identification code", "state", "version", "listed at"),
                            ((e.card_number, e.card_id_code, e.state, e.version, e.listed_at) for e in delta.added)))
        if delta.removed:
            out.print(f"removed: {', '.join(delta.removed)}")

    emit(args, document, render)
    return 0
