"""How fast is a purchase through real PC/SC, next to the transport's own limit?

    python -m benches.card [--json] [--purchases N] [--selects N]

Starts a private pcscd with one vpcd entry (2 readers) and two virtual cards in this process, one
per persistence mode:

* default: one write() per state-changing command, no fsync (atomic against a pulled card or a
  killed process, not durable against a power cut of the host);
* fsync: the same, then fdatasync (`citycard card virtual --fsync`).

Measured in the same run, interleaved in rounds (a block of bare SELECTs, then a block of
ROUND_PURCHASES purchases on each card) so that both modes and the baseline see the same load on
a shared machine, while each block still runs the way a terminal serving a queue does:

* select_round_trip: one SELECT through pyscard -> pcscd -> vpcd -> card and back (the transport's limit);
* purchase, per mode: SELECT + INITIALIZE FOR PURCHASE + DEBIT FOR PURCHASE with the SAM work;
* state_write, per mode: the purse data and the detail file committed whole, alone (what a purchase
  wrote until its record became a push of its proof and detail record, ~0.22 KB);
* bare_fsync: the disk's own floor for the fsync mode, in the same rounds: one record-sized write
  into a preallocated file and fdatasync, nothing else (what a syncing card cannot go below);
* sam_crypto: the soft SAM's work in one purchase (MAC1, then the MAC2 check), alone;
* purchase_in_memory: the purchase without PC/SC or disk (MemoryTransport, MemoryStore): the
  Python work of card, terminal and SAM alone;
* beyond_3_round_trips_ms, per mode (diagnostic): the purchase median less 3 bare round trips.

Target: a purchase within 4 bare round trips plus the SAM's crypto (`target_ms`); the fsync mode is
also compared with that target plus one bare fsync (`ratio_purchase_to_target_plus_fsync`). This is a
benchmark, not a test: nothing passes or fails on these numbers. Stops its pcscd and cards.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    crypto,
    personalize,
    profile_from_json,
    purse,
)
from citycard.card.commands import select_by_name
from citycard.card.pcscd import wait_for_card, wait_until_empty
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import DETAIL_SFI, PURSE_AID
from citycard.card.sam import PurchaseRequest, SamMacError

SELECTS_DEFAULT = 2_000
PURCHASES_DEFAULT = 500
WARMUP = 50
LOAD_FEN = 100_000
TERMINAL_ID = bytes.fromhex("330300000099")
ROUND_TRIPS_ALLOWED = 4
STATE_WRITES = 200
ROUND_PURCHASES = 25
BARE_FSYNC_EVERY = 5  # purchases of the syncing card between two bare fsyncs
# What a purchase's change record weighed until it became a push of its detail record and proof
# (~0.22 KB now); kept so the floor compares with earlier runs: either size is one page to sync.
RECORD_BYTES = 950
MODES = {"default": False, "fsync": True}  # mode name -> fsync


def _stats_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median": round(statistics.median(ordered) * 1e3, 4), "p99": round(p99 * 1e3, 4), "n": len(ordered)}


def _timed_once(fn: Callable[[], object], samples: list[float]) -> None:
    started = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - started)


def _timed(fn: Callable[[], object], count: int) -> list[float]:
    samples: list[float] = []
    for _ in range(count):
        _timed_once(fn, samples)
    return samples


def _version_or_none(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyscard": importlib.metadata.version("pyscard"),
        "cryptography": importlib.metadata.version("cryptography"),
        # "compiled" (card/_des.pyx) or "python" (its twin; CITYCARD_NO_EXTENSIONS=1)
        "des": crypto.IMPLEMENTATION,
        # "compiled" (card/_purchase.pyx: card, SAM and terminal side of a purchase) or "python" (the twin)
        "purchase_path": purse.PURCHASE_IMPLEMENTATION,
        "orjson": _version_or_none("orjson"),  # the card's journal encoder; None: the stdlib's
        "platform": platform.platform(),
    }


@dataclass
class _Lane:
    """One card in one reader, with its terminal and its samples."""

    card: VirtualCard
    terminal: Terminal
    purchase_s: list[float] = field(default_factory=list)


def _card(workdir: Path, name: str, keys: MasterKeys, *, fsync: bool) -> VirtualCard:
    path = workdir / f"{name}.json"
    FileStore(path).create(personalize(profile_from_json(SAMPLE_PROFILE), keys))
    return VirtualCard.open(path, fsync=fsync)


def _ready_terminal(channel: CardChannel, keys: MasterKeys) -> Terminal:
    terminal = Terminal(channel, SoftSam(keys, TERMINAL_ID), host=IssuerHost(keys))
    terminal.verify_pin(SAMPLE_PROFILE["initial_pin"])
    terminal.load(LOAD_FEN)
    for _ in range(WARMUP):
        terminal.purchase(1)
    return terminal


def _state_write(card: VirtualCard) -> Callable[[], None]:
    """The purse data and the detail records committed whole (what DEBIT FOR PURCHASE persisted until
    it recorded only what changed), written again: kept so the figure compares with earlier runs."""
    purse_df = next(df for df in card.image.mf.walk() if df.application == "purse")
    detail = purse_df.ef_by_sfi(DETAIL_SFI)
    assert detail is not None
    return lambda: card.commit(card.purse, detail)


def _purchases_in_memory(keys: MasterKeys, count: int) -> list[float]:
    card = VirtualCard(personalize(profile_from_json(SAMPLE_PROFILE), keys), MemoryStore())
    terminal = _ready_terminal(CardChannel(MemoryTransport(card)), keys)
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


class _BareFsync:
    """The disk's floor for a syncing card: a record-sized write into preallocated space, then fdatasync."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(self._fd, bytes(1024 * 1024))
        os.fsync(self._fd)
        self._offset = 0
        self.samples_s: list[float] = []

    def once(self) -> None:
        started = time.perf_counter()
        os.pwrite(self._fd, b"x" * (RECORD_BYTES - 1) + b"\n", self._offset)
        os.fdatasync(self._fd)
        self.samples_s.append(time.perf_counter() - started)
        self._offset = (self._offset + RECORD_BYTES) % (1024 * 1024 - RECORD_BYTES)

    def close(self) -> None:
        os.close(self._fd)


