"""TAC verification of offline records, a batch at a time: `TacVerifier(master_tac_key).verify(records)`.

A gate debits the e-purse offline and keeps the chip's TAC; clearing checks it with the issuer's purse TAC
master key, exactly as card/sam.py `verify_tac` does for one PurchaseTacFields (the card's DTK diversified
from the master with the app serial's rightmost 8 bytes, single DES under DTK_left XOR DTK_right, the ED/EP
MAC over the 22 covered bytes). Records are apps/bus/records.py arrays; the answer is one bool per record.

Two implementations, one API (as card/crypto.py has): `CompiledTacVerifier` over apps/bus/_tac.pyx (the
whole batch in one C loop without the GIL, optionally split across threads), and `PyTacVerifier`, its
pure-Python twin built from card/crypto.py's primitives, one record at a time. `TacVerifier` is the compiled
one when it is built and CITYCARD_NO_EXTENSIONS=1 is not set at import, else the twin; `IMPLEMENTATION` says
which. tests/transit/test_tac.py checks both against card.sam.verify_tac and against each other.

The key is taken once and kept only inside the cipher objects: it never shows in a repr, an error or a log.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self, TypeAlias

import numpy as np
from citycard.card.crypto import DesCipher, diversification_factor, macs_equal, pboc_mac, tac_key
from citycard.card.keys import KeyUsage, MasterKeys, SecretKey

from .records import RECORD_BYTES, RECORD_DTYPE, TAC_COVERED

__all__ = [
    "IMPLEMENTATION",
    "MASTER_KEY_BYTES",
    "THREADS_DEFAULT",
    "THREAD_SPLIT_MIN",
    "CompiledTacVerifier",
    "PyTacVerifier",
    "TacVerifier",
]

MASTER_KEY_BYTES = 16
TAC_AT = TAC_COVERED.stop
TAC_BYTES = 4
# Below this many records a batch runs on the calling thread alone: handing half to a worker costs
# ~50-100 us, the time of ~100 records.
THREAD_SPLIT_MIN = 2_048
THREADS_MAX = 8
# Two workers by default: the loop releases the GIL, so a second core nearly doubles a large batch's rate
# (measured 0.8 -> 1.4 M records/s on the 2-core machine).
THREADS_DEFAULT = min(2, os.cpu_count() or 1)

KeyLike: TypeAlias = bytes | bytearray | memoryview | SecretKey


def _key_bytes(master_tac_key: KeyLike) -> bytes:
    key = master_tac_key.reveal() if isinstance(master_tac_key, SecretKey) else bytes(master_tac_key)
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"the TAC master key is {MASTER_KEY_BYTES} bytes (2-key 3DES)")
    return key


def _record_bytes(records: np.ndarray) -> np.ndarray:
    """The batch as contiguous raw bytes, 48 per record (a view when it already is)."""
    if not isinstance(records, np.ndarray) or records.dtype != RECORD_DTYPE or records.ndim != 1:
        raise TypeError("records must be a one-dimensional array of RECORD_DTYPE (apps/bus/records.py)")
    return np.ascontiguousarray(records).view(np.uint8)


class PyTacVerifier:
    """The pure twin: card/crypto.py per record, the same composition as card.sam.compute_tac.

    `threads` is accepted so both implementations are built the same way; the twin runs on the calling thread.
    """

    def __init__(self, master_tac_key: KeyLike, *, threads: int = THREADS_DEFAULT) -> None:
        if not 1 <= threads <= THREADS_MAX:
            raise ValueError(f"threads must be 1..{THREADS_MAX}")
        self.threads = threads
        self._master = DesCipher(_key_bytes(master_tac_key))

    @classmethod
    def from_master_keys(cls, master_keys: MasterKeys, **options: Any) -> PyTacVerifier:
        return cls(master_keys.get("purse", KeyUsage.TAC).value, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<key redacted>)"

    def __reduce__(self) -> Any:
        raise TypeError(f"a {type(self).__name__} holds a key and is not pickled")

    def verify_one(self, record: bytes | bytearray | memoryview | np.void) -> bool:
        """True if the 48-byte record's TAC is the one its card computes over its covered bytes."""
        raw = record.tobytes() if isinstance(record, np.void) else bytes(record)
        if len(raw) != RECORD_BYTES:
            raise ValueError(f"a record is {RECORD_BYTES} bytes")
        dtk = self._master.diversify(diversification_factor(raw[:10]))
        return macs_equal(pboc_mac(tac_key(dtk), raw[TAC_COVERED]), raw[TAC_AT:TAC_AT + TAC_BYTES])

    def verify(self, records: np.ndarray) -> np.ndarray:
        raw = _record_bytes(records).tobytes()
        return np.fromiter((self.verify_one(raw[i:i + RECORD_BYTES]) for i in range(0, len(raw), RECORD_BYTES)),
                           dtype=bool, count=len(records))

    def close(self) -> None:
        """Nothing to release; here so both implementations are used the same way."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CompiledTacVerifier(PyTacVerifier):
    """The batch in C (apps/bus/_tac.pyx); `threads` > 1 splits large batches across worker threads.

    verify_one stays the twin's (it is a single record; the compiled loop pays off per batch).
    """

    def __init__(self, master_tac_key: KeyLike, *, threads: int = THREADS_DEFAULT) -> None:
        if _tac is None:
            raise RuntimeError("the compiled TAC check is not built (make compile)")
        key = _key_bytes(master_tac_key)
        super().__init__(key, threads=threads)
        self._batch = _tac.TacBatchVerifier(key)
        # Made here, not on first use, so concurrent verify calls never race to make two; its threads
        # start with the first split batch.
        self._workers: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="tac") if threads > 1 else None)

    def __repr__(self) -> str:
        return f"CompiledTacVerifier(threads={self.threads}, <key redacted>)"

    def verify(self, records: np.ndarray) -> np.ndarray:
        raw = _record_bytes(records)
        count = len(records)
        ok = np.zeros(count, dtype=np.uint8)
        workers = self._workers
        parts = min(self.threads, max(1, count // THREAD_SPLIT_MIN)) if workers is not None else 1
        bounds = [count * part // parts for part in range(parts + 1)]
        if parts == 1 or workers is None:
            self._batch.verify_into(raw, ok, 0, count)
            return ok.view(bool)
        # The calling thread takes the first part; each part releases the GIL for its whole loop.
        others = [workers.submit(self._batch.verify_into, raw, ok, bounds[p], bounds[p + 1])
                  for p in range(1, parts)]
        self._batch.verify_into(raw, ok, bounds[0], bounds[1])
        for other in others:
            other.result()
        return ok.view(bool)

    def close(self) -> None:
        """Stop the worker threads; later batches run on the calling thread alone."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown(wait=True)


# Chosen once, here, as card/crypto.py chooses its DES (a missing build falls back to the twin, and
# IMPLEMENTATION, which tests/transit/test_tac.py pins, keeps that from going unnoticed).
# CITYCARD_NO_EXTENSIONS=1 only changes what TacVerifier names: CompiledTacVerifier stays usable when it is
# built, so the tests compare both implementations under either setting.
NO_EXTENSIONS = os.environ.get("CITYCARD_NO_EXTENSIONS") == "1"
if TYPE_CHECKING:
    from . import _tac
else:
    try:
        from . import _tac
    except ImportError:
        _tac = None
TacVerifier: type[PyTacVerifier] = PyTacVerifier if NO_EXTENSIONS or _tac is None else CompiledTacVerifier
IMPLEMENTATION = "compiled" if TacVerifier is CompiledTacVerifier else "python"
