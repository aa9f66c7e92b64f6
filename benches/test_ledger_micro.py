"""pytest-benchmark micro suites for the settlement core's hot calls (not part of `make test`).

    .venv/bin/python -m pytest benches/test_ledger_micro.py --benchmark-only

Each measures one call on a warm ledger on disk: a full durable batch of transfers, a batch that is
refused entirely (the rules without the disk), an idempotent resend (the `exists` path reads the log),
and look-ups.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benches.ledger import BATCH, PERSON_FIRST_ID, chart, workload
from citycard.core.ledger import Ledger

PERSONS = 10_000


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    with Ledger(tmp_path_factory.mktemp("micro") / "ledger", map_size_bytes=2**34) as opened:
        for block in chart(PERSONS):
            opened.create_accounts(block)
        yield opened


@pytest.fixture(scope="module")
def batches():
    return workload(400, PERSONS)


def test_durable_batch_of_8189_transfers(benchmark, ledger, batches):
    fresh = iter(batches[1:])
    result = benchmark.pedantic(lambda: ledger.create_transfers(next(fresh)), rounds=60, iterations=1)
    assert (result["status"] == 0).all()


def test_refused_batch_rules_only(benchmark, ledger, batches):
    refused = batches[0].copy()
    refused["amount"][1::2] = 2**63  # every settlement exceeds the person's credits: nothing is written
    refused["amount"][0::2] = 0
    result = benchmark(ledger.create_transfers, refused)
    assert (result["status"] != 0).all()


def test_resend_is_exists(benchmark, ledger, batches):
    ledger.create_transfers(batches[-1])
    result = benchmark(ledger.create_transfers, batches[-1])
    assert (result["status"] == 29).all()


def test_lookup_8189_accounts(benchmark, ledger):
    ids = np.zeros((BATCH, 2), dtype=np.uint64)
    ids[:, 0] = PERSON_FIRST_ID + np.arange(BATCH)
    found = benchmark(ledger.lookup_accounts, ids)
    assert len(found) == BATCH


def test_account_transfers_range(benchmark, ledger, batches):
    counter = itertools.count()
    found = benchmark(lambda: ledger.account_transfers(PERSON_FIRST_ID + next(counter) % PERSONS))
    assert found is not None
