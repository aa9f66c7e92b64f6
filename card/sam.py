"""A soft SAM: the issuer's master keys behind narrow operations, so hardware could replace it.

`SoftSam` offers exactly the three PSAM operations a purchase terminal needs (card-standards.md
§2.7): initialise for purchase (derive the card's DPK, the session key, produce MAC1 and the
terminal transaction number), check MAC2, compute or verify a TAC. A hardware PSAM does the same
behind `80 70`, `80 72` and its TAC key; swapping it in means implementing `PurchaseSam`.

`IssuerHost` is the back office's side of the online operations a PSAM does not do: authorise a
load (verify MAC1, produce MAC2), the RELOAD PIN MAC, and the cryptograms of EXTERNAL / INTERNAL
AUTHENTICATE.

`verify_tac(master_keys, fields, tac)` is the clean public function the back office uses to check
the TAC of an uploaded offline transaction: it takes the record fields, nothing else.

Keys never leave these objects except as MACs; errors never contain key material.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from .crypto import (
    CipherCache,
    DesCipher,
    diversification_factor,
    diversify,
    macs_equal,
    pboc_mac,
    session_key,
    tac_key,
    tdes_encrypt,
)
from .keys import KeyUsage, MasterKey, MasterKeys
from .purse import COMPILED, TxType

__all__ = [
    "IssuerHost",
    "LoadTacFields",
    "PurchaseAuthorization",
    "PurchaseRequest",
    "PurchaseSam",
    "PurchaseTacFields",
    "SamError",
    "SamMacError",
    "SoftSam",
    "compute_tac",
    "verify_tac",
]

TERMINAL_ID_BYTES = 6
TERMINAL_SEQ_MAX = 0xFFFFFFFF
# Open ciphers a SoftSam keeps: its master keys, and the purchase key (DPK) of each card it served
# lately, by the card's serial. Diversifying is two blocks through the open master cipher and opening
# a context for the card's key ~1-10 µs, so a card tapped again (a commuter, a queue of purchases)
# finds its key ready. Each entry is a few hundred bytes.
SAM_CIPHERS_MAX = 1024


class SamError(Exception):
    """The SAM refused an operation (unknown key version, no session, ...)."""


class SamMacError(SamError):
    """A card's MAC did not verify: MAC2 after a purchase, or MAC1 of a load."""


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _date_time(value: bytes) -> bytes:
    if len(value) != 7:
        raise ValueError("date || time is 7 BCD bytes")
    return value


# -- TAC: the fields of a transaction record, and the public verification ------------------------------


@dataclass(frozen=True, slots=True)
class PurchaseTacFields:
    """Everything a purchase TAC covers (tx types 05, 06, 09), plus the card it came from."""

    app_serial: bytes  # 10 bytes; its rightmost 8 are the key diversification factor
    amount_fen: int
    tx_type: int
    terminal_id: bytes
    terminal_seq: int
    date_time: bytes  # YYYYMMDDhhmmss, 7 BCD bytes

    def mac_input(self) -> bytes:
        return (_u32(self.amount_fen) + bytes((self.tx_type,)) + self.terminal_id + _u32(self.terminal_seq)
                + _date_time(self.date_time))


@dataclass(frozen=True, slots=True)
class LoadTacFields:
    """Everything a load TAC covers (tx types 01, 02): the new balance and the counter before the load."""

    app_serial: bytes
    new_balance_fen: int
    online_counter: int
    amount_fen: int
    tx_type: int
    terminal_id: bytes
    date_time: bytes

    def mac_input(self) -> bytes:
        return (_u32(self.new_balance_fen) + self.online_counter.to_bytes(2, "big") + _u32(self.amount_fen)
                + bytes((self.tx_type,)) + self.terminal_id + _date_time(self.date_time))


TacFields = PurchaseTacFields | LoadTacFields


def compute_tac(master_keys: MasterKeys, fields: TacFields) -> bytes:
    """The TAC the card computes for this transaction: single DES under DTK_L xor DTK_R."""
    dtk = diversify(master_keys.get("purse", KeyUsage.TAC).value.reveal(), diversification_factor(fields.app_serial))
    return pboc_mac(tac_key(dtk), fields.mac_input())


