"""Helpers of the production tests: the production context, sample people, rosters and photos, walking a
batch through the steps, and citycard's parser with the production commands on it.

``build_parser`` builds citycard's own parser; the production commands are registered on it when cli.py
does not list them yet, so the tests run the same handlers an operator does.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from citycard.apps.production import (
    ProductionSettings,
    ProductionStore,
    create_batches,
    distribute_to_employer,
    export_print,
    export_review,
    hand_over,
    import_photos,
    import_review,
    import_roster,
    personalize_batch,
    register_printed,
)
from citycard.apps.production.producer import print_batch
from citycard.apps.production.sample import SamplePerson, sample_people, write_photos, write_roster_csv
from citycard.apps.production.store import PRODUCTION_TABLES
from citycard.card import MasterKeys
from citycard.core import denylist
from citycard.core.clock import CITY_ZONE
from citycard.core.identity import unit_check_character
from citycard.core.registry import Registry
from citycard.core.registry_store import REGISTRY_TABLES

from citycard import cli

UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")
UNIT_NAME = "济南示例科技有限公司"
OTHER_UNIT = "91370102MA3C5LQX7" + unit_check_character("91370102MA3C5LQX7")
OTHER_UNIT_NAME = "济南另一家有限公司"
NOW = dt.datetime(2025, 9, 30, 10, 0, tzinfo=CITY_ZONE)
KEYS_PATH = Path(__file__).parent.parent / "card" / "data" / "test-master-keys.json"


@dataclass
class Production:
    data: Path
    registry: Registry
    store: ProductionStore
    settings: ProductionSettings
    files: Path

    def people(self, count: int, *, unit: str = UNIT, first_index: int = 0, seed: int = 1) -> list[SamplePerson]:
        return sample_people(count, [unit], seed=seed, first_index=first_index)

    def photos(self, people: list[SamplePerson], folder: str = "photos") -> Path:
        target = self.files / folder
        write_photos(target, people)
        return target

    def snapshot(self) -> dict[str, object]:
        """Every registry and production row and the ledger's totals: equal snapshots, nothing changed."""
        ledger = self.registry.ledger
        tables = {name: ledger.scan(name) for name in REGISTRY_TABLES + denylist.DENYLIST_TABLES + PRODUCTION_TABLES}
        return {"tables": tables, "totals": ledger.totals(), "accounts": ledger.stats()}


# -- the CLI, in-process ---------------------------------------------------------------------------------------

PRODUCTION_MODULES = ("citycard.commands.roster", "citycard.commands.batch")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for module in PRODUCTION_MODULES:
        probe = "roster" if module.endswith("roster") else "batch"
        if probe not in commands.choices:
            importlib.import_module(module).register(commands)
    card = commands.choices["card"]
    card_commands = next(a for a in card._actions if isinstance(a, argparse._SubParsersAction))
    if "activate" not in card_commands.choices:
        importlib.import_module("citycard.commands.card_activation").register(card_commands)
    return parser


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)



# -- walking a batch through the steps ------------------------------------------------------------------------


def roster_with(prod: Production, people: list[SamplePerson], *, extra_rows=(), name: str = "roster.csv",
                encoding: str = "gbk") -> Path:
    return write_roster_csv(prod.files / name, people, encoding=encoding, extra_rows=extra_rows)


def ordered_batch(prod: Production, count: int = 4, *, first_index: int = 0) -> tuple[str, list[SamplePerson]]:
    """Roster imported, photos taken in, one batch created: (batch id, people)."""
    people = prod.people(count, first_index=first_index)
    import_roster(prod.registry, prod.store, roster_with(prod, people, name=f"roster-{first_index}.csv"), actor="op")
    import_photos(prod.registry, prod.store, prod.photos(people, f"photos-{first_index}"), prod.settings.photo,
                  actor="op")
    result = create_batches(prod.registry, prod.store, prod.settings, employers=[UNIT], actor="op")
    assert len(result.batches) == 1 and not result.held_back
    return result.batches[0].batch_id, people


def write_verdicts(prod: Production, batch_id: str, rejected: dict[int, str], *, name: str = "verdicts.csv",
                   encoding: str = "gbk") -> Path:
    """The review CSV filled in: rows in ``rejected`` (row -> reason) rejected, the others approved."""
    package = export_review(prod.registry, prod.store, batch_id, prod.files / "review", actor="op")
    with open(package / f"{batch_id}-review.csv", encoding="utf-8-sig", newline="") as source:
        lines = list(csv.reader(source))
    for line in lines[1:]:
        reason = rejected.get(int(line[0]))
        line[9], line[10] = ("不通过", reason) if reason else ("通过", "")
    path = prod.files / name
    with open(path, "w", encoding=encoding, newline="") as target:
        csv.writer(target).writerows(lines)
    return path


def reviewed_batch(prod: Production, count: int = 4, rejected: dict[int, str] | None = None
                   ) -> tuple[str, list[SamplePerson]]:
    batch_id, people = ordered_batch(prod, count)
    import_review(prod.registry, prod.store, batch_id, write_verdicts(prod, batch_id, rejected or {}), actor="op")
    return batch_id, people


def printed_results(prod: Production, batch_id: str, *, fmt: str = "dbf") -> tuple[Path, list[dict[str, str]]]:
    export = export_print(prod.registry, prod.store, prod.settings, [batch_id], prod.files / "print", actor="op")[0]
    results = prod.files / f"printed-{batch_id}.{fmt}"
    return results, print_batch(export.folder, results, fmt=fmt)


def handed_over_batch(prod: Production, master_keys: MasterKeys, count: int = 3) -> tuple[str, list[SamplePerson]]:
    batch_id, people = reviewed_batch(prod, count)
    results, _ = printed_results(prod, batch_id)
    register_printed(prod.registry, prod.store, batch_id, results, actor="op")
    personalize_batch(prod.registry, prod.store, prod.settings, batch_id, master_keys, actor="op")
    distribute_to_employer(prod.registry, prod.store, batch_id, receiver="王经理", actor="op")
    hand_over(prod.registry, prod.store, batch_id, actor="op")
    return batch_id, people
