"""A real server in a process of its own for the tests of this folder; the tests are its clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_helpers import RunningServer, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server per test module, without the built-in plugins (tests register what they need)."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0, running.log_text()


@pytest.fixture
def fresh_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
