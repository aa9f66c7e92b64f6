"""citycard.card: the chip and its reader.

Card side: `VirtualCard` (a small COS with an ISO 7816-4 file system, the social security
application and a PBOC ED/EP purse) over a `CardImage` persisted atomically by a `FileStore`;
`personalize` makes a new card; `VpcdLink` plugs it into a real pcscd through vsmartcard-vpcd;
`PcscDaemon` runs a private pcscd with virtual readers.

Terminal side, in layers: a `Transport` (`PcscTransport` over pyscard, `MemoryTransport` for tests),
a `CardChannel` (APDU trace + status words -> named errors, see `citycard.card.sw`), the command
builders in `citycard.card.commands`, and the flows of `Terminal`. `SoftSam` holds the master keys
behind the three PSAM operations; `verify_tac` checks the TAC of an uploaded transaction.

This package never imports citycard.core: a chip knows nothing of the back office.
"""

from .channel import Apdu, ApduEvent, CardChannel
from .cos import ATR, VirtualCard
from .demo import format_fen, run_card_demo
from .flows import (
    HolderData,
    LoadReceipt,
    PendingPurchase,
    PurchaseInterrupted,
    PurchaseReceipt,
    RecoveryError,
    Terminal,
)
from .keys import KeyFileError, KeyUsage, MasterKeys
from .pcscd import PcscDaemon, PcscdError, VirtualReader
from .personalize import SAMPLE_PROFILE, CardProfile, personalize, profile_from_json
from .purse import ED, EP, PURSE_AID, TxType
from .sam import (
    IssuerHost,
    LoadTacFields,
    PurchaseSam,
    PurchaseTacFields,
    SamError,
    SamMacError,
    SoftSam,
    verify_tac,
)
from .ssse import SSSE_AID, CardIdentity, Holder, HolderDataError
from .state import CardImage, CardStateError, FileStore, MemoryStore
from .sw import SW, StatusWordError
from .transport import CardRemoved, MemoryTransport, PcscTransport, Transport, TransportError
from .vpcd import VPCD_DEFAULT_PORT, VpcdLink

__all__ = [
    "ATR",
    "ED",
    "EP",
    "PURSE_AID",
    "SAMPLE_PROFILE",
    "SSSE_AID",
    "SW",
    "VPCD_DEFAULT_PORT",
    "Apdu",
    "ApduEvent",
    "CardChannel",
    "CardIdentity",
    "CardImage",
    "CardProfile",
    "CardRemoved",
    "CardStateError",
    "FileStore",
    "Holder",
    "HolderData",
    "HolderDataError",
    "IssuerHost",
    "KeyFileError",
    "KeyUsage",
    "LoadReceipt",
    "LoadTacFields",
    "MasterKeys",
    "MemoryStore",
    "MemoryTransport",
    "PcscDaemon",
    "PcscTransport",
    "PcscdError",
    "PendingPurchase",
    "PurchaseInterrupted",
    "PurchaseReceipt",
    "PurchaseSam",
    "PurchaseTacFields",
    "RecoveryError",
    "SamError",
    "SamMacError",
    "SoftSam",
    "StatusWordError",
    "Terminal",
    "Transport",
    "TransportError",
    "TxType",
    "VirtualCard",
    "VirtualReader",
    "VpcdLink",
    "format_fen",
    "personalize",
    "profile_from_json",
    "run_card_demo",
    "verify_tac",
]
