"""`citycard card virtual`: argument wiring, card creation, and clear errors for bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from citycard.card import EP, VirtualCard, cli
from citycard.card.cli import main, register
from citycard.card.personalize import SAMPLE_PROFILE

from .helpers import TEST_KEYS_PATH


def test_register_adds_virtual_to_a_card_command() -> None:
    parser = argparse.ArgumentParser(prog="citycard")
    card = parser.add_subparsers(dest="group").add_parser("card")
    register(card.add_subparsers(dest="command"))
    args = parser.parse_args(["card", "virtual", "--state", "x.json", "--reader-port", "0x8C7C"])
    assert args.reader_port == 0x8C7C and args.state == Path("x.json") and callable(args.handler)


def test_create_only_writes_a_usable_card(tmp_path: Path) -> None:
    state = tmp_path / "card.json"
    assert main(["virtual", "--state", str(state), "--new", "--keys", str(TEST_KEYS_PATH), "--create-only"]) == 0
    card = VirtualCard.open(state)
    assert card.image.purse.balances[EP] == 0


def test_profile_json_is_used(tmp_path: Path) -> None:
    profile = json.loads(json.dumps(SAMPLE_PROFILE))
    profile["purse"]["balance_max_fen"] = 50_000
    (tmp_path / "p.json").write_text(json.dumps(profile, ensure_ascii=False), encoding="utf-8")
    state = tmp_path / "card.json"
    assert main(["virtual", "--state", str(state), "--new", "--keys", str(TEST_KEYS_PATH), "--profile-json",
                 str(tmp_path / "p.json"), "--create-only"]) == 0
    assert VirtualCard.open(state).image.purse.balance_max_fen == 50_000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--new", "--create-only"], "CITYCARD_CARD_KEYS"),  # no key file anywhere
        (["--create-only"], "--create-only needs --new"),
        ([], "cannot read"),  # no such state file
    ],
)
def test_bad_input_exits_2_with_a_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str) -> None:
    monkeypatch.delenv("CITYCARD_CARD_KEYS", raising=False)
    assert main(["virtual", "--state", str(tmp_path / "none.json"), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["holder"].update(ssn="330302198503070012"), "ssn: check character"),
        (lambda p: p["ssse"].update(card_number="A1"), "card_number"),
        (lambda p: p["purse"].update(app_serial="3303"), "purse.app_serial"),
        (lambda p: p.update(initial_pin="12"), "initial_pin"),
        (lambda p: p["holder"].update(birth_date="1985-02-30"), "birth_date"),
        (lambda p: p.pop("holder"), "'holder'"),
    ],
)
def test_bad_profile_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], change, message: str) -> None:
    profile = json.loads(json.dumps(SAMPLE_PROFILE))
    change(profile)
    (tmp_path / "p.json").write_text(json.dumps(profile), encoding="utf-8")
    state = tmp_path / "card.json"
    assert main(["virtual", "--state", str(state), "--new", "--keys", str(TEST_KEYS_PATH), "--profile-json",
                 str(tmp_path / "p.json"), "--create-only"]) == 2
    assert message in capsys.readouterr().err
    assert not state.exists()


def test_new_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "card.json"
    argv = ["virtual", "--state", str(state), "--new", "--keys", str(TEST_KEYS_PATH), "--create-only"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err


def test_bad_port_is_an_argument_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["virtual", "--state", "x", "--reader-port", "70000"])
    assert exited.value.code == 2


@pytest.mark.parametrize(("flag", "fsync"), [([], False), (["--no-fsync"], False), (["--fsync"], True)])
def test_fsync_is_off_unless_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str],
                                       fsync: bool) -> None:
    state = tmp_path / "card.json"
    assert main(["virtual", "--state", str(state), "--new", "--keys", str(TEST_KEYS_PATH), "--create-only"]) == 0
    served: list[VirtualCard] = []

    class NoReader:  # stands in for VpcdLink: records the card instead of serving it
        def __init__(self, card: VirtualCard, *args: object) -> None:
            served.append(card)

        def serve_until(self, stop: object) -> None:
            pass

    monkeypatch.setattr(cli, "VpcdLink", NoReader)
    assert main(["virtual", "--state", str(state), *flag]) == 0
    assert served[0].store.fsync is fsync
