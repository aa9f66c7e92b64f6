"""``citycard batch create|list|show|export-print|export-review|import-review|register-printed|personalize|
distribute``: card production batches, from ordered cards to cards in their holders' hands.

Also what the production commands share (``citycard roster`` / ``photos`` and ``card activate`` use it):
opening the registry with the production store and settings, a progress bar on standard error for
long work, the summary tables, and refusals: one line on stderr naming file, row, field and reason,
exit code 2, nothing changed. ID numbers are masked unless ``--unmask`` (audited).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from citycard.apps.production import (
    ProductionSettings,
    ProductionStore,
    batch_summary,
    create_batches,
    default_jobs,
    distribute_to_employer,
    export_print,
    export_review,
    hand_over,
    import_review,
    load_production_settings,
    personalize_batch,
    register_printed,
)
from citycard.card import CardStateError, KeyFileError, MasterKeys, TransportError
from citycard.commands.common import (
    EXIT_REFUSED,
    add_common_options,
    command,
    emit,
    fields_table,
    open_registry,
    operator,
    record_unmask,
    table,
)
from citycard.core.identity import mask_id
from citycard.core.registry import Registry

__all__ = ["ProductionContext", "production_command", "progress_bar", "register"]

ROWS_SHOWN_MAX = 50  # rows a table prints; --json and the report files carry all


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("batch", help="card production batches: create, export, review, register, "
                                                 "personalise, distribute")
    commands = parser.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")

    create = commands.add_parser("create", help="order the cards of waiting roster entries, one batch per employer")
    create.add_argument("--employer", action="append", default=None, metavar="UNIT_CODE",
                        help="only this employer (repeat for more; default: every employer with entries waiting)")
    create.add_argument("--rows-max", type=int, default=None, help="rows per batch (default: the setting)")
    add_common_options(create)
    create.set_defaults(handler=create_command)

    listing = commands.add_parser("list", help="every batch and how far it has come")
    add_common_options(listing, unmask=False)
    listing.set_defaults(handler=list_command)

    show = commands.add_parser("show", help="a batch: its state, its rows and what happened to it")
    show.add_argument("batch")
    add_common_options(show)
    show.set_defaults(handler=show_command)

    export = commands.add_parser("export-print", help="the print-data DBF and photos for the card producer")
    export.add_argument("batch", nargs="+")
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the export folders go")
    export.add_argument("--jobs", type=int, default=default_jobs(),
                        help=f"tables written in parallel (default {default_jobs()}: one per core)")
    add_common_options(export, unmask=False)
    export.set_defaults(handler=export_print_command)

    review = commands.add_parser("export-review", help="the employer's review package (CSV and an HTML sheet)")
    review.add_argument("batch")
    review.add_argument("--out", required=True, type=Path, metavar="DIR")
    add_common_options(review, unmask=False)
    review.set_defaults(handler=export_review_command)

    verdicts = commands.add_parser("import-review", help="the employer's verdicts: approved, or rejected with a reason")
    verdicts.add_argument("batch")
    verdicts.add_argument("file", type=Path)
    add_common_options(verdicts)
    verdicts.set_defaults(handler=import_review_command)

    printed = commands.add_parser("register-printed", help="the producer's file of printed cards")
    printed.add_argument("batch")
    printed.add_argument("file", type=Path)
    add_common_options(printed)
    printed.set_defaults(handler=register_printed_command)

    chips = commands.add_parser("personalize", help="write holder data and diversified keys onto the chips")
    chips.add_argument("batch")
    chips.add_argument("--keys", type=Path, default=None, metavar="JSON",
                       help="issuer master keys (default: the production.master_keys setting, else $CITYCARD_CARD_KEYS)")
    add_common_options(chips, unmask=False)
    chips.set_defaults(handler=personalize_command)

    distribute = commands.add_parser("distribute", help="deliver cards to the employer, or record the employer's "
                                                        "hand-over to the holders")
    distribute.add_argument("batch")
    distribute.add_argument("--to", required=True, choices=["employer", "persons"], dest="to")
    distribute.add_argument("--receiver", default=None, help="--to employer: the employer's agent who signs for them")
    distribute.add_argument("--cards", default=None, help="--to persons: card numbers, comma-separated "
                                                          "(default: every card the employer holds)")
    add_common_options(distribute)
    distribute.set_defaults(handler=distribute_command)


# -- what the production commands share ----------------------------------------------------------------------


@dataclass
class ProductionContext:
    registry: Registry
    store: ProductionStore
    settings: ProductionSettings


@contextlib.contextmanager
def production(args: argparse.Namespace, *, write: bool = True) -> Iterator[ProductionContext]:
    data = Path(args.data)
    settings = load_production_settings(data)
    with open_registry(args, write=write) as registry:
        yield ProductionContext(registry, ProductionStore(registry.ledger, data), settings)


def production_command(handler: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """``command`` (registry refusals), plus the card side's refusals and unusable paths."""
    refused = command(handler)

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return refused(args)
        except (KeyFileError, CardStateError, TransportError, OSError) as exc:
            message = " ".join(str(exc).split())
            print(f"citycard: error: {message}", file=sys.stderr)
            return EXIT_REFUSED

    return run


