"""Registering applications: the manifest checked, its accounts opened, its credential issued.

Runs on the writer thread (it reads the ledger and writes one atomic batch): the application's row in
table ``applications``, its accounts, and an audit entry, all in one ``Ledger.execute``. Ledgers the
manifest defines are registered first (an operator-only privilege), each in its own commit; registering
the same definition again changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import replace

from citycard.core import clock
from citycard.core.ledger import LedgerInputError
from citycard.core.records import HOME_LEDGER_OF_KIND, AccountFlags, LedgerId
from citycard.core.registry import Registry
from citycard.core.registry_store import Stage
from citycard.server.auth import (
    APP_ACCOUNTS_MAX,
    ENROLMENT,
    MEDICAL_APPLICATION,
    OPERATOR,
    AppRecord,
    Principal,
    app_account_id,
    digest,
    new_token,
)
from citycard.server.convert import ACCOUNT_KINDS, U16_MAX, timestamp
from citycard.server.errors import AlreadyExists, FieldError, NotFound, PermissionDenied, PreconditionFailed
from citycard.v1 import applications_pb2, common_pb2

__all__ = ["APPLICATIONS_TABLE", "application_message", "load_applications", "register", "rotate_credential"]

APPLICATIONS_TABLE = "applications"
APPLICATIONS_MAX = 10_000
_NAME = re.compile(r"[a-z][a-z0-9-]{1,31}")
_ACCOUNT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_COMMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_ ]{0,63}")
AID_BYTES_MIN, AID_BYTES_MAX = 5, 16  # ISO/IEC 7816-5
CODES_MAX = 64
R = common_pb2.ErrorReason
_CREDENTIAL_KINDS = frozenset(applications_pb2.CredentialKind.values())


def load_applications(registry: Registry) -> list[AppRecord]:
    return [AppRecord.from_json(value) for _, value in registry.ledger.scan(APPLICATIONS_TABLE, limit=APPLICATIONS_MAX)]


def _check_manifest(manifest: applications_pb2.Manifest, principal: Principal, known_ledgers: set[int],
                    tls: bool) -> None:
    if not _NAME.fullmatch(manifest.name):
        raise FieldError("manifest.name", "must be 2 to 32 lower-case letters, digits or '-', starting with a letter")
    aid = manifest.aid
    if not (re.fullmatch(r"[0-9A-Fa-f]+", aid) and len(aid) % 2 == 0
            and AID_BYTES_MIN <= len(aid) // 2 <= AID_BYTES_MAX):
        raise FieldError("manifest.aid", f"must be {AID_BYTES_MIN} to {AID_BYTES_MAX} bytes written as hex")
    if manifest.credential_kind not in _CREDENTIAL_KINDS:
        raise FieldError("manifest.credential_kind", f"{manifest.credential_kind} is not a CredentialKind")
    if manifest.credential_kind == applications_pb2.CREDENTIAL_KIND_MUTUAL_TLS:
        if not _COMMON_NAME.fullmatch(manifest.tls_client_common_name):
            raise FieldError("manifest.tls_client_common_name", "MUTUAL_TLS needs the client certificate's CN")
        if not tls:
            raise PreconditionFailed("this server is not configured for mutual TLS (serve --tls-client-ca)",
                                     field="manifest.credential_kind")
    elif manifest.tls_client_common_name:
        raise FieldError("manifest.tls_client_common_name", "is only for MUTUAL_TLS credentials")
    if manifest.ledger_definitions and principal.kind != OPERATOR:
        raise PermissionDenied("only the operator registers applications that define ledgers",
                               field="manifest.ledger_definitions")
    defined = {definition.number for definition in manifest.ledger_definitions}
    ledgers = list(manifest.ledgers)
    if not ledgers or len(set(ledgers)) != len(ledgers):
        raise FieldError("manifest.ledgers", "name each ledger the application books on, once")
    for index, ledger in enumerate(ledgers):
        if ledger not in known_ledgers and ledger not in defined:
            raise FieldError(f"manifest.ledgers[{index}]", f"ledger {ledger} does not exist")
        if ledger == LedgerId.MEDICAL and manifest.name != MEDICAL_APPLICATION:
            raise PermissionDenied("the MEDICAL ledger is open to the medical application only",
                                   reason=R.MEDICAL_LEDGER_RESERVED, field=f"manifest.ledgers[{index}]")
    codes = list(manifest.transfer_codes)
    if not codes or len(codes) > CODES_MAX or len(set(codes)) != len(codes):
        raise FieldError("manifest.transfer_codes", f"name 1 to {CODES_MAX} transfer codes, each once")
    for index, code in enumerate(codes):
        if not 1 <= code <= U16_MAX:
            raise FieldError(f"manifest.transfer_codes[{index}]", f"{code} is not a transfer code (1 to {U16_MAX})")
    _check_accounts(manifest, set(ledgers))


def _check_accounts(manifest: applications_pb2.Manifest, ledgers: set[int]) -> None:
    specs = list(manifest.accounts)
    if not 1 <= len(specs) <= APP_ACCOUNTS_MAX:
        raise FieldError("manifest.accounts", f"an application owns 1 to {APP_ACCOUNTS_MAX} accounts")
    names = set()
    for index, spec in enumerate(specs):
        where = f"manifest.accounts[{index}]"
        if not _ACCOUNT_NAME.fullmatch(spec.name) or spec.name in names:
            raise FieldError(f"{where}.name", "must be a unique name of lower-case letters, digits or '_'")
        names.add(spec.name)
        if spec.ledger not in ledgers:
            raise FieldError(f"{where}.ledger", f"ledger {spec.ledger} is not one of the manifest's ledgers")
        if spec.kind not in ACCOUNT_KINDS:
            raise FieldError(f"{where}.kind", f"{spec.kind} is not an AccountKind")
        if spec.kind in HOME_LEDGER_OF_KIND:
            raise FieldError(f"{where}.kind", "persons' and cards' accounts are the registry's, not an application's")


def register(registry: Registry, manifest: applications_pb2.Manifest, principal: Principal, *, tls: bool,
             token: str | None = None) -> tuple[AppRecord, str | None]:
    """Register an application; its record and its bearer token (None for a MUTUAL_TLS application)."""
    if principal.kind not in (OPERATOR, ENROLMENT):
        raise PermissionDenied("only the operator or the enrolment credential registers applications")
    ledger = registry.ledger
    _check_manifest(manifest, principal, set(ledger.ledgers()), tls)
    if ledger.get(APPLICATIONS_TABLE, manifest.name.encode("ascii")) is not None:
        raise AlreadyExists(f"application {manifest.name} is registered already", field="manifest.name")
    if any(app.aid == manifest.aid.upper() for app in load_applications(registry)):
        raise AlreadyExists(f"another application has AID {manifest.aid.upper()} on the card", field="manifest.aid")
    for index, definition in enumerate(manifest.ledger_definitions):
        movements = [(m.code, m.debit_kind, m.credit_kind) for m in definition.movements]
        try:
            ledger.register_ledger(definition.number, definition.name, movements)
        except LedgerInputError as exc:
            raise FieldError(f"manifest.ledger_definitions[{index}]", str(exc)) from None
    at = clock.now()
    stage = Stage(ledger)
    seq = stage.next_seq("application")
    accounts = []
    for index, spec in enumerate(manifest.accounts):
        account_id = app_account_id(seq, index)
        flags = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS if spec.debits_must_not_exceed_credits else 0
        stage.accounts.append({"id": account_id, "ledger": spec.ledger, "code": spec.kind, "flags": flags,
                               "owner": seq})
        accounts.append((spec.name, account_id))
    bearer = manifest.credential_kind != applications_pb2.CREDENTIAL_KIND_MUTUAL_TLS
    token = (token or new_token()) if bearer else None
    record = AppRecord(
        name=manifest.name, seq=seq, aid=manifest.aid.upper(), ledgers=frozenset(manifest.ledgers),
        codes=frozenset(manifest.transfer_codes), accounts=tuple(accounts), credential_kind=manifest.credential_kind
        or applications_pb2.CREDENTIAL_KIND_BEARER_TOKEN, tls_client_common_name=manifest.tls_client_common_name,
        token_sha256=digest(token) if token else None, manifest=manifest.SerializeToString(deterministic=True),
        registered_at_ns=clock.now_ns())
    stage.put(APPLICATIONS_TABLE, manifest.name.encode("ascii"), record.to_json())
    stage.audit(actor=principal.name, channel="online", action="application.register",
                subject=f"application {manifest.name}", at=at,
                details={"aid": record.aid, "ledgers": sorted(record.ledgers), "codes": sorted(record.codes),
                         "accounts": {name: f"{account:032x}" for name, account in accounts},
                         "credential_kind": applications_pb2.CredentialKind.Name(record.credential_kind)})
    stage.commit(f"registering application {manifest.name}")
    return record, token


def rotate_credential(registry: Registry, name: str, principal: Principal, *, token: str | None = None
                      ) -> tuple[AppRecord, str]:
    """A new bearer token for an application; the old one stops working when the writer publishes."""
    stored = registry.ledger.get(APPLICATIONS_TABLE, name.encode("ascii", "replace"))
    if stored is None:
        raise NotFound(f"no application {name!r}", field="name")
    record = AppRecord.from_json(stored)
    if record.credential_kind == applications_pb2.CREDENTIAL_KIND_MUTUAL_TLS:
        raise PreconditionFailed(f"application {name} authenticates with its client certificate", field="name")
    token = token or new_token()
    rotated = replace(record, token_sha256=digest(token))
    stage = Stage(registry.ledger)
    stage.put(APPLICATIONS_TABLE, name.encode("ascii"), rotated.to_json())
    stage.audit(actor=principal.name, channel="online", action="application.rotate_credential",
                subject=f"application {name}", at=clock.now())
    stage.commit(f"rotating the credential of application {name}")
    return rotated, token


def add_new_accounts(registry: Registry, name: str, manifest: applications_pb2.Manifest,
                     principal: Principal) -> tuple[AppRecord, list[str]]:
    """Open the accounts a built-in application's newer manifest names and its registration lacks (a release that
    added an operator, say); the record and the names opened. Only accounts are added: a manifest that asks for
    other ledgers or codes than it was registered with changes nothing here (it needs a new registration)."""
    stored = registry.ledger.get(APPLICATIONS_TABLE, name.encode("ascii", "replace"))
    if stored is None:
        raise NotFound(f"no application {name!r}", field="name")
    record = AppRecord.from_json(stored)
    have = {account_name for account_name, _ in record.accounts}
    new = [spec for spec in manifest.accounts if spec.name not in have]
    if not new:
        return record, []
    registered = applications_pb2.Manifest.FromString(record.manifest)
    upgraded = applications_pb2.Manifest()
    upgraded.CopyFrom(registered)
    upgraded.accounts.extend(new)
    _check_accounts(upgraded, set(record.ledgers))
    stage = Stage(registry.ledger)
    accounts = list(record.accounts)
    for spec in new:
        account_id = app_account_id(record.seq, len(accounts))
        flags = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS if spec.debits_must_not_exceed_credits else 0
        stage.accounts.append({"id": account_id, "ledger": spec.ledger, "code": spec.kind, "flags": flags,
                               "owner": record.seq})
        accounts.append((spec.name, account_id))
    upgraded_record = replace(record, accounts=tuple(accounts), manifest=upgraded.SerializeToString(deterministic=True))
    stage.put(APPLICATIONS_TABLE, name.encode("ascii"), upgraded_record.to_json())
    stage.audit(actor=principal.name, channel="online", action="application.add_accounts",
                subject=f"application {name}", at=clock.now(),
                details={"accounts": {spec_name: f"{account:032x}" for spec_name, account in accounts[len(have):]}})
    stage.commit(f"opening the new accounts of application {name}")
    return upgraded_record, [spec.name for spec in new]


def application_message(record: AppRecord) -> applications_pb2.Application:
    return applications_pb2.Application(
        manifest=applications_pb2.Manifest.FromString(record.manifest),
        accounts=[applications_pb2.OwnedAccount(name=name, id=f"{account:x}") for name, account in record.accounts],
        registered_at=timestamp(record.registered_at_ns))
