"""A short, readable run through the card lifecycle on the registry in a data directory.

``run_lifecycle_demo(data_dir, out)`` registers an employer and two persons, issues their cards,
credits medical contributions and loads an e-purse, then shows a phone loss report stopping a card
and its automatic restore after N working days, a written report freezing a card and the medical
account, a replacement that keeps the medical balance and leaves the e-purse behind, the denylist
delta, and the audit log verified. ``citycard demo`` calls it.

Times start at the clock's now (CITYCARD_NOW pins it) and move forward explicitly, so the demo shows
days passing without waiting for them. Run again on the same directory, it registers two more
persons (the next free ID numbers) and tells the same story.
"""

from __future__ import annotations

import datetime as _dt
import pathlib
from collections.abc import Callable, Iterable

from citycard.core import clock
from citycard.core.identity import check_character, mask_id
from citycard.core.registry import Registry, RegistryError, tick
from citycard.core.registry_records import ErrorCode

__all__ = ["run_lifecycle_demo"]

DEMO_OPERATOR = "demo-operator"
DEMO_UNIT_CODE = "91370100MA3C5LQX6E"
DEMO_UNIT_NAME = "济南示例科技有限公司"
DEMO_REGION = "370102"
ID_SEQUENCES_TRIED_MAX = 500
CONTRIBUTIONS_FEN = (120_000, 80_000)
PURSE_LOAD_FEN = 10_000


def run_lifecycle_demo(data_dir: pathlib.Path, out: Callable[[str], None]) -> None:
    with Registry.open(data_dir) as registry:
        _Demo(registry, out).run()


