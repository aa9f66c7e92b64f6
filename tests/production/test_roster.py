"""Roster import: every kind of bad row, whole-file refusals that change nothing, idempotent re-import,
CSV and DBF in GBK and UTF-8, and an interrupted import finished by importing the file again."""

from __future__ import annotations

import datetime as dt

import pytest
from citycard.apps.production import EntryState, ProductionError, create_batches, import_roster
from citycard.apps.production import roster as roster_module
from citycard.apps.production.sample import write_roster_dbf
from citycard.core.identity import check_character

from .helpers import OTHER_UNIT, UNIT, Production, ordered_batch, roster_with


def _row(person, **changes):
    values = {"id_number": person.id_number, "name": person.name, "gender": "男" if person.gender_code == "1" else "女",
              "date_of_birth": person.date_of_birth.isoformat(), "ethnicity": person.ethnicity, "nationality": "CHN",
              "employer": person.employer, "residence": person.residence,
              "household_registration": person.household_registration}
    values.update(changes)
    return tuple(values[name] for name in ("id_number", "name", "gender", "date_of_birth", "ethnicity", "nationality",
                                           "employer", "residence", "household_registration"))


def _id(birth: str = "19850312", sequence: int = 201, region: str = "370102") -> str:
    body = f"{region}{birth}{sequence:03d}"
    return body + check_character(body)


def _man(sequence: int, **changes: str) -> tuple[str, ...]:
    """A roster row of a man born 1985-03-12 (odd sequence), with ``changes`` applied."""
    values = {"id_number": _id(sequence=sequence), "name": "王五", "gender": "男", "date_of_birth": "1985-03-12",
              "ethnicity": "01", "nationality": "CHN", "employer": UNIT, "residence": "济南市历下区",
              "household_registration": "山东省济南市", **changes}
    return tuple(values.values())


def test_every_kind_of_bad_row_is_listed_and_the_good_rows_are_imported(prod: Production) -> None:
    good = prod.people(4)  # rows 1 to 4
    wrong_check = _id(sequence=201)[:-1] + ("0" if _id(sequence=201)[-1] != "0" else "1")
    bad = [
        _man(201, id_number=wrong_check),                                  # row 5: check character
        _man(203, id_number=_id(sequence=203, region="990102")),           # 6: region
        _man(205, id_number="37010219850231" + "2050"),                    # 7: impossible birth date
        _man(207, date_of_birth="1985-03-13"),                             # 8: date of birth differs
        _man(209, gender="女"),                                             # 9: gender differs
        _man(211, name=""),                                                # 10: a required field is empty
        _man(213, name="王\u2603"),                                        # 11: not writable in GBK
        _man(215, ethnicity="77"),                                         # 12: ethnicity code
        _man(217, nationality="CHINA"),                                    # 13: nationality code
        _man(219, employer=OTHER_UNIT),                                    # 14: unknown employer
        _man(221, employer="91370100MA3C5LQX6A"),                          # 15: malformed unit code
        _man(223, date_of_birth="12/03/1985"),                             # 16: unreadable date
        _row(good[0], name="张重复"),                                        # 17: the person of row 1 again
        ("370102198503122252", "只有三列", "男"),                               # 18: too few fields
    ]
    path = roster_with(prod, good, extra_rows=bad, encoding="utf-8")
    result = import_roster(prod.registry, prod.store, path, actor="op")
    reasons = {(problem.row, problem.field): problem.reason for problem in result.problems}
    assert ("check character" in reasons[(5, "id_number")] and "region" in reasons[(6, "id_number")]
            and "not a real calendar date" in reasons[(7, "id_number")])
    assert "birth date" in reasons[(8, "date_of_birth")] and "does not match" in reasons[(9, "gender")]
    assert reasons[(10, "name")] == "is empty" and "GBK" in reasons[(11, "name")]
    assert "GB/T 3304" in reasons[(12, "ethnicity")] and "ISO 3166" in reasons[(13, "nationality")]
    assert "not a registered employer" in reasons[(14, "employer")] and (15, "employer") in reasons
    assert "not a date" in reasons[(16, "date_of_birth")]
    assert "also row 17" in reasons[(1, "id_number")] and "also row 1" in reasons[(17, "id_number")]
    assert "has 3 fields" in reasons[(18, "row")]
    assert len(reasons) == 15, reasons
    assert result.record.rejected == 15 and result.record.accepted == 3 and result.record.new == 3
    assert prod.store.entry(good[0].id_number) is None  # which of the two rows is right is not known
    assert prod.store.entry(good[1].id_number).state is EntryState.WAITING
    for problem in result.problems:  # reports name the row without showing the whole ID number
        assert problem.file == "roster.csv" and (not problem.who or "*" in problem.who)
    report = result.report_path.read_text(encoding="utf-8-sig")
    assert report.startswith("file,row,field,reason,who") and wrong_check not in report


