"""Work spread over worker processes, results taken back in order, with a bound on what is in flight.

    for item, result in ordered_map(check_piece_job, pieces, jobs=2):
        ...                                  # item's result, in the order of ``pieces``

Production's heavy steps are CPU-bound Python (the dbf package reading and writing tables, Pillow
converting photos, the row checks), so threads would not help: processes do. The process that calls
keeps the registry (one writer) and does the writing while the workers compute. At most ``ahead``
items are submitted and not yet taken back, so memory does not grow with the input.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

__all__ = ["AHEAD_PER_JOB", "default_jobs", "ordered_map"]

AHEAD_PER_JOB = 2  # items in flight per worker: one being computed, one waiting for it
JOBS_DEFAULT_MAX = 4  # worker processes a command starts unless told otherwise
Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(function: Callable[[Any], Result], items: Iterable[Item], *, jobs: int, ahead: int | None = None,
                argument: Callable[[Item], Any] | None = None) -> Iterator[tuple[Item, Result]]:
    """``(item, function(argument(item)))`` for each item, in order (``argument`` picks what a worker
    needs of an item; the default is the item itself). With ``jobs`` > 1, ``function`` (module-level:
    it is pickled) runs in that many worker processes; else here, one item at a time. An exception in
    ``function`` comes out of this iterator at its item. A single item is done here: a pool is not
    worth starting for it."""
    argument = argument or _itself
    items = iter(items)
    first = list(itertools.islice(items, 2))
    if jobs <= 1 or len(first) < 2:
        for item in itertools.chain(first, items):
            yield item, function(argument(item))
        return
    items = itertools.chain(first, items)
    ahead = max(1, ahead if ahead is not None else AHEAD_PER_JOB * jobs)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        in_flight: collections.deque[tuple[Item, Future[Result]]] = collections.deque()
        try:
            for item in items:
                in_flight.append((item, pool.submit(function, argument(item))))
                if len(in_flight) >= ahead:
                    oldest, future = in_flight.popleft()
                    yield oldest, future.result()
            while in_flight:
                oldest, future = in_flight.popleft()
                yield oldest, future.result()
        finally:
            for _, future in in_flight:
                future.cancel()


def default_jobs() -> int:
    """Worker processes for a command's ``--jobs`` default: one per core, at most JOBS_DEFAULT_MAX."""
    return max(1, min(os.cpu_count() or 1, JOBS_DEFAULT_MAX))


def _itself(item: Any) -> Any:
    return item
