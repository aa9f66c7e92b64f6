"""The layer above the transport: APDU trace observers and status-word checking.

`CardChannel.send(apdu)` transmits, tells every observer what went out and what came back, then
runs the status word through `sw.check`, which raises the named error for a refusal. Observers see
`ApduEvent`s whose command hex has secret data (PINs) masked, so a trace can be printed or logged
as is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .purse import COMPILED
from .sw import SW, check, describe
from .transport import Transport

__all__ = ["Apdu", "ApduEvent", "ApduObserver", "CardChannel", "Response"]


# A command and its answer are NamedTuples: immutable, and cheaper to build than frozen dataclasses,
# which counts because every APDU makes one of each.
class Apdu(NamedTuple):
    """A command APDU with a short name for traces; `secret` masks its data field in every trace."""

    name: str
    raw: bytes
    secret: bool = False

    def shown(self) -> str:
        """Spaced hex; for a secret command the header and length fields only, data as '**'."""
        if not self.secret:
            return self.raw.hex(" ").upper()
        header, rest = self.raw[:5], self.raw[5:]
        return " ".join([header.hex(" ").upper()] + ["**"] * len(rest))


class Response(NamedTuple):
    data: bytes
    sw: int


@dataclass(frozen=True, slots=True)
class ApduEvent:
    name: str
    command_hex: str  # masked for secret commands
    response: bytes  # data || SW1 SW2
    elapsed_s: float

    @property
    def sw(self) -> int:
        return int.from_bytes(self.response[-2:], "big")

    def describe(self) -> str:
        """Two trace lines: '>> NAME  00 A4 ..' and '<< .. 90 00  (success)'."""
        return (f">> {self.name:<30} {self.command_hex}\n"
                f"<< {'':<30} {self.response.hex(' ').upper()}  ({describe(self.sw)})")


ApduObserver = Callable[[ApduEvent], None]


class CardChannel:
    def __init__(self, transport: Transport, observers: tuple[ApduObserver, ...] = ()) -> None:
        self.transport = transport
        self.observers: list[ApduObserver] = list(observers)

    def send(self, apdu: Apdu) -> Response:
        """Transmit and check: return data and SW on success, raise StatusWordError otherwise."""
        if not self.observers:  # the common case: no trace, so no clock and no event either
            raw = self.transport.transmit(apdu.raw)
        else:
            started = time.perf_counter()
            raw = self.transport.transmit(apdu.raw)
            event = ApduEvent(apdu.name, apdu.shown(), raw, time.perf_counter() - started)
            for observer in self.observers:
                observer(event)
        sw = int.from_bytes(raw[-2:], "big")
        if sw != SW.OK:  # 90 00 needs no look-up; anything else goes through the checker chain
            check(sw, apdu.name)
        return Response(raw[:-2], sw)

    # The Python method, kept under this name: the compiled one (purse.COMPILED) hands a traced channel to it.
    py_send = send

    def reset(self) -> None:
        self.transport.reset()

    def close(self) -> None:
        self.transport.close()


if COMPILED is not None:  # see the end of purse.py
    CardChannel.send = COMPILED.channel_send  # type: ignore[method-assign]
