"""The transit application's process: its connections to the core, its Transit server, its sweeper.

``run_transit`` is what ``TransitPlugin.run`` runs inside the plugin process (apps/plugin.py): one asyncio
loop for the gates' streams, the core's ledger stream and denylist stream, and the missing tap-off sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
from citycard.apps.bus import feed_directory, operator_account_name
from citycard.apps.bus.denylist import DenylistRelay
from citycard.apps.bus.gtfs import load_feed
from citycard.apps.bus.ledger_link import LedgerLink
from citycard.apps.bus.service import TransitService
from citycard.apps.bus.servicer import READY_FILE, TransitServicer, write_ready
from citycard.apps.bus.store import Store
from citycard.apps.plugin import ENV_SERVER, Session
from citycard.card.keys import KeyFileError, MasterKeys
from citycard.core.settings import load_settings

from citycard.v1 import transit_pb2_grpc

__all__ = ["run_transit"]

STORE_FILE = "transit.sqlite"
DENYLIST_READY_S = 30.0
GRACE_S = 2.0
log = logging.getLogger("citycard.apps.bus")


def _tac_verifier() -> object | None:
    from citycard.apps.bus.tac import TacVerifier

    try:
        keys = MasterKeys.load()
    except KeyFileError as exc:
        log.warning("offline clearing is off: %s", exc)
        return None
    return TacVerifier.from_master_keys(keys, threads=min(2, os.cpu_count() or 1))


async def run_transit(session: Session, directory: Path, listen: str) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    network = load_feed(feed_directory())
    owned = {account.name: int(account.id, 16) for account in session.application.accounts}
    operators = {agency: owned[operator_account_name(agency)] for agency in network.agencies
                 if operator_account_name(agency) in owned}
    for agency in network.agencies:
        if agency not in operators:
            log.error("operator %s of the fare network has no settlement account in the registration; its fares "
                      "are refused (register the application again with this feed)", agency)
    region = int(load_settings(directory.parent).issuer_region_code)
    store = Store(directory / STORE_FILE)
    async with grpc.aio.insecure_channel(os.environ[ENV_SERVER]) as core:
        link = LedgerLink(core, session.metadata)
        relay = DenylistRelay(core, session.metadata)
        await link.start()
        await relay.start()
        await relay.wait_ready(DENYLIST_READY_S)
        service = TransitService(network, link, relay, core, session.metadata, store, operators, region,
                                 _tac_verifier())
        server = grpc.aio.server()
        transit_pb2_grpc.add_TransitServicer_to_server(TransitServicer(service, directory), server)
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        host = listen.rpartition(":")[0] or "127.0.0.1"
        address = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"
        write_ready(directory, address)
        log.info("Transit service on %s (%d operators, %d routes)", address, len(operators), len(network.routes))
        sweeper = asyncio.create_task(service.sweep_forever(), name="sweeper")
        try:
            await asyncio.get_running_loop().run_in_executor(None, session.stopping.wait)
        finally:
            (directory / READY_FILE).unlink(missing_ok=True)
            sweeper.cancel()
            await server.stop(GRACE_S)
            await relay.close()
            await link.close()
            store.close()
