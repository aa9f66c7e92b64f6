"""``citycard roster import|list`` and ``citycard photos import|missing``: what production starts from.

``roster import FILE`` takes the e-government system's roster export (CSV or DBF, GBK or UTF-8): good
rows wait for a production batch, bad rows are listed (file, row, field, reason) and written to a
rejection report; importing the same file again changes nothing. ``photos import FOLDER`` takes the
employers' photo files (named by ID number), converts the good ones to the print specification and
lists the refused ones and the persons still without a photo.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from rich.console import Console

from citycard.apps.production import default_jobs, import_photos, import_roster, missing_photos
from citycard.commands.batch import (
    ROWS_SHOWN_MAX,
    masked,
    problems_table,
    production,
    production_command,
    progress_bar,
)
from citycard.commands.common import add_common_options, emit, fields_table, operator, record_unmask, table

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    roster = subparsers.add_parser("roster", help="the e-government insured-persons roster: import, list")
    roster_commands = roster.add_subparsers(dest="roster_command", required=True, metavar="ROSTER_COMMAND")
    load = roster_commands.add_parser("import", help="import a roster export (CSV or DBF, GBK or UTF-8)")
    load.add_argument("file", type=Path)
    load.add_argument("--encoding", default="auto", choices=["auto", "utf-8", "gbk"],
                      help="auto: UTF-8 if the whole file is, else GBK (a DBF: its code page byte, else GBK)")
    load.add_argument("--report", type=Path, default=None, metavar="CSV",
                      help="also write the rejection report here (it is always kept under DIR/production/imports)")
    load.add_argument("--jobs", type=int, default=default_jobs(),
                      help=f"processes reading and checking the rows (default {default_jobs()}: one per core)")
    add_common_options(load, unmask=False)
    load.set_defaults(handler=import_roster_command)

    listing = roster_commands.add_parser("list", help="the roster imports and their counts")
    add_common_options(listing, unmask=False)
    listing.set_defaults(handler=list_imports_command)

    photos = subparsers.add_parser("photos", help="the holders' photos: import, missing")
    photo_commands = photos.add_subparsers(dest="photos_command", required=True, metavar="PHOTOS_COMMAND")
    intake = photo_commands.add_parser("import", help="take in a folder of photos named by ID number")
    intake.add_argument("folder", type=Path)
    intake.add_argument("--jobs", type=int, default=default_jobs(),
                        help=f"photos converted in parallel (default {default_jobs()}: one per core)")
    intake.add_argument("--report", type=Path, default=None, metavar="CSV",
                        help="write the refused photos and the persons without one here")
    add_common_options(intake)
    intake.set_defaults(handler=import_photos_command)

    missing = photo_commands.add_parser("missing", help="persons waiting for a card without a usable photo")
    missing.add_argument("--employer", action="append", default=None, metavar="UNIT_CODE")
    missing.add_argument("--report", type=Path, default=None, metavar="CSV")
    add_common_options(missing)
    missing.set_defaults(handler=missing_photos_command)


@production_command
def import_roster_command(args: argparse.Namespace) -> int:
    with production(args) as ctx, progress_bar(args) as progress:
        result = import_roster(ctx.registry, ctx.store, args.file, actor=operator(args), encoding=args.encoding,
                               progress=progress, jobs=max(1, args.jobs))
    if args.report is not None:
        shutil.copyfile(result.report_path, args.report)
    record = result.record
    outcome = ("already imported: nothing changed" if result.already_imported
               else "an interrupted import, finished" if result.resumed else "imported")
    document = {"import": record.to_json(), "outcome": outcome, "report": str(args.report or result.report_path),
                "ignored_columns": result.ignored_columns, "deleted_records": result.deleted_records,
                "rejections": [problem.to_json() for problem in result.problems]}

    def render(out: Console) -> None:
        out.print(fields_table(f"roster {record.file_name}: {outcome}", {
            "import": record.import_id, "format": f"{record.format}, {record.encoding}", "records": record.rows,
            "accepted": f"{record.accepted} (new {record.new}, updated {record.updated}, "
                        f"unchanged {record.unchanged})",
            "rejected rows": record.rejected, "state": record.state.value,
            "ignored columns": result.ignored_columns or None, "rejection report": document["report"]}))
        if result.problems:
            out.print(problems_table("rejected", result.problems))

    emit(args, document, render)
    return 0


@production_command
def list_imports_command(args: argparse.Namespace) -> int:
    with production(args, write=False) as ctx:
        records = ctx.store.imports()
    document = {"imports": [record.to_json() for record in records]}
    emit(args, document, lambda out: out.print(table(
        f"roster imports: {len(records)}", ("import", "file", "state", "records", "accepted", "rejected", "at"),
        ((r.import_id, r.file_name, r.state.value, r.rows, r.accepted, r.rejected, r.started_at[:16])
         for r in records))))
    return 0


@production_command
def import_photos_command(args: argparse.Namespace) -> int:
    with production(args, write=True) as ctx, progress_bar(args) as progress:
        result = import_photos(ctx.registry, ctx.store, args.folder, ctx.settings.photo, actor=operator(args),
                               jobs=max(1, args.jobs), progress=progress)
        missing = missing_photos(ctx.store)
        record_unmask(ctx.registry, args, "photos")
    for person in missing:
        person["who"] = masked(person.pop("id_number"), args)
    if args.report is not None:
        _write_photo_report(args.report, result.problems, missing)
    document = {"accepted": result.accepted, "unchanged": result.unchanged,
                "back_from_correction": result.back_from_correction,
                "refused": [problem.to_json() for problem in result.problems], "without_photo": missing}

    def render(out: Console) -> None:
        out.print(fields_table(f"photos from {args.folder}", {
            "accepted and converted": result.accepted, "unchanged": result.unchanged,
            "refused": len(result.problems), "back from correction": result.back_from_correction,
            "persons waiting without a photo": len(missing)}))
        if result.problems:
            out.print(table("refused photos", ("file", "field", "reason"),
                            ((p.file, p.field, p.reason) for p in result.problems[:ROWS_SHOWN_MAX])))
        _render_missing(out, missing)

    emit(args, document, render)
    return 0


@production_command
def missing_photos_command(args: argparse.Namespace) -> int:
    with production(args, write=args.unmask) as ctx:
        missing = missing_photos(ctx.store, args.employer)
        record_unmask(ctx.registry, args, "photos")
    for person in missing:
        person["who"] = masked(person.pop("id_number"), args)
    if args.report is not None:
        _write_photo_report(args.report, [], missing)
    emit(args, {"without_photo": missing}, lambda out: _render_missing(out, missing))
    return 0


def _render_missing(out: Console, missing: list[dict[str, str]]) -> None:
    if missing:
        out.print(table(f"waiting without a usable photo: {len(missing)}", ("employer", "who", "name"),
                        ((m["employer"], m["who"], m["name"]) for m in missing[:ROWS_SHOWN_MAX])))


def _write_photo_report(path: Path, problems: list, missing: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(("kind", "file or employer", "field", "reason", "who", "name"))
        for problem in problems:
            writer.writerow(("refused", problem.file, problem.field, problem.reason, problem.who, ""))
        for person in missing:
            writer.writerow(("no photo", person["employer"], "", "no usable photo", person["who"], person["name"]))
