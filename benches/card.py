"""How fast is a purchase through real PC/SC, next to the transport's own limit?

    python -m benches.card [--json] [--purchases N] [--selects N]

Starts a private pcscd with one vpcd entry (2 readers) and two virtual cards in this process:
one persisting with fdatasync (the default, durable against a power cut), one without
(atomic against a pulled card or a killed process, not durable against a power cut). Measures, in
the same run:

* select_round_trip: one SELECT through pyscard -> pcscd -> vpcd -> card and back (the transport's limit);
* sam_crypto: the soft SAM's work in one purchase (MAC1, then the MAC2 check), alone;
* card_commit: one state write (serialise + append + fdatasync) of the durable card, alone;
* purchase: SELECT + INITIALIZE FOR PURCHASE + DEBIT FOR PURCHASE with the SAM work, on each card;
* purchase_in_memory: the same purchase without PC/SC or disk (MemoryTransport, MemoryStore): the
  Python work of card, terminal and SAM alone.

Target: a purchase within 4 bare round trips plus the SAM's crypto (`target_ms`). This is a
benchmark, not a test: nothing passes or fails on these numbers. Stops its pcscd and cards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from citycard.card import (
    CardChannel,
    FileStore,
    IssuerHost,
    MasterKeys,
    MemoryStore,
    MemoryTransport,
    PcscDaemon,
    PcscTransport,
    SoftSam,
    Terminal,
    VirtualCard,
    VpcdLink,
    personalize,
    profile_from_json,
)
from citycard.card.commands import select_by_name
from citycard.card.pcscd import wait_for_card, wait_until_empty
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import PURSE_AID
from citycard.card.sam import PurchaseRequest, SamMacError

SELECTS_DEFAULT = 2_000
PURCHASES_DEFAULT = 500
WARMUP = 50
LOAD_FEN = 100_000
TERMINAL_ID = bytes.fromhex("330300000099")
ROUND_TRIPS_ALLOWED = 4


def _stats_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median": round(statistics.median(ordered) * 1e3, 4), "p99": round(p99 * 1e3, 4), "n": len(ordered)}


def _timed(fn: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def _machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyscard": importlib.metadata.version("pyscard"),
        "cryptography": importlib.metadata.version("cryptography"),
        "platform": platform.platform(),
    }


def _card(workdir: Path, name: str, keys: MasterKeys, *, fsync: bool) -> VirtualCard:
    path = workdir / f"{name}.json"
    FileStore(path).create(personalize(profile_from_json(SAMPLE_PROFILE), keys))
    return VirtualCard.open(path, fsync=fsync)


def _purchases(reader: str, keys: MasterKeys, count: int) -> list[float]:
    terminal = Terminal(CardChannel(PcscTransport(reader)), SoftSam(keys, TERMINAL_ID), host=IssuerHost(keys))
    try:
        terminal.verify_pin(SAMPLE_PROFILE["initial_pin"])
        terminal.load(LOAD_FEN)
        for _ in range(WARMUP):
            terminal.purchase(1)
        return _timed(lambda: terminal.purchase(1), count)
    finally:
        terminal.channel.close()


def _purchases_in_memory(keys: MasterKeys, count: int) -> list[float]:
    card = VirtualCard(personalize(profile_from_json(SAMPLE_PROFILE), keys), MemoryStore())
    terminal = Terminal(CardChannel(MemoryTransport(card)), SoftSam(keys, TERMINAL_ID), host=IssuerHost(keys))
    terminal.verify_pin(SAMPLE_PROFILE["initial_pin"])
    terminal.load(LOAD_FEN)
    for _ in range(WARMUP):
        terminal.purchase(1)
    return _timed(lambda: terminal.purchase(1), count)


def _sam_crypto(keys: MasterKeys, count: int) -> list[float]:
    sam = SoftSam(keys, TERMINAL_ID)
    serial = bytes.fromhex(SAMPLE_PROFILE["purse"]["app_serial"])
    request = PurchaseRequest(bytes(4), 0, 1, 0x06, bytes.fromhex("20250115120000"), 1, 0, serial)

    def one() -> None:
        sam.init_for_purchase(request)
        with contextlib.suppress(SamMacError):  # a wrong MAC2 costs the same computation as a right one
            sam.check_mac2(bytes(4))

    return _timed(one, count)


def run(selects: int, purchases: int) -> dict[str, object]:
    keys = MasterKeys.generate()
    with tempfile.TemporaryDirectory(prefix="citycard-bench-card-") as tmp:
        workdir = Path(tmp)
        with PcscDaemon(workdir / "pcscd", entries=1, name="citycard bench") as daemon:
            durable_reader, fast_reader = daemon.readers
            durable = _card(workdir, "durable", keys, fsync=True)
            fast = _card(workdir, "no-fsync", keys, fsync=False)
            links = [VpcdLink(durable, durable_reader.port), VpcdLink(fast, fast_reader.port)]
            try:
                for link, reader in zip(links, daemon.readers):
                    link.insert()
                    wait_for_card(reader.name)
                transport = PcscTransport(durable_reader.name)
                select = select_by_name(PURSE_AID).raw
                try:
                    for _ in range(WARMUP):
                        transport.transmit(select)
                    select_s = _timed(lambda: transport.transmit(select), selects)
                finally:
                    transport.close()
                purchase_s = _purchases(durable_reader.name, keys, purchases)
                purchase_fast_s = _purchases(fast_reader.name, keys, purchases)
                commit_s = _timed(durable.commit, min(purchases, 200))
                sam_s = _sam_crypto(keys, purchases)
                in_memory_s = _purchases_in_memory(keys, purchases)
            finally:
                for link in links:
                    link.remove()
                for reader in daemon.readers:
                    wait_until_empty(reader.name)
    select_ms, sam_ms = _stats_ms(select_s), _stats_ms(sam_s)
    purchase_ms, fast_ms = _stats_ms(purchase_s), _stats_ms(purchase_fast_s)
    target_ms = ROUND_TRIPS_ALLOWED * select_ms["median"] + sam_ms["median"]
    return {
        "benchmark": "card purchase through pcscd + vpcd",
        "machine": _machine(),
        "select_round_trip_ms": select_ms,
        "sam_crypto_ms": sam_ms,
        "card_commit_ms": _stats_ms(commit_s),
        "purchase_ms": purchase_ms,
        "purchase_no_fsync_ms": fast_ms,
        "purchase_in_memory_ms": _stats_ms(in_memory_s),
        "ratio_purchase_to_select": round(purchase_ms["median"] / select_ms["median"], 2),
        "ratio_purchase_no_fsync_to_select": round(fast_ms["median"] / select_ms["median"], 2),
        "target_ms": round(target_ms, 4),
        "purchase_within_target": purchase_ms["median"] <= target_ms,
        "purchase_no_fsync_within_target": fast_ms["median"] <= target_ms,
    }


def _table(result: dict[str, object]) -> str:
    rows = [("select round trip (transport limit)", result["select_round_trip_ms"]),
            ("SAM crypto per purchase", result["sam_crypto_ms"]),
            ("card state commit (fdatasync)", result["card_commit_ms"]),
            ("purchase, durable card (fdatasync)", result["purchase_ms"]),
            ("purchase, card without fsync", result["purchase_no_fsync_ms"]),
            ("purchase in memory (no PC/SC, no disk)", result["purchase_in_memory_ms"])]
    lines = [f"{'':38} {'median ms':>10} {'p99 ms':>10}"]
    lines += [f"{name:38} {s['median']:>10.3f} {s['p99']:>10.3f}" for name, s in rows]  # type: ignore[index]
    lines.append(f"purchase / select: {result['ratio_purchase_to_select']}x (durable), "
                 f"{result['ratio_purchase_no_fsync_to_select']}x (no fsync); "
                 f"target {result['target_ms']:.3f} ms = {ROUND_TRIPS_ALLOWED} round trips + SAM")
    lines.append(f"machine: {json.dumps(result['machine'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.card", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--selects", type=int, default=SELECTS_DEFAULT)
    parser.add_argument("--purchases", type=int, default=PURCHASES_DEFAULT)
    args = parser.parse_args(argv)
    if not (1 <= args.selects <= 100_000 and 1 <= args.purchases <= 20_000):
        parser.error("--selects 1..100000, --purchases 1..20000 (the purse counter is 16 bits)")
    result = run(args.selects, args.purchases)
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
