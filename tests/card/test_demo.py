"""`run_card_demo` (called by `citycard demo`): a load and a purchase through PC/SC, every APDU traced."""

from __future__ import annotations

import pytest
from citycard.card import PcscDaemon, run_card_demo
from citycard.card.demo import format_fen
from citycard.card.pcscd import present_readers, running_pcscd_pid

pytestmark = pytest.mark.pcsc


def test_format_fen() -> None:
    assert [format_fen(v) for v in (0, 5, 1_250, 10_000, -99)] == ["0.00 CNY", "0.05 CNY", "12.50 CNY",
                                                                   "100.00 CNY", "-0.99 CNY"]


def test_demo_with_the_running_pcscd(pcscd_daemon: PcscDaemon) -> None:
    lines: list[str] = []
    reader = pcscd_daemon.readers[3]
    run_card_demo(lines.append, reader_port=reader.port)
    text = "\n".join(lines)
    for expected in ("SELECT SSSE", "READ RECORD 1 current EF", "READ RECORD tag 08 current EF", "VERIFY",
                     "INITIALIZE FOR LOAD", "CREDIT FOR LOAD", "INITIALIZE FOR PURCHASE", "DEBIT FOR PURCHASE",
                     "loaded; balance 100.00 CNY", "paid; balance 87.50 CNY", "back office TAC check: valid",
                     "card says balance 87.50 CNY", "card removed", f"card inserted in reader '{reader.name}'"):
        assert expected in text, expected
    assert "** ** **" in text and "12 34 56" not in text  # the PIN never shows
    assert "pcscd stopped" not in text  # it did not start this pcscd, so it leaves it running
    assert pcscd_daemon.pid is not None and reader.name not in present_readers()


def test_demo_starts_and_stops_its_own_pcscd(pcscd_daemon: PcscDaemon) -> None:
    readers_before = list(pcscd_daemon.readers)
    pcscd_daemon.stop()  # make room: there is one pcscd per machine
    try:
        assert running_pcscd_pid() is None
        lines: list[str] = []
        run_card_demo(lines.append)
        text = "\n".join(lines)
        assert text.startswith("started pcscd")
        assert "paid; balance 87.50 CNY" in text
        assert text.endswith("pcscd stopped")
        assert running_pcscd_pid() is None, "the demo left its pcscd running"
    finally:
        pcscd_daemon.start()
    assert pcscd_daemon.readers == readers_before
