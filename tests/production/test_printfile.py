"""The print-data file: a GBK dBase table that an independent reader (dbfread) reads back with the Chinese
names intact, the documented columns, and the photos folder the table names."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import dbfread
from citycard.apps.production import PRINT_COLUMNS, create_batches, export_print, import_photos, import_roster
from citycard.apps.production.sample import SamplePerson
from PIL import Image

from .helpers import UNIT, UNIT_NAME, Production, ordered_batch, reviewed_batch, roster_with

HARD_NAMES = ("欧阳娜娜", "买买提·艾力", "龚鑫", "阿卜杜热合曼·买买提明", "喆")  # a compound surname, middle dots, rare-ish


def test_the_print_file_reads_back_with_an_independent_reader(prod: Production) -> None:
    base = prod.people(len(HARD_NAMES))
    people = [SamplePerson(**{**person.__dict__, "name": name}) for person, name in zip(base, HARD_NAMES, strict=True)]
    import_roster(prod.registry, prod.store, roster_with(prod, people), actor="op")
    import_photos(prod.registry, prod.store, prod.photos(people), prod.settings.photo, actor="op")
    [batch] = create_batches(prod.registry, prod.store, prod.settings, actor="op").batches
    [export] = export_print(prod.registry, prod.store, prod.settings, [batch.batch_id], prod.files / "out", actor="op")

    table = dbfread.DBF(str(export.table), char_decode_errors="strict")
    assert table.encoding == "cp936" and bytes(export.table.read_bytes()[29:30]) == b"\x4d"
    assert [(f.name, f.type, f.length) for f in table.fields] == [
        (name, kind[0], int(kind[2:-1].split(",")[0]) if "(" in kind else 8) for name, kind, _ in PRINT_COLUMNS]
    records = list(table)
    assert [r["XM"] for r in records] == sorted(HARD_NAMES, key=lambda n: people[HARD_NAMES.index(n)].id_number)
    rows = {row.card_number: row for row in prod.store.rows(batch.batch_id)}
    for record in records:
        row = rows[record["KH"]]
        card = prod.registry.card(record["KH"])
        assert record["SFZHM"] == row.id_number and record["XB"] == ("1" if row.gender == "male" else "2")
        assert record["CSRQ"] == dt.date.fromisoformat(row.date_of_birth) and record["GJ"] == "CHN"
        assert record["SBM"] == card.card_id_code and record["FKRQ"] == card.issue_date
        assert record["YXQZ"] == card.expiry_date and record["FKJG"] == prod.settings.issuing_organisation
        assert (record["DWBH"], record["DWMC"], record["PCH"]) == (UNIT, UNIT_NAME, batch.batch_id)
        photo = export.folder / "photos" / record["ZPWJ"]
        assert record["ZPWJ"] == f"{row.id_number}.jpg" and Image.open(photo).size == (358, 441)
    manifest = json.loads((export.folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["purpose"] == "proof" and manifest["rows"] == len(HARD_NAMES)
    assert manifest["table"]["sha256"] == hashlib.sha256(export.table.read_bytes()).hexdigest()
    assert sorted(manifest["photos"]["files"]) == sorted(p.name for p in (export.folder / "photos").iterdir())


def test_after_the_review_the_print_file_holds_the_approved_rows_only(prod: Production) -> None:
    batch_id, _ = reviewed_batch(prod, 4, rejected={2: "照片不清晰"})
    [export] = export_print(prod.registry, prod.store, prod.settings, [batch_id], prod.files / "out", actor="op")
    numbers = [record["XH"] for record in dbfread.DBF(str(export.table))]
    assert export.purpose == "production" and numbers == [1, 3, 4]
    assert len(list((export.folder / "photos").iterdir())) == 3


def test_parallel_export_of_several_batches(prod: Production) -> None:
    first, _ = ordered_batch(prod, 3)
    second, _ = ordered_batch(prod, 2, first_index=100)
    exports = export_print(prod.registry, prod.store, prod.settings, [first, second], prod.files / "out", actor="op",
                           jobs=2)
    assert [len(list(dbfread.DBF(str(e.table)))) for e in exports] == [3, 2]
    again = export_print(prod.registry, prod.store, prod.settings, [first], prod.files / "out", actor="op")
    assert again[0].table.read_bytes() == exports[0].table.read_bytes()  # re-exported in place, same bytes
    assert [event["event"] for event in prod.store.batch(first).events] == ["create", "export_print", "export_print"]


def test_the_print_table_has_the_bytes_of_every_field_set_on_every_record(tmp_path) -> None:
    """write_print_table sets only the columns that differ between rows; the table must be the one the
    dbf package writes when every field of every record is set, also when a column that is usually the
    same (the issue date: a card reused from a rejected row was ordered earlier) differs in one row."""
    import dbf
    from citycard.apps.production.printfile import DBF_CODEPAGE, write_print_table

    day = dt.date(2025, 9, 30)
    rows = [{"row": number, "name": name, "gender": "12"[number % 2], "id_number": f"37010219850312{number:04d}",
             "date_of_birth": dt.date(1985, 3, 12), "nationality": "CHN", "card_number": f"A{number:08d}",
             "card_id_code": f"{number:032X}", "issuing_organisation": "济南市人力资源和社会保障局",
             "issue_date": day if number != 3 else dt.date(2025, 9, 1), "expiry_date": dt.date(2035, 9, 30),
             "photo_file": f"37010219850312{number:04d}.jpg", "employer": UNIT, "employer_name": UNIT_NAME,
             "batch_id": "B000001"} for number, name in enumerate(HARD_NAMES, start=1)]
    write_print_table(tmp_path / "fast.dbf", [tuple(values[key] for _, _, key in PRINT_COLUMNS) for values in rows])
    specs = "; ".join(f"{name} {kind}" for name, kind, _ in PRINT_COLUMNS)
    reference = dbf.Table(str(tmp_path / "reference.dbf"), specs, codepage=DBF_CODEPAGE, dbf_type="db3")
    with reference.open(dbf.READ_WRITE):
        for values in rows:
            reference.append(tuple(values[key] for _, _, key in PRINT_COLUMNS))
    assert (tmp_path / "fast.dbf").read_bytes() == (tmp_path / "reference.dbf").read_bytes()
    records = list(dbfread.DBF(str(tmp_path / "fast.dbf")))
    assert [record["FKRQ"] for record in records] == [day, day, dt.date(2025, 9, 1), day, day]
    assert [record["XM"] for record in records] == list(HARD_NAMES)
