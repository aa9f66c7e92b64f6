"""Status words: the numbers card and terminal speak, and the named errors the terminal raises.

The card side raises `Refusal(sw)` from a command handler; the dispatcher turns it into the two
trailing bytes of the response and nothing else happens (no state change). The terminal side runs
every response through `check()`, which maps SW1 SW2 onto one exception class per meaning, in the
style of pyscard's error-checking chain. Messages carry the command's name and the status word,
never the command data (which may hold a PIN or a cryptogram).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "SW",
    "ApplicationLocked",
    "AuthenticationBlocked",
    "ClassNotSupported",
    "ConditionsOfUseNotSatisfied",
    "CounterExhausted",
    "FileNotFound",
    "FileStructureMismatch",
    "FunctionNotSupported",
    "InstructionNotSupported",
    "InsufficientBalance",
    "KeyIndexNotSupported",
    "KeyNotFound",
    "MacInvalid",
    "MacUnavailable",
    "MemoryFailure",
    "NoCurrentEF",
    "NoPreciseDiagnosis",
    "NotEnoughMemory",
    "OffsetOutsideFile",
    "RecordNotFound",
    "ReferencedDataUnusable",
    "Refusal",
    "SecurityStatusNotSatisfied",
    "StatusWordError",
    "VerificationFailed",
    "WrongData",
    "WrongLe",
    "WrongLength",
    "WrongP1P2",
    "check",
    "describe",
    "is_success",
]


class SW(IntEnum):
    """Fixed status words (reference: card-standards.md §1.3). Families (61xx, 63Cx, 6Cxx) are built below."""

    OK = 0x9000
    END_OF_DATA = 0x6282  # fewer bytes than Ne: end of file or record reached (a warning, data is valid)
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    FILE_STRUCTURE = 0x6981  # command incompatible with the file structure
    SECURITY_STATUS = 0x6982
    BLOCKED = 0x6983  # PIN or key blocked
    DATA_UNUSABLE = 0x6984  # e.g. no valid challenge: do GET CHALLENGE first
    CONDITIONS_OF_USE = 0x6985  # command out of sequence
    NO_CURRENT_EF = 0x6986
    WRONG_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    NOT_ENOUGH_MEMORY = 0x6A84
    WRONG_P1P2 = 0x6A86
    KEY_NOT_FOUND = 0x6A88
    OFFSET_OUTSIDE = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00
    MAC_INVALID = 0x9302
    APPLICATION_LOCKED = 0x9303
    INSUFFICIENT_BALANCE = 0x9401
    COUNTER_EXHAUSTED = 0x9402
    KEY_INDEX_NOT_SUPPORTED = 0x9403
    MAC_UNAVAILABLE = 0x9406

    @staticmethod
    def tries_left(count: int) -> int:
        """63 Cx: verification failed, x tries left (63 C0: none left, the next try answers 69 83)."""
        if not 0 <= count <= 0x0F:
            raise ValueError("a retry count fits in one nibble")
        return 0x63C0 | count

    @staticmethod
    def wrong_le(available: int) -> int:
        """6C xx: wrong Le; resend with Le = xx (00 means 256)."""
        if not 1 <= available <= 256:
            raise ValueError("6C xx can announce 1..256 bytes")
        return 0x6C00 | (available & 0xFF)


class Refusal(Exception):
    """Raised inside the card: answer with this status word and change nothing."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


_DESCRIPTIONS = {
    SW.OK: "success",
    SW.END_OF_DATA: "end of file or record reached before Ne bytes",
    SW.MEMORY_FAILURE: "memory failure",
    SW.WRONG_LENGTH: "wrong length",
    SW.FILE_STRUCTURE: "command incompatible with file structure",
    SW.SECURITY_STATUS: "security status not satisfied",
    SW.BLOCKED: "authentication method blocked",
    SW.DATA_UNUSABLE: "referenced data unusable",
    SW.CONDITIONS_OF_USE: "conditions of use not satisfied",
    SW.NO_CURRENT_EF: "command not allowed: no current EF",
    SW.WRONG_DATA: "wrong data",
    SW.FUNCTION_NOT_SUPPORTED: "function not supported",
    SW.FILE_NOT_FOUND: "file or application not found",
    SW.RECORD_NOT_FOUND: "record not found",
    SW.NOT_ENOUGH_MEMORY: "not enough memory space in the file",
    SW.WRONG_P1P2: "incorrect parameters P1-P2",
    SW.KEY_NOT_FOUND: "referenced data (key) not found",
    SW.OFFSET_OUTSIDE: "wrong parameters: offset outside the EF",
    SW.INS_NOT_SUPPORTED: "instruction not supported",
    SW.CLA_NOT_SUPPORTED: "class not supported",
    SW.NO_PRECISE_DIAGNOSIS: "no precise diagnosis",
    SW.MAC_INVALID: "MAC invalid",
    SW.APPLICATION_LOCKED: "application permanently locked",
    SW.INSUFFICIENT_BALANCE: "insufficient balance",
    SW.COUNTER_EXHAUSTED: "transaction counter at its maximum",
    SW.KEY_INDEX_NOT_SUPPORTED: "key index not supported",
    SW.MAC_UNAVAILABLE: "required MAC (transaction proof) not available",
}


