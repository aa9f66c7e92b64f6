"""Who is calling, and what they may do: credentials, the method table, and the manifest scope checks.

Principals:

- ``operator``: the card operator's staff tools. Everything but booking transfers (money moves through
  the registry's own operations, such as a counter load, or through applications).
- ``enrolment``: a partner holding the enrolment credential the operator handed out; may only register
  an application.
- ``application``: a registered plugin, limited by its manifest (``AppRecord``).

Credentials: ``authorization: Bearer <token>`` metadata; the server keeps only SHA-256 digests of tokens
(they are 256-bit random, so a plain digest is enough). With mutual TLS configured, an application whose
manifest says MUTUAL_TLS is known by the common name of its verified client certificate.

Scope (every call of an application, checked before anything is written): each transfer's ledger and code
are in the manifest, at least one side is one of the application's own accounts, and neither side is
another application's account. Application account ids carry their owner: ``(4 << 120) | (seq << 16) | n``,
so the check is a few vectorized comparisons, not a look-up per transfer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from citycard.core.ledger import u128_value
from citycard.core.records import TRANSFER_DTYPE, LedgerId
from citycard.server.errors import FieldError, PermissionDenied, Unauthenticated
from citycard.v1 import common_pb2

__all__ = [
    "APP_ACCOUNT_PREFIX", "AppRecord", "Authenticator", "Principal", "app_account_id", "digest",
    "new_token", "require",
]

R = common_pb2.ErrorReason
APP_ACCOUNT_PREFIX = 4 << 120
_APP_HI_WORD = APP_ACCOUNT_PREFIX >> 64
APP_SEQ_MAX = 2**48 - 1
APP_ACCOUNTS_MAX = 64
RESERVED_ID_TOP_NIBBLE_SHIFT = 60  # transfer ids >= 2**124 are the platform's own
SMALL_BATCH_MAX = 4  # up to here the transfer checks look at one transfer at a time first
# A transfer record as struct reads it (records.TRANSFER_DTYPE, the layout ledger.proto documents): six ids
# as [lo, hi] u64 words, amount, timestamp, timeout, ledger, code, flags, reserved.
_RECORD = struct.Struct("<12QQQIIHHI")
_DEBIT_LO, _CREDIT_HI, _LEDGER, _CODE = 2, 5, 15, 16
_ID_TOP_BYTE = 15  # the most significant byte of a record's little-endian u128 id
_ID_TOP_BYTE_RESERVED = 1 << (RESERVED_ID_TOP_NIBBLE_SHIFT - 56)  # ids >= 2^124 have it at 0x10 or more
if _RECORD.size != TRANSFER_DTYPE.itemsize or TRANSFER_DTYPE.fields["ledger"][1] != 116:
    raise ImportError("records.TRANSFER_DTYPE no longer has the layout the scope check reads")
TOKEN_PREFIX = "cc1_"
TOKEN_BYTES = 32
AUTHORIZATION = "authorization"
MEDICAL_APPLICATION = "medical"

OPERATOR, ENROLMENT, APPLICATION = "operator", "enrolment", "application"

# Which kinds of principal may call which method at all; an application is then held to its manifest.
METHODS: Mapping[str, frozenset[str]] = {
    "Ledger.CreateTransfers": frozenset({APPLICATION}),
    "Ledger.CreateTransfersStream": frozenset({APPLICATION}),
    "Ledger.LookupAccounts": frozenset({OPERATOR, APPLICATION}),
    "Ledger.LookupTransfers": frozenset({OPERATOR, APPLICATION}),
    "Ledger.GetAccountTransfers": frozenset({OPERATOR, APPLICATION}),
    "Ledger.GetAccountBalance": frozenset({OPERATOR, APPLICATION}),
    "Cards.AddEmployer": frozenset({OPERATOR}),
    "Cards.AddPerson": frozenset({OPERATOR}),
    "Cards.GetPerson": frozenset({OPERATOR, APPLICATION}),  # applications: the medical one only
    "Cards.IssueCard": frozenset({OPERATOR}),
    "Cards.GetCard": frozenset({OPERATOR, APPLICATION}),
    "Cards.ReportLoss": frozenset({OPERATOR}),
    "Cards.RestoreCard": frozenset({OPERATOR}),
    "Cards.ReplaceCard": frozenset({OPERATOR}),
    "Cards.CancelCard": frozenset({OPERATOR}),
    "Cards.LoadPurse": frozenset({OPERATOR}),
    "Cards.StreamDenylist": frozenset({OPERATOR, APPLICATION}),
    "Applications.RegisterApplication": frozenset({OPERATOR, ENROLMENT}),
    "Applications.GetApplication": frozenset({OPERATOR, APPLICATION}),
    "Applications.ListApplications": frozenset({OPERATOR}),
    "Applications.RotateCredential": frozenset({OPERATOR}),
}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def app_account_id(seq: int, index: int) -> int:
    if not 1 <= seq <= APP_SEQ_MAX or not 0 <= index < APP_ACCOUNTS_MAX:
        raise ValueError(f"application {seq}, account {index}: out of range")
    return APP_ACCOUNT_PREFIX | (seq << 16) | (index + 1)


@dataclass(frozen=True)
class AppRecord:
    """A registered application as the server keeps it (table ``applications``, key: its name)."""

    name: str
    seq: int
    aid: str
    ledgers: frozenset[int]
    codes: frozenset[int]
    accounts: tuple[tuple[str, int], ...]  # (the application's name for it, account id)
    credential_kind: int
    tls_client_common_name: str
    token_sha256: str | None
    manifest: bytes  # the Manifest message as registered
    registered_at_ns: int

    @property
    def uses_medical(self) -> bool:
        return LedgerId.MEDICAL in self.ledgers

    def to_json(self) -> bytes:
        record = {"name": self.name, "seq": self.seq, "aid": self.aid, "ledgers": sorted(self.ledgers),
                  "codes": sorted(self.codes), "accounts": [[name, f"{account:032x}"] for name, account in self.accounts],
                  "credential_kind": self.credential_kind, "tls_client_common_name": self.tls_client_common_name,
                  "token_sha256": self.token_sha256, "manifest": self.manifest.hex(),
                  "registered_at_ns": self.registered_at_ns}
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, value: bytes) -> AppRecord:
        record = json.loads(value)
        return cls(name=record["name"], seq=int(record["seq"]), aid=record["aid"],
                   ledgers=frozenset(record["ledgers"]), codes=frozenset(record["codes"]),
                   accounts=tuple((name, int(account, 16)) for name, account in record["accounts"]),
                   credential_kind=int(record["credential_kind"]),
                   tls_client_common_name=record["tls_client_common_name"], token_sha256=record["token_sha256"],
                   manifest=bytes.fromhex(record["manifest"]), registered_at_ns=int(record["registered_at_ns"]))

    def owns(self, account_id: int) -> bool:
        return owner_seq(account_id) == self.seq

    # The manifest as arrays for the vectorised scope check, built once per record (records are replaced
    # whole when an application changes, never edited, so the cache cannot go stale).
    @functools.cached_property
    def ledgers_sorted(self) -> np.ndarray:
        return np.array(sorted(self.ledgers), dtype=np.uint32)

    @functools.cached_property
    def code_allowed(self) -> np.ndarray:
        """Indexed by a transfer code (u16): whether the manifest allows it."""
        table = np.zeros(2**16, dtype=bool)
        table[[code for code in self.codes if 0 <= code < 2**16]] = True
        return table


def owner_seq(account_id: int) -> int | None:
    """The seq of the application that owns an account, or None for an account no application owns."""
    if account_id >> 120 != APP_ACCOUNT_PREFIX >> 120:
        return None
    return (account_id & (2**64 - 1)) >> 16


@dataclass(frozen=True)
class Principal:
    kind: str
    name: str
    app: AppRecord | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class _Directory:
    by_digest: dict[str, Principal] = field(default_factory=dict)
    by_common_name: dict[str, Principal] = field(default_factory=dict)
    by_name: dict[str, AppRecord] = field(default_factory=dict)


class Authenticator:
    """Maps a call's credential to a Principal. The writer thread publishes application changes with
    ``publish``; calls read the current directory, which is replaced whole, never edited in place."""

    def __init__(self, *, operator_token: str, enrolment_token: str, tls: bool = False) -> None:
        self._fixed = {digest(operator_token): Principal(OPERATOR, "operator"),
                       digest(enrolment_token): Principal(ENROLMENT, "enrolment")}
        self.tls = tls
        self._directory = _Directory(by_digest=dict(self._fixed))

    def publish(self, apps: Iterable[AppRecord]) -> None:
        directory = _Directory(by_digest=dict(self._fixed))
        for app in apps:
            principal = Principal(APPLICATION, app.name, app)
            directory.by_name[app.name] = app
            if app.credential_kind == 2:  # CREDENTIAL_KIND_MUTUAL_TLS
                directory.by_common_name[app.tls_client_common_name] = principal
            elif app.token_sha256:
                directory.by_digest[app.token_sha256] = principal
        self._directory = directory

    def app(self, name: str) -> AppRecord | None:
        return self._directory.by_name.get(name)

    def apps(self) -> list[AppRecord]:
        return sorted(self._directory.by_name.values(), key=lambda app: app.seq)

    def authenticate(self, context: Any) -> Principal:
        directory = self._directory
        token = _bearer_token(context.invocation_metadata() or ())
        if token is not None:
            principal = directory.by_digest.get(digest(token))
            if principal is None:
                raise Unauthenticated("the bearer token is not valid", reason=R.CREDENTIAL_INVALID)
            return principal
        if self.tls:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            for name in names:
                principal = directory.by_common_name.get(name.decode("utf-8", "replace"))
                if principal is not None:
                    return principal
            if names:
                raise Unauthenticated("the client certificate belongs to no registered application",
                                      reason=R.CREDENTIAL_INVALID)
        raise Unauthenticated("no credential: send metadata 'authorization: Bearer <token>'",
                              reason=R.CREDENTIAL_MISSING)


def _bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == AUTHORIZATION:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'",
                                      reason=R.CREDENTIAL_INVALID)
            return token.strip()
    return None


def require(principal: Principal, method: str) -> None:
    allowed = METHODS[method]
    if principal.kind not in allowed:
        raise PermissionDenied(f"{principal.kind} credentials may not call {method}", reason=R.METHOD_NOT_ALLOWED)
    if method == "Cards.GetPerson" and principal.app is not None and not principal.app.uses_medical:
        raise PermissionDenied("persons are open to the operator and the medical application only",
                               reason=R.METHOD_NOT_ALLOWED)


# -- scope of an application's transfers and look-ups ------------------------------------------------

def check_transfer_scope(app: AppRecord, batch: np.ndarray, field: str = "transfers") -> None:
    """Refuse (PermissionDenied, nothing written) a batch that leaves the application's manifest.

    A handful of whole-batch comparisons whatever the batch size; only a refused batch is looked at again,
    to name its first bad transfer (ledgers first, then codes, then accounts). A batch of a few transfers
    (most unary requests) is first checked one transfer at a time in plain Python, which is cheaper than
    the numpy calls; anything it does not pass goes through the vectorised check, which decides."""
    if len(batch) <= SMALL_BATCH_MAX and _few_in_scope(app, batch):
        return
    ledgers = batch["ledger"]
    ledger_bad = _ledgers_outside(app, ledgers)
    code_bad = ~app.code_allowed[batch["code"]]
    debit_own, debit_foreign = _ownership(batch["debit_account_id"], app.seq)
    credit_own, credit_foreign = _ownership(batch["credit_account_id"], app.seq)
    account_bad = ~(debit_own | credit_own) | debit_foreign | credit_foreign
    if not (ledger_bad | code_bad | account_bad).any():
        return
    outside = np.flatnonzero(ledger_bad)
    if len(outside):
        index = int(outside[0])
        ledger = int(ledgers[index])
        reason = R.MEDICAL_LEDGER_RESERVED if ledger == LedgerId.MEDICAL else R.LEDGER_OUT_OF_SCOPE
        raise PermissionDenied(f"{field}[{index}].ledger: ledger {ledger} is not in the manifest of {app.name}; "
                               "nothing was booked", reason=reason, field=f"{field}[{index}].ledger")
    outside = np.flatnonzero(code_bad)
    if len(outside):
        index = int(outside[0])
        raise PermissionDenied(f"{field}[{index}].code: transfer code {int(batch['code'][index])} is not in the "
                               f"manifest of {app.name}; nothing was booked", reason=R.CODE_OUT_OF_SCOPE,
                               field=f"{field}[{index}].code")
    index = int(np.flatnonzero(account_bad)[0])
    raise PermissionDenied(
        f"{field}[{index}]: a transfer must have one of {app.name}'s own accounts on one side and no other "
        "application's account on either; nothing was booked", reason=R.ACCOUNT_OUT_OF_SCOPE,
        field=f"{field}[{index}]")


def _ledgers_outside(app: AppRecord, ledgers: np.ndarray) -> np.ndarray:
    """Which of the ledgers are not in the manifest. A batch usually books on one ledger, and then its
    lowest and highest (two cheap passes) settle it with a single look-up instead of a search per transfer."""
    lowest = int(ledgers.min())
    if lowest == int(ledgers.max()) and lowest in app.ledgers:
        return np.zeros(len(ledgers), dtype=bool)
    allowed = app.ledgers_sorted
    if not len(allowed):
        return np.ones(len(ledgers), dtype=bool)
    return allowed[np.searchsorted(allowed, ledgers).clip(max=len(allowed) - 1)] != ledgers


def check_transfer_ids(batch: np.ndarray, field: str = "transfers") -> None:
    if len(batch) <= SMALL_BATCH_MAX:
        # An id is 2^124 or more exactly when the top byte of its 16 (the record's byte 15) is 0x10 or more:
        # for a few records, reading those bytes is cheaper than the whole-column shift below.
        top_bytes = batch.tobytes()[_ID_TOP_BYTE::batch.itemsize]
        if max(top_bytes) < _ID_TOP_BYTE_RESERVED:
            return
    reserved = np.flatnonzero(batch["id"][:, 1] >> np.uint64(RESERVED_ID_TOP_NIBBLE_SHIFT))
    if len(reserved):
        index = int(reserved[0])
        raise FieldError(f"{field}[{index}].id", "ids of 2^124 and more are the platform's own; use a smaller id",
                         reason=R.ID_RESERVED)


def _few_in_scope(app: AppRecord, batch: np.ndarray) -> bool:
    """The scope rule for a few transfers, one by one: True if every one keeps to the manifest."""
    for record in _RECORD.iter_unpack(batch.tobytes()):
        if record[_LEDGER] not in app.ledgers or record[_CODE] not in app.codes:
            return False
        debit_lo, debit_hi, credit_lo, credit_hi = record[_DEBIT_LO:_CREDIT_HI + 1]
        owners = (debit_lo >> 16 if debit_hi == _APP_HI_WORD else None,
                  credit_lo >> 16 if credit_hi == _APP_HI_WORD else None)
        if app.seq not in owners or not all(owner in (None, app.seq) for owner in owners):
            return False
    return True


def _ownership(ids: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(owned by this application, owned by another application) for each (n, 2) [lo, hi] id."""
    is_app = ids[:, 1] == np.uint64(_APP_HI_WORD)
    mine = is_app & ((ids[:, 0] >> np.uint64(16)) == np.uint64(seq))
    return mine, is_app & ~mine


def account_visible(app: AppRecord, account_id: int, ledger: int) -> bool:
    """An application sees its own accounts and the persons' and cards' accounts on its ledgers, never
    another application's."""
    seq = owner_seq(account_id)
    if seq is not None:
        return seq == app.seq
    return ledger in app.ledgers


def check_accounts_visible(app: AppRecord, records: np.ndarray, field: str) -> None:
    for record in records:
        account_id = u128_value(record["id"])
        if not account_visible(app, account_id, int(record["ledger"])):
            raise PermissionDenied(f"{field}: account {account_id:x} is outside the scope of {app.name}",
                                   reason=R.ACCOUNT_OUT_OF_SCOPE, field=field)
