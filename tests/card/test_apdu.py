"""Command APDU parsing (card side) and encoding (terminal side): the seven ISO cases, and everything else refused."""

from __future__ import annotations

import pytest
from citycard.card.apdu import CARD_NC_MAX, Command, encode_command, parse_command
from citycard.card.sw import SW, Refusal
from hypothesis import given
from hypothesis import strategies as st


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


@pytest.mark.parametrize(
    ("raw", "data", "ne", "extended"),
    [
        ("00 A4 00 00", b"", None, False),  # case 1
        ("00 84 00 00 08", b"", 8, False),  # case 2S
        ("00 B0 95 00 00", b"", 256, False),  # case 2S, Le 00 = 256
        ("00 A4 02 00 02 EF 05", h("EF05"), None, False),  # case 3S
        ("00 A4 04 00 02 A0 00 00", h("A000"), 256, False),  # case 4S
        ("00 B0 00 00 00 01 00", b"", 256, True),  # case 2E
        ("00 B0 00 00 00 00 00", b"", 65536, True),  # case 2E, 00 00 = 65536
        ("00 D6 00 00 00 00 02 AB CD", h("ABCD"), None, True),  # case 3E
        ("00 88 00 01 00 00 02 AB CD 00 08", h("ABCD"), 8, True),  # case 4E
    ],
)
def test_the_seven_cases(raw: str, data: bytes, ne: int | None, extended: bool) -> None:
    command = parse_command(h(raw))
    assert (command.data, command.ne, command.extended) == (data, ne, extended)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "00",
        "00 A4 00",  # truncated header
        "00 A4 04 00 05 A0 00",  # Lc says 5, 2 bytes follow
        "00 A4 04 00 02 A0 00 00 00",  # one byte too many for case 4S
        "00 A4 04 00 00 00",  # 6 bytes starting with 00: neither short nor extended
        "00 A4 04 00 00 00 00 00",  # extended Lc of zero
        "00 A4 04 00 00 00 03 A0 00",  # extended Lc 3, 2 bytes
        "00 A4 04 00 00 00 02 A0 00 00",  # extended with a 1-byte Le
    ],
)
def test_malformed_lengths_are_wrong_length(raw: str) -> None:
    with pytest.raises(Refusal) as refused:
        parse_command(h(raw))
    assert refused.value.sw == SW.WRONG_LENGTH


def test_data_beyond_the_card_buffer_is_refused() -> None:
    raw = encode_command(0x00, 0xD6, 0x00, 0x00, bytes(CARD_NC_MAX + 1))
    with pytest.raises(Refusal) as refused:
        parse_command(raw)
    assert refused.value.sw == SW.WRONG_LENGTH


@given(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.binary(max_size=CARD_NC_MAX), st.one_of(st.none(), st.integers(1, 65536)), st.booleans(),
)
def test_encode_then_parse_round_trips(cla: int, ins: int, p1: int, p2: int, data: bytes, ne: int | None,
                                       extended: bool) -> None:
    command = parse_command(encode_command(cla, ins, p1, p2, data, ne, extended=extended))
    assert (command.cla, command.ins, command.p1, command.p2, command.data, command.ne) == (cla, ins, p1, p2, data, ne)


def test_ne_is_max_only_for_the_max_encodings() -> None:
    assert Command(0, 0xB0, 0, 0, ne=256).ne_is_max
    assert not Command(0, 0xB0, 0, 0, ne=256, extended=True).ne_is_max
    assert Command(0, 0xB0, 0, 0, ne=65536, extended=True).ne_is_max
