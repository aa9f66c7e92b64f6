"""The cyclic collector paused for a bulk step: switched back on however the step ends, left off for a
caller that had switched it off, and the steps that run with it paused (the roster import, with bad rows
and worker processes; batch creation, with entries held back) make no reference cycles that only the
collector would free."""

from __future__ import annotations

import gc

import pytest
from citycard.apps.production import create_batches, import_photos, import_roster
from citycard.apps.production.collector import collector_paused

from .helpers import UNIT, Production, roster_with


def test_the_collector_is_switched_back_on_however_the_step_ends() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("a step that fails")
    assert gc.isenabled()


def test_a_caller_that_switched_the_collector_off_keeps_it_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_roster_import_and_batch_creation_leave_nothing_for_the_collector(prod: Production) -> None:
    people = prod.people(30)
    bad = [("370102198503122252", "只有三列", "男"), (people[0].id_number, *["x"] * 8)]
    gc.collect()
    gc.disable()
    try:
        imported = import_roster(prod.registry, prod.store, roster_with(prod, people, extra_rows=bad), actor="op",
                                 jobs=2)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert (imported.record.accepted, imported.record.rejected) == (30, 2)
    assert unreachable == 0
    import_photos(prod.registry, prod.store, prod.photos(people[:-2]), prod.settings.photo, actor="op")
    gc.collect()
    gc.disable()
    try:
        result = create_batches(prod.registry, prod.store, prod.settings, employers=[UNIT], actor="op", rows_max=8)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert (result.rows, result.held_back_total, len(result.batches)) == (28, 2, 4)
    assert unreachable == 0
