"""The cyclic garbage collector paused for a bulk step.

    with collector_paused():
        ...  # a hundred thousand rows: dicts, tuples, records, freed by reference counting

A bulk step allocates millions of short-lived containers. Reference counting frees every one of them
(batch creation and the roster import's checks and writes make no reference cycles: a collection after
them finds nothing to free, tests pin that), but each allocation counts towards the cyclic collector's
next pass, and its passes over the young and then the whole, growing heap took a fifth of batch
creation's CPU time and more of the import's (its worker processes, forked meanwhile, inherit the pause).
The collector is switched back on when the step ends, however it ends; a caller that had switched it off
keeps it off. Not the print export: the worker pool's own bookkeeping makes cycles there.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]


@contextmanager
def collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
