"""Terminal flows: the sequences of commands a reader runs, with the SAM doing the key work.

A `Terminal` owns a CardChannel (transport + trace + status-word checks), a purchase SAM and,
for online operations, an IssuerHost. Flows: read holder data, verify / change / reload PIN,
purchase, composite (CAPP) purchase, load, and recovery of a torn purchase.

Torn purchases: if the card leaves the reader after DEBIT was sent, the terminal cannot know
whether the card debited. `purchase()` then raises `PurchaseInterrupted` carrying a
`PendingPurchase`; once the card is back, `recover_purchase(pending)` re-runs INITIALIZE (amount 0)
to read the offline counter: counter + 1 means the debit happened, and GET TRANSACTION PROVE
returns its MAC2 and TAC so the terminal can still settle; an unchanged counter means nothing
happened.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from zoneinfo import ZoneInfo

from . import commands as cmd
from .channel import CardChannel
from .commands import LoadInit, PublicData, PurchaseInit, TransactionRecord, bcd_date_time
from .purse import CAPP_SFI, COMPILED, DETAIL_RECORDS, DETAIL_SFI, EP, PURSE_AID, TxType
from .sam import IssuerHost, LoadTacFields, PurchaseRequest, PurchaseSam, PurchaseTacFields, SamError
from .ssse import EF05_FID, EF05_ITEMS, EF06_FID, EF06_ITEMS, SSSE_AID, CardIdentity, Holder
from .state import pin_from_digits
from .sw import RecordNotFound
from .transport import TransportError

__all__ = [
    "CITY_ZONE",
    "HolderData",
    "LoadReceipt",
    "PendingPurchase",
    "PurchaseInterrupted",
    "PurchaseReceipt",
    "RecoveryError",
    "Terminal",
]

CITY_ZONE = ZoneInfo("Asia/Shanghai")
PURCHASE_KEY_INDEX = 0x01
LOAD_KEY_INDEX = 0x01
SELECT_PURSE = cmd.select_by_name(PURSE_AID, "SELECT ED/EP")  # the same bytes for every card


def _city_now() -> dt.datetime:
    return dt.datetime.now(CITY_ZONE)


class _CityNowBcd:
    """bcd_date_time(_city_now()), made once per second: the BCD form names the second only, and a
    terminal serving a queue asks for it several times a second (building it is ~2 µs, a third of a
    purchase's terminal work besides the APDUs and the SAM)."""

    __slots__ = ("_bcd", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._bcd = b""

    def __call__(self) -> bytes:
        second = int(time.time())  # the clock datetime.now reads
        if second != self._second:
            self._bcd = bcd_date_time(dt.datetime.fromtimestamp(second, CITY_ZONE))
            self._second = second
        return self._bcd


@dataclass(frozen=True, slots=True)
class HolderData:
    identity: CardIdentity  # EF05
    holder: Holder  # EF06


# Receipts are NamedTuples: as immutable as a frozen dataclass, and cheaper to build on every purchase.
class PurchaseReceipt(NamedTuple):
    app_serial: bytes
    purse: int
    tx_type: int
    amount_fen: int
    balance_before_fen: int
    offline_counter: int  # the counter the card used for this purchase (before its increment)
    terminal_id: bytes
    terminal_seq: int
    date_time: bytes
    mac2: bytes
    tac: bytes

    @property
    def balance_after_fen(self) -> int:
        return self.balance_before_fen - self.amount_fen

    def tac_fields(self) -> PurchaseTacFields:
        """What the back office needs to verify `tac` (sam.verify_tac)."""
        return PurchaseTacFields(self.app_serial, self.amount_fen, self.tx_type, self.terminal_id,
                                 self.terminal_seq, self.date_time)


class LoadReceipt(NamedTuple):
    app_serial: bytes
    purse: int
    tx_type: int
    amount_fen: int
    balance_before_fen: int
    online_counter: int
    terminal_id: bytes
    date_time: bytes
    tac: bytes

    @property
    def balance_after_fen(self) -> int:
        return self.balance_before_fen + self.amount_fen

    def tac_fields(self) -> LoadTacFields:
        return LoadTacFields(self.app_serial, self.balance_after_fen, self.online_counter, self.amount_fen,
                             self.tx_type, self.terminal_id, self.date_time)


@dataclass(frozen=True, slots=True)
class PendingPurchase:
    """What the terminal knew when the card left during DEBIT: enough to recover or to retry."""

    app_serial: bytes
    purse: int
    tx_type: int
    amount_fen: int
    balance_before_fen: int
    offline_counter: int
    terminal_id: bytes
    terminal_seq: int
    date_time: bytes


class PurchaseInterrupted(Exception):
    """The card left the reader after DEBIT was sent; call Terminal.recover_purchase(pending)."""

    def __init__(self, pending: PendingPurchase, cause: TransportError) -> None:
        super().__init__(f"card removed during {_tx_name(pending.tx_type)}; outcome unknown until recovered")
        self.pending = pending
        self.cause = cause


class RecoveryError(Exception):
    """A torn purchase cannot be settled: another card, or the card was used elsewhere meanwhile."""


def _tx_name(tx_type: int) -> str:
    return {TxType.PURCHASE_ED: "ED purchase", TxType.PURCHASE_EP: "EP purchase",
            TxType.CAPP: "composite purchase"}.get(tx_type, f"transaction {tx_type:02X}")


class Terminal:
    def __init__(self, channel: CardChannel, sam: PurchaseSam, *, host: IssuerHost | None = None,
                 clock: Callable[[], dt.datetime] = _city_now) -> None:
        self.channel = channel
        self.sam = sam
        self.host = host
        self.clock = clock
        self._public: PublicData | None = None  # of the purse ADF selected last
        # The last purse FCI and what it says: the same card answers every SELECT with the same bytes,
        # and parsing is a pure function of them, so a queue of purchases parses the FCI once.
        self._last_fci: tuple[bytes, PublicData] | None = None
        self._city_now_bcd = _CityNowBcd()

    # -- social security data ------------------------------------------------------------------------

    def read_holder(self) -> HolderData:
        """SELECT SSSE; EF05 read by record number, EF06 by tag, both in the EF just selected, the
        way social security readers in the field do (`00 B2 01 04 ..` and `00 B2 08 00 ..`)."""
        send = self.channel.send
        send(cmd.select_by_name(SSSE_AID, "SELECT SSSE"))
        self._public = None
        send(cmd.select_ef(EF05_FID))
        ef05 = {}
        for item in EF05_ITEMS.values():
            record = send(cmd.read_record(0, item.record, ne=item.length + 2)).data
            ef05[record[0]] = record
        send(cmd.select_ef(EF06_FID))
        ef06 = {}
        for item in EF06_ITEMS.values():
            record = send(cmd.read_record_by_tag(0, item.tag, ne=item.length + 2)).data
            ef06[record[0]] = record
        return HolderData(CardIdentity.from_records(ef05), Holder.from_records(ef06))

    # -- PIN --------------------------------------------------------------------------------------------

    def verify_pin(self, pin: str) -> None:
        """Raises sw.VerificationFailed (tries_left) or sw.AuthenticationBlocked."""
        self.channel.send(cmd.verify_pin(pin))

    def change_pin(self, old: str, new: str) -> None:
        self.channel.send(cmd.change_pin(old, new))

    def reload_pin(self, new: str) -> None:
        """Set a new PIN and unblock it, with a MAC from the issuer (in the purse ADF)."""
        host = self._need_host()
        public = self.select_purse()
        new_pin = pin_from_digits(new)
        self.channel.send(cmd.reload_pin(new_pin, host.pin_reload_mac("purse", public.app_serial, new_pin)))

    # -- purse ------------------------------------------------------------------------------------------

    def select_purse(self) -> PublicData:
        fci = self.channel.send(SELECT_PURSE).data
        if self._last_fci is None or self._last_fci[0] != fci:
            self._last_fci = (fci, cmd.parse_fci_public_data(fci))
        self._public = self._last_fci[1]
        return self._public

    def balance(self, purse: int = EP) -> int:
        self._purse_selected()
        return int.from_bytes(self.channel.send(cmd.get_balance(purse)).data, "big")

    def transactions(self) -> list[TransactionRecord]:
        """The detail records, most recent first (SFI 18, cyclic)."""
        self._purse_selected()
        out = []
        for number in range(1, DETAIL_RECORDS + 1):
            try:
                out.append(TransactionRecord.parse(self.channel.send(cmd.read_record(DETAIL_SFI, number, ne=23)).data))
            except RecordNotFound:
                break
        return out

    def purchase(self, amount_fen: int, purse: int = EP) -> PurchaseReceipt:
        """SELECT, INITIALIZE FOR PURCHASE, DEBIT FOR PURCHASE; the SAM makes MAC1, checks MAC2."""
        public = self.select_purse()
        tx_type = TxType.purchase(purse)
        init = PurchaseInit.parse(self.channel.send(
            cmd.initialize_for_purchase(purse, PURCHASE_KEY_INDEX, amount_fen, self.sam.terminal_id)).data)
        return self._debit(public, purse, tx_type, amount_fen, init)

    # The Python method, kept under this name: the compiled one (purse.COMPILED) hands it what is out of
    # the usual, and the twin test runs it.
    py_purchase = purchase

    def composite_purchase(self, amount_fen: int, capp_record: bytes, sfi: int = CAPP_SFI) -> PurchaseReceipt:
        """Transit entry or exit: INITIALIZE FOR CAPP PURCHASE, UPDATE CAPP DATA CACHE, DEBIT."""
        public = self.select_purse()
        init = PurchaseInit.parse(self.channel.send(
            cmd.initialize_for_capp_purchase(PURCHASE_KEY_INDEX, amount_fen, self.sam.terminal_id)).data)
        self.channel.send(cmd.update_capp_data_cache(sfi, capp_record))
        return self._debit(public, EP, TxType.CAPP, amount_fen, init)

    def _debit(self, public: PublicData, purse: int, tx_type: int, amount_fen: int,
               init: PurchaseInit) -> PurchaseReceipt:
        date_time = self._date_time()
        auth = self.sam.init_for_purchase(PurchaseRequest(
            init.card_random, init.offline_counter, amount_fen, tx_type, date_time, init.key_version,
            init.algorithm, public.app_serial))
        try:
            answer = self.channel.send(cmd.debit_for_purchase(auth.terminal_seq, date_time, auth.mac1)).data
        except TransportError as exc:
            pending = PendingPurchase(public.app_serial, purse, tx_type, amount_fen, init.balance_fen,
                                      init.offline_counter, self.sam.terminal_id, auth.terminal_seq, date_time)
            raise PurchaseInterrupted(pending, exc) from exc
        tac, mac2 = answer[0:4], answer[4:8]
        self.sam.check_mac2(mac2)
        return PurchaseReceipt(public.app_serial, purse, tx_type, amount_fen, init.balance_fen,
                               init.offline_counter, self.sam.terminal_id, auth.terminal_seq, date_time, mac2, tac)

    @staticmethod
    def _receipt(p: PendingPurchase, mac2: bytes, tac: bytes) -> PurchaseReceipt:
        return PurchaseReceipt(p.app_serial, p.purse, p.tx_type, p.amount_fen, p.balance_before_fen,
                               p.offline_counter, p.terminal_id, p.terminal_seq, p.date_time, mac2, tac)

    def recover_purchase(self, pending: PendingPurchase) -> PurchaseReceipt | None:
        """After a torn DEBIT: the receipt if the card did debit, None if it did not."""
        public = self.select_purse()
        if public.app_serial != pending.app_serial:
            raise RecoveryError("a different card is in the reader")
        init = PurchaseInit.parse(self.channel.send(
            cmd.initialize_for_purchase(pending.purse, PURCHASE_KEY_INDEX, 0, self.sam.terminal_id)).data)
        if init.offline_counter == pending.offline_counter:
            return None  # the DEBIT never took effect
        if init.offline_counter != pending.offline_counter + 1:
            raise RecoveryError("the card made other purchases since; settle from its detail records")
        proof = self.channel.send(cmd.get_transaction_prove(pending.tx_type, pending.offline_counter + 1)).data
        mac2, tac = proof[0:4], proof[4:8]
        receipt = self._receipt(pending, mac2, tac)
        if not self.sam.verify_tac(receipt.tac_fields(), tac):
            raise RecoveryError("the proof's TAC does not verify")
        return receipt

    def load(self, amount_fen: int, purse: int = EP) -> LoadReceipt:
        """INITIALIZE FOR LOAD, the issuer checks MAC1 and answers MAC2, CREDIT FOR LOAD. Needs a verified PIN."""
        host = self._need_host()
        public = self._purse_selected()
        tx_type = TxType.load(purse)
        init = LoadInit.parse(self.channel.send(
            cmd.initialize_for_load(purse, LOAD_KEY_INDEX, amount_fen, self.sam.terminal_id)).data)
        date_time = self._date_time()
        mac2 = host.authorize_load(public.app_serial, balance_fen=init.balance_fen,
                                   online_counter=init.online_counter, key_version=init.key_version,
                                   card_random=init.card_random, mac1=init.mac1, amount_fen=amount_fen,
                                   tx_type=tx_type, terminal_id=self.sam.terminal_id, date_time=date_time)
        tac = self.channel.send(cmd.credit_for_load(date_time, mac2)).data
        receipt = LoadReceipt(public.app_serial, purse, tx_type, amount_fen, init.balance_fen, init.online_counter,
                              self.sam.terminal_id, date_time, tac)
        if not self.sam.verify_tac(receipt.tac_fields(), tac):
            raise SamError("the card's load TAC does not verify")
        return receipt

    def _date_time(self) -> bytes:
        """Now, as the 7 BCD bytes a transaction carries."""
        if self.clock is _city_now:
            return self._city_now_bcd()
        return bcd_date_time(self.clock())

    def _purse_selected(self) -> PublicData:
        return self._public if self._public is not None else self.select_purse()

    def _need_host(self) -> IssuerHost:
        if self.host is None:
            raise SamError("this terminal has no issuer host connection (online operations need one)")
        return self.host


if COMPILED is not None:  # see the end of purse.py
    Terminal.purchase = COMPILED.terminal_purchase  # type: ignore[method-assign]
