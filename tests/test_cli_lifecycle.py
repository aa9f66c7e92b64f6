"""The operators' contract: the real ``citycard`` command in a subprocess, a temporary --data directory
and CITYCARD_NOW pinning the clock."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chinese_calendar
import pytest
from citycard.core.audit import encode_key
from citycard.core.identity import check_character, unit_check_character
from citycard.core.registry import Registry

from citycard.lifecycle_demo import run_lifecycle_demo

UNIT = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")
HOLDER = "37010219800501123" + check_character("37010219800501123")
MASKED_HOLDER = HOLDER[:6] + "********" + HOLDER[-4:]
AGENT = "37010219820304056" + check_character("37010219820304056")
COMMAND_TIMEOUT_S = 120


def citycard(data, *args, now="2025-09-01T09:00:00", stdin=None):
    script = Path(sys.executable).with_name("citycard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "citycard"]
    env = {**os.environ, "CITYCARD_NOW": now, "CITYCARD_OPERATOR": "op-test"}
    return subprocess.run([*command, *args, "--data", str(data)], input=stdin, capture_output=True, text=True,
                          env=env, timeout=COMMAND_TIMEOUT_S, check=False)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def as_json(result):
    return json.loads(ok(result).stdout)


def refused(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("citycard: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def snapshot(data):
    with Registry.open(data, create=False, write=False) as registry:
        tables = {name: registry.ledger.scan(name) for name in
                  ("persons", "employers", "cards", "card_index", "card_history", "timers", "audit", "meta",
                   "denylist", "denylist_log", "denylist_head", "credentials", "pin_resets")}
        return tables, registry.ledger.totals()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A directory with an employer, a person and an active card, made once through the commands."""
    data = tmp_path_factory.mktemp("base") / "var"
    ok(citycard(data, "employer", "add", UNIT, "--name", "济南示例科技有限公司"))
    ok(citycard(data, "person", "add", "--id-number", HOLDER, "--name", "张三", "--gender", "male", "--birth-date",
                "1980-05-01", "--residence", "济南市历下区", "--household", "济南市", "--employer", UNIT,
                "--status", "employed"))
    card = as_json(citycard(data, "card", "issue", HOLDER, "--json", "--legacy-barcode", "BC0042"))
    assert card["card"]["state"] == "active" and card["card"]["holder"] == MASKED_HOLDER
    return data, card["card"]["card_number"]


@pytest.fixture
def data(base, tmp_path):
    copy = tmp_path / "var"
    shutil.copytree(base[0], copy)
    return copy


@pytest.fixture
def card(base):
    return base[1]


def phone_report(data, now):
    return citycard(data, "card", "report-loss", "--channel", "phone", "--id-number", HOLDER, "--name", "张三",
                    "--gender", "male", "--employer", UNIT, now=now)


def test_a_phone_report_and_the_restore_two_working_days_after_national_day(data, card):
    report = ok(phone_report(data, "2025-09-30T21:15:00"))
    assert f"card {card} is now stopped" in report.stdout
    assert "end of 2025-10-10" in report.stdout
    assert as_json(citycard(data, "lifecycle", "tick", "--json", now="2025-10-10T23:59:00"))["restored"] == []
    restored = as_json(citycard(data, "lifecycle", "tick", "--json", now="2025-10-11T08:00:00"))
    assert [(r["card_number"], r["restored_at"]) for r in restored["restored"]] == [(card, "2025-10-11T00:00:00+08:00")]
    shown = as_json(citycard(data, "card", "show", card, "--json", now="2025-10-11T08:00:00"))
    assert shown["card"]["state"] == "active" and shown["settles_now"] is True
    assert [row["event"] for row in shown["history"]][-2:] == ["report_loss_phone", "auto_restore"]
    delta = as_json(citycard(data, "denylist", "show", "--since", "1", "--json"))
    assert (delta["version"], delta["added"], delta["removed"]) == (2, [], [card])
    assert "audit log OK" in ok(citycard(data, "audit", "verify")).stdout


def test_the_tick_says_when_a_year_is_not_in_the_official_calendar(tmp_path):
    data = tmp_path / "var"
    ok(citycard(data, "employer", "add", UNIT, "--name", "济南示例科技有限公司", now="2027-09-01T09:00"))
    ok(citycard(data, "person", "add", "--id-number", HOLDER, "--name", "张三", "--gender", "male", "--birth-date",
                "1980-05-01", "--residence", "济南市", "--household", "济南市", "--employer", UNIT, "--status",
                "employed", now="2027-09-01T09:00"))
    card = as_json(citycard(data, "card", "issue", HOLDER, "--json", now="2027-09-01T09:00"))["card"]["card_number"]
    warning = f"warning: 2027 is not covered by chinesecalendar {chinese_calendar.__version__}; assuming Monday to Friday"
    report = ok(phone_report(data, "2027-09-30T21:00"))
    assert warning in report.stdout and "end of 2027-10-04" in report.stdout
    tick = ok(citycard(data, "lifecycle", "tick", now="2027-10-05T08:00"))
    assert warning in tick.stdout and "1 restored" in tick.stdout and card in tick.stdout


