"""How long does a city's roster take from import to print file, and does memory stay flat as it grows?

    python -m benches.production [--json] [--sizes 25000,50000,100000] [--roster dbf|csv] [--jobs 2]
                                 [--photos N]

For each roster size, in its own process (so that each size's peak RSS is its own), on a fresh data
directory on the same disk:

* setup, not timed: the employers (one per 500 persons), the roster file the e-government system
  exports (a GBK dBase III table by default, written by a process of its own), and every person's
  photo already converted to the print specification, put in place the way photo intake leaves it;
* timed, the operator's path from the roster to the producer's files: ``roster import`` (``--jobs``
  worker processes read the file and check the rows; this process checks what needs the registry and
  writes the entries), ``batch create`` (register the persons with their medical accounts and order
  their cards, one batch per employer, several batches a commit), and ``batch export-print`` of every
  batch (the GBK print DBFs written by ``--jobs`` worker processes while this one hard-links the photos);
* for each step: wall seconds and CPU seconds, of this process and of the worker processes it started
  (the machine is shared: under other load the wall clock stretches, the CPU seconds much less);
* memory: ``peak_rss_mib``, the process's peak resident set size during the timed steps (VmHWM, reset
  after the setup); ``peak_heap_mib``, the largest anonymous resident memory seen at the steps' progress
  calls (the heap: Python objects, LMDB's dirty pages, the ledger's in-memory account table); after each
  step, resident memory split into anonymous and file-backed (LMDB's memory map of its data file, which
  is the data written, paged by the kernel); and the size of the LMDB data file. ``growth`` divides the
  largest size's figures by the smallest's: flat memory is a ratio near 1 where persons grow 4x.

Photo conversion is not on this path: photos arrive from employers over days, and intake (which
converts them in ``--jobs`` processes) is measured apart with ``--photos N`` employer photos of 480 x 591
pixels; the 100,000-photo figure is extrapolated from the measured rate.

This is a benchmark, not a test: nothing passes or fails on these numbers. The machine is shared:
figures vary between runs, so compare runs made one after the other, with their load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SIZES_DEFAULT = (25_000, 50_000, 100_000)
PERSONS_PER_EMPLOYER = 500
PHOTOS_DEFAULT = 400
PHOTO_EXTRAPOLATION = 100_000
CHUNK_PHOTOS = 5000
LINKS_PER_FILE = 30_000
TARGET_S = 60.0  # 100,000 persons from import to print file
INCLUDES = ("timed: roster import (read the DBF/CSV and check every row in --jobs processes, write the entries), "
            "batch create (register the persons, order the cards, one batch per employer), print export (the GBK "
            "print DBFs in --jobs processes, photos hard-linked); not timed: the employers, writing the roster "
            "file, the photos (intake is apart: photo_intake)")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dbf
    import PIL

    return {"cores": os.cpu_count(), "cpu": cpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "dbf": ".".join(map(str, dbf.version)), "pillow": PIL.__version__}


# -- one size, in a child process -----------------------------------------------------------------------------


def _unit_codes(count: int) -> list[str]:
    from citycard.core.identity import unit_check_character

    codes = []
    for index in range(count):
        body = f"91370100{index:09d}"
        codes.append(body + unit_check_character(body))
    return codes


def _put_photos(registry: Any, store: Any, settings: Any, size: int, at: Any) -> None:
    """Setup: every person's photo as photo intake leaves it (one converted JPEG, a record per person)."""
    from citycard.apps.production import convert_photo
    from citycard.apps.production.sample import draw_photo, sample_id
    from citycard.apps.production.store import PhotoRecord

    converted = convert_photo(draw_photo(1), settings.photo)
    digest = hashlib.sha256(converted.data).hexdigest()
    store.photos_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, size, CHUNK_PHOTOS):
        stage = registry.begin(at)
        for index in range(start, min(size, start + CHUNK_PHOTOS)):
            id_number = sample_id(index)
            # One photo for everybody, linked under every name (the disk holds it once per
            # LINKS_PER_FILE persons: the export links each file once more, and ext4 allows 65,000 links).
            original = store.photos_dir / f"original-{index // LINKS_PER_FILE}.jpg"
            if index % LINKS_PER_FILE == 0:
                original.write_bytes(converted.data)
            os.link(original, store.photos_dir / f"{id_number}-{digest[:16]}.jpg")
            store.put_photo(stage, PhotoRecord(id_number, digest, f"{id_number}.jpg", converted.source_sha256,
                                               "JPEG", [480, 591], len(converted.data), at.isoformat()))
        stage.commit("benchmark photos")


