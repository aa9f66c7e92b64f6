"""citycard.core: the settlement core (ledger), the registry of persons and cards, and the card lifecycle.

The curated names below are the package's contract; tests/core/test_facade.py pins them. The compiled
core (`_ledger`) is reached only through `citycard.core.ledger`.
"""

from citycard.core.clock import now, now_ns, today
from citycard.core.ledger import (
    Balance,
    BatchResult,
    CorruptionError,
    Ledger,
    LedgerError,
    LedgerInputError,
    LedgerIOError,
    MapFullError,
    accounts_array,
    changes_array,
    transfers_array,
)
from citycard.core.records import (
    AccountFlags,
    AccountKind,
    AccountResult,
    ChangeAction,
    ChangeResult,
    LedgerId,
    TransferCode,
    TransferFlags,
    TransferResult,
)
from citycard.core.registry import Registry, RegistryError, TickReport, tick

__all__ = [
    "AccountFlags", "AccountKind", "AccountResult", "Balance", "BatchResult", "ChangeAction", "ChangeResult",
    "CorruptionError", "Ledger", "LedgerError", "LedgerIOError", "LedgerId", "LedgerInputError", "MapFullError",
    "Registry", "RegistryError", "TickReport", "TransferCode", "TransferFlags", "TransferResult", "accounts_array",
    "changes_array", "now", "now_ns", "tick", "today", "transfers_array",
]
