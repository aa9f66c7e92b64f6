"""The clearing pass over offline records, a batch at a time: the TAC check and what runs beside it.

A gate debits the e-purse offline and keeps the chip's TAC; clearing checks it with the issuer's purse TAC
master key, exactly as card/sam.py `verify_tac` does for one PurchaseTacFields (the card's DTK diversified
from the master with the app serial's rightmost 8 bytes, single DES under DTK_left XOR DTK_right, the ED/EP
MAC over the 22 covered bytes). Records are apps/bus/records.py arrays.

- `verify(records)`: one bool per record, the TAC alone;
- `classify(records, status, region=)`: the whole per-record decision of clearing.py, in one pass: the
  fields (MALFORMED), the TAC (FORGED), the card (CARD_UNKNOWN), the amount (ENTRY_ONLY), else BOOK;
- `transfers(records, status, operator_account=)`: the ledger transfers of the BOOK records, under their
  chip transaction ids (ids.chip_transfer_id), and their record indexes.

Two implementations, one API (as card/crypto.py has): `CompiledTacVerifier` over apps/bus/_tac.pyx (C loops
without the GIL; the card keys kept across batches in a bounded cache, split into one partition per thread so
a large batch runs on `threads` threads), and `PyTacVerifier`, its pure twin built from card/crypto.py's
primitives and numpy. `TacVerifier` is the compiled one when it is built and CITYCARD_NO_EXTENSIONS=1 is not
set at import, else the twin; `IMPLEMENTATION` says which. tests/transit/test_tac.py checks both against
card.sam.verify_tac, and tests/transit/test_clearing.py both passes against each other.

The key is taken once and kept only inside the cipher objects: it never shows in a repr, an error or a log;
`close()` wipes it (and every cached card key), and a closed verifier refuses work.
"""

from __future__ import annotations

import enum
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self, TypeAlias

import numpy as np
from citycard.card.crypto import DesCipher, diversification_factor, macs_equal, pboc_mac, tac_key
from citycard.card.keys import KeyUsage, MasterKeys, SecretKey
from citycard.core.records import TRANSFER_DTYPE, LedgerId, TransferCode
from numpy.typing import NDArray

from .ids import chip_transfer_ids, purse_account_ids
from .records import RECORD_BYTES, RECORD_DTYPE, TAC_COVERED, bcd_column, big_endian_column, validate

__all__ = [
    "CARD_KEYS_DEFAULT",
    "IMPLEMENTATION",
    "MASTER_KEY_BYTES",
    "THREADS_DEFAULT",
    "THREAD_SPLIT_MIN",
    "CompiledTacVerifier",
    "PyTacVerifier",
    "Status",
    "TacVerifier",
]

MASTER_KEY_BYTES = 16
TAC_AT = TAC_COVERED.stop
TAC_BYTES = 4
# Below this many records a batch runs on the calling thread alone: handing a part to a worker costs
# ~50-100 us, the time of ~100 records.
THREAD_SPLIT_MIN = 2_048
THREADS_MAX = 8
# Two workers by default: the loops release the GIL, so a second core nearly doubles a large batch's rate.
THREADS_DEFAULT = min(2, os.cpu_count() or 1)
# Card keys the compiled check keeps across batches (a quarter million cards, ~34 MiB once all are seen);
# CITYCARD_TRANSIT_CARD_KEYS sets another bound for a city with more daily riders.
CARD_KEYS_DEFAULT = int(os.environ.get("CITYCARD_TRANSIT_CARD_KEYS", "262144"))
_SERIAL_REGION = slice(0, 3)
_SERIAL_SEQ = slice(3, 10)
_COUNTER = slice(10, 12)
_AMOUNT = slice(12, 16)
_TERMINAL = slice(17, 23)
_TERMINAL_SEQ = slice(23, 27)
_LOW64 = 0xFFFF_FFFF_FFFF_FFFF

KeyLike: TypeAlias = bytes | bytearray | memoryview | SecretKey


class Status(enum.IntEnum):
    """What the clearing pass decided for a record (one byte per record; _tac.pyx uses the same codes)."""

    UNCHECKED = 0
    BOOK = 1
    MALFORMED = 2
    FORGED = 3
    CARD_UNKNOWN = 4
    ENTRY_ONLY = 5


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


