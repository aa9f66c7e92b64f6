"""The plugin contract: what an application on the card implements to run beside ``citycard serve``.

An application is a separate process that talks to the server over gRPC (citycard.v1) and nothing else.
To be one of the built-in applications that ``citycard serve`` starts, a module under ``apps/``:

1. defines a ``Plugin`` subclass with a ``name`` and a ``manifest()``: the application's AID on the card,
   the ledgers and transfer codes it may use, the accounts it owns (opened when it is registered);
2. implements ``run(session)``: the application's work, using ``session``'s gRPC stubs (already carrying
   the credential) until ``session.stopping`` is set; it should return soon after that;
3. has a ``__main__`` that calls ``main(TheirPlugin())``.

``citycard serve`` registers the manifest (or, on later starts, rotates the credential of the existing
registration), then starts ``python -m citycard.apps.<name>`` with the environment below, stops it with
SIGTERM on shutdown, and restarts it (a few times, with back-off) if it dies.

    CITYCARD_SERVER        the server's gRPC target: grpcio's own socket behind the front
                           (unix-abstract:NAME), or host:port when grpcio serves the port alone
    CITYCARD_PLUGIN_TOKEN  the application's bearer token (read once and removed from the environment)

A third party's application follows the same shape without this module: it builds its stubs from the
.proto files and registers itself (examples/bikeshare/).
"""

from __future__ import annotations

import abc
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import ClassVar

import grpc
from citycard.core.allocator import keep_freed_memory

from citycard.v1 import applications_pb2, applications_pb2_grpc, cards_pb2_grpc, ledger_pb2_grpc

__all__ = ["ENV_SERVER", "ENV_TOKEN", "Plugin", "Session", "main"]

ENV_SERVER = "CITYCARD_SERVER"
ENV_TOKEN = "CITYCARD_PLUGIN_TOKEN"
CONNECT_TIMEOUT_S = 30.0
PARENT_CHECK_S = 1.0
log = logging.getLogger("citycard.apps")


@dataclass
class Session:
    """A plugin's connection to the server: stubs that send its credential, its registration, a stop flag."""

    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    application: applications_pb2.Application
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.ledger = ledger_pb2_grpc.LedgerStub(self.channel)
        self.cards = cards_pb2_grpc.CardsStub(self.channel)
        self.applications = applications_pb2_grpc.ApplicationsStub(self.channel)

    def account(self, name: str) -> str:
        """The id of one of the application's own accounts, by the name its manifest gave it."""
        for account in self.application.accounts:
            if account.name == name:
                return account.id
        raise KeyError(f"{self.application.manifest.name} owns no account named {name!r}")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the plugin is to stop."""
        return self.stopping.wait(seconds)


class Plugin(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def manifest(self) -> applications_pb2.Manifest:
        """What the application is and may do; registered by the server before the process starts."""

    @abc.abstractmethod
    def run(self, session: Session) -> None:
        """The application's work; return when ``session.stopping`` is set."""


def main(plugin: Plugin) -> int:
    """Run ``plugin`` as a process started by ``citycard serve``; the process's exit code."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {plugin.name} %(levelname)s %(message)s")
    keep_freed_memory()  # as citycard serve does (core/allocator.py)
    address = os.environ.get(ENV_SERVER)
    token = os.environ.pop(ENV_TOKEN, None)
    if not address or not token:
        log.error("%s and %s must be set (citycard serve sets them)", ENV_SERVER, ENV_TOKEN)
        return 2
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    _stop_with_parent(stopping)
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        metadata = (("authorization", f"Bearer {token}"),)
        stub = applications_pb2_grpc.ApplicationsStub(channel)
        registration = stub.GetApplication(applications_pb2.GetApplicationRequest(name=plugin.name),
                                           metadata=metadata, timeout=CONNECT_TIMEOUT_S)
        session = Session(channel, metadata, registration.application, stopping)
        log.info("running as application %s with accounts %s", plugin.name,
                 ", ".join(f"{a.name}={a.id}" for a in session.application.accounts))
        plugin.run(session)
    log.info("stopped")
    return 0


def _stop_with_parent(stopping: threading.Event) -> None:
    """A plugin never outlives the server that started it (even one killed with SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while not stopping.wait(PARENT_CHECK_S):
            if os.getppid() != parent:
                log.warning("the server is gone; stopping")
                stopping.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
