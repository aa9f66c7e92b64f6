"""Anti-tearing: one atomic write per state-changing command (and none for the others), a failed write
changes nothing, a torn or killed write reopens as the state before, the journal replays to exactly the
card's memory, fsync only when asked; and a state file is untrusted input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
from citycard.card import (
    EP,
    CardStateError,
    FileStore,
    IssuerHost,
    MasterKeys,
    VirtualCard,
    personalize,
    profile_from_json,
)
from citycard.card import cos as cos_module
from citycard.card import purse as purse_module
from citycard.card import state as state_module
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import DETAIL_SFI, PURSE_AID
from citycard.card.ssse import SSSE_AID
from citycard.card.state import CardImage, apply_changes, apply_pushes
from citycard.card.sw import MemoryFailure

from .helpers import PIN, TEST_KEYS_PATH, make_terminal, send

KILL_ROUNDS = 3
LOAD_FEN = 100_000


@pytest.fixture(params=["orjson", "stdlib"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each JSON encoder a card can write its journal with (orjson when installed)."""
    if request.param == "orjson":
        assert state_module.orjson is not None, "orjson is a dependency of citycard.card"
        monkeypatch.setattr(state_module, "json_bytes", state_module.json_bytes_orjson)
    else:
        monkeypatch.setattr(state_module, "json_bytes", state_module.json_bytes_stdlib)
    return request.param


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


def test_both_encoders_write_the_same_journal(tmp_path: Path, master_keys: MasterKeys) -> None:
    """orjson is only a faster way to write the same bytes: a whole image and a purchase's change
    record come out identical from either encoder, and read back as the document that went in."""
    card = VirtualCard(personalize(profile_from_json(SAMPLE_PROFILE), master_keys), state_module.MemoryStore())
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    for _ in range(12):  # a full proof list and a detail file that has wrapped
        terminal.purchase(100)
    purse_df = next(df for df in card.image.mf.walk() if df.application == "purse")
    changes = dict(card.image.change(part) for part in (card.purse, purse_df.ef_by_sfi(DETAIL_SFI)))
    purchase_record = json.loads(bytes(card.store.journal).rsplit(b"\n", 2)[1][9:])
    assert sorted(purchase_record) == [state_module.PUSH, state_module.REPLACE]
    for document in (card.image.to_json(), {state_module.REPLACE: changes}, purchase_record):
        fast, plain = state_module.json_bytes_orjson(document), state_module.json_bytes_stdlib(document)
        assert fast == plain
        assert json.loads(fast) == document and b"\n" not in fast


def test_create_refuses_to_overwrite(state_path: Path, master_keys: MasterKeys) -> None:
    with pytest.raises(CardStateError, match="exists"):
        FileStore(state_path).create(personalize(profile_from_json(SAMPLE_PROFILE), master_keys))


def test_state_file_is_private(state_path: Path) -> None:
    assert state_path.stat().st_mode & 0o077 == 0  # it holds the chip's keys