def verify_tac(master_keys: MasterKeys, fields: TacFields, tac: bytes) -> bool:
    """True if `tac` is the card's TAC over `fields` (constant-time comparison)."""
    return len(tac) == 4 and macs_equal(compute_tac(master_keys, fields), tac)


# -- the PSAM-shaped purchase SAM -----------------------------------------------------------------------


# The two values of every purchase are NamedTuples (immutable, and cheaper to build than a frozen
# dataclass); the TAC fields, made only to check a TAC, stay dataclasses.
class PurchaseRequest(NamedTuple):
    """The input of INIT SAM FOR PURCHASE (`80 70`): what the card said plus the transaction."""

    card_random: bytes
    offline_counter: int
    amount_fen: int
    tx_type: int
    date_time: bytes
    key_version: int
    algorithm: int
    app_serial: bytes  # diversification source (rightmost 8 bytes)


class PurchaseAuthorization(NamedTuple):
    terminal_seq: int
    mac1: bytes


class PurchaseSam(Protocol):
    """What a purchase terminal needs from a SAM; a hardware PSAM adapter implements the same."""

    terminal_id: bytes

    def init_for_purchase(self, request: PurchaseRequest) -> PurchaseAuthorization: ...

    def check_mac2(self, mac2: bytes) -> None: ...

    def verify_tac(self, fields: TacFields, tac: bytes) -> bool: ...


@dataclass(slots=True)
class _Session:
    key: DesCipher = field(repr=False)
    amount_fen: int


class SoftSam:
    """A software PSAM: terminal id, terminal transaction counter, purse master keys."""

    def __init__(self, master_keys: MasterKeys, terminal_id: bytes, *, next_terminal_seq: int = 1) -> None:
        if len(terminal_id) != TERMINAL_ID_BYTES:
            raise ValueError("a terminal id is 6 bytes")
        if not 1 <= next_terminal_seq <= TERMINAL_SEQ_MAX:
            raise ValueError("the terminal transaction number is 1..FFFFFFFF")
        self._keys = master_keys
        self.terminal_id = bytes(terminal_id)
        self._next_seq = next_terminal_seq
        self._session: _Session | None = None
        self._session_cipher: DesCipher | None = None  # the purchase session key's, re-keyed per session
        self._ciphers = CipherCache(SAM_CIPHERS_MAX)  # master keys
        # (key version, application serial) -> the card's purchase key (DPK), ready; see _purchase_key_cipher
        self._card_ciphers: dict[tuple[int, bytes], DesCipher] = {}
        self._card_cipher_master: MasterKey | None = None

    def __repr__(self) -> str:
        return f"SoftSam(terminal_id={self.terminal_id.hex().upper()})"

    def init_for_purchase(self, request: PurchaseRequest) -> PurchaseAuthorization:
        """INIT SAM FOR PURCHASE: a terminal transaction number and MAC1; opens the MAC2 session."""
        master = self._keys.get("purse", KeyUsage.PURCHASE)
        if request.key_version != master.version or request.algorithm != 0x00:
            raise SamError(f"no purchase key of version {request.key_version:02X}, algorithm {request.algorithm:02X}")
        if request.tx_type not in TxType.PURCHASES:
            raise SamError(f"transaction type {request.tx_type:02X} is not a purchase")
        if self._next_seq > TERMINAL_SEQ_MAX:
            raise SamError("terminal transaction numbers exhausted")
        seq = self._next_seq
        self._next_seq += 1
        block = request.card_random + request.offline_counter.to_bytes(2, "big") + _u32(seq)[2:4]
        # One cipher re-keyed in place per session (see VirtualCard.purchase_session_cipher); the old
        # session is dropped first, so a failure below can never leave it pointing at the new key.
        self._session = None
        session_key8 = self._purchase_key_cipher(master, request.app_serial).session_key(block)
        session = self._session_cipher
        if session is None:
            session = self._session_cipher = DesCipher(session_key8)
        else:
            session.rekey(session_key8)
        mac1 = session.mac(_u32(request.amount_fen) + bytes((request.tx_type,)) + self.terminal_id
                           + _date_time(request.date_time))
        self._session = _Session(session, request.amount_fen)
        return PurchaseAuthorization(seq, mac1)

    def _purchase_key_cipher(self, master: MasterKey, app_serial: bytes) -> DesCipher:
        """The open cipher of a card's DPK, diversified once per card (and master key) while it is kept."""
        cache_key = (master.version, bytes(app_serial))
        cipher = self._card_ciphers.get(cache_key)
        if cipher is None or self._card_cipher_master is not master:
            if self._card_cipher_master is not master:  # a new key file: no DPK of the old one survives
                self._card_ciphers.clear()
                self._card_cipher_master = master
            elif len(self._card_ciphers) >= SAM_CIPHERS_MAX:
                del self._card_ciphers[next(iter(self._card_ciphers))]  # the oldest card goes first
            dpk = self._ciphers.get(master.value.reveal()).diversify(diversification_factor(app_serial))
            cipher = self._card_ciphers[cache_key] = DesCipher(dpk)
        return cipher

    def check_mac2(self, mac2: bytes) -> None:
        """CREDIT SAM FOR PURCHASE: the card's MAC2 proves it debited; raises SamMacError if not."""
        session, self._session = self._session, None
        if session is None:
            raise SamError("no purchase session to check MAC2 against")
        if not macs_equal(session.key.mac(_u32(session.amount_fen)), mac2):
            raise SamMacError("MAC2 from the card does not verify")

    def verify_tac(self, fields: TacFields, tac: bytes) -> bool:
        return verify_tac(self._keys, fields, tac)

    def compute_tac(self, fields: TacFields) -> bytes:
        return compute_tac(self._keys, fields)

    # The Python methods, kept under these names: the compiled ones (purse.COMPILED) hand them what is
    # out of the usual, and the twin test runs them.
    py_init_for_purchase = init_for_purchase
    py_check_mac2 = check_mac2


