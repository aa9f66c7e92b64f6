"""Transit at the gates, measured in one run: ``python -m benches.transit --json``.

Three measurements against a real ``citycard serve`` with the transit application in its own process, and
clients in other processes on loopback:

1. online: ``--gates`` gates (default 1,000), each on its own ``Transit.Taps`` stream, each tapping a card on
   a bus every ``1/--rate`` seconds (at a random phase); taps per second answered, and the server-side decision
   time (``TapDecision.decision_micros``: from the tap's arrival to its answer, the ledger booking included)
   p50/p99, beside the round trip the gate saw;
2. offline: batches of 8,189 TAC-signed records (real TACs under the issuer's key, valid e-purse accounts)
   uploaded by a gate process, ``UPLOAD_LANES`` gates at once; records cleared per second (TAC check and
   booking included) as a ratio to the ledger's in-process throughput (target >= 0.5), in ``--rounds``
   rounds of ``--batches`` batches, each round right after its own in-process reference (batches of 8,189
   through ``Ledger.create_transfers``, a fresh ledger): the ratio is the median round's. The
   records come from the ``--gates`` cards (a card taps every 1,000th record), as commuters' cards repeat day
   after day; the first, untimed batch presents every card, so the timed ones run with the card keys warm in
   the service's cache (tac.CARD_KEYS_DEFAULT cards): the output says how many cards and whether warm;
3. denylist: ``--gates`` gates subscribed to ``Transit.StreamDenylist``; a written loss report at the core and
   the moment each gate receives it; p50/p99/max over all gates and ``--reports`` reports (target p99 < 1 s).

The feed is the city's sample feed with its caps lifted (a bench card taps far more than a rider would).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from citycard.core.allocator import keep_freed_memory

from benches.grpc import inprocess, machine, process_cpu_s

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 60.0
LOAD_FEN = 10_000_000  # a bench card pays thousands of fares
CLIENT_PROCESSES = 4
WARMUP_S = 3.0
RESULT_TIMEOUT_S = 600.0
INPROCESS_BATCHES = 48  # long enough that one slow fsync does not set the reference
UPLOAD_LANES = int(os.environ.get("BENCH_UPLOAD_LANES", "4"))  # gates uploading at once to the clearing service


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


# -- set-up: cards in the registry, the issuer's keys, the feed, the server --------------------------------------

def prepare(directory: Path, cards: int) -> list[tuple[str, str, str]]:
    """``cards`` persons with a card each and a loaded e-purse; (card number, card id code, "id number name")."""
    from citycard.core.identity import check_character
    from citycard.core.registry import Registry

    made = []
    with Registry.open(directory / "data") as registry:
        for n in range(cards):
            body = f"370102{1950 + n % 50}0{1 + n % 9}1{n % 9}{n % 1000:03d}"
            id_number = body + check_character(body)
            try:
                registry.add_person(id_number=id_number, name=f"乘客{n}", gender="male" if n % 2 else "female",
                                    date_of_birth=f"{body[6:10]}-{body[10:12]}-{body[12:14]}", residence="济南市",
                                    household_registration="济南市", status="retired", actor="bench")
            except Exception:  # noqa: BLE001, S112 (a generated duplicate: skip it)
                continue
            card = registry.issue_card(id_number, actor="bench")
            registry.load_purse(card.card_number, LOAD_FEN, actor="bench")
            made.append((card.card_number, card.card_id_code, f"{id_number} 乘客{n}"))
    return made


def bench_feed(directory: Path) -> Path:
    feed = directory / "feed"
    shutil.copytree(REPO / "apps" / "bus" / "feed", feed)
    policy = feed / "citycard_fare_policy.txt"
    lines = [line for line in policy.read_text().splitlines() if not line.startswith(("daily_cap", "weekly_cap"))]
    policy.write_text("\n".join(lines) + "\ndaily_cap,,,100000.00\nweekly_cap,,,500000.00\n")
    return feed


def start(directory: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], dict[str, Any]]:
    from citycard.card import MasterKeys

    keys = directory / "keys.json"
    MasterKeys.generate().save(keys)
    data = directory / "data"
    ready = directory / "ready.json"
    env = {**os.environ, "CITYCARD_TRANSIT_DIR": str(data / "transit"), "CITYCARD_CARD_KEYS": str(keys),
           "CITYCARD_TRANSIT_FEED": str(bench_feed(directory))}
    with open(directory / "server.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "citycard.server", "--data", str(data), "--listen",
                                    "127.0.0.1:0", "--plugins", "transit", "--ready-file", str(ready),
                                    "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    transit_ready = data / "transit" / "ready.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready.exists() and transit_ready.exists()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server did not start; see {directory / 'server.log'}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text()), json.loads(transit_ready.read_text())


def _token(path: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + Path(path).read_text().strip()),)


# -- 1. online taps ----------------------------------------------------------------------------------------------

def online_client(address: str, token_file: str, cards: list[str], first_gate: int, rate: float, seconds: float,
                  out: Any) -> None:
    out.put(asyncio.run(_online(address, token_file, cards, first_gate, rate, seconds)))


async def _online(address: str, token_file: str, cards: list[str], first_gate: int, rate: float,
                  seconds: float) -> dict[str, Any]:
    import grpc

    from citycard.v1 import transit_pb2, transit_pb2_grpc

    metadata = _token(token_file)
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    decision_us: list[int] = []
    round_trip_us: list[float] = []
    refused: dict[str, int] = {}
    start_at = time.time() + 2.0
    stop_at = start_at + WARMUP_S + seconds
    measured_from = start_at + WARMUP_S

    async def gate(index: int, card: str) -> None:
        stub = transit_pb2_grpc.TransitStub(channels[index % len(channels)])
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> Any:
            while (item := await queue.get()) is not None:
                yield item

        call = stub.Taps(requests(), metadata=metadata)
        gate_id = f"G{first_gate + index:05d}"
        next_at = start_at + random.random() / rate
        seq = 0
        while True:
            delay = next_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.time() >= stop_at:
                break
            seq += 1
            request = transit_pb2.TapRequest(
                tap_id=str(seq), card_number=card, gate_id=gate_id, route_id="1", stop_id="B_RAIL",
                mode=transit_pb2.TAP_MODE_BOARD, terminal_id=f"{first_gate + index:012X}", terminal_seq=seq,
                card_counter=seq, chip_balance_fen=LOAD_FEN - 200 * seq)  # the chip, as the gate read it
            request.at.GetCurrentTime()
            sent = time.perf_counter()
            await queue.put(request)
            answer = await call.read()
            if time.time() >= measured_from:
                round_trip_us.append((time.perf_counter() - sent) * 1e6)
                decision_us.append(answer.decision_micros)
                if not answer.accepted:
                    name = transit_pb2.RefusalReason.Name(answer.reason)
                    refused[name] = refused.get(name, 0) + 1
            next_at += 1.0 / rate
        await queue.put(None)
        call.cancel()

    await asyncio.gather(*(gate(i, card) for i, card in enumerate(cards)))
    for channel in channels:
        await channel.close()
    return {"decision_us": decision_us, "round_trip_us": round_trip_us, "refused": refused}


def online(transit: dict[str, Any], cards: list[str], gates: int, rate: float, seconds: float,
           core_pid: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    per = (gates + CLIENT_PROCESSES - 1) // CLIENT_PROCESSES
    workers = [context.Process(target=online_client, args=(
        transit["address"], transit["gate_token_file"], cards[i * per:(i + 1) * per], i * per, rate, seconds, out))
        for i in range(CLIENT_PROCESSES)]
    for worker in workers:
        worker.start()
    cpu_before = (process_cpu_s(core_pid), process_cpu_s(transit["pid"]))
    results = [out.get(timeout=seconds + 300) for _ in workers]
    cpu_after = (process_cpu_s(core_pid), process_cpu_s(transit["pid"]))
    for worker in workers:
        worker.join()
    decisions = [v for r in results for v in r["decision_us"]]
    trips = [v for r in results for v in r["round_trip_us"]]
    refused: dict[str, int] = {}
    for result in results:
        for name, count in result["refused"].items():
            refused[name] = refused.get(name, 0) + count
    accepted = len(decisions) - sum(refused.values())
    return {"gates": gates, "offered_taps_per_s": round(gates * rate), "seconds": seconds, "accepted": accepted,
            "taps_answered": len(decisions), "taps_per_s": round(len(decisions) / seconds),
            "decision_p50_ms": round(_percentile(decisions, 50) / 1000, 3),
            "decision_p99_ms": round(_percentile(decisions, 99) / 1000, 3),
            "round_trip_p50_ms": round(_percentile(trips, 50) / 1000, 3),
            "round_trip_p99_ms": round(_percentile(trips, 99) / 1000, 3), "refused": refused,
            # CPU over the whole phase (warm-up included) per tap answered in it, for the two server processes.
            "core_cpu_ms_per_tap": round((cpu_after[0] - cpu_before[0]) * 1000 / max(1, len(decisions)), 3),
            "transit_cpu_ms_per_tap": round((cpu_after[1] - cpu_before[1]) * 1000 / max(1, len(decisions)), 3)}


# -- 2. offline clearing ---------------------------------------------------------------------------------------------

def signed_batches(keys_path: Path, cards: list[tuple[str, str, str]], batches: int) -> list[bytes]:
    """Packed batches of real purchase records: each card's TAC under its diversified key."""
    from citycard.apps.bus import records as rec
    from citycard.apps.bus.ids import app_serial_of_card
    from citycard.card import MasterKeys
    from citycard.card.crypto import diversification_factor, diversify, pboc_mac, tac_key
    from citycard.card.keys import KeyUsage

    master = MasterKeys.load(keys_path).get("purse", KeyUsage.TAC).value.reveal()
    serials = [bytes.fromhex(app_serial_of_card(code)) for _, code, _ in cards]
    card_keys = [tac_key(diversify(master, diversification_factor(serial))) for serial in serials]
    date_time = bytes.fromhex(time.strftime("%Y%m%d%H%M%S"))
    out = []
    seq = 0
    for batch in range(batches):
        terminal = (0xB0_0000_0000 + batch).to_bytes(6, "big")
        records = []
        for _ in range(rec.RECORDS_MAX):
            seq += 1
            card = seq % len(serials)
            covered = (1).to_bytes(4, "big") + bytes((6,)) + terminal + seq.to_bytes(4, "big") + date_time
            tac = pboc_mac(card_keys[card], covered)
            records.append(rec.Record(serials[card], seq & 0xFFFF, 1, 6, terminal, seq, date_time, tac, 0))
        out.append(rec.to_packed(rec.pack(records)))
    return out


