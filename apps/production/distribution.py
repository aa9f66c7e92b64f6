"""Distribution and activation: cards go to the employer, the employer hands them to the holders, and a
holder activates the card at a designated institution; the bank's financial activation comes later.

- ``distribute_to_employer``: the batch's personalised cards are delivered to the employer's agent
  (named); each card moves to ``distributed`` in the registry. One transaction.
- ``hand_over``: the employer reports which cards it handed to their holders (all it holds, or the
  card numbers it lists). Recorded on the rows; the registry state stays ``distributed``.
- ``activate``: at a designated institution, the holder shows the ID card and the social security card
  and sets their own PIN. The chip's PIN is changed from the initial PIN to the holder's (the PIN is
  never stored or logged), then the card becomes ``active`` in the registry and the row records the
  institution, in one transaction. If that transaction does not happen (a crash after the chip was
  changed), activating again works: the chip then accepts the holder's PIN instead of the initial one.
- ``activate_financial``: the bank reports that it opened the card's financial account functions (a
  separate, later step at the bank, which resets the bank PIN itself); recorded on the row.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from citycard.card import CardChannel, MemoryTransport, Terminal, Transport
from citycard.card.sw import StatusWordError, VerificationFailed
from citycard.core.identity import mask_id
from citycard.core.lifecycle import CardEvent, Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import ErrorCode, as_instant, check_text

from .chips import open_chip
from .errors import ProductionError
from .settings import INITIAL_PIN
from .store import BatchRow, ProductionStore, RowState

__all__ = ["DistributionResult", "activate", "activate_financial", "distribute_to_employer", "hand_over"]

PIN_DIGITS = (6, 6)  # the social security application's PIN: six digits, as the holder's own


@dataclass
class DistributionResult:
    moved: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # card, who, why


def _refused(field_name: str, reason: str, subject: str = "",
             code: ErrorCode = ErrorCode.FAILED_PRECONDITION) -> ProductionError:
    return ProductionError(field_name, reason, subject=subject, code=code)


def distribute_to_employer(registry: Registry, store: ProductionStore, batch_id: str, *, receiver: str, actor: str,
                           at: _dt.datetime | None = None) -> DistributionResult:
    at = as_instant(at)
    receiver = check_text(receiver, "receiver")
    batch = store.batch(batch_id)
    result = DistributionResult()
    ready = []
    for row in store.rows(batch_id):
        if row.state is RowState.PERSONALIZED:
            ready.append(row)
        elif row.state in (RowState.ORDERED, RowState.APPROVED, RowState.REGISTERED):
            result.skipped.append({"card": row.card_number, "who": row.masked_id,
                                   "why": f"{row.state.value}, not personalised yet"})
    if not ready:
        raise _refused("batch", "has no personalised card waiting to be delivered", f"batch {batch_id}")
    stage = registry.begin(at)
    for row in ready:
        card = registry.card(row.card_number)
        registry.stage_advance(stage, card, CardEvent.DISTRIBUTE, actor=actor, channel=Channel.BATCH, at=at,
                               audit=False, details={"to": "employer"})
        store.put_row(stage, replace(row, state=RowState.AT_EMPLOYER,
                                     at_employer={"receiver": receiver, "at": at.isoformat()}))
    result.moved = len(ready)
    store.put_batch(stage, batch.with_event("distribute_employer", at.isoformat(), actor, cards=len(ready),
                                            receiver=receiver))
    stage.audit(actor=actor, channel=Channel.BATCH, action="production.distribute_employer",
                subject=f"batch {batch_id}", at=at,
                details={"cards": len(ready), "employer": batch.employer, "receiver": receiver})
    stage.commit(f"delivering batch {batch_id} to its employer")
    return result


def hand_over(registry: Registry, store: ProductionStore, batch_id: str, *, cards: Iterable[str] | None = None,
              actor: str, at: _dt.datetime | None = None) -> DistributionResult:
    """Record that the employer handed cards to their holders: ``cards`` (numbers), or all it holds."""
    at = as_instant(at)
    batch = store.batch(batch_id)
    rows = {row.card_number: row for row in store.rows(batch_id)}
    wanted = None if cards is None else [number.strip().upper() for number in cards]
    result = DistributionResult()
    chosen: list[BatchRow] = []
    for number in wanted if wanted is not None else list(rows):
        row = rows.get(number)
        if row is None:
            raise _refused("card", f"{number} is not a card of batch {batch_id}", code=ErrorCode.NOT_FOUND)
        if row.state is RowState.AT_EMPLOYER:
            chosen.append(row)
        elif wanted is not None and row.state is not RowState.HANDED_OVER:
            raise _refused("card", f"card {number} is {row.state.value}, not at the employer", row.masked_id)
    if not chosen:
        raise _refused("batch", "the employer holds none of these cards", f"batch {batch_id}")
    stage = registry.begin(at)
    for row in chosen:
        store.put_row(stage, replace(row, state=RowState.HANDED_OVER,
                                     handed_over={"receiver": "holder", "at": at.isoformat()}))
    result.moved = len(chosen)
    store.put_batch(stage, batch.with_event("hand_over", at.isoformat(), actor, cards=len(chosen)))
    stage.audit(actor=actor, channel=Channel.BATCH, action="production.hand_over", subject=f"batch {batch_id}",
                at=at, details={"cards": len(chosen), "employer": batch.employer})
    stage.commit(f"recording the hand-over of batch {batch_id}")
    return result


def _row_of(store: ProductionStore, card_number: str) -> BatchRow:
    number = card_number.strip().upper()
    row = store.row_of_card(number)
    if row is None:
        raise _refused("card", f"card {number} was not made through a production batch", code=ErrorCode.NOT_FOUND)
    return row


def check_pin(pin: str) -> str:
    low, high = PIN_DIGITS
    if not (pin.isascii() and pin.isdigit() and low <= len(pin) <= high):
        raise _refused("pin", f"must be {low} digits", code=ErrorCode.INVALID_ARGUMENT)
    if pin == INITIAL_PIN:
        raise _refused("pin", "must not be the initial PIN", code=ErrorCode.INVALID_ARGUMENT)
    if len(set(pin)) == 1:
        raise _refused("pin", "must not be one digit repeated", code=ErrorCode.INVALID_ARGUMENT)
    return pin


def activate(registry: Registry, store: ProductionStore, card_number: str, *, id_number: str, name: str,
             institution: str, new_pin: str, actor: str, transport: Transport | None = None,
             at: _dt.datetime | None = None) -> BatchRow:
    """Activate a handed-over card for its holder (see the module docstring). ``transport`` reaches the
    chip (a PC/SC reader holding the card); without one, the chip file is opened directly."""
    at = as_instant(at)
    institution = check_text(institution, "institution")
    new_pin = check_pin(new_pin)
    row = _row_of(store, card_number)
    if row.state is not RowState.HANDED_OVER:
        hint = {RowState.AT_EMPLOYER: "; record the hand-over first (batch distribute --to persons)",
                RowState.ACTIVATED: " already"}.get(row.state, "")
        raise _refused("state", f"card {row.card_number} is {row.state.value}{hint}", row.masked_id)
    person = registry.person(row.id_number)
    if id_number.strip().upper() != row.id_number or name.strip() != person.name:
        raise _refused("holder", "the ID card shown is not the holder's (ID number or name differs)",
                       f"card {row.card_number}", code=ErrorCode.INVALID_ARGUMENT)
    card = registry.card(row.card_number)
    _set_holder_pin(store, row, new_pin, transport)
    stage = registry.begin(at)
    registry.stage_advance(stage, card, CardEvent.ACTIVATE, actor=actor, channel=Channel.COUNTER, at=at,
                           details={"institution": institution})
    activated = replace(row, state=RowState.ACTIVATED, activated={"institution": institution, "at": at.isoformat()})
    store.put_row(stage, activated)
    stage.commit(f"activating card {row.card_number}")
    return activated


def _set_holder_pin(store: ProductionStore, row: BatchRow, new_pin: str, transport: Transport | None) -> None:
    channel = CardChannel(transport if transport is not None else MemoryTransport(open_chip(store, row.card_number)))
    terminal = Terminal(channel, sam=None)  # type: ignore[arg-type]  # reads and PIN only: no SAM work
    on_chip = terminal.read_holder()
    if on_chip.identity.card_number != row.card_number or on_chip.holder.ssn != row.id_number:
        raise _refused("chip", f"the card in the reader is {on_chip.identity.card_number}, not {row.card_number}",
                       mask_id(on_chip.holder.ssn))
    try:
        terminal.change_pin(INITIAL_PIN, new_pin)
        return
    except VerificationFailed:
        pass  # the initial PIN is gone: an earlier activation changed it and stopped before the registry
    try:
        terminal.verify_pin(new_pin)
    except StatusWordError as exc:
        raise _refused("pin", f"the chip no longer has the initial PIN and refuses this one ({exc}); "
                              "the holder's PIN is reset at the counter", f"card {row.card_number}") from None


def activate_financial(registry: Registry, store: ProductionStore, card_number: str, *, bank: str, actor: str,
                       at: _dt.datetime | None = None) -> BatchRow:
    at = as_instant(at)
    bank = check_text(bank, "bank")
    row = _row_of(store, card_number)
    if row.state is not RowState.ACTIVATED:
        raise _refused("state", f"card {row.card_number} is {row.state.value}: the social security functions are "
                                "activated first", row.masked_id)
    if row.bank_activation is not None:
        raise _refused("bank", f"card {row.card_number} was activated at {row.bank_activation['bank']} already",
                       row.masked_id, code=ErrorCode.ALREADY_EXISTS)
    updated = replace(row, bank_activation={"bank": bank, "at": at.isoformat()})
    stage = registry.begin(at)
    store.put_row(stage, updated)
    stage.audit(actor=actor, channel=Channel.COUNTER, action="production.financial_activation",
                subject=f"card {row.card_number}", at=at, details={"bank": bank})
    stage.commit(f"recording the financial activation of card {row.card_number}")
    return updated
