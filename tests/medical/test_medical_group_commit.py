"""Group commit of settlements (apps/medical/group_commit.py) on the real ledger: bills that arrive while a
batch is being booked go out together, in one SQLite transaction of intents and one CreateTransfers; a
chain the ledger refuses fails alone. Deterministic: the first batch is held until the others are queued."""

from __future__ import annotations

import threading

import pytest
from citycard.apps.medical.group_commit import GroupCommit
from citycard.apps.medical.service import MedicalError
from grpc_helpers import add_person_with_card, citizen_id
from medical_helpers import PHARMACY, World
from test_medical_booking import PHARMACY_ITEMS, available, fund


class CountingCore:
    """The real core client, counting its CreateTransfers requests and their sizes."""

    def __init__(self, core) -> None:
        self._core = core
        self.requests: list[int] = []

    def __getattr__(self, name):
        return getattr(self._core, name)

    def book(self, transfers):
        self.requests.append(len(transfers))
        return self._core.book(transfers)


def test_queued_settlements_are_booked_in_one_request_and_a_refusal_stays_alone(world: World):
    people = []
    for n in range(4):
        id_number, card = world.person()
        fund(world, id_number, 50_000, id_number + "g")
        people.append((id_number, card))
    broke = citizen_id("19570707", 900)   # an empty e-purse: its chain is refused by the ledger
    broke_card = add_person_with_card(world.server, broke)
    fund(world, broke, 50_000, broke + "g")
    counting = world.service.booker.core = CountingCore(world.service.core)
    group = world.service.booker._group
    process, first_batch_held, release = group._process, threading.Event(), threading.Event()

    def held_first(batch):
        if not first_batch_held.is_set():
            first_batch_held.set()
            assert release.wait(30)
        process(batch)

    group._process = held_first
    results: dict[str, object] = {}

    def settle(bill_no: str, id_number: str, card: str, epurse: bool = False) -> None:
        try:
            results[bill_no] = world.service.settle(institution=PHARMACY, bill_no=bill_no, card_number=card,
                                                    id_number=id_number, visit="pharmacy", items=PHARMACY_ITEMS,
                                                    epurse=epurse)
        except MedicalError as exc:
            results[bill_no] = exc

    threads = [threading.Thread(target=settle, args=("G0", *people[0]))]
    threads[0].start()
    assert first_batch_held.wait(30)
    threads += [threading.Thread(target=settle, args=(f"G{n}", *people[n])) for n in (1, 2, 3)]
    threads.append(threading.Thread(target=settle, args=("G9", broke, broke_card, True)))
    for thread in threads[1:]:
        thread.start()
    while len(group._queue) < 4:   # everyone else is queued behind the held batch
        assert all(thread.is_alive() for thread in threads[1:])
        threading.Event().wait(0.01)
    release.set()
    for thread in threads:
        thread.join(30)
    assert counting.requests == [1, 5]   # G0 alone, then G1-G3 (one transfer each) and G9's two in one request
    for n in range(4):
        receipt = results[f"G{n}"]
        assert isinstance(receipt, dict) and (receipt["personal_account_fen"], receipt["insured_fen"]) == \
            (15_655, 2_800)
        assert available(world, people[n][0]) == 34_345
    assert isinstance(results["G9"], MedicalError) and results["G9"].reason == "epurse_insufficient"
    assert available(world, broke) == 50_000   # its MEDICAL part was refused with its chain
    assert world.service.store.all("SELECT key FROM bills WHERE status != 'booked'") == []


def test_a_failing_batch_fails_every_waiter_and_the_next_batch_runs():
    calls: list[list[int]] = []

    def process(batch) -> None:
        calls.append([job.value for job in batch])
        if batch[0].value == 0:
            raise OSError("disk gone")
        for job in batch:
            job.result = job.value * 10

    group: GroupCommit[int] = GroupCommit(process, jobs_max=8)
    with pytest.raises(OSError, match="disk gone"):
        group.submit(0)
    assert group.submit(7) == 70 and calls == [[0], [7]]
