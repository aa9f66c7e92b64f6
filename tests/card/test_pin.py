"""PIN: VERIFY with its retry counter (63 Cx, then 69 83), CHANGE PIN, RELOAD PIN (unblock), and the
anti-tearing rule that a try is spent on disk before the comparison."""

from __future__ import annotations

import json

import pytest
from citycard.card import MasterKeys, Terminal, VirtualCard
from citycard.card.purse import PURSE_AID
from citycard.card.state import CardImage, pin_from_digits
from citycard.card.sw import AuthenticationBlocked, MacInvalid, VerificationFailed

from .helpers import PIN, send

WRONG = "654321"


def verify(card: VirtualCard, pin: str) -> str:
    return send(card, "00200000" + f"{len(pin_from_digits(pin)):02X}" + pin_from_digits(pin).hex())


def test_verify_counts_down_then_blocks(card: VirtualCard) -> None:
    assert card.image.pin.tries_max == 3
    assert verify(card, WRONG) == "63C2"
    assert verify(card, WRONG) == "63C1"
    assert verify(card, WRONG) == "63C0"
    assert verify(card, WRONG) == "6983"
    assert verify(card, PIN) == "6983", "a blocked PIN refuses even the right PIN"
    assert card.image.pin.tries_left == 0


def test_right_pin_restores_the_tries(card: VirtualCard) -> None:
    assert verify(card, WRONG) == "63C2"
    assert verify(card, PIN) == "9000"
    assert card.image.pin.tries_left == 3
    assert send(card, "0020000000") == "9000"  # status query: verified


def test_status_query_without_data(card: VirtualCard) -> None:
    assert send(card, "0020000000") == "63C3"
    verify(card, WRONG)
    assert send(card, "0020000000") == "63C2"


def test_failed_verify_drops_an_earlier_success(card: VirtualCard) -> None:
    assert verify(card, PIN) == "9000"
    assert verify(card, WRONG) == "63C2"
    send(card, "00A4040009" + PURSE_AID.hex())
    assert send(card, "00B0960000") == "6982"


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("002000000112", "6700"),  # a 1-byte PIN
        ("00200000071234561234561F", "6700"),  # a 7-byte PIN
        ("002000000312", "6700"),  # Lc 3, 1 byte follows
        ("0020000103123456", "6A86"),  # PIN reference 01 does not exist
        ("0020010003123456", "6A86"),
    ],
)
def test_malformed_verify_spends_no_try(card: VirtualCard, apdu: str, sw: str) -> None:
    assert send(card, apdu) == sw
    assert card.image.pin.tries_left == 3


def test_the_try_is_persisted_before_the_comparison(card: VirtualCard) -> None:
    """Order of writes for a wrong and a right PIN: decrement first, restore only after a match."""
    seen: list[int] = []
    original_save = card.store.save

    def spy(record: bytes, image: CardImage) -> None:
        changes = json.loads(record[9:])
        assert list(changes) == ["replace"] and list(changes["replace"]) == ["/pin"], \
            "a VERIFY writes the PIN and nothing else"
        seen.append(changes["replace"]["/pin"]["tries_left"])
        original_save(record, image)

    card.store.save = spy  # type: ignore[method-assign]
    verify(card, WRONG)
    assert seen == [2]
    seen.clear()
    verify(card, PIN)
    assert seen == [1, 3]


def test_change_pin(terminal: Terminal, card: VirtualCard) -> None:
    terminal.change_pin(PIN, "2468")
    assert verify(card, PIN) == "63C2"
    assert verify(card, "2468") == "9000"


def test_change_pin_with_wrong_old_pin_counts(terminal: Terminal, card: VirtualCard) -> None:
    with pytest.raises(VerificationFailed) as failed:
        terminal.change_pin(WRONG, "2468")
    assert failed.value.tries_left == 2
    assert verify(card, PIN) == "9000"


@pytest.mark.parametrize(
    ("data", "sw"),
    [
        ("123456" + "2468", "6A80"),  # no FF separator
        ("123456FF" + "24", "6700"),  # new PIN of 1 byte
        ("123456FF" + "24AB", "6A80"),  # new PIN not decimal
        ("", "6700"),
    ],
)
def test_change_pin_bad_data(card: VirtualCard, data: str, sw: str) -> None:
    apdu = "805E0100" + (f"{len(data) // 2:02X}" + data if data else "")
    assert send(card, apdu) == sw
    assert card.image.pin.tries_left == 3


def test_lockout_then_reload_unblocks(terminal: Terminal, card: VirtualCard) -> None:
    for _ in range(3):
        with pytest.raises(VerificationFailed):
            terminal.verify_pin(WRONG)
    with pytest.raises(AuthenticationBlocked):
        terminal.verify_pin(PIN)
    terminal.reload_pin("135790")
    assert card.image.pin.tries_left == 3
    with pytest.raises(VerificationFailed):
        terminal.verify_pin(PIN)
    terminal.verify_pin("135790")


def test_reload_with_a_forged_mac_is_refused(card: VirtualCard) -> None:
    for _ in range(3):
        verify(card, WRONG)
    send(card, "00A4040009" + PURSE_AID.hex())
    before = card.snapshot()
    assert send(card, "805E000007" + "135790" + "DEADBEEF") == "9302"
    assert card.snapshot() == before
    assert verify(card, "135790") == "6983"


def test_reload_mac_uses_the_cards_own_key(card: VirtualCard, master_keys: MasterKeys) -> None:
    from citycard.card.sam import IssuerHost

    send(card, "00A4040009" + PURSE_AID.hex())
    other_serial = bytes.fromhex("33030000000000000002")  # another card's serial: another diversified key
    mac = IssuerHost(master_keys).pin_reload_mac("purse", other_serial, bytes.fromhex("135790"))
    assert send(card, "805E000007135790" + mac.hex()) == "9302"


def test_reload_needs_the_issuer(terminal: Terminal) -> None:
    from citycard.card.sam import SamError

    terminal.host = None
    with pytest.raises(SamError):
        terminal.reload_pin("135790")


def test_terminal_sees_a_forged_reload_as_mac_invalid(terminal: Terminal, master_keys: MasterKeys) -> None:
    from citycard.card.sam import IssuerHost

    class ForgingHost(IssuerHost):
        def pin_reload_mac(self, application: str, serial: bytes, new_pin: bytes) -> bytes:
            return bytes(4)

    terminal.host = ForgingHost(master_keys)
    with pytest.raises(MacInvalid):
        terminal.reload_pin("135790")