if COMPILED is not None:  # see the end of purse.py
    SoftSam.init_for_purchase = COMPILED.sam_init_for_purchase  # type: ignore[method-assign]
    SoftSam.check_mac2 = COMPILED.sam_check_mac2  # type: ignore[method-assign]


# -- the issuer's host security operations ---------------------------------------------------------------


class IssuerHost:
    """Online operations the back office performs with its master keys (an HSM's job in production)."""

    def __init__(self, master_keys: MasterKeys) -> None:
        self._keys = master_keys

    def __repr__(self) -> str:
        return "IssuerHost(<keys>)"

    def _card_key(self, application: str, usage: KeyUsage, serial: bytes) -> bytes:
        return diversify(self._keys.get(application, usage).value.reveal(), diversification_factor(serial))

    def authorize_load(self, app_serial: bytes, *, balance_fen: int, online_counter: int, key_version: int,
                       card_random: bytes, mac1: bytes, amount_fen: int, tx_type: int, terminal_id: bytes,
                       date_time: bytes) -> bytes:
        """Verify the card's load MAC1 and return MAC2 for CREDIT FOR LOAD."""
        if tx_type not in TxType.LOADS:
            raise SamError(f"transaction type {tx_type:02X} is not a load")
        if key_version != self._keys.get("purse", KeyUsage.LOAD).version:
            raise SamError(f"no load key of version {key_version:02X}")
        dlk = self._card_key("purse", KeyUsage.LOAD, app_serial)
        sk = session_key(dlk, card_random + online_counter.to_bytes(2, "big") + b"\x80\x00")
        tail = _u32(amount_fen) + bytes((tx_type,)) + terminal_id
        if not macs_equal(pboc_mac(sk, _u32(balance_fen) + tail), mac1):
            raise SamMacError("MAC1 of the load does not verify")
        return pboc_mac(sk, tail + _date_time(date_time))

    def pin_reload_mac(self, application: str, serial: bytes, new_pin: bytes) -> bytes:
        """MAC for RELOAD PIN, under the card's DRPK (left xor right half)."""
        return pboc_mac(tac_key(self._card_key(application, KeyUsage.PIN_RELOAD, serial)), new_pin)

    def external_auth_cryptogram(self, application: str, serial: bytes, challenge: bytes) -> bytes:
        """3DES(card maintenance key, challenge padded to 8 bytes)."""
        padded = challenge + bytes(8 - len(challenge))
        return tdes_encrypt(self._card_key(application, KeyUsage.MAINTENANCE, serial), padded)

    def check_internal_auth(self, application: str, serial: bytes, challenge: bytes, answer: bytes) -> bool:
        expected = tdes_encrypt(self._card_key(application, KeyUsage.INTERNAL_AUTH, serial), challenge)
        return macs_equal(expected, answer)