def offline_client(address: str, token_file: str, rounds: list[list[bytes]], go: Any, out: Any) -> None:
    """Uploads round after round, each when the bench says go (after that round's in-process reference):
    ``UPLOAD_LANES`` gates at once, each batch under its own id. The first batch of all warms up, untimed."""
    import grpc

    from citycard.v1 import transit_pb2, transit_pb2_grpc

    metadata = _token(token_file)
    stub = transit_pb2_grpc.TransitStub(grpc.insecure_channel(address))

    def send(round_index: int, index: int) -> int:
        answer = stub.UploadRecords(transit_pb2.UploadRecordsRequest(
            batch_id=f"R{round_index}-B{index}", gate_id="G-OFFLINE", route_id="1",
            packed_records=rounds[round_index][index]), metadata=metadata, timeout=CALL_TIMEOUT_S)
        return answer.booked

    send(0, 0)
    for round_index, payloads in enumerate(rounds):
        go.get(timeout=RESULT_TIMEOUT_S)
        first = 1 if round_index == 0 else 0
        booked = [0] * len(payloads)

        def lane_work(lane: int, round_index: int = round_index, first: int = first, booked: list[int] = booked,
                      count: int = len(payloads)) -> None:
            for index in range(first + lane, count, UPLOAD_LANES):
                booked[index] = send(round_index, index)

        started = time.perf_counter()
        lanes = [threading.Thread(target=lane_work, args=(lane,)) for lane in range(UPLOAD_LANES)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
        elapsed = time.perf_counter() - started
        out.put({"records": sum(len(p) // 48 for p in payloads[first:]), "booked": sum(booked[first:]),
                 "seconds": elapsed})


def offline(directory: Path, transit: dict[str, Any], payloads: list[bytes], cards: int,
            rounds: int) -> dict[str, Any]:
    """``rounds`` rounds, each the in-process ledger's reference then an upload of its share of ``payloads``
    (the machine's state, a neighbour's load, the page cache, moves both alike within a round); the ratio
    reported is the median of the rounds' ratios."""
    from citycard.apps.bus.tac import CARD_KEYS_DEFAULT, IMPLEMENTATION

    per_round = len(payloads) // rounds
    shares = [payloads[r * per_round:(r + 1) * per_round] for r in range(rounds)]
    context = multiprocessing.get_context("spawn")
    go, out = context.Queue(), context.Queue()
    worker = context.Process(target=offline_client, args=(transit["address"], transit["gate_token_file"], shares,
                                                          go, out))
    worker.start()
    measured = []
    for round_index in range(rounds):
        reference = inprocess(directory / f"inprocess-{round_index}", batches=INPROCESS_BATCHES)
        go.put(round_index)
        uploaded = out.get(timeout=RESULT_TIMEOUT_S)
        per_s = uploaded["records"] / uploaded["seconds"]
        measured.append({"inprocess_per_s": reference["transfers_per_s"], "records": uploaded["records"],
                         "booked": uploaded["booked"], "seconds": round(uploaded["seconds"], 3),
                         "records_per_s": round(per_s), "ratio": round(per_s / reference["transfers_per_s"], 3)})
    worker.join()
    # The warm-up batch holds min(8,189, cards) distinct cards; warm means every card's key is kept from it.
    warmed = min(len(payloads[0]) // 48, cards)
    ratios = sorted(one["ratio"] for one in measured)
    return {"rounds": measured, "records": sum(one["records"] for one in measured),
            "booked": sum(one["booked"] for one in measured),
            "records_per_s": round(float(np.median([one["records_per_s"] for one in measured]))),
            "ratio_to_inprocess": ratios[len(ratios) // 2], "distinct_cards": cards,
            "card_keys_warm": warmed == cards and cards <= CARD_KEYS_DEFAULT, "tac_implementation": IMPLEMENTATION}


# -- 3. denylist propagation -------------------------------------------------------------------------------------------

def denylist_client(address: str, token_file: str, gates: int, watched: list[str], ready: Any, out: Any) -> None:
    out.put(asyncio.run(_denylist(address, token_file, gates, watched, ready)))


async def _denylist(address: str, token_file: str, gates: int, watched: list[str], ready: Any) -> dict[str, Any]:
    import grpc

    from citycard.v1 import transit_pb2, transit_pb2_grpc

    metadata = _token(token_file)
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    arrivals: dict[str, list[int]] = {card: [] for card in watched}
    subscribed = 0
    all_in = asyncio.Event()

    async def gate(index: int) -> None:
        nonlocal subscribed
        stub = transit_pb2_grpc.TransitStub(channels[index % len(channels)])
        call = stub.StreamDenylist(transit_pb2.StreamGateDenylistRequest(since_version=0, follow=True),
                                   metadata=metadata)
        pending = set(watched)
        first = True
        async for delta in call:
            now = time.time_ns()
            if first:
                first = False
                subscribed += 1
                if subscribed == gates:
                    all_in.set()
            for entry in delta.added:
                if entry.card_number in pending:
                    arrivals[entry.card_number].append(now)
                    pending.discard(entry.card_number)
            if not pending:
                call.cancel()
                return

    tasks = [asyncio.create_task(gate(i)) for i in range(gates)]
    await all_in.wait()
    ready.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=300)
    for channel in channels:
        await channel.close()
    return arrivals


def denylist(core: dict[str, Any], transit: dict[str, Any], gates: int,
             reported: list[tuple[str, str, str]]) -> dict[str, Any]:
    import grpc

    from citycard.v1 import cards_pb2, cards_pb2_grpc

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    per = (gates + CLIENT_PROCESSES - 1) // CLIENT_PROCESSES
    readies = [context.Event() for _ in range(CLIENT_PROCESSES)]
    watched = [card for card, _, _ in reported]
    workers = [context.Process(target=denylist_client, args=(
        transit["address"], transit["gate_token_file"], min(per, gates - i * per), watched, readies[i], out))
        for i in range(CLIENT_PROCESSES)]
    for worker in workers:
        worker.start()
    for event in readies:
        event.wait(timeout=300)
    stub = cards_pb2_grpc.CardsStub(grpc.insecure_channel(core["address"]))
    metadata = _token(core["operator_token_file"])
    reported_at: dict[str, int] = {}
    for card, _, holder in reported:
        id_number, name = holder.split()
        time.sleep(0.5)
        reported_at[card] = time.time_ns()
        stub.ReportLoss(cards_pb2.ReportLossRequest(actor="bench", card_number=card, written=cards_pb2.WrittenReport(
            holder_id_number=id_number, holder_name=name)), metadata=metadata,
            timeout=CALL_TIMEOUT_S)
    results = [out.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    latencies_ms = [(arrived - reported_at[card]) / 1e6 for result in results
                    for card, times in result.items() for arrived in times]
    return {"gates": gates, "reports": len(reported), "arrivals": len(latencies_ms),
            "expected_arrivals": gates * len(reported),
            "p50_ms": round(_percentile(latencies_ms, 50), 1), "p99_ms": round(_percentile(latencies_ms, 99), 1),
            "max_ms": round(max(latencies_ms), 1) if latencies_ms else None}


# -- the run -----------------------------------------------------------------------------------------------------------

def _met(phase: dict[str, Any], met: bool) -> bool | None:
    """Whether a phase met its target; None for a phase --only skipped."""
    return None if phase.get("skipped") else bool(met)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--gates", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.5,
                        help="taps per second per gate (0.5: a busy metro gate lets a rider through every 2 s)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds of the online phase")
    parser.add_argument("--batches", type=int, default=33,
                        help="offline batches of 8,189 records per round (the first of all warms up)")
    parser.add_argument("--rounds", type=int, default=3, help="offline rounds, each beside its own reference")
    parser.add_argument("--reports", type=int, default=5, help="loss reports in the denylist phase")
    parser.add_argument("--only", choices=["online", "offline", "denylist"], help="run one phase (for profiling)")
    args = parser.parse_args()
    keep_freed_memory()  # as the server and its applications do: both sides of a ratio alike
    directory = Path(tempfile.mkdtemp(prefix="citycard-bench-transit-"))
    process = None
    try:
        made = prepare(directory, args.gates + args.reports)
        process, core, transit = start(directory)
        skipped = {"skipped": True, "decision_p99_ms": float("nan"), "ratio_to_inprocess": float("nan"),
                   "p99_ms": float("nan")}
        online_result = online(transit, [card for card, _, _ in made[:args.gates]], args.gates, args.rate,
                               args.seconds, process.pid) if args.only in (None, "online") else skipped
        if args.only in (None, "offline"):
            offline_result = offline(directory, transit, signed_batches(directory / "keys.json", made[:args.gates],
                                                                        args.batches * args.rounds),
                                     len(made[:args.gates]), args.rounds)
        else:
            offline_result = skipped
        denylist_result = denylist(core, transit, args.gates, made[args.gates:args.gates + args.reports]) \
            if args.only in (None, "denylist") else skipped
        result = {"machine": {**machine(), "load_average": os.getloadavg()}, 
                  "online": online_result, "offline": offline_result, "denylist": denylist_result,
                  "targets": {"online_decision_p99_ms_under": 5, "offline_ratio_at_least": 0.5,
                              "denylist_p99_ms_under": 1000},
                  "met": {"online": _met(online_result, online_result["decision_p99_ms"] < 5
                                         and online_result.get("accepted") != 0),  # all refused measures nothing
                          "offline": _met(offline_result, offline_result["ratio_to_inprocess"] >= 0.5),
                          "denylist": _met(denylist_result, denylist_result["p99_ms"] < 1000)}}
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        for section in ("online", "offline", "denylist", "met"):
            print(section, json.dumps(result[section], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
