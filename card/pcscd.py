"""Start and stop a private pcscd with its own vpcd readers; wait for readers and cards.

Used by the test fixture, the benchmark and the demo (pcsc-stack.md §2, §4):

* `pcscd --foreground --config DIR` reads only DIR instead of /etc/reader.conf.d, so we choose the
  ports and reader names and touch nothing under /etc.
* Each vpcd entry gives two reader slots, on ports P and P+1. Every entry needs its own copy of
  libifdvpcd.so, or the driver's static per-slot state is shared and cards land in the wrong slot.
* There is one pcscd per machine (its socket path is compiled in), so a second one refuses to start;
  we check first and say so.
* Readiness = SCardListReaders returns every reader; the socket file alone may be stale.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from smartcard.scard import (
    SCARD_S_SUCCESS,
    SCARD_SCOPE_USER,
    SCARD_STATE_EMPTY,
    SCARD_STATE_PRESENT,
    SCARD_STATE_UNAWARE,
    SCardEstablishContext,
    SCardGetStatusChange,
    SCardListReaders,
    SCardReleaseContext,
)

__all__ = [
    "VPCD_DRIVER",
    "PcscDaemon",
    "PcscdError",
    "VirtualReader",
    "list_readers",
    "present_readers",
    "running_pcscd_pid",
    "wait_for_card",
    "wait_until_empty",
]

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
PCSCD_RUN_DIR = Path("/run/pcscd")
PCSCD_PID_FILE = PCSCD_RUN_DIR / "pcscd.pid"
SLOTS_PER_ENTRY = 2
ENTRIES_MAX = 8  # pcscd's PCSCLITE_MAX_READERS_CONTEXTS = 16 readers
PORT_SEARCH_START = 0x9C40
PORT_SEARCH_END = 0xFF00
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.01
# pcscd polls vpcd every ~400 ms, so insertion and removal show up within about half a second.
CARD_EVENT_TIMEOUT_S = 5.0


class PcscdError(RuntimeError):
    """pcscd could not be started, found, or stopped."""


@dataclass(frozen=True, slots=True)
class VirtualReader:
    name: str  # the PC/SC reader name a terminal connects to
    port: int  # the vpcd TCP port a virtual card connects to


def list_readers() -> list[str] | None:
    """Reader names, or None when no pcscd answers."""
    hresult, context = SCardEstablishContext(SCARD_SCOPE_USER)
    if hresult != SCARD_S_SUCCESS:
        return None
    try:
        hresult, readers = SCardListReaders(context, [])
        return list(readers) if hresult == SCARD_S_SUCCESS else []
    finally:
        SCardReleaseContext(context)


def running_pcscd_pid() -> int | None:
    """The pid of a live pcscd per its pid file, else None."""
    try:
        pid = int(PCSCD_PID_FILE.read_text().replace("\0", "").strip())  # pcscd writes "PID\n\0"
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # stale file from a killed pcscd; the next pcscd cleans it up
    except PermissionError:
        pass
    return pid


def _wait_state(reader: str, wanted: int, timeout_s: float) -> bytes:
    hresult, context = SCardEstablishContext(SCARD_SCOPE_USER)
    if hresult != SCARD_S_SUCCESS:
        raise PcscdError("pcscd is not running")
    try:
        deadline = time.monotonic() + timeout_s
        states = [(reader, SCARD_STATE_UNAWARE)]
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise PcscdError(f"reader {reader!r}: timed out waiting for the card to be "
                                 f"{'present' if wanted == SCARD_STATE_PRESENT else 'removed'}")
            hresult, states = SCardGetStatusChange(context, remaining_ms, states)
            if hresult == SCARD_S_SUCCESS:
                _, event_state, atr = states[0]
                if event_state & wanted:
                    return bytes(atr)
                states = [(reader, event_state)]
    finally:
        SCardReleaseContext(context)


def present_readers() -> set[str]:
    """Names of the readers that hold a card right now (empty when no pcscd answers)."""
    names = list_readers() or []
    if not names:
        return set()
    hresult, context = SCardEstablishContext(SCARD_SCOPE_USER)
    if hresult != SCARD_S_SUCCESS:
        return set()
    try:
        hresult, states = SCardGetStatusChange(context, 0, [(n, SCARD_STATE_UNAWARE) for n in names])
        if hresult != SCARD_S_SUCCESS:
            return set()
        return {name for name, state, _ in states if state & SCARD_STATE_PRESENT}
    finally:
        SCardReleaseContext(context)


def wait_for_card(reader: str, timeout_s: float = CARD_EVENT_TIMEOUT_S) -> bytes:
    """Block until a card is present in `reader`; return its ATR."""
    return _wait_state(reader, SCARD_STATE_PRESENT, timeout_s)


def wait_until_empty(reader: str, timeout_s: float = CARD_EVENT_TIMEOUT_S) -> None:
    _wait_state(reader, SCARD_STATE_EMPTY, timeout_s)


def _port_free(port: int) -> bool:
    # vpcd binds 0.0.0.0, so that is where the port must be free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port_block(count: int, start: int) -> int:
    for base in range(start, PORT_SEARCH_END - count, count):
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise PcscdError("no block of free TCP ports for the vpcd readers")


class PcscDaemon:
    """A pcscd of our own, with `entries` x 2 vpcd readers, in `workdir` (config, driver copies, log)."""

    def __init__(self, workdir: str | os.PathLike[str], entries: int = 2, *, name: str = "citycard vpcd",
                 base_port: int | None = None) -> None:
        if not 1 <= entries <= ENTRIES_MAX:
            raise ValueError(f"1..{ENTRIES_MAX} vpcd entries (2 readers each)")
        self.workdir = Path(workdir)
        self.entries = entries
        self.name = name
        self.base_port = base_port
        self.readers: list[VirtualReader] = []
        self.log_path = self.workdir / "pcscd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> list[VirtualReader]:
        if shutil.which("pcscd") is None or not VPCD_DRIVER.exists():
            raise PcscdError("pcscd or vsmartcard-vpcd is not installed (make system-deps installs them)")
        other = running_pcscd_pid()
        if other is not None:
            raise PcscdError(f"another pcscd (pid {other}) is running; stop it first "
                             "(on systemd: systemctl stop pcscd.socket pcscd)")
        conf_dir = self.workdir / "reader.conf.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        ports = self._write_config(conf_dir)
        if os.geteuid() == 0:
            PCSCD_RUN_DIR.mkdir(parents=True, exist_ok=True)
        argv = ["pcscd", "--foreground", "--config", str(conf_dir)]
        if _needs_disable_polkit():
            argv.append("--disable-polkit")
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.readers = self._wait_ready(ports, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.readers

    def _write_config(self, conf_dir: Path) -> dict[str, int]:
        """One entry per driver copy; returns the expected friendly-name prefix -> first port."""
        if self.base_port is None:  # chosen once: a restarted daemon keeps its readers' ports
            self.base_port = _free_port_block(SLOTS_PER_ENTRY * self.entries, PORT_SEARCH_START)
        base = self.base_port
        blocks = []
        ports = {}
        for i in range(self.entries):
            driver = VPCD_DRIVER if i == 0 else self.workdir / f"libifdvpcd-{i}.so"
            if i:
                shutil.copy(VPCD_DRIVER, driver)
            port = base + SLOTS_PER_ENTRY * i
            friendly = f"{self.name} {i}"
            ports[friendly] = port
            blocks.append(
                f'FRIENDLYNAME "{friendly}"\nDEVICENAME /dev/null:0x{port:X}\nLIBPATH {driver}\nCHANNELID 0x{port:X}\n'
            )
        (conf_dir / "vpcd").write_text("\n".join(blocks))
        return ports

    def _wait_ready(self, ports: dict[str, int], timeout_s: float) -> list[VirtualReader]:
        expected = SLOTS_PER_ENTRY * self.entries
        deadline = time.monotonic() + timeout_s
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise PcscdError(f"pcscd exited with {self._proc.returncode}; see {self.log_path}")
            names = list_readers() or []
            if len(names) >= expected:
                return _map_readers(names, ports)
            if time.monotonic() > deadline:
                raise PcscdError(f"pcscd listed {len(names)} of {expected} readers "
                                 f"(a vpcd port may be taken); see {self.log_path}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGTERM, wait for the exit (an exiting pcscd deletes the socket of any newer one)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.readers = []


def _map_readers(names: list[str], ports: dict[str, int]) -> list[VirtualReader]:
    """Reader names are FRIENDLYNAME + two hex numbers; the slot of an entry follows listing order."""
    readers = []
    for friendly, port in ports.items():
        slots = sorted(n for n in names if n.startswith(friendly + " "))
        if len(slots) != SLOTS_PER_ENTRY:
            raise PcscdError(f"expected {SLOTS_PER_ENTRY} readers named {friendly!r}, got {slots}")
        readers += [VirtualReader(name, port + slot) for slot, name in enumerate(slots)]
    return readers


def _needs_disable_polkit() -> bool:
    """pcsc-lite >= 2.0.1 enables polkit and refuses clients when no polkitd runs (§6)."""
    try:
        out = subprocess.run(["pcscd", "--version"], check=False, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "polkit" in (out.stdout + out.stderr).lower()
