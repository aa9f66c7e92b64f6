"""Registering the producer's printed results: good lines registered (the cards move to ``registered``),
every kind of mismatch with the batch reported and not registered, and a second registration idempotent."""

from __future__ import annotations

import csv

from citycard.apps.production import RowState, register_printed
from citycard.apps.production.producer import chip_serial
from citycard.card import ATR

from .helpers import Production, ordered_batch, printed_results, reviewed_batch


def _write(prod: Production, lines: list[dict[str, str]], name: str) -> object:
    path = prod.files / name
    with open(path, "w", encoding="utf-8", newline="") as target:
        writer = csv.DictWriter(target, fieldnames=("KH", "XPXLH", "SBM", "ATR"))
        writer.writeheader()
        writer.writerows(lines)
    return path


def test_good_lines_are_registered_and_mismatches_reported(prod: Production) -> None:
    batch_id, _ = reviewed_batch(prod, 8, rejected={8: "照片模糊"})
    rows = prod.store.rows(batch_id)
    _, lines = printed_results(prod, batch_id)  # the producer prints the 7 approved rows
    atr = ATR.hex().upper()
    lines[1]["SBM"] = "0" * 32                              # line 2: not the code the batch allocated
    lines[2]["XPXLH"] = "XYZ"                               # line 3: not hex
    lines[3]["ATR"] = "0011"                                # line 4: not an answer to reset
    lines[4]["XPXLH"] = lines[0]["XPXLH"]                   # line 5: the chip of line 1 again
    lines.append({"KH": "Z99999999", "XPXLH": "0102030405060708", "SBM": "1" * 32, "ATR": atr})   # 8: unknown card
    lines.append({"KH": rows[7].card_number, "XPXLH": chip_serial(rows[7].card_number),               # 9: rejected row
                  "SBM": rows[7].card_id_code, "ATR": atr})
    lines.append(dict(lines[5]))                            # 10: line 6 again (which one is right?)
    result = register_printed(prod.registry, prod.store, batch_id, _write(prod, lines, "printed.csv"), actor="op")
    found = {problem.row: (problem.field, problem.reason) for problem in result.mismatches}
    assert found[2][0] == "card_id_code" and found[3][0] == "chip_serial" and found[4][0] == "atr"
    assert "also on line 1" in found[5][1] and "not a card of this batch" in found[8][1]
    assert "rejected by the employer" in found[9][1]
    assert "more than one line" in found[6][1] and "more than one line" in found[10][1]
    assert result.registered == 2 and sorted(found) == [2, 3, 4, 5, 6, 8, 9, 10]
    registered = [row for row in prod.store.rows(batch_id) if row.state is RowState.REGISTERED]
    assert sorted(row.card_number for row in registered) == sorted([lines[0]["KH"], lines[6]["KH"]])
    for row in registered:
        card = prod.registry.card(row.card_number)
        assert card.state.value == "registered" and [h["event"] for h in prod.registry.history(row.card_number)] == [
            "issue", "print", "register"]
        assert row.chip_serial == chip_serial(row.card_number) and row.atr == atr
    assert prod.registry.card(lines[1]["KH"]).state.value == "ordered"


def test_registering_again_changes_nothing_and_a_new_chip_for_a_registered_card_is_a_mismatch(
        prod: Production) -> None:
    batch_id, _ = reviewed_batch(prod, 3)
    path, lines = printed_results(prod, batch_id, fmt="dbf")
    assert register_printed(prod.registry, prod.store, batch_id, path, actor="op").registered == 3
    before = prod.snapshot()
    again = register_printed(prod.registry, prod.store, batch_id, path, actor="op")
    assert (again.registered, again.already, again.mismatches) == (0, 3, [])
    assert prod.snapshot() == before
    lines[0]["XPXLH"] = "A1A2A3A4A5A6A7A8"
    changed = register_printed(prod.registry, prod.store, batch_id, _write(prod, lines[:1], "reprinted.csv"),
                               actor="op")
    assert "was registered with chip" in changed.mismatches[0].reason
    assert prod.snapshot() == before


def test_a_card_printed_before_the_employers_verdict_is_a_mismatch(prod: Production) -> None:

    batch_id, _ = ordered_batch(prod, 2)
    path, _ = printed_results(prod, batch_id)  # proofs printed as if they were cards
    result = register_printed(prod.registry, prod.store, batch_id, path, actor="op")
    assert result.registered == 0 and all("no verdict" in m.reason for m in result.mismatches)
