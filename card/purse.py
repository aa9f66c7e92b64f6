"""The PBOC ED/EP application on the chip (JR/T 0025; card-standards.md §2).

Two purses, ED (electronic deposit, P2 01: purchase needs the PIN) and EP (electronic purse,
P2 02), each with a balance in fen, an online counter (loads) and an offline counter (purchases).
Commands: GET BALANCE, INITIALIZE FOR LOAD / CREDIT FOR LOAD, INITIALIZE FOR PURCHASE / DEBIT FOR
PURCHASE, the composite purchase (INITIALIZE FOR CAPP PURCHASE, UPDATE CAPP DATA CACHE, DEBIT) and
GET TRANSACTION PROVE. Cash withdrawal, unload and overdraft updates answer 6A 81 (not built).

An INITIALIZE leaves a session in the card's one-shot `pending` slot; the COS empties that slot
before every command, so a DEBIT or CREDIT that does not immediately follow its INITIALIZE finds
nothing and gets 69 85, and a failed MAC burns the session. Every check runs before the first
mutation; the mutations of one transaction (balance, counter, detail record, CAPP record, proof)
are persisted by one `card.commit(...)` naming the purse data and the files it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .apdu import Command, respond
from .crypto import NO_EXTENSIONS, DesCipher, macs_equal, tac_key
from .fs import DedicatedFile, EfKind, ElementaryFile
from .keys import CardKey, KeyUsage
from .sw import SW, Refusal

if TYPE_CHECKING:
    from .cos import VirtualCard

__all__ = [
    "AMOUNT_FEN_MAX",
    "CAPP_SFI",
    "CARDHOLDER_SFI",
    "COUNTER_MAX",
    "DETAIL_RECORDS",
    "DETAIL_RECORD_BYTES",
    "DETAIL_SFI",
    "ED",
    "EP",
    "HANDLERS",
    "PROOFS_KEPT",
    "PUBLIC_DATA_BYTES",
    "PUBLIC_DATA_SFI",
    "PURCHASE_IMPLEMENTATION",
    "PURSE_AID",
    "Proof",
    "PurseData",
    "TxType",
    "public_data_fci",
]

# City one-card (MOHURD CJ/T 166) EP ADF name, under DF 1001 (card-standards.md §3).
PURSE_AID = bytes.fromhex("A00000000386980701")
PURSE_FID = 0x1001
ED = 0x01
EP = 0x02
PURSES = (ED, EP)

PUBLIC_DATA_SFI = 0x15
CARDHOLDER_SFI = 0x16
CAPP_SFI = 0x17
DETAIL_SFI = 0x18
PUBLIC_DATA_BYTES = 30
DETAIL_RECORD_BYTES = 23
DETAIL_RECORDS = 10

COUNTER_MAX = 0xFFFF  # 2-byte counters; at the maximum the card refuses new transactions (94 02)
AMOUNT_FEN_MAX = 0x7FFFFFFF  # a 4-byte amount or balance, kept clear of the sign bit
PROOFS_KEPT = 8  # transaction proofs kept for GET TRANSACTION PROVE
OVERDRAFT_BYTES = 3
INIT_DATA_BYTES = 11  # key index (1) || amount (4) || terminal id (6)
CREDIT_DATA_BYTES = 11  # date (4) || time (3) || MAC2 (4)
DEBIT_DATA_BYTES = 15  # terminal txn seq (4) || date (4) || time (3) || MAC1 (4)


class TxType:
    """Transaction type identifiers (card-standards.md §2.2)."""

    LOAD_ED = 0x01
    LOAD_EP = 0x02
    PURCHASE_ED = 0x05
    PURCHASE_EP = 0x06
    CAPP = 0x09

    LOADS = (LOAD_ED, LOAD_EP)
    PURCHASES = (PURCHASE_ED, PURCHASE_EP, CAPP)

    @staticmethod
    def load(purse: int) -> int:
        return TxType.LOAD_ED if purse == ED else TxType.LOAD_EP

    @staticmethod
    def purchase(purse: int) -> int:
        return TxType.PURCHASE_ED if purse == ED else TxType.PURCHASE_EP


# Values made on every purchase (a proof, a session) are NamedTuples: as immutable as a frozen
# dataclass and built in a third of the time, which counts on the purchase path.
class Proof(NamedTuple):
    """What GET TRANSACTION PROVE returns for a transaction: its MAC2 and TAC."""

    tx_type: int
    counter: int  # the purse counter after the transaction (the INITIALIZE counter + 1)
    mac: bytes
    tac: bytes


@dataclass(slots=True, eq=False)
class PurseData:
    """The purse's internal (non-file) state, persisted with the card image."""

    balance_max_fen: int
    balances: dict[int, int] = field(default_factory=lambda: {ED: 0, EP: 0})
    online_counters: dict[int, int] = field(default_factory=lambda: {ED: 0, EP: 0})
    offline_counters: dict[int, int] = field(default_factory=lambda: {ED: 0, EP: 0})
    overdraft_fen: int = 0
    proofs: list[Proof] = field(default_factory=list)

    def keep_proof(self, proof: Proof) -> None:
        self.proofs.insert(0, proof)
        del self.proofs[PROOFS_KEPT:]

    def to_json(self) -> dict[str, Any]:
        # Spelled out (no helper calls, proofs unpacked in the comprehension): every DEBIT and CREDIT
        # writes this, and the plain way took a quarter of the card's work in a DEBIT.
        balances, online, offline = self.balances, self.online_counters, self.offline_counters
        return {
            "balance_max_fen": self.balance_max_fen,
            "balances": {_ED_KEY: balances[ED], _EP_KEY: balances[EP]},
            "online_counters": {_ED_KEY: online[ED], _EP_KEY: online[EP]},
            "offline_counters": {_ED_KEY: offline[ED], _EP_KEY: offline[EP]},
            "overdraft_fen": self.overdraft_fen,
            "proofs": [[tx_type, counter, mac.hex(), tac.hex()] for tx_type, counter, mac, tac in self.proofs],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PurseData:
        data = cls(
            balance_max_fen=_bounded(obj["balance_max_fen"], AMOUNT_FEN_MAX),
            balances=_per_purse(obj["balances"], AMOUNT_FEN_MAX),
            online_counters=_per_purse(obj["online_counters"], COUNTER_MAX),
            offline_counters=_per_purse(obj["offline_counters"], COUNTER_MAX),
            overdraft_fen=_bounded(obj["overdraft_fen"], 0xFFFFFF),
        )
        if any(balance > data.balance_max_fen for balance in data.balances.values()):
            raise ValueError("a stored balance exceeds the purse maximum")
        for tx_type, counter, mac, tac in obj["proofs"][:PROOFS_KEPT]:
            proof = Proof(_bounded(tx_type, 0xFF), _bounded(counter, COUNTER_MAX), bytes.fromhex(mac), bytes.fromhex(tac))
            if len(proof.mac) != 4 or len(proof.tac) != 4:
                raise ValueError("a stored proof is malformed")
            data.proofs.append(proof)
        return data


def _bounded(value: Any, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ValueError(f"stored purse value out of range 0..{high}")
    return value


# JSON object keys are strings: a per-purse value is stored as {"1": ED's, "2": EP's}.
_ED_KEY, _EP_KEY = str(ED), str(EP)


def _per_purse(obj: dict[str, Any], high: int) -> dict[int, int]:
    if sorted(obj) != [_ED_KEY, _EP_KEY]:
        raise ValueError("stored purse values must name ED (1) and EP (2)")
    return {int(k): _bounded(v, high) for k, v in obj.items()}


# -- sessions left in the card's one-shot slot --------------------------------------------------


# The ciphers in a session never show their keys (DesCipher's repr is redacted).
class LoadSession(NamedTuple):
    purse: int
    tx_type: int
    amount_fen: int
    terminal_id: bytes
    counter: int
    old_balance_fen: int
    session: DesCipher  # the load session key
    tac: DesCipher


class PurchaseSession(NamedTuple):
    purse: int
    tx_type: int
    amount_fen: int
    terminal_id: bytes
    counter: int
    balance_fen: int
    card_random: bytes
    purchase_key: DesCipher  # the card's DPK; the session key comes at DEBIT
    tac: DesCipher
    capp_write: tuple[ElementaryFile, int, bytes] | None = None  # (file, record number, record)


# -- what the purse handlers look up in the DF, once per card ---------------------------------------


class PurseContext(NamedTuple):
    """The current purse DF's keys, ciphers and detail file. The file tree and the keys never change
    after personalisation, so a card derives this once per DF (VirtualCard.memo), not per command."""

    purchase_keys: dict[int, tuple[CardKey, DesCipher]]  # key index -> the DPK and its open cipher
    tac: DesCipher | None  # under DTK_L xor DTK_R; None: the DF has no TAC key (94 03)
    detail: ElementaryFile | None  # SFI 18


def _context(card: VirtualCard) -> PurseContext:
    key = (PurseContext, card.current_df)
    entry = card.memo.get(key)
    if entry is None:
        entry = card.memo[key] = _new_context(card, card.current_df)
    return entry


def _new_context(card: VirtualCard, df: DedicatedFile) -> PurseContext:
    tac_keys = df.keys_of(KeyUsage.TAC)
    return PurseContext(
        {k.index: (k, card.cipher(k.value.reveal())) for k in reversed(df.keys_of(KeyUsage.PURCHASE))},
        card.cipher(tac_key(tac_keys[0].value.reveal())) if tac_keys else None,
        df.ef_by_sfi(DETAIL_SFI),
    )


# -- helpers ---------------------------------------------------------------------------------------


def _purse_of(p2: int) -> int:
    if p2 not in PURSES:
        raise Refusal(SW.WRONG_P1P2)
    return p2


def _exact_data(command: Command, length: int) -> bytes:
    if len(command.data) != length:
        raise Refusal(SW.WRONG_LENGTH)
    return command.data


def _require_bcd(field_bytes: bytes) -> None:
    """Dates and times travel as BCD; a non-decimal nibble is wrong data, whatever the MAC says."""
    if not field_bytes.hex().isdigit():  # BCD bytes are exactly those whose hex digits are all decimal
        raise Refusal(SW.WRONG_DATA)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _tac_cipher_of(context: PurseContext) -> DesCipher:
    if context.tac is None:
        raise Refusal(SW.KEY_NOT_FOUND)
    return context.tac


def _detail_file(context: PurseContext) -> ElementaryFile:
    if context.detail is None:
        raise Refusal(SW.FILE_NOT_FOUND)
    return context.detail


def _detail_record(counter: int, overdraft_fen: int, amount_fen: int, tx_type: int, terminal_id: bytes,
                   date_time: bytes) -> bytes:
    record = _u16(counter) + overdraft_fen.to_bytes(3, "big") + _u32(amount_fen) + bytes((tx_type,)) + terminal_id
    return record + date_time


def public_data_fci(public_data: bytes) -> bytes:
    """Proprietary FCI data (inside A5) of the purse ADF: app version (9F08) and the 0015 content (9F0C)."""
    version = public_data[9:10] if len(public_data) >= 10 else b"\x00"
    return b"\x9f\x08\x01" + version + b"\x9f\x0c" + bytes((len(public_data),)) + public_data


# -- GET BALANCE -------------------------------------------------------------------------------


def get_balance(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1 != 0x00:
        raise Refusal(SW.WRONG_P1P2)
    purse = _purse_of(command.p2)
    _exact_data(command, 0)
    if purse == ED and not card.pin_verified:
        raise Refusal(SW.SECURITY_STATUS)
    return respond(command, _u32(card.purse.balances[purse]))


# -- INITIALIZE (load, purchase, CAPP purchase) --------------------------------------------------


def initialize(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1 == 0x00:
        return _initialize_for_load(card, command)
    if command.p1 == 0x01:
        return _initialize_for_purchase(card, command, TxType.purchase(_purse_of(command.p2)))
    if command.p1 == 0x03:
        if command.p2 != EP:  # the composite purchase runs on the EP only
            raise Refusal(SW.WRONG_P1P2)
        return _initialize_for_purchase(card, command, TxType.CAPP)
    if command.p1 in (0x02, 0x04, 0x05):  # cash withdraw, overdraft update, unload: not built
        raise Refusal(SW.FUNCTION_NOT_SUPPORTED)
    raise Refusal(SW.WRONG_P1P2)


def _initialize_for_load(card: VirtualCard, command: Command) -> bytes:
    purse = _purse_of(command.p2)
    data = _exact_data(command, INIT_DATA_BYTES)
    key_index, amount_fen, terminal_id = data[0], int.from_bytes(data[1:5], "big"), data[5:11]
    if not card.pin_verified:  # a load is online and needs the cardholder's PIN (§2.1)
        raise Refusal(SW.SECURITY_STATUS)
    load_key = card.current_df.key(KeyUsage.LOAD, key_index)
    if load_key is None:
        raise Refusal(SW.KEY_INDEX_NOT_SUPPORTED)
    state = card.purse
    counter = state.online_counters[purse]
    if counter >= COUNTER_MAX:
        raise Refusal(SW.COUNTER_EXHAUSTED)
    balance = state.balances[purse]
    if amount_fen == 0 or balance + amount_fen > state.balance_max_fen:
        raise Refusal(SW.WRONG_DATA)
    tx_type = TxType.load(purse)
    tac = _tac_cipher_of(_context(card))
    card_random = card.random(4)
    session_key = card.cipher(load_key.value.reveal()).session_key(card_random + _u16(counter) + b"\x80\x00")
    session = DesCipher(session_key)
    mac1 = session.mac(_u32(balance) + _u32(amount_fen) + bytes((tx_type,)) + terminal_id)
    response = (
        _u32(balance) + _u16(counter) + bytes((load_key.version, load_key.algorithm)) + card_random + mac1
    )
    reply = respond(command, response)
    card.pending = LoadSession(purse, tx_type, amount_fen, bytes(terminal_id), counter, balance, session, tac)
    return reply


def _initialize_for_purchase(card: VirtualCard, command: Command, tx_type: int) -> bytes:
    purse = command.p2
    data = _exact_data(command, INIT_DATA_BYTES)
    key_index, amount_fen, terminal_id = data[0], int.from_bytes(data[1:5], "big"), data[5:11]
    if purse == ED and not card.pin_verified:
        raise Refusal(SW.SECURITY_STATUS)
    context = _context(card)
    purchase_key_entry = context.purchase_keys.get(key_index)
    if purchase_key_entry is None:
        raise Refusal(SW.KEY_INDEX_NOT_SUPPORTED)
    purchase_key, purchase_cipher = purchase_key_entry
    state = card.purse
    counter = state.offline_counters[purse]
    if counter >= COUNTER_MAX:
        raise Refusal(SW.COUNTER_EXHAUSTED)
    balance = state.balances[purse]
    if amount_fen > balance:
        raise Refusal(SW.INSUFFICIENT_BALANCE)
    tac = _tac_cipher_of(context)
    card_random = card.random(4)
    response = (
        _u32(balance)
        + _u16(counter)
        + state.overdraft_fen.to_bytes(OVERDRAFT_BYTES, "big")
        + bytes((purchase_key.version, purchase_key.algorithm))
        + card_random
    )
    reply = respond(command, response)
    card.pending = PurchaseSession(purse, tx_type, amount_fen, bytes(terminal_id), counter, balance, card_random,
                                   purchase_cipher, tac)
    return reply


# -- CREDIT FOR LOAD ---------------------------------------------------------------------------


def credit_for_load(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1p2 != 0x0000:
        raise Refusal(SW.WRONG_P1P2)
    if not isinstance(pending, LoadSession):
        raise Refusal(SW.CONDITIONS_OF_USE)
    data = _exact_data(command, CREDIT_DATA_BYTES)
    date_time, mac2 = data[0:7], data[7:11]
    _require_bcd(date_time)
    s = pending
    mac2_input = _u32(s.amount_fen) + bytes((s.tx_type,)) + s.terminal_id + date_time
    if not macs_equal(s.session.mac(mac2_input), mac2):
        raise Refusal(SW.MAC_INVALID)
    state = card.purse
    if state.balances[s.purse] != s.old_balance_fen or state.online_counters[s.purse] != s.counter:
        raise Refusal(SW.CONDITIONS_OF_USE)  # cannot happen: nothing runs between INIT and CREDIT
    new_balance = s.old_balance_fen + s.amount_fen
    # TAC over the counter *before* the increment (§2.4: HED test script, fmcos-python).
    tac = s.tac.mac(_u32(new_balance) + _u16(s.counter) + mac2_input)
    record = _detail_record(s.counter, state.overdraft_fen, s.amount_fen, s.tx_type, s.terminal_id, date_time)
    reply = respond(command, tac)
    detail = _detail_file(_context(card))
    detail.check_append(record)

    state.balances[s.purse] = new_balance
    state.online_counters[s.purse] = s.counter + 1
    detail.append_checked_record(record)
    state.keep_proof(Proof(s.tx_type, s.counter + 1, bytes(mac2), tac))
    card.commit_changes(*_transaction_changes(card, s.purse, "online_counters", detail))
    return reply


# -- DEBIT FOR PURCHASE / CAPP PURCHASE --------------------------------------------------------------


def debit_for_purchase(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1 == 0x03:  # DEBIT FOR UNLOAD
        raise Refusal(SW.FUNCTION_NOT_SUPPORTED)
    if command.p1p2 != 0x0100:
        raise Refusal(SW.WRONG_P1P2)
    if not isinstance(pending, PurchaseSession):
        raise Refusal(SW.CONDITIONS_OF_USE)
    data = _exact_data(command, DEBIT_DATA_BYTES)
    terminal_seq, date_time, mac1 = data[0:4], data[4:11], data[11:15]
    _require_bcd(date_time)
    s = pending
    session = card.purchase_session_cipher(
        s.purchase_key.session_key(s.card_random + _u16(s.counter) + terminal_seq[2:4]))
    amount = _u32(s.amount_fen)
    amount_type_terminal = amount + bytes((s.tx_type,)) + s.terminal_id  # how MAC1 and TAC both begin
    if not macs_equal(session.mac(amount_type_terminal + date_time), mac1):
        raise Refusal(SW.MAC_INVALID)
    state = card.purse
    if state.balances[s.purse] != s.balance_fen or state.offline_counters[s.purse] != s.counter:
        raise Refusal(SW.CONDITIONS_OF_USE)  # cannot happen: nothing runs between INIT and DEBIT
    tac = s.tac.mac(amount_type_terminal + terminal_seq + date_time)
    mac2 = session.mac(amount)
    record = _detail_record(s.counter, state.overdraft_fen, s.amount_fen, s.tx_type, s.terminal_id, date_time)
    reply = respond(command, tac + mac2)
    detail = _detail_file(_context(card))
    detail.check_append(record)
    if s.capp_write is not None:
        capp_file, number, capp_record = s.capp_write
        capp_file.record(number)
        capp_file.check_record(capp_record)

    state.balances[s.purse] = s.balance_fen - s.amount_fen
    state.offline_counters[s.purse] = s.counter + 1
    detail.append_checked_record(record)
    state.keep_proof(Proof(s.tx_type, s.counter + 1, mac2, tac))
    changes, pushes = _transaction_changes(card, s.purse, "offline_counters", detail)
    if s.capp_write is not None:
        capp_file.update_record(number, capp_record)
        pointer, value = card.image.record_changed(capp_file, number)
        changes[pointer] = value
    card.commit_changes(changes, pushes)
    return reply


def _transaction_changes(card: VirtualCard, purse: int, counters: str,
                         detail: ElementaryFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a load or purchase changed, for card.commit_changes: the purse's balance and counter (in
    PurseData.to_json's layout), its newest proof and its newest detail record (pushed in front, the
    way keep_proof and a cyclic append put them): ~0.2 KB instead of the purse and the file whole."""
    state = card.purse
    key = (_transaction_changes, purse, counters, detail)
    pointers = card.memo.get(key)
    if pointers is None:  # the tree never changes shape, so neither do the pointers (see VirtualCard.memo)
        at = card.image.pointer(state)
        pointers = card.memo[key] = (f"{at}/balances/{purse}", f"{at}/{counters}/{purse}", f"{at}/proofs")
    balance_at, counter_at, proofs_at = pointers
    proof = state.proofs[0]
    changes: dict[str, Any] = {balance_at: state.balances[purse], counter_at: getattr(state, counters)[purse]}
    pushes: dict[str, Any] = {proofs_at: [[proof.tx_type, proof.counter, proof.mac.hex(), proof.tac.hex()],
                                          PROOFS_KEPT]}
    if detail.kind is EfKind.CYCLIC:
        pointer, push = card.image.appended(detail)
        pushes[pointer] = push
    else:  # a linear detail file (a card personalised so): its records whole
        pointer, value = card.image.change(detail)
        changes[pointer] = value
    return changes, pushes


# -- UPDATE CAPP DATA CACHE (CLA 80, INS DC) ----------------------------------------------------------


def update_capp_data_cache(card: VirtualCard, command: Command, pending: object) -> bytes:
    """Stage a composite record; DEBIT FOR CAPP PURCHASE writes it together with the debit."""
    sfi, mode = command.p2 >> 3, command.p2 & 0x07
    if mode != 0 or not 1 <= sfi <= 30 or command.p1 in (0x00, 0xFF):
        raise Refusal(SW.WRONG_P1P2)
    if not isinstance(pending, PurchaseSession) or pending.tx_type != TxType.CAPP or pending.capp_write:
        raise Refusal(SW.CONDITIONS_OF_USE)
    capp_file = card.current_df.ef_by_sfi(sfi)
    if capp_file is None:
        raise Refusal(SW.FILE_NOT_FOUND)
    if not capp_file.tlv:
        raise Refusal(SW.FILE_STRUCTURE)
    number = capp_file.find_record(command.p1)
    capp_file.check_record(command.data)
    if command.data[0] != command.p1:
        raise Refusal(SW.WRONG_DATA)
    card.pending = pending._replace(capp_write=(capp_file, number, bytes(command.data)))
    return respond(command)


# -- GET TRANSACTION PROVE ---------------------------------------------------------------------------


def get_transaction_prove(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p1 != 0x00 or command.p2 not in TxType.LOADS + TxType.PURCHASES:
        raise Refusal(SW.WRONG_P1P2)
    data = _exact_data(command, 2)
    counter = int.from_bytes(data, "big")
    for proof in card.purse.proofs:
        if proof.tx_type == command.p2 and proof.counter == counter:
            return respond(command, proof.mac + proof.tac)
    raise Refusal(SW.MAC_UNAVAILABLE)


# INS -> handler, for CLA 80 while the purse ADF is the current DF.
PY_HANDLERS = {
    0x5C: get_balance,
    0x50: initialize,
    0x52: credit_for_load,
    0x54: debit_for_purchase,
    0xDC: update_capp_data_cache,
    0x5A: get_transaction_prove,
}

# The compiled twin of a purchase's hot path (card/_purchase.pyx: INITIALIZE and DEBIT here, the APDU
# parser in cos.py, the SAM in sam.py, the terminal's flow in flows.py) is chosen once, here, the way
# crypto.DesCipher is: a missing build or CITYCARD_NO_EXTENSIONS=1 leaves the Python above, and
# PURCHASE_IMPLEMENTATION (which tests/card/test_purchase_twin.py checks) says which one serves.
# Imported last: the module takes PurchaseSession, Proof and the helpers above from this one.
COMPILED: Any = None
HANDLERS = PY_HANDLERS
PURCHASE_IMPLEMENTATION = "python"
if not NO_EXTENSIONS:
    try:
        from . import _purchase as COMPILED
    except ImportError:
        pass
    else:
        HANDLERS = {**PY_HANDLERS, 0x50: COMPILED.initialize, 0x54: COMPILED.debit_for_purchase}
        PURCHASE_IMPLEMENTATION = "compiled"
