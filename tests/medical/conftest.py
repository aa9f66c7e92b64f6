"""A real server (its own process) with the medical application registered, and the medical service
in this process talking to it over gRPC with the application's credential, as the plugin does."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpc"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from citycard.apps.medical import MedicalPlugin
from citycard.apps.medical.core_client import CoreClient
from citycard.apps.medical.institutions import Institution, InstitutionKind
from citycard.apps.medical.policy import HospitalLevel
from citycard.apps.medical.service import MedicalService
from citycard.apps.medical.split import VisitType
from citycard.apps.medical.store import Store
from grpc_helpers import RunningServer, auth, register, start_server
from medical_helpers import CLOSED_PHARMACY, HOSPITAL, NOW, PHARMACY, World


@pytest.fixture(scope="module")
def medical_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str, dict[str, str]]]:
    running = start_server(tmp_path_factory.mktemp("server"))
    registration = register(running, MedicalPlugin().manifest())
    accounts = {account.name: account.id for account in registration.application.accounts}
    yield running, registration.bearer_token, accounts
    assert running.stop() == 0, running.log_text()


@pytest.fixture
def world(medical_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    running, token, accounts = medical_server
    monkeypatch.setenv("CITYCARD_NOW", NOW)
    store = Store(tmp_path / "medical.sqlite")
    service = MedicalService(store, CoreClient(running.channel, auth(token), accounts))
    settlement = int(accounts["institutions"], 16)
    for institution in (
        Institution(HOSPITAL, "济南市第一人民医院", InstitutionKind.HOSPITAL, HospitalLevel.LEVEL_3,
                    frozenset({VisitType.OUTPATIENT, VisitType.INPATIENT}), dt.date(2020, 1, 1), None, settlement),
        Institution(PHARMACY, "漱玉平民大药房", InstitutionKind.PHARMACY, HospitalLevel.NONE,
                    frozenset({VisitType.PHARMACY}), dt.date(2020, 1, 1), None, settlement),
        Institution(CLOSED_PHARMACY, "已撤销药房", InstitutionKind.PHARMACY, HospitalLevel.NONE,
                    frozenset({VisitType.PHARMACY}), dt.date(2020, 1, 1), dt.date(2026, 6, 1), settlement),
    ):
        service.add_institution(institution, hashlib.sha256(institution.code.encode()).hexdigest())
    yield World(running, token, accounts, service)
    store.close()


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict]]:
    data = tmp_path_factory.mktemp("served")
    running = start_server(data, plugins="medical", env={"CITYCARD_MEDICAL_DIR": str(data / "medical")})
    ready = data / "medical" / "ready.json"
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, running.log_text()
        time.sleep(0.05)
    yield running, json.loads(ready.read_text())
    assert running.stop() == 0, running.log_text()
    assert not ready.exists()  # the plugin stopped its service on SIGTERM
