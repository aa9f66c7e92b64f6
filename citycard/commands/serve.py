"""``citycard serve``: the core behind gRPC (citycard.v1), with the built-in applications as processes.

    citycard serve --data var --listen 127.0.0.1:50051

Logs are JSON lines on stderr with ID numbers masked. SIGTERM or Ctrl-C shuts down gracefully. The
operator's and the enrolment credential are in DIR/server/ (mode 0600; citycard/server/server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from citycard.core.allocator import keep_freed_memory
from citycard.server import logs
from citycard.server.plugins import BUILTIN_PLUGINS
from citycard.server.server import DEFAULT_LISTEN, GRACE_S, TICK_INTERVAL_S, ServerConfig, serve

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the gRPC server and the built-in applications")
    parser.add_argument("--data", default="var", metavar="DIR", help="data directory (default: ./var)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    parser.add_argument("--plugins", default=",".join(BUILTIN_PLUGINS), metavar="NAMES",
                        help="built-in applications to start, comma-separated; empty for none "
                             f"(default: {','.join(BUILTIN_PLUGINS)})")
    parser.add_argument("--tick-interval", type=float, default=TICK_INTERVAL_S, metavar="SECONDS",
                        help="how often the lifecycle's auto-restore runs")
    parser.add_argument("--grace", type=float, default=GRACE_S, metavar="SECONDS",
                        help="how long calls in flight may finish on shutdown")
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="CA whose client certificates are required (mutual TLS)")
    parser.add_argument("--front", choices=["native", "grpcio"], default="native",
                        help="who serves the port: native (default; HTTP/2 on the event loop answers the unary "
                             "CreateTransfers itself and passes every other call to grpcio) or grpcio (grpcio "
                             "alone, as with TLS, which always uses it)")
    parser.add_argument("--ready-file", type=Path, help="write {address, port, pid, ...} as JSON once serving")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    logs.configure(getattr(logging, args.log_level.upper()))
    keep_freed_memory()  # megabyte batches come and go: reuse them, not fresh zeroed pages (core/allocator.py)
    plugins = tuple(name for name in args.plugins.split(",") if name.strip())
    if args.tick_interval <= 0:
        raise SystemExit("citycard: error: --tick-interval must be positive")
    config = ServerConfig(data_dir=Path(args.data), listen=args.listen, plugins=plugins,
                          tick_interval_s=args.tick_interval, grace_s=args.grace, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, ready_file=args.ready_file,
                          native_front=args.front == "native")
    # The medical application keeps its own records beside the core's data (apps/medical/README.md).
    os.environ.setdefault("CITYCARD_MEDICAL_DIR", str(Path(args.data) / "medical"))
    # So does the transit application (apps/bus/__init__.py); DATA/transit/ready.json says where it serves.
    os.environ.setdefault("CITYCARD_TRANSIT_DIR", str(Path(args.data) / "transit"))
    asyncio.run(serve(config))
    return 0
