"""Assembling the server: ``create_server`` builds and binds it (tests bind port 0), ``serve`` runs it.

    server = await create_server(ServerConfig(data_dir=Path("var"), listen="127.0.0.1:0"))
    await server.start()          # writer thread, gRPC, auto-restore timer, built-in plugins
    ...
    await server.stop()           # graceful: refuse new calls, finish the ones in flight, drain the writer

What runs where: the gRPC handlers on one asyncio loop; every read and write of the registry and the ledger
on the single writer thread (writer.py); built-in applications in processes of their own (plugins.py).

Who serves the port: the front (front.py), HTTP/2 on the same loop, answers the unary CreateTransfers itself
and passes every other call to grpcio, which listens on an abstract Unix socket behind it. With TLS, or
``native_front=False`` (``citycard serve --front grpcio``), grpcio serves the port alone.

Credentials the server itself holds, in ``DATA/server/`` (created with mode 0600 on first start):
``operator.token`` (the operator's staff tools) and ``enrolment.token`` (handed to a partner so that it can
register its application). They are read from those files, never from the command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from citycard.core.registry import Registry, tick
from citycard.server import applications
from citycard.server.applications_service import ApplicationsService
from citycard.server.auth import TOKEN_PREFIX, Authenticator
from citycard.server.cards_service import CardsService, DenylistWatch
from citycard.server.common import Services
from citycard.server.front import Front
from citycard.server.ledger_service import LedgerService
from citycard.server.plugins import BUILTIN_PLUGINS, PluginSupervisor
from citycard.server.writer import QUEUE_EVENTS_MAX, Writer
from citycard.v1 import (
    applications_pb2,
    applications_pb2_grpc,
    cards_pb2,
    cards_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)

__all__ = ["CitycardServer", "ServerConfig", "create_server", "read_token", "serve"]

DEFAULT_LISTEN = "127.0.0.1:50051"
MESSAGE_BYTES_MAX = 4 * 2**20  # a full batch of 8,189 transfers is about 1.3 MiB
CONCURRENT_RPCS_MAX = 1024
GRACE_S = 5.0
TICK_INTERVAL_S = 60.0
SERVER_DIR = "server"
OPERATOR_TOKEN_FILE = "operator.token"
ENROLMENT_TOKEN_FILE = "enrolment.token"
# How long a thread that wants the GIL waits before it makes the holder let go (CPython's default: 5 ms).
# The writer thread needs the GIL back after every batch it took to disk without it, and grpc's poller thread
# needs it to hand the event loop its next events; while the loop is busy they would each wait up to the full
# interval, which is latency added to every answer. The process is the server's alone, so set it here.
SWITCH_INTERVAL_S = 0.0005
SERVICE_NAMES = tuple(descriptor.full_name for descriptor in (
    ledger_pb2.DESCRIPTOR.services_by_name["Ledger"], cards_pb2.DESCRIPTOR.services_by_name["Cards"],
    applications_pb2.DESCRIPTOR.services_by_name["Applications"]))
log = logging.getLogger("citycard.server")


@dataclass
class ServerConfig:
    data_dir: Path
    listen: str = DEFAULT_LISTEN
    plugins: tuple[str, ...] = BUILTIN_PLUGINS
    tick_interval_s: float = TICK_INTERVAL_S
    queue_events_max: int = QUEUE_EVENTS_MAX
    grace_s: float = GRACE_S
    tls_cert: Path | None = None  # server certificate chain (PEM)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # with it, clients must present a certificate this CA signed
    ready_file: Path | None = None  # written (JSON) once the server is serving
    native_front: bool = True  # front.py serves the port (without TLS); False: grpcio alone
    extra_options: list[tuple[str, int]] = field(default_factory=list)


def read_token(path: Path) -> str:
    token = path.read_text(encoding="ascii").strip()
    if not token.startswith(TOKEN_PREFIX):
        raise ValueError(f"{path} does not hold a citycard token")
    return token


def _server_token(directory: Path, name: str) -> str:
    """The token in ``directory/name``, created (mode 0600) with a new random token if missing."""
    path = directory / name
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(token + "\n")
    return read_token(path)


class CitycardServer:
    """A bound, not yet started server. ``port`` is the port it is bound to."""

    def __init__(self, config: ServerConfig, registry: Registry, grpc_server: grpc.aio.Server, port: int,
                 services: Services, watch: DenylistWatch, health_servicer: health.aio.HealthServicer,
                 front: Front | None) -> None:
        self.config = config
        self.registry = registry
        self.grpc_server = grpc_server
        self.front = front
        self.port = port
        self.services = services
        self.watch = watch
        self.health = health_servicer
        # The built-in applications run beside the server: they reach grpcio on its own socket, with no hop
        # through the front (their heavy traffic is the ledger stream, which the front would only pass on).
        self.plugins = PluginSupervisor(services, front.upstream_address if front else self.local_address,
                                        config.plugins)
        self._tick_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def local_address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self, *, with_plugins: bool = True) -> None:
        self.services.writer.start()
        await self.grpc_server.start()
        if self.front is not None:
            await self.front.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tick_task = asyncio.ensure_future(self._tick_forever())
        if with_plugins and self.config.plugins:
            if self.services.auth.tls:
                log.warning("built-in plugins are not started on a mutual-TLS server (they have no client "
                            "certificates yet)")
            else:
                await self.plugins.start()
        log.info("serving", extra={"address": self.local_address, "data": str(self.config.data_dir),
                                   "plugins": list(self.plugins.pids())})
        if self.config.ready_file is not None:
            self._write_ready_file(self.config.ready_file)

    def _write_ready_file(self, path: Path) -> None:
        server_dir = self.config.data_dir / SERVER_DIR
        document = {"address": self.local_address, "port": self.port, "pid": os.getpid(),
                    "operator_token_file": str(server_dir / OPERATOR_TOKEN_FILE),
                    "enrolment_token_file": str(server_dir / ENROLMENT_TOKEN_FILE),
                    "plugins": self.plugins.pids()}
        scratch = path.with_name(path.name + ".tmp")
        scratch.write_text(json.dumps(document), encoding="utf-8")
        scratch.replace(path)

    async def _tick_forever(self) -> None:
        """The lifecycle's auto-restore (and expiry) job: now at start, then every tick_interval_s."""
        while True:
            try:
                report = await self.services.writer.call(tick)
                if report.restored or report.expired or report.warnings:
                    log.info("lifecycle tick", extra={"restored": [r.card_number for r in report.restored],
                                                      "expired": list(report.expired), "waiting": report.waiting,
                                                      "warnings": list(report.warnings)})
                delay = 0.0 if report.more else self.config.tick_interval_s
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lifecycle tick failed")
                delay = self.config.tick_interval_s
            await asyncio.sleep(delay)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: plugins first, then no new calls, calls in flight get ``grace_s`` to finish,
        the writer finishes its queue, the registry closes."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await self.plugins.stop()
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self.front is not None:
            await self.front.stop(grace)  # its proxied calls finish through grpcio, so grpcio stops after
        await self.grpc_server.stop(grace)
        writer = self.services.writer
        await asyncio.get_running_loop().run_in_executor(None, writer.stop)
        stats = writer.stats
        log.info("stopped", extra={"batches": stats.batches, "transfers": stats.transfers,
                                   "transfer_requests": stats.transfer_requests, "calls": stats.calls,
                                   "dropped": stats.dropped, "refused_full": stats.refused_full})
        self.registry.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("give both --tls-cert and --tls-key")
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


