"""Fixtures for the card tests: in-memory cards and terminals, and a real pcscd with vpcd readers.

The `pcscd_daemon` fixture starts `pcscd --foreground --config PRIVATE_DIR` with 2 vpcd entries
(4 readers, one driver copy per entry), waits until all readers are listed, and stops it at the
end of the session. It fails (it does not skip) when pcscd cannot start, e.g. because another
pcscd is running: the PC/SC path is part of `make test`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from citycard.card import (
    MasterKeys,
    MemoryStore,
    PcscDaemon,
    PcscdError,
    Terminal,
    VirtualCard,
    VirtualReader,
    VpcdLink,
    personalize,
    profile_from_json,
)
from citycard.card.pcscd import wait_for_card, wait_until_empty
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.state import FileStore

from .helpers import TEST_KEYS_PATH, make_terminal, seeded_random


@pytest.fixture(scope="session")
def master_keys() -> MasterKeys:
    return MasterKeys.load(TEST_KEYS_PATH)


@pytest.fixture
def card(master_keys: MasterKeys) -> VirtualCard:
    """A fresh sample card in memory, with a deterministic random source."""
    image = personalize(profile_from_json(SAMPLE_PROFILE), master_keys)
    return VirtualCard(image, MemoryStore(), random=seeded_random(7))


@pytest.fixture
def terminal(card: VirtualCard, master_keys: MasterKeys) -> Terminal:
    return make_terminal(card, master_keys)


# -- real PC/SC ----------------------------------------------------------------------------------------


# Package scope: pcscd stops when the card tests are done, so later tests (the demo) find the machine
# as CI does: with no pcscd running.
@pytest.fixture(scope="package")
def pcscd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscDaemon]:
    daemon = PcscDaemon(tmp_path_factory.mktemp("pcscd"), entries=2, name="citycard test")
    try:
        daemon.start()
    except PcscdError as exc:
        pytest.fail(f"cannot start pcscd for the PC/SC tests: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()


@dataclass
class InsertedCard:
    card: VirtualCard
    link: VpcdLink
    reader: VirtualReader
    state_path: Path


@pytest.fixture
def insert_card(pcscd_daemon: PcscDaemon, tmp_path: Path, master_keys: MasterKeys) -> Iterator[Callable[..., InsertedCard]]:
    """Factory: put a card (fresh, or from an existing state file) into reader `index`; removed at teardown."""
    inserted: list[InsertedCard] = []

    def insert(index: int, *, state_path: Path | None = None, profile: dict | None = None,
               pull_after: Callable[[bytes], bool] | None = None, fsync: bool = False) -> InsertedCard:
        reader = pcscd_daemon.readers[index]
        if state_path is None:
            state_path = tmp_path / f"card-{index}-{len(inserted)}.json"
            FileStore(state_path).create(personalize(profile_from_json(profile or SAMPLE_PROFILE), master_keys))
        card = VirtualCard.open(state_path, fsync=fsync)
        link = VpcdLink(card, reader.port, pull_after=pull_after)
        link.insert()
        wait_for_card(reader.name)
        entry = InsertedCard(card, link, reader, state_path)
        inserted.append(entry)
        return entry

    yield insert
    for entry in inserted:
        entry.link.remove()
    for reader_name in {entry.reader.name for entry in inserted}:
        wait_until_empty(reader_name)