def test_a_person_with_a_usable_card_or_a_card_in_production_is_rejected(prod: Production) -> None:
    batch_id, batched = ordered_batch(prod, 2)
    holder = prod.people(1, first_index=50)[0]
    birth = holder.date_of_birth.isoformat()
    prod.registry.add_person(id_number=holder.id_number, name=holder.name, gender="male" if holder.gender_code == "1"
                             else "female", date_of_birth=birth, residence="济南", household_registration="济南",
                             status="employed", employer=UNIT, actor="op")
    card = prod.registry.issue_card(holder.id_number, actor="op")  # at the counter: active at once
    result = import_roster(prod.registry, prod.store, roster_with(prod, [batched[0], holder], name="again.csv"),
                           actor="op")
    reasons = [problem.reason for problem in result.problems]
    assert f"batch {batch_id}" in reasons[0] and f"already holds card {card.card_number} (active)" in reasons[1]
    assert result.record.accepted == 0


def test_a_file_that_cannot_be_read_is_refused_whole_and_nothing_changes(prod: Production) -> None:
    before = prod.snapshot()
    missing_column = prod.files / "no-ethnicity.csv"
    missing_column.write_text("身份证号码,姓名,性别,出生日期,单位编号,居住地,户籍地\n", encoding="utf-8")
    with pytest.raises(ProductionError) as refused:
        import_roster(prod.registry, prod.store, missing_column, actor="op")
    assert refused.value.field == "ethnicity" and "no-ethnicity.csv" in str(refused.value)
    garbage = prod.files / "latin1.csv"
    garbage.write_bytes("身份证号码,姓名\n".encode() + b"\xff\xfe\xfa\n")
    with pytest.raises(ProductionError, match="neither UTF-8 nor GBK"):
        import_roster(prod.registry, prod.store, garbage, actor="op")
    not_a_table = prod.files / "roster.dbf"
    not_a_table.write_bytes(b"this is not a dBase table at all")
    with pytest.raises(ProductionError, match="not a readable DBF"):
        import_roster(prod.registry, prod.store, not_a_table, actor="op")
    assert prod.snapshot() == before


def test_importing_the_same_file_again_changes_nothing(prod: Production) -> None:
    path = roster_with(prod, prod.people(5))
    first = import_roster(prod.registry, prod.store, path, actor="op")
    before = prod.snapshot()
    again = import_roster(prod.registry, prod.store, path, actor="op")
    assert again.already_imported and again.record.import_id == first.record.import_id
    assert prod.snapshot() == before
    # The same rows in another file (a new export) change nothing either, but are counted.
    other = roster_with(prod, prod.people(5), name="re-exported.csv", encoding="utf-8")
    result = import_roster(prod.registry, prod.store, other, actor="op")
    assert (result.record.new, result.record.unchanged, result.record.updated) == (0, 5, 0)


def test_a_changed_row_updates_a_waiting_entry(prod: Production) -> None:
    people = prod.people(2)
    import_roster(prod.registry, prod.store, roster_with(prod, people), actor="op")
    moved = [_row(people[0], residence="济南市槐荫区经十路88号"), _row(people[1])]
    result = import_roster(prod.registry, prod.store, roster_with(prod, [], extra_rows=moved, name="v2.csv"),
                           actor="op")
    assert (result.record.updated, result.record.unchanged) == (1, 1)
    assert prod.store.entry(people[0].id_number).residence == "济南市槐荫区经十路88号"


@pytest.mark.parametrize("encoding", ["gbk", "utf-8", "utf-8-sig"])
def test_csv_in_gbk_and_utf8(prod: Production, encoding: str) -> None:
    people = prod.people(3)
    result = import_roster(prod.registry, prod.store, roster_with(prod, people, encoding=encoding), actor="op")
    assert result.record.encoding == ("gbk" if encoding == "gbk" else "utf-8") and result.record.accepted == 3
    assert prod.store.entry(people[2].id_number).name == people[2].name


