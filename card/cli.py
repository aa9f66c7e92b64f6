"""`citycard card virtual`: insert a virtual card into a running pcscd through vpcd.

    citycard card virtual --state FILE [--reader-port PORT] [--fsync]
    citycard card virtual --state FILE --new --keys KEYS.json [--profile-json PROFILE.json] [--create-only]

The card stays inserted until SIGINT or SIGTERM, then is removed (the TCP connection to vpcd
closes). If pcscd restarts meanwhile, the card re-inserts itself. Several cards in several readers
= several processes, one `--reader-port` each (vpcd slot ports: 35963 and 35964 for Debian's
default /etc/reader.conf.d/vpcd).

citycard/cli.py calls `register(card_subparsers)`; each sub-command sets `handler`, which
takes the parsed arguments and returns the exit status. `python -m citycard.card.cli` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .cos import VirtualCard
from .keys import KEY_FILE_ENV, KeyFileError, MasterKeys
from .personalize import SAMPLE_PROFILE, personalize, profile_from_json
from .ssse import HolderDataError
from .state import CardStateError, FileStore
from .vpcd import VPCD_DEFAULT_PORT, VpcdLink

__all__ = ["main", "register", "run_virtual"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (decimal or 0x hex)") from None
    if not 1 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1..65535")
    return port


def register(subparsers: Any) -> None:
    """Add `virtual` to the subparsers of the `card` command."""
    p = subparsers.add_parser(
        "virtual",
        help="insert a virtual card into a running pcscd (through vsmartcard-vpcd) until interrupted",
        description="Serve the card whose state is in --state in the vpcd reader slot at --reader-port. "
        "Ctrl-C or SIGTERM removes it.",
    )
    p.add_argument("--state", required=True, type=Path, metavar="FILE", help="the card's state file")
    p.add_argument("--reader-port", type=_port, default=VPCD_DEFAULT_PORT, metavar="PORT",
                   help=f"vpcd slot port (default {VPCD_DEFAULT_PORT} = 0x{VPCD_DEFAULT_PORT:X}, 'Virtual PCD 00 00')")
    p.add_argument("--host", default="127.0.0.1", help="where vpcd listens (default 127.0.0.1)")
    p.add_argument("--new", action="store_true", help="first create a fresh card in FILE (which must not exist)")
    p.add_argument("--profile-json", "--holder-json", dest="profile_json", type=Path, metavar="JSON",
                   help="with --new: holder, card and purse data (default: the built-in sample profile)")
    p.add_argument("--keys", type=Path, metavar="JSON",
                   help=f"with --new: issuer master key file (default: ${KEY_FILE_ENV})")
    p.add_argument("--create-only", action="store_true", help="with --new: write the card and exit")
    durability = p.add_mutually_exclusive_group()
    durability.add_argument("--fsync", dest="fsync", action="store_true",
                            help="fdatasync every state-changing command: also survives a power cut of the host "
                                 "(~0.3 ms or more per command)")
    durability.add_argument("--no-fsync", dest="fsync", action="store_false",
                            help="the default: one atomic write per command, safe against a pulled card or a "
                                 "killed process, not against a power cut of the host")
    p.set_defaults(handler=run_virtual, fsync=False)


def _create(args: argparse.Namespace) -> None:
    keys = MasterKeys.load(args.keys)
    if args.profile_json is not None:
        try:
            profile_obj = json.loads(args.profile_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HolderDataError(f"{args.profile_json}: cannot read the profile ({type(exc).__name__})") from None
    else:
        profile_obj = SAMPLE_PROFILE
    FileStore(args.state).create(personalize(profile_from_json(profile_obj), keys))


def run_virtual(args: argparse.Namespace) -> int:
    try:
        if args.new:
            _create(args)
            print(f"created a new card in {args.state}", flush=True)
            if args.create_only:
                return EXIT_OK
        elif args.create_only:
            print("--create-only needs --new", file=sys.stderr)
            return EXIT_BAD_INPUT
        card = VirtualCard.open(args.state, fsync=args.fsync)
    except (CardStateError, KeyFileError, HolderDataError) as exc:
        print(f"citycard card virtual: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    link = VpcdLink(card, args.reader_port, args.host)
    print(f"card {args.state} waiting for vpcd at {args.host}:{args.reader_port}; Ctrl-C removes it", flush=True)
    try:
        link.serve_until(stop)
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)
    print("card removed", flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="citycard card", description="the virtual card and its reader")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
