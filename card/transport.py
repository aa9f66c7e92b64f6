"""The terminal's lowest layer: move command APDUs to a card and response APDUs back.

Two transports with one shape (`transmit(bytes) -> bytes`, `reset()`, `close()`):

* `PcscTransport`: pyscard over pcscd, exactly what a terminal with a physical reader does.
  It uses pyscard's thin `smartcard.scard` layer (one SCardTransmit per APDU, nothing else on the
  path). PC/SC failures become named `TransportError`s; status words are not its business.
* `MemoryTransport`: calls a VirtualCard object directly, for fast unit tests.
"""

from __future__ import annotations

from typing import Protocol, Self

from smartcard.scard import (
    SCARD_E_NO_SERVICE,
    SCARD_E_NO_SMARTCARD,
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_SERVICE_STOPPED,
    SCARD_E_UNKNOWN_READER,
    SCARD_LEAVE_CARD,
    SCARD_PCI_T0,
    SCARD_PCI_T1,
    SCARD_PROTOCOL_T0,
    SCARD_PROTOCOL_T1,
    SCARD_RESET_CARD,
    SCARD_S_SUCCESS,
    SCARD_SCOPE_USER,
    SCARD_SHARE_SHARED,
    SCARD_W_REMOVED_CARD,
    SCARD_W_RESET_CARD,
    SCARD_W_UNRESPONSIVE_CARD,
    SCardConnect,
    SCardDisconnect,
    SCardEstablishContext,
    SCardGetErrorMessage,
    SCardReconnect,
    SCardReleaseContext,
    SCardTransmit,
)

from .cos import VirtualCard

__all__ = [
    "CardRemoved",
    "CardWasReset",
    "MemoryTransport",
    "NoPcscService",
    "PcscTransport",
    "ReaderNotFound",
    "Transport",
    "TransportError",
]


class TransportError(Exception):
    """The APDU did not make the round trip; `hresult` is the PC/SC code when there is one."""

    def __init__(self, message: str, hresult: int | None = None) -> None:
        super().__init__(message)
        self.hresult = hresult


class CardRemoved(TransportError):
    """No card, or the card left the reader (a torn transaction when it happens mid-command)."""


class CardWasReset(TransportError):
    """Another application reset the card; its security status is gone."""


class NoPcscService(TransportError):
    """pcscd is not running (or stopped under us)."""


class ReaderNotFound(TransportError):
    """No reader of that name."""


_ERROR_BY_HRESULT: dict[int, type[TransportError]] = {
    SCARD_W_REMOVED_CARD: CardRemoved,
    SCARD_E_NO_SMARTCARD: CardRemoved,
    SCARD_W_UNRESPONSIVE_CARD: CardRemoved,
    SCARD_W_RESET_CARD: CardWasReset,
    SCARD_E_NO_SERVICE: NoPcscService,
    SCARD_E_SERVICE_STOPPED: NoPcscService,
    SCARD_E_UNKNOWN_READER: ReaderNotFound,
    SCARD_E_READER_UNAVAILABLE: ReaderNotFound,
}


def _pcsc_error(what: str, hresult: int) -> TransportError:
    cls = _ERROR_BY_HRESULT.get(hresult & 0xFFFFFFFF, TransportError)
    return cls(f"{what}: {SCardGetErrorMessage(hresult)} (0x{hresult & 0xFFFFFFFF:08X})", hresult)


class Transport(Protocol):
    def transmit(self, apdu: bytes) -> bytes:
        """Send a command APDU, return the response APDU (data || SW1 SW2)."""

    def reset(self) -> None:
        """Warm-reset the card (its volatile state and security status are lost)."""

    def close(self) -> None: ...


class PcscTransport:
    """A shared connection to the card in one PC/SC reader."""

    def __init__(self, reader: str, *, protocols: int = SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1) -> None:
        self.reader = reader
        hresult, self._context = SCardEstablishContext(SCARD_SCOPE_USER)
        if hresult != SCARD_S_SUCCESS:
            raise _pcsc_error("SCardEstablishContext", hresult)
        hresult, self._card, self._protocol = SCardConnect(self._context, reader, SCARD_SHARE_SHARED, protocols)
        if hresult != SCARD_S_SUCCESS:
            SCardReleaseContext(self._context)
            self._context = None
            raise _pcsc_error(f"connect to {reader!r}", hresult)
        self._pci = SCARD_PCI_T1 if self._protocol == SCARD_PROTOCOL_T1 else SCARD_PCI_T0

    @property
    def protocol(self) -> str:
        return "T=1" if self._protocol == SCARD_PROTOCOL_T1 else "T=0"

    def transmit(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise TransportError("transport closed")
        hresult, response = SCardTransmit(self._card, self._pci, list(apdu))
        if hresult != SCARD_S_SUCCESS:
            raise _pcsc_error("transmit", hresult)
        if len(response) < 2:
            raise TransportError(f"response of {len(response)} bytes has no status word")
        return bytes(response)

    def reset(self) -> None:
        hresult, self._protocol = SCardReconnect(
            self._card, SCARD_SHARE_SHARED, SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1, SCARD_RESET_CARD
        )
        if hresult != SCARD_S_SUCCESS:
            raise _pcsc_error("reset", hresult)

    def close(self) -> None:
        if self._card is not None:
            SCardDisconnect(self._card, SCARD_LEAVE_CARD)  # errors ignored: the card may be gone
            self._card = None
        if self._context is not None:
            SCardReleaseContext(self._context)
            self._context = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryTransport:
    """The card object in the same process; no PC/SC at all."""

    def __init__(self, card: VirtualCard) -> None:
        self.card = card
        card.power(on=True)

    def transmit(self, apdu: bytes) -> bytes:
        return self.card.process(bytes(apdu))

    def reset(self) -> None:
        self.card.power(on=True)

    def close(self) -> None:
        pass
