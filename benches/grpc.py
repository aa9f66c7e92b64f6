"""Transfers through gRPC next to the in-process ledger, measured in one run.

    python -m benches.grpc --json

1. in-process: the settlement core's batch throughput, batches of 8,189 transfers through
   ``Ledger.create_transfers`` (one fsync each) - the reference.
2. stream: a real ``citycard serve`` (its own process) and 16 client processes, each with its own connection
   and one bidirectional CreateTransfersStream, sending requests of 8,189 transfers in the packed form
   (``packed_transfers``: 128-byte records, the form for high-volume integrators) as fast as the stream
   takes them; transfers per second over all of them, and its ratio to (1): ``ratio_stream_to_inprocess``
   (target >= 0.3). ``stream_messages`` is the same with Transfer messages, 512 a request, for comparison:
   there the server's own cost is reading the messages' fields (about 2 us a transfer), not the ledger.
3. commit floor: one transfer per batch through ``Ledger.create_transfers``, in-process, p50/p99: the
   least any unary answer can take, since an answer waits until its batch is on disk (one fdatasync).
4. unary: CreateTransfers (one transfer each) offered at fixed rates (default 500, 1,000 and 2,000 per
   second; the last is reported as ``unary``, target p99 < 5 ms) by an open-loop load generator: request n
   is due at start + n / rate, fixed before the run, and sent then whatever the answers do. Latency runs
   from its DUE time to its answer (no coordinated omission: a generator or machine that falls behind shows
   as latency); ``send_lag`` says how late the generator itself sent. Three generators
   (``--unary-generator``): ``cxx`` (default), one process of gRPC's C++ library over 2 connections
   (grpc_unary_load.cc, built by ``make bench-tools``); ``python``, 2 grpcio asyncio processes at half the
   rate each, their schedules interleaved; ``node``, one @grpc/grpc-js process over 2 connections
   (grpc_unary_load.js, with the packages of examples/node-client). Reported: offered and achieved rates (answered OK per second),
   answers by outcome (OK; REFUSED_TRANSFERS when the answer lists a transfer not booked; a status code),
   p50/p99/max, and CPU per call of the server and of the generator. The first ``--unary-warmup-seconds``
   are not counted. ``--unary-only`` skips (1) and (2).

Every transfer is real: its own id, between two accounts of a benchmark application on a ledger it defines.
The unary phases run after the stream phases, against a ledger that holds about 1.2 million transfers.
Clients send pre-serialized requests so that what is measured is the server, and stay alive until every
client of their phase is done (an early finisher's teardown would take CPU from the others). Each phase
reports the CPU the server used and the clients used (in cores), and ``other_cores``: everything else on
the machine (other work sharing it, kernel threads), because the clients run on the same cores as the server.

Two servers, one after the other (``--fronts``, default ``native,grpcio``): ``citycard serve`` as it runs, with
its front (citycard/server/front.py: the unary CreateTransfers answered on the event loop, HTTP/2 framed by
libnghttp2, every other call passed through to grpcio), whose figures are the report's; and ``--front grpcio``,
grpcio serving the port alone, as before the front (under ``other_fronts``): the same phases, so the run shows
what the front changes, on the unary calls it answers and on the streams it passes through.

What the unary figures mean on a small machine (the 2-core reference VM). grpcio spends 0.4-0.9 ms of CPU on a
unary call, most of it handing the call between its threads; with grpcio alone one event loop tops out near
1,000 calls/s and past that latency is queueing (past 1,000 pending calls grpc core starts shedding new ones,
which end CANCELLED). The front answers in one thread, and the rest of a call's cost is the writer's commit
(one fdatasync a batch, whose virtio kicks are a large share of the server's CPU on this VM). The generator
costs CPU on the same cores: ``cxx`` about 0.15 ms a call, Python's 0.45-0.7 ms, Node's 0.65-1.1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from citycard.core.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parent.parent
BENCH_LEDGER = 16
BATCH = 8189
STREAM_METHOD = "/citycard.v1.Ledger/CreateTransfersStream"
UNARY_METHOD = "/citycard.v1.Ledger/CreateTransfers"
RESULT_TIMEOUT_S = 600  # what a phase may take at most before the run gives up
UNARY_DEADLINE_S = 10.0
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
NODE_GENERATOR = REPO / "benches" / "grpc_unary_load.js"
NODE_MODULES = REPO / "examples" / "node-client" / "node_modules"  # npm ci --prefix examples/node-client
CXX_GENERATOR = REPO / "benches" / "grpc_unary_load"  # make bench-tools: grpc_unary_load.cc, built


# -- CPU accounting --------------------------------------------------------------------------------------------

def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O), all cores."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / CLOCK_TICKS_PER_S


class CpuWatch:
    """CPU used during a phase: by the server, and by everything else on the machine except the phase's
    own clients (they report their own)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._server0 = process_cpu_s(server_pid)
        self._busy0 = machine_busy_s()
        self._wall0 = time.perf_counter()

    def report(self, clients_cpu_s: float) -> dict[str, float]:
        wall = time.perf_counter() - self._wall0
        server = process_cpu_s(self.server_pid) - self._server0
        busy = machine_busy_s() - self._busy0
        return {"server_cores": round(server / wall, 2), "clients_cores": round(clients_cpu_s / wall, 2),
                "other_cores": round(max(0.0, busy - server - clients_cpu_s) / wall, 2)}


