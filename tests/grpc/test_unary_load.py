"""The open-loop load generators of ``python -m benches.grpc`` (its unary phase) against a real server: every
request offered is answered and classified, in every generator (gRPC's C++ library, Node's @grpc/grpc-js, and
grpcio's asyncio client). Only counts and outcomes are asserted, never timings (the machine is shared)."""

from __future__ import annotations

import shutil

import pytest

from benches import grpc as bench

RATE_PER_S = 100
SECONDS = 1.0
WARMUP_S = 0.2
CONNECTIONS = 2


@pytest.fixture(scope="module")
def bench_app(server):
    return bench.register_bench_app(server.address, server.operator_token)


@pytest.mark.parametrize("generator", sorted(bench.UNARY_GENERATORS))
def test_every_offered_request_is_answered_and_a_replay_is_refused(server, bench_app, generator):
    if generator == "node":
        assert shutil.which("node") and (bench.NODE_MODULES / "@grpc" / "grpc-js").is_dir(), \
            "run `make test` (or `npm ci --prefix examples/node-client`) to install the Node client's packages"
    if generator == "cxx":
        assert bench.CXX_GENERATOR.is_file(), "run `make test` (or `make bench-tools`) to build it"
    token, debit, credit = bench_app
    first_id = {"node": 7, "python": 8, "cxx": 9}[generator] << 56

    def offer() -> dict:
        return bench.unary(server.process.pid, server.address, token, debit, credit, RATE_PER_S, SECONDS, WARMUP_S,
                           CONNECTIONS, first_id, generator)

    counted = int(RATE_PER_S / CONNECTIONS * SECONDS) * CONNECTIONS
    booked = offer()
    assert booked["generator"] == generator
    assert booked["requests"] == counted
    assert booked["statuses"] == {"OK": counted}
    assert booked["p50_ms"] <= booked["p99_ms"] <= booked["max_ms"]
    assert booked["client_cpu_us_per_call"] > 0
    # The same ids again: every transfer already exists, so every answer lists it as not booked.
    replayed = offer()
    assert replayed["statuses"] == {"REFUSED_TRANSFERS": counted}