@pytest.mark.parametrize("failure", ["sync", "short write", "compaction"])
def test_failed_write_answers_6581_and_changes_nothing(state_path: Path, master_keys: MasterKeys,
                                                       monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    card = VirtualCard.open(state_path, fsync=failure == "sync")
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


def test_a_torn_last_record_is_the_state_before(encoder: str, state_path: Path, master_keys: MasterKeys) -> None:
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


def test_damage_before_the_last_record_is_refused(encoder: str, state_path: Path, master_keys: MasterKeys) -> None:
    terminal = make_terminal(VirtualCard.open(state_path), master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    lines = state_path.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"balances":{"1":0', b'"balances":{"1":9', 1)
    state_path.write_bytes(b"\n".join(lines))
    with pytest.raises(CardStateError, match="damaged record at byte 0"):
        VirtualCard.open(state_path)


def test_the_journal_is_compacted(state_path: Path, master_keys: MasterKeys,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 8 * 1024
    monkeypatch.setattr(state_module, "JOURNAL_COMPACT_BYTES", limit)
    terminal = make_terminal(VirtualCard.open(state_path), master_keys)
    terminal.verify_pin(PIN)
    terminal.load(50_000)
    for _ in range(120):  # ~0.22 KB each: several compactions
        terminal.purchase(1)
        assert state_path.stat().st_size <= limit
    first = json.loads(state_path.read_bytes().split(b"\n", 1)[0][9:])
    assert first["format"] == state_module.STATE_FORMAT, "a compacted journal starts with a whole image"
    assert first["purse"]["offline_counters"]["2"] > 0, "and it is not the personalisation record"
    assert VirtualCard.open(state_path).image.purse.balances[EP] == 50_000 - 120


def test_stale_temporary_files_are_removed_by_the_writer(state_path: Path, master_keys: MasterKeys) -> None:
    stale = state_path.parent / f".{state_path.name}.abc123.tmp"
    stale.write_bytes(b'{"half": ')
    card = VirtualCard.open(state_path)
    assert stale.exists(), "reading alone changes nothing on disk"
    make_terminal(card, master_keys).verify_pin(PIN)  # the first write
    assert not stale.exists()


SELECT_PURSE = "00A4040009" + PURSE_AID.hex()
SELECT_SSSE = "00A404000F" + SSSE_AID.hex()


class _DiskCalls:
    """Counts write() and fdatasync() calls on the card's journal while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, journal: Path) -> None:
        self.writes: list[bytes] = []
        self.syncs = 0
        real_write, real_sync = os.write, os.fdatasync

        def write(fd: int, data: bytes) -> int:
            if os.path.realpath(f"/proc/self/fd/{fd}") == str(journal.resolve()):
                self.writes.append(bytes(data))
            return real_write(fd, data)

        def sync(fd: int) -> None:
            self.syncs += 1
            real_sync(fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fdatasync", sync)


def test_commands_that_change_nothing_never_write(state_path: Path, master_keys: MasterKeys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    card = VirtualCard.open(state_path, fsync=True)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    sale = terminal.purchase(100)
    on_disk = state_path.read_bytes()
    calls = _DiskCalls(monkeypatch, state_path)
    saves_before = len(calls.writes)
    read_only = [
        SELECT_SSSE, "00A4020002EF05", "00B2010400", "00A4020002EF06", "00B2080000",
        SELECT_PURSE, "00B0950000", "00B0960000", "00B2011C00", "805C000204", "805C000104",
        "805001020B0100000064001122334455 0F",  # INITIALIZE FOR PURCHASE: a session in RAM only
        "805A0006020001 08",  # GET TRANSACTION PROVE of the purchase
        "0084000008", "0088000108" + "00" * 8, "0020000000",  # challenge, internal auth, PIN status
        "805401000F" + "00" * 4 + "20250115120000" + "00" * 4 + "08",  # a DEBIT that is refused: 69 85
        "00A40000023F00",
    ]
    answers = [send(card, apdu) for apdu in read_only]
    assert answers[12][:16] == (sale.mac2 + sale.tac).hex().upper()
    assert answers[-2] == "6985"
    assert calls.writes[saves_before:] == [] and calls.syncs == 0
    assert state_path.read_bytes() == on_disk


def test_a_purchase_is_one_write_of_what_changed(encoder: str, state_path: Path, master_keys: MasterKeys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    card = VirtualCard.open(state_path)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    calls = _DiskCalls(monkeypatch, state_path)
    terminal.purchase(100)
    assert len(calls.writes) == 1 and calls.syncs == 0  # default: atomic, not synced
    record = calls.writes[0]
    assert record.endswith(b"\n") and int(record[:8], 16) == zlib.crc32(record[9:-1])
    changes = json.loads(record[9:])
    purse_df = next(i for i, df in enumerate(card.image.mf.dfs) if df.application == "purse")
    detail_index = next(i for i, ef in enumerate(card.image.mf.dfs[purse_df].efs) if ef.sfi == DETAIL_SFI)
    assert changes["replace"] == {"/purse/balances/2": 4_900, "/purse/offline_counters/2": 1}
    sale = card.image.purse.proofs[0]
    assert changes["push"] == {
        "/purse/proofs": [[sale.tx_type, 1, sale.mac.hex(), sale.tac.hex()], purse_module.PROOFS_KEPT],
        f"/mf/dfs/{purse_df}/efs/{detail_index}/records": [
            card.image.mf.dfs[purse_df].efs[detail_index].records[0].hex(), purse_module.DETAIL_RECORDS],
    }
    assert len(record) < 300, "a purchase writes its balance, counter, proof and record, not the whole purse"
    assert FileStore(state_path).load().to_bytes() == card.image.to_bytes()


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_flag(state_path: Path, master_keys: MasterKeys, monkeypatch: pytest.MonkeyPatch,
                    fsync: bool) -> None:
    card = VirtualCard.open(state_path, fsync=fsync)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)  # two writes: the try is spent, then given back
    terminal.load(5_000)
    calls = _DiskCalls(monkeypatch, state_path)
    terminal.purchase(100)  # SELECT and INITIALIZE write nothing, DEBIT writes once
    terminal.balance()
    assert (len(calls.writes), calls.syncs) == (1, 1 if fsync else 0)


def test_compaction_and_creation_always_sync(tmp_path: Path, master_keys: MasterKeys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Even without --fsync: they replace the only copy of the card, so the new file is synced first."""
    synced: list[str] = []
    real_fsync = os.fsync
    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "card.json"
    FileStore(path).create(personalize(profile_from_json(SAMPLE_PROFILE), master_keys))
    assert len(synced) == 1
    card = VirtualCard.open(path)
    monkeypatch.setattr(state_module, "JOURNAL_COMPACT_BYTES", 0)
    make_terminal(card, master_keys).verify_pin(PIN)
    assert len(synced) == 3 and all(".tmp" in name for name in synced)  # one per rewrite, not the directory


def _external_auth(card: VirtualCard, host: IssuerHost, application: str, serial: bytes, *,
                   forge: bool) -> str:
    challenge = bytes.fromhex(send(card, "0084000008")[:-4])
    cryptogram = host.external_auth_cryptogram(application, serial, challenge)
    return send(card, "0082000108" + (bytes([cryptogram[0] ^ forge]) + cryptogram[1:]).hex())


def test_every_state_changing_command_reopens_as_in_memory(state_path: Path, master_keys: MasterKeys) -> None:
    """Each command's change record, replayed on the whole image, gives exactly what the card holds."""
    card = VirtualCard.open(state_path)
    host = IssuerHost(master_keys)
    terminal = make_terminal(card, master_keys)
    serial = bytes.fromhex(SAMPLE_PROFILE["purse"]["app_serial"])
    reload_pin = "805E000007" + "123456" + host.pin_reload_mac("purse", serial, bytes.fromhex("123456")).hex()
    steps = [
        lambda: send(card, "0020000003999999"),  # wrong PIN: a try spent
        lambda: send(card, "0020000003" + PIN),  # right PIN: tries back
        lambda: send(card, "805E010007" + PIN + "FF" + "654321"),  # CHANGE PIN
        lambda: send(card, SELECT_PURSE),
        lambda: send(card, reload_pin),  # RELOAD PIN: back to 123456
        lambda: terminal.verify_pin(PIN),
        lambda: terminal.load(5_000),
        lambda: terminal.purchase(100),
        lambda: terminal.composite_purchase(300, bytes((0x02, 46)) + bytes(range(46))),
        lambda: _external_auth(card, host, "purse", serial, forge=True),  # a key try spent
        lambda: _external_auth(card, host, "purse", serial, forge=False),
        lambda: send(card, "00D6951C02ABCD"),  # UPDATE BINARY 0015 after authentication
    ]
    for number, step in enumerate(steps):
        writes_before = state_path.stat().st_size
        step()
        assert state_path.stat().st_size > writes_before or number == 3, f"step {number} wrote nothing"
        assert FileStore(state_path).load().to_bytes() == card.image.to_bytes(), f"step {number}"
    assert card.image.purse.balances[EP] == 4_600


def _fault_in_a_debit(card: VirtualCard, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DEBIT whose handler leaves half a transaction in memory, then fails with a bug: 6F 00."""

    def faulty_debit(card: VirtualCard, command: object, pending: object) -> bytes:
        card.purse.balances[EP] = 1
        card.purse.proofs.clear()
        raise RuntimeError("bug")

    monkeypatch.setitem(purse_module.HANDLERS, 0x54, faulty_debit)
    send(card, SELECT_PURSE)
    send(card, "805001020B0100000064001122334455 0F")
    assert send(card, "805401000F" + "00" * 15 + "08") == "6F00"


def test_an_internal_fault_rolls_back_to_what_is_on_disk(state_path: Path, master_keys: MasterKeys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    card = VirtualCard.open(state_path)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    terminal.purchase(100)  # the rollback point is now the start image plus these changes
    _fault_in_a_debit(card, monkeypatch)
    assert card.image.to_bytes() == FileStore(state_path).load().to_bytes()
    assert card.image.purse.balances[EP] == 4_900 and len(card.image.purse.proofs) == 2
    monkeypatch.undo()
    assert make_terminal(card, master_keys).purchase(100).balance_after_fen == 4_800


def _journal_with(state_path: Path, *records: object) -> None:
    with open(state_path, "ab") as journal:
        for record in records:
            payload = json.dumps(record).encode()
            journal.write(f"{zlib.crc32(payload):08x} ".encode() + payload + b"\n")


def test_a_change_that_names_no_part_is_refused(state_path: Path) -> None:
    _journal_with(state_path, {"replace": {"/mf/dfs/7/efs/0/records": []}})
    with pytest.raises(CardStateError, match="record at byte .*names no part"):
        FileStore(state_path).load()


def test_replayed_changes_are_checked_like_a_whole_image(state_path: Path) -> None:
    purse = json.loads(state_path.read_bytes()[9:])["purse"]
    purse["balances"]["2"] = purse["balance_max_fen"] + 1
    _journal_with(state_path, {"replace": {"/purse": purse}})
    with pytest.raises(CardStateError, match="purse: a stored balance exceeds"):
        FileStore(state_path).load()


def test_changes_need_a_whole_image_before_them(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    _journal_with(path, {"replace": {"/pin": {}}})
    with pytest.raises(CardStateError, match="before any whole card state"):
        FileStore(path).load()


def test_apply_changes_replaces_and_never_adds() -> None:
    doc = {"a": {"b": [1, 2]}, "c": 3}
    apply_changes(doc, {"/a/b/1": 20, "/c": {"d": 4}})
    assert doc == {"a": {"b": [1, 20]}, "c": {"d": 4}}
    for pointer in ("/a/b/2", "/a/x", "/c/d/e", "a", "/a/b/-1"):
        with pytest.raises(ValueError):
            apply_changes(doc, {pointer: 0})
    assert doc == {"a": {"b": [1, 20]}, "c": {"d": 4}}


def test_a_part_from_another_card_cannot_be_committed(master_keys: MasterKeys) -> None:
    one, other = (personalize(profile_from_json(SAMPLE_PROFILE), master_keys) for _ in range(2))
    with pytest.raises(ValueError, match="not a part"):
        one.change(other.pin)
    with pytest.raises(ValueError, match="not a part"):
        one.change(other.mf.dfs[1].efs[0])


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


def test_a_syncing_journal_is_preallocated_and_overwritten_in_place(state_path: Path, master_keys: MasterKeys,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With fsync the file keeps its length (records overwrite zeros): fdatasync then flushes data only."""
    limit = 64 * 1024
    monkeypatch.setattr(state_module, "JOURNAL_COMPACT_BYTES", limit)
    card = VirtualCard.open(state_path, fsync=True)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    assert state_path.stat().st_size == limit
    for amount in range(1, 40):  # past one compaction: the rewritten journal is preallocated again
        terminal.purchase(amount)
        assert state_path.stat().st_size == limit
        assert VirtualCard.open(state_path).image.to_bytes() == card.image.to_bytes()
    raw = state_path.read_bytes()
    whole = len(raw.rstrip(b"\0"))
    assert raw[whole - 1 : whole] == b"\n" and not raw[whole:].strip(b"\0")


def test_a_torn_record_in_preallocated_space_is_the_state_before(state_path: Path, master_keys: MasterKeys) -> None:
    card = VirtualCard.open(state_path, fsync=True)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    before = state_path.read_bytes()
    whole = len(before.rstrip(b"\0"))
    terminal.purchase(100)
    newest = state_path.read_bytes()[whole:].rstrip(b"\0")
    torn = before[:whole] + newest[: len(newest) // 2]
    state_path.write_bytes(torn + bytes(len(before) - len(torn)))  # half a record, then the zeros
    reopened = VirtualCard.open(state_path, fsync=True)
    assert reopened.image.purse.balances[EP] == 5_000
    assert make_terminal(reopened, master_keys).purchase(300).balance_after_fen == 4_700
    assert VirtualCard.open(state_path).image.purse.balances[EP] == 4_700
    default_writer = make_terminal(VirtualCard.open(state_path), master_keys)  # a writer without fsync
    default_writer.purchase(1)
    assert not state_path.read_bytes().endswith(b"\0"), "it trims the preallocated zeros"
    assert VirtualCard.open(state_path).image.purse.balances[EP] == 4_699


def test_apply_pushes_puts_in_front_and_keeps() -> None:
    doc = {"a": {"b": [1, 2, 3]}, "c": 3}
    apply_pushes(doc, {"/a/b": [0, 3]})
    assert doc == {"a": {"b": [0, 1, 2]}, "c": 3}
    apply_pushes(doc, {"/a/b": [["x"], 5]})
    assert doc == {"a": {"b": [["x"], 0, 1, 2]}, "c": 3}
    for pointer, push in (("/c", [0, 3]), ("/a/x", [0, 3]), ("/a/b/1", [0, 3]), ("a/b", [0, 3]),
                          ("/a/b", [0, 0]), ("/a/b", [0, 255]), ("/a/b", [0, True]), ("/a/b", [0]),
                          ("/a/b", {"value": 0, "keep": 3})):
        with pytest.raises(ValueError):
            apply_pushes(doc, {pointer: push})
    assert doc == {"a": {"b": [["x"], 0, 1, 2]}, "c": 3}


def test_a_push_that_names_no_list_is_refused(state_path: Path) -> None:
    _journal_with(state_path, {"push": {"/purse/balances": [1, 8]}})
    with pytest.raises(CardStateError, match="record at byte .*names no list"):
        FileStore(state_path).load()


def test_replayed_pushes_are_checked_like_a_whole_image(state_path: Path) -> None:
    detail = next(i for i, ef in enumerate(_purse_df(json.loads(state_path.read_bytes()[9:]))["efs"])
                  if ef["sfi"] == DETAIL_SFI)
    _journal_with(state_path, {"push": {f"/mf/dfs/1/efs/{detail}/records": ["00" * 24, 10]}})
    with pytest.raises(CardStateError, match="mf: EF .* a stored record does not fit"):
        FileStore(state_path).load()


def test_the_rollback_point_moves_and_still_rolls_back_to_disk(state_path: Path, master_keys: MasterKeys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The card keeps the change records since its rollback point; past a bound the point becomes the
    image itself. A fault after that still rolls back to exactly what the journal holds."""
    monkeypatch.setattr(cos_module, "ROLLBACK_RECORDS_BYTES_MAX", 1024)
    card = VirtualCard.open(state_path)
    terminal = make_terminal(card, master_keys)
    terminal.verify_pin(PIN)
    terminal.load(5_000)
    for _ in range(13):  # ~0.2 KB each: the point moves twice
        terminal.purchase(10)
    _fault_in_a_debit(card, monkeypatch)
    assert card.image.to_bytes() == FileStore(state_path).load().to_bytes()
    assert card.image.purse.balances[EP] == 5_000 - 130 and card.image.purse.offline_counters[EP] == 13
