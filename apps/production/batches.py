"""Production batches: an employer's waiting roster entries become ordered cards, one batch at a time.

    result = create_batches(registry, store, settings, employers=["91370100MA3C5LQX6E"], actor="op1")

For each employer (or every employer with entries waiting), the waiting entries that have a usable
photo are taken in ID-number order, up to ``settings.batch_rows_max`` per batch. Batches are committed
whole, several in one unit of work up to ``ROWS_PER_COMMIT`` rows (and never more accounts than one
ledger batch takes): a crash leaves whole batches only, and a city of small employers is not written
one small transaction at a time (each commit rewrites every B-tree page its rows touch). For every row:

- the person is registered in the registry (the medical account opens with it), or, if registered
  before, the registry record takes the roster's data (name, addresses, employer);
- a card is ordered for them (state ``ordered``; the registry allocates the card number and the card
  identification code), or the card still ordered for a row that the employer rejected is taken into
  this batch with the corrected data (nothing was printed on it);
- the row keeps a snapshot of what will be printed, and the entry is marked batched.

One audit entry records the batch (employer, rows, first and last card, a digest of the rows); each
card's history records its own transitions. Entries are held back, and listed, when they have no usable
photo or their holder has a card that is not retired (issued at a counter since the import).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from citycard.core.identity import mask_id
from citycard.core.lifecycle import TERMINAL_STATES, CardState, Channel
from citycard.core.records import BATCH_EVENTS_MAX
from citycard.core.registry import BulkEnrolment, OrderedCard, Registry
from citycard.core.registry_records import Card, ErrorCode, Person, PersonStatus, as_instant
from citycard.core.registry_store import Stage

from .collector import collector_paused
from .errors import ProductionError
from .settings import ProductionSettings
from .store import ROW_ORDER, Batch, BatchRow, PhotoRecord, ProductionStore, RosterEntry, RowState

__all__ = ["BatchSummary", "CreateResult", "HeldBack", "batch_summary", "create_batches"]

WAITING_PAGE_ROWS = 1000
ACCOUNTS_PER_ROW_MAX = 2  # a new person's medical account and the card's e-purse
# Rows of small batches gathered in one unit of work (a larger batch is committed alone). A row holds
# about 20 KB until the commit: its staged records and the five or so B-tree pages it dirties, which
# LMDB keeps in memory for reuse afterwards. So this bounds the heap (about 40 MB) while a city of
# 500-person employers is committed four batches at a time: at 100,000 persons a commit of 2,000 rows
# instead of 1,000 took a third off the ledger's time (6.0 -> 4.0 s: fewer pages written twice, half
# the fsyncs).
ROWS_PER_COMMIT = 2000
HELD_BACK_LISTED_MAX = 10_000  # entries held back that a result lists; it counts them all
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class HeldBack:
    employer: str
    who: str  # masked ID number
    name: str
    reason: str


@dataclass
class CreateResult:
    batches: list[Batch] = field(default_factory=list)
    held_back: list[HeldBack] = field(default_factory=list)  # the first HELD_BACK_LISTED_MAX of them
    held_back_total: int = 0

    def hold_back(self, entry: HeldBack) -> None:
        self.held_back_total += 1
        if len(self.held_back) < HELD_BACK_LISTED_MAX:
            self.held_back.append(entry)

    @property
    def rows(self) -> int:
        return sum(batch.rows for batch in self.batches)


def create_batches(registry: Registry, store: ProductionStore, settings: ProductionSettings, *,
                   employers: Iterable[str] | None = None, actor: str, at: _dt.datetime | None = None,
                   rows_max: int | None = None, progress: Progress | None = None) -> CreateResult:
    at = as_instant(at)
    progress = progress or (lambda phase, done, total: None)
    rows_max = rows_max or settings.batch_rows_max
    if not 1 <= rows_max <= settings.batch_rows_max:
        raise ProductionError("rows_max", f"must be 1 to {settings.batch_rows_max}")
    incomplete = store.incomplete_imports()
    if incomplete:
        first = incomplete[0]
        raise ProductionError("roster", f"import {first.import_id} of {first.file_name} is unfinished "
                                        f"({first.committed_rows} of {first.accepted} rows written); import that "
                                        "file again to finish it", code=ErrorCode.FAILED_PRECONDITION)
    chosen = [registry.employer(code).unit_code for code in employers] if employers is not None \
        else store.waiting_employers()
    with collector_paused():
        return _create_all(registry, store, chosen, rows_max, actor, at, progress)


def _create_all(registry: Registry, store: ProductionStore, chosen: list[str], rows_max: int, actor: str,
                at: _dt.datetime, progress: Progress) -> CreateResult:
    result = CreateResult()
    stage: Stage | None = None
    staged_rows = 0
    for employer in chosen:
        employer_name = registry.employer(employer).name
        for page in _eligible_pages(registry, store, employer, rows_max, result):
            if stage is not None and (staged_rows + len(page) > ROWS_PER_COMMIT
                                      or len(stage.accounts) + ACCOUNTS_PER_ROW_MAX * len(page) > BATCH_EVENTS_MAX):
                stage.commit(f"creating batches up to {result.batches[-1].batch_id}")
                stage = None
            if stage is None:
                stage, staged_rows = registry.begin(at), 0
            staged_rows += len(page)
            batch = _create_one(registry, store, stage, employer, employer_name, page, actor, at)
            result.batches.append(batch)
            progress("ordering cards", result.rows, None)
    if stage is not None:
        stage.commit(f"creating batches up to {result.batches[-1].batch_id}")
    return result


@dataclass(frozen=True)
class _Eligible:
    """A waiting entry that can go into a batch now, with what was read to decide so."""

    entry: RosterEntry
    photo: PhotoRecord
    reused_card: Card | None  # the card still ordered for a row the employer rejected


def _eligible_pages(registry: Registry, store: ProductionStore, employer: str, rows_max: int,
                    result: CreateResult) -> Iterable[list[_Eligible]]:
    """Pages of up to ``rows_max`` waiting entries that can go into a batch now; the rest are held back.
    Each page is yielded before the next is read: the batch made from it has left the waiting index."""
    page: list[_Eligible] = []
    for id_number in store.iter_waiting(employer, WAITING_PAGE_ROWS):
        entry = store.entry(id_number)
        if entry is None:
            continue
        photo = store.photo(id_number)
        card = _reusable_or_blocking(registry, store, id_number)
        if photo is None or isinstance(card, str):
            reason = "no usable photo yet (citycard photos import)" if photo is None else str(card)
            result.hold_back(HeldBack(employer, mask_id(id_number), entry.name, reason))
            continue
        page.append(_Eligible(entry, photo, card))
        if len(page) == rows_max:
            yield page
            page = []
    if page:
        yield page


def _reusable_or_blocking(registry: Registry, store: ProductionStore, id_number: str) -> Card | str | None:
    """The holder's card still ordered for a rejected row (made again in the new batch), None when the
    holder has no card that is not retired, or why a new card cannot be ordered."""
    found: Card | None = None
    for card in registry.cards_of(id_number):
        if card.state in TERMINAL_STATES:
            continue
        row = store.row_of_card(card.card_number)
        if card.state is CardState.ORDERED and row is not None and row.state is RowState.REJECTED:
            found = card
            continue
        return (f"holds card {card.card_number} ({card.state.value}); a card that is not retired is replaced "
                "or renewed at the counter")
    return found


def _create_one(registry: Registry, store: ProductionStore, stage: Stage, employer: str, employer_name: str,
                page: list[_Eligible], actor: str, at: _dt.datetime) -> Batch:
    batch_id = f"B{stage.next_seq('production.batch'):06d}"
    counts = {"persons_registered": 0, "persons_updated": 0, "cards_ordered": 0, "cards_reused": 0}
    digest = hashlib.sha256()
    enrolment = registry.bulk_enrolment(stage, actor=actor, channel=Channel.BATCH, at=at)
    cards: list[OrderedCard] = []
    for number, eligible in enumerate(page, start=1):
        entry, photo = eligible.entry, eligible.photo
        holder = _stage_person(registry, stage, enrolment, entry, actor, at, counts)
        if eligible.reused_card is not None:
            card = OrderedCard.of(eligible.reused_card)
            counts["cards_reused"] += 1
        else:
            # _reusable_or_blocking has just read the holder's cards: none is usable (prechecked).
            card = enrolment.order_card(holder)
            counts["cards_ordered"] += 1
        store.put_new_row(stage, {
            "batch_id": batch_id, "row": number, "id_number": entry.id_number, "name": entry.name,
            "gender": entry.gender, "date_of_birth": entry.date_of_birth, "nationality": entry.nationality,
            "ethnicity": entry.ethnicity, "employer": employer, "card_number": card.card_number,
            "card_id_code": card.card_id_code, "issue_date": card.issue_date, "expiry_date": card.expiry_date,
            "photo_sha256": photo.sha256, "state": RowState.ORDERED})
        store.put_batched_entry(stage, entry, batch_id, number)
        digest.update(f"{number}:{entry.id_number}:{card.card_number}:{photo.sha256}\n".encode("ascii"))
        cards.append(card)
    batch = Batch(batch_id=batch_id, employer=employer, employer_name=employer_name, rows=len(cards),
                  created_at=at.isoformat(), actor=actor, first_card=cards[0].card_number,
                  last_card=cards[-1].card_number)
    batch = batch.with_event("create", at.isoformat(), actor, rows=len(cards), **counts)
    store.put_batch(stage, batch)
    stage.audit(actor=actor, channel=Channel.BATCH, action="production.batch_create", subject=f"batch {batch_id}",
                at=at, details={"employer": employer, "rows": len(cards), "first_card": batch.first_card,
                                "last_card": batch.last_card, "rows_sha256": digest.hexdigest(), **counts})
    return batch


def _stage_person(registry: Registry, stage: Stage, enrolment: BulkEnrolment, entry: RosterEntry, actor: str,
                  at: _dt.datetime, counts: dict[str, int]) -> Person | str:
    """The holder of the row's card: registered now (their ID number), or registered before and brought
    up to the roster's data (the Person)."""
    if enrolment.register(  # the roster import checked the ID number, birth date, gender and name
            id_number=entry.id_number, name=entry.name, date_of_birth=entry.date_of_birth,
            residence=entry.residence, household_registration=entry.household_registration,
            status=PersonStatus.EMPLOYED, nationality=entry.nationality, employer=entry.employer):
        counts["persons_registered"] += 1
        return entry.id_number
    person = registry.person(entry.id_number)
    updated = registry.stage_person_update(
        stage, person, name=entry.name, residence=entry.residence,
        household_registration=entry.household_registration, nationality=entry.nationality,
        employer=entry.employer, status="employed", actor=actor, channel=Channel.BATCH, at=at, audit=False)
    if updated != person:
        counts["persons_updated"] += 1
    return updated


# -- what a batch looks like -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSummary:
    batch: Batch
    counts: dict[str, int]  # row state -> rows
    stage: str  # the least advanced state of its live (not rejected) rows, or "rejected"

    def to_json(self) -> dict[str, Any]:
        return {**self.batch.to_json(), "counts": self.counts, "stage": self.stage}


def batch_summary(store: ProductionStore, batch_id: str, rows: list[BatchRow] | None = None) -> BatchSummary:
    batch = store.batch(batch_id)
    rows = rows if rows is not None else store.rows(batch_id)
    counts = {state.value: 0 for state in RowState}
    for row in rows:
        counts[row.state.value] += 1
    live = [row.state for row in rows if row.state is not RowState.REJECTED]
    stage = min(live, key=lambda state: ROW_ORDER[state]).value if live else RowState.REJECTED.value
    return BatchSummary(batch, {name: count for name, count in counts.items() if count}, stage)
