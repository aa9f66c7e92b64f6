"""Shared pieces of the medical tests (a module with a name of its own: test modules import it)."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpc"))

from citycard.apps.medical.service import MedicalService
from grpc_helpers import RunningServer, add_person_with_card, auth, citizen_id

NOW = "2026-11-25T10:00:00+08:00"
HOSPITAL, PHARMACY, CLOSED_PHARMACY = "H3701001", "P3701001", "P3701009"
_PEOPLE = itertools.count()


@dataclass
class World:
    server: RunningServer
    token: str
    accounts: dict[str, str]
    service: MedicalService

    def person(self, name: str = "张三") -> tuple[str, str]:
        """A new insured person with an active card: (id_number, card_number)."""
        n = next(_PEOPLE)
        id_number = citizen_id(f"{1950 + n // 900}0101", 100 + n % 900)
        return id_number, add_person_with_card(self.server, id_number, name)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth(self.token)
