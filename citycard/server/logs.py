"""Structured logs: one JSON object a line on stderr, with ID numbers masked on the way out.

Every record passes ``MaskingFilter``, which masks anything shaped like a citizen ID number (17 digits and
a digit or X) in the message and in the extra fields, whatever the caller wrote. Secrets (tokens,
passwords, PINs) are never handed to a logger in the first place.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from citycard.core.identity import mask_id

__all__ = ["configure", "mask_text"]

_CITIZEN_ID = re.compile(r"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def mask_text(text: str) -> str:
    return _CITIZEN_ID.sub(lambda match: mask_id(match.group(0)), text)


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_text(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, mask_text(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exc"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(document, ensure_ascii=False, default=str)


def configure(level: int = logging.INFO, stream: Any = None) -> None:
    """Send the citycard loggers' records, masked, as JSON lines to ``stream`` (default stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(MaskingFilter())
    root = logging.getLogger("citycard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
