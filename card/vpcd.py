"""The socket bridge that plugs a VirtualCard into a vsmartcard-vpcd reader slot of a real pcscd.

Protocol (pcsc-stack.md §3, checked against Debian's vpcd 0.8): vpcd listens on a TCP port per
reader slot; the card connects (= insertion) and closes (= removal). Every message, both ways, is
a 2-byte big-endian length then the bytes. A 1-byte message from vpcd is a control code: 00 power
off, 01 power on, 02 reset (no reply), 04 "send your ATR". Anything longer is a command APDU,
answered with the response APDU.

Speed: vpcd writes the length and the payload in two send() calls without TCP_NODELAY, so Nagle
holds the payload until our kernel ACKs the length, and the delayed ACK costs ~40 ms per APDU.
Re-arming TCP_QUICKACK after every recv() (Linux clears it by itself) brings a round trip down to
about 0.1 ms. Replies go out in a single sendall() with TCP_NODELAY.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from .cos import VirtualCard

__all__ = ["VPCD_DEFAULT_PORT", "VpcdError", "VpcdLink"]

log = logging.getLogger("citycard.card.vpcd")

VPCD_DEFAULT_PORT = 0x8C7B  # /etc/reader.conf.d/vpcd as Debian ships it: reader "Virtual PCD 00 00"
CONNECT_RETRY_S = 0.05
CTRL_POWER_OFF, CTRL_POWER_ON, CTRL_RESET, CTRL_GET_ATR = 0x00, 0x01, 0x02, 0x04
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class VpcdError(ConnectionError):
    """vpcd could not be reached on the given port."""


def _quickack(sock: socket.socket) -> None:
    if _QUICKACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    chunk = sock.recv(count)
    _quickack(sock)  # after EVERY recv: see the module docstring
    if len(chunk) == count:
        return chunk  # the usual case: the whole message in one read
    if not chunk:
        raise ConnectionError("vpcd closed the connection")
    buf = bytearray(chunk)
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            raise ConnectionError("vpcd closed the connection")
        _quickack(sock)  # after EVERY recv: see the module docstring
        buf += chunk
    return bytes(buf)


class VpcdLink:
    """One card in one vpcd reader slot.

    `pull_after` is failure injection for tests: when it returns True for a command APDU, the card
    processes the command (and persists its effect) but is pulled before it can answer, the way a
    passenger yanks a card off a reader mid-transaction.
    """

    def __init__(
        self,
        card: VirtualCard,
        port: int = VPCD_DEFAULT_PORT,
        host: str = "127.0.0.1",
        *,
        pull_after: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.card = card
        self.host = host
        self.port = port
        self.pull_after = pull_after
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.closed = threading.Event()
        self.closed.set()

    @property
    def inserted(self) -> bool:
        return not self.closed.is_set()

    def insert(self, timeout_s: float = 5.0) -> None:
        """Connect to vpcd (retrying while its port is not open yet) and start answering."""
        if self.inserted:
            raise RuntimeError("card already inserted")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise VpcdError(f"vpcd not reachable on {self.host}:{self.port} ({exc.strerror or exc})") from None
                time.sleep(CONNECT_RETRY_S)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.closed.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,), name=f"vpcd-card-{self.port}", daemon=True)
        self._thread.start()

    def remove(self) -> None:
        """Close the connection: vpcd reports the card removed (pcscd sees it within ~0.4 s)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self.closed.set()

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        sock.sendall(len(payload).to_bytes(2, "big") + payload)
        _quickack(sock)

    def _serve(self, sock: socket.socket) -> None:
        # `sock` is passed in rather than read from self so that remove() cannot race this loop.
        try:
            while True:
                length = int.from_bytes(_recv_exact(sock, 2), "big")
                message = _recv_exact(sock, length) if length else b""
                if length == 1:
                    self._control(sock, message[0])
                elif length > 1:
                    response = self.card.process(message)
                    if self.pull_after is not None and self.pull_after(message):
                        log.info("failure injection: card pulled before answering INS %02X", message[1])
                        sock.close()
                        return
                    self._send(sock, response)
        except OSError:  # ConnectionError included: vpcd went away or remove() closed the socket
            pass
        finally:
            self.closed.set()

    def _control(self, sock: socket.socket, code: int) -> None:
        if code == CTRL_GET_ATR:
            self._send(sock, self.card.atr)
        elif code in (CTRL_POWER_OFF, CTRL_POWER_ON, CTRL_RESET):
            self.card.power(on=code != CTRL_POWER_OFF)
        else:
            log.warning("unknown vpcd control code %02X ignored", code)

    def serve_until(self, stop: threading.Event, retry_s: float = 0.5) -> None:
        """Stay inserted until `stop` is set, reconnecting if pcscd restarts; remove on the way out."""
        try:
            while not stop.is_set():
                if not self.inserted:
                    try:
                        self.insert(timeout_s=retry_s)
                        log.info("card inserted into vpcd at %s:%d", self.host, self.port)
                    except VpcdError:
                        stop.wait(retry_s)
                        continue
                stop.wait(retry_s)
        finally:
            self.remove()
