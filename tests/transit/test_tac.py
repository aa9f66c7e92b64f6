"""Offline records' TAC check (apps/bus/tac.py) against the SAM's (card.sam.verify_tac), and the record layout.

Every TAC test runs on the compiled batch check (one thread, and split across two) and on its pure twin; the
records come from hypothesis and from real purchases on a virtual card through the in-memory transport.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from citycard.apps.bus import records as rec
from citycard.apps.bus import tac
from citycard.apps.bus.records import RECORD_DTYPE, FieldProblem, Record
from citycard.card import (
    CardChannel,
    IssuerHost,
    MasterKeys,
    MemoryStore,
    MemoryTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
    profile_from_json,
)
from citycard.card.keys import KeyUsage
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.sam import PurchaseTacFields, compute_tac, verify_tac
from hypothesis import given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parents[1]
TEST_KEYS_PATH = TESTS / "card" / "data" / "test-master-keys.json"
BUS = TESTS.parent / "apps" / "bus"
PIN = SAMPLE_PROFILE["initial_pin"]
TERMINAL_ID = bytes.fromhex("0A0B0C0D0E0F")
GOOD_DATE_TIME = bytes.fromhex("20250301081500")

VERIFIERS = {
    "compiled": lambda keys: tac.CompiledTacVerifier.from_master_keys(keys, threads=1),
    "compiled-2-threads": lambda keys: tac.CompiledTacVerifier.from_master_keys(keys, threads=2),
    "python": lambda keys: tac.PyTacVerifier.from_master_keys(keys),
}


@pytest.fixture(scope="module")
def master_keys() -> MasterKeys:
    return MasterKeys.load(TEST_KEYS_PATH)


@pytest.fixture(scope="module", params=sorted(VERIFIERS))
def verifier(request: pytest.FixtureRequest, master_keys: MasterKeys) -> Iterator[tac.PyTacVerifier]:
    with VERIFIERS[request.param](master_keys) as chosen:
        yield chosen


def signed(master_keys: MasterKeys, record: Record) -> Record:
    return record._replace(tac=compute_tac(master_keys, record.tac_fields()))


def sam_says(master_keys: MasterKeys, records: list[Record]) -> np.ndarray:
    return np.array([verify_tac(master_keys, r.tac_fields(), r.tac) for r in records], dtype=bool)


bcd = st.integers(0, 99).map(lambda n: int(str(n), 16))
records_strategy = st.builds(
    Record,
    app_serial=st.lists(bcd, min_size=10, max_size=10).map(bytes),
    card_counter=st.integers(0, 0xFFFF),
    amount_fen=st.integers(0, 0xFFFF_FFFF),
    tx_type=st.sampled_from(rec.TRANSIT_TX_TYPES),
    terminal_id=st.binary(min_size=6, max_size=6),
    terminal_seq=st.integers(1, 0xFFFF_FFFF),
    date_time=st.datetimes(min_value=dt.datetime(2000, 1, 1)).map(
        lambda t: bytes.fromhex(t.strftime("%Y%m%d%H%M%S"))),
    tac=st.binary(min_size=4, max_size=4),
    balance_after_fen=st.integers(0, 0xFFFF_FFFF),
)


# -- agreement with the SAM -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(batch=st.lists(st.tuples(records_strategy, st.booleans()), min_size=1, max_size=40))
def test_agrees_with_the_sam_on_random_records(verifier: tac.PyTacVerifier, master_keys: MasterKeys,
                                              batch: list[tuple[Record, bool]]) -> None:
    records = [signed(master_keys, r) if sign else r for r, sign in batch]
    expected = sam_says(master_keys, records)
    assert verifier.verify(rec.pack(records)).tolist() == expected.tolist()
    assert [verifier.verify_one(r.pack()) for r in records] == expected.tolist()


def test_a_large_batch_split_across_threads_agrees(master_keys: MasterKeys) -> None:
    rng = np.random.default_rng(8)
    count = 3 * tac.THREAD_SPLIT_MIN + 5
    serials = rng.integers(0, 10, (40, 20))  # 40 cards, so cards repeat within the batch
    records = [Record(bytes.fromhex("".join(map(str, serials[rng.integers(40)]))), 0,
                      int(rng.integers(0, 5_000)), 6, TERMINAL_ID, i + 1, GOOD_DATE_TIME, b"\0" * 4, 0)
               for i in range(count)]
    records = [signed(master_keys, r) if i % 5 else r for i, r in enumerate(records)]
    expected = sam_says(master_keys, records)
    batch = rec.pack(records)
    results = {name: make(master_keys).verify(batch) for name, make in VERIFIERS.items()}
    # A cache of 8 cards for 40: keys evicted (and wiped) and derived again, every answer the same.
    results["compiled, 8 card keys"] = tac.CompiledTacVerifier.from_master_keys(master_keys, threads=2,
                                                                                card_keys_max=8).verify(batch)
    for name, result in results.items():
        assert result.dtype == bool and result.tolist() == expected.tolist(), name
    assert 0 < expected.sum() < count


def test_cards_that_repeat_and_collide_in_a_small_batch(verifier: tac.PyTacVerifier,
                                                        master_keys: MasterKeys) -> None:
    """A batch's card key table has about one slot per record: 20 cards cycling through 24 records share
    32 slots, so cards come back (a kept key) and cards land on a slot another card holds (a replaced one)."""
    serials = [bytes.fromhex(f"3303{n:016d}") for n in range(20)]
    records = [signed(master_keys, Record(serials[i % 20], i, 100 + i, 6, TERMINAL_ID, i + 1, GOOD_DATE_TIME,
                                          b"", 0)) for i in range(24)]
    records[21] = records[21]._replace(tac=records[1].tac)  # card 1 again, another record's TAC
    assert verifier.verify(rec.pack(records)).tolist() == [i != 21 for i in range(24)]


def test_a_non_contiguous_and_a_read_only_batch(verifier: tac.PyTacVerifier, master_keys: MasterKeys) -> None:
    records = [signed(master_keys, Record(bytes(10), n, 100 + n, 6, TERMINAL_ID, n + 1, GOOD_DATE_TIME, b"", 0))
               for n in range(10)]
    batch = rec.pack(records)
    assert verifier.verify(batch[::2]).all()
    read_only = rec.from_packed(rec.to_packed(batch))
    assert not read_only.flags.writeable and verifier.verify(read_only).all()
    assert verifier.verify(batch[:0]).shape == (0,)


# -- real purchases on a virtual card ---------------------------------------------------------------------


def card_terminal(master_keys: MasterKeys, app_serial: str) -> Terminal:
    profile = copy.deepcopy(SAMPLE_PROFILE)
    profile["purse"]["app_serial"] = app_serial
    card = VirtualCard(personalize(profile_from_json(profile), master_keys), MemoryStore())
    terminal = Terminal(CardChannel(MemoryTransport(card)), SoftSam(master_keys, TERMINAL_ID),
                        host=IssuerHost(master_keys))
    terminal.verify_pin(PIN)
    terminal.load(10_000)
    return terminal


def test_purchases_and_composite_purchases_from_virtual_cards_verify(verifier: tac.PyTacVerifier,
                                                                     master_keys: MasterKeys) -> None:
    receipts = []
    for serial in ("33030000000000000001", "33030000000000000002", "99999999990123456789"):
        terminal = card_terminal(master_keys, serial)
        receipts += [terminal.purchase(250), terminal.composite_purchase(0, bytes((0x02, 46)) + bytes(46)),
                     terminal.composite_purchase(400, bytes((0x02, 46)) + bytes(46)), terminal.purchase(1)]
    records = [Record.from_receipt(r) for r in receipts]
    assert all(verify_tac(master_keys, r.tac_fields(), r.tac) for r in receipts)
    batch = rec.pack(records)
    assert rec.validate(batch).problems == []
    assert verifier.verify(batch).all()
    assert [r.card_counter for r in records[:4]] == [0, 1, 2, 3]
    assert [r.tx_type for r in records[:4]] == [6, 9, 9, 6]
    assert records[2].balance_after_fen == 10_000 - 250 - 400


FORGERIES = {
    # field: (byte offset in the packed record, bit)
    "amount_fen": (15, 0),
    "tx_type": (16, 3),
    "terminal_id": (20, 7),
    "terminal_seq": (26, 0),
    "date_time": (33, 0),
    "tac": (34, 5),
    "app_serial (factor)": (9, 0),
    "app_serial (leftmost factor byte)": (2, 4),
}


@pytest.mark.parametrize("field", sorted(FORGERIES))
def test_a_bit_flipped_in_a_covered_field_is_forged(verifier: tac.PyTacVerifier, master_keys: MasterKeys,
                                                     field: str) -> None:
    receipt = card_terminal(master_keys, "33030000000000000001").purchase(250)
    batch = rec.pack([Record.from_receipt(receipt)] * 3)
    offset, bit = FORGERIES[field]
    batch.view(np.uint8)[48 + offset] ^= 1 << bit  # the middle record only
    assert verifier.verify(batch).tolist() == [True, False, True]
    forged = rec.unpack(batch)[1]
    assert not verify_tac(master_keys, forged.tac_fields(), forged.tac)  # the SAM agrees


def test_what_the_tac_does_not_cover(verifier: tac.PyTacVerifier, master_keys: MasterKeys) -> None:
    """The counter, the balance and the serial's two leading bytes are not under the TAC: replay detection
    and the booking must not trust them because the TAC verified."""
    receipt = card_terminal(master_keys, "33030000000000000001").purchase(250)
    record = Record.from_receipt(receipt)
    changed = [record._replace(card_counter=7), record._replace(balance_after_fen=1),
               record._replace(app_serial=b"\x44\x55" + record.app_serial[2:])]
    assert verifier.verify(rec.pack(changed)).all()


def test_another_issuers_key_verifies_nothing(master_keys: MasterKeys) -> None:
    receipt = card_terminal(master_keys, "33030000000000000001").purchase(250)
    batch = rec.pack([Record.from_receipt(receipt)])
    for make in (tac.CompiledTacVerifier, tac.PyTacVerifier):
        assert not make(MasterKeys.generate().get("purse", KeyUsage.TAC).value).verify(batch).any()
        wrong_usage = make(master_keys.get("purse", KeyUsage.PURCHASE).value.reveal()[::-1])
        assert not wrong_usage.verify(batch).any()


# -- keys stay hidden ---------------------------------------------------------------------------------------


def test_the_key_never_shows(verifier: tac.PyTacVerifier, master_keys: MasterKeys) -> None:
    key = master_keys.get("purse", KeyUsage.TAC).value.reveal()
    assert key.hex() not in repr(verifier).lower() and "redacted" in repr(verifier)
    with pytest.raises(TypeError):
        pickle.dumps(verifier)
    for make in (tac.CompiledTacVerifier, tac.PyTacVerifier):
        with pytest.raises(ValueError) as refused:
            make(key[:15])
        assert key[:15].hex() not in str(refused.value).lower() and "16 bytes" in str(refused.value)
    batch_verifier = tac._tac.TacBatchVerifier(key)
    assert repr(batch_verifier) == "TacBatchVerifier(<key redacted>)"


def test_bad_batches_are_refused(verifier: tac.PyTacVerifier) -> None:
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        verifier.verify(np.zeros(3, dtype=np.uint8))
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        verifier.verify(np.zeros((2, 2), dtype=RECORD_DTYPE))
    with pytest.raises(ValueError, match="48 bytes"):
        verifier.verify_one(b"\0" * 47)
    with pytest.raises(ValueError, match="threads"):
        type(verifier)(b"\0" * 16, threads=0)


def test_the_batch_core_checks_its_arguments(master_keys: MasterKeys) -> None:
    key = master_keys.get("purse", KeyUsage.TAC).value.reveal()
    core = tac._tac.TacBatchVerifier(key, parts=2)
    packed = bytes(96)
    with pytest.raises(ValueError, match="48 bytes"):
        core.verify_into(packed[:50], np.zeros(1, np.uint8), 0)
    with pytest.raises(ValueError, match="one result byte"):
        core.verify_into(packed, np.zeros(3, np.uint8), 0)
    with pytest.raises(ValueError, match="part"):
        core.verify_into(packed, np.zeros(2, np.uint8), 2)
    with pytest.raises(ValueError, match="one status"):
        tac._tac.write_transfers(packed, np.zeros(3, np.uint8), bytearray(256), np.zeros(2, np.int64), 1, 0, 0, 2, 11)
    with pytest.raises(ValueError, match="128-byte"):
        tac._tac.write_transfers(packed, np.zeros(2, np.uint8), bytearray(255), np.zeros(2, np.int64), 1, 0, 0, 2, 11)
    for bad in ({"parts": 0}, {"parts": 9}, {"card_keys_max": 7, "parts": 2}, {"card_keys_max": 1 << 30}):
        with pytest.raises(ValueError):
            tac._tac.TacBatchVerifier(key, **bad)
    ok = np.full(0, 7, np.uint8)
    assert core.verify_into(b"", ok, 1) == 0  # an empty batch writes nothing


def test_card_keys_are_kept_across_batches(master_keys: MasterKeys) -> None:
    """Commuters come back: the second batch of the same cards derives no card key, it only runs the MAC."""
    serials = [bytes.fromhex(f"3303{n:016d}") for n in range(1, 51)]
    def batch(first_seq: int) -> np.ndarray:
        return rec.pack([signed(master_keys, Record(serials[i % 50], i, 100, 6, TERMINAL_ID, first_seq + i,
                                                    GOOD_DATE_TIME, b"", 0)) for i in range(200)])
    with tac.CompiledTacVerifier.from_master_keys(master_keys, threads=2) as verifier:
        assert verifier.verify(batch(1)).all()
        assert (verifier.card_keys_derived, verifier.card_keys_reused) == (50, 150)
        assert verifier.verify(batch(1_000)).all()
        assert (verifier.card_keys_derived, verifier.card_keys_reused) == (50, 350)
    with tac.CompiledTacVerifier.from_master_keys(master_keys, threads=1, card_keys_max=4) as small:
        assert small.verify(batch(1)).all() and small.verify(batch(1_000)).all()
        assert small.card_keys_derived > 50  # evicted and derived again: still every answer right


def test_a_closed_verifier_wipes_its_keys_and_refuses_work(master_keys: MasterKeys) -> None:
    record = signed(master_keys, Record(bytes(10), 0, 1, 6, TERMINAL_ID, 1, GOOD_DATE_TIME, b"", 0))
    for make in (tac.CompiledTacVerifier, tac.PyTacVerifier):
        verifier = make.from_master_keys(master_keys, threads=2)
        assert verifier.verify(rec.pack([record])).all()
        verifier.close()
        with pytest.raises(ValueError, match="closed"):
            verifier.verify(rec.pack([record] * (tac.THREAD_SPLIT_MIN + 1)))
        with pytest.raises(ValueError, match="closed"):
            verifier.verify_one(record.pack())
        verifier.close()  # twice is harmless


# -- which implementation serves ---------------------------------------------------------------------------


def test_the_compiled_check_serves_unless_turned_off() -> None:
    expected = "python" if os.environ.get("CITYCARD_NO_EXTENSIONS") == "1" else "compiled"
    assert tac.IMPLEMENTATION == expected
    code = "from citycard.apps.bus import tac; print(tac.IMPLEMENTATION, tac.TacVerifier.__name__)"
    for setting, answer in (("1", "python PyTacVerifier"), ("0", "compiled CompiledTacVerifier")):
        env = {**os.environ, "CITYCARD_NO_EXTENSIONS": setting}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert done.stdout.strip() == answer


def test_compiled_tac_matches_its_stub(tmp_path: Path) -> None:
    # As tests/card/test_des_stub.py: lay the stub out under its installed name for mypy's stubtest.
    package = tmp_path / "citycard" / "apps" / "bus"
    package.mkdir(parents=True)
    for folder in (tmp_path / "citycard", tmp_path / "citycard" / "apps", package):
        (folder / "__init__.pyi").write_text("")
    (package / "_tac.pyi").write_text((BUS / "_tac.pyi").read_text())
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "citycard.apps.bus._tac", "--ignore-missing-stub"],
                          capture_output=True, text=True, check=False, env=os.environ | {"MYPYPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


# -- the record layout and its checks -----------------------------------------------------------------------


def test_the_layout_is_the_protos() -> None:
    offsets = {name: RECORD_DTYPE.fields[name][1] for name in RECORD_DTYPE.names}
    assert offsets == {"app_serial": 0, "card_counter": 10, "amount_fen": 12, "tx_type": 16, "terminal_id": 17,
                       "terminal_seq": 23, "date_time": 27, "tac": 34, "balance_after_fen": 38, "reserved": 42}
    assert RECORD_DTYPE.itemsize == 48
    record = Record(bytes.fromhex("33030000000000000001"), 0x0102, 0x0A0B0C0D, 9, TERMINAL_ID, 0x11223344,
                    GOOD_DATE_TIME, bytes.fromhex("DEADBEEF"), 0x01020304)
    packed = record.pack()
    assert packed.hex() == ("33030000000000000001" "0102" "0a0b0c0d" "09" "0a0b0c0d0e0f" "11223344"
                            "20250301081500" "deadbeef" "01020304" "000000000000")
    assert packed[rec.TAC_COVERED] == PurchaseTacFields(record.app_serial, record.amount_fen, 9, TERMINAL_ID,
                                                        record.terminal_seq, GOOD_DATE_TIME).mac_input()
    batch = rec.pack([record])
    assert int(batch["amount_fen"][0]) == 0x0A0B0C0D and int(batch["terminal_seq"][0]) == 0x11223344
    assert rec.unpack(batch) == [record]
    assert Record.from_message(record.to_message()) == record
    assert record.to_message().date_time == "20250301081500"


def test_packed_uploads_are_whole_records() -> None:
    assert len(rec.from_packed(bytes(96))) == 2
    for size in (0, 47, 49):
        with pytest.raises(rec.PackedRecordsError, match="48-byte"):
            rec.from_packed(bytes(size))
    with pytest.raises(rec.BatchTooLargeError, match="8189"):
        rec.from_packed(bytes(48 * (rec.RECORDS_MAX + 1)))


def test_a_record_that_does_not_fit_names_its_field() -> None:
    good = Record(bytes(10), 0, 1, 6, TERMINAL_ID, 1, GOOD_DATE_TIME, bytes(4), 0)
    with pytest.raises(rec.RecordFieldError, match="card_counter") as refused:
        rec.pack([good, good._replace(card_counter=0x1_0000)])
    assert refused.value.field == "card_counter" and "record 1" in str(refused.value)
    with pytest.raises(rec.RecordFieldError, match="terminal_id"):
        good._replace(terminal_id=b"\x01" * 5).pack()


def test_malformed_records_are_reported_with_index_field_and_reason() -> None:
    good = Record(bytes.fromhex("33030000000000000001"), 0, 1, 6, TERMINAL_ID, 1, GOOD_DATE_TIME, bytes(4), 0)
    records = [
        good,
        good._replace(app_serial=bytes.fromhex("3303000000000000000A")),
        good._replace(tx_type=5),
        good._replace(date_time=bytes.fromhex("20250229120000")),  # 2025 is not a leap year
        good._replace(date_time=bytes.fromhex("20240229235959")),  # 2024 is
        good._replace(date_time=bytes.fromhex("2025030108156A"), terminal_seq=0),
        good._replace(date_time=bytes.fromhex("19991231235959")),
        good,
    ]
    batch = rec.pack(records)
    batch.view(np.uint8)[7 * 48 + 47] = 1  # a reserved byte
    checked = rec.validate(batch)
    assert checked.ok.tolist() == [True, False, False, False, True, False, False, False]
    assert [(p.index, p.field) for p in checked.problems] == [
        (1, "app_serial"), (2, "tx_type"), (3, "date_time"), (5, "terminal_seq"), (5, "date_time"),
        (6, "date_time"), (7, "reserved")]
    assert checked.problems[1] == FieldProblem(2, "tx_type", "is not 6 (purchase) or 9 (composite purchase)")
    assert all(p.reason for p in checked.problems)
    for hour_minute_second in ("240000", "236000", "235960"):
        assert rec.validate(rec.pack([good._replace(date_time=bytes.fromhex("20250301" + hour_minute_second))])
                            ).problems[0].field == "date_time"


def test_messages_become_records_and_bad_ones_are_reported() -> None:
    good = Record(bytes.fromhex("33030000000000000001"), 3, 250, 9, TERMINAL_ID, 12, GOOD_DATE_TIME,
                  bytes.fromhex("01020304"), 750)
    messages = [good.to_message() for _ in range(4)]
    messages[1].app_serial = "3303000000000000000"  # 19 digits
    messages[2].amount_fen = -5
    messages[3].date_time = "2025-03-01 08:15"
    messages.append(good.to_message())
    messages[4].tx_type = 2
    records, checked = rec.from_messages(messages)
    assert len(records) == 5 and rec.unpack(records[:1]) == [good]
    assert checked.ok.tolist() == [True, False, False, False, False]
    assert [(p.index, p.field) for p in checked.problems] == [
        (1, "app_serial"), (2, "amount_fen"), (3, "date_time"), (4, "tx_type")]
    assert "20 hex digits" in checked.problems[0].reason and "out of range" in checked.problems[1].reason
    assert not records[1:4].view(np.uint8).any()  # a message that could not be packed keeps a zero record



def test_the_public_names_are_pinned() -> None:
    assert set(rec.__all__) == {
        "RECORDS_MAX", "RECORD_BYTES", "RECORD_DTYPE", "TAC_COVERED", "TRANSIT_TX_TYPES", "BatchTooLargeError",
        "FieldProblem", "PackedRecordsError", "Record", "RecordFieldError", "Validation", "bcd_column",
        "big_endian_column", "from_messages", "from_packed", "pack", "to_packed", "unpack", "validate"}
    assert set(tac.__all__) == {"CARD_KEYS_DEFAULT", "IMPLEMENTATION", "MASTER_KEY_BYTES", "THREADS_DEFAULT",
                                "THREAD_SPLIT_MIN", "CompiledTacVerifier", "PyTacVerifier", "Status", "TacVerifier"}
    for module in (rec, tac):
        assert all(hasattr(module, name) for name in module.__all__)
