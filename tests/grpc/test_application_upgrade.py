"""A built-in application whose newer manifest names more accounts gets them opened on its existing registration
(what `citycard serve` does at start), and nothing else about the registration changes."""

from __future__ import annotations

import pytest
from citycard.core.records import AccountKind, LedgerId
from citycard.core.registry import Registry

from citycard.server import applications
from citycard.server.auth import OPERATOR, Principal
from citycard.server.errors import FieldError
from citycard.v1 import applications_pb2

OPERATOR_PRINCIPAL = Principal(OPERATOR, "citycard-serve")


def manifest(*names: str) -> applications_pb2.Manifest:
    return applications_pb2.Manifest(
        name="transit", aid="A000000632010105", ledgers=[LedgerId.PURSE], transfer_codes=[11, 4],
        accounts=[applications_pb2.AccountSpec(name=name, ledger=LedgerId.PURSE, kind=AccountKind.OPERATOR_SETTLEMENT)
                  for name in names])


@pytest.fixture
def registry(tmp_path):
    registry = Registry.open(tmp_path / "data")
    yield registry
    registry.close()


def test_new_accounts_are_opened_and_old_ones_kept(registry: Registry) -> None:
    first, _ = applications.register(registry, manifest("fares"), OPERATOR_PRINCIPAL, tls=False)
    upgraded, added = applications.add_new_accounts(registry, "transit",
                                                    manifest("operator_citybus", "operator_metro"), OPERATOR_PRINCIPAL)
    assert added == ["operator_citybus", "operator_metro"]
    assert [name for name, _ in upgraded.accounts] == ["fares", "operator_citybus", "operator_metro"]
    assert upgraded.accounts[0] == first.accounts[0] and upgraded.token_sha256 == first.token_sha256
    for _, account_id in upgraded.accounts:
        account = registry.ledger.account(account_id)
        assert account is not None and account["ledger"] == LedgerId.PURSE
    stored = applications.load_applications(registry)[0]
    assert [name for name, _ in stored.accounts] == ["fares", "operator_citybus", "operator_metro"]
    assert [spec.name for spec in applications_pb2.Manifest.FromString(stored.manifest).accounts] == [
        "fares", "operator_citybus", "operator_metro"]
    again, added_again = applications.add_new_accounts(registry, "transit", manifest("operator_metro"),
                                                       OPERATOR_PRINCIPAL)
    assert added_again == [] and again.accounts == upgraded.accounts


def test_a_bad_new_account_changes_nothing(registry: Registry) -> None:
    applications.register(registry, manifest("fares"), OPERATOR_PRINCIPAL, tls=False)
    with pytest.raises(FieldError) as refused:
        applications.add_new_accounts(registry, "transit", manifest("Bad-Name"), OPERATOR_PRINCIPAL)
    assert "name" in refused.value.field
    assert [name for name, _ in applications.load_applications(registry)[0].accounts] == ["fares"]
