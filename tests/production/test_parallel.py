"""ordered_map: results in the order of the items, from worker processes or from this one, and a worker's
exception at its item; the production store's JSON is the registry's JSON."""

from __future__ import annotations

import os

import pytest
from citycard.apps.production.parallel import ordered_map
from citycard.apps.production.store import BatchRow, RowState, decode, encode
from citycard.core.registry_store import encode as registry_encode


def _square_in_a_worker(number: int) -> tuple[int, int]:
    if number == 13:
        raise ValueError("thirteen")
    return number * number, os.getpid()


@pytest.mark.parametrize("jobs", [1, 2])
def test_results_come_back_in_order(jobs: int) -> None:
    results = list(ordered_map(_square_in_a_worker, range(12), jobs=jobs, ahead=3))
    assert [(item, square) for item, (square, _) in results] == [(n, n * n) for n in range(12)]
    workers = {pid for _, (_, pid) in results}
    assert (workers == {os.getpid()}) if jobs == 1 else (os.getpid() not in workers)


def test_a_workers_exception_comes_out_at_its_item() -> None:
    seen = []
    with pytest.raises(ValueError, match="thirteen"):
        for item, _ in ordered_map(_square_in_a_worker, range(20), jobs=2):
            seen.append(item)
    assert seen == list(range(13))


def test_a_single_item_is_done_here() -> None:
    [(_, (_, pid))] = ordered_map(_square_in_a_worker, [3], jobs=2)
    assert pid == os.getpid()


def test_the_store_writes_the_registry_encoders_bytes() -> None:
    row = BatchRow(batch_id="B000001", row=1, id_number="370102198503120038", name="买买提·艾力", gender="male",
                   date_of_birth="1985-03-12", nationality="CHN", ethnicity="05", employer="91370100MA3C5LQX6E",
                   card_number="A00000001", card_id_code="370100D156000005" + "0" * 16, issue_date="2025-09-30",
                   expiry_date="2035-09-30", photo_sha256="ab" * 32, state=RowState.ORDERED,
                   verdict_reason="照片\n不清晰 \"旧\"", at_employer={"receiver": "王经理", "at": "2025-10-01"})
    record = row.to_json()
    assert encode(record) == registry_encode(record) == row.stored()
    assert BatchRow.from_json(decode(encode(record), "prod_batch_rows", row.key)) == row