def _interleaved(select: Callable[[], object], lanes: dict[str, _Lane], purchases: int,
                 selects: int, bare_fsync: _BareFsync) -> list[float]:
    """Round by round: a share of the bare SELECTs, then a block of purchases on each card (with a bare
    fsync now and then between the syncing card's purchases, outside their timing)."""
    select_s: list[float] = []
    rounds = math.ceil(purchases / ROUND_PURCHASES)
    selects_per_round = math.ceil(selects / rounds)
    for round_index in range(rounds):
        for _ in range(min(selects_per_round, selects - len(select_s))):
            _timed_once(select, select_s)
        block = min(ROUND_PURCHASES, purchases - round_index * ROUND_PURCHASES)
        for mode, lane in lanes.items():
            purchase_one_fen = functools.partial(lane.terminal.purchase, 1)
            for index in range(block):
                _timed_once(purchase_one_fen, lane.purchase_s)
                if MODES[mode] and index % BARE_FSYNC_EVERY == 0:
                    bare_fsync.once()  # spaced like the card's own syncs: back to back, they cost more here
    return select_s


def run(selects: int, purchases: int) -> dict[str, object]:
    keys = MasterKeys.generate()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="citycard-bench-card-") as tmp:
        workdir = Path(tmp)
        with PcscDaemon(workdir / "pcscd", entries=1, name="citycard bench") as daemon:
            cards = {mode: _card(workdir, mode, keys, fsync=fsync) for mode, fsync in MODES.items()}
            links = [VpcdLink(card, reader.port) for card, reader in zip(cards.values(), daemon.readers)]
            lanes: dict[str, _Lane] = {}
            select_transport: PcscTransport | None = None
            bare_fsync = _BareFsync(workdir / "bare-fsync.bin")
            try:
                for link, reader in zip(links, daemon.readers):
                    link.insert()
                    wait_for_card(reader.name)
                for (mode, card), reader in zip(cards.items(), daemon.readers):
                    lanes[mode] = _Lane(card, _ready_terminal(CardChannel(PcscTransport(reader.name)), keys))
                select_transport = PcscTransport(daemon.readers[0].name)
                select_apdu = select_by_name(PURSE_AID).raw
                for _ in range(WARMUP):
                    select_transport.transmit(select_apdu)
                select_one = functools.partial(select_transport.transmit, select_apdu)
                select_s = _interleaved(select_one, lanes, purchases, selects, bare_fsync)
            finally:
                bare_fsync.close()
                if select_transport is not None:
                    select_transport.close()
                for lane in lanes.values():
                    lane.terminal.channel.close()
                for link in links:
                    link.remove()
                for reader in daemon.readers:
                    wait_until_empty(reader.name)
            write_s = {mode: _timed(_state_write(card), STATE_WRITES) for mode, card in cards.items()}
    sam_s = _sam_crypto(keys, purchases)
    in_memory_s = _purchases_in_memory(keys, purchases)
    select_ms, sam_ms = _stats_ms(select_s), _stats_ms(sam_s)
    target_ms = ROUND_TRIPS_ALLOWED * select_ms["median"] + sam_ms["median"]
    fsync_ms = _stats_ms(bare_fsync.samples_s)
    modes: dict[str, object] = {}
    for mode, lane in lanes.items():
        purchase_ms = _stats_ms(lane.purchase_s)
        modes[mode] = {
            "fsync": MODES[mode],
            "purchase_ms": purchase_ms,
            "state_write_ms": _stats_ms(write_s[mode]),
            "ratio_purchase_to_select": round(purchase_ms["median"] / select_ms["median"], 2),
            "ratio_purchase_to_target": round(purchase_ms["median"] / target_ms, 2),
            # diagnostic: the purchase's median less its 3 APDUs' bare round trips, i.e. the card's and
            # the terminal's own work through PC/SC (compare purchase_in_memory_ms, the same work hot)
            "beyond_3_round_trips_ms": round(purchase_ms["median"] - 3 * select_ms["median"], 4),
            "within_target": purchase_ms["median"] <= target_ms,
        }
        if MODES[mode]:  # the same target plus the one sync the mode adds, at the disk's own price
            modes[mode]["ratio_purchase_to_target_plus_fsync"] = round(  # type: ignore[index]
                purchase_ms["median"] / (target_ms + fsync_ms["median"]), 2)
    return {
        "benchmark": "card purchase through pcscd + vpcd",
        "machine": _machine(),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "select_round_trip_ms": select_ms,
        "sam_crypto_ms": sam_ms,
        "bare_fsync_ms": fsync_ms,
        "purchase_in_memory_ms": _stats_ms(in_memory_s),
        "target_ms": round(target_ms, 4),
        "modes": modes,
    }


