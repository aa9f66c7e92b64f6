"""Transfers through gRPC next to the in-process ledger, measured in one run.

    python -m benches.grpc --json

1. in-process: the settlement core's batch throughput, batches of 8,189 transfers through
   ``Ledger.create_transfers`` (one fsync each) - the reference.
2. stream: a real ``citycard serve`` (its own process) and 16 client processes, each with its own connection
   and one bidirectional CreateTransfersStream, sending requests of --stream-batch transfers as fast as the
   stream takes them; transfers per second over all of them, and its ratio to (1): ``ratio_stream_to_inprocess``.
3. unary latency: one client process offering unary CreateTransfers (one transfer each) at a fixed rate
   (default 2,000 per second, open loop: a late answer does not delay the next request); p50 and p99 from
   the instant each request was due.

Every transfer is real: its own id, between two accounts of a benchmark application on a ledger it defines.
Clients send pre-serialized requests so that what is measured is the server. The machine is shared: the
clients run on the same 2 cores as the server, so these figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_LEDGER = 16
BATCH = 8189
STREAM_METHOD = "/citycard.v1.Ledger/CreateTransfersStream"
UNARY_METHOD = "/citycard.v1.Ledger/CreateTransfers"


# -- 1. in-process reference -------------------------------------------------------------------------------

def inprocess(directory: Path, batches: int) -> dict:
    from citycard.core.ledger import Ledger, accounts_array
    from citycard.core.records import TRANSFER_DTYPE, AccountKind

    with Ledger(directory / "inprocess") as ledger:
        ledger.register_ledger(BENCH_LEDGER, "BENCH", [(1, 0, 0)])
        ledger.create_accounts(accounts_array([{"id": n, "ledger": BENCH_LEDGER, "code": AccountKind.OPERATOR_SETTLEMENT}
                                               for n in (1, 2)]))
        work = []
        for index in range(batches):
            batch = np.zeros(BATCH, dtype=TRANSFER_DTYPE)
            batch["id"][:, 0] = np.arange(1, BATCH + 1) + index * BATCH
            batch["debit_account_id"][:, 0] = 1
            batch["credit_account_id"][:, 0] = 2
            batch["amount"], batch["ledger"], batch["code"] = 1, BENCH_LEDGER, 1
            work.append(batch)
        started = time.perf_counter()
        for batch in work:
            results = ledger.create_transfers(batch)
            if results["status"].any():
                raise SystemExit("in-process: a transfer failed")
        elapsed = time.perf_counter() - started
    return {"transfers": batches * BATCH, "seconds": round(elapsed, 3), "transfers_per_s": round(batches * BATCH / elapsed)}


# -- the server and the benchmark application ----------------------------------------------------------------

def start_server(directory: Path) -> tuple[object, dict]:
    import subprocess

    ready = directory / "ready.json"
    log = open(directory / "server.log", "ab")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "citycard.server", "--data", str(directory / "data"),
                                "--listen", "127.0.0.1:0", "--plugins", "", "--ready-file", str(ready),
                                "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {directory / 'server.log'}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


def register_bench_app(address: str, operator_token: str) -> tuple[str, str, str]:
    import grpc

    from citycard.v1 import applications_pb2, applications_pb2_grpc, common_pb2

    manifest = applications_pb2.Manifest(
        name="bench", aid="F0BE4C4801", ledgers=[BENCH_LEDGER], transfer_codes=[1],
        accounts=[applications_pb2.AccountSpec(name="a", ledger=BENCH_LEDGER, kind=common_pb2.ACCOUNT_KIND_OPERATOR_SETTLEMENT),
                  applications_pb2.AccountSpec(name="b", ledger=BENCH_LEDGER, kind=common_pb2.ACCOUNT_KIND_OPERATOR_SETTLEMENT)],
        ledger_definitions=[applications_pb2.LedgerDefinition(number=BENCH_LEDGER, name="BENCH",
                                                              movements=[applications_pb2.Movement(code=1)])])
    with grpc.insecure_channel(address) as channel:
        answer = applications_pb2_grpc.ApplicationsStub(channel).RegisterApplication(
            applications_pb2.RegisterApplicationRequest(manifest=manifest),
            metadata=[("authorization", f"Bearer {operator_token}")], timeout=30)
    accounts = {account.name: account.id for account in answer.application.accounts}
    return answer.bearer_token, accounts["a"], accounts["b"]


def transfers(first_id: int, count: int, debit: str, credit: str) -> list:
    from citycard.v1 import ledger_pb2

    return [ledger_pb2.Transfer(id=f"{first_id + n:x}", debit_account_id=debit, credit_account_id=credit, amount_fen=1,
                                ledger=BENCH_LEDGER, code=1) for n in range(count)]


# -- 2. the stream from 16 processes -------------------------------------------------------------------------

def stream_client(index: int, address: str, token: str, debit: str, credit: str, requests: int, per_request: int,
                  barrier, results) -> None:
    import grpc

    from citycard.v1 import ledger_pb2

    first = (index + 1) << 40
    payloads = [ledger_pb2.CreateTransfersStreamRequest(
        request_id=r, transfers=transfers(first + r * per_request, per_request, debit, credit)).SerializeToString()
        for r in range(requests)]
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
        barrier.wait()
        started = time.time()
        failed = 0
        for raw in call(iter(payloads), metadata=[("authorization", f"Bearer {token}")], timeout=600):
            failed += len(ledger_pb2.CreateTransfersStreamResponse.FromString(raw).errors)
        results.put((index, started, time.time(), requests * per_request, failed))


def stream(address: str, token: str, debit: str, credit: str, clients: int, requests: int, per_request: int) -> dict:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients)
    results = context.Queue()
    workers = [context.Process(target=stream_client, args=(i, address, token, debit, credit, requests, per_request,
                                                           barrier, results)) for i in range(clients)]
    for worker in workers:
        worker.start()
    rows = [results.get(timeout=900) for _ in workers]
    for worker in workers:
        worker.join()
    started, ended = min(row[1] for row in rows), max(row[2] for row in rows)
    total, failed = sum(row[3] for row in rows), sum(row[4] for row in rows)
    if failed:
        raise SystemExit(f"stream: {failed} transfers failed")
    return {"clients": clients, "requests_per_client": requests, "transfers_per_request": per_request,
            "transfers": total, "seconds": round(ended - started, 3), "transfers_per_s": round(total / (ended - started))}


# -- 3. unary latency at a fixed offered rate ------------------------------------------------------------------

def unary_client(address: str, token: str, debit: str, credit: str, rate: int, seconds: float, results) -> None:
    import grpc

    from citycard.v1 import ledger_pb2

    count = int(rate * seconds)
    first = 1 << 56
    payloads = [ledger_pb2.CreateTransfersRequest(transfers=transfers(first + n, 1, debit, credit)).SerializeToString()
                for n in range(count)]
    metadata = (("authorization", f"Bearer {token}"),)

    async def run() -> tuple[list[float], int, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            call = channel.unary_unary(UNARY_METHOD, request_serializer=None, response_deserializer=None)
            latencies: list[float] = []
            failures = 0
            codes: dict[str, int] = {}
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.2

            async def one(n: int) -> None:
                nonlocal failures
                due = start + n / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    raw = await call(payloads[n], metadata=metadata, timeout=30)
                    failures += len(ledger_pb2.CreateTransfersResponse.FromString(raw).errors)
                except grpc.aio.AioRpcError as exc:
                    failures += 1
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                latencies.append(loop.time() - due)

            await asyncio.gather(*(one(n) for n in range(count)))
            return latencies, {"failed": failures, "refusals": codes}, loop.time() - start

    latencies, failures, elapsed = asyncio.run(run())
    results.put((latencies, failures, elapsed))


def unary(address: str, token: str, debit: str, credit: str, rate: int, seconds: float) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    worker = context.Process(target=unary_client, args=(address, token, debit, credit, rate, seconds, results))
    worker.start()
    latencies, failures, elapsed = results.get(timeout=600)
    worker.join()
    ms = sorted(latency * 1000 for latency in latencies)
    return {"offered_per_s": rate, "requests": len(ms), **failures,
            "achieved_per_s": round(len(ms) / elapsed), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 3), "max_ms": round(ms[-1], 3)}


def machine() -> dict:
    import grpc

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cores": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0], "grpcio": grpc.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", default="var/bench")
    parser.add_argument("--inprocess-batches", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--stream-requests", type=int, default=40)
    parser.add_argument("--stream-batch", type=int, default=512)
    parser.add_argument("--unary-rate", type=int, default=2000)
    parser.add_argument("--unary-seconds", type=float, default=5.0)
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="grpc-", dir=args.dir))
    try:
        reference = inprocess(scratch, args.inprocess_batches)
        process, ready = start_server(scratch)
        try:
            operator = Path(ready["operator_token_file"]).read_text().strip()
            token, debit, credit = register_bench_app(ready["address"], operator)
            streamed = stream(ready["address"], token, debit, credit, args.clients, args.stream_requests,
                              args.stream_batch)
            latency = unary(ready["address"], token, debit, credit, args.unary_rate, args.unary_seconds)
        finally:
            process.terminate()
            process.wait(60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {"machine": machine(), "inprocess": reference, "stream": streamed, "unary": latency,
              "ratio_stream_to_inprocess": round(streamed["transfers_per_s"] / reference["transfers_per_s"], 3),
              "targets": {"ratio_stream_to_inprocess_min": 0.3, "unary_p99_ms_max": 5.0}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"in-process batches : {reference['transfers_per_s']:>10,} transfers/s")
        print(f"gRPC stream ({args.clients} procs): {streamed['transfers_per_s']:>10,} transfers/s  "
              f"ratio {report['ratio_stream_to_inprocess']}")
        print(f"unary at {latency['offered_per_s']}/s     : p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
