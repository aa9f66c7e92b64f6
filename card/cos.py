"""The chip's operating system: one APDU in, one response out, state persisted before it leaves.

`VirtualCard.process` is the whole contract. It never raises: a malformed or refused command
yields its ISO status word and changes nothing; an internal fault yields 6F 00 after the card
rolls its memory back to the last persisted image. Routing is by CLA and INS:

* CLA 00: the ISO commands (iso.py, security.py) in any DF;
* CLA 80: CHANGE/RELOAD PIN in any DF, the ED/EP commands (purse.py) only while the purse ADF is
  the current DF (elsewhere they are "instruction not supported", 6D 00), short APDUs only.

Volatile state (the selection, PIN-verified and authenticated flags) resets on power-on and reset.
The one-shot `pending` slot (a purse session after INITIALIZE, a challenge after GET CHALLENGE)
belongs to the next command only: `process` empties it before dispatching, so "immediately
preceded by" is enforced in one place. A card object is not thread-safe; vpcd serialises APDUs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import iso, purse, security
from .apdu import Command, parse_command
from .crypto import CipherCache, DesCipher
from .fs import DedicatedFile, ElementaryFile
from .purse import PurseData
from .state import CardImage, FileStore, Part, StateStore, change_record, journal_state
from .sw import SW, Refusal

__all__ = ["ATR", "VirtualCard", "make_atr"]

log = logging.getLogger("citycard.card.cos")

Handler = Callable[["VirtualCard", Command, object], bytes]

# apdu.parse_command, or its compiled twin (purse.COMPILED: see the end of purse.py).
_parse_command: Callable[[bytes], Command] = purse.COMPILED.parse_command if purse.COMPILED else parse_command

CLA_ISO = 0x00
CLA_PROPRIETARY = 0x80
CARD_CIPHERS_MAX = 32  # open cipher contexts for the card's own keys (it holds about ten)
# The change records kept since the rollback point; past this the point moves to the image itself
# (one to_bytes, ~0.1 ms, per ~250 purchases).
ROLLBACK_RECORDS_BYTES_MAX = 64 * 1024


def make_atr(historical: bytes) -> bytes:
    """TS 3B, T0 with TD1, TD1 80 (T=0, TD2 follows), TD2 01 (T=1), historical bytes, TCK."""
    if len(historical) > 15:
        raise ValueError("at most 15 historical bytes")
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes((tck,))


# Tried with Debian's pcscd + vpcd (pcsc-stack.md §3): pyscard negotiates T=1.
ATR = make_atr(bytes.fromhex("0031C173C84000009000"))


class VirtualCard:
    def __init__(
        self,
        image: CardImage,
        store: StateStore,
        *,
        random: Callable[[int], bytes] = os.urandom,  # what secrets.token_bytes returns, one call nearer
    ) -> None:
        """`store` holds `image` already (VirtualCard.open) or nothing yet (a new MemoryStore)."""
        self.image = image
        self.store = store
        self._random = random
        # The rollback point, i.e. what the store holds: an image, and the change records saved since
        # (the store's own journal lines, so a rollback replays exactly what the store would).
        self._start = image.to_bytes()
        self._saved_since_start = bytearray()
        self._ciphers = CipherCache(CARD_CIPHERS_MAX)
        self._purchase_session: DesCipher | None = None  # see purchase_session_cipher
        # What handlers derive from the image's *shape* (a DF by name, a DF's keys and files): the tree
        # and the keys never change after personalisation, so this lives as long as `image` does.
        self.memo: dict[object, Any] = {}
        self.atr = ATR
        self.reset()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, fsync: bool = False) -> VirtualCard:
        """The card whose state lives in `path` (a file written by personalize).

        `fsync=True` syncs every state-changing command to the disk (durable against a power cut of
        the host); without it each command is still one atomic write (see FileStore).
        """
        store = FileStore(Path(path), fsync=fsync)
        return cls(store.load(), store)

    # -- volatile state ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Power-on or warm reset: the MF is selected, every security status is cleared."""
        self.current_df: DedicatedFile = self.image.mf
        self.current_ef: ElementaryFile | None = None
        self.pin_verified = False
        self.authenticated = False  # EXTERNAL AUTHENTICATE succeeded in the current DF
        self.pending: object | None = None

    def select_df(self, df: DedicatedFile) -> None:
        if df is not self.current_df:
            self.authenticated = False  # security status obtained in a DF ends when it is left
        self.current_df = df
        self.current_ef = None

    @property
    def purse(self) -> PurseData:
        if self.image.purse is None:
            raise Refusal(SW.FUNCTION_NOT_SUPPORTED)
        return self.image.purse

    def cipher(self, key: bytes) -> DesCipher:
        """A ready cipher for one of the card's own (long-lived) keys."""
        return self._ciphers.get(key)

    def purchase_session_cipher(self, session_key8: bytes) -> DesCipher:
        """The card's one cipher for purchase session keys, re-keyed for this session.

        A purchase session key lives for one DEBIT and is never kept past it, so one cipher re-keyed in
        place serves them all (the compiled DesCipher re-keys its context without allocating; opening
        a context per session was the largest crypto cost of a purchase). Valid until the next call.
        """
        if self._purchase_session is None:
            self._purchase_session = DesCipher(session_key8)
        else:
            self._purchase_session.rekey(session_key8)
        return self._purchase_session

    def random(self, count: int) -> bytes:
        value = self._random(count)
        if len(value) != count:
            raise RuntimeError("the random source returned the wrong number of bytes")
        return value

    # -- persistence ----------------------------------------------------------------------------------

    def commit(self, *changed: Part) -> None:
        """Persist the parts of the image a command changed, in one atomic step, before it answers.

        A handler names every part it changed (the PIN, the purse data, an EF, a key entry); only
        those are written (CardImage.change). On failure the card rolls back to what the store
        holds and the command answers 65 81.
        """
        if not changed:
            raise ValueError("commit() needs the parts that changed")
        change = self.image.change
        self.commit_changes({pointer: value for pointer, value in map(change, changed)})

    def commit_changes(self, changes: dict[str, Any], pushes: dict[str, Any] | None = None) -> None:
        """commit() for a handler that says finer what changed: values at JSON pointers (CardImage.change,
        record_changed) and entries pushed in front of lists (CardImage.appended), as state.change_record
        writes them. A purchase records its balance, counter, proof and detail record, not the purse whole."""
        if not changes and not pushes:
            raise ValueError("commit_changes() needs the changes")
        self.commit_record(change_record(changes, pushes))

    def commit_record(self, record: bytes) -> None:
        """commit_changes() for a journal line made already (state.change_record, or the compiled purchase
        path's line, the same bytes): saved before the answer leaves; on failure, 65 81 and a rollback."""
        try:
            self.store.save(record, self.image)
        except Exception as exc:  # noqa: BLE001 - any storage failure means "the write did not happen"
            log.error("card state not saved (%s); memory rolled back to the last saved image", type(exc).__name__)
            self._rollback()
            raise Refusal(SW.MEMORY_FAILURE) from None
        if len(self._saved_since_start) + len(record) > ROLLBACK_RECORDS_BYTES_MAX:
            self._start = self.image.to_bytes()  # the image is what the store holds now
            self._saved_since_start.clear()
        else:
            self._saved_since_start += record

    def _rollback(self) -> None:
        saved = journal_state(self._start, bytes(self._saved_since_start), "card rollback point")
        self.image = CardImage.from_json(saved)
        self.memo.clear()
        self.reset()

    # -- the APDU contract -------------------------------------------------------------------------------

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU with a response APDU (data || SW1 SW2). Never raises."""
        pending, self.pending = self.pending, None
        try:
            handler = self._route(apdu)
            command = _parse_command(apdu)
            if command.cla == CLA_PROPRIETARY and command.extended:
                raise Refusal(SW.WRONG_LENGTH)  # ED/EP never needs extended length (§1.1)
            return handler(self, command, pending)
        except Refusal as refusal:
            self.pending = None
            return refusal.sw.to_bytes(2, "big")
        except Exception:
            ins = apdu[1] if len(apdu) > 1 else -1
            log.exception("internal fault on INS %02X; memory rolled back", ins)
            self._rollback()
            return SW.NO_PRECISE_DIAGNOSIS.to_bytes(2, "big")

    def _route(self, apdu: bytes) -> Handler:
        if len(apdu) < 4:
            raise Refusal(SW.WRONG_LENGTH)
        cla, ins = apdu[0], apdu[1]
        handler: Handler | None
        if cla == CLA_ISO:
            handler = _ISO_HANDLERS.get(ins)
        elif cla == CLA_PROPRIETARY:
            handler = security.PROPRIETARY_HANDLERS.get(ins)
            if handler is None and self.current_df.application == "purse":
                handler = purse.HANDLERS.get(ins)
        else:
            raise Refusal(SW.CLA_NOT_SUPPORTED)
        if handler is None:
            raise Refusal(SW.INS_NOT_SUPPORTED)
        return handler

    def power(self, on: bool) -> None:
        """vpcd power on/off (and reset): volatile state goes, the image stays."""
        self.reset()

    # -- for tests ----------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, object], tuple[object, ...]]:
        """Persistent image plus the lasting volatile state, to prove a refused command changed neither."""
        df_path = []
        df: DedicatedFile | None = self.current_df
        while df is not None:
            df_path.append((df.fid, df.name))
            df = df.parent
        ef_fid = self.current_ef.fid if self.current_ef is not None else None
        return self.image.to_json(), (tuple(df_path), ef_fid, self.pin_verified, self.authenticated)


_ISO_HANDLERS: dict[int, Handler] = {**iso.HANDLERS, **security.HANDLERS}