# -- 1. in-process reference -------------------------------------------------------------------------------

def bench_batches(count: int, per_batch: int, first_id: int, debit: int, credit: int) -> list[np.ndarray]:
    """``count`` TRANSFER_DTYPE batches of fresh transfers from ``debit`` to ``credit`` (1 fen each)."""
    from citycard.core.records import TRANSFER_DTYPE

    batches = []
    for index in range(count):
        batch = np.zeros(per_batch, dtype=TRANSFER_DTYPE)
        batch["id"][:, 0] = first_id + index * per_batch + np.arange(per_batch)
        for field, account in (("debit_account_id", debit), ("credit_account_id", credit)):
            batch[field][:, 0] = account & (2**64 - 1)
            batch[field][:, 1] = account >> 64
        batch["amount"], batch["ledger"], batch["code"] = 1, BENCH_LEDGER, 1
        batches.append(batch)
    return batches


def bench_ledger(path: Path) -> Any:
    """A fresh ledger at ``path`` with the bench ledger and its accounts 1 and 2 (the caller closes it)."""
    from citycard.core.ledger import Ledger, accounts_array
    from citycard.core.records import AccountKind

    ledger = Ledger(path)
    ledger.register_ledger(BENCH_LEDGER, "BENCH", [(1, 0, 0)])
    ledger.create_accounts(accounts_array([{"id": n, "ledger": BENCH_LEDGER, "code": AccountKind.OPERATOR_SETTLEMENT}
                                           for n in (1, 2)]))
    return ledger


def inprocess(directory: Path, batches: int) -> dict:
    with bench_ledger(directory / "inprocess") as ledger:
        work = bench_batches(batches, BATCH, 1, 1, 2)
        started = time.perf_counter()
        for batch in work:
            results = ledger.create_transfers(batch)
            if results["status"].any():
                raise SystemExit("in-process: a transfer failed")
        elapsed = time.perf_counter() - started
    return {"transfers": batches * BATCH, "seconds": round(elapsed, 3), "transfers_per_s": round(batches * BATCH / elapsed)}


