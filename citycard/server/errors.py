"""The one place where a refusal becomes a gRPC status: canonical code, message, and a machine-readable reason.

Servicers and the writer raise domain errors (RegistryError, LedgerInputError, the ApiError family below)
and never pick status codes themselves; ``to_status`` maps each to a ``grpc.Status`` whose trailer
``grpc-status-details-bin`` holds a google.rpc.Status with a google.rpc.ErrorInfo (domain ``citycard.v1``,
reason: a name of ``citycard.v1.ErrorReason``) and, for a bad field, a google.rpc.BadRequest naming it.

Messages are built from masked subjects only: no secret, no whole ID number ever reaches a status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from citycard.core.clock import ClockError
from citycard.core.identity import IdentityError
from citycard.core.ledger import LedgerError, LedgerInputError
from citycard.core.registry_records import ErrorCode, RegistryError
from citycard.v1 import common_pb2

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "ApiError",
    "DeadlinePassed",
    "FieldError",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PreconditionFailed",
    "ShuttingDown",
    "Unauthenticated",
    "to_status",
]

DOMAIN = "citycard.v1"
MESSAGE_LENGTH_MAX = 500
log = logging.getLogger("citycard.server")
R = common_pb2.ErrorReason


class ApiError(Exception):
    """A refusal decided by the gRPC layer itself; subclasses fix the status code."""

    code = grpc.StatusCode.INTERNAL
    default_reason = R.INTERNAL_ERROR

    def __init__(self, message: str, *, reason: int | None = None, field: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = self.default_reason if reason is None else reason
        self.field = field
        self.metadata = dict(metadata or {})


class FieldError(ApiError):
    """A request field is malformed, missing or out of range (or an enum value is unknown)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = R.FIELD_INVALID

    def __init__(self, field: str, problem: str, *, reason: int | None = None) -> None:
        super().__init__(f"{field}: {problem}", reason=reason, field=field)


class Unauthenticated(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = R.CREDENTIAL_INVALID


class PermissionDenied(ApiError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = R.METHOD_NOT_ALLOWED


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = R.NOT_FOUND


class AlreadyExists(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = R.ALREADY_EXISTS


class PreconditionFailed(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = R.PRECONDITION_FAILED


class Overloaded(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = R.WRITER_QUEUE_FULL


class DeadlinePassed(ApiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = R.DEADLINE_PASSED_BEFORE_WRITE


class ShuttingDown(ApiError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = R.SHUTTING_DOWN


class OutOfRange(ApiError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = R.AMOUNT_OUT_OF_RANGE


# RegistryError carries its own kind; this table is where each kind gets its status code and reason.
_REGISTRY_CODES: Mapping[ErrorCode, tuple[grpc.StatusCode, int]] = {
    ErrorCode.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, R.FIELD_INVALID),
    ErrorCode.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, R.NOT_FOUND),
    ErrorCode.ALREADY_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, R.ALREADY_EXISTS),
    ErrorCode.FAILED_PRECONDITION: (grpc.StatusCode.FAILED_PRECONDITION, R.PRECONDITION_FAILED),
    ErrorCode.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, R.SELF_SERVICE_AUTHENTICATION_FAILED),
    ErrorCode.ABORTED: (grpc.StatusCode.ABORTED, R.LEDGER_REFUSED),
}


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, int, str, str | None, dict[str, str]]:
    """(status code, reason, message, field, metadata) of an exception."""
    if isinstance(exc, ApiError):
        return exc.code, exc.reason, str(exc), exc.field, exc.metadata
    if isinstance(exc, RegistryError):
        code, reason = _REGISTRY_CODES.get(exc.code, (grpc.StatusCode.INTERNAL, R.INTERNAL_ERROR))
        if exc.code is ErrorCode.FAILED_PRECONDITION and exc.field == "state":
            reason = R.TRANSITION_FORBIDDEN  # the lifecycle refused the transition
        metadata = {"subject": exc.subject} if exc.subject else {}
        return code, reason, str(exc), exc.field, metadata
    if isinstance(exc, (IdentityError, ClockError)):
        field = getattr(exc, "field", None)
        return grpc.StatusCode.INVALID_ARGUMENT, R.FIELD_INVALID, str(exc), field, {}
    if isinstance(exc, LedgerInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, R.FIELD_INVALID, str(exc), None, {}
    if isinstance(exc, LedgerError):
        log.error("ledger failure: %s", exc, exc_info=exc)
        return grpc.StatusCode.INTERNAL, R.INTERNAL_ERROR, "the ledger failed; the server logged it", None, {}
    log.error("unexpected error: %r", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, R.INTERNAL_ERROR, "internal error; the server logged it", None, {}


def reason_name(reason: int) -> str:
    return R.Name(reason)


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status (code, message, rich details in the trailer) for a refusal."""
    code, reason, message, field, metadata = _classify(exc)
    message = " ".join(message.split())[:MESSAGE_LENGTH_MAX]
    info = error_details_pb2.ErrorInfo(reason=reason_name(reason), domain=DOMAIN,
                                       metadata={**({"field": field} if field else {}), **metadata})
    details = [_packed(info)]
    if field and code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, reason name): for logs and tests."""
    code, reason, *_ = _classify(exc)
    return code, reason_name(reason)
