"""The production store's bulk writes (a batch's new rows and its batched entries, written without
building their records) store what the record-by-record writes store."""

from __future__ import annotations

from dataclasses import replace

import pytest
from citycard.apps.production.store import (
    BATCH_ROWS,
    CARDS,
    ROSTER,
    WAITING,
    BatchRow,
    EntryState,
    ProductionStore,
    RosterEntry,
    RowState,
    waiting_key,
)

AT = (2025, 9, 30, 10, 0)
NEW_ROW = {"batch_id": "B000007", "row": 12, "id_number": "370102198503120038", "name": "买买提·艾力",
           "gender": "male", "date_of_birth": "1985-03-12", "nationality": "CHN", "ethnicity": "05",
           "employer": "91370100MA3C5LQX6E", "card_number": "A00000001", "card_id_code": "370100D156000005" + "0" * 16,
           "issue_date": "2025-09-30", "expiry_date": "2035-09-30", "photo_sha256": "ab" * 32,
           "state": RowState.ORDERED}


def test_a_new_row_is_stored_as_put_row_stores_its_batch_row(kit, tmp_path):
    registry = kit.open()
    store = ProductionStore(registry.ledger, tmp_path)
    by_record, in_bulk = registry.begin(kit.at(*AT)), registry.begin(kit.at(*AT))
    row = BatchRow(**NEW_ROW)
    store.put_row(by_record, row)
    store.put_new_row(in_bulk, dict(NEW_ROW))
    for table, key in ((BATCH_ROWS, row.key), (CARDS, b"A00000001")):
        assert in_bulk.get(table, key) == by_record.get(table, key) is not None
    with pytest.raises(ValueError, match="fields"):
        store.put_new_row(in_bulk, {**NEW_ROW, "verdict_reason": "照片不清晰"})


def test_a_batched_entry_is_stored_as_put_entry_stores_it(kit, tmp_path):
    registry = kit.open()
    store = ProductionStore(registry.ledger, tmp_path)
    entry = RosterEntry(id_number="370102198503120038", name="张伟", gender="male", date_of_birth="1985-03-12",
                        nationality="CHN", ethnicity="01", residence="济南市历下区", household_registration="济南市",
                        employer="91370100MA3C5LQX6E", import_id="R000001", import_row=2, state=EntryState.WAITING)
    waiting = waiting_key(entry.employer, entry.id_number)
    stage = registry.begin(kit.at(*AT))
    store.put_entry(stage, entry, None)
    stage.commit("a waiting entry")
    by_record, in_bulk = registry.begin(kit.at(*AT)), registry.begin(kit.at(*AT))
    store.put_entry(by_record, replace(entry, state=EntryState.BATCHED, batch_id="B000007", batch_row=12), entry)
    store.put_batched_entry(in_bulk, entry, "B000007", 12)
    key = entry.id_number.encode("ascii")
    assert in_bulk.get(ROSTER, key) == by_record.get(ROSTER, key) != registry.ledger.get(ROSTER, key)
    assert in_bulk.get(WAITING, waiting) is by_record.get(WAITING, waiting) is None
    assert registry.ledger.get(WAITING, waiting) == b""
