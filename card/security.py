"""PIN and key commands on the chip: VERIFY, CHANGE PIN, RELOAD PIN, GET CHALLENGE, EXTERNAL and
INTERNAL AUTHENTICATE.

Retry counters are decremented and persisted *before* the comparison and restored only after a
match: a terminal that cuts the power the moment it sees the card working on a wrong guess cannot
save the try (the classic anti-tearing rule for PINs). A blocked PIN answers 69 83 without looking
at the guess; RELOAD PIN (a MAC under the DF's PIN reload key, issued by the back office) sets a
new PIN and unblocks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .apdu import Command, respond
from .crypto import BLOCK_BYTES, MAC_BYTES, macs_equal, pboc_mac, tac_key, tdes_encrypt
from .keys import CardKey, KeyUsage
from .state import PIN_BYTES_MAX, PIN_BYTES_MIN, PinState, is_valid_pin
from .sw import SW, Refusal

if TYPE_CHECKING:
    from .cos import VirtualCard

__all__ = ["CHALLENGE_LENGTHS", "HANDLERS", "PROPRIETARY_HANDLERS", "Challenge"]

GLOBAL_PIN_REFERENCE = 0x00
PIN_SEPARATOR = 0xFF  # CHANGE PIN data: old PIN || FF || new PIN
CHALLENGE_LENGTHS = (4, 8)


@dataclass(frozen=True, slots=True)
class Challenge:
    """The card's random from GET CHALLENGE, valid for the next command only; padded to 8 bytes."""

    value: bytes


def _attempt(card: VirtualCard, counted: PinState | CardKey, matches: bool,
             then: Callable[[], None] | None = None) -> None:
    """Spend a try, persist, then judge; a match gives every try back (and runs `then`, which may
    change only `counted`, in the same write)."""
    counted.tries_left -= 1
    card.commit(counted)
    if not matches:
        raise Refusal(SW.tries_left(counted.tries_left))
    counted.tries_left = counted.tries_max
    if then is not None:
        then()
    card.commit(counted)


# -- VERIFY -------------------------------------------------------------------------------------


def verify(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1 != 0x00 or command.p2 != GLOBAL_PIN_REFERENCE:
        raise Refusal(SW.WRONG_P1P2)
    pin = card.image.pin
    if not command.data:  # ISO: no data asks for the status of the reference
        if pin.tries_left == 0:
            raise Refusal(SW.BLOCKED)
        if card.pin_verified:
            return respond(command)
        raise Refusal(SW.tries_left(pin.tries_left))
    if not PIN_BYTES_MIN <= len(command.data) <= PIN_BYTES_MAX:
        raise Refusal(SW.WRONG_LENGTH)
    if pin.tries_left == 0:
        raise Refusal(SW.BLOCKED)
    reply = respond(command)
    card.pin_verified = False  # a failed VERIFY drops an earlier success
    _attempt(card, pin, macs_equal(command.data, pin.value))
    card.pin_verified = True
    return reply


# -- CHANGE PIN / RELOAD PIN (CLA 80, INS 5E) --------------------------------------------------------


def change_or_reload_pin(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p2 != 0x00:
        raise Refusal(SW.WRONG_P1P2)
    if command.p1 == 0x01:
        return _change_pin(card, command)
    if command.p1 == 0x00:
        return _reload_pin(card, command)
    raise Refusal(SW.WRONG_P1P2)


def _change_pin(card: VirtualCard, command: Command) -> bytes:
    data = command.data
    if PIN_SEPARATOR not in data:
        raise Refusal(SW.WRONG_DATA if data else SW.WRONG_LENGTH)
    split = data.index(PIN_SEPARATOR)
    old, new = data[:split], data[split + 1 :]
    if not PIN_BYTES_MIN <= len(old) <= PIN_BYTES_MAX or not PIN_BYTES_MIN <= len(new) <= PIN_BYTES_MAX:
        raise Refusal(SW.WRONG_LENGTH)
    if not is_valid_pin(new):
        raise Refusal(SW.WRONG_DATA)
    pin = card.image.pin
    if pin.tries_left == 0:
        raise Refusal(SW.BLOCKED)
    reply = respond(command)
    card.pin_verified = False

    def set_new_pin() -> None:
        pin.value = bytes(new)

    _attempt(card, pin, macs_equal(old, pin.value), then=set_new_pin)
    card.pin_verified = True
    return reply


def _reload_pin(card: VirtualCard, command: Command) -> bytes:
    data = command.data
    if not PIN_BYTES_MIN + MAC_BYTES <= len(data) <= PIN_BYTES_MAX + MAC_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    new, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not is_valid_pin(new):
        raise Refusal(SW.WRONG_DATA)
    reload_keys = card.current_df.keys_of(KeyUsage.PIN_RELOAD)
    if not reload_keys:
        raise Refusal(SW.KEY_NOT_FOUND)
    # The reload key, like the TAC key, is used as single DES under the XOR of its halves (§2.4).
    if not macs_equal(pboc_mac(tac_key(reload_keys[0].value.reveal()), new), mac):
        raise Refusal(SW.MAC_INVALID)
    reply = respond(command)
    pin = card.image.pin
    pin.value = bytes(new)
    pin.tries_left = pin.tries_max
    card.pin_verified = False
    card.commit(pin)
    return reply


# -- GET CHALLENGE, EXTERNAL / INTERNAL AUTHENTICATE -------------------------------------------------


def get_challenge(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1p2 != 0x0000:
        raise Refusal(SW.WRONG_P1P2)
    if command.data or command.ne not in CHALLENGE_LENGTHS:
        raise Refusal(SW.WRONG_LENGTH)
    value = card.random(command.ne)
    card.pending = Challenge(value + bytes(BLOCK_BYTES - len(value)))
    return respond(command, value)


def external_authenticate(card: VirtualCard, command: Command, pending: object) -> bytes:
    """The terminal proves it holds the DF's maintenance key: data = 3DES(key, challenge)."""
    if command.p1 != 0x00:
        raise Refusal(SW.WRONG_P1P2)
    if len(command.data) != BLOCK_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    key = card.current_df.key(KeyUsage.MAINTENANCE, command.p2)
    if key is None:
        raise Refusal(SW.KEY_NOT_FOUND)
    if key.tries_max and key.tries_left == 0:
        raise Refusal(SW.BLOCKED)
    if not isinstance(pending, Challenge):
        raise Refusal(SW.DATA_UNUSABLE)
    reply = respond(command)
    matches = macs_equal(tdes_encrypt(key.value.reveal(), pending.value), command.data)
    card.authenticated = False
    if key.tries_max:
        _attempt(card, key, matches)
    elif not matches:
        raise Refusal(SW.SECURITY_STATUS)
    card.authenticated = True
    return reply


def internal_authenticate(card: VirtualCard, command: Command, pending: object) -> bytes:
    """The card proves it is genuine: 3DES(internal authentication key, terminal challenge)."""
    if command.p1 != 0x00:
        raise Refusal(SW.WRONG_P1P2)
    if len(command.data) != BLOCK_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    key = card.current_df.key(KeyUsage.INTERNAL_AUTH, command.p2)
    if key is None:
        raise Refusal(SW.KEY_NOT_FOUND)
    return respond(command, tdes_encrypt(key.value.reveal(), command.data))


# INS -> handler, CLA 00.
HANDLERS = {
    0x20: verify,
    0x84: get_challenge,
    0x82: external_authenticate,
    0x88: internal_authenticate,
}

# INS -> handler, CLA 80, in any DF.
PROPRIETARY_HANDLERS = {
    0x5E: change_or_reload_pin,
}
