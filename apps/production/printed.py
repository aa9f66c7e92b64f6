"""Registering what the producer printed: the producer's results file, checked against the batch.

The file (DBF or CSV, GBK or UTF-8) has one line per printed card::

    card_number    KH, 卡号, 社会保障卡卡号
    chip_serial    XPXLH, XPH, 芯片序列号, 芯片号      4 to 16 bytes, hex
    card_id_code   SBM, 卡识别码, 识别码               32 hex digits
    atr            ATR, 复位信息                       the chip's answer to reset, hex (2 to 33 bytes, 3B or 3F first)

A line is registered when its card is in this batch, its row was approved by the employer, its card
identification code is the one the batch allocated, its chip serial is not registered to another
card (nor repeated in the file), and its ATR is well-formed. Registering moves the card through
``print`` and ``register`` in the registry and records the chip serial and ATR on the row, for all good
lines in one transaction. Every other line is a mismatch: reported (file, row, field, reason) and not
registered. A line registered before with the same chip changes nothing; with another chip it is a
mismatch. A file that cannot be read at all changes nothing.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path

from citycard.core.lifecycle import CardEvent, Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import as_instant

from .errors import RowProblem
from .rosterfile import RosterFile
from .store import BatchRow, ProductionStore, RowState

__all__ = ["PRINTED_COLUMNS", "PrintedResult", "register_printed"]

PRINTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "card_number": ("KH", "卡号", "社会保障卡卡号", "CARD_NUMBER"),
    "chip_serial": ("XPXLH", "XPH", "芯片序列号", "芯片号", "CHIP_SERIAL"),
    "card_id_code": ("SBM", "卡识别码", "识别码", "CARD_ID_CODE"),
    "atr": ("ATR", "复位信息"),
}
CHIP_SERIAL_BYTES = (4, 16)
ATR_BYTES = (2, 33)
_HEX = frozenset("0123456789ABCDEF")


@dataclass
class PrintedResult:
    registered: int = 0
    already: int = 0
    mismatches: list[RowProblem] = field(default_factory=list)


def register_printed(registry: Registry, store: ProductionStore, batch_id: str, path: Path, *, actor: str,
                     at: _dt.datetime | None = None) -> PrintedResult:
    at = as_instant(at)
    batch = store.batch(batch_id)
    rows = {row.card_number: row for row in store.rows(batch_id)}
    results = RosterFile.open(Path(path), display_name=Path(path).name, known=PRINTED_COLUMNS,
                              required=tuple(PRINTED_COLUMNS))
    result = PrintedResult()
    good: dict[str, tuple[BatchRow, str, str]] = {}
    chips_in_file: dict[str, int] = {}
    cards_in_file: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for raw in results.rows():
        first_line.setdefault(str(raw.values.get("card_number") or "").strip().upper(), raw.number)
        if raw.problem is not None:
            result.mismatches.append(raw.problem)
            continue
        problem = _check_line(results.display_name, raw.number, raw.values, rows, store, chips_in_file,
                              cards_in_file)
        if isinstance(problem, RowProblem):
            result.mismatches.append(problem)
        elif problem == "already":
            result.already += 1
        else:
            card_number = str(raw.values["card_number"]).strip().upper()
            good[card_number] = (rows[card_number], _hex(raw.values["chip_serial"]), _hex(raw.values["atr"]))
    for card, count in cards_in_file.items():
        if count > 1 and card in good:  # its first line looked good; which line is right is not known
            row = good.pop(card)[0]
            result.mismatches.append(RowProblem(results.display_name, first_line[card], "card_number",
                                                f"card {card} is on more than one line", row.masked_id))
    result.mismatches.sort(key=lambda problem: problem.row)
    if good:
        _register(registry, store, batch.batch_id, good, result, actor, at)
    return result


def _hex(value: object) -> str:
    return "".join(str(value or "").split()).upper()


def _check_line(file_name: str, number: int, values: dict[str, object], rows: dict[str, BatchRow],
                store: ProductionStore, chips_in_file: dict[str, int], cards_in_file: dict[str, int]
                ) -> RowProblem | str | None:
    card_number = str(values.get("card_number") or "").strip().upper()
    cards_in_file[card_number] = cards_in_file.get(card_number, 0) + 1
    row = rows.get(card_number)

    def mismatch(field_name: str, reason: str) -> RowProblem:
        return RowProblem(file_name, number, field_name, reason, row.masked_id if row else "")

    if row is None:
        return mismatch("card_number", f"{card_number!r} is not a card of this batch")
    if cards_in_file[card_number] > 1:
        return mismatch("card_number", f"card {card_number} is on more than one line")
    chip, atr, code = _hex(values.get("chip_serial")), _hex(values.get("atr")), _hex(values.get("card_id_code"))
    if code != row.card_id_code:
        return mismatch("card_id_code", f"{code or 'empty'} is not the code the batch allocated to card "
                                        f"{card_number} ({row.card_id_code})")
    if not _hex_bytes(chip, *CHIP_SERIAL_BYTES):
        return mismatch("chip_serial", f"{chip or 'empty'!s} is not {CHIP_SERIAL_BYTES[0]} to "
                                       f"{CHIP_SERIAL_BYTES[1]} bytes of hex")
    if not _hex_bytes(atr, *ATR_BYTES) or atr[:2] not in ("3B", "3F"):
        return mismatch("atr", f"{atr or 'empty'!s} is not an answer to reset (hex, 2 to 33 bytes, 3B or 3F first)")
    if row.state is RowState.REGISTERED or row.chip_serial is not None:
        if row.chip_serial == chip and row.atr == atr:
            return "already"
        return mismatch("chip_serial", f"card {card_number} was registered with chip {row.chip_serial}")
    if row.state is not RowState.APPROVED:
        why = ("was rejected by the employer" if row.state is RowState.REJECTED
               else "has no verdict from the employer yet" if row.state is RowState.ORDERED
               else f"is {row.state.value}")
        return mismatch("card_number", f"row {row.row} {why}; it should not have been printed")
    holder = store.card_of_chip(chip)
    if holder is not None and holder != card_number:
        return mismatch("chip_serial", f"chip {chip} is registered to card {holder}")
    seen = chips_in_file.setdefault(chip, number)
    if seen != number:
        return mismatch("chip_serial", f"chip {chip} is also on line {seen}")
    return None


def _hex_bytes(text: str, low: int, high: int) -> bool:
    return len(text) % 2 == 0 and low <= len(text) // 2 <= high and set(text) <= _HEX


def _register(registry: Registry, store: ProductionStore, batch_id: str, good: dict[str, tuple[BatchRow, str, str]],
              result: PrintedResult, actor: str, at: _dt.datetime) -> None:
    stage = registry.begin(at)
    for card_number, (row, chip, atr) in good.items():
        card = registry.card(card_number)
        card = registry.stage_advance(stage, card, CardEvent.PRINT, actor=actor, channel=Channel.BATCH, at=at,
                                      audit=False)
        registry.stage_advance(stage, card, CardEvent.REGISTER, actor=actor, channel=Channel.BATCH, at=at,
                               audit=False, details={"chip_serial": chip})
        store.put_row(stage, replace(row, state=RowState.REGISTERED, chip_serial=chip, atr=atr,
                                     registered_at=at.isoformat()))
        store.put_chip(stage, chip, card_number)
        result.registered += 1
    batch = store.batch(batch_id)
    store.put_batch(stage, batch.with_event("register_printed", at.isoformat(), actor, registered=result.registered,
                                            mismatches=len(result.mismatches)))
    stage.audit(actor=actor, channel=Channel.BATCH, action="production.printed_register", subject=f"batch {batch_id}",
                at=at, details={"registered": result.registered, "already": result.already,
                                "mismatches": len(result.mismatches),
                                "cards": sorted(good)[:1] + sorted(good)[-1:]})
    stage.commit(f"registering printed cards of batch {batch_id}")
