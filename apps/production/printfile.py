"""The print-data file a card producer's printing line takes: one DBF table per batch (dBase III, GBK,
code page byte 0x4D) and a folder of the batch's photos, named as the table says.

The columns are fixed; the producer's line maps them by name::

    XH      N(6,0)   row number in the batch                     序号
    XM      C(60)    name (GBK: up to 30 Chinese characters)      姓名
    XB      C(1)     gender, GB/T 2261.1: 1 male, 2 female         性别
    SFZHM   C(18)    citizen ID number                            身份证号码
    CSRQ    D        date of birth                                出生日期
    GJ      C(3)     nationality, ISO 3166 alpha-3                国籍
    KH      C(9)     card number                                  社会保障卡卡号
    SBM     C(32)    card identification code (32 hex digits)     卡识别码
    FKJG    C(60)    issuing organisation                         发卡机构
    FKRQ    D        issue date                                   发卡日期
    YXQZ    D        expiry date                                  有效期至
    ZPWJ    C(40)    photo file name in photos/                   照片文件名
    DWBH    C(18)    employer: unified social credit code         单位编号
    DWMC    C(200)   employer name                                单位名称
    PCH     C(10)    batch                                        批次号

An export is the folder ``OUT/<batch>/`` holding ``<batch>.dbf``, ``photos/<ID number>.jpg`` and
``manifest.json`` (the rows, the purpose and the SHA-256 of every file). Before the employer's verdicts
are in, the file holds every live row and serves the producer's proofs (``purpose: proof``); once
verdicts are imported it holds the approved rows only (``purpose: production``). The folder is
written beside its final name and renamed into place, so a half-written export never looks finished.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbf
from citycard.core.lifecycle import Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import ErrorCode, as_instant

from .errors import ProductionError
from .parallel import ordered_map
from .photos import stored_photo_name
from .settings import ProductionSettings
from .store import Batch, BatchRow, ProductionStore, RowState

__all__ = ["PRINT_COLUMNS", "PrintExport", "export_print", "print_rows", "write_print_table"]

PRINT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("XH", "N(6,0)", "row"),
    ("XM", "C(60)", "name"),
    ("XB", "C(1)", "gender"),
    ("SFZHM", "C(18)", "id_number"),
    ("CSRQ", "D", "date_of_birth"),
    ("GJ", "C(3)", "nationality"),
    ("KH", "C(9)", "card_number"),
    ("SBM", "C(32)", "card_id_code"),
    ("FKJG", "C(60)", "issuing_organisation"),
    ("FKRQ", "D", "issue_date"),
    ("YXQZ", "D", "expiry_date"),
    ("ZPWJ", "C(40)", "photo_file"),
    ("DWBH", "C(18)", "employer"),
    ("DWMC", "C(200)", "employer_name"),
    ("PCH", "C(10)", "batch_id"),
)
DBF_CODEPAGE = "cp936"
GENDER_CODES = {"male": "1", "female": "2"}
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class PrintExport:
    batch_id: str
    folder: Path
    table: Path
    rows: int
    purpose: str  # proof | production

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch_id, "folder": str(self.folder), "table": str(self.table), "rows": self.rows,
                "purpose": self.purpose}


def print_rows(rows: Iterable[BatchRow]) -> tuple[list[BatchRow], str]:
    """The rows a print file holds now, and why: all live rows for proofs, approved ones for production."""
    rows = list(rows)
    reviewed = any(row.state is not RowState.ORDERED for row in rows)
    if reviewed:
        return [row for row in rows if row.state not in (RowState.ORDERED, RowState.REJECTED)], "production"
    return rows, "proof"


def write_print_table(path: Path, rows: list[tuple[Any, ...]]) -> None:
    """Write the print-data table to ``path``: each row holds the values of PRINT_COLUMNS, in order.

    The dbf package costs about 10 us for each field it sets, and most columns hold the same value on
    every row of a batch (issuing organisation, dates, employer, batch). So the first row is appended
    ``len(rows)`` times in one call, and each later record gets only the columns that differ between
    rows: the same bytes as setting every field of every record, in about 60% of the time."""
    if not rows:
        raise ProductionError("rows", "a print table needs at least one row")
    specs = "; ".join(f"{name} {kind}" for name, kind, _ in PRINT_COLUMNS)
    first = rows[0]
    varying = [(name, index) for index, (name, _, _) in enumerate(PRINT_COLUMNS)
               if any(values[index] != first[index] for values in rows)]
    table = dbf.Table(str(path), specs, codepage=DBF_CODEPAGE, dbf_type="db3")
    table.open(dbf.READ_WRITE)
    try:
        table.append(tuple(first), multiple=len(rows))
        for record, values in zip(table, rows, strict=True):
            if values is not first:
                dbf.write(record, **{name: values[index] for name, index in varying})
    finally:
        table.close()


def _table_values(row: BatchRow, batch: Batch, settings: ProductionSettings) -> tuple[Any, ...]:
    """A print row's values in PRINT_COLUMNS order (a tuple: it is what a worker process is sent)."""
    return (row.row, row.name, GENDER_CODES[row.gender], row.id_number, _dt.date.fromisoformat(row.date_of_birth),
            row.nationality, row.card_number, row.card_id_code, settings.issuing_organisation,
            _dt.date.fromisoformat(row.issue_date), _dt.date.fromisoformat(row.expiry_date), row.photo_file,
            batch.employer, batch.employer_name, batch.batch_id)


def _table_job(prepared: _Prepared) -> tuple[str, list[tuple[Any, ...]]]:
    """What a worker needs to write a batch's table: where, and the rows."""
    return str(prepared.partial / f"{prepared.batch.batch_id}.dbf"), prepared.values


