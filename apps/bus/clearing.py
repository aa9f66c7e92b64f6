"""Offline records cleared in batches: verified, classified and turned into ledger transfers, all vectorised.

A gate that worked offline debited the chips itself; each purchase left a record the chip signed with its
TAC. Clearing a batch of them is, in order:

1. the layout (records.py): a record with a field out of range is MALFORMED;
2. the TAC, for the whole batch in one compiled call (tac.py): a record whose TAC does not verify is FORGED;
3. an amount of 0 is an entry record (the journey's start, written by a composite purchase): nothing to book;
4. the rest become PURSE transfers from the card's e-purse account (derived from the application serial,
   ids.py) to the operator's settlement account, each under the id of its chip transaction, so a record
   booked before (online at the gate, or in an earlier upload) is answered EXISTS by the ledger and counted
   ALREADY_CLEARED, never booked twice.

No Python runs per record on the way (numpy and the compiled TAC check); the ledger's answers are mapped back
to outcomes after booking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from citycard.apps.bus.ids import chip_transfer_ids, purse_account_ids
from citycard.core.records import TRANSFER_DTYPE, LedgerId, TransferCode, TransferResult
from numpy.typing import NDArray

__all__ = ["RECORD_BYTES", "ClearingPlan", "Outcome", "outcomes_after_booking", "plan_clearing"]

RECORD_BYTES = 48
_AMOUNT = slice(12, 16)
_TERMINAL = slice(17, 23)
_TERMINAL_SEQ = slice(23, 27)
_COUNTER = slice(10, 12)
_SERIAL_REGION = slice(0, 3)
_SERIAL_SEQ = slice(3, 10)
_EXISTS_SAME_TRANSACTION = {int(TransferResult.EXISTS), int(TransferResult.EXISTS_WITH_DIFFERENT_FLAGS),
                            int(TransferResult.EXISTS_WITH_DIFFERENT_PENDING_ID),
                            int(TransferResult.EXISTS_WITH_DIFFERENT_TIMEOUT),
                            int(TransferResult.EXISTS_WITH_DIFFERENT_USER_DATA)}
_EXISTS_OTHER = {int(result) for result in TransferResult if result.name.startswith("EXISTS")} \
    - _EXISTS_SAME_TRANSACTION


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
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (outcome, message)
    entry_only: int = 0


def _big_endian(raw: NDArray[np.uint8], columns: slice) -> NDArray[np.uint64]:
    value = np.zeros(raw.shape[0], dtype=np.uint64)
    for column in range(columns.start, columns.stop):
        value = (value << np.uint64(8)) | raw[:, column].astype(np.uint64)
    return value


def _bcd(raw: NDArray[np.uint8], columns: slice) -> NDArray[np.uint64]:
    value = np.zeros(raw.shape[0], dtype=np.uint64)
    for column in range(columns.start, columns.stop):
        byte = raw[:, column].astype(np.uint64)
        value = value * np.uint64(100) + (byte >> np.uint64(4)) * np.uint64(10) + (byte & np.uint64(15))
    return value


def plan_clearing(raw: NDArray[np.uint8], malformed: dict[int, str], tac_ok: NDArray[np.bool_], *,
                  region: int, operator_account: int) -> ClearingPlan:
    """Classify a batch (``raw``: n x 48 bytes) and build its transfers.

    ``malformed`` maps the index of each record with a bad field to its message (records.py found them);
    ``tac_ok`` says, per record, whether its TAC verified (tac.py). ``region`` is this issuer's region code:
    a serial from another region names no card of ours.
    """
    count = raw.shape[0]
    problems: dict[int, tuple[str, str]] = {index: (Outcome.MALFORMED, message) for index, message in malformed.items()}
    usable = np.ones(count, dtype=bool)
    if malformed:
        usable[list(malformed)] = False
    for index in np.flatnonzero(usable & ~tac_ok):
        problems[int(index)] = (Outcome.FORGED, "the TAC does not verify: the record is not what the card signed")
    usable &= tac_ok
    seqs = _bcd(raw, _SERIAL_SEQ)
    foreign = usable & ((_bcd(raw, _SERIAL_REGION) != np.uint64(region)) | (seqs == 0))
    for index in np.flatnonzero(foreign):
        problems[int(index)] = (Outcome.CARD_UNKNOWN, f"the application serial is not one of region {region}'s cards")
    usable &= ~foreign
    amounts = _big_endian(raw, _AMOUNT)
    entries = usable & (amounts == 0)
    usable &= ~entries
    booked_index = np.flatnonzero(usable)
    picked = raw[booked_index]
    transfers = np.zeros(len(booked_index), dtype=TRANSFER_DTYPE)
    low, high = chip_transfer_ids(seqs[booked_index], _big_endian(picked, _TERMINAL),
                                  _big_endian(picked, _TERMINAL_SEQ))
    transfers["id"][:, 0], transfers["id"][:, 1] = low, high
    debit_low, debit_high = purse_account_ids(seqs[booked_index])
    transfers["debit_account_id"][:, 0], transfers["debit_account_id"][:, 1] = debit_low, debit_high
    transfers["credit_account_id"][:, 0] = operator_account & 0xFFFF_FFFF_FFFF_FFFF
    transfers["credit_account_id"][:, 1] = operator_account >> 64
    # user_data: the card's counter and the SAM's transaction number, for whoever audits the transfer.
    transfers["user_data"][:, 0] = (_big_endian(picked, _COUNTER) << np.uint64(32)) | _big_endian(picked, _TERMINAL_SEQ)
    transfers["amount"] = amounts[booked_index]
    transfers["ledger"] = LedgerId.PURSE
    transfers["code"] = TransferCode.PURCHASE
    return ClearingPlan(count, transfers, booked_index, problems, int(entries.sum()))


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
