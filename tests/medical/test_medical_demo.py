"""The medical act of the demo runs end to end (server, plugin, PC/SC card) and says what it promises."""

from __future__ import annotations

import pytest

from citycard.medical_demo import run_medical_demo


@pytest.mark.pcsc
def test_medical_demo(tmp_path):
    lines: list[str] = []
    run_medical_demo(tmp_path / "demo", lines.append)
    text = "\n".join(lines)
    assert "refused, MEDICAL_IMPORT_REFUSED" in text
    assert "total 184.55 = pooled fund 0.00 + personal account 156.55 + insured 28.00 (e-purse 28.00, cash 0.00)" \
        in text
    assert "the chip's e-purse now holds 22.00" in text
    assert "pooled fund holds 3444.00" in text
    assert "total 5500.00 = pooled fund 3370.20 + personal account 0.00 + insured 2129.80 (e-purse 0.00, cash " \
           "2129.80)" in text
    assert "accumulated pension 5760.00, credited to the medical account 480.00" in text
    assert "total 184.55 = 北京市 fund 95.76 (70 % of the covered part, through the clearing account) + insured " \
           "88.79" in text
    assert "北京市 owes 95.76; the clearing account on the ledger: 95.76 in debit; reconciled" in text
    assert "refused, MEDICAL_CARD_REFUSED" in text
    assert "balance before the loss 323.45; with the new card a purchase of 18.80 leaves 304.65" in text
    assert "370102198503120038" not in text  # ID numbers only masked
    assert "server stopped (exit code 0)" in text