@contextlib.contextmanager
def progress_bar(args: argparse.Namespace) -> Iterator[Callable[[str, int, int | None], None]]:
    """A progress callback (phase, done, total) drawing on stderr, silent under --json or off a terminal."""
    console = Console(stderr=True)
    shown = not args.json and console.is_terminal
    bar = Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not shown)
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int | None) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def masked(id_number: str, args: argparse.Namespace) -> str:
    return id_number if getattr(args, "unmask", False) else mask_id(id_number)


def problems_table(title: str, problems: list[Any]) -> Any:
    rows = [(p.row, p.field, p.reason, p.who) for p in problems[:ROWS_SHOWN_MAX]]
    more = f" (first {ROWS_SHOWN_MAX} of {len(problems)})" if len(problems) > ROWS_SHOWN_MAX else ""
    return table(title + more, ("row", "field", "reason", "who"), rows)


# -- handlers ------------------------------------------------------------------------------------------------


@production_command
def create_command(args: argparse.Namespace) -> int:
    with production(args) as ctx, progress_bar(args) as progress:
        result = create_batches(ctx.registry, ctx.store, ctx.settings, employers=args.employer,
                                actor=operator(args), rows_max=args.rows_max, progress=progress)
    document = {"batches": [{"batch": b.batch_id, "employer": b.employer, "employer_name": b.employer_name,
                             "rows": b.rows, "first_card": b.first_card, "last_card": b.last_card}
                            for b in result.batches],
                "rows": result.rows,
                "held_back_total": result.held_back_total,
                "held_back": [{"employer": h.employer, "who": h.who, "name": h.name, "reason": h.reason}
                              for h in result.held_back]}

    def render(out: Console) -> None:
        out.print(table(f"batches created: {len(result.batches)}, cards ordered: {result.rows}",
                        ("batch", "employer", "rows", "cards"),
                        ((b.batch_id, f"{b.employer_name} ({b.employer})", b.rows, f"{b.first_card}..{b.last_card}")
                         for b in result.batches)))
        if result.held_back:
            out.print(table(f"held back: {result.held_back_total}", ("employer", "who", "name", "why"),
                            ((h.employer, h.who, h.name, h.reason) for h in result.held_back[:ROWS_SHOWN_MAX])))

    emit(args, document, render)
    return 0


@production_command
def list_command(args: argparse.Namespace) -> int:
    with production(args, write=False) as ctx:
        summaries = [batch_summary(ctx.store, batch.batch_id) for batch in ctx.store.batches()]
    document = {"batches": [s.to_json() | {"events": None} for s in summaries]}
    emit(args, document, lambda out: out.print(table(
        f"batches: {len(summaries)}", ("batch", "employer", "rows", "stage", "rows by state", "created"),
        ((s.batch.batch_id, s.batch.employer_name, s.batch.rows, s.stage,
          ", ".join(f"{k} {v}" for k, v in s.counts.items()), s.batch.created_at[:16]) for s in summaries))))
    return 0


