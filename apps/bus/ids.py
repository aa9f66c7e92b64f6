"""Who a chip transaction belongs to, and the ledger id it is booked under.

A card's e-purse application serial number is its issuer's region code followed by the registry's card
sequence number in 14 decimal digits (apps/production/chips.py writes it so at personalisation). From it the
back office knows the card's e-purse account on PURSE without asking anyone: the registry derives that id
from the same sequence number (``core.registry_store.purse_account_id``).

A chip transaction is booked under an id derived from what its TAC covers, the card (its keys are
diversified from the serial), the SAM's terminal id and the SAM's transaction number: the online tap books
it under that id before the chip is debited, an offline upload of the same record later finds the id taken
and books nothing, and changing any of those fields breaks the TAC. The id is a 124-bit mix (splitmix64
rounds) of the three fields, the same in the scalar form (one tap) and the numpy form (a batch); it is not a
cryptographic hash, nor does it need to be: whoever could make two ids collide would first need two genuine
TACs to put under them.
"""

from __future__ import annotations

import numpy as np
from citycard.core.registry_store import purse_account_id
from numpy.typing import NDArray

__all__ = ["APP_SERIAL_DIGITS", "SerialError", "app_serial_of_card", "card_seq_of_serial", "chip_transfer_id",
           "chip_transfer_ids", "purse_account_ids", "purse_account_of_serial"]

APP_SERIAL_DIGITS = 20
REGION_DIGITS = 6
CARD_ID_SEQ_HEX = 16  # the card identification code ends with the registry sequence in 16 hex digits
_MASK64 = (1 << 64) - 1
_HIGH_BITS = 60  # the id's high lane: 60 bits, so every id is below the platform's reserved 2^124
_K1, _K2, _K3, _K4 = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0x8CB92BA72F3D8DD7, 0xA0761D6478BD642F
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_PURSE_HIGH = purse_account_id(1) >> 64  # the e-purse id prefix, all in the high lane


class SerialError(ValueError):
    """An application serial that is not one of this issuer's (see the module docstring)."""


def app_serial_of_card(card_id_code: str) -> str:
    """The e-purse application serial of the card with this card identification code."""
    region, seq = card_id_code[:REGION_DIGITS], int(card_id_code[-CARD_ID_SEQ_HEX:], 16)
    return f"{region}{seq:014d}"


def card_seq_of_serial(app_serial: str) -> int:
    if len(app_serial) != APP_SERIAL_DIGITS or not app_serial.isdigit():
        raise SerialError(f"application serial {app_serial!r} is not {APP_SERIAL_DIGITS} decimal digits")
    seq = int(app_serial[REGION_DIGITS:])
    if seq == 0:
        raise SerialError(f"application serial {app_serial!r} names no card (sequence 0)")
    return seq


def purse_account_of_serial(app_serial: str) -> int:
    return purse_account_id(card_seq_of_serial(app_serial))


def purse_account_ids(card_seqs: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """The e-purse account ids of many cards, as (low 64 bits, high 64 bits)."""
    return card_seqs.astype(np.uint64), np.full(card_seqs.shape, _PURSE_HIGH, dtype=np.uint64)


def _mix(value: int) -> int:
    value = ((value ^ (value >> 30)) * _M1) & _MASK64
    value = ((value ^ (value >> 27)) * _M2) & _MASK64
    return value ^ (value >> 31)


def chip_transfer_id(card_seq: int, terminal_id: int, terminal_seq: int) -> int:
    """The ledger id of one chip transaction (``terminal_id`` as the 48-bit number of its 6 bytes)."""
    x = _mix((terminal_id + _K1) & _MASK64)
    y = _mix(x ^ ((card_seq + _K2) & _MASK64))
    low = _mix(y ^ ((terminal_seq + _K3) & _MASK64))
    high = _mix(low ^ _K4 ^ card_seq) >> (64 - _HIGH_BITS)
    return (high << 64) | low or 1


def _mix_array(value: NDArray[np.uint64]) -> NDArray[np.uint64]:
    value = (value ^ (value >> np.uint64(30))) * np.uint64(_M1)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(_M2)
    return value ^ (value >> np.uint64(31))


def chip_transfer_ids(card_seqs: NDArray[np.uint64], terminal_ids: NDArray[np.uint64],
                      terminal_seqs: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """``chip_transfer_id`` of many transactions at once, as (low 64 bits, high 64 bits)."""
    with np.errstate(over="ignore"):
        x = _mix_array(terminal_ids.astype(np.uint64) + np.uint64(_K1))
        y = _mix_array(x ^ (card_seqs.astype(np.uint64) + np.uint64(_K2)))
        low = _mix_array(y ^ (terminal_seqs.astype(np.uint64) + np.uint64(_K3)))
        high = _mix_array(low ^ np.uint64(_K4) ^ card_seqs.astype(np.uint64)) >> np.uint64(64 - _HIGH_BITS)
    low = np.where((low == 0) & (high == 0), np.uint64(1), low)
    return low, high
