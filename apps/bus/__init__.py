"""The built-in transit application: the city's bus fares, booked from the cards' e-purses (PURSE).

For now it registers its manifest and keeps the denylist a gate needs: it follows Cards.StreamDenylist and
holds the current set of refused cards (logged as it changes). The Transit issue adds tap decisions and
offline batch upload through the Transit service.
"""

from __future__ import annotations

import logging
import threading

import grpc
from citycard.apps.plugin import Plugin, Session
from citycard.core.records import AccountKind, LedgerId, TransferCode

from citycard.v1 import applications_pb2, cards_pb2

__all__ = ["AID", "TransitPlugin"]

AID = "A000000632010105"  # MOT T-Union (JT/T 978) e-purse application
RECONNECT_S = 2.0
STOP_POLL_S = 0.2
log = logging.getLogger("citycard.apps.bus")


class TransitPlugin(Plugin):
    name = "transit"

    def __init__(self) -> None:
        self.denylisted: set[str] = set()
        self.version = 0

    def manifest(self) -> applications_pb2.Manifest:
        return applications_pb2.Manifest(
            name=self.name, aid=AID, ledgers=[LedgerId.PURSE],
            transfer_codes=[TransferCode.PURCHASE, TransferCode.REFUND],
            accounts=[applications_pb2.AccountSpec(name="fares", ledger=LedgerId.PURSE,
                                                   kind=AccountKind.OPERATOR_SETTLEMENT)])

    def apply(self, delta: cards_pb2.StreamDenylistResponse) -> None:
        self.denylisted.update(entry.card_number for entry in delta.added)
        self.denylisted.difference_update(delta.removed)
        self.version = delta.version

    def run(self, session: Session) -> None:
        while not session.stopping.is_set():
            stream = session.cards.StreamDenylist(
                cards_pb2.StreamDenylistRequest(since_version=self.version, follow=True), metadata=session.metadata)
            following = threading.Event()
            threading.Thread(target=_cancel_on_stop, args=(session, stream, following), daemon=True).start()
            try:
                for delta in stream:
                    self.apply(delta)
                    log.info("denylist version %d: %d card(s) refused", self.version, len(self.denylisted))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    log.warning("denylist stream ended (%s); reconnecting", exc.code().name)
            finally:
                following.set()
            session.wait(RECONNECT_S)


def _cancel_on_stop(session: Session, stream: grpc.Future, following: threading.Event) -> None:
    """Cancel the blocking stream when the plugin is told to stop (iteration itself cannot be interrupted)."""
    while not following.is_set():
        if session.stopping.wait(STOP_POLL_S):
            stream.cancel()
            return
