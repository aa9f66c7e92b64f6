"""``citycard card issue|show|advance|report-loss|restore|replace|renew|cancel|pin-reset|refund-purse``.

``report-loss --channel phone`` checks the caller's name, gender, ID number and employer;
``--channel written`` the holder's ID number and name as on the ID card shown (``--agent-id`` and
``--agent-name`` when someone reports on the holder's behalf); ``--channel online`` is the
self-service call: ID number plus the self-service password, read from stdin or a prompt.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from typing import Any

from citycard.commands.common import (
    add_common_options,
    command,
    emit,
    fen,
    fields_table,
    open_registry,
    operator,
    read_secret,
    record_unmask,
    table,
)
from citycard.core import clock
from citycard.core.lifecycle import Channel
from citycard.core.registry import LossReportResult, Registry
from citycard.core.registry_records import CancelReason, Card, CardKind, RegistryError

__all__ = ["register"]

PRODUCTION_STEPS = ("print", "register", "distribute", "activate")


def register(card_commands: argparse._SubParsersAction) -> None:
    _issue(card_commands)

    show = card_commands.add_parser("show", help="a card, its e-purse and its history (by number or legacy number)")
    show.add_argument("card")
    add_common_options(show)
    show.set_defaults(handler=show_card)

    advance = card_commands.add_parser("advance", help="a production step of an ordered card")
    advance.add_argument("card")
    advance.add_argument("step", choices=PRODUCTION_STEPS)
    advance.add_argument("--channel", default="counter", choices=["counter", "batch", "online"])
    add_common_options(advance)
    advance.set_defaults(handler=advance_card)

    _report_loss(card_commands)

    restore = card_commands.add_parser("restore", help="lift a phone or online loss report (the card was found)")
    restore.add_argument("card")
    restore.add_argument("--reason", required=True)
    add_common_options(restore)
    restore.set_defaults(handler=restore_card)

    for name, help_text in (("replace", "a new card for one reported lost in writing"),
                            ("renew", "a new card for an active or expired one")):
        parser = card_commands.add_parser(name, help=help_text)
        parser.add_argument("card")
        parser.add_argument("--batch", action="store_true", help="order the new card from production "
                                                                 "(default: made at the counter, active at once)")
        add_common_options(parser)
        parser.set_defaults(handler=retire_and_reissue, operation=name)

    cancel = card_commands.add_parser("cancel", help="cancel a card for good")
    cancel.add_argument("card")
    cancel.add_argument("--reason", required=True, choices=[reason.value for reason in CancelReason])
    cancel.add_argument("--note", default=None)
    add_common_options(cancel)
    cancel.set_defaults(handler=cancel_card)

    pin = card_commands.add_parser("pin-reset", help="record a holder's PIN reset request")
    pin.add_argument("card")
    pin.add_argument("--id-number", required=True, help="the holder's ID number, from the ID card shown")
    pin.add_argument("--name", required=True)
    add_common_options(pin)
    pin.set_defaults(handler=request_pin_reset)

    refund = card_commands.add_parser("refund-purse", help="redeem a retired card's e-purse (where the city allows)")
    refund.add_argument("card")
    add_common_options(refund)
    refund.set_defaults(handler=refund_purse)


def _issue(card_commands: argparse._SubParsersAction) -> None:
    issue = card_commands.add_parser("issue", help="issue a card to a person (or an employer card to a unit)")
    issue.add_argument("holder", help="the person's ID number (or the unit code with --kind employer)")
    issue.add_argument("--kind", default="individual", choices=[kind.value for kind in CardKind])
    issue.add_argument("--batch", action="store_true",
                       help="order the card from production (default: made at the counter, active at once)")
    issue.add_argument("--legacy-barcode", default=None, help="the number of the bar-code card it takes over")
    issue.add_argument("--legacy-magstripe", default=None, help="the number of the magnetic-stripe card it takes over")
    issue.add_argument("--card-number", default=None, help="keep a number given by a migration")
    add_common_options(issue)
    issue.set_defaults(handler=issue_card)


def _report_loss(card_commands: argparse._SubParsersAction) -> None:
    report = card_commands.add_parser("report-loss", help="a loss report by phone, in writing or online")
    report.add_argument("card", nargs="?", default=None,
                        help="the card (phone and online: default the person's current card)")
    report.add_argument("--channel", required=True, choices=["phone", "written", "online"])
    report.add_argument("--id-number", required=True,
                        help="the holder's ID number (a unit code for an employer card)")
    report.add_argument("--name", default=None, help="phone, written: the holder's name")
    report.add_argument("--gender", default=None, choices=["male", "female"], help="phone")
    report.add_argument("--employer", default=None, help="phone: the employer's unit code or name, if any")
    report.add_argument("--agent-id", default=None, help="written: the ID number of an agent reporting for the holder")
    report.add_argument("--agent-name", default=None, help="written: the agent's name")
    add_common_options(report)
    report.set_defaults(handler=report_loss)


@command
def issue_card(args: argparse.Namespace) -> int:
    aliases = {name: number for name, number in (("barcode", args.legacy_barcode),
                                                  ("magstripe", args.legacy_magstripe)) if number}
    with open_registry(args) as registry:
        card = registry.issue_card(args.holder, kind=args.kind, actor=operator(args),
                                   channel=Channel.BATCH if args.batch else Channel.COUNTER,
                                   legacy_aliases=aliases, card_number=args.card_number)
        record_unmask(registry, args, card.subject)
        document = card_document(registry, card, unmask=args.unmask)
    emit(args, document, lambda out: render_card(out, document, "card issued"))
    return 0


@command
def show_card(args: argparse.Namespace) -> int:
    with open_registry(args, write=args.unmask) as registry:
        card = registry.card(args.card)
        record_unmask(registry, args, card.subject)
        document = card_document(registry, card, unmask=args.unmask)
    emit(args, document, lambda out: render_card(out, document, "card"))
    return 0


@command
def advance_card(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        card = registry.advance(args.card, args.step, actor=operator(args), channel=args.channel)
        document = card_document(registry, card, unmask=args.unmask)
    emit(args, document, lambda out: render_card(out, document, f"card {args.step}"))
    return 0


@command
def report_loss(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        result = _report(registry, args)
        record_unmask(registry, args, result.card.subject)
        document = {"report": _report_document(result), **card_document(registry, result.card, unmask=args.unmask)}
    emit(args, document, lambda out: render_report(out, document))
    return 0


def _report(registry: Registry, args: argparse.Namespace) -> LossReportResult:
    if args.channel == "phone":
        for option in ("name", "gender"):
            if getattr(args, option) is None:
                raise RegistryError(option, "a phone report needs the caller's name, gender, ID number and employer")
        return registry.report_loss_phone(id_number=args.id_number, name=args.name, gender=args.gender,
                                          employer=args.employer, card_number=args.card, actor=operator(args))
    if args.channel == "written":
        if args.card is None or args.name is None:
            raise RegistryError("card" if args.card is None else "name",
                                "a written report names the card and the holder's name as on the ID card")
        return registry.report_loss_written(args.card, holder_id=args.id_number, holder_name=args.name,
                                            agent_id=args.agent_id, agent_name=args.agent_name, actor=operator(args))
    password = read_secret("self-service password: ")
    return registry.report_loss_online(id_number=args.id_number, password=password, card_number=args.card)


@command
def restore_card(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        card = registry.restore(args.card, reason=args.reason, actor=operator(args))
        document = card_document(registry, card, unmask=args.unmask)
    emit(args, document, lambda out: render_card(out, document, "card restored"))
    return 0


@command
def retire_and_reissue(args: argparse.Namespace) -> int:
    channel = Channel.BATCH if args.batch else Channel.COUNTER
    with open_registry(args) as registry:
        operation = registry.replace if args.operation == "replace" else registry.renew
        old, new = operation(args.card, actor=operator(args), channel=channel)
        record_unmask(registry, args, new.subject)
        document = {"old_card": card_document(registry, old, unmask=args.unmask),
                    "new_card": card_document(registry, new, unmask=args.unmask)}

    def render(out: Any) -> None:
        old_doc, new_doc = document["old_card"], document["new_card"]
        out.print(f"card {old.card_number} is now {old.state.value}; new card {new.card_number} is {new.state.value}")
        out.print(f"left behind on the old card's e-purse: {fen(old_doc['purse']['balance_fen'])} yuan")
        render_card(out, new_doc, "new card")

    emit(args, document, render)
    return 0


@command
def cancel_card(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        card = registry.cancel(args.card, reason=args.reason, note=args.note, actor=operator(args))
        document = card_document(registry, card, unmask=args.unmask)
    emit(args, document, lambda out: render_card(out, document, "card cancelled"))
    return 0


@command
def request_pin_reset(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        request = registry.request_pin_reset(args.card, holder_id=args.id_number, holder_name=args.name,
                                             actor=operator(args))
    document = request.to_json()
    emit(args, document, lambda out: out.print(fields_table("PIN reset requested", document)))
    return 0


@command
def refund_purse(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        card = registry.card(args.card)
        before = registry.ledger.balance(card.purse_account_id).credit_balance
        transfer = registry.refund_purse(card.card_number, actor=operator(args))
    document = {"card_number": card.card_number, "refunded_fen": before, "transfer": f"{transfer:032x}",
                "to_account": f"{Registry.suspense_account_id:032x}"}
    emit(args, document, lambda out: out.print(
        f"card {card.card_number}: {fen(before)} yuan redeemed to the suspense account (transfer {transfer:032x})"))
    return 0


# -- documents and rendering -------------------------------------------------------------------------


def card_document(registry: Registry, card: Card, *, unmask: bool) -> dict[str, Any]:
    may_settle, reason = registry.card_may_settle(card.card_number, clock.now())
    history = [{key: value for key, value in row.items() if key != "at_ns"}
               for row in registry.history(card.card_number)]
    return {
        "card": card.public(unmask=unmask),
        "purse": {"id": f"{card.purse_account_id:032x}",
                  "balance_fen": registry.ledger.balance(card.purse_account_id).credit_balance},
        "settles_now": may_settle, "settles_reason": reason,
        "history": history,
    }


def _report_document(result: LossReportResult) -> dict[str, Any]:
    return {
        "accepted_at": result.accepted_at.isoformat(),
        "restore_deadline": None if result.restore_deadline is None else result.restore_deadline.isoformat(),
        "restore_at": None if result.restore_at is None else result.restore_at.isoformat(),
        "warnings": list(result.warnings),
    }


def render_card(out: Any, document: dict[str, Any], title: str) -> None:
    card = document["card"]
    out.print(fields_table(title, {name: value for name, value in card.items() if name != "loss_report"}))
    if card["loss_report"]:
        out.print(fields_table("loss report", card["loss_report"]))
    out.print(f"e-purse {document['purse']['id']}: balance {fen(document['purse']['balance_fen'])} yuan")
    out.print(f"settles now: {'yes' if document['settles_now'] else 'no'} ({document['settles_reason']})")
    out.print(table("history", ("at", "event", "from", "to", "actor", "channel", "reason"),
                    ((_short_time(row["at"]), row["event"], row["from"], row["to"], row["actor"], row["channel"], row["reason"])
                     for row in document["history"])))


def _short_time(iso: str) -> str:
    """An instant in city time without its offset, as an operator reads it: 2025-09-30 21:00:00."""
    return _dt.datetime.fromisoformat(iso).astimezone(clock.CITY_ZONE).strftime("%Y-%m-%d %H:%M:%S")


def render_report(out: Any, document: dict[str, Any]) -> None:
    report, card = document["report"], document["card"]
    out.print(f"card {card['card_number']} is now {card['state']}; report accepted at {report['accepted_at']}")
    if report["restore_deadline"]:
        out.print(f"without a written report by the end of {report['restore_deadline']} "
                  f"the card is restored at {report['restore_at']}")
    for warning in report["warnings"]:
        out.print(f"warning: {warning}")
