# Type stub for the compiled TAC check (apps/bus/_tac.pyx). Only apps/bus/tac.py imports it; the public
# names are apps/bus/tac.py's (TacVerifier wraps this class unless CITYCARD_NO_EXTENSIONS=1).

import numpy as np
from typing_extensions import Buffer, disjoint_base

@disjoint_base
class TacBatchVerifier:
    def __init__(self, master_tac_key: Buffer) -> None: ...
    def verify_into(self, packed: Buffer | np.ndarray, ok: Buffer | np.ndarray, start: int, stop: int) -> int: ...