def describe(sw: int) -> str:
    """A short English meaning for a status word, for messages and APDU traces."""
    if sw in _DESCRIPTIONS:
        return _DESCRIPTIONS[SW(sw)]
    if sw & 0xFFF0 == 0x63C0:
        return f"verification failed, {sw & 0x0F} tries left"
    if sw & 0xFF00 == 0x6C00:
        return f"wrong Le, {(sw & 0xFF) or 256} bytes available"
    if sw & 0xFF00 == 0x6100:
        return f"{(sw & 0xFF) or 256} more bytes available"
    return "unknown status word"


def is_success(sw: int) -> bool:
    """9000, and the warning 6282 (the data returned is valid, only shorter than Ne)."""
    return sw in (SW.OK, SW.END_OF_DATA)


class StatusWordError(Exception):
    """The card refused a command. `sw` is the status word, `command` the short name of the command."""

    def __init__(self, sw: int, command: str = "") -> None:
        self.sw = sw
        self.command = command
        where = f"{command}: " if command else ""
        super().__init__(f"{where}SW {sw:04X} ({describe(sw)})")


class WrongLength(StatusWordError):
    """67 00."""


class WrongLe(StatusWordError):
    """6C xx; `available` is the length the card offers."""

    @property
    def available(self) -> int:
        return (self.sw & 0xFF) or 256


class VerificationFailed(StatusWordError):
    """63 Cx: wrong PIN or key; `tries_left` more attempts before the reference is blocked."""

    @property
    def tries_left(self) -> int:
        return self.sw & 0x0F


class SecurityStatusNotSatisfied(StatusWordError):
    """69 82: verify the PIN or authenticate first."""


class AuthenticationBlocked(StatusWordError):
    """69 83: the PIN (or key) is blocked; RELOAD PIN unblocks a PIN."""


class ReferencedDataUnusable(StatusWordError):
    """69 84: e.g. no challenge to authenticate against."""


class ConditionsOfUseNotSatisfied(StatusWordError):
    """69 85: command out of sequence (e.g. DEBIT not immediately after INITIALIZE)."""


class FileStructureMismatch(StatusWordError):
    """69 81."""


class NoCurrentEF(StatusWordError):
    """69 86."""


class WrongData(StatusWordError):
    """6A 80."""


class FunctionNotSupported(StatusWordError):
    """6A 81."""


class FileNotFound(StatusWordError):
    """6A 82."""


class RecordNotFound(StatusWordError):
    """6A 83."""


class NotEnoughMemory(StatusWordError):
    """6A 84."""


class WrongP1P2(StatusWordError):
    """6A 86."""


class KeyNotFound(StatusWordError):
    """6A 88."""


class OffsetOutsideFile(StatusWordError):
    """6B 00."""


class InstructionNotSupported(StatusWordError):
    """6D 00."""


class ClassNotSupported(StatusWordError):
    """6E 00."""


class NoPreciseDiagnosis(StatusWordError):
    """6F 00."""


class MemoryFailure(StatusWordError):
    """65 81: the card could not persist its state; it is unchanged."""


class MacInvalid(StatusWordError):
    """93 02: MAC1 (purchase) or MAC2 (load) did not verify."""


class ApplicationLocked(StatusWordError):
    """93 03."""


class InsufficientBalance(StatusWordError):
    """94 01."""


class CounterExhausted(StatusWordError):
    """94 02."""


class KeyIndexNotSupported(StatusWordError):
    """94 03."""


class MacUnavailable(StatusWordError):
    """94 06: no transaction proof kept for that type and counter."""


_ERROR_BY_SW: dict[int, type[StatusWordError]] = {
    SW.WRONG_LENGTH: WrongLength,
    SW.SECURITY_STATUS: SecurityStatusNotSatisfied,
    SW.BLOCKED: AuthenticationBlocked,
    SW.DATA_UNUSABLE: ReferencedDataUnusable,
    SW.CONDITIONS_OF_USE: ConditionsOfUseNotSatisfied,
    SW.FILE_STRUCTURE: FileStructureMismatch,
    SW.NO_CURRENT_EF: NoCurrentEF,
    SW.WRONG_DATA: WrongData,
    SW.FUNCTION_NOT_SUPPORTED: FunctionNotSupported,
    SW.FILE_NOT_FOUND: FileNotFound,
    SW.RECORD_NOT_FOUND: RecordNotFound,
    SW.NOT_ENOUGH_MEMORY: NotEnoughMemory,
    SW.WRONG_P1P2: WrongP1P2,
    SW.KEY_NOT_FOUND: KeyNotFound,
    SW.OFFSET_OUTSIDE: OffsetOutsideFile,
    SW.INS_NOT_SUPPORTED: InstructionNotSupported,
    SW.CLA_NOT_SUPPORTED: ClassNotSupported,
    SW.NO_PRECISE_DIAGNOSIS: NoPreciseDiagnosis,
    SW.MEMORY_FAILURE: MemoryFailure,
    SW.MAC_INVALID: MacInvalid,
    SW.APPLICATION_LOCKED: ApplicationLocked,
    SW.INSUFFICIENT_BALANCE: InsufficientBalance,
    SW.COUNTER_EXHAUSTED: CounterExhausted,
    SW.KEY_INDEX_NOT_SUPPORTED: KeyIndexNotSupported,
    SW.MAC_UNAVAILABLE: MacUnavailable,
}


def check(sw: int, command: str = "") -> None:
    """Return if `sw` means success; otherwise raise the named error for it."""
    if is_success(sw):
        return
    if sw & 0xFFF0 == 0x63C0:
        raise VerificationFailed(sw, command)
    if sw & 0xFF00 == 0x6C00:
        raise WrongLe(sw, command)
    raise _ERROR_BY_SW.get(sw, StatusWordError)(sw, command)
