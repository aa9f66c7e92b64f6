"""Authentication of self-service calls (the online loss report).

Design: a holder registers a self-service password at a counter, with the ID card shown (the
operator runs ``citycard person set-password``). An online call then proves the holder's identity
with the citizen ID number and that password. The registry keeps only a verifier: scrypt (RFC 7914,
N = 2**14, r = 8, p = 1) over the password with a random 16-byte salt, compared in constant time.
Wrong passwords are counted per person; after ``self_service_failures_max`` in a row, self-service
locks for that person until a counter sets a new password. A failure names no field: "ID number or
password is wrong" for an unknown person and a wrong password alike, so the call cannot be used to
probe who is registered. Passwords never reach the audit log, error messages or command lines
(commands read them from standard input).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from citycard.core.registry_records import RegistryError

__all__ = ["PASSWORD_LENGTH_MAX", "PASSWORD_LENGTH_MIN", "check_new_password", "make_verifier", "verify_password"]

PASSWORD_LENGTH_MIN = 8
PASSWORD_LENGTH_MAX = 128
SCHEME = "scrypt"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
DIGEST_BYTES = 32
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def check_new_password(password: Any) -> str:
    if not isinstance(password, str):
        raise RegistryError("password", "must be text")
    if not PASSWORD_LENGTH_MIN <= len(password) <= PASSWORD_LENGTH_MAX:
        raise RegistryError("password", f"must have {PASSWORD_LENGTH_MIN} to {PASSWORD_LENGTH_MAX} characters")
    if password.isdigit():
        # An ID card's digits or a birthday are the first guesses; a password needs a non-digit.
        raise RegistryError("password", "must not be digits only")
    return password


def make_verifier(password: str) -> dict[str, Any]:
    salt = os.urandom(SALT_BYTES)
    return {"scheme": SCHEME, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(),
            "digest": _digest(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).hex()}


def verify_password(password: Any, verifier: dict[str, Any]) -> bool:
    if not isinstance(password, str) or not 1 <= len(password) <= PASSWORD_LENGTH_MAX:
        return False
    if verifier.get("scheme") != SCHEME:
        return False
    expected = bytes.fromhex(verifier["digest"])
    actual = _digest(password, bytes.fromhex(verifier["salt"]), int(verifier["n"]), int(verifier["r"]),
                     int(verifier["p"]))
    return hmac.compare_digest(expected, actual)


def _digest(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=DIGEST_BYTES,
                          maxmem=_SCRYPT_MAXMEM)
