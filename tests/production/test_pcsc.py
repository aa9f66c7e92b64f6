"""A personalised production card read and activated through real PC/SC: Debian's pcscd with the vpcd
driver, pyscard on the terminal side, exactly as with a physical reader."""

from __future__ import annotations

import pytest
from citycard.apps.production import INITIAL_PIN, activate, open_chip
from citycard.card import (
    CardChannel,
    MasterKeys,
    MemoryTransport,
    PcscDaemon,
    PcscTransport,
    Terminal,
    VpcdLink,
)
from citycard.card.pcscd import wait_for_card, wait_until_empty
from citycard.card.sw import VerificationFailed

from .helpers import Production, handed_over_batch

pytestmark = pytest.mark.pcsc


def test_a_production_card_is_read_and_activated_through_pcscd(
        prod: Production, master_keys: MasterKeys, pcscd_daemon: PcscDaemon) -> None:
    batch_id, _ = handed_over_batch(prod, master_keys, 1)
    row = prod.store.rows(batch_id)[0]
    reader = pcscd_daemon.readers[0]
    link = VpcdLink(open_chip(prod.store, row.card_number), reader.port)
    link.insert()
    try:
        wait_for_card(reader.name)
        transport = PcscTransport(reader.name)
        terminal = Terminal(CardChannel(transport), sam=None)  # type: ignore[arg-type]
        on_chip = terminal.read_holder()
        assert (on_chip.identity.card_number, on_chip.holder.ssn, on_chip.holder.name) == (
            row.card_number, row.id_number, row.name)
        activate(prod.registry, prod.store, row.card_number, id_number=row.id_number,
                 name=prod.registry.person(row.id_number).name, institution="济南市社保服务中心", new_pin="736251",
                 actor="op", transport=transport)
        terminal.verify_pin("736251")
        with pytest.raises(VerificationFailed):
            terminal.verify_pin(INITIAL_PIN)
    finally:
        link.remove()
        wait_until_empty(reader.name)
    assert prod.registry.card(row.card_number).state.value == "active"
    # The chip file kept what the card did in the reader.
    on_file = Terminal(CardChannel(MemoryTransport(open_chip(prod.store, row.card_number))), sam=None)  # type: ignore[arg-type]
    on_file.verify_pin("736251")
