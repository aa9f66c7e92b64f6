"""The one exception of production, and the row-level problems that reports list.

A ``ProductionError`` is a refused step that changed nothing; it names the file, the row and the field
where it can, and shows ID numbers only masked. It is a ``RegistryError``, so the CLI and the gRPC
layer treat it like any other refusal. A ``RowProblem`` is one bad row of an otherwise good file: the
file is imported (or registered) without it, and the row goes into the rejection report.
"""

from __future__ import annotations

from dataclasses import dataclass

from citycard.core.registry_records import ErrorCode, RegistryError

__all__ = ["ProductionError", "RowProblem"]


class ProductionError(RegistryError):
    """A production step was refused and changed nothing."""

    def __init__(self, field: str, reason: str, *, file: str | None = None, row: int | None = None,
                 subject: str = "", code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
        self.file = file
        self.row = row
        where = [part for part in (file, None if row is None else f"row {row}", subject) if part]
        super().__init__(field, reason, subject=", ".join(where), code=code)


@dataclass(frozen=True)
class RowProblem:
    """One bad row: where it is, which field, why. ``who`` is the masked ID number, if there was one."""

    file: str
    row: int
    field: str
    reason: str
    who: str = ""

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "row": self.row, "field": self.field, "reason": self.reason, "who": self.who}

    def __str__(self) -> str:
        who = f" ({self.who})" if self.who else ""
        return f"{self.file}: row {self.row}{who}: {self.field}: {self.reason}"