@production_command
def show_command(args: argparse.Namespace) -> int:
    with production(args, write=args.unmask) as ctx:
        rows = ctx.store.rows(args.batch)
        summary = batch_summary(ctx.store, args.batch, rows)
        record_unmask(ctx.registry, args, f"batch {args.batch}")
    row_documents = [_row_document(row, args) for row in rows]
    document = {**summary.to_json(), "rows": row_documents}

    def render(out: Console) -> None:
        batch = summary.batch
        out.print(fields_table(f"batch {batch.batch_id}", {
            "employer": f"{batch.employer_name} ({batch.employer})", "rows": batch.rows, "stage": summary.stage,
            "rows by state": summary.counts, "cards": f"{batch.first_card}..{batch.last_card}",
            "created": f"{batch.created_at} by {batch.actor}"}))
        out.print(table("what happened", ("at", "event", "by", "details"),
                        ((e["at"][:19], e["event"], e["actor"],
                          ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event", "actor")))
                         for e in batch.events)))
        out.print(table(f"rows{'' if len(rows) <= ROWS_SHOWN_MAX else f' (first {ROWS_SHOWN_MAX} of {len(rows)})'}",
                        ("row", "card", "who", "name", "state", "note"),
                        ((r["row"], r["card_number"], r["id_number"], r["name"], r["state"], r["note"])
                         for r in row_documents[:ROWS_SHOWN_MAX])))

    emit(args, document, render)
    return 0


def _row_document(row: Any, args: argparse.Namespace) -> dict[str, Any]:
    note = row.verdict_reason or ""
    if row.chip_serial and not note:
        note = f"chip {row.chip_serial}"
    if row.activated:
        note = f"activated at {row.activated['institution']}"
    if row.bank_activation:
        note += f"; bank: {row.bank_activation['bank']}"
    return {"row": row.row, "card_number": row.card_number, "id_number": masked(row.id_number, args),
            "name": row.name, "state": row.state.value, "note": note, "chip_serial": row.chip_serial,
            "at_employer": row.at_employer, "handed_over": row.handed_over, "activated": row.activated,
            "bank_activation": row.bank_activation, "verdict_reason": row.verdict_reason}


@production_command
def export_print_command(args: argparse.Namespace) -> int:
    with production(args) as ctx, progress_bar(args) as progress:
        exports = export_print(ctx.registry, ctx.store, ctx.settings, args.batch, args.out, actor=operator(args),
                               jobs=max(1, args.jobs), progress=progress)
    document = {"exports": [export.to_json() for export in exports]}
    emit(args, document, lambda out: out.print(table(
        "print data exported", ("batch", "rows", "purpose", "table"),
        ((e.batch_id, e.rows, e.purpose, e.table) for e in exports))))
    return 0


@production_command
def export_review_command(args: argparse.Namespace) -> int:
    with production(args) as ctx:
        folder = export_review(ctx.registry, ctx.store, args.batch, args.out, actor=operator(args))
    document = {"batch": args.batch, "folder": str(folder)}
    emit(args, document, lambda out: out.print(
        f"review package for batch {args.batch}: {folder} (CSV for the verdicts, HTML sheet with the photos)"))
    return 0


@production_command
def import_review_command(args: argparse.Namespace) -> int:
    with production(args) as ctx:
        result = import_review(ctx.registry, ctx.store, args.batch, args.file, actor=operator(args))
    document = {"batch": args.batch, "approved": result.approved, "rejected": result.rejected,
                "unchanged": result.unchanged, "lines_without_verdict": result.without_verdict,
                "rows_waiting": result.waiting, "rejected_rows": result.rejected_rows}

    def render(out: Console) -> None:
        out.print(fields_table(f"verdicts on batch {args.batch}", {
            k: v for k, v in document.items() if k not in ("batch", "rejected_rows")}))
        if result.rejected_rows:
            out.print(table("rejected: back to correction", ("row", "card", "who", "name", "reason"),
                            ((r["row"], r["card_number"], r["who"], r["name"], r["reason"])
                             for r in result.rejected_rows)))

    emit(args, document, render)
    return 0


@production_command
def register_printed_command(args: argparse.Namespace) -> int:
    with production(args) as ctx:
        result = register_printed(ctx.registry, ctx.store, args.batch, args.file, actor=operator(args))
    document = {"batch": args.batch, "registered": result.registered, "already_registered": result.already,
                "mismatches": [problem.to_json() for problem in result.mismatches]}

    def render(out: Console) -> None:
        out.print(fields_table(f"printed cards of batch {args.batch}", {
            "registered": result.registered, "already registered": result.already,
            "mismatches (not registered)": len(result.mismatches)}))
        if result.mismatches:
            out.print(problems_table("mismatches with the batch", result.mismatches))

    emit(args, document, render)
    return 0


@production_command
def personalize_command(args: argparse.Namespace) -> int:
    with production(args) as ctx:
        keys = MasterKeys.load(args.keys or ctx.settings.master_keys)
        result = personalize_batch(ctx.registry, ctx.store, ctx.settings, args.batch, keys, actor=operator(args))
    document = {"batch": args.batch, "personalized": result.personalized, "already": result.already,
                "not_registered": result.not_registered,
                "problems": [problem.to_json() for problem in result.problems]}

    def render(out: Console) -> None:
        out.print(fields_table(f"chips of batch {args.batch}", {
            "personalised": result.personalized, "personalised before": result.already,
            "not registered yet": result.not_registered, "problems": len(result.problems)}))
        if result.problems:
            out.print(problems_table("not personalised", result.problems))

    emit(args, document, render)
    return 0


@production_command
def distribute_command(args: argparse.Namespace) -> int:
    with production(args) as ctx:
        if args.to == "employer":
            if not args.receiver:
                print("citycard: error: distribute --to employer needs --receiver (who signs for the cards)",
                      file=sys.stderr)
                return EXIT_REFUSED
            result = distribute_to_employer(ctx.registry, ctx.store, args.batch, receiver=args.receiver,
                                            actor=operator(args))
        else:
            cards = None if args.cards is None else [c for c in args.cards.split(",") if c.strip()]
            result = hand_over(ctx.registry, ctx.store, args.batch, cards=cards, actor=operator(args))
    document = {"batch": args.batch, "to": args.to, "cards": result.moved, "skipped": result.skipped}

    def render(out: Console) -> None:
        where = "delivered to the employer" if args.to == "employer" else "handed to their holders"
        out.print(f"batch {args.batch}: {result.moved} card(s) {where}")
        if result.skipped:
            out.print(table("not delivered", ("card", "who", "why"),
                            ((s["card"], s["who"], s["why"]) for s in result.skipped)))

    emit(args, document, render)
    return 0
