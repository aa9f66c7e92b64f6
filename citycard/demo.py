"""`citycard demo`: a small realistic day on the embedded ledger, and what happened.

The day books contributions into medical personal accounts, a pharmacy purchase and a hospital bill
against them, loads and bus fares on e-purses, a refund, and two things the rules refuse: a bus fare
taken from a medical account (the two kinds of money never meet) and a fare larger than what is on the
purse. Run it twice: the second run sends the same transfers again, and every one answers `exists`.

Later parts of the platform add their own acts (the card lifecycle, the virtual card through PC/SC).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from citycard.core.ledger import Ledger, accounts_array, transfers_array
from citycard.core.records import (
    AccountFlags,
    AccountKind as K,
    AccountResult,
    LedgerId as L,
    TransferCode as C,
    TransferFlags as F,
    TransferResult,
)

LIMIT = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS


@dataclass(frozen=True)
class DemoAccount:
    id: int
    name: str
    ledger: L
    kind: K


ACCOUNTS = [
    DemoAccount(101, "Individual-account fund", L.MEDICAL, K.FUND),
    DemoAccount(102, "Pooled fund", L.MEDICAL, K.FUND),
    DemoAccount(111, "Zhang Wei 张伟 (medical)", L.MEDICAL, K.PERSON_MEDICAL),
    DemoAccount(112, "Li Na 李娜 (medical)", L.MEDICAL, K.PERSON_MEDICAL),
    DemoAccount(121, "Renhe Pharmacy 仁和大药房", L.MEDICAL, K.INSTITUTION_SETTLEMENT),
    DemoAccount(122, "First People's Hospital", L.MEDICAL, K.INSTITUTION_SETTLEMENT),
    DemoAccount(201, "Bank load account", L.PURSE, K.OPERATOR_SETTLEMENT),
    DemoAccount(202, "City Bus Co.", L.PURSE, K.OPERATOR_SETTLEMENT),
    DemoAccount(211, "Zhang Wei's card (e-purse)", L.PURSE, K.CARD_PURSE),
    DemoAccount(212, "Li Na's card (e-purse)", L.PURSE, K.CARD_PURSE),
]
NAMES = {account.id: account.name for account in ACCOUNTS}


def _t(id, debit, credit, fen, ledger, code, what, **extra):
    return dict(id=id, debit_account_id=debit, credit_account_id=credit, amount=fen, ledger=ledger, code=code,
                **extra), what


# The day, in order. Amounts are fen (0.01 CNY).
DAY = [
    _t(1001, 101, 111, 26_840, L.MEDICAL, C.CONTRIBUTION, "monthly contribution credited to Zhang Wei"),
    _t(1002, 101, 112, 19_420, L.MEDICAL, C.CONTRIBUTION, "monthly contribution credited to Li Na"),
    _t(1003, 111, 121, 8_650, L.MEDICAL, C.SETTLEMENT, "Zhang Wei buys medicine at Renhe Pharmacy"),
    _t(1004, 121, 111, 2_000, L.MEDICAL, C.REFUND, "the pharmacy refunds one returned item", ref_id=1003),
    # A hospital bill, one linked chain: the pooled fund's share and the insured's share book together.
    _t(1005, 102, 122, 30_000, L.MEDICAL, C.POOLED_FUND_PAYMENT, "hospital bill: pooled fund's share",
       flags=F.LINKED),
    _t(1006, 112, 122, 12_000, L.MEDICAL, C.SETTLEMENT, "hospital bill: Li Na's share from her account"),
    _t(2001, 201, 211, 10_000, L.PURSE, C.LOAD, "Zhang Wei loads 100.00 onto his card at the bank"),
    _t(2002, 201, 212, 300, L.PURSE, C.LOAD, "Li Na loads 3.00 onto her card"),
    _t(2003, 211, 202, 200, L.PURSE, C.PURCHASE, "bus fare, Zhang Wei"),
    _t(2004, 211, 202, 200, L.PURSE, C.PURCHASE, "bus fare, Zhang Wei, ride home"),
    _t(2005, 212, 202, 200, L.PURSE, C.PURCHASE, "bus fare, Li Na"),
    # Refused by the rules:
    _t(3001, 111, 202, 200, L.MEDICAL, C.PURCHASE, "a bus fare taken from Zhang Wei's MEDICAL account"),
    _t(3002, 212, 202, 200, L.PURSE, C.PURCHASE, "Li Na's ride home: 2.00 on a purse holding 1.00"),
]


def fen(amount: int) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}{abs(amount) // 100:,}.{abs(amount) % 100:02d}"


def book_the_day(ledger: Ledger, console: Console) -> None:
    rows = [dict(id=a.id, ledger=a.ledger, code=a.kind, flags=LIMIT if a.kind in (K.PERSON_MEDICAL, K.CARD_PURSE) else 0)
            for a in ACCOUNTS]
    created = ledger.create_accounts(accounts_array(rows))
    fresh = int((created["status"] == AccountResult.OK).sum())
    console.print(f"[bold]Accounts[/]: {fresh} opened, {len(rows) - fresh} already there "
                  f"(MEDICAL: record-only personal accounts; PURSE: the cards' e-purse shadows).")
    results = ledger.create_transfers(transfers_array(row for row, _ in DAY))
    table = Table(title="The day's transfers (one durable batch)", show_lines=False)
    for column in ("#", "what", "ledger", "amount", "result"):
        table.add_column(column, justify="right" if column == "amount" else "left")
    for (row, what), result in zip(DAY, results):
        status = TransferResult(int(result["status"]))
        colour = {TransferResult.OK: "green", TransferResult.EXISTS: "cyan"}.get(status, "red")
        table.add_row(str(row["id"]), what, L(row["ledger"]).name, fen(row["amount"]),
                      f"[{colour}]{status.name.lower()}[/]")
    console.print(table)
    refused = [(row, what, TransferResult(int(r["status"]))) for (row, what), r in zip(DAY, results)
               if r["status"] not in (TransferResult.OK, TransferResult.EXISTS)]
    if refused:
        console.print("[bold]Refused, and why[/]:")
        for row, what, status in refused:
            console.print(f"  {row['id']}: {what} -> [red]{status.name.lower()}[/]: {WHY.get(status, '')}")
    if any(int(r["status"]) == TransferResult.EXISTS for r in results):
        console.print("[cyan]This day was booked before: each resent transfer answered `exists` (a resent linked "
                      "chain fails as one, so its second transfer shows linked_event_failed) and nothing moved twice: "
                      "ids are idempotency keys.[/]")


WHY = {
    TransferResult.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER:
        "the medical account (MEDICAL) and the bus company (PURSE) are on different ledgers; nothing ever "
        "crosses them",
    TransferResult.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS: "the transfer names another ledger than its accounts",
    TransferResult.EXCEEDS_CREDITS: "the purse may not go below zero (debits must not exceed credits)",
    TransferResult.MOVEMENT_NOT_ALLOWED: "MEDICAL allows only its table of movements",
}


def show_balances(ledger: Ledger, console: Console) -> None:
    table = Table(title="Balances (CNY)")
    for column in ("account", "ledger", "credits", "debits", "held", "balance"):
        table.add_column(column, justify="left" if column in ("account", "ledger") else "right")
    for account in ACCOUNTS:
        b = ledger.balance(account.id)
        table.add_row(account.name, account.ledger.name, fen(b.credits_posted), fen(b.debits_posted),
                      fen(b.debits_pending), fen(b.credits_posted - b.debits_posted - b.debits_pending))
    console.print(table)
    for number, (dp, dpo, cp, cpo) in sorted(ledger.totals().items()):
        verdict = "[green]balanced[/]" if (dp, dpo) == (cp, cpo) else "[red]NOT BALANCED[/]"
        console.print(f"  ledger {L(number).name}: debits {fen(dpo)} = credits {fen(cpo)}: {verdict}")


def run(args: argparse.Namespace) -> int:
    console = Console()
    data = Path(args.data)
    console.rule("[bold]citycard demo: a day on the settlement core")
    console.print(f"Embedded ledger: {data / 'ledger'} (LMDB, one fsync per batch)")
    with Ledger(data / "ledger") as ledger:
        book_the_day(ledger, console)
        show_balances(ledger, console)
    return 0 if _more_acts(data, console) else 1


def _more_acts(data: Path, console: Console) -> bool:
    """The acts of the other parts of the platform, where they are built. False if one could not run."""
    lifecycle = _optional("citycard.lifecycle_demo")
    if lifecycle is not None:
        console.rule("[bold]Cards and their lifecycle")
        lifecycle.run_lifecycle_demo(_fresh(data / "demo-lifecycle"), console.print)
    production = _optional("citycard.production_demo")
    if production is not None:
        console.rule("[bold]Card production: a small employer's batch from roster to activated cards")
        production.run_production_demo(_fresh(data / "demo-production"), console.print)
    grpc_act = _optional("citycard.grpc_demo")
    if grpc_act is not None:
        console.rule("[bold]The gRPC platform: the server, its plugins, and a plugin out of scope")
        grpc_act.run_grpc_demo(_fresh(data / "demo-grpc"),
                               lambda line: console.print(line, markup=False, highlight=False))
    medical = _optional("citycard.medical_demo")
    if medical is not None:
        console.rule("[bold]The medical application: settlement at the counter through the card and gRPC")
        from citycard.card.pcscd import PcscdError
        from citycard.card.vpcd import VpcdError

        try:
            medical.run_medical_demo(_fresh(data / "demo-medical"),
                                     lambda line: console.print(line, markup=False, highlight=False))
        except (PcscdError, VpcdError) as failure:
            console.print(f"[red]The medical act could not run: {failure}.[/]")
            return False
    transit = _optional("citycard.transit_demo")
    if transit is not None:
        console.rule("[bold]Transit: a morning rush at online and offline gates, a lost card, the operators' settlement")
        transit.run_transit_demo(_fresh(data / "demo-transit"),
                                 lambda line: console.print(line, markup=False, highlight=False))
    card = _optional("citycard.card.demo")
    if card is not None:
        console.rule("[bold]The card itself: a virtual CPU card through real PC/SC")
        from citycard.card.pcscd import PcscdError
        from citycard.card.vpcd import VpcdError

        try:
            card.run_card_demo(lambda line: console.print(line, markup=False, highlight=False))
        except (PcscdError, VpcdError) as failure:
            # One pcscd serves a machine: a foreign one without the vpcd reader blocks this act.
            console.print(f"[red]The card act could not run: {failure}. Stop the other pcscd "
                          "(or free vpcd's port 35963) and run the demo again.[/]")
            return False
    return True


def _fresh(directory: Path) -> Path:
    """A scratch folder for one act, emptied first: each act starts from nothing and its files stay to look at."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _optional(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as missing:
        if missing.name and module_name.startswith(missing.name):
            return None
        raise
