"""The employer's review: a package a person can read, and the import of the employer's verdicts.

The package for a batch is the folder ``OUT/<batch>-review/`` with

- ``<batch>-review.csv``: one line per row awaiting a verdict (UTF-8 with a BOM, so spreadsheet
  programs show the Chinese right): 序号 (row), 卡号 (card number), 姓名, 性别, 身份证号码, 出生日期,
  民族, 国籍, 单位编号, and two empty columns for the employer, 审核结果 (verdict) and 原因 (reason);
- ``<batch>-review.html``: the same rows as a printable sheet with each person's photo, for the
  employer to check face and data together;
- ``photos/``: the photos the sheet shows.

The package holds whole ID numbers: the employer checks them against its own records, and the
package goes to the employer only. Commands never print them unmasked.

Verdicts come back as that CSV with 审核结果 filled in: 通过 / approved, or 不通过 / rejected with a reason
in 原因 (GBK or UTF-8). A row is found by its card number; when the line also carries the ID number,
it must match (a line shifted in a spreadsheet must not approve someone else). A line without a verdict
leaves its row waiting. The file is taken whole or not at all: any bad line refuses the import, and
every bad line is listed. Approved rows go to production; rejected rows leave the batch for
correction (their entry waits for a corrected roster row or a new photo; the card stays ordered and
is made in a later batch). Importing the same verdicts again changes nothing; a verdict is final.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from citycard.core.identity import mask_id
from citycard.core.lifecycle import Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import ErrorCode, RegistryError, as_instant, check_text

from .errors import ProductionError, RowProblem
from .photos import photo_path
from .rosterfile import RosterFile
from .store import Batch, BatchRow, EntryState, ProductionStore, RowState

__all__ = ["VERDICT_COLUMNS", "ReviewResult", "export_review", "import_review"]

REVIEW_HEADER = ("序号", "卡号", "姓名", "性别", "身份证号码", "出生日期", "民族", "国籍", "单位编号", "审核结果", "原因")
VERDICT_COLUMNS: dict[str, tuple[str, ...]] = {
    "row": ("序号", "XH", "ROW"),
    "card_number": ("卡号", "社会保障卡卡号", "KH", "CARD_NUMBER"),
    "id_number": ("身份证号码", "身份证号", "SFZHM", "ID_NUMBER"),
    "verdict": ("审核结果", "审核意见", "SHJG", "VERDICT"),
    "reason": ("原因", "退回原因", "YY", "REASON"),
}
APPROVED = frozenset({"通过", "合格", "同意", "APPROVED", "APPROVE", "OK", "Y", "YES"})
REJECTED = frozenset({"不通过", "不合格", "退回", "不同意", "REJECTED", "REJECT", "N", "NO"})
REASON_CHARS_MAX = 100
GENDER_TEXT = {"male": "男", "female": "女"}


@dataclass
class ReviewResult:
    approved: int = 0
    rejected: int = 0
    unchanged: int = 0
    without_verdict: int = 0  # lines left empty: their rows still wait
    waiting: int = 0  # rows of the batch still without a verdict after the import
    rejected_rows: list[dict[str, object]] = field(default_factory=list)


# -- the package -------------------------------------------------------------------------------------------


def export_review(registry: Registry, store: ProductionStore, batch_id: str, out_dir: Path, *, actor: str,
                  at: _dt.datetime | None = None) -> Path:
    at = as_instant(at)
    batch = store.batch(batch_id)
    rows = [row for row in store.rows(batch_id) if row.state is RowState.ORDERED]
    if not rows:
        raise ProductionError("batch", "has no row awaiting the employer's verdict", subject=f"batch {batch_id}",
                              code=ErrorCode.FAILED_PRECONDITION)
    out_dir = Path(out_dir)
    final = out_dir / f"{batch_id}-review"
    partial = out_dir / f".{batch_id}-review.partial"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "photos").mkdir(parents=True)
    for row in rows:
        record = store.photo(row.id_number)
        if record is None or record.sha256 != row.photo_sha256:
            raise ProductionError("photo", "the photo the batch was made with is not on record",
                                  subject=f"batch {batch_id} row {row.row} ({row.masked_id})")
        shutil.copyfile(photo_path(store, record), partial / "photos" / row.photo_file)
    _write_csv(partial / f"{batch_id}-review.csv", rows)
    (partial / f"{batch_id}-review.html").write_text(_sheet(batch, rows, at), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    stage = registry.begin(at)
    store.put_batch(stage, batch.with_event("export_review", at.isoformat(), actor, rows=len(rows)))
    stage.audit(actor=actor, channel=Channel.BATCH, action="production.review_export", subject=f"batch {batch_id}",
                at=at, details={"rows": len(rows), "employer": batch.employer})
    stage.commit("recording a review export")
    return final


def _write_csv(path: Path, rows: list[BatchRow]) -> None:
    with open(path, "w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(REVIEW_HEADER)
        for row in rows:
            writer.writerow((row.row, row.card_number, row.name, GENDER_TEXT[row.gender], row.id_number,
                             row.date_of_birth, row.ethnicity, row.nationality, row.employer, "", ""))


_SHEET_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;width:100%}"
                "td,th{border:1px solid #999;padding:4px 8px;text-align:left;vertical-align:middle}"
                "img{width:72px;height:89px;object-fit:cover}tr{page-break-inside:avoid}td.blank{min-width:8em}")
_SHEET_HELP = ("<p>请逐行核对照片与信息，在审核表 CSV 的“审核结果”列填写“通过”或“不通过”，不通过的请在“原因”列写明原因。<br>"
               "Check each photo and line; in the CSV write 通过 (approved) or 不通过 (rejected) under 审核结果, "
               "and the reason under 原因 for a rejection.</p>")
_SHEET_HEAD = ("<table><thead><tr><th>序号</th><th>照片</th><th>姓名</th><th>性别</th><th>身份证号码</th>"
               "<th>出生日期</th><th>卡号</th><th>审核结果</th></tr></thead><tbody>")


def _sheet(batch: Batch, rows: list[BatchRow], at: _dt.datetime) -> str:
    e = html.escape
    exported = at.strftime("%Y-%m-%d %H:%M")
    lines = [
        "<!DOCTYPE html>", '<html lang="zh-CN"><head><meta charset="utf-8">',
        f"<title>{e(batch.batch_id)} 社会保障卡制卡数据审核</title>",
        f"<style>{_SHEET_STYLE}</style></head><body>",
        f"<h1>社会保障卡制卡数据审核表 (card data review) {e(batch.batch_id)}</h1>",
        (f"<p>单位 (employer): {e(batch.employer_name)} ({e(batch.employer)})<br>行数 (rows): {len(rows)}<br>"
        f"导出时间 (exported): {e(exported)}</p>"),
        _SHEET_HELP,
        _SHEET_HEAD,
    ]
    for row in rows:
        lines.append(
            f"<tr><td>{row.row}</td><td><img src=\"photos/{e(row.photo_file)}\" alt=\"{e(row.name)}\"></td>"
            f"<td>{e(row.name)}</td><td>{GENDER_TEXT[row.gender]}</td><td>{e(row.id_number)}</td>"
            f"<td>{e(row.date_of_birth)}</td><td>{e(row.card_number)}</td><td class=\"blank\"></td></tr>")
    lines.append("</tbody></table></body></html>")
    return "\n".join(lines)


# -- the verdicts ------------------------------------------------------------------------------------------


def import_review(registry: Registry, store: ProductionStore, batch_id: str, path: Path, *, actor: str,
                  at: _dt.datetime | None = None) -> ReviewResult:
    at = as_instant(at)
    batch = store.batch(batch_id)
    rows = {row.card_number: row for row in store.rows(batch_id)}
    sheet = RosterFile.open(Path(path), display_name=Path(path).name, known=VERDICT_COLUMNS,
                            required=("card_number", "verdict", "reason"))
    result = ReviewResult()
    decisions: dict[str, tuple[RowState, str | None]] = {}
    problems: list[RowProblem] = []
    for raw in sheet.rows():
        if raw.problem is not None:
            problems.append(raw.problem)
            continue
        decided = _verdict_of(sheet.display_name, raw.number, raw.values, rows, decisions, problems)
        if decided is None:
            result.without_verdict += not str(raw.values.get("verdict") or "").strip()
            continue
        card_number, state, reason = decided
        row = rows[card_number]
        if row.state is RowState.ORDERED:
            decisions[card_number] = (state, reason)
        elif row.state is state or (state is RowState.APPROVED and row.state is not RowState.REJECTED):
            result.unchanged += 1
        else:
            problems.append(RowProblem(sheet.display_name, raw.number, "verdict",
                                       f"row {row.row} is already {row.state.value}; a verdict is final",
                                       row.masked_id))
    if problems:
        raise _refusal(sheet.display_name, problems)
    _apply(registry, store, batch, rows, decisions, result, actor, at)
    return result


def _verdict_of(file_name: str, number: int, values: dict[str, object], rows: dict[str, BatchRow],
                decisions: dict[str, tuple[RowState, str | None]], problems: list[RowProblem]
                ) -> tuple[str, RowState, str | None] | None:
    card_number = str(values.get("card_number") or "").strip().upper()

    def bad(field_name: str, reason: str, who: str = "") -> None:
        problems.append(RowProblem(file_name, number, field_name, reason, who))

    row = rows.get(card_number)
    if row is None:
        bad("card_number", f"{card_number!r} is not a card of this batch")
        return None
    id_number = str(values.get("id_number") or "").strip().upper()
    if id_number and id_number != row.id_number:
        bad("id_number", f"does not match row {row.row} (card {card_number}); was the sheet re-sorted?",
            mask_id(id_number))
        return None
    text = str(values.get("verdict") or "").strip()
    if not text:
        return None
    if card_number in decisions:
        bad("card_number", f"card {card_number} has a verdict on an earlier line", row.masked_id)
        return None
    reason_text = str(values.get("reason") or "").strip()
    if text.upper() in APPROVED:
        return card_number, RowState.APPROVED, None
    if text.upper() not in REJECTED:
        bad("verdict", f"{text!r} is neither 通过 (approved) nor 不通过 (rejected)", row.masked_id)
        return None
    if not reason_text:
        bad("reason", "a rejection needs a reason", row.masked_id)
        return None
    if len(reason_text) > REASON_CHARS_MAX:
        bad("reason", f"has {len(reason_text)} characters, at most {REASON_CHARS_MAX}", row.masked_id)
        return None
    try:
        reason = check_text(reason_text, "reason")
    except RegistryError as exc:
        bad("reason", exc.reason, row.masked_id)
        return None
    return card_number, RowState.REJECTED, reason


def _refusal(file_name: str, problems: list[RowProblem]) -> ProductionError:
    listed = "; ".join(f"row {p.row}: {p.field}: {p.reason}" for p in problems[:20])
    more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
    error = ProductionError("verdicts", f"{len(problems)} bad line(s), nothing was imported: {listed}{more}",
                            file=file_name)
    error.problems = problems  # type: ignore[attr-defined]
    return error


def _apply(registry: Registry, store: ProductionStore, batch: Batch, rows: dict[str, BatchRow],
           decisions: dict[str, tuple[RowState, str | None]], result: ReviewResult, actor: str,
           at: _dt.datetime) -> None:
    stage = registry.begin(at)
    for card_number, (state, reason) in decisions.items():
        row = replace(rows[card_number], state=state, verdict_reason=reason, verdict_at=at.isoformat())
        rows[card_number] = row
        store.put_row(stage, row)
        if state is RowState.APPROVED:
            result.approved += 1
            continue
        result.rejected += 1
        result.rejected_rows.append({"row": row.row, "card_number": card_number, "who": row.masked_id,
                                     "name": row.name, "reason": reason})
        entry = store.entry(row.id_number, stage)
        if entry is not None:
            store.put_entry(stage, replace(entry, state=EntryState.CORRECTION, reason=reason), entry)
    result.waiting = sum(1 for row in rows.values() if row.state is RowState.ORDERED)
    if decisions:
        store.put_batch(stage, batch.with_event("import_review", at.isoformat(), actor, approved=result.approved,
                                                rejected=result.rejected, waiting=result.waiting))
        stage.audit(actor=actor, channel=Channel.BATCH, action="production.review_import",
                    subject=f"batch {batch.batch_id}", at=at,
                    details={"approved": result.approved, "rejected": result.rejected, "waiting": result.waiting})
        stage.commit(f"importing the verdicts on batch {batch.batch_id}")
