"""The versioned denylist: membership follows the card's state, deltas since a version, and one
transaction with the state change."""

import pytest
from citycard.core import denylist
from citycard.core.ledger import changes_array
from citycard.core.lifecycle import CardState
from citycard.core.records import ChangeAction
from citycard.core.registry_records import ErrorCode, RegistryError


class Tables:
    """The table API of the ledger, in a dict: enough for the denylist's own functions."""

    def __init__(self):
        self.rows = {}

    def get(self, table, key):
        return self.rows.get((table, key))

    def put(self, table, key, value):
        if value is None:
            self.rows.pop((table, key), None)
        else:
            self.rows[(table, key)] = value

    def scan(self, table, start=b"", stop=None, limit=-1):
        rows = sorted((key, value) for (name, key), value in self.rows.items()
                      if name == table and key >= start and (stop is None or key < stop))
        return rows if limit < 0 else rows[:limit]


def change(tables, card, state, kit):
    return denylist.stage_state(tables, card_number=card, card_id_code="C" * 32, state=CardState(state),
                                at=kit.at(2025, 9, 30))


def test_membership_follows_the_state_and_versions_count_membership_changes(kit):
    tables = Tables()
    assert denylist.current_version(tables) == 0
    assert change(tables, "A00000001", "active", kit) is None
    assert change(tables, "A00000001", "stopped", kit) == 1
    assert change(tables, "A00000002", "frozen", kit) == 2
    assert change(tables, "A00000002", "replaced", kit) is None  # still refused: same version
    assert [entry.state for entry in denylist.entries(tables)] == ["stopped", "replaced"]
    assert change(tables, "A00000001", "active", kit) == 3
    assert [entry.card_number for entry in denylist.entries(tables)] == ["A00000002"]


def test_a_delta_holds_what_was_added_and_removed_since_a_version(kit):
    tables = Tables()
    change(tables, "A00000001", "stopped", kit)  # v1
    change(tables, "A00000002", "stopped", kit)  # v2
    change(tables, "A00000001", "active", kit)  # v3: A1 leaves
    change(tables, "A00000003", "stopped", kit)  # v4
    change(tables, "A00000003", "active", kit)  # v5: A3 came and went
    change(tables, "A00000004", "cancelled", kit)  # v6
    change(tables, "A00000002", "active", kit)  # v7
    change(tables, "A00000002", "stopped", kit)  # v8: A2 left and came back
    delta = denylist.delta(tables, 2)
    assert delta.version == 8
    assert [entry.card_number for entry in delta.added] == ["A00000004"]
    assert delta.removed == ("A00000001",)  # A2 was listed at v2 and is listed now: no change for a terminal
    assert [entry.card_number for entry in denylist.delta(tables, 0).added] == ["A00000002", "A00000004"]
    assert denylist.delta(tables, 8).added == () and denylist.delta(tables, 8).removed == ()
    assert [entry.card_number for entry in denylist.delta(tables, 7).added] == ["A00000002"]


@pytest.mark.parametrize("since", [-1, 9, True, "3"])
def test_a_version_the_list_never_had_is_refused(kit, since):
    tables = Tables()
    for number in range(1, 9):
        change(tables, f"A0000000{number}", "stopped", kit)
    with pytest.raises(RegistryError) as caught:
        denylist.delta(tables, since)
    assert caught.value.field == "since" and "current version is 8" in str(caught.value)


def test_the_registry_keeps_the_denylist_with_every_state_change(kit):
    registry = kit.open()
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1))
    card = registry.issue_card(holder, actor="op", at=kit.at(2025, 9, 1, 9)).card_number
    assert registry.denylist_version() == 0
    registry.report_loss_phone(id_number=holder, name="张三", gender="male", employer=kit.UNIT, actor="op",
                               at=kit.at(2025, 9, 30, 21))
    assert registry.denylist_version() == 1
    registry.restore(card, reason="found it", actor="op", at=kit.at(2025, 10, 1))
    assert registry.denylist_delta(1).removed == (card,)
    registry.report_loss_written(card, holder_id=holder, holder_name="张三", actor="op", at=kit.at(2025, 10, 2))
    _, new = registry.replace(card, actor="op", at=kit.at(2025, 10, 3))
    delta = registry.denylist_delta(2)
    assert [(entry.card_number, entry.state) for entry in delta.added] == [(card, "replaced")]
    assert new.card_number not in [entry.card_number for entry in registry.denylist_delta(0).added]
    audit_versions = [entry.details.get("denylist_version") for entry in registry.audit_entries()]
    assert [version for version in audit_versions if version] == [1, 2, 3]


def test_when_the_ledger_refuses_the_batch_no_state_denylist_or_audit_change_is_kept(kit):
    registry = kit.open()
    holder = kit.citizen_id()
    kit.add_person(registry, holder, at=kit.at(2025, 9, 1))
    card = registry.issue_card(holder, actor="op", at=kit.at(2025, 9, 1, 9)).card_number
    # A closed medical account cannot be frozen: the written report's batch must fail as a whole.
    medical = registry.person(holder).medical_account_id
    assert registry.ledger.execute(changes=changes_array([(medical, ChangeAction.CLOSE)])).ok
    before = kit.snapshot(registry)
    with pytest.raises(RegistryError) as caught:
        registry.report_loss_written(card, holder_id=holder, holder_name="张三", actor="op", at=kit.at(2025, 9, 2))
    assert caught.value.code is ErrorCode.ABORTED and "ACCOUNT_CLOSED" in str(caught.value)
    assert kit.snapshot(registry) == before
    assert registry.card(card).state is CardState.ACTIVE and registry.denylist_version() == 0