def commit_floor(directory: Path, commits: int) -> dict:
    """How long the ledger takes to book ONE transfer (one commit, one fdatasync), in-process: no unary call
    can be answered sooner, because an answer waits until its batch is on disk. On a disk shared with other
    work this, not gRPC, can decide the unary p99."""
    with bench_ledger(directory / "commit-floor") as ledger:
        latency_ms = []
        for batch in bench_batches(commits, 1, 1, 1, 2):
            started = time.perf_counter()
            ledger.create_transfers(batch)
            latency_ms.append((time.perf_counter() - started) * 1000)
    p50, p99, top = np.percentile(latency_ms, [50, 99, 100])
    return {"commits": commits, "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "max_ms": round(float(top), 3)}


# -- the server and the benchmark application ----------------------------------------------------------------

def start_server(directory: Path, front: str = "native") -> tuple[subprocess.Popen[bytes], dict]:
    ready = directory / "ready.json"
    with open(directory / "server.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "citycard.server", "--data", str(directory / "data"),
                                    "--listen", "127.0.0.1:0", "--plugins", "", "--ready-file", str(ready),
                                    "--log-level", "warning", "--front", front], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
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


def transfer_messages(first_id: int, count: int, debit: str, credit: str) -> list:
    from citycard.v1 import ledger_pb2

    return [ledger_pb2.Transfer(id=f"{first_id + n:x}", debit_account_id=debit, credit_account_id=credit, amount_fen=1,
                                ledger=BENCH_LEDGER, code=1) for n in range(count)]


# -- 2. the stream from 16 processes -------------------------------------------------------------------------

def stream_payloads(index: int, form: str, debit: str, credit: str, requests: int, per_request: int) -> list[bytes]:
    from citycard.v1 import ledger_pb2

    first = ((1 if form == "packed" else 2) << 48) | ((index + 1) << 40)  # ids of their own for every client
    if form == "packed":
        batches = bench_batches(requests, per_request, first, int(debit, 16), int(credit, 16))
        return [ledger_pb2.CreateTransfersStreamRequest(request_id=r, packed_transfers=batch.tobytes()).SerializeToString()
                for r, batch in enumerate(batches)]
    return [ledger_pb2.CreateTransfersStreamRequest(
        request_id=r, transfers=transfer_messages(first + r * per_request, per_request, debit, credit)).SerializeToString()
        for r in range(requests)]


def stream_client(index: int, address: str, token: str, form: str, debit: str, credit: str, requests: int,
                  per_request: int, barrier: Any, results: Any) -> None:
    import grpc

    from citycard.v1 import ledger_pb2

    payloads = stream_payloads(index, form, debit, credit, requests, per_request)
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
        barrier.wait()
        cpu0, started = time.process_time(), time.perf_counter()
        failed = 0
        for raw in call(iter(payloads), metadata=[("authorization", f"Bearer {token}")], timeout=RESULT_TIMEOUT_S):
            failed += len(ledger_pb2.CreateTransfersStreamResponse.FromString(raw).errors)
        results.put((started, time.perf_counter(), requests * per_request, failed, time.process_time() - cpu0))
        barrier.wait()  # exit only when all are done: a client's teardown would take CPU from the others


def stream(server_pid: int, address: str, token: str, form: str, debit: str, credit: str, clients: int,
           requests: int, per_request: int) -> dict:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients + 1)
    results = context.Queue()
    workers = [context.Process(target=stream_client, args=(i, address, token, form, debit, credit, requests,
                                                           per_request, barrier, results)) for i in range(clients)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=RESULT_TIMEOUT_S)  # every client has built its payloads and connected
    watch = CpuWatch(server_pid)
    rows = [results.get(timeout=RESULT_TIMEOUT_S) for _ in workers]
    cpu = watch.report(sum(row[4] for row in rows))
    barrier.wait(timeout=RESULT_TIMEOUT_S)
    for worker in workers:
        worker.join()
    started, ended = min(row[0] for row in rows), max(row[1] for row in rows)
    total, failed = sum(row[2] for row in rows), sum(row[3] for row in rows)
    if failed:
        raise SystemExit(f"stream ({form}): {failed} transfers failed")
    return {"form": form, "clients": clients, "requests_per_client": requests, "transfers_per_request": per_request,
            "transfers": total, "seconds": round(ended - started, 3), "transfers_per_s": round(total / (ended - started)),
            **cpu}