def _checked_status(records: np.ndarray, status: np.ndarray) -> None:
    if not isinstance(status, np.ndarray) or status.dtype != np.uint8 or status.shape != (len(records),):
        raise TypeError("status must be a uint8 array with one byte per record")


class PyTacVerifier:
    """The pure twin: card/crypto.py per record, the same composition as card.sam.compute_tac, and numpy for
    the rest of the pass. `threads` and `card_keys_max` are accepted so both implementations are built the same
    way; the twin runs on the calling thread and keeps no card keys."""

    def __init__(self, master_tac_key: KeyLike, *, threads: int = THREADS_DEFAULT,
                 card_keys_max: int = CARD_KEYS_DEFAULT) -> None:
        if not 1 <= threads <= THREADS_MAX:
            raise ValueError(f"threads must be 1..{THREADS_MAX}")
        self.threads = threads
        self.card_keys_max = card_keys_max
        self._master: DesCipher | None = DesCipher(_key_bytes(master_tac_key))

    @classmethod
    def from_master_keys(cls, master_keys: MasterKeys, **options: Any) -> Self:
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
        if self._master is None:
            raise ValueError("the verifier is closed")
        dtk = self._master.diversify(diversification_factor(raw[:10]))
        return macs_equal(pboc_mac(tac_key(dtk), raw[TAC_COVERED]), raw[TAC_AT:TAC_AT + TAC_BYTES])

    def verify(self, records: np.ndarray) -> np.ndarray:
        raw = _record_bytes(records).tobytes()
        return np.fromiter((self.verify_one(raw[i:i + RECORD_BYTES]) for i in range(0, len(raw), RECORD_BYTES)),
                           dtype=bool, count=len(records))

    def classify(self, records: np.ndarray, status: np.ndarray, *, region: int) -> None:
        """Decide each UNCHECKED record (see Status), in place; records already decided stay as they are."""
        raw = _record_bytes(records).reshape(-1, RECORD_BYTES)
        _checked_status(records, status)
        todo = status == Status.UNCHECKED
        fields_ok = validate(records).ok
        status[todo & ~fields_ok] = Status.MALFORMED
        todo &= fields_ok
        tac_ok = np.zeros(len(records), dtype=bool)
        tac_ok[todo] = self.verify(records[todo])
        status[todo & ~tac_ok] = Status.FORGED
        todo &= tac_ok
        foreign = (bcd_column(raw, _SERIAL_REGION) != np.uint64(region)) | (bcd_column(raw, _SERIAL_SEQ) == 0)
        status[todo & foreign] = Status.CARD_UNKNOWN
        todo &= ~foreign
        entry = big_endian_column(raw, _AMOUNT) == 0
        status[todo & entry] = Status.ENTRY_ONLY
        status[todo & ~entry] = Status.BOOK

    def transfers(self, records: np.ndarray, status: np.ndarray, *,
                  operator_account: int) -> tuple[NDArray[np.void], NDArray[np.int64]]:
        """The PURSE transfer of each BOOK record, from the card's e-purse account to `operator_account`, under
        its chip transaction id (user_data: the card's counter << 32 | the SAM's sequence), and its index."""
        _checked_status(records, status)
        booked_index = np.flatnonzero(status == Status.BOOK)
        picked = _record_bytes(records).reshape(-1, RECORD_BYTES)[booked_index]
        seqs = bcd_column(picked, _SERIAL_SEQ)
        transfers = np.zeros(len(booked_index), dtype=TRANSFER_DTYPE)
        low, high = chip_transfer_ids(seqs, big_endian_column(picked, _TERMINAL),
                                      big_endian_column(picked, _TERMINAL_SEQ))
        transfers["id"][:, 0], transfers["id"][:, 1] = low, high
        debit_low, debit_high = purse_account_ids(seqs)
        transfers["debit_account_id"][:, 0], transfers["debit_account_id"][:, 1] = debit_low, debit_high
        transfers["credit_account_id"][:, 0] = operator_account & _LOW64
        transfers["credit_account_id"][:, 1] = operator_account >> 64
        transfers["user_data"][:, 0] = ((big_endian_column(picked, _COUNTER) << np.uint64(32))
                                        | big_endian_column(picked, _TERMINAL_SEQ))
        transfers["amount"] = big_endian_column(picked, _AMOUNT)
        transfers["ledger"] = LedgerId.PURSE
        transfers["code"] = TransferCode.PURCHASE
        return transfers, booked_index.astype(np.int64)

    def close(self) -> None:
        """Forget the key; later calls are refused."""
        self._master = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CompiledTacVerifier(PyTacVerifier):
    """The pass in C (apps/bus/_tac.pyx); `threads` > 1 splits large batches across worker threads, each
    thread on its own partition of the card key cache. verify_one stays the twin's (it is a single record)."""

    def __init__(self, master_tac_key: KeyLike, *, threads: int = THREADS_DEFAULT,
                 card_keys_max: int = CARD_KEYS_DEFAULT) -> None:
        if _tac is None:
            raise RuntimeError("the compiled TAC check is not built (make compile)")
        key = _key_bytes(master_tac_key)
        super().__init__(key, threads=threads, card_keys_max=card_keys_max)
        self._batch = _tac.TacBatchVerifier(key, card_keys_max=card_keys_max, parts=threads)
        # Made here, not on first use, so concurrent calls never race to make two; its threads start with the
        # first split batch.
        self._workers: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="tac") if threads > 1 else None)

    def __repr__(self) -> str:
        return f"CompiledTacVerifier(threads={self.threads}, <key redacted>)"

    @property
    def card_keys_derived(self) -> int:
        """Card keys derived so far; with `card_keys_reused`, how warm the cache runs (no key material)."""
        return int(self._batch.card_keys_derived)

    @property
    def card_keys_reused(self) -> int:
        return int(self._batch.card_keys_reused)

    def _each_part(self, work: Any, packed: np.ndarray, out: np.ndarray, *args: Any) -> None:
        """Run `work(packed, out, part, *args)` for every partition: split across the workers for a large
        batch (the calling thread takes partition 0), else one after the other here."""
        workers = self._workers
        parts = self._batch.parts
        if workers is None or len(out) < THREAD_SPLIT_MIN:
            for part in range(parts):
                work(packed, out, part, *args)
            return
        others = [workers.submit(work, packed, out, part, *args) for part in range(1, parts)]
        work(packed, out, 0, *args)
        for other in others:
            other.result()

    def verify(self, records: np.ndarray) -> np.ndarray:
        ok = np.zeros(len(records), dtype=np.uint8)
        self._each_part(self._batch.verify_into, _record_bytes(records), ok)
        return ok.view(bool)

    def classify(self, records: np.ndarray, status: np.ndarray, *, region: int) -> None:
        _checked_status(records, status)
        self._each_part(self._batch.classify_into, _record_bytes(records), status, region)

    def transfers(self, records: np.ndarray, status: np.ndarray, *,
                  operator_account: int) -> tuple[NDArray[np.void], NDArray[np.int64]]:
        _checked_status(records, status)
        transfers = np.empty(len(records), dtype=TRANSFER_DTYPE)
        booked_index = np.empty(len(records), dtype=np.int64)
        written = _tac.write_transfers(_record_bytes(records), status, transfers.view(np.uint8), booked_index,
                                       operator_account & _LOW64, operator_account >> 64,
                                       _PURSE_HIGH, int(LedgerId.PURSE), int(TransferCode.PURCHASE))
        return transfers[:written], booked_index[:written]

    def close(self) -> None:
        """Stop the worker threads and wipe the master key and every cached card key."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown(wait=True)
        self._batch.close()
        super().close()


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
if _tac is not None and _tac.STATUS_CODES != {status.name: status.value for status in Status}:
    raise ImportError("apps/bus/_tac.pyx and tac.Status disagree on the status codes: make compile")
_PURSE_HIGH = int(purse_account_ids(np.ones(1, dtype=np.uint64))[1][0])
TacVerifier: type[PyTacVerifier] = PyTacVerifier if NO_EXTENSIONS or _tac is None else CompiledTacVerifier
IMPLEMENTATION = "compiled" if TacVerifier is CompiledTacVerifier else "python"
