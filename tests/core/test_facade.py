"""The public names of citycard.core are a contract: pinned here."""

import citycard.core as core


def test_core_facade_names():
    assert sorted(core.__all__) == sorted([
        "AccountFlags", "AccountKind", "AccountResult", "Balance", "BatchResult", "ChangeAction", "ChangeResult",
        "CorruptionError", "Ledger", "LedgerError", "LedgerIOError", "LedgerId", "LedgerInputError", "MapFullError",
        "Registry", "RegistryError", "TickReport", "TransferCode", "TransferFlags", "TransferResult", "accounts_array",
        "changes_array", "now", "now_ns", "tick", "today", "transfers_array"])
    for name in core.__all__:
        assert getattr(core, name) is not None, name


def test_only_the_facade_imports_the_compiled_core():
    from pathlib import Path

    root = Path(core.__file__).resolve().parents[1]
    importers = [path.relative_to(root).as_posix() for folder in ("core", "card", "apps", "citycard")
                 for path in (root / folder).rglob("*.py") if "_ledger" in path.read_text(encoding="utf-8")
                 and "import _ledger" in path.read_text(encoding="utf-8")]
    assert importers == ["core/ledger.py"]