class _Demo:
    def __init__(self, registry: Registry, out: Callable[[str], None]) -> None:
        self.registry = registry
        self.out = out
        self.now = clock.now()

    def later(self, delta: _dt.timedelta) -> _dt.datetime:
        self.now = self.now + delta
        return self.now

    def run(self) -> None:
        registry, out = self.registry, self.out
        denylist_start = registry.denylist_version()
        wei, fang = self.register_people()
        wei_card = registry.issue_card(wei, actor=DEMO_OPERATOR, at=self.later(_dt.timedelta(minutes=5)))
        fang_card = registry.issue_card(fang, actor=DEMO_OPERATOR, at=self.now)
        out(f"Issued card {wei_card.card_number} to 张伟 and card {fang_card.card_number} to 王芳 at the counter; "
            "both are active.")
        for id_number, amount in zip((wei, fang), CONTRIBUTIONS_FEN, strict=True):
            registry.credit_contribution(id_number, amount, actor=DEMO_OPERATOR, at=self.now)
        registry.load_purse(wei_card.card_number, PURSE_LOAD_FEN, actor=DEMO_OPERATOR, at=self.now)
        out(f"Credited medical contributions ({_yuan(CONTRIBUTIONS_FEN[0])} and {_yuan(CONTRIBUTIONS_FEN[1])} yuan) "
            f"and loaded {_yuan(PURSE_LOAD_FEN)} yuan onto {wei_card.card_number}'s e-purse.")
        self.phone_report_and_restore(fang, fang_card.card_number)
        self.written_report_and_replacement(wei, wei_card.card_number)
        delta = registry.denylist_delta(denylist_start)
        out(f"Denylist: version {denylist_start} -> {delta.version}; a terminal at version {denylist_start} adds "
            f"{_cards(entry.card_number for entry in delta.added)} and removes {_cards(delta.removed)} "
            f"({fang_card.card_number} was listed and lifted again in between, so it is in neither).")
        problems = registry.verify_audit()
        verdict = "OK, the hash chain is intact" if not problems else f"{len(problems)} problem(s)!"
        out(f"Audit log: {registry.audit_entry_count()} entries, verify {verdict}.")

    def register_people(self) -> tuple[str, str]:
        registry = self.registry
        try:
            registry.employer(DEMO_UNIT_CODE)
        except RegistryError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            registry.add_employer(DEMO_UNIT_CODE, DEMO_UNIT_NAME, actor=DEMO_OPERATOR, at=self.now)
        wei = self.free_id("19850312", male=True)
        registry.add_person(id_number=wei, name="张伟", gender="male", date_of_birth="1985-03-12",
                            residence="济南市历下区泉城路1号", household_registration="济南市历下区",
                            employer=DEMO_UNIT_CODE, status="employed", actor=DEMO_OPERATOR, at=self.now)
        fang = self.free_id("19560720", male=False)
        registry.add_person(id_number=fang, name="王芳", gender="female", date_of_birth="1956-07-20",
                            residence="济南市市中区", household_registration="济南市市中区", status="retired",
                            categories=["senior"], actor=DEMO_OPERATOR, at=self.now)
        self.out(f"Registered employer {DEMO_UNIT_NAME} and two persons: 张伟 ({mask_id(wei)}, employed) and "
                 f"王芳 ({mask_id(fang)}, retired, senior); each has a medical personal account.")
        return wei, fang

    def free_id(self, birth: str, *, male: bool) -> str:
        """The first citizen ID of this region and birth date not yet registered (odd sequence: male)."""
        for sequence in range(1 if male else 2, 2 * ID_SEQUENCES_TRIED_MAX, 2):
            body = f"{DEMO_REGION}{birth}{sequence:03d}"
            number = body + check_character(body)
            try:
                self.registry.person(number)
            except RegistryError:
                return number
        raise RegistryError("id_number", "the demo ran out of free ID numbers; use a fresh --data directory")

    def phone_report_and_restore(self, id_number: str, card_number: str) -> None:
        registry, out = self.registry, self.out
        report = registry.report_loss_phone(id_number=id_number, name="王芳", gender="female", employer=None,
                                            actor=DEMO_OPERATOR, at=self.later(_dt.timedelta(hours=2)))
        out(f"{_when(report.accepted_at)}: 王芳 reports {card_number} lost by phone; it stops settling at once "
            f"(settles now? {registry.card_may_settle(card_number, self.now)[0]}).")
        if report.restore_at is None:
            out(f"No restore deadline can be computed: {'; '.join(report.warnings)}")
            return
        out(f"  No written report within {registry.settings.restore_workdays} working days means it is restored "
            f"at the end of {report.restore_deadline}.")
        for warning in report.warnings:
            out(f"  warning: {warning}")
        early = tick(registry, report.restore_at - _dt.timedelta(minutes=1))
        late = tick(registry, report.restore_at + _dt.timedelta(minutes=1))
        self.now = max(self.now, report.restore_at + _dt.timedelta(minutes=1))
        out(f"  Tick a minute before: {len(early.restored)} restored. Tick a minute after: "
            f"{_cards(r.card_number for r in late.restored)} restored; the card is "
            f"{registry.card(card_number).state.value} again.")

    def written_report_and_replacement(self, id_number: str, card_number: str) -> None:
        registry, out = self.registry, self.out
        person = registry.person(id_number)
        written = registry.report_loss_written(card_number, holder_id=id_number, holder_name="张伟",
                                               actor=DEMO_OPERATOR, at=self.later(_dt.timedelta(hours=9)))
        out(f"{_when(written.accepted_at)}: 张伟 reports {card_number} lost in writing: the card is "
            f"{written.card.state.value} and the medical account frozen="
            f"{registry.account_frozen(person.medical_account_id)}.")
        old, new = registry.replace(card_number, actor=DEMO_OPERATOR, at=self.later(_dt.timedelta(days=1)))
        medical = registry.medical_balance(id_number).credit_balance
        left_behind = registry.ledger.balance(old.purse_account_id).credit_balance
        out(f"{_when(self.now)}: replacement card {new.card_number} ({new.state.value}) reaches the same medical "
            f"account at once: balance {_yuan(medical)} yuan, frozen={registry.account_frozen(person.medical_account_id)}. "
            f"The old e-purse keeps its {_yuan(left_behind)} yuan (cash-like, not carried over); "
            f"{old.card_number} is {old.state.value} and denylisted for good.")


def _cards(numbers: Iterable[str]) -> str:
    return ", ".join(numbers) or "none"


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _when(instant: _dt.datetime) -> str:
    return instant.astimezone(clock.CITY_ZONE).strftime("%Y-%m-%d %H:%M")
