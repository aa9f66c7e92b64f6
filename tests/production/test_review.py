"""The employer's review, round trip: the package, verdicts with rejections, rejected rows going back to
correction and into a later batch with the same ordered card, and bad verdict files refused whole."""

from __future__ import annotations

import csv

import pytest
from citycard.apps.production import (
    EntryState,
    ProductionError,
    RowState,
    create_batches,
    export_review,
    import_photos,
    import_review,
    import_roster,
)
from citycard.apps.production.sample import draw_photo

from .helpers import Production, ordered_batch, roster_with, write_verdicts


def test_the_package_has_a_csv_an_html_sheet_and_the_photos(prod: Production) -> None:
    batch_id, people = ordered_batch(prod, 3)
    package = export_review(prod.registry, prod.store, batch_id, prod.files / "review", actor="op")
    with open(package / f"{batch_id}-review.csv", encoding="utf-8-sig", newline="") as source:
        lines = list(csv.reader(source))
    assert lines[0][:5] == ["序号", "卡号", "姓名", "性别", "身份证号码"] and lines[0][-2:] == ["审核结果", "原因"]
    assert [line[4] for line in lines[1:]] == sorted(person.id_number for person in people)
    sheet = (package / f"{batch_id}-review.html").read_text(encoding="utf-8")
    for line in lines[1:]:
        assert f'src="photos/{line[4]}.jpg"' in sheet and line[2] in sheet
        assert (package / "photos" / f"{line[4]}.jpg").is_file()


def test_round_trip_with_rejections_and_the_correction_that_follows(prod: Production) -> None:
    batch_id, people = ordered_batch(prod, 4)
    rows = prod.store.rows(batch_id)
    verdicts = write_verdicts(prod, batch_id, {2: "姓名有错别字", 4: "照片不是本人"})
    result = import_review(prod.registry, prod.store, batch_id, verdicts, actor="op")
    assert (result.approved, result.rejected, result.waiting) == (2, 2, 0)
    states = {row.row: row.state for row in prod.store.rows(batch_id)}
    assert states == {1: RowState.APPROVED, 2: RowState.REJECTED, 3: RowState.APPROVED, 4: RowState.REJECTED}
    misspelt, wrong_photo = rows[1], rows[3]
    entry = prod.store.entry(misspelt.id_number)
    assert entry.state is EntryState.CORRECTION and entry.reason == "姓名有错别字"
    before = prod.snapshot()
    assert import_review(prod.registry, prod.store, batch_id, verdicts, actor="op").unchanged == 4
    assert prod.snapshot() == before  # the same verdicts again change nothing

    # The corrected roster row and a new photo send both back to waiting; the next batch makes their cards,
    # with the cards that were ordered for them (nothing was printed on those), and the corrected name.
    person = next(p for p in people if p.id_number == misspelt.id_number)
    fixed = [(person.id_number, "张正确", "男" if person.gender_code == "1" else "女", person.date_of_birth.isoformat(),
              person.ethnicity, "CHN", person.employer, person.residence, person.household_registration)]
    import_roster(prod.registry, prod.store, roster_with(prod, [], extra_rows=fixed, name="corrected.csv"), actor="op")
    folder = prod.files / "retaken"
    folder.mkdir()
    (folder / f"{wrong_photo.id_number}.jpg").write_bytes(draw_photo(1234))
    assert import_photos(prod.registry, prod.store, folder, prod.settings.photo, actor="op").back_from_correction == 1
    [again] = create_batches(prod.registry, prod.store, prod.settings, actor="op").batches
    new_rows = {row.id_number: row for row in prod.store.rows(again.batch_id)}
    assert set(new_rows) == {misspelt.id_number, wrong_photo.id_number}
    assert new_rows[misspelt.id_number].card_number == misspelt.card_number
    assert new_rows[misspelt.id_number].name == "张正确" and prod.registry.person(misspelt.id_number).name == "张正确"
    assert new_rows[wrong_photo.id_number].photo_sha256 != wrong_photo.photo_sha256
    assert prod.registry.card(misspelt.card_number).state.value == "ordered"
    assert prod.store.row_of_card(misspelt.card_number).batch_id == again.batch_id


def _verdict_file(prod: Production, lines: list[list[str]], name: str = "bad.csv") -> object:
    path = prod.files / name
    with open(path, "w", encoding="utf-8", newline="") as target:
        csv.writer(target).writerows(lines)
    return path


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda line: line.__setitem__(1, "Z00000001"), "card_number", "not a card of this batch"),
    (lambda line: line.__setitem__(4, "110101199003070019"), "id_number", "re-sorted"),
    (lambda line: (line.__setitem__(9, "不通过"), line.__setitem__(10, "")), "reason", "needs a reason"),
    (lambda line: line.__setitem__(9, "也许"), "verdict", "neither"),
], ids=["unknown-card", "shifted-line", "rejection-without-reason", "unknown-verdict"])
def test_a_bad_verdict_line_refuses_the_whole_file(prod: Production, change, field: str, words: str) -> None:
    batch_id, _ = ordered_batch(prod, 3)
    good = write_verdicts(prod, batch_id, {})
    with open(good, encoding="gbk", newline="") as source:
        lines = list(csv.reader(source))
    change(lines[2])
    before = prod.snapshot()
    with pytest.raises(ProductionError) as refused:
        import_review(prod.registry, prod.store, batch_id, _verdict_file(prod, lines), actor="op")
    [problem] = refused.value.problems
    assert (problem.row, problem.field) == (2, field) and words in problem.reason
    assert prod.snapshot() == before


def test_a_verdict_is_final(prod: Production) -> None:
    batch_id, _ = ordered_batch(prod, 2)
    import_review(prod.registry, prod.store, batch_id, write_verdicts(prod, batch_id, {}), actor="op")
    lines = [["卡号", "审核结果", "原因"], [prod.store.rows(batch_id)[0].card_number, "不通过", "改主意了"]]
    with pytest.raises(ProductionError, match="already approved; a verdict is final"):
        import_review(prod.registry, prod.store, batch_id, _verdict_file(prod, lines), actor="op")
    assert prod.store.rows(batch_id)[0].state is RowState.APPROVED


def test_lines_without_a_verdict_leave_their_rows_waiting(prod: Production) -> None:
    batch_id, _ = ordered_batch(prod, 3)
    rows = prod.store.rows(batch_id)
    lines = [["卡号", "审核结果", "原因"], [rows[0].card_number, "通过", ""], [rows[1].card_number, "", ""]]
    result = import_review(prod.registry, prod.store, batch_id, _verdict_file(prod, lines), actor="op")
    assert (result.approved, result.without_verdict, result.waiting) == (1, 1, 2)
