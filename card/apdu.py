"""Command APDUs: parse (card side) and encode (terminal side), short and extended (ISO 7816-3 §12.1.3).

The card reads every byte of an APDU as untrusted: `parse_command` accepts exactly the seven
well-formed shapes (cases 1, 2S, 3S, 4S, 2E, 3E, 4E) and refuses everything else with 67 00.
Ne is kept as the number the terminal asked for; `ne_is_max` tells whether Le was the
"as much as you have" encoding (short 00, extended 0000).
"""

from __future__ import annotations

from typing import NamedTuple

from .sw import SW, Refusal

__all__ = [
    "CARD_NC_MAX",
    "EXTENDED_NC_MAX",
    "EXTENDED_NE_MAX",
    "HEADER_BYTES",
    "SHORT_NC_MAX",
    "SHORT_NE_MAX",
    "Command",
    "encode_command",
    "parse_command",
    "respond",
]

HEADER_BYTES = 4
SHORT_NC_MAX = 255
SHORT_NE_MAX = 256  # Le byte 00
EXTENDED_NC_MAX = 65535
EXTENDED_NE_MAX = 65536  # Le bytes 00 00
# The card's command buffer: the largest data field it accepts. Its largest file is well below this,
# so anything longer is an abuse of extended length and gets 67 00 before a handler sees it.
CARD_NC_MAX = 4096


class Command(NamedTuple):
    """One parsed command APDU. A NamedTuple, not a frozen dataclass: the card makes one per APDU, and
    a tuple is built in a third of the time while staying just as immutable."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int | None = None  # None: no Le field (case 1 or 3)
    extended: bool = False

    @property
    def ne_is_max(self) -> bool:
        """Le was 00 (short) or 00 00 (extended): the terminal takes whatever the card has."""
        return self.ne == (EXTENDED_NE_MAX if self.extended else SHORT_NE_MAX)

    @property
    def p1p2(self) -> int:
        return (self.p1 << 8) | self.p2


_new_command = tuple.__new__  # Command's fields, all given, without NamedTuple's keyword handling (3x cheaper)


def parse_command(raw: bytes) -> Command:
    """Parse a command APDU; raise Refusal(67 00) if its length fields do not add up."""
    n = len(raw)
    if n < HEADER_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
    if n == HEADER_BYTES:  # case 1
        return _new_command(Command, (cla, ins, p1, p2, b"", None, False))
    b1 = raw[4]
    if n == 5:  # case 2S
        return _new_command(Command, (cla, ins, p1, p2, b"", b1 or SHORT_NE_MAX, False))
    if b1 != 0:  # short Lc: at most 255 bytes of data, always within CARD_NC_MAX
        if n == 5 + b1:  # case 3S
            return _new_command(Command, (cla, ins, p1, p2, bytes(raw[5:]), None, False))
        if n == 6 + b1:  # case 4S
            return _new_command(Command, (cla, ins, p1, p2, bytes(raw[5:-1]), raw[-1] or SHORT_NE_MAX, False))
        raise Refusal(SW.WRONG_LENGTH)
    # b1 == 00 and more bytes follow: extended length
    if n == 7:  # case 2E
        le = (raw[5] << 8) | raw[6]
        return Command(cla, ins, p1, p2, ne=le or EXTENDED_NE_MAX, extended=True)
    if n < 8:
        raise Refusal(SW.WRONG_LENGTH)
    lc = (raw[5] << 8) | raw[6]
    if lc == 0:  # an extended Lc of zero is not a valid encoding
        raise Refusal(SW.WRONG_LENGTH)
    if n == 7 + lc:  # case 3E
        return _checked(Command(cla, ins, p1, p2, data=bytes(raw[7:]), extended=True))
    if n == 9 + lc:  # case 4E
        le = (raw[-2] << 8) | raw[-1]
        return _checked(Command(cla, ins, p1, p2, data=bytes(raw[7:-2]), ne=le or EXTENDED_NE_MAX, extended=True))
    raise Refusal(SW.WRONG_LENGTH)


def _checked(command: Command) -> Command:
    if len(command.data) > CARD_NC_MAX:
        raise Refusal(SW.WRONG_LENGTH)
    return command


def encode_command(
    cla: int, ins: int, p1: int, p2: int, data: bytes = b"", ne: int | None = None, *, extended: bool = False
) -> bytes:
    """Encode a command APDU. Extended encoding is used when asked for or when the lengths need it."""
    if not (0 <= cla <= 0xFF and 0 <= ins <= 0xFF and 0 <= p1 <= 0xFF and 0 <= p2 <= 0xFF):
        raise ValueError("CLA, INS, P1 and P2 are one byte each")
    nc = len(data)
    if nc > EXTENDED_NC_MAX:
        raise ValueError(f"command data of {nc} bytes exceeds {EXTENDED_NC_MAX}")
    if ne is not None and not 1 <= ne <= EXTENDED_NE_MAX:
        raise ValueError(f"Ne must be 1..{EXTENDED_NE_MAX}")
    extended = extended or nc > SHORT_NC_MAX or (ne is not None and ne > SHORT_NE_MAX)
    header = bytes((cla, ins, p1, p2))
    if not extended:
        body = (bytes((nc,)) + data if nc else b"") + (bytes((ne & 0xFF,)) if ne is not None else b"")
        return header + body
    lc_field = b"\x00" + nc.to_bytes(2, "big") if nc else b""
    if ne is None:
        le_field = b""
    else:
        le2 = (ne & 0xFFFF).to_bytes(2, "big")  # 65536 encodes as 00 00
        le_field = le2 if nc else b"\x00" + le2
    return header + lc_field + data + le_field


def respond(command: Command, data: bytes = b"", *, short_read: bool = False) -> bytes:
    """Response APDU = data || SW, honouring the terminal's Ne.

    Ne smaller than the data: 6C xx (ask again with the right Le). Ne larger than the data and not
    the "everything" encoding: fine for fixed-size answers (Ne is a maximum), but READ BINARY and
    READ RECORD (`short_read=True`) warn with 62 82 as ISO 7816-4 asks.
    """
    ne = command.ne
    if ne is None or command.ne_is_max or ne == len(data):
        return data + b"\x90\x00"
    if ne < len(data):
        raise Refusal(SW.wrong_le(len(data)) if len(data) <= SHORT_NE_MAX else SW.WRONG_LENGTH)
    return data + (b"\x62\x82" if short_read else b"\x90\x00")
