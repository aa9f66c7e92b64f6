"""Shared fixtures. ``kit``: registries in a temporary directory, valid ID numbers, and a snapshot of
everything a registry stores, so a test can assert that a refused operation changed nothing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from citycard.core import denylist
from citycard.core.clock import CITY_ZONE
from citycard.core.identity import check_character, unit_check_character
from citycard.core.registry import Registry
from citycard.core.registry_store import REGISTRY_TABLES


class RegistryKit:
    UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")
    UNIT_NAME = "济南示例科技有限公司"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: list[Registry] = []

    def open(self, name: str = "data", **settings: object) -> Registry:
        """The registry in ``root/name``; ``settings`` are written to its citycard.json first."""
        data = self.root / name
        if settings:
            data.mkdir(parents=True, exist_ok=True)
            (data / "citycard.json").write_text(json.dumps({"registry": settings}), encoding="utf-8")
        registry = Registry.open(data)
        self._open.append(registry)
        return registry

    def close(self, registry: Registry) -> None:
        self._open.remove(registry)
        registry.close()

    def close_all(self) -> None:
        for registry in self._open:
            registry.close()
        self._open.clear()

    @staticmethod
    def at(*parts: int) -> dt.datetime:
        return dt.datetime(*parts, tzinfo=CITY_ZONE)  # type: ignore[misc]

    @staticmethod
    def citizen_id(birth: str = "19800501", sequence: int = 123, region: str = "370102") -> str:
        body = f"{region}{birth}{sequence:03d}"
        return body + check_character(body)

    def add_person(self, registry: Registry, id_number: str, name: str = "张三", *, employed: bool = True,
                   at: dt.datetime | None = None) -> None:
        birth = id_number[6:14]
        gender = "male" if int(id_number[14:17]) % 2 else "female"
        if employed:
            try:
                registry.employer(self.UNIT)
            except ValueError:
                registry.add_employer(self.UNIT, self.UNIT_NAME, actor="op", at=at)
        registry.add_person(id_number=id_number, name=name, gender=gender,
                            date_of_birth=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", residence="济南市历下区",
                            household_registration="济南市", status="employed" if employed else "retired",
                            employer=self.UNIT if employed else None, actor="op", at=at)

    @staticmethod
    def snapshot(registry: Registry) -> dict[str, object]:
        """Every row of every registry table, every account record and the ledger's totals."""
        ledger = registry.ledger
        tables = {name: ledger.scan(name) for name in REGISTRY_TABLES + denylist.DENYLIST_TABLES}
        account_ids = sorted({(1 << 120) | n for n in range(1, 50)} | {(2 << 120) | n for n in range(1, 50)}
                             | {registry.fund_account_id, registry.load_account_id, registry.suspense_account_id})
        accounts = ledger.lookup_accounts(account_ids).tobytes()
        return {"tables": tables, "accounts": accounts, "totals": ledger.totals()}


@pytest.fixture
def kit(tmp_path: Path):
    registry_kit = RegistryKit(tmp_path)
    yield registry_kit
    registry_kit.close_all()
