"""A batch from the roster to activated cards through the CLI, as an operator runs it on real DBF files;
JSON for machines, tables for people, masked ID numbers, and refusals that name file, row and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from citycard.apps.production.producer import print_batch
from citycard.apps.production.sample import write_roster_dbf

from .helpers import KEYS_PATH, UNIT, UNIT_NAME, Production


def test_from_roster_to_activated_cards_through_the_cli(prod: Production, run_cli) -> None:
    data = str(prod.data)
    prod.registry.close()  # the commands open the data directory themselves
    common = ("--data", data, "--operator", "op1")
    people = prod.people(4)
    roster = write_roster_dbf(prod.files / "roster.dbf", people)
    prod.photos(people)

    imported = run_cli("roster", "import", roster, *common, "--json")
    assert imported.code == 0 and imported.json()["import"]["accepted"] == 4
    again = run_cli("roster", "import", roster, *common)
    assert again.code == 0 and "already imported: nothing changed" in again.out
    photos = run_cli("photos", "import", prod.files / "photos", *common, "--json")
    assert photos.json()["accepted"] == 4 and photos.json()["without_photo"] == []

    created = run_cli("batch", "create", "--employer", UNIT, *common, "--json").json()
    [batch] = created["batches"]
    batch_id = batch["batch"]
    assert batch["rows"] == 4 and batch["employer_name"] == UNIT_NAME

    out = prod.files / "out"
    assert run_cli("batch", "export-print", batch_id, "--out", out, *common).code == 0
    review = run_cli("batch", "export-review", batch_id, "--out", out, *common, "--json").json()
    sheet = Path(review["folder"]) / f"{batch_id}-review.csv"
    with open(sheet, encoding="utf-8-sig", newline="") as source:
        lines = list(csv.reader(source))
    for line in lines[1:]:
        line[9], line[10] = ("不通过", "照片不是本人") if line[0] == "4" else ("通过", "")
    verdicts = prod.files / "verdicts.csv"
    with open(verdicts, "w", encoding="gbk", newline="") as target:
        csv.writer(target).writerows(lines)
    reviewed = run_cli("batch", "import-review", batch_id, verdicts, *common, "--json").json()
    assert (reviewed["approved"], reviewed["rejected"]) == (3, 1)

    exported = run_cli("batch", "export-print", batch_id, "--out", out, *common, "--json").json()
    assert exported["exports"][0]["purpose"] == "production" and exported["exports"][0]["rows"] == 3
    printed = prod.files / "printed.dbf"
    print_batch(Path(exported["exports"][0]["folder"]), printed)
    registered = run_cli("batch", "register-printed", batch_id, printed, *common, "--json").json()
    assert registered["registered"] == 3 and registered["mismatches"] == []
    chips = run_cli("batch", "personalize", batch_id, "--keys", KEYS_PATH, *common, "--json").json()
    assert chips["personalized"] == 3
    assert run_cli("batch", "distribute", batch_id, "--to", "employer", "--receiver", "王经理", *common).code == 0
    assert run_cli("batch", "distribute", batch_id, "--to", "persons", *common).code == 0

    shown = run_cli("batch", "show", batch_id, *common, "--json").json()
    rows = {row["row"]: row for row in shown["rows"]}
    assert shown["counts"] == {"rejected": 1, "handed_over": 3} and shown["stage"] == "handed_over"
    assert all("*" in row["id_number"] for row in rows.values())
    first = next(p for p in people if p.id_number.endswith(rows[1]["id_number"][-4:])
                 and p.id_number.startswith(rows[1]["id_number"][:6]))
    activated = run_cli("card", "activate", rows[1]["card_number"], "--id-number", first.id_number, "--name",
                        first.name, "--institution", "济南市社保服务中心", *common, "--json", stdin="482915\n")
    assert activated.code == 0 and activated.json()["state"] == "active"
    bank = run_cli("card", "activate", rows[1]["card_number"], "--financial", "--bank", "中国工商银行", *common)
    assert bank.code == 0 and "financial functions open" in bank.out

    table = run_cli("batch", "show", batch_id, *common)
    assert batch_id in table.out and "activated" in table.out and first.id_number not in table.out
    assert "activated 1" in run_cli("batch", "list", *common).out
    audit = run_cli("audit", "verify", "--data", data)
    assert audit.code == 0


def test_a_refusal_names_file_row_and_field_and_changes_nothing(prod: Production, run_cli) -> None:
    data = str(prod.data)
    bad = prod.files / "no-name.csv"
    bad.write_text("身份证号码,性别,出生日期,民族,单位编号,居住地,户籍地\n", encoding="utf-8")
    prod.registry.close()
    result = run_cli("roster", "import", bad, "--data", data)
    assert result.code == 2 and result.err.startswith("citycard: error: no-name.csv")
    assert "name: the column is missing" in result.err
    missing_batch = run_cli("batch", "show", "B999999", "--data", data)
    assert missing_batch.code == 2 and "no batch B999999" in missing_batch.err
    keys = run_cli("batch", "personalize", "B000001", "--keys", prod.files / "nope.json", "--data", data)
    assert keys.code == 2 and "nope.json" in keys.err


def test_rejected_rows_are_listed_with_masked_id_numbers(prod: Production, run_cli) -> None:
    people = prod.people(2)
    wrong = people[1].id_number[:-1] + ("0" if people[1].id_number[-1] != "0" else "1")
    roster = write_roster_dbf(prod.files / "r.dbf", people[:1], extra_rows=[
        (wrong, "王错号", people[1].gender_code, people[1].date_of_birth, "01", "CHN", UNIT, "济南", "济南")])
    prod.registry.close()
    result = run_cli("roster", "import", roster, "--data", str(prod.data), "--report", prod.files / "rejected.csv")
    assert result.code == 0 and "check character" in result.out and wrong not in result.out
    report = (prod.files / "rejected.csv").read_text(encoding="utf-8-sig")
    assert "r.dbf,2,id_number" in report and wrong not in report
    as_json = run_cli("roster", "list", "--data", str(prod.data), "--json").json()
    assert json.dumps(as_json["imports"][0]["rejected"]) == "1"
