# Type stub for the compiled clearing pass (apps/bus/_tac.pyx). Only apps/bus/tac.py imports it; the public
# names are apps/bus/tac.py's (TacVerifier wraps this class unless CITYCARD_NO_EXTENSIONS=1).

import numpy as np
from typing_extensions import Buffer, disjoint_base

STATUS_CODES: dict[str, int]
CARD_KEYS_DEFAULT: int
CARD_KEYS_LIMIT: int
PARTS_LIMIT: int

@disjoint_base
class TacBatchVerifier:
    def __init__(self, master_tac_key: Buffer, *, card_keys_max: int = ..., parts: int = 1) -> None: ...
    @property
    def parts(self) -> int: ...
    @property
    def card_keys_max(self) -> int: ...
    @property
    def card_keys_derived(self) -> int: ...
    @property
    def card_keys_reused(self) -> int: ...
    def close(self) -> None: ...
    def verify_into(self, packed: Buffer | np.ndarray, ok: Buffer | np.ndarray, part: int) -> int: ...
    def classify_into(self, packed: Buffer | np.ndarray, status: Buffer | np.ndarray, part: int,
                      region: int) -> int: ...

def write_transfers(packed: Buffer | np.ndarray, status: Buffer | np.ndarray, transfers: Buffer | np.ndarray,
                    booked_index: Buffer | np.ndarray, credit_low: int, credit_high: int, debit_high: int,
                    ledger: int, code: int) -> int: ...
