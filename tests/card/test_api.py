"""The facade of citycard.card: its exported names are pinned, and the chip never imports the back office."""

from __future__ import annotations

import ast
from pathlib import Path

import citycard.card

CARD_DIR = Path(citycard.card.__file__).parent

EXPECTED_ALL = {
    "VirtualCard", "ATR", "CardImage", "FileStore", "MemoryStore", "CardStateError", "personalize",
    "profile_from_json", "CardProfile", "SAMPLE_PROFILE", "CardIdentity", "Holder", "HolderDataError", "SSSE_AID",
    "PURSE_AID", "ED", "EP", "TxType",
    "MasterKeys", "KeyUsage", "KeyFileError", "SoftSam", "PurchaseSam", "IssuerHost", "SamError", "SamMacError",
    "PurchaseTacFields", "LoadTacFields", "verify_tac",
    "VpcdLink", "VPCD_DEFAULT_PORT", "PcscDaemon", "PcscdError", "VirtualReader",
    "Transport", "PcscTransport", "MemoryTransport", "TransportError", "CardRemoved", "CardChannel", "Apdu",
    "ApduEvent", "SW", "StatusWordError", "Terminal", "HolderData", "PurchaseReceipt", "LoadReceipt",
    "PendingPurchase", "PurchaseInterrupted", "RecoveryError",
    "run_card_demo", "format_fen",
}


def test_all_is_pinned() -> None:
    assert set(citycard.card.__all__) == EXPECTED_ALL
    assert len(citycard.card.__all__) == len(EXPECTED_ALL), "duplicate names in __all__"


def test_every_exported_name_exists() -> None:
    for name in citycard.card.__all__:
        assert hasattr(citycard.card, name), name


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_card_never_imports_core() -> None:
    offenders = {}
    for path in CARD_DIR.glob("*.py"):
        bad = [n for n in _imports(path) if n == "citycard" or n.startswith(("citycard.core", "..core", "citycard.apps"))]
        if bad:
            offenders[path.name] = bad
    assert offenders == {}
