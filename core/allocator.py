"""glibc's malloc, told to keep the memory a process frees for its next allocation.

By default glibc serves each allocation of 128 KiB or more with a fresh ``mmap`` and gives it back to the
kernel on ``free`` (the threshold then creeps up with what was freed, never past 32 MiB), and it trims the
heap's top past 128 KiB of free space. A server that moves megabyte batches (a gRPC message of 8,189 packed
transfers is 1 MiB, read into grpc's buffers, then Python bytes, then numpy arrays, each freed soon after)
pays for that churn in page faults: the kernel zeroes every fresh page again, for every batch. Measured on
the transit clearing path (benches/transit.py's offline phase): the core took 28,000-40,000 page faults in
1.5 s, 3,700-3,900 with the settings below; its CPU per record fell by about a fifth.

``keep_freed_memory()`` raises both thresholds: blocks up to 32 MiB come from the heap and go back to it,
and the heap keeps up to 256 MiB of free space at its top. The price is memory held at the process's peak
rather than returned at once, which a long-running server that will need it again wants anyway. It is
called at the start of every process that books at volume (``citycard serve``, the built-in applications)
and by the benchmarks that compare against the in-process ledger, so both sides of a ratio run alike.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024   # glibc's own ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
log = logging.getLogger("citycard.core.allocator")


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds (see the module docstring); False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 when it refuses a value
    kept = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD,
                                                                             TRIM_THRESHOLD_BYTES) == 1
    if not kept:
        log.warning("glibc refused the malloc thresholds; freed memory goes back to the kernel at once")
    return kept