def _table(result: dict[str, object]) -> str:
    modes: dict[str, dict[str, object]] = result["modes"]  # type: ignore[assignment]
    width = 36
    lines = [f"{'':{width}}" + "".join(f"{name + (' (--fsync)' if m['fsync'] else ' (no fsync)'):>24}"
                                       for name, m in modes.items()),
             f"{'':{width}}" + f"{'median ms':>12}{'p99 ms':>12}" * len(modes)]

    def row(label: str, key: str) -> str:
        stats: list[dict[str, float]] = [m[key] for m in modes.values()]  # type: ignore[misc]
        return f"{label:{width}}" + "".join(f"{s['median']:>12.3f}{s['p99']:>12.3f}" for s in stats)

    lines.append(row("purchase (SELECT, INIT, DEBIT, SAM)", "purchase_ms"))
    lines.append(row("state write of a purchase", "state_write_ms"))
    lines.append(f"{'purchase / SELECT':{width}}" + "".join(f"{str(m['ratio_purchase_to_select']) + 'x':>24}"
                                                            for m in modes.values()))
    lines.append(f"{'purchase / target':{width}}" + "".join(f"{str(m['ratio_purchase_to_target']) + 'x':>24}"
                                                            for m in modes.values()))
    lines.append(f"{'within target':{width}}" + "".join(f"{'yes' if m['within_target'] else 'no':>24}"
                                                        for m in modes.values()))
    lines.append(f"{'purchase / (target + bare fsync)':{width}}" + "".join(
        f"{str(m.get('ratio_purchase_to_target_plus_fsync', '-')) + ('x' if 'ratio_purchase_to_target_plus_fsync' in m else ''):>24}"
        for m in modes.values()))
    lines.append("")
    for label, key in (("select round trip (transport limit)", "select_round_trip_ms"),
                       ("SAM crypto per purchase", "sam_crypto_ms"),
                       ("bare fsync (record write + fdatasync)", "bare_fsync_ms"),
                       ("purchase in memory (no PC/SC, no disk)", "purchase_in_memory_ms")):
        s: dict[str, float] = result[key]  # type: ignore[assignment]
        lines.append(f"{label:{width}}{s['median']:>12.3f}{s['p99']:>12.3f}")
    lines.append(f"target {result['target_ms']:.3f} ms = {ROUND_TRIPS_ALLOWED} round trips + SAM crypto; "
                 f"load average {json.dumps(result['load_average_1min'])}")
    lines.append(f"machine: {json.dumps(result['machine'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.card", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--selects", type=int, default=SELECTS_DEFAULT)
    parser.add_argument("--purchases", type=int, default=PURCHASES_DEFAULT, help="per mode")
    args = parser.parse_args(argv)
    if not (1 <= args.selects <= 100_000 and 1 <= args.purchases <= 20_000):
        parser.error("--selects 1..100000, --purchases 1..20000 (the purse counter is 16 bits)")
    result = run(args.selects, args.purchases)
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
