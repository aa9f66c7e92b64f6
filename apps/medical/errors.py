"""The medical application's one error type: ``MedicalError(reason, message, field=...)``; the servicer maps
each reason to a status code in one place (servicer.STATUS_OF_REASON)."""

from __future__ import annotations

__all__ = ["MedicalError"]


class MedicalError(Exception):
    def __init__(self, reason: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
