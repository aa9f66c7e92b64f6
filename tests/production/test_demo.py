"""The production act of ``citycard demo`` runs on a fresh data directory and tells the whole story."""

from __future__ import annotations

from pathlib import Path

from citycard.apps.production import ProductionStore, RowState
from citycard.core.registry import Registry

from citycard.production_demo import run_production_demo


def test_the_demo_issues_a_batch_to_activated_cards(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CITYCARD_NOW", "2025-09-30T10:00:00+08:00")
    lines: list[str] = []
    run_production_demo(tmp_path / "data", lines.append)
    text = "\n".join(lines)
    assert "rows rejected" in text and "nothing changed" in text and "refused" in text
    assert "mismatch not registered" in text and "activated at" in text and "Audit log: intact" in text
    with Registry.open(tmp_path / "data") as registry:
        store = ProductionStore(registry.ledger, tmp_path / "data")
        [batch] = store.batches()
        states = [row.state for row in store.rows(batch.batch_id)]
        assert states.count(RowState.ACTIVATED) == 2 and RowState.REJECTED in states
        activated = [row for row in store.rows(batch.batch_id) if row.state is RowState.ACTIVATED]
        assert all(registry.card(row.card_number).state.value == "active" for row in activated)
    for line in lines:  # ID numbers only masked
        assert not any(len(word) == 18 and word[:17].isdigit() for word in line.replace("(", " ").split())
