"""``citycard transit gate ...`` and ``citycard transit upload ...``: the gate simulator from the shell.

A gate taps the card in a PC/SC reader (a physical one, or a vpcd slot with ``citycard card virtual`` in it)
as a transit gate does (apps/bus/GATES.md), online through the Transit service or offline with its own
denylist and fares, and keeps each chip purchase in its store for ``upload``:

    citycard transit gate --reader "Virtual PCD 00 00" --gate-id M1-RAIL-01 --route M1 --stop M_RAIL \\
        --mode entry                                   # online: DATA/transit/ready.json, gate.token
    citycard transit gate --reader "Virtual PCD 00 00" --gate-id BUS1-07 --route 1 --stop B_RAIL \\
        --mode board --offline --watch                 # each card put on the reader, until Ctrl-C
    citycard transit upload --store var/transit/gates/BUS1-07

One line per tap (``--json``: one JSON object per line). Exit code: 0 when every tap was accepted, 1 when
one was refused, 2 when the command could not run (a bad option, no reader, no server for an upload).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import grpc
from google.protobuf import json_format

from citycard.apps.bus import feed_directory
from citycard.apps.bus.capp import ADULT, CappError
from citycard.apps.bus.gate import (
    RECORDS_PER_BATCH_MAX,
    EngineFares,
    FixedFare,
    Gate,
    GateError,
    GateStore,
    GateUnavailable,
    TapResult,
    TransitLink,
    upload_records,
)
from citycard.apps.bus.gtfs import FeedError
from citycard.card import KeyFileError, MasterKeys, TransportError
from citycard.card.channel import ApduEvent
from citycard.card.pcscd import PcscdError, wait_for_card, wait_until_empty
from citycard.commands.common import EXIT_REFUSED
from citycard.v1 import transit_pb2

__all__ = ["register"]

EXIT_TAP_REFUSED = 1
WAIT_POLL_S = 1.0  # how long one wait for a card (or its removal) blocks before looking again


SETTLEMENT_TIMEOUT_S = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("transit", help="transit: the gate simulator and its record upload")
    commands = parser.add_subparsers(dest="transit_command", required=True, metavar="TRANSIT_COMMAND")

    gate = commands.add_parser("gate", help="tap cards at a simulated gate through PC/SC, online or offline")
    gate.add_argument("--reader", required=True, help="the PC/SC reader name")
    gate.add_argument("--gate-id", required=True)
    gate.add_argument("--route", required=True, help="the line (GTFS route_id)")
    gate.add_argument("--stop", required=True, help="the station or stop (GTFS stop_id)")
    gate.add_argument("--mode", required=True, choices=("board", "entry", "exit"))
    gate.add_argument("--offline", action="store_true", help="decide at the gate (its denylist and fares)")
    _server_options(gate)
    gate.add_argument("--store", type=Path, default=None,
                      help="the gate's store (default: DATA/transit/gates/GATE_ID)")
    gate.add_argument("--keys", type=Path, default=None,
                      help="the issuer's master key file for the soft SAM (default: $CITYCARD_CARD_KEYS)")
    gate.add_argument("--terminal-id", default=None, metavar="HEX12",
                      help="the SAM's terminal id (default: derived from the gate id, kept in the store)")
    gate.add_argument("--feed", type=Path, default=None,
                      help="GTFS-Fares v2 folder for offline fares (default: $CITYCARD_TRANSIT_FEED or the sample)")
    gate.add_argument("--fare-fen", type=int, default=None,
                      help="offline: one flat fare for every tap instead of the feed's fares")
    gate.add_argument("--fallback-offline", action="store_true",
                      help="online: decide offline when the server does not answer in time")
    taps = gate.add_mutually_exclusive_group()
    taps.add_argument("--repeat", type=int, default=None, metavar="N", help="tap N cards, each put on in turn")
    taps.add_argument("--watch", action="store_true", help="tap every card put on the reader until Ctrl-C")
    gate.add_argument("--trace", action="store_true", help="print every APDU on stderr")
    gate.set_defaults(handler=_run(_gate))

    upload = commands.add_parser("upload", help="send a gate's stored chip records to the Transit service")
    upload.add_argument("--store", type=Path, required=True, help="the gate's store")
    _server_options(upload)
    upload.add_argument("--batch-max", type=int, default=None, help="records per batch (default: 8,189)")
    upload.set_defaults(handler=_run(_upload))

    settlement = commands.add_parser("settlement", help="an operator's day: taps, records, rejections, reconciled "
                                                        "with the ledger, and the settlement file")
    settlement.add_argument("--agency", required=True, help="the operator (GTFS agency_id)")
    settlement.add_argument("--date", default="", help="YYYY-MM-DD (default: today, city time)")
    settlement.add_argument("--csv", type=Path, default=None, help="also write the settlement file here")
    _server_options(settlement)
    settlement.set_defaults(handler=_run(_settlement), token_kind="operator")


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="var", metavar="DIR", help="data directory (default: ./var)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--server", default=None, metavar="HOST:PORT",
                        help="the Transit service (default: from DATA/transit/ready.json)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="the token (default: DATA/transit/gate.token; operator.token for settlement)")


class _Refused(Exception):
    pass


def _run(work):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        try:
            return int(work(args) or 0)
        except (_Refused, GateError, CappError, KeyFileError, TransportError, PcscdError, OSError) as exc:
            print(f"citycard: error: {exc}", file=sys.stderr)
            return EXIT_REFUSED
    return run


def _link(args: argparse.Namespace) -> TransitLink:
    address = args.server
    if address is None:
        ready = Path(args.data) / "transit" / "ready.json"
        if not ready.exists():
            raise _Refused(f"{ready} not found: is `citycard serve` running with the transit application? "
                           "or give --server HOST:PORT")
        address = json.loads(ready.read_text(encoding="utf-8"))["address"]
    kind = getattr(args, "token_kind", "gate")
    path = args.token_file or Path(args.data) / "transit" / f"{kind}.token"
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise _Refused(f"cannot read the {kind} token in {path}: {exc.strerror}") from None
    return TransitLink(address, token)


def _fares(args: argparse.Namespace) -> FixedFare | EngineFares:
    if args.fare_fen is not None:
        if not 0 <= args.fare_fen <= 0x7FFFFFFF:
            raise _Refused("--fare-fen: an integer number of fen, 0..2147483647")
        return FixedFare({ADULT: args.fare_fen})
    try:
        return EngineFares.from_feed(args.feed or feed_directory())
    except FeedError as exc:
        raise _Refused(f"offline fares: {exc}") from None


def _terminal_id(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise _Refused(f"--terminal-id: {text!r} is not 12 hex digits")
    return raw


def _gate(args: argparse.Namespace) -> int:
    if args.offline and (args.server or args.token_file):
        raise _Refused("--offline: a gate with no server takes no --server or --token-file")
    if args.repeat is not None and args.repeat < 1:
        raise _Refused("--repeat: at least 1")
    keys = MasterKeys.load(args.keys)
    link = None if args.offline else _link(args)
    fares = _fares(args) if args.offline or args.fallback_offline else None
    observers = (_trace,) if args.trace else ()
    gate = Gate.open(reader=args.reader, gate_id=args.gate_id, route_id=args.route, stop_id=args.stop,
                     mode=args.mode, store_dir=args.store or Path(args.data) / "transit" / "gates" / args.gate_id,
                     master_keys=keys, terminal_id=_terminal_id(args.terminal_id), fares=fares, link=link,
                     observers=observers)
    stop = threading.Event()
    try:
        if link is not None:
            try:
                gate.sync_denylist()
            except GateUnavailable as exc:
                print(f"citycard: warning: denylist not brought up to date: {exc}", file=sys.stderr)
            if args.watch or args.repeat:
                gate.follow_denylist(stop)
        if not (args.watch or args.repeat):
            return _show(args, gate.tap())
        return _tap_each_card(args, gate)
    finally:
        stop.set()
        gate.close()


def _tap_each_card(args: argparse.Namespace, gate: Gate) -> int:
    code, taps = 0, 0
    while args.watch or taps < args.repeat:
        try:
            wait_for_card(args.reader, WAIT_POLL_S)
        except PcscdError as exc:
            if "timed out" in str(exc):
                continue
            raise
        code = max(code, _show(args, gate.tap()))
        taps += 1
        while True:  # one tap per card: wait for it to leave
            try:
                wait_until_empty(args.reader, WAIT_POLL_S)
                break
            except PcscdError as exc:
                if "timed out" not in str(exc):
                    raise
    return code


def _show(args: argparse.Namespace, result: TapResult) -> int:
    print(json.dumps(result.to_json(), ensure_ascii=False) if args.json else result.line(), flush=True)
    return 0 if result.accepted else EXIT_TAP_REFUSED


def _trace(event: ApduEvent) -> None:
    print(event.describe(), file=sys.stderr, flush=True)


def _upload(args: argparse.Namespace) -> int:
    store = GateStore.existing(args.store)
    link = _link(args)
    try:
        answers = upload_records(store, link, batch_max=args.batch_max or RECORDS_PER_BATCH_MAX)
    finally:
        link.close()
    if not answers:
        print(json.dumps({"batches": []}) if args.json else f"{store.gate_id}: nothing to upload")
        return 0
    for answer in answers:
        if args.json:
            print(json.dumps(json_format.MessageToDict(answer, preserving_proto_field_name=True,
                                                       always_print_fields_with_no_presence=True),
                             ensure_ascii=False))
            continue
        print(f"batch {answer.batch_id}{' (sent before)' if answer.replayed else ''}: booked {answer.booked} "
              f"({answer.booked_fen // 100}.{answer.booked_fen % 100:02d}), already cleared "
              f"{answer.already_cleared}, entry only {answer.entry_only}, rejected {answer.rejected}")
        for problem in answer.problems:
            if problem.outcome in (_outcome("RECORD_ALREADY_CLEARED"), _outcome("RECORD_ENTRY_ONLY")):
                continue
            print(f"  record {problem.index} {problem.app_serial} #{problem.card_counter}: "
                  f"{_outcome_name(problem.outcome)}: {problem.message}")
    return 0 if all(answer.rejected == 0 for answer in answers) else EXIT_TAP_REFUSED


def _settlement(args: argparse.Namespace) -> int:
    link = _link(args)
    try:
        answer = link.stub.GetSettlement(transit_pb2.GetSettlementRequest(agency_id=args.agency, date=args.date),
                                         metadata=link.metadata, timeout=SETTLEMENT_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise _Refused(f"{exc.code().name}: {exc.details()}") from None
    finally:
        link.close()
    if args.csv is not None:
        args.csv.write_text(answer.csv, encoding="utf-8")
    if args.json:
        print(json.dumps(json_format.MessageToDict(answer, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True), ensure_ascii=False))
    else:
        print(f"{answer.agency_id} {answer.date}: {answer.online_taps} online taps, {answer.offline_records} offline "
              f"records; owed {answer.amount_fen // 100}.{answer.amount_fen % 100:02d}, the ledger received "
              f"{answer.ledger_received_fen // 100}.{answer.ledger_received_fen % 100:02d}: "
              + ("reconciled" if answer.reconciled else "NOT RECONCILED"))
        print(answer.csv, end="")
    return 0 if answer.reconciled else EXIT_TAP_REFUSED


def _outcome(name: str) -> int:
    return int(transit_pb2.RecordOutcome.Value(name))


def _outcome_name(value: int) -> str:
    return transit_pb2.RecordOutcome.Name(value).removeprefix("RECORD_")
