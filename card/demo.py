"""The card part of `citycard demo`: a load and a purchase on a virtual card, through real PC/SC.

`run_card_demo(out)` starts a private pcscd (or uses the one already running, whose vpcd slot
port is `reader_port`, by default Debian's 35963), personalises a fresh card for a throw-away issuer
in a temporary directory, inserts it, and runs the terminal flows with every APDU traced: read the
holder (EF05/EF06), verify the PIN, load 100.00 CNY, buy something, check the TAC as the back office
would. Then it removes the card and stops the pcscd it started. PINs are masked in the trace.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .channel import ApduEvent, CardChannel
from .cos import VirtualCard
from .flows import Terminal
from .keys import MasterKeys
from .pcscd import (
    CARD_EVENT_TIMEOUT_S,
    PcscDaemon,
    present_readers,
    running_pcscd_pid,
    wait_for_card,
    wait_until_empty,
)
from .personalize import SAMPLE_PROFILE, personalize, profile_from_json
from .sam import IssuerHost, SoftSam, verify_tac
from .state import FileStore
from .transport import PcscTransport
from .vpcd import VPCD_DEFAULT_PORT, VpcdLink

__all__ = ["format_fen", "run_card_demo"]

DEMO_LOAD_FEN = 10_000  # 100.00 CNY
DEMO_PURCHASE_FEN = 1_250  # 12.50 CNY
DEMO_TERMINAL_ID = bytes.fromhex("330300000001")


def format_fen(amount_fen: int) -> str:
    """12345 -> '123.45 CNY', with integers only."""
    sign = "-" if amount_fen < 0 else ""
    yuan, fen = divmod(abs(amount_fen), 100)
    return f"{sign}{yuan}.{fen:02d} CNY"


def _reader_of_new_card(before: set[str]) -> str:
    """With a pcscd we did not configure, the reader is the one where a card just appeared."""
    deadline = time.monotonic() + CARD_EVENT_TIMEOUT_S
    while time.monotonic() < deadline:
        appeared = present_readers() - before
        if appeared:
            return min(appeared)
        time.sleep(0.05)
    raise TimeoutError("the virtual card did not show up in any reader of the running pcscd")


def run_card_demo(out: Callable[[str], None], *, reader_port: int | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="citycard-card-demo-") as tmp:
        workdir = Path(tmp)
        daemon: PcscDaemon | None = None
        if running_pcscd_pid() is None:
            daemon = PcscDaemon(workdir / "pcscd", entries=1)
            reader = daemon.start()[0]
            out(f"started pcscd (pid {daemon.pid}) with vpcd readers: {', '.join(r.name for r in daemon.readers)}")
            port, reader_name = reader.port, reader.name
        else:
            port, reader_name = reader_port or VPCD_DEFAULT_PORT, ""
            out(f"using the running pcscd; the card goes to the vpcd slot on port {port}")
        link: VpcdLink | None = None
        transport: PcscTransport | None = None
        try:
            keys = MasterKeys.generate()  # a throw-away issuer: no key is ever written in code
            state_path = workdir / "card.json"
            FileStore(state_path).create(personalize(profile_from_json(SAMPLE_PROFILE), keys))
            out(f"personalised a fresh card in {state_path}")
            before = present_readers() if not reader_name else set()
            link = VpcdLink(VirtualCard.open(state_path), port)
            link.insert()
            if reader_name:
                wait_for_card(reader_name)
            else:
                reader_name = _reader_of_new_card(before)
            out(f"card inserted in reader {reader_name!r}")
            transport = PcscTransport(reader_name)
            _run_flows(out, transport, keys)
        finally:
            if transport is not None:
                transport.close()
            if link is not None:
                link.remove()
                if daemon is None and reader_name:
                    wait_until_empty(reader_name)  # leave the shared pcscd as we found it
                out("card removed")
            if daemon is not None:
                daemon.stop()
                out("pcscd stopped")


def _run_flows(out: Callable[[str], None], transport: PcscTransport, keys: MasterKeys) -> None:
    def trace(event: ApduEvent) -> None:
        out(event.describe())

    terminal = Terminal(CardChannel(transport, (trace,)), SoftSam(keys, DEMO_TERMINAL_ID), host=IssuerHost(keys))
    out("-- read the holder (SSSE, EF05 by record number, EF06 by tag)")
    data = terminal.read_holder()
    out(f"   card {data.identity.card_number}, holder {data.holder.name}, SSN {data.holder.ssn_masked}, "
        f"valid until {data.identity.expiry_date}")
    out("-- verify the PIN (masked in the trace)")
    terminal.verify_pin(SAMPLE_PROFILE["initial_pin"])
    terminal.select_purse()
    out(f"   e-purse balance {format_fen(terminal.balance())}")
    out(f"-- load {format_fen(DEMO_LOAD_FEN)}")
    load = terminal.load(DEMO_LOAD_FEN)
    out(f"   loaded; balance {format_fen(load.balance_after_fen)}, TAC {load.tac.hex().upper()}")
    out(f"-- purchase {format_fen(DEMO_PURCHASE_FEN)}")
    sale = terminal.purchase(DEMO_PURCHASE_FEN)
    out(f"   paid; balance {format_fen(sale.balance_after_fen)}, terminal txn {sale.terminal_seq}, "
        f"TAC {sale.tac.hex().upper()}")
    ok = verify_tac(keys, sale.tac_fields(), sale.tac)
    out(f"   back office TAC check: {'valid' if ok else 'INVALID'}")
    out(f"   card says balance {format_fen(terminal.balance())}")