def _write_roster(path: Path, size: int, units: list[str], roster_format: str) -> Path:
    """Setup, in a process of its own, so that what writing it costs in memory is not counted."""
    from citycard.apps.production.sample import iter_sample_people, write_roster_csv, write_roster_dbf

    writer = write_roster_dbf if roster_format == "dbf" else write_roster_csv
    return writer(path, iter_sample_people(size, units))


def _peak_rss_mib() -> float:
    """The peak resident set size since the setup (VmHWM, reset by writing 5 to clear_refs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_mib() -> dict[str, float]:
    """Resident memory now, split: anonymous (the heap: Python objects, the ledger's in-memory account
    table) and file-backed (LMDB's memory map of the data file, shared libraries)."""
    values: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) / 1024
    return {"anon": round(values.get("RssAnon", 0.0), 1), "file": round(values.get("RssFile", 0.0), 1)}


class _HeapPeak:
    """The largest anonymous resident memory seen at the steps' progress calls (every piece of the
    roster, every batch): the kernel keeps a peak of the whole RSS only, and most of that is LMDB's
    file map, which is the data file's pages, not the program's heap."""

    def __init__(self) -> None:
        self.peak_mib = 0.0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        self.peak_mib = max(self.peak_mib, _memory_mib()["anon"])


def _cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _step(figures: dict[str, Any], name: str, heap: _HeapPeak, run: Any) -> Any:
    """Run one step; record its wall seconds, its CPU seconds (this process, and the worker processes
    it started: on a shared machine the CPU seconds say more than the wall clock), and the memory."""
    own_before, workers_before = _cpu_s()
    started = time.perf_counter()
    result = run()
    figures[f"{name}_s"] = round(time.perf_counter() - started, 2)
    own_after, workers_after = _cpu_s()
    figures[f"{name}_cpu_s"] = {"main": round(own_after - own_before, 2),
                                "workers": round(workers_after - workers_before, 2)}
    heap(name, 0, None)
    figures[f"rss_after_{name}_mib"] = _memory_mib()
    return result


