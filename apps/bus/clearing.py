"""Offline records cleared in batches: verified, classified and turned into ledger transfers in one pass.

A gate that worked offline debited the chips itself; each purchase left a record the chip signed with its
TAC. Clearing a batch of them decides, per record and in this order:

1. the layout (records.py's checks): a record with a field out of range is MALFORMED;
2. the TAC: a record whose TAC does not verify is FORGED;
3. the card: an application serial of another region (or sequence 0) is CARD_UNKNOWN;
4. an amount of 0 is an entry record (the journey's start, written by a composite purchase): nothing to book;
5. the rest become PURSE transfers from the card's e-purse account (derived from the application serial,
   ids.py) to the operator's settlement account, each under the id of its chip transaction, so a record
   booked before (online at the gate, or in an earlier upload) is answered EXISTS by the ledger and counted
   ALREADY_CLEARED, never booked twice.

Steps 1 to 5 are one call each into the TAC verifier (tac.py: `classify`, then `transfers`), compiled C over
the whole batch when the extension is built; Python only names the problems of the records that have one (a
malformed record's field and reason come from records.validate, run on those records alone). The ledger's
answers are mapped back to outcomes after booking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from citycard.apps.bus.records import validate
from citycard.apps.bus.tac import Status
from citycard.core.records import TransferResult
from numpy.typing import NDArray

if TYPE_CHECKING:
    from citycard.apps.bus.tac import PyTacVerifier

__all__ = ["RECORD_BYTES", "ClearingPlan", "Outcome", "outcomes_after_booking", "plan_clearing"]

RECORD_BYTES = 48
_EXISTS_SAME_TRANSACTION = {int(TransferResult.EXISTS), int(TransferResult.EXISTS_WITH_DIFFERENT_FLAGS),
                            int(TransferResult.EXISTS_WITH_DIFFERENT_PENDING_ID),
                            int(TransferResult.EXISTS_WITH_DIFFERENT_TIMEOUT),
                            int(TransferResult.EXISTS_WITH_DIFFERENT_USER_DATA)}
_EXISTS_OTHER = {int(result) for result in TransferResult if result.name.startswith("EXISTS")} \
    - _EXISTS_SAME_TRANSACTION
FORGED_MESSAGE = "the TAC does not verify: the record is not what the card signed"


class Outcome:
    """Names of transit.proto's RecordOutcome, without the RECORD_ prefix."""

    BOOKED = "BOOKED"
    ALREADY_CLEARED = "ALREADY_CLEARED"
    FORGED = "FORGED"
    MALFORMED = "MALFORMED"
    REPLAYED = "REPLAYED"
    CARD_UNKNOWN = "CARD_UNKNOWN"
    REFUSED_BY_LEDGER = "REFUSED_BY_LEDGER"
    ENTRY_ONLY = "ENTRY_ONLY"


@dataclass
class ClearingPlan:
    """What a batch comes to before booking: the transfers to send and the records already decided."""

    count: int
    transfers: NDArray[np.void]               # TRANSFER_DTYPE, one per record to book
    booked_index: NDArray[np.int64]            # the record index of each transfer
    status: NDArray[np.uint8]                  # tac.Status per record
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (outcome, message)
    entry_only: int = 0


def plan_clearing(verifier: PyTacVerifier, records: np.ndarray, malformed: dict[int, str], *, region: int,
                  operator_account: int) -> ClearingPlan:
    """Classify a batch (records.RECORD_DTYPE) and build its transfers.

    ``malformed`` maps the index of each record already refused (a message that could not be packed) to its
    message; the pass decides the others. ``region`` is this issuer's region code: a serial from another
    region names no card of ours.
    """
    status = np.zeros(len(records), dtype=np.uint8)
    if malformed:
        status[list(malformed)] = Status.MALFORMED
    verifier.classify(records, status, region=region)
    transfers, booked_index = verifier.transfers(records, status, operator_account=operator_account)
    problems: dict[int, tuple[str, str]] = {index: (Outcome.MALFORMED, message) for index, message
                                            in _malformed_messages(records, status, malformed).items()}
    for index in np.flatnonzero(status == Status.FORGED).tolist():
        problems[index] = (Outcome.FORGED, FORGED_MESSAGE)
    for index in np.flatnonzero(status == Status.CARD_UNKNOWN).tolist():
        problems[index] = (Outcome.CARD_UNKNOWN, f"the application serial is not one of region {region}'s cards")
    entry_only = int(np.count_nonzero(status == Status.ENTRY_ONLY))
    return ClearingPlan(len(records), transfers, booked_index, status, problems, entry_only)


def _malformed_messages(records: np.ndarray, status: NDArray[np.uint8], known: dict[int, str]) -> dict[int, str]:
    """The first problem of each MALFORMED record: `known` ones as given, the others from records.validate
    (run on those records only: the pass found them, validate names the field and the reason)."""
    messages = dict(known)
    found = [index for index in np.flatnonzero(status == Status.MALFORMED).tolist() if index not in known]
    if not found:
        return messages
    for problem in validate(records[found]).problems:
        messages.setdefault(found[problem.index], f"{problem.field} {problem.reason}")
    unnamed = [index for index in found if index not in messages]
    if unnamed:  # an explicit check: the compiled checks and records.validate must agree on every record
        raise RuntimeError(f"records {unnamed[:5]} were found malformed, but records.validate names no field")
    return messages


def outcomes_after_booking(plan: ClearingPlan, errors: dict[int, int]) -> tuple[int, int, dict[int, tuple[str, str]]]:
    """Fold the ledger's answers (result code by transfer index) into the plan: (booked, booked_fen, problems)."""
    problems = dict(plan.problems)
    refused = np.zeros(len(plan.booked_index), dtype=bool)
    for transfer_index, result in errors.items():
        refused[transfer_index] = True
        index = int(plan.booked_index[transfer_index])
        if result in _EXISTS_SAME_TRANSACTION:
            problems[index] = (Outcome.ALREADY_CLEARED, ("this chip transaction was cleared already (a replay "
                               "of the card's counter, or booked online at the gate)"))
        elif result in _EXISTS_OTHER:
            problems[index] = (Outcome.REPLAYED, ("this chip transaction was cleared already with other content ("
                               f"{TransferResult(result).name})"))
        elif result == TransferResult.DEBIT_ACCOUNT_NOT_FOUND:
            problems[index] = (Outcome.CARD_UNKNOWN, "no card has this application serial")
        else:
            problems[index] = (Outcome.REFUSED_BY_LEDGER, f"the ledger refused it: {TransferResult(result).name}")
    booked = int((~refused).sum())
    booked_fen = int(plan.transfers["amount"][~refused].sum())
    return booked, booked_fen, problems
