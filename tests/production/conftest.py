"""Fixtures for the production tests: a registry with an employer in a temporary data directory, the
test issuer's master keys, the CLI run in-process, and a private pcscd (stopped when the package is done)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from citycard.apps.production import ProductionStore, load_production_settings
from citycard.card import MasterKeys, PcscDaemon, PcscdError
from citycard.core.registry import Registry

from .helpers import KEYS_PATH, NOW, UNIT, UNIT_NAME, CliResult, Production, build_parser


@pytest.fixture
def prod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Production]:
    monkeypatch.setenv("CITYCARD_NOW", NOW.isoformat())
    data = tmp_path / "data"
    registry = Registry.open(data)
    registry.add_employer(UNIT, UNIT_NAME, actor="op")
    files = tmp_path / "files"
    files.mkdir()
    try:
        yield Production(data, registry, ProductionStore(registry.ledger, data), load_production_settings(data),
                         files)
    finally:
        registry.close()


@pytest.fixture(scope="session")
def master_keys() -> MasterKeys:
    return MasterKeys.load(KEYS_PATH)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    def run(*argv: str, stdin: str | None = None) -> CliResult:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        args = build_parser().parse_args([str(part) for part in argv])
        code = int(args.handler(args) or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# -- real PC/SC ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def pcscd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscDaemon]:
    daemon = PcscDaemon(tmp_path_factory.mktemp("pcscd"), entries=1, name="citycard production test")
    try:
        daemon.start()
    except PcscdError as exc:
        pytest.fail(f"cannot start pcscd for the PC/SC test: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()