def run_size(size: int, roster_format: str, jobs: int, workdir: Path) -> dict[str, Any]:
    from citycard.apps.production import (
        ProductionStore,
        create_batches,
        export_print,
        import_roster,
        load_production_settings,
    )
    from citycard.core import clock
    from citycard.core.registry import Registry

    data = workdir / "data"
    at = clock.now()
    registry = Registry.open(data)
    units = _unit_codes(max(1, size // PERSONS_PER_EMPLOYER))
    for code in units:
        registry.add_employer(code, f"基准测试单位{code[-6:]}", actor="bench", at=at)
    with ProcessPoolExecutor(max_workers=1) as setup:
        roster = setup.submit(_write_roster, workdir / f"roster.{roster_format}", size, units, roster_format).result()
    store = ProductionStore(registry.ledger, data)
    settings = load_production_settings(data)
    figures: dict[str, Any] = {"persons": size, "employers": len(units), "roster": roster_format, "jobs": jobs}
    heap = _HeapPeak()
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS counts from here: the operator's steps

    imported = _step(figures, "import", heap, lambda: import_roster(registry, store, roster, actor="bench", at=at,
                                                                      jobs=jobs, progress=heap))
    if imported.record.accepted != size:
        raise RuntimeError(f"{imported.record.accepted} of {size} rows accepted: {imported.problems[:3]}")

    _put_photos(registry, store, settings, size, at)  # not timed: photo intake happens over days

    created = _step(figures, "batch_create", heap, lambda: create_batches(registry, store, settings, actor="bench",
                                                                           at=at, progress=heap))
    figures["batches"] = len(created.batches)
    exports = _step(figures, "export_print", heap, lambda: export_print(
        registry, store, settings, [batch.batch_id for batch in created.batches], workdir / "out", actor="bench",
        at=at, jobs=jobs, progress=heap))
    figures["ledger_file_mib"] = round(sum(path.stat().st_size for path in (data / "ledger").iterdir()) / 2**20, 1)
    if sum(export.rows for export in exports) != size:
        raise RuntimeError("the print files do not hold every row")
    registry.close()
    steps = ("import", "batch_create", "export_print")
    figures["import_to_print_file_s"] = round(sum(figures[f"{step}_s"] for step in steps), 2)
    figures["import_to_print_file_cpu_s"] = round(sum(sum(figures[f"{step}_cpu_s"].values()) for step in steps), 2)
    figures["persons_per_s"] = round(size / figures["import_to_print_file_s"])
    figures["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    figures["peak_heap_mib"] = heap.peak_mib
    return figures


def run_photos(count: int, jobs: int, workdir: Path) -> dict[str, Any]:
    from citycard.apps.production import (
        ProductionStore,
        import_photos,
        import_roster,
        load_production_settings,
    )
    from citycard.apps.production.sample import sample_people, write_photos, write_roster_csv
    from citycard.core import clock
    from citycard.core.registry import Registry

    units = _unit_codes(1)
    figures: dict[str, Any] = {"photos": count}
    for label, processes in (("one_process", 1), (f"{jobs}_processes", jobs)):
        data = workdir / f"photos-{processes}"
        registry = Registry.open(data)
        registry.add_employer(units[0], "基准测试单位", actor="bench")
        people = sample_people(count, units)
        store = ProductionStore(registry.ledger, data)
        import_roster(registry, store, write_roster_csv(workdir / f"roster-{processes}.csv", people), actor="bench")
        folder = workdir / "employer-photos"
        if not folder.exists():
            write_photos(folder, people)
        started = time.perf_counter()
        result = import_photos(registry, store, folder, load_production_settings(data).photo, actor="bench",
                               at=clock.now(), jobs=processes)
        elapsed = time.perf_counter() - started
        registry.close()
        if result.accepted != count:
            raise RuntimeError(f"{result.accepted} of {count} photos accepted")
        figures[f"photos_per_s_{label}"] = count / elapsed
        figures[f"photos_{PHOTO_EXTRAPOLATION}_min_{label}"] = PHOTO_EXTRAPOLATION / (count / elapsed) / 60
    return figures


def _child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-production-", dir=args.dir) as scratch:
        if args.child == "photos":
            figures = run_photos(args.photos, args.jobs, Path(scratch))
        else:
            figures = run_size(int(args.child), args.roster, args.jobs, Path(scratch))
    print(json.dumps(figures))


# -- the parent: one child per measurement, then the report ---------------------------------------------------


def _run_child(what: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "benches.production", "--child", what, "--roster", args.roster,
               "--jobs", str(args.jobs), "--photos", str(args.photos)] + (
                   ["--dir", args.dir] if args.dir else [])
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "CITYCARD_NOW": os.environ.get("CITYCARD_NOW",
                                                                            "2025-09-30T10:00:00+08:00")})
    if done.returncode != 0:
        raise RuntimeError(f"the {what} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.production", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_DEFAULT)), help="roster sizes, comma-separated")
    parser.add_argument("--roster", default="dbf", choices=["dbf", "csv"])
    parser.add_argument("--photos", type=int, default=PHOTOS_DEFAULT, help="photos for the intake figure (0: skip)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes: roster reading and checks, print tables, photo conversion")
    parser.add_argument("--dir", default=None, help="where the scratch data directories go (default: the temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    sizes = [int(size) for size in args.sizes.split(",") if size]
    runs = [_run_child(str(size), args) for size in sizes]
    report: dict[str, Any] = {"machine": machine(), "load_average": os.getloadavg(), "includes": INCLUDES,
                              "runs": runs, "target_s_for_100000": TARGET_S}
    if len(runs) > 1:
        smallest, largest = runs[0], runs[-1]
        report["growth"] = {name: round(largest[name] / smallest[name], 2) for name in
                            ("persons", "import_to_print_file_s", "peak_rss_mib", "peak_heap_mib")}
    if args.photos:
        report["photo_intake"] = _run_child("photos", args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']}, load average {report['load_average']}")
    columns = ("persons", "batches", "import_s", "batch_create_s", "export_print_s", "import_to_print_file_s",
               "import_to_print_file_cpu_s", "persons_per_s", "peak_rss_mib", "peak_heap_mib")
    print("  ".join(f"{name:>22}" for name in columns))
    for run in report["runs"]:
        print("  ".join(f"{run[name]:>22.1f}" if isinstance(run[name], float) else f"{run[name]:>22}"
                        for name in columns))
    if "growth" in report:
        print(f"largest / smallest run: {report['growth']}")
    if "photo_intake" in report:
        print(f"photo intake: {report['photo_intake']}")


if __name__ == "__main__":
    sys.exit(main())
