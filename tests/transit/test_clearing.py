"""The clearing pass (apps/bus/clearing.py over tac.py): the compiled pass and its pure twin agree on every
record's decision and write bit-identical ledger transfers; chip transaction ids are ids.chip_transfer_id's;
a malformed record is named with records.validate's field and reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from citycard.apps.bus import records as rec
from citycard.apps.bus import tac
from citycard.apps.bus.clearing import FORGED_MESSAGE, Outcome, plan_clearing
from citycard.apps.bus.ids import chip_transfer_id
from citycard.apps.bus.records import Record
from citycard.apps.bus.tac import Status
from citycard.card import MasterKeys
from citycard.card.sam import compute_tac
from citycard.core.records import TRANSFER_DTYPE, LedgerId, TransferCode
from citycard.core.registry_store import purse_account_id
from hypothesis import given, settings
from hypothesis import strategies as st

TEST_KEYS_PATH = Path(__file__).resolve().parents[1] / "card" / "data" / "test-master-keys.json"
REGION = 330300
OPERATOR = (3 << 120) | 0x0002_0007
TERMINAL_ID = bytes.fromhex("0A0B0C0D0E0F")
GOOD_DATE_TIME = bytes.fromhex("20250301081500")
OFFSETS = {"app_serial": 0, "counter": 10, "amount": 12, "tx_type": 16, "terminal_id": 17, "terminal_seq": 23,
           "date_time": 27, "tac": 34, "balance": 38, "reserved": 42}


@pytest.fixture(scope="module")
def master_keys() -> MasterKeys:
    return MasterKeys.load(TEST_KEYS_PATH)


@pytest.fixture(scope="module")
def verifiers(master_keys: MasterKeys) -> dict[str, tac.PyTacVerifier]:
    return {"compiled": tac.CompiledTacVerifier.from_master_keys(master_keys, threads=1),
            "compiled-2-threads": tac.CompiledTacVerifier.from_master_keys(master_keys, threads=2, card_keys_max=64),
            "python": tac.PyTacVerifier.from_master_keys(master_keys)}


def good_record(master_keys: MasterKeys, seq: int, *, region: str = "330300", amount: int = 200,
                terminal_seq: int = 1, tx_type: int = 6) -> Record:
    record = Record(bytes.fromhex(f"{region}{seq:014d}"), terminal_seq & 0xFFFF, amount, tx_type, TERMINAL_ID,
                    terminal_seq, GOOD_DATE_TIME, b"", 5_000)
    return record._replace(tac=compute_tac(master_keys, record.tac_fields()))


# A byte changed somewhere in a good record: in a covered field (forged, or malformed when it breaks the
# field's form), in the serial (another card, region, or not BCD), in what the TAC does not cover.
mutation = st.tuples(st.integers(0, 47), st.integers(0, 255))
batch_strategy = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 3), st.integers(0, 2),
                                    st.lists(mutation, max_size=2)), min_size=1, max_size=60)


def build(master_keys: MasterKeys, drawn: list[tuple[int, int, int, list[tuple[int, int]]]]) -> np.ndarray:
    records = []
    for index, (seq, amount_kind, region_kind, changes) in enumerate(drawn):
        region = ("330300", "330300", "440100")[region_kind]
        amount = (0, 1, 200, 0xFFFF_FFFF)[amount_kind]
        records.append(good_record(master_keys, seq, region=region, amount=amount, terminal_seq=index + 1,
                                   tx_type=(6, 9)[index % 2]))
    batch = rec.pack(records)
    raw = batch.view(np.uint8).reshape(-1, 48)
    for index, (_, _, _, changes) in enumerate(drawn):
        for offset, value in changes:
            raw[index, offset] = value
    return batch


@settings(max_examples=150, deadline=None)
@given(drawn=batch_strategy, preset=st.sets(st.integers(0, 59), max_size=3))
def test_the_compiled_pass_and_its_twin_decide_alike(verifiers: dict[str, tac.PyTacVerifier],
                                                     master_keys: MasterKeys, drawn: list, preset: set[int]) -> None:
    batch = build(master_keys, drawn)
    decided = {}
    for name, verifier in verifiers.items():
        status = np.zeros(len(batch), dtype=np.uint8)
        status[[i for i in preset if i < len(batch)]] = Status.MALFORMED
        verifier.classify(batch, status, region=REGION)
        transfers, booked_index = verifier.transfers(batch, status, operator_account=OPERATOR)
        decided[name] = (status.tolist(), transfers.tobytes(), booked_index.tolist())
    assert decided["compiled"] == decided["python"] == decided["compiled-2-threads"]
    status = np.array(decided["python"][0])
    assert not (status == Status.UNCHECKED).any()
    fields_ok = rec.validate(batch).ok
    for index in range(len(batch)):  # MALFORMED exactly where records.validate finds a problem (or preset)
        assert (status[index] == Status.MALFORMED) == (not fields_ok[index] or index in preset)


def test_transfers_are_the_ledgers_records_under_chip_transaction_ids(verifiers: dict[str, tac.PyTacVerifier],
                                                                      master_keys: MasterKeys) -> None:
    records = [good_record(master_keys, seq, terminal_seq=ts, amount=amount)
               for seq, ts, amount in ((1, 1, 200), (99_999_999_999_999, 0xFFFF_FFFF, 0xFFFF_FFFF), (42, 7, 0),
                                       (12_345, 65_537, 1))]
    batch = rec.pack(records)
    for name, verifier in verifiers.items():
        status = np.zeros(len(batch), dtype=np.uint8)
        verifier.classify(batch, status, region=REGION)
        assert status.tolist() == [Status.BOOK, Status.BOOK, Status.ENTRY_ONLY, Status.BOOK], name
        transfers, booked_index = verifier.transfers(batch, status, operator_account=OPERATOR)
        assert transfers.dtype == TRANSFER_DTYPE and booked_index.tolist() == [0, 1, 3], name
        for transfer, index in zip(transfers, booked_index.tolist(), strict=True):
            record = records[index]
            seq = int(record.app_serial.hex()[6:])
            words = {name: int(transfer[name][0]) | (int(transfer[name][1]) << 64)
                     for name in ("id", "debit_account_id", "credit_account_id", "pending_id", "ref_id", "user_data")}
            assert words == {"id": chip_transfer_id(seq, int.from_bytes(TERMINAL_ID, "big"), record.terminal_seq),
                             "debit_account_id": purse_account_id(seq), "credit_account_id": OPERATOR,
                             "pending_id": 0, "ref_id": 0,
                             "user_data": (record.card_counter << 32) | record.terminal_seq}, name
            assert (int(transfer["amount"]), int(transfer["ledger"]), int(transfer["code"])) == (
                record.amount_fen, LedgerId.PURSE, TransferCode.PURCHASE)
            assert not (transfer["timestamp"] or transfer["timeout"] or transfer["flags"] or transfer["reserved"])


def test_a_plan_names_every_problem(verifiers: dict[str, tac.PyTacVerifier], master_keys: MasterKeys) -> None:
    good = good_record(master_keys, 7)
    records = [
        good,
        good._replace(date_time=bytes.fromhex("20250229120000")),        # 1: not a date (malformed)
        good._replace(amount_fen=201),                                   # 2: forged
        good_record(master_keys, 8, region="440100", terminal_seq=3),    # 3: another region's card
        good_record(master_keys, 0, terminal_seq=4),                     # 4: sequence 0
        good_record(master_keys, 9, amount=0, terminal_seq=5),           # 5: an entry record
        good._replace(tx_type=5, terminal_seq=0),                        # 6: two bad fields: the first named
        good,                                                            # 7: refused before (a message)
    ]
    batch = rec.pack(records)
    for name, verifier in verifiers.items():
        plan = plan_clearing(verifier, batch, {7: "amount_fen -5 is out of range"}, region=REGION,
                             operator_account=OPERATOR)
        assert plan.booked_index.tolist() == [0] and plan.entry_only == 1, name
        assert plan.problems == {
            1: (Outcome.MALFORMED, "date_time is not a BCD date and time YYYYMMDDhhmmss from 2000 on"),
            2: (Outcome.FORGED, FORGED_MESSAGE),
            3: (Outcome.CARD_UNKNOWN, f"the application serial is not one of region {REGION}'s cards"),
            4: (Outcome.CARD_UNKNOWN, f"the application serial is not one of region {REGION}'s cards"),
            6: (Outcome.MALFORMED, "tx_type is not 6 (purchase) or 9 (composite purchase)"),
            7: (Outcome.MALFORMED, "amount_fen -5 is out of range"),
        }, name


def test_a_large_batch_on_two_threads_agrees(master_keys: MasterKeys) -> None:
    count = rec.RECORDS_MAX
    cards = [good_record(master_keys, seq) for seq in range(1, 301)]
    records = [cards[i % 300]._replace(terminal_seq=i + 2) for i in range(count)]  # TACs now wrong: re-sign
    records = [r._replace(tac=compute_tac(master_keys, r.tac_fields())) if i % 7 else r
               for i, r in enumerate(records)]
    batch = rec.pack(records)
    answers = []
    for threads in (1, 2):
        with tac.CompiledTacVerifier.from_master_keys(master_keys, threads=threads) as verifier:
            status = np.zeros(count, dtype=np.uint8)
            verifier.classify(batch, status, region=REGION)
            transfers, _ = verifier.transfers(batch, status, operator_account=OPERATOR)
            answers.append((status.tobytes(), transfers.tobytes()))
    assert answers[0] == answers[1]
    status = np.frombuffer(answers[0][0], dtype=np.uint8)
    assert ((status == Status.FORGED) == (np.arange(count) % 7 == 0)).all()
