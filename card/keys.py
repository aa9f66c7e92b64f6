"""Keys: a secret wrapper that never prints, the card's key entries, and the issuer's master keys.

Master keys are configuration, never code: `MasterKeys.load(path)` reads a JSON key file (the
environment variable CITYCARD_CARD_KEYS may name it), `MasterKeys.generate()` makes a throw-away
issuer for demos and benchmarks. Each card holds keys diversified from them (crypto.diversify),
so a SAM holding the masters can serve any card. Error messages name the field that is wrong,
never its value.

Key file layout (hex, 16-byte 2-key 3DES keys):

    {"format": "citycard-master-keys/1",
     "purse": {"purchase": {"index": 1, "version": 1, "key": "<32 hex>"}, "load": {...}, "tac": {...},
               "pin_reload": {...}, "maintenance": {...}, "internal_auth": {...}},
     "ssse":  {"pin_reload": {...}, "maintenance": {...}, "internal_auth": {...}}}
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .crypto import diversify

__all__ = [
    "APPLICATION_KEY_USAGES",
    "KEY_FILE_ENV",
    "KEY_FILE_FORMAT",
    "CardKey",
    "KeyFileError",
    "KeyUsage",
    "MasterKey",
    "MasterKeys",
    "SecretKey",
]

KEY_FILE_ENV = "CITYCARD_CARD_KEYS"
KEY_FILE_FORMAT = "citycard-master-keys/1"
KEY_BYTES = 16
ALGORITHM_3DES = 0x00  # algorithm id returned by INITIALIZE commands; 00 = DES/3DES


class KeyUsage(StrEnum):
    PURCHASE = "purchase"  # DPK: purchase and composite purchase session keys
    LOAD = "load"  # DLK: load session keys
    TAC = "tac"  # DTK: transaction authentication codes
    PIN_RELOAD = "pin_reload"  # DRPK: RELOAD PIN's MAC
    MAINTENANCE = "maintenance"  # DAMK: EXTERNAL AUTHENTICATE, guards UPDATE of protected files
    INTERNAL_AUTH = "internal_auth"  # INTERNAL AUTHENTICATE: proves the card is genuine


APPLICATION_KEY_USAGES: dict[str, tuple[KeyUsage, ...]] = {
    "purse": tuple(KeyUsage),
    "ssse": (KeyUsage.PIN_RELOAD, KeyUsage.MAINTENANCE, KeyUsage.INTERNAL_AUTH),
}


class SecretKey:
    """Key bytes that refuse to show themselves in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if len(value) != KEY_BYTES:
            raise ValueError(f"a key is {KEY_BYTES} bytes")
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("SecretKey is not picklable")


@dataclass(slots=True)
class CardKey:
    """A key entry in a DF's key file on the chip.

    `tries_max` 0 means the key has no error counter (session-key masters); keys that a terminal
    proves knowledge of (EXTERNAL AUTHENTICATE) count failures like a PIN does.
    """

    usage: KeyUsage
    index: int
    version: int
    value: SecretKey = field(repr=False)
    algorithm: int = ALGORITHM_3DES
    tries_max: int = 0
    tries_left: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "usage": str(self.usage),
            "index": self.index,
            "version": self.version,
            "algorithm": self.algorithm,
            "value": self.value.reveal().hex(),
            "tries_max": self.tries_max,
            "tries_left": self.tries_left,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CardKey:
        key = cls(
            usage=KeyUsage(obj["usage"]),
            index=_byte(obj["index"], "index"),
            version=_byte(obj["version"], "version"),
            value=SecretKey(bytes.fromhex(obj["value"])),
            algorithm=_byte(obj["algorithm"], "algorithm"),
            tries_max=_byte(obj["tries_max"], "tries_max"),
            tries_left=_byte(obj["tries_left"], "tries_left"),
        )
        if not 0 <= key.tries_left <= key.tries_max <= 15:
            raise ValueError("key tries out of range")
        return key


@dataclass(frozen=True, slots=True)
class MasterKey:
    index: int
    version: int
    value: SecretKey = field(repr=False)

    def for_card(self, usage: KeyUsage, factor8: bytes, tries_max: int = 0) -> CardKey:
        return CardKey(
            usage=usage,
            index=self.index,
            version=self.version,
            value=SecretKey(diversify(self.value.reveal(), factor8)),
            tries_max=tries_max,
            tries_left=tries_max,
        )


class KeyFileError(ValueError):
    """The master key file is missing, unreadable, or a field is wrong (named, value never shown)."""


@dataclass(frozen=True)
class MasterKeys:
    """The issuer's master keys, per application ("purse", "ssse") and usage."""

    keys: dict[str, dict[KeyUsage, MasterKey]]

    def get(self, application: str, usage: KeyUsage) -> MasterKey:
        try:
            return self.keys[application][usage]
        except KeyError:
            raise KeyError(f"no master key for {application}/{usage}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> MasterKeys:
        """Read a key file; with no path, the file named by $CITYCARD_CARD_KEYS."""
        if path is None:
            path = os.environ.get(KEY_FILE_ENV)
            if not path:
                raise KeyFileError(f"no key file given and ${KEY_FILE_ENV} is not set")
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KeyFileError(f"{path}: cannot read the key file ({type(exc).__name__})") from None
        return cls.from_json(obj, source=str(path))

    @classmethod
    def from_json(cls, obj: Any, source: str = "key file") -> MasterKeys:
        if not isinstance(obj, dict) or obj.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError(f"{source}: 'format' must be {KEY_FILE_FORMAT!r}")
        keys: dict[str, dict[KeyUsage, MasterKey]] = {}
        for application, usages in APPLICATION_KEY_USAGES.items():
            section = obj.get(application)
            if not isinstance(section, dict):
                raise KeyFileError(f"{source}: section {application!r} missing")
            keys[application] = {u: _master_key(section, u, f"{source}: {application}.{u}") for u in usages}
        return cls(keys)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": KEY_FILE_FORMAT}
        for application, usages in self.keys.items():
            out[application] = {
                str(u): {"index": k.index, "version": k.version, "key": k.value.reveal().hex()}
                for u, k in usages.items()
            }
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a key file readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def generate(cls) -> MasterKeys:
        """Fresh random master keys: a throw-away issuer for demos and benchmarks."""
        return cls(
            {
                application: {u: MasterKey(1, 1, SecretKey(secrets.token_bytes(KEY_BYTES))) for u in usages}
                for application, usages in APPLICATION_KEY_USAGES.items()
            }
        )


def _master_key(section: dict[str, Any], usage: KeyUsage, where: str) -> MasterKey:
    entry = section.get(str(usage))
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: missing")
    try:
        index = _byte(entry["index"], "index")
        version = _byte(entry["version"], "version")
        value = bytes.fromhex(entry["key"])
    except (KeyError, TypeError, ValueError):
        raise KeyFileError(f"{where}: needs 'index' and 'version' (0..255) and 'key' (32 hex digits)") from None
    if len(value) != KEY_BYTES:
        raise KeyFileError(f"{where}: 'key' must be {KEY_BYTES} bytes (32 hex digits)")
    return MasterKey(index, version, SecretKey(value))


def _byte(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFF:
        raise ValueError(f"{name} must be an integer 0..255")
    return value
