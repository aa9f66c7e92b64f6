"""The designated medical institutions (定点医疗机构 and 定点零售药店): who may bill the medical insurance.

An institution has a code, a kind (hospital, clinic, retail pharmacy), a level (hospitals), the visit types
it may bill, the dates it is designated from and (once closed) until, and the settlement account on
MEDICAL it is paid into. A bill from a code not in the registry, from a closed institution, or for a
visit type it may not bill is refused with a reason naming which.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from citycard.apps.medical.policy import HospitalLevel
from citycard.apps.medical.split import VisitType

__all__ = ["Institution", "InstitutionError", "InstitutionKind", "Institutions"]

CODE_PATTERN = re.compile(r"^[A-Z0-9]{4,20}$")


class InstitutionError(ValueError):
    """An institution is unknown, closed, or may not bill this; or its definition is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # not_designated, closed, not_open_yet, service_not_allowed, invalid


class InstitutionKind(enum.Enum):
    HOSPITAL = "hospital"
    CLINIC = "clinic"
    PHARMACY = "pharmacy"


@dataclass(frozen=True)
class Institution:
    code: str
    name: str
    kind: InstitutionKind
    level: HospitalLevel
    services: frozenset[VisitType]
    opened: _dt.date
    closed: _dt.date | None  # designated until the day before this date
    settlement_account_id: int

    def __post_init__(self) -> None:
        if not CODE_PATTERN.match(self.code):
            raise InstitutionError("invalid", f"institution code {self.code!r}: 4 to 20 upper-case letters or digits")
        if not self.name.strip():
            raise InstitutionError("invalid", f"institution {self.code}: name is missing")
        if not self.services:
            raise InstitutionError("invalid", f"institution {self.code}: it must be allowed at least one service")
        if self.kind is InstitutionKind.PHARMACY and self.services != {VisitType.PHARMACY}:
            raise InstitutionError("invalid", f"institution {self.code}: a retail pharmacy bills pharmacy sales only")
        if VisitType.INPATIENT in self.services and (self.kind is not InstitutionKind.HOSPITAL
                                                     or self.level == HospitalLevel.NONE):
            raise InstitutionError("invalid", f"institution {self.code}: only a graded hospital admits inpatients")
        if self.closed is not None and self.closed <= self.opened:
            raise InstitutionError("invalid", f"institution {self.code}: closes on {self.closed}, "
                                              f"not after it opened on {self.opened}")
        if self.settlement_account_id <= 0:
            raise InstitutionError("invalid", f"institution {self.code}: settlement account is missing")

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "kind": self.kind.value, "level": int(self.level),
                "services": sorted(service.value for service in self.services), "opened": self.opened.isoformat(),
                "closed": self.closed.isoformat() if self.closed else None,
                "settlement_account_id": f"{self.settlement_account_id:032x}"}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> Institution:
        try:
            return cls(code=str(row["code"]), name=str(row["name"]), kind=InstitutionKind(row["kind"]),
                       level=HospitalLevel(int(row.get("level", 0))),
                       services=frozenset(VisitType(service) for service in row["services"]),
                       opened=_dt.date.fromisoformat(row["opened"]),
                       closed=_dt.date.fromisoformat(row["closed"]) if row.get("closed") else None,
                       settlement_account_id=int(str(row["settlement_account_id"]), 16))
        except (KeyError, ValueError, TypeError) as exc:
            raise InstitutionError("invalid", f"institution {row.get('code', '?')!r}: {exc}") from None


class Institutions:
    """The registry: look-ups and the check every bill goes through."""

    def __init__(self, institutions: Iterable[Institution] = ()) -> None:
        self._by_code: dict[str, Institution] = {}
        for institution in institutions:
            self.add(institution)

    def add(self, institution: Institution) -> None:
        if institution.code in self._by_code:
            raise InstitutionError("invalid", f"institution {institution.code} is registered already")
        self._by_code[institution.code] = institution

    def close(self, code: str, on: _dt.date) -> Institution:
        old = self.get(code)
        closed = Institution(**{**old.__dict__, "closed": on})  # checked again: not before it opened
        self._by_code[code] = closed
        return closed

    def get(self, code: str) -> Institution:
        institution = self._by_code.get(code)
        if institution is None:
            raise InstitutionError("not_designated", f"institution {code!r} is not a designated medical institution")
        return institution

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._by_code.values(), key=lambda institution: institution.code))

    def __len__(self) -> int:
        return len(self._by_code)

    def check(self, code: str, visit: VisitType, day: _dt.date) -> Institution:
        """The institution if it may bill ``visit`` on ``day``; otherwise InstitutionError with the reason."""
        institution = self.get(code)
        if day < institution.opened:
            raise InstitutionError("not_open_yet", f"institution {code} is designated from {institution.opened}, "
                                                   f"not on {day}")
        if institution.closed is not None and day >= institution.closed:
            raise InstitutionError("closed", f"institution {code} is closed since {institution.closed}")
        if visit not in institution.services:
            raise InstitutionError("service_not_allowed", f"institution {code} may not bill {visit.value} care "
                                   f"(it may bill {', '.join(sorted(s.value for s in institution.services))})")
        return institution
