"""The built-in transit application: fares from the cards' e-purses (PURSE) into each operator's account.

It registers its manifest (PURSE only; one settlement account per operator of the fare network, named
``operator_<agency_id>``) and serves ``citycard.v1.Transit`` from its own process: online tap decisions on
gate streams, offline batch clearing with TAC checks, the denylist pushed to gates, each operator's daily
settlement. Every fare is booked through the core's Ledger service with the application's own credential.
See README.md (the design), FARES.md (fares), GATES.md (gates).

Environment (beside the plugin contract's): ``CITYCARD_TRANSIT_DIR`` (its store, the gate and operator
tokens and ``ready.json``, conventionally ``DATA/transit``; unset: the Transit service is not served),
``CITYCARD_TRANSIT_LISTEN`` (default ``127.0.0.1:0``; clients read the address from ``ready.json``),
``CITYCARD_TRANSIT_FEED`` (a GTFS-Fares v2 folder; default: the city's sample feed in ``feed/``),
``CITYCARD_CARD_KEYS`` (the issuer's key file, for the TAC checks of offline clearing).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from citycard.apps.plugin import Plugin, Session
from citycard.core.records import AccountKind, LedgerId, TransferCode

from citycard.v1 import applications_pb2

__all__ = ["AID", "ENV_DIR", "ENV_FEED", "ENV_LISTEN", "TransitPlugin", "feed_directory", "operator_account_name"]

AID = "A000000632010105"  # MOT T-Union (JT/T 978) e-purse application
ENV_DIR = "CITYCARD_TRANSIT_DIR"
ENV_LISTEN = "CITYCARD_TRANSIT_LISTEN"
ENV_FEED = "CITYCARD_TRANSIT_FEED"
DEFAULT_LISTEN = "127.0.0.1:0"
log = logging.getLogger("citycard.apps.bus")


def feed_directory() -> Path:
    return Path(os.environ.get(ENV_FEED) or Path(__file__).with_name("feed"))


def operator_account_name(agency_id: str) -> str:
    return "operator_" + "".join(c if c.isalnum() else "_" for c in agency_id.lower())


def _agency_ids(feed: Path) -> list[str]:
    """The operators of the feed (agency.txt), read plainly: the manifest is built before anything else runs."""
    with (feed / "agency.txt").open(encoding="utf-8-sig", newline="") as file:
        return [row["agency_id"].strip() for row in csv.DictReader(file) if row.get("agency_id", "").strip()]


class TransitPlugin(Plugin):
    name = "transit"

    def manifest(self) -> applications_pb2.Manifest:
        return applications_pb2.Manifest(
            name=self.name, aid=AID, ledgers=[LedgerId.PURSE],
            transfer_codes=[TransferCode.PURCHASE, TransferCode.REFUND],
            accounts=[applications_pb2.AccountSpec(name=operator_account_name(agency), ledger=LedgerId.PURSE,
                                                   kind=AccountKind.OPERATOR_SETTLEMENT)
                      for agency in _agency_ids(feed_directory())])

    def run(self, session: Session) -> None:
        directory = os.environ.get(ENV_DIR)
        if not directory:
            log.info("%s is not set: the Transit service is not served", ENV_DIR)
            session.stopping.wait()
            return
        import asyncio

        from citycard.apps.bus.runtime import run_transit

        asyncio.run(run_transit(session, Path(directory), os.environ.get(ENV_LISTEN, DEFAULT_LISTEN)))