# -- 3. unary calls offered at a fixed rate --------------------------------------------------------------------

def unary_payloads(first_id: int, count: int, debit: str, credit: str) -> list[bytes]:
    from citycard.v1 import ledger_pb2

    return [ledger_pb2.CreateTransfersRequest(transfers=transfer_messages(first_id + n, 1, debit, credit)).SerializeToString()
            for n in range(count)]


def outcome(answer: bytes) -> str:
    """An answer lists only the transfers that were not booked: empty is a booked request."""
    return "REFUSED_TRANSFERS" if answer else "OK"


async def offer(call: Callable[..., Any], payloads: list[bytes], rate: float, start_at: float, warmup: int,
                metadata: tuple[tuple[str, str], ...]) -> dict:
    """Send ``payloads[n]`` at ``start_at + n / rate`` (time.perf_counter), whatever the answers do, and
    time each answer from that due time (a late sender shows as latency). The first ``warmup`` requests
    are sent but not counted."""
    import grpc

    loop = asyncio.get_running_loop()
    count = len(payloads)
    due = start_at + np.arange(count) / rate
    sent = np.full(count, np.nan)
    answered = np.full(count, np.nan)
    statuses: list[str] = ["?"] * count
    cpu_counted = [0.0]

    async def one(n: int) -> None:
        sent[n] = time.perf_counter()
        if n == warmup:
            cpu_counted[0] = time.process_time()
        try:
            statuses[n] = outcome(await call(payloads[n], metadata=metadata, timeout=UNARY_DEADLINE_S))
        except grpc.aio.AioRpcError as exc:
            statuses[n] = exc.code().name
        answered[n] = time.perf_counter()

    tasks = []
    n = 0
    while n < count:
        now = time.perf_counter()
        while n < count and due[n] <= now:  # everything due (more than one only if this loop was late)
            tasks.append(loop.create_task(one(n)))
            n += 1
        if n < count:
            await asyncio.sleep(due[n] - time.perf_counter())
    await asyncio.gather(*tasks)
    counted = slice(warmup, count)
    return {"latency_s": (answered - due)[counted], "send_lag_s": (sent - due)[counted],
            "statuses": statuses[counted], "span_s": float(np.nanmax(answered[counted]) - due[warmup]),
            "cpu_s": time.process_time() - cpu_counted[0]}


def python_unary_client(address: str, token: str, payloads: list[bytes], rate: float, start_at: float, warmup: int,
                        results: Any, finished: Any) -> None:
    import grpc

    async def run() -> dict:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            call = channel.unary_unary(UNARY_METHOD, request_serializer=None, response_deserializer=None)
            return await offer(call, payloads, rate, start_at, warmup, (("authorization", f"Bearer {token}"),))

    results.put(asyncio.run(run()))
    finished.wait()  # exit only when all are done: a client's teardown would take CPU from the others


def python_generator(address: str, token: str, payloads: list[list[bytes]], rate: float, start_at: float,
                     warmup: int) -> tuple[Callable[[], list[dict]], Callable[[], None]]:
    """One grpcio (asyncio) client process per payload list, each at ``rate / len(payloads)``, their
    schedules interleaved: (collect the results, let the clients exit)."""
    clients = len(payloads)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    finished = context.Barrier(clients + 1)
    workers = [context.Process(target=python_unary_client, args=(
        address, token, payloads[c], rate / clients, start_at + c / rate, warmup, results, finished))
        for c in range(clients)]
    for worker in workers:
        worker.start()

    def collect() -> list[dict]:
        return [results.get(timeout=RESULT_TIMEOUT_S) for _ in workers]

    def close() -> None:
        finished.wait(timeout=RESULT_TIMEOUT_S)
        for worker in workers:
            worker.join()

    return collect, close


