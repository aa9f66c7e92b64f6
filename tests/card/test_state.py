"""Anti-tearing: one atomic write per command, a failed write changes nothing, a killed card process
always reopens consistent; and a state file is untrusted input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from citycard.card import (
    EP,
    CardStateError,
    FileStore,
    MasterKeys,
    VirtualCard,
    personalize,
    profile_from_json,
)
from citycard.card import state as state_module
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.state import CardImage
from citycard.card.sw import MemoryFailure

from .helpers import PIN, TEST_KEYS_PATH, make_terminal

KILL_ROUNDS = 3
LOAD_FEN = 100_000


@pytest.fixture
def state_path(tmp_path: Path, master_keys: MasterKeys) -> Path:
    path = tmp_path / "card.json"
    FileStore(path).create(personalize(profile_from_json(SAMPLE_PROFILE), master_keys))
    return path


def test_state_survives_reopening(state_path: Path, master_keys: MasterKeys) -> None:
    terminal = make_terminal(VirtualCard.open(state_path), master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    terminal.purchase(1_200)
    reopened = VirtualCard.open(state_path)
    assert reopened.image.purse.balances[EP] == 3_800
    assert reopened.image.purse.offline_counters[EP] == 1
    assert reopened.image.to_bytes() == VirtualCard.open(state_path).image.to_bytes()


def test_create_refuses_to_overwrite(state_path: Path, master_keys: MasterKeys) -> None:
    with pytest.raises(CardStateError, match="exists"):
        FileStore(state_path).create(personalize(profile_from_json(SAMPLE_PROFILE), master_keys))


def test_state_file_is_private(state_path: Path) -> None:
    assert state_path.stat().st_mode & 0o077 == 0  # it holds the chip's keys


@pytest.mark.parametrize("failure", ["sync", "short write", "compaction"])
def test_failed_write_answers_6581_and_changes_nothing(state_path: Path, master_keys: MasterKeys,
                                                       monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    card = VirtualCard.open(state_path)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    on_disk = state_path.read_bytes()
    in_memory = card.image.to_bytes()
    real_write = os.write

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    if failure == "sync":
        monkeypatch.setattr(os, "fdatasync", failing_sync)
    elif failure == "short write":
        monkeypatch.setattr(os, "write", short_write)
    else:
        monkeypatch.setattr(state_module, "JOURNAL_COMPACT_BYTES", 0)  # every save rewrites the file
        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(MemoryFailure):
        terminal.purchase(100)
    monkeypatch.undo()
    assert state_path.read_bytes() == on_disk
    assert card.image.to_bytes() == in_memory
    assert [p.name for p in state_path.parent.iterdir()] == [state_path.name], "temporary file left behind"
    assert terminal.purchase(100).balance_after_fen == 4_900  # and the card works on
    assert VirtualCard.open(state_path).image.purse.balances[EP] == 4_900


def test_a_torn_last_record_is_the_state_before(state_path: Path, master_keys: MasterKeys) -> None:
    card = VirtualCard.open(state_path)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    whole = state_path.read_bytes()
    terminal.purchase(100)
    newest = state_path.read_bytes()[len(whole):]
    for cut in (1, len(newest) // 2, len(newest) - 1):  # the newline never made it
        state_path.write_bytes(whole + newest[:cut])
        assert VirtualCard.open(state_path).image.purse.balances[EP] == 5_000
    state_path.write_bytes(whole + newest[:-10] + b"0" * 9 + b"\n")  # full length, wrong content
    reopened = VirtualCard.open(state_path)
    assert reopened.image.purse.balances[EP] == 5_000
    terminal = make_terminal(reopened, master_keys)
    assert terminal.purchase(300).balance_after_fen == 4_700  # the writer cut the torn line first
    assert VirtualCard.open(state_path).image.purse.balances[EP] == 4_700


def test_damage_before_the_last_record_is_refused(state_path: Path, master_keys: MasterKeys) -> None:
    terminal = make_terminal(VirtualCard.open(state_path), master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    lines = state_path.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"balances":{"1":0', b'"balances":{"1":9', 1)
    state_path.write_bytes(b"\n".join(lines))
    with pytest.raises(CardStateError, match="damaged record at byte 0"):
        VirtualCard.open(state_path)


def test_the_journal_is_compacted(state_path: Path, master_keys: MasterKeys) -> None:
    terminal = make_terminal(VirtualCard.open(state_path), master_keys)
    terminal.verify_pin(PIN)
    terminal.load(50_000)
    for _ in range(60):
        terminal.purchase(1)
    assert state_path.stat().st_size <= state_module.JOURNAL_COMPACT_BYTES
    assert VirtualCard.open(state_path).image.purse.balances[EP] == 50_000 - 60


def test_stale_temporary_files_are_removed_by_the_writer(state_path: Path, master_keys: MasterKeys) -> None:
    stale = state_path.parent / f".{state_path.name}.abc123.tmp"
    stale.write_bytes(b'{"half": ')
    card = VirtualCard.open(state_path)
    assert stale.exists(), "reading alone changes nothing on disk"
    make_terminal(card, master_keys).verify_pin(PIN)  # the first write
    assert not stale.exists()


_KILLED_CHILD = textwrap.dedent(
    """
    import sys
    from citycard.card import MasterKeys, VirtualCard
    from tests.card.helpers import make_terminal
    card = VirtualCard.open(sys.argv[1])
    terminal = make_terminal(card, MasterKeys.load(sys.argv[2]))
    print("ready", flush=True)
    for _ in range(20_000):   # bounded; the parent kills us long before
        terminal.purchase(1)
    """
)


@pytest.mark.slow
def test_a_killed_card_reopens_before_or_after_each_command(state_path: Path, master_keys: MasterKeys) -> None:
    """SIGKILL a process doing purchases at random moments: the file always holds a whole state."""
    terminal = make_terminal(VirtualCard.open(state_path), master_keys)
    terminal.verify_pin(PIN)
    terminal.load(LOAD_FEN)
    repo_root = Path(__file__).resolve().parents[2]
    delays_s = (0.15, 0.35, 0.55)[:KILL_ROUNDS]
    for delay_s in delays_s:
        child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(state_path), str(TEST_KEYS_PATH)],
                                 cwd=repo_root, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay_s)
        child.send_signal(signal.SIGKILL)
        child.wait()
        card = VirtualCard.open(state_path)  # must parse: never a torn file
        purse = card.image.purse
        counter = purse.offline_counters[EP]
        assert counter > 0
        assert purse.balances[EP] == LOAD_FEN - counter  # every committed debit has its counter, no more
        assert purse.proofs[0].counter == counter
        detail = next(df for df in card.image.mf.walk() if df.application == "purse").ef_by_sfi(0x18)
        assert int.from_bytes(detail.records[0][0:2], "big") == counter - 1


def _mutated(state_path: Path, mutate) -> bytes:
    obj = json.loads(state_path.read_bytes().split(b" ", 1)[1])  # the one record of a new card
    mutate(obj)
    return json.dumps(obj).encode()


def _purse_df(obj: dict) -> dict:
    return next(df for df in obj["mf"]["dfs"] if df["application"] == "purse")


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("format", lambda o: o.update(format="other/9"), "format"),
        ("balance", lambda o: o["purse"]["balances"].update({"2": 10**9}), "purse"),
        ("counter", lambda o: o["purse"]["offline_counters"].update({"2": 70000}), "purse"),
        ("pin tries", lambda o: o["pin"].update(tries_left=9), "pin"),
        ("pin value", lambda o: o["pin"].update(value="12AB"), "pin"),
        ("record", lambda o: _purse_df(o)["efs"][3]["records"].append("00" * 24), "mf"),
        ("sfi", lambda o: _purse_df(o)["efs"][0].update(sfi=31), "mf"),
        ("key", lambda o: _purse_df(o)["keys"][0].update(value="00"), "mf"),
        ("missing", lambda o: o.pop("pin"), "pin"),
    ],
)
def test_corrupt_state_is_refused_by_name(state_path: Path, name: str, mutate, message: str) -> None:
    raw = _mutated(state_path, mutate)
    with pytest.raises(CardStateError) as refused:
        CardImage.from_bytes(raw, source="card.json")
    text = str(refused.value)
    assert message in text
    keys_json = json.loads(TEST_KEYS_PATH.read_text())
    for application in ("purse", "ssse"):
        for entry in keys_json[application].values():
            assert entry["key"].lower() not in text.lower()


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_bytes(b"\x00\xff not json")
    with pytest.raises(CardStateError, match="no whole card state record"):
        FileStore(path).load()
    data = b"not json"
    path.write_bytes(f"{__import__('zlib').crc32(data):08x} ".encode() + data + b"\n")
    with pytest.raises(CardStateError, match="not JSON"):
        FileStore(path).load()
    with pytest.raises(CardStateError, match="cannot read"):
        FileStore(tmp_path / "missing.json").load()