def _write_table_job(job: tuple[str, list[tuple[Any, ...]]]) -> str:
    path, rows = job
    write_print_table(Path(path), rows)
    return _sha256(Path(path))


def export_print(registry: Registry, store: ProductionStore, settings: ProductionSettings, batch_ids: list[str],
                 out_dir: Path, *, actor: str, at: _dt.datetime | None = None, jobs: int = 1,
                 progress: Progress | None = None) -> list[PrintExport]:
    """Export the print data of each batch into ``out_dir``. With ``jobs`` > 1 the tables are written by
    that many worker processes while this one links the photos; only the batches in flight (a few per
    worker) are in memory at once, however many batches there are."""
    at = as_instant(at)
    progress = progress or (lambda phase, done, total: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for batch_id in batch_ids:  # refuse an unknown batch before anything is written
        store.batch(batch_id)
    exports: list[PrintExport] = []
    digests: list[str] = []
    prepared_batches = (_prepare(store, settings, batch_id, out_dir) for batch_id in batch_ids)
    for prepared, digest in ordered_map(_write_table_job, prepared_batches, jobs=jobs, argument=_table_job):
        # The photos are linked here while the workers write the next batches' tables.
        photos = _link_photos(store, prepared.rows, prepared.partial / "photos")
        _write_manifest(prepared.partial, prepared.batch, prepared.rows, prepared.purpose, digest, photos, at)
        folder = _move_into_place(prepared.partial, out_dir / prepared.batch.batch_id)
        exports.append(PrintExport(prepared.batch.batch_id, folder, folder / f"{prepared.batch.batch_id}.dbf",
                                   len(prepared.rows), prepared.purpose))
        digests.append(digest)
        progress("exporting", len(exports), len(batch_ids))
    _record(registry, store, exports, digests, actor, at)
    return exports


@dataclass(frozen=True)
class _Prepared:
    batch: Batch
    partial: Path  # the folder being written, renamed into place when whole
    rows: list[BatchRow]
    values: list[tuple[Any, ...]]  # the table's rows
    purpose: str


def _prepare(store: ProductionStore, settings: ProductionSettings, batch_id: str, out_dir: Path) -> _Prepared:
    batch = store.batch(batch_id)
    rows, purpose = print_rows(store.rows(batch_id))
    if not rows:
        raise ProductionError("batch", "has no row to print (every row was rejected)", subject=f"batch {batch_id}",
                              code=ErrorCode.FAILED_PRECONDITION)
    partial = out_dir / f".{batch_id}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "photos").mkdir(parents=True)
    return _Prepared(batch, partial, rows, [_table_values(row, batch, settings) for row in rows], purpose)


def _link_photos(store: ProductionStore, rows: list[BatchRow], folder: Path) -> dict[str, str]:
    """The batch's photos into ``folder`` (hard links where the file system allows, else copies). Paths
    are plain strings here: pathlib costs more than the link itself, thousands of times a batch."""
    names: dict[str, str] = {}
    photos_dir, target_dir = str(store.photos_dir), str(folder)
    for row in rows:
        record = store.photo(row.id_number)
        where = f"batch {row.batch_id} row {row.row} ({row.masked_id})"
        if record is None or record.sha256 != row.photo_sha256:
            # The batch keeps the photo it was made with; intake refuses new photos for batched persons.
            raise ProductionError("photo", "the photo the batch was made with is not on record", subject=where,
                                  code=ErrorCode.FAILED_PRECONDITION)
        name = stored_photo_name(record)
        source, target = os.path.join(photos_dir, name), os.path.join(target_dir, row.photo_file)
        try:
            if os.stat(source).st_size != record.bytes:
                raise FileNotFoundError(source)
            os.link(source, target)
        except FileNotFoundError:
            raise ProductionError("photo", f"the photo file {name} is missing or damaged; restore "
                                           "DIR/production/photos from its backup", subject=where,
                                  code=ErrorCode.FAILED_PRECONDITION) from None
        except OSError:
            shutil.copyfile(source, target)
        names[row.photo_file] = row.photo_sha256
    return names


def _write_manifest(folder: Path, batch: Batch, rows: list[BatchRow], purpose: str, table_sha256: str,
                    photos: dict[str, str], at: _dt.datetime) -> None:
    manifest = {
        "format": "citycard-print-data/1", "batch": batch.batch_id, "employer": batch.employer,
        "employer_name": batch.employer_name, "purpose": purpose, "rows": len(rows), "exported_at": at.isoformat(),
        "table": {"file": f"{batch.batch_id}.dbf", "sha256": table_sha256, "encoding": "GBK",
                  "columns": [{"name": name, "type": kind} for name, kind, _ in PRINT_COLUMNS]},
        "photos": {"folder": "photos", "files": photos},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")


def _move_into_place(partial: Path, final: Path) -> Path:
    if final.exists():
        retired = final.with_name(f".{final.name}.old")
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(final, retired)
        os.replace(partial, final)
        shutil.rmtree(retired)
    else:
        os.replace(partial, final)
    return final


def _record(registry: Registry, store: ProductionStore, exports: list[PrintExport], digests: list[str], actor: str,
            at: _dt.datetime) -> None:
    stage = registry.begin(at)
    for export, digest in zip(exports, digests, strict=True):
        batch = store.batch(export.batch_id).with_event("export_print", at.isoformat(), actor, rows=export.rows,
                                                        purpose=export.purpose, table_sha256=digest)
        store.put_batch(stage, batch)
        stage.audit(actor=actor, channel=Channel.BATCH, action="production.print_export",
                    subject=f"batch {export.batch_id}", at=at,
                    details={"rows": export.rows, "purpose": export.purpose, "table_sha256": digest})
    stage.commit("recording print exports")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
