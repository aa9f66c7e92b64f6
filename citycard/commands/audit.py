"""``citycard audit verify``: check the hash chain of the audit log; say which entries were edited,
removed or reordered. Exit code 0 when the log is whole, 1 when it is not."""

from __future__ import annotations

import argparse
from typing import Any

from citycard.commands.common import add_common_options, command, emit, open_registry, table

__all__ = ["register"]

EXIT_DAMAGED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="the hash-chained audit log")
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    verify = commands.add_parser("verify", help="find edited, removed or reordered entries")
    add_common_options(verify, unmask=False)
    verify.set_defaults(handler=verify_audit)


@command
def verify_audit(args: argparse.Namespace) -> int:
    with open_registry(args, write=False) as registry:
        problems = registry.verify_audit()
        entries = registry.audit_entry_count()
    document = {"ok": not problems, "entries": entries,
                "problems": [{"seq": p.seq, "kind": p.kind.value, "message": p.message} for p in problems]}

    def render(out: Any) -> None:
        if not problems:
            out.print(f"audit log OK: {entries} entries, hash chain intact")
            return
        out.print(f"audit log DAMAGED: {len(problems)} problem(s) in {entries} entries")
        out.print(table("problems", ("seq", "kind", "what"),
                        ((p.seq if p.seq is not None else "?", p.kind.value, p.message) for p in problems)))

    emit(args, document, render)
    return 0 if not problems else EXIT_DAMAGED
