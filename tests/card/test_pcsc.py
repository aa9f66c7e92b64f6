"""Through the real stack: pyscard -> pcscd -> vsmartcard-vpcd -> our card, in the fixture's private pcscd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from citycard.card import (
    EP,
    CardChannel,
    IssuerHost,
    MasterKeys,
    PcscDaemon,
    PcscTransport,
    PurchaseInterrupted,
    SoftSam,
    Terminal,
    VirtualCard,
    verify_tac,
)
from citycard.card.pcscd import present_readers, wait_for_card, wait_until_empty
from citycard.card.personalize import SAMPLE_PROFILE

from .helpers import PIN, TERMINAL_ID, TEST_KEYS_PATH

pytestmark = pytest.mark.pcsc

PURCHASES_PER_CARD = 25


def pcsc_terminal(reader: str, master_keys: MasterKeys, seq: int = 1) -> Terminal:
    channel = CardChannel(PcscTransport(reader))
    return Terminal(channel, SoftSam(master_keys, TERMINAL_ID, next_terminal_seq=seq), host=IssuerHost(master_keys))


def profile_with_serial(n: int) -> dict:
    return dict(SAMPLE_PROFILE, purse=dict(SAMPLE_PROFILE["purse"], app_serial=f"{33030000000000000000 + n:020d}"))


def test_fixture_gives_four_private_readers(pcscd_daemon: PcscDaemon) -> None:
    assert len(pcscd_daemon.readers) == 4
    assert len({r.port for r in pcscd_daemon.readers}) == 4
    assert all(r.name.startswith("citycard test") for r in pcscd_daemon.readers)


def test_load_and_purchase_through_pcscd(insert_card, master_keys: MasterKeys) -> None:
    inserted = insert_card(0, fsync=True)  # the durable mode; the other tests run the default
    terminal = pcsc_terminal(inserted.reader.name, master_keys)
    try:
        assert terminal.channel.transport.protocol == "T=1"
        assert terminal.read_holder().holder.ssn == SAMPLE_PROFILE["holder"]["ssn"]
        terminal.verify_pin(PIN)
        load = terminal.load(10_000)
        sale = terminal.purchase(1_250)
        assert terminal.balance() == 8_750
    finally:
        terminal.channel.close()
    assert verify_tac(master_keys, load.tac_fields(), load.tac)
    assert verify_tac(master_keys, sale.tac_fields(), sale.tac)
    assert VirtualCard.open(inserted.state_path).image.purse.balances[EP] == 8_750  # on disk


def test_several_cards_in_several_readers_at_once(insert_card, master_keys: MasterKeys) -> None:
    cards = [insert_card(i, profile=profile_with_serial(i + 1)) for i in range(4)]
    errors: list[BaseException] = []
    serials: dict[int, bytes] = {}

    def shop(i: int) -> None:
        terminal = pcsc_terminal(cards[i].reader.name, master_keys, seq=1000 * (i + 1))
        try:
            serials[i] = terminal.select_purse().app_serial
            terminal.verify_pin(PIN)
            terminal.load(5_000)
            for _ in range(PURCHASES_PER_CARD):
                terminal.purchase(i + 1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            terminal.channel.close()

    threads = [threading.Thread(target=shop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for i, inserted in enumerate(cards):
        assert serials[i] == bytes.fromhex(profile_with_serial(i + 1)["purse"]["app_serial"]), "reader reached another card"
        purse = inserted.card.image.purse
        assert purse.balances[EP] == 5_000 - PURCHASES_PER_CARD * (i + 1)
        assert purse.offline_counters[EP] == PURCHASES_PER_CARD


def test_card_pulled_during_debit_is_recovered(insert_card, master_keys: MasterKeys) -> None:
    pulled = threading.Event()

    def pull_at_first_debit(apdu: bytes) -> bool:
        if apdu[:2] == b"\x80\x54" and not pulled.is_set():
            pulled.set()
            return True
        return False

    first = insert_card(1, pull_after=pull_at_first_debit)
    terminal = pcsc_terminal(first.reader.name, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(2_000)
    with pytest.raises(PurchaseInterrupted) as torn:
        terminal.purchase(700)
    terminal.channel.close()
    wait_until_empty(first.reader.name)
    # the same card (its state file) back into the reader: a new VirtualCard, nothing in memory carried over
    again = insert_card(1, state_path=first.state_path)
    terminal.channel = CardChannel(PcscTransport(again.reader.name))
    try:
        receipt = terminal.recover_purchase(torn.value.pending)
        assert receipt is not None and receipt.balance_after_fen == 1_300
        assert verify_tac(master_keys, receipt.tac_fields(), receipt.tac)
        assert terminal.balance() == 1_300
    finally:
        terminal.channel.close()


@pytest.mark.slow
def test_cli_cards_in_two_readers(pcscd_daemon: PcscDaemon, tmp_path: Path, master_keys: MasterKeys) -> None:
    """`citycard card virtual` (through the real `citycard` command) as separate processes, one per reader;
    SIGTERM removes each card."""
    repo_root = Path(__file__).resolve().parents[2]
    procs = []
    readers = pcscd_daemon.readers[2:4]
    try:
        for n, reader in enumerate(readers):
            state = tmp_path / f"cli-card-{n}.json"
            argv = [sys.executable, "-m", "citycard", "card", "virtual", "--state", str(state), "--new",
                    "--keys", str(TEST_KEYS_PATH), "--reader-port", str(reader.port)]
            procs.append(subprocess.Popen(argv, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        for reader in readers:
            wait_for_card(reader.name, timeout_s=15)
        assert {r.name for r in readers} <= present_readers()
        for n, reader in enumerate(readers):
            terminal = pcsc_terminal(reader.name, master_keys)
            try:
                terminal.verify_pin(PIN)
                terminal.load(100 * (n + 1))
                assert terminal.purchase(10).balance_after_fen == 100 * (n + 1) - 10
            finally:
                terminal.channel.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=15)[0] for proc in procs]
    for reader in readers:
        wait_until_empty(reader.name)
    assert [proc.returncode for proc in procs] == [0, 0]
    assert all("created a new card" in out and "card removed" in out for out in outputs), outputs
    assert all(os.path.exists(tmp_path / f"cli-card-{n}.json") for n in range(2))
