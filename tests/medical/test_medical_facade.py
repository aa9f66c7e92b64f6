"""The medical application's exported names, pinned; its manifest: MEDICAL, PURSE for the e-purse share,
and the clearing account for out-of-city treatment."""

from __future__ import annotations

from citycard.apps import medical
from citycard.core.records import LedgerId, TransferCode


def test_exported_names():
    assert sorted(medical.__all__) == ["AID", "ENV_DIR", "ENV_LISTEN", "MedicalPlugin"]


def test_manifest_is_medical_only():
    manifest = medical.MedicalPlugin().manifest()
    assert list(manifest.ledgers) == [LedgerId.MEDICAL, LedgerId.PURSE]
    assert sorted(manifest.transfer_codes) == sorted([TransferCode.CONTRIBUTION, TransferCode.SETTLEMENT,
                                                      TransferCode.POOLED_FUND_PAYMENT, TransferCode.REFUND,
                                                      TransferCode.PURCHASE])
    assert [(account.name, account.ledger) for account in manifest.accounts] == [
        ("individual_fund", LedgerId.MEDICAL), ("pooled_fund", LedgerId.MEDICAL), ("institutions", LedgerId.MEDICAL),
        ("institutions_purse", LedgerId.PURSE), ("clearing", LedgerId.MEDICAL)]