def test_a_written_report_by_an_agent_and_a_replacement(data, card):
    frozen = as_json(citycard(data, "card", "report-loss", card, "--channel", "written", "--id-number", HOLDER,
                              "--name", "张三", "--agent-id", AGENT, "--agent-name", "张小红", "--json",
                              now="2025-10-09T10:00"))
    assert frozen["card"]["state"] == "frozen"
    assert frozen["card"]["loss_report"]["agent_id"] == AGENT[:6] + "********" + AGENT[-4:]
    assert as_json(citycard(data, "person", "show", HOLDER, "--json"))["medical_account"]["frozen"] is True
    replaced = as_json(citycard(data, "card", "replace", card, "--json", now="2025-10-10T10:00"))
    new_card = replaced["new_card"]["card"]
    assert replaced["old_card"]["card"]["state"] == "replaced" and new_card["state"] == "active"
    assert new_card["replaces"] == card and new_card["card_number"] != card
    person = as_json(citycard(data, "person", "show", HOLDER, "--json"))
    assert person["medical_account"]["frozen"] is False
    assert [c["state"] for c in person["cards"]] == ["replaced", "active"]
    assert as_json(citycard(data, "card", "show", "bc0042", "--json"))["card"]["card_number"] == card


def test_an_online_report_reads_the_password_from_stdin(data, card):
    ok(citycard(data, "person", "set-password", HOLDER, stdin="my self-service pass\n"))
    refused(citycard(data, "card", "report-loss", "--channel", "online", "--id-number", HOLDER,
                     stdin="not my password\n", now="2025-09-30T21:00"), "ID number or password is wrong")
    report = ok(citycard(data, "card", "report-loss", "--channel", "online", "--id-number", HOLDER,
                         stdin="my self-service pass\n", now="2025-09-30T21:00"))
    assert f"card {card} is now stopped" in report.stdout


def test_ids_are_masked_unless_an_operator_unmasks_them(data):
    masked = ok(citycard(data, "person", "show", HOLDER))
    assert MASKED_HOLDER in masked.stdout and HOLDER not in masked.stdout
    unmasked = as_json(citycard(data, "person", "show", HOLDER, "--unmask", "--json"))
    assert unmasked["person"]["id_number"] == HOLDER and unmasked["person"]["date_of_birth"] == "1980-05-01"
    with Registry.open(data, create=False, write=False) as registry:
        last = registry.audit_entries()[-1]
    assert (last.action, last.actor, last.subject) == ("operator.unmask", "op-test", f"person {MASKED_HOLDER}")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("person", "add", "--id-number", HOLDER[:-1] + ("0" if HOLDER[-1] != "0" else "1"), "--name", "李四",
          "--gender", "male", "--birth-date", "1980-05-01", "--residence", "济南", "--household", "济南",
          "--status", "retired"), ("check_character", "370102********")),
        (("person", "add", "--id-number", HOLDER, "--name", "李四", "--gender", "male", "--birth-date", "1980-05-02",
          "--residence", "济南", "--household", "济南", "--status", "retired"), ("date_of_birth", MASKED_HOLDER)),
        (("person", "add", "--id-number", HOLDER, "--name", "张三", "--gender", "male", "--birth-date", "1980-05-01",
          "--residence", "济南", "--household", "济南", "--status", "retired"), ("already registered", MASKED_HOLDER)),
        (("card", "show", "A99999999"), ("card A99999999", "no such card")),
        (("card", "report-loss", "--channel", "phone", "--id-number", HOLDER, "--name", "张三", "--gender", "female",
          "--employer", UNIT), ("identity", "gender", MASKED_HOLDER)),
        (("card", "cancel", "A00000001", "--reason", "death", "--note", "x" * 101), ("note", "at most 100")),
        (("card", "replace", "A00000001"), ("card A00000001", "state", "cannot take replace")),
        (("denylist", "show", "--since", "5"), ("since", "current version is 0")),
    ],
)
def test_bad_input_is_one_clear_line_exit_2_and_changes_nothing(data, args, fragments):
    before = snapshot(data)
    message = refused(citycard(data, *args), *fragments)
    assert HOLDER not in message
    assert snapshot(data) == before


def test_a_read_command_on_an_empty_directory_creates_nothing(tmp_path):
    refused(citycard(tmp_path / "empty", "card", "show", "A00000001"), "there is no registry")
    assert not (tmp_path / "empty").exists()


def test_audit_verify_names_the_tampered_entry(data):
    with Registry.open(data) as registry:
        value = registry.ledger.get("audit", encode_key(3))
        assert registry.ledger.execute(puts=[("audit", encode_key(3), value.replace(b"op-test", b"op-evil"))]).ok
    result = citycard(data, "audit", "verify", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["problems"] == [
        {"seq": 3, "kind": "edited", "message": "its content does not give its hash"}]
    text = citycard(data, "audit", "verify")
    assert "DAMAGED" in text.stdout and "edited" in text.stdout


def test_the_lifecycle_demo_tells_the_story_on_a_fresh_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYCARD_NOW", "2025-09-30T10:00:00")
    lines = []
    run_lifecycle_demo(tmp_path / "var", lines.append)
    story = "\n".join(lines)
    assert "A00000002 lost by phone" in story and "restored at the end of 2025-10-10" in story
    assert "after: A00000002 restored; the card is active again" in story
    assert "frozen and the medical account frozen=True" in story
    assert "balance 1200.00 yuan, frozen=False" in story and "keeps its 100.00 yuan" in story
    assert "adds A00000001 and removes none" in story
    assert "verify OK" in story