def test_dbf_roster_in_gbk_with_and_without_a_code_page_byte(prod: Production) -> None:
    people = prod.people(4)
    declared = write_roster_dbf(prod.files / "declared.dbf", people[:2])
    result = import_roster(prod.registry, prod.store, declared, actor="op")
    assert (result.record.format, result.record.encoding, result.record.accepted) == ("dbf", "gbk", 2)
    undeclared = write_roster_dbf(prod.files / "undeclared.dbf", people[2:])
    raw = bytearray(undeclared.read_bytes())
    raw[29] = 0  # the language driver byte: "no code page", as many exporting tools leave it
    undeclared.write_bytes(bytes(raw))
    result = import_roster(prod.registry, prod.store, undeclared, actor="op")
    assert result.record.accepted == 2 and prod.store.entry(people[3].id_number).name == people[3].name


def test_dbf_bad_rows_and_a_declared_foreign_code_page(prod: Production) -> None:
    people = prod.people(2)
    bad = [(people[0].id_number[:-1] + "X", "坏号", "1", dt.date(1960, 1, 1), "01", "CHN", UNIT, "济南", "济南")]
    path = write_roster_dbf(prod.files / "bad.dbf", people, extra_rows=bad)
    result = import_roster(prod.registry, prod.store, path, actor="op")
    assert [(p.row, p.field) for p in result.problems] == [(3, "id_number")] and result.record.accepted == 2
    latin = bytearray(path.read_bytes())
    latin[29] = 0x57  # declares ANSI (cp1252): a Chinese roster mislabelled
    (prod.files / "latin.dbf").write_bytes(bytes(latin))
    with pytest.raises(ProductionError, match="declares code page cp1252"):
        import_roster(prod.registry, prod.store, prod.files / "latin.dbf", actor="op")
    forced = import_roster(prod.registry, prod.store, prod.files / "latin.dbf", actor="op", encoding="gbk")
    assert forced.record.unchanged == 2


def test_an_interrupted_import_blocks_batches_until_the_file_is_imported_again(
        prod: Production, monkeypatch: pytest.MonkeyPatch) -> None:
    people = prod.people(7)
    path = roster_with(prod, people)
    monkeypatch.setattr(roster_module, "CHUNK_ROWS", 3)
    real_commit = roster_module._commit_chunk
    calls = []

    def crash_after_first_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the operator's session was killed")
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(roster_module, "_commit_chunk", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        import_roster(prod.registry, prod.store, path, actor="op")
    [unfinished] = prod.store.incomplete_imports()
    assert unfinished.committed_rows == 3
    with pytest.raises(ProductionError, match="unfinished.*import that file again"):
        create_batches(prod.registry, prod.store, prod.settings, actor="op")
    monkeypatch.setattr(roster_module, "_commit_chunk", real_commit)
    finished = import_roster(prod.registry, prod.store, path, actor="op")
    assert finished.resumed and finished.record.new == 7 and finished.record.committed_rows == 7
    assert not prod.store.incomplete_imports()
    assert all(prod.store.entry(person.id_number) is not None for person in people)


@pytest.mark.parametrize("fmt", ["csv", "dbf"])
def test_rows_checked_by_worker_processes_give_the_same_import(prod: Production, monkeypatch: pytest.MonkeyPatch,
                                                               fmt: str) -> None:
    """Pieces of 3 rows checked by 2 worker processes: the same problems, in the same order, and the
    same entries as one process; a duplicate whose rows are in different pieces is still found."""
    people = prod.people(8)
    bad = [_man(201, ethnicity="77"), _row(people[1], name="张重复"), _man(205, employer=OTHER_UNIT)]
    monkeypatch.setattr(roster_module, "PIECE_ROWS", 3)
    outcomes = []
    for jobs in (1, 2):
        name = f"roster-{jobs}.{fmt}"
        if fmt == "csv":
            path = roster_with(prod, people, extra_rows=bad, name=name)
        else:
            dbf_rows = [(*row[:2], {"男": "1", "女": "2"}[row[2]], dt.date.fromisoformat(row[3]), *row[4:])
                        for row in bad]
            path = write_roster_dbf(prod.files / name, people, extra_rows=dbf_rows)
        result = import_roster(prod.registry, prod.store, path, actor="op", jobs=jobs)
        outcomes.append(([(p.row, p.field, p.reason) for p in result.problems], result.record.accepted))
        if jobs == 1:
            entries = {person.id_number: prod.store.entry(person.id_number) for person in people}
    assert outcomes[0] == outcomes[1]
    problems, accepted = outcomes[1]
    assert [(row, field) for row, field, _ in problems] == [(2, "id_number"), (9, "ethnicity"), (10, "id_number"),
                                                            (11, "employer")]
    assert "also row 10" in problems[0][2] and accepted == 7
    assert {person.id_number: prod.store.entry(person.id_number) for person in people} == entries