class _GenericHandlersOnly:
    """What a generated ``add_*Servicer_to_server`` sees as the server: it keeps the generic handlers and
    drops the registered-method ones.

    grpc.aio's server keeps one outstanding request per *registered* method and, for every call it
    accepts, waits on all of them again with ``asyncio.wait``: with this server's two dozen methods that
    measured about 50 us of the event loop per call on the reference machine (10% of what grpc.aio itself
    spends on a call). Generic handlers cost one dict look-up per service instead. (Reflection registers
    itself the same way and is left alone: it adds one method.)"""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass  # the same handlers came in through add_generic_rpc_handlers


async def create_server(config: ServerConfig) -> CitycardServer:
    """Open the registry, build the services and bind the port (``HOST:0`` picks a free one)."""
    data_dir = Path(config.data_dir)
    credentials = _credentials(config)
    server_dir = data_dir / SERVER_DIR
    registry = Registry.open(data_dir)
    try:
        auth = Authenticator(operator_token=_server_token(server_dir, OPERATOR_TOKEN_FILE),
                             enrolment_token=_server_token(server_dir, ENROLMENT_TOKEN_FILE),
                             tls=config.tls_client_ca is not None)
        auth.publish(applications.load_applications(registry))
        loop = asyncio.get_running_loop()
        watch = DenylistWatch(registry.denylist_version())
        writer = Writer(registry, loop, queue_events_max=config.queue_events_max, on_denylist_version=watch.publish)
        services = Services(writer=writer, auth=auth)
        grpc_server = grpc.aio.server(
            maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX,
            options=[("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                     ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
                     ("grpc.so_reuseport", 0), *config.extra_options])
        handlers = _GenericHandlersOnly(grpc_server)  # the Ledger first: the hot paths are found first
        ledger_service = LedgerService(services)
        ledger_pb2_grpc.add_LedgerServicer_to_server(ledger_service, handlers)
        cards_pb2_grpc.add_CardsServicer_to_server(CardsService(services, watch), handlers)
        applications_pb2_grpc.add_ApplicationsServicer_to_server(ApplicationsService(services), handlers)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handlers)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            grpc_server)
        front = None
        if credentials is not None:
            port = grpc_server.add_secure_port(config.listen, credentials)
        elif not config.native_front:
            port = grpc_server.add_insecure_port(config.listen)
        else:
            # grpcio behind the front, on a socket in the abstract namespace: nothing on disk to clean up
            upstream = f"citycard-{os.getpid()}-{secrets.token_hex(8)}"
            if grpc_server.add_insecure_port(f"unix-abstract:{upstream}") == 0:
                raise OSError("grpcio cannot listen on its abstract Unix socket")
            front = Front(services, ledger_service, "\0" + upstream, message_bytes_max=MESSAGE_BYTES_MAX)
            host, _, port_text = config.listen.rpartition(":")
            port = await front.bind(host, int(port_text))
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}")
    except BaseException:
        registry.close()
        raise
    return CitycardServer(config, registry, grpc_server, port, services, watch, health_servicer, front)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server = await create_server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    log.info("shutting down")
    await server.stop()
