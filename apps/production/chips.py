"""Personalisation: the holder's data and keys diversified from the issuer's master keys, written onto
the chip of every registered card of a batch.

The chip is the virtual CPU card of ``citycard.card``: ``personalize(profile, master_keys)`` makes its
image and a ``FileStore`` keeps it at DIR/production/chips/<card number>.json. The profile is built
from the batch row (the data printed on the card) and the production settings:

- EF05 (card identity): card identification code, card type, specification version, initialising
  organisation, issue and expiry date, card number;
- EF06 (holder): ID number (the social security number), name, gender (GB/T 2261.1), ethnicity
  (GB/T 3304), birthplace (the region code of the ID number), date of birth;
- the e-purse: issuer id, application serial number (the issuer region code followed by the card's
  registry number, 20 digits: the factor purse keys are diversified with), validity, balance cap;
- the initial PIN, which the holder replaces at activation.

A card whose chip file exists already (an interrupted run) is checked, not written again: its EF05 must
name the same card. Chip files are written first, then the rows are marked personalised in one
transaction; running the step again finishes what an interruption left.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace

from citycard.card import (
    CardChannel,
    CardIdentity,
    CardStateError,
    FileStore,
    Holder,
    HolderDataError,
    MasterKeys,
    MemoryTransport,
    Terminal,
    VirtualCard,
    personalize,
)
from citycard.card.personalize import CardProfile, PurseProfile
from citycard.core.lifecycle import Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import as_instant

from .errors import RowProblem
from .settings import INITIAL_PIN, ProductionSettings
from .store import BatchRow, ProductionStore, RowState

__all__ = ["PersonalizeResult", "card_profile", "open_chip", "personalize_batch"]

GENDER_CODES = {"male": "1", "female": "2"}


@dataclass
class PersonalizeResult:
    personalized: int = 0
    already: int = 0
    not_registered: int = 0
    problems: list[RowProblem] = field(default_factory=list)


def card_profile(row: BatchRow, settings: ProductionSettings) -> CardProfile:
    registry_number = int(row.card_id_code[-16:], 16)
    return CardProfile(
        identity=CardIdentity(card_id_code=row.card_id_code, card_type=settings.card_type,
                              spec_version=settings.spec_version, init_org=settings.init_org,
                              issue_date=row.issue_date, expiry_date=row.expiry_date, card_number=row.card_number),
        holder=Holder(ssn=row.id_number, name=row.name, gender=GENDER_CODES[row.gender], ethnicity=row.ethnicity,
                      birthplace=row.id_number[:6], birth_date=row.date_of_birth),
        purse=PurseProfile(issuer_id=settings.purse_issuer_id,
                           app_serial=f"{settings.issuer_region_code}{registry_number:014d}",
                           start_date=row.issue_date, expiry_date=row.expiry_date,
                           balance_max_fen=settings.purse_balance_max_fen),
        initial_pin=INITIAL_PIN,
    )


def open_chip(store: ProductionStore, card_number: str) -> VirtualCard:
    """The personalised chip of a card, as a card in a reader would answer."""
    return VirtualCard.open(store.chip_path(card_number))


def _chip_card_number(store: ProductionStore, card_number: str) -> str:
    card = open_chip(store, card_number)
    # Reading EF05 needs no key and no PIN: a terminal without a SAM is enough.
    terminal = Terminal(CardChannel(MemoryTransport(card)), sam=None)  # type: ignore[arg-type]
    return terminal.read_holder().identity.card_number


def personalize_batch(registry: Registry, store: ProductionStore, settings: ProductionSettings, batch_id: str,
                      master_keys: MasterKeys, *, actor: str, at: _dt.datetime | None = None) -> PersonalizeResult:
    at = as_instant(at)
    batch = store.batch(batch_id)
    result = PersonalizeResult()
    done: list[BatchRow] = []
    store.chips_dir.mkdir(parents=True, exist_ok=True)
    for row in store.rows(batch_id):
        if row.state is not RowState.REGISTERED:
            result.already += ROW_AFTER_PERSONALIZED.get(row.state, 0)
            result.not_registered += row.state in (RowState.ORDERED, RowState.APPROVED)
            continue
        problem = _write_chip(store, settings, row, master_keys)
        if problem is None:
            done.append(row)
        else:
            result.problems.append(problem)
    if done:
        stage = registry.begin(at)
        for row in done:
            store.put_row(stage, replace(row, state=RowState.PERSONALIZED, personalized_at=at.isoformat()))
        result.personalized = len(done)
        store.put_batch(stage, batch.with_event("personalize", at.isoformat(), actor, cards=len(done)))
        stage.audit(actor=actor, channel=Channel.BATCH, action="production.personalize", subject=f"batch {batch_id}",
                    at=at, details={"cards": len(done), "problems": len(result.problems)})
        stage.commit(f"personalising batch {batch_id}")
    return result


ROW_AFTER_PERSONALIZED = {RowState.PERSONALIZED: 1, RowState.AT_EMPLOYER: 1, RowState.HANDED_OVER: 1,
                          RowState.ACTIVATED: 1}


def _write_chip(store: ProductionStore, settings: ProductionSettings, row: BatchRow,
                master_keys: MasterKeys) -> RowProblem | None:
    path = store.chip_path(row.card_number)

    def problem(field_name: str, reason: str) -> RowProblem:
        return RowProblem(row.batch_id, row.row, field_name, reason, row.masked_id)

    if path.exists():
        try:
            on_chip = _chip_card_number(store, row.card_number)
        except (CardStateError, HolderDataError, ValueError) as exc:
            return problem("chip", f"{path.name} exists but cannot be read ({exc})")
        return None if on_chip == row.card_number else problem("chip", f"{path.name} holds card {on_chip}")
    try:
        image = personalize(card_profile(row, settings), master_keys)
    except (HolderDataError, KeyError) as exc:
        return problem("chip", f"cannot be personalised: {exc}")
    FileStore(path, fsync=True).create(image)
    return None