def _payload_file(payloads: list[list[bytes]]) -> tuple[str, int]:
    """The requests interleaved from the payload lists into a scratch file (each behind its length as a u32
    little-endian), and how many there are."""
    interleaved = [payload for row in zip(*payloads) for payload in row]
    with tempfile.NamedTemporaryFile(prefix="unary-", suffix=".bin", delete=False) as scratch:
        for payload in interleaved:
            scratch.write(len(payload).to_bytes(4, "little") + payload)
    return scratch.name, len(interleaved)


def _external_generator(command: list[str], config_text: str, payload_file: str, count: int,
                        warmup: int) -> Callable[[], list[dict]]:
    """Start a generator process that reads its configuration on stdin (the token stays out of the process
    list) and writes the report grpc_unary_load.js/.cc describe; the function that collects it."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(config_text.encode())
    process.stdin.close()

    def collect() -> list[dict]:
        assert process.stdout is not None
        try:
            out = process.stdout.read()  # the phase's own timing bounds it: every call has a deadline
            process.wait(RESULT_TIMEOUT_S)
        finally:
            os.unlink(payload_file)
        if process.returncode:
            raise SystemExit(f"the load generator {command[-1]} failed (exit {process.returncode})")
        report = json.loads(out)
        counted = slice(warmup, count)
        latency = np.array(report["latency_us"], dtype=float)[counted] / 1e6
        lag = np.array(report["send_lag_us"], dtype=float)[counted] / 1e6
        return [{"latency_s": latency, "send_lag_s": lag, "statuses": report["outcomes"][counted],
                 "span_s": report["span_s"], "cpu_s": report["cpu_s"]}]

    return collect


def node_generator(address: str, token: str, payloads: list[list[bytes]], rate: float, start_at: float,
                   warmup: int) -> tuple[Callable[[], list[dict]], Callable[[], None]]:
    """One Node process (grpc_unary_load.js) sending every request, interleaved from the payload lists,
    over as many connections as there are lists."""
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        raise SystemExit("the Node load generator needs node and `npm ci --prefix examples/node-client` "
                         "(or use --unary-generator cxx)")
    payload_file, count = _payload_file(payloads)
    config = {"address": address, "token": token, "payloads": payload_file, "rate": rate, "warmup": warmup,
              "start_ns": str(int(start_at * 1e9)), "method": UNARY_METHOD, "deadline_ms": UNARY_DEADLINE_S * 1000,
              "connections": len(payloads)}
    return _external_generator([node, str(NODE_GENERATOR)], json.dumps(config), payload_file, count, warmup), \
        lambda: None


def cxx_generator(address: str, token: str, payloads: list[list[bytes]], rate: float, start_at: float,
                  warmup: int) -> tuple[Callable[[], list[dict]], Callable[[], None]]:
    """One process of grpc_unary_load.cc (gRPC's C++ library) sending every request, interleaved from the
    payload lists, over as many connections as there are lists."""
    if not CXX_GENERATOR.is_file():
        raise SystemExit(f"{CXX_GENERATOR} is not built: run `make bench-tools` (or use --unary-generator python)")
    payload_file, count = _payload_file(payloads)
    config = {"address": address, "token": token, "payloads": payload_file, "rate": rate, "warmup": warmup,
              "start_ns": int(start_at * 1e9), "method": UNARY_METHOD, "deadline_ms": int(UNARY_DEADLINE_S * 1000),
              "connections": len(payloads)}
    config_text = "".join(f"{key} {value}\n" for key, value in config.items())
    return _external_generator([str(CXX_GENERATOR)], config_text, payload_file, count, warmup), lambda: None


UNARY_GENERATORS = {"cxx": cxx_generator, "node": node_generator, "python": python_generator}


def unary(server_pid: int, address: str, token: str, debit: str, credit: str, rate: int, seconds: float,
          warmup_s: float, clients: int, first_id: int, generator: str) -> dict:
    per_client = rate / clients
    per_client_count = int(per_client * (warmup_s + seconds))
    payloads = [unary_payloads(first_id + c * per_client_count, per_client_count, debit, credit) for c in range(clients)]
    warmup = int(per_client * warmup_s) * (1 if generator == "python" else clients)
    start_at = time.perf_counter() + 3.0  # CLOCK_MONOTONIC: the same clock in every process on this machine
    collect, close = UNARY_GENERATORS[generator](address, token, payloads, rate, start_at, warmup)
    time.sleep(max(0.0, start_at + warmup_s - time.perf_counter()))
    watch = CpuWatch(server_pid)
    rows = collect()
    cpu = watch.report(sum(row["cpu_s"] for row in rows))
    close()
    latency_ms = np.concatenate([row["latency_s"] for row in rows]) * 1000
    lag_ms = np.concatenate([row["send_lag_s"] for row in rows]) * 1000
    statuses = Counter(status for row in rows for status in row["statuses"])
    span = max(row["span_s"] for row in rows)
    ok = statuses.get("OK", 0)
    cpu["client_cores_each"] = [round(row["cpu_s"] / span, 2) for row in rows]
    cpu["client_cpu_us_per_call"] = round(sum(row["cpu_s"] for row in rows) / len(latency_ms) * 1e6, 1)
    cpu["server_cpu_us_per_call"] = round(cpu["server_cores"] * span / len(latency_ms) * 1e6, 1)

    def ms(values: np.ndarray, percentile: float) -> float:
        return round(float(np.nanpercentile(values, percentile)), 3)

    return {"offered_per_s": rate, "generator": generator, "connections": clients, "requests": len(latency_ms),
            "statuses": dict(statuses), "achieved_per_s": round(ok / span), "p50_ms": ms(latency_ms, 50),
            "p99_ms": ms(latency_ms, 99), "max_ms": ms(latency_ms, 100), "send_lag_p50_ms": ms(lag_ms, 50),
            "send_lag_p99_ms": ms(lag_ms, 99), **cpu}


def against_server(directory: Path, front: str, args: argparse.Namespace, rates: list[int]) -> dict:
    """The stream and unary phases against a fresh ``citycard serve --front FRONT``."""
    directory.mkdir(parents=True)
    process, ready = start_server(directory, front)
    try:
        address = ready["address"]
        operator = Path(ready["operator_token_file"]).read_text().strip()
        token, debit, credit = register_bench_app(address, operator)
        streamed = messages = None
        if not args.unary_only:
            streamed = stream(process.pid, address, token, "packed", debit, credit, args.clients,
                              args.stream_requests, BATCH)
            if args.stream_message_requests:
                messages = stream(process.pid, address, token, "messages", debit, credit, args.clients,
                                  args.stream_message_requests, 512)
        sweep = [unary(process.pid, address, token, debit, credit, rate, args.unary_seconds,
                       args.unary_warmup_seconds, args.unary_clients, (n + 1) << 56, args.unary_generator)
                 for n, rate in enumerate(rates)]
    finally:
        process.terminate()
        process.wait(60)
    return {"front": front, "stream": streamed, "stream_messages": messages, "unary_sweep": sweep}


def machine() -> dict:
    import grpc

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cores": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0], "grpcio": grpc.__version__}


def print_table(report: dict[str, Any], clients: int) -> None:
    reference, floor = report["inprocess"], report["commit_floor"]
    if reference:
        print(f"in-process batches      : {reference['transfers_per_s']:>10,} transfers/s")
    print(f"one-transfer commit     : p50 {floor['p50_ms']} ms, p99 {floor['p99_ms']} ms (in-process: the floor)")
    main_run = {"front": report["front"], "stream": report["stream"], "stream_messages": report["stream_messages"],
                "unary_sweep": report["unary_sweep"], **{key: report[key] for key in report if key.startswith("ratio")}}
    for run in (main_run, *report["other_fronts"]):
        print(f"-- citycard serve --front {run['front']}")
        for form, key in (("packed", "stream"), ("messages", "stream_messages")):
            if run[key] and f"ratio_{key}_to_inprocess" in run:
                print(f"stream, {form:8} ({clients} procs): {run[key]['transfers_per_s']:>10,} transfers/s  "
                      f"ratio {run[f'ratio_{key}_to_inprocess']}")
        for result in run["unary_sweep"]:
            print(f"unary offered {result['offered_per_s']:>5}/s ({result['generator']}): achieved "
                  f"{result['achieved_per_s']}/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
                  f"{result['statuses']}, server {result['server_cores']} cores "
                  f"({result['server_cpu_us_per_call']} us/call), clients {result['clients_cores']} "
                  f"({result['client_cpu_us_per_call']} us/call), others {result['other_cores']}")
    print(f"load average (1, 5, 15 min): {report['load_average']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", default="var/bench")
    parser.add_argument("--inprocess-batches", type=int, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--stream-requests", type=int, default=8, help="packed requests of 8,189 per client")
    parser.add_argument("--stream-message-requests", type=int, default=10,
                        help="requests of 512 Transfer messages per client (0: skip that comparison)")
    parser.add_argument("--unary-rate", default="500,1000,2000",
                        help="offered calls per second, comma-separated; the last is the one reported as `unary`")
    parser.add_argument("--unary-seconds", type=float, default=5.0)
    parser.add_argument("--unary-warmup-seconds", type=float, default=0.5)
    parser.add_argument("--unary-clients", type=int, default=2,
                        help="connections (node) or client processes (python) of the unary generator")
    parser.add_argument("--commit-floor-commits", type=int, default=200,
                        help="one-transfer commits timed in-process (the floor under unary latency)")
    parser.add_argument("--unary-only", action="store_true", help="skip the in-process and stream phases")
    parser.add_argument("--fronts", default="native,grpcio",
                        help="servers to measure, comma-separated, each `citycard serve --front F` in turn: native "
                             "(the default server; its figures are the report's) and grpcio (grpcio alone, as "
                             "before the front; under other_fronts)")
    parser.add_argument("--unary-generator", choices=sorted(UNARY_GENERATORS), default="cxx",
                        help="cxx: gRPC's C++ library, one process (benches/grpc_unary_load.cc, `make bench-tools`; "
                             "the default: the cheapest client by far); python: grpcio asyncio processes; node: "
                             "@grpc/grpc-js, one process (benches/grpc_unary_load.js)")
    args = parser.parse_args()
    keep_freed_memory()  # as the server and its applications do: both sides of a ratio alike
    rates = [int(rate) for rate in args.unary_rate.split(",")]
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="grpc-", dir=args.dir))
    try:
        reference = None if args.unary_only else inprocess(scratch, args.inprocess_batches)
        floor = commit_floor(scratch, args.commit_floor_commits)
        runs = {front: against_server(scratch / front, front, args, rates) for front in args.fronts.split(",")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    main_run = runs.get("native") or next(iter(runs.values()))
    streamed, messages, sweep = main_run["stream"], main_run["stream_messages"], main_run["unary_sweep"]
    report: dict[str, Any] = {"machine": machine(), "load_average": os.getloadavg(), "inprocess": reference,
                              "front": main_run["front"], "stream": streamed, "stream_messages": messages,
                              "commit_floor": floor, "unary": sweep[-1], "unary_sweep": sweep,
                              "other_fronts": [run for run in runs.values() if run is not main_run],
                              "targets": {"ratio_stream_to_inprocess_min": 0.3, "unary_p99_ms_max": 5.0}}
    if reference:
        for run in runs.values():
            for key, phase in (("ratio_stream_to_inprocess", run["stream"]),
                               ("ratio_stream_messages_to_inprocess", run["stream_messages"])):
                if phase:
                    run[key] = round(phase["transfers_per_s"] / reference["transfers_per_s"], 3)
        for key in ("ratio_stream_to_inprocess", "ratio_stream_messages_to_inprocess"):
            if key in main_run:
                report[key] = main_run[key]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
