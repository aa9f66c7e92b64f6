"""ISO 7816-4 file commands on the chip: SELECT, READ/UPDATE BINARY, READ/UPDATE/APPEND RECORD.

Each handler resolves its target and checks every condition first; only then does it change the
selection or a file, and a file change is persisted by `card.commit(ef)` before the answer leaves.
Commands that only read (SELECT, READ BINARY, READ RECORD) never write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .apdu import SHORT_NE_MAX, Command, respond
from .fs import MF_FID, SFI_MAX, Access, DedicatedFile, ElementaryFile
from .purse import PUBLIC_DATA_SFI, public_data_fci
from .sw import SW, Refusal

if TYPE_CHECKING:
    from .cos import VirtualCard

__all__ = ["HANDLERS", "fci", "tlv"]

FID_BYTES = 2
SELECT_RETURN_FCI = 0x00
SELECT_NO_RESPONSE = 0x0C
RECORD_MODE_BY_NUMBER = 0b100
RECORD_MODE_FIRST_WITH_ID = 0b000


def tlv(tag: int, value: bytes) -> bytes:
    """BER-TLV with a one-byte tag (lengths up to 255 are all this card needs)."""
    if len(value) < 0x80:
        return bytes((tag, len(value))) + value
    if len(value) <= 0xFF:
        return bytes((tag, 0x81, len(value))) + value
    raise ValueError("TLV value too long for this card")


def fci(df: DedicatedFile) -> bytes:
    """FCI template (6F): DF name (84) or FID (83), then proprietary data (A5)."""
    ident = tlv(0x84, df.name) if df.name is not None else tlv(0x83, (df.fid or 0).to_bytes(2, "big"))
    proprietary = b""
    if df.application == "purse":
        public = df.ef_by_sfi(PUBLIC_DATA_SFI)
        if public is not None and not public.is_record_file:
            proprietary = public_data_fci(bytes(public.data))
    return tlv(0x6F, ident + tlv(0xA5, proprietary))


# -- SELECT ------------------------------------------------------------------------------------


def _fci_of(card: VirtualCard, df: DedicatedFile) -> bytes:
    """fci(df), kept per DF while what it shows (the purse's public data) stays the same: a terminal
    selects the purse before every purchase."""
    key = (fci, df)
    public_data = _public_data(card, df)
    cached = card.memo.get(key)
    if cached is None or cached[0] != public_data:
        cached = card.memo[key] = (public_data, fci(df))
    return cached[1]


def _public_data(card: VirtualCard, df: DedicatedFile) -> bytes | None:
    if df.application != "purse":
        return None
    key = (_public_data, df)
    public = card.memo.get(key, key)
    if public is key:
        found = df.ef_by_sfi(PUBLIC_DATA_SFI)
        public = card.memo[key] = found if found is not None and not found.is_record_file else None
    return bytes(public.data) if public is not None else None


def select(card: VirtualCard, command: Command, pending: object) -> bytes:
    if command.p2 not in (SELECT_RETURN_FCI, SELECT_NO_RESPONSE):
        raise Refusal(SW.WRONG_P1P2)
    target = _resolve_select(card, command.p1, command.data)
    if isinstance(target, DedicatedFile):
        answer = _fci_of(card, target) if command.p2 == SELECT_RETURN_FCI else b""
        reply = respond(command, answer)
        card.select_df(target)
    else:
        reply = respond(command)
        card.current_ef = target
    return reply


def _fid(data: bytes) -> int:
    if len(data) != FID_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    return int.from_bytes(data, "big")


def _resolve_select(card: VirtualCard, p1: int, data: bytes) -> DedicatedFile | ElementaryFile:
    current = card.current_df
    if p1 == 0x00:  # MF, DF or EF by FID
        if not data:
            return card.image.mf
        return _by_fid(card, current, _fid(data))
    if p1 == 0x01:  # child DF
        child = current.df_by_fid(_fid(data))
        return _found(child)
    if p1 == 0x02:  # EF under the current DF
        return _found(current.ef_by_fid(_fid(data)))
    if p1 == 0x03:  # parent DF
        if data:
            raise Refusal(SW.WRONG_LENGTH)
        return _found(current.parent)
    if p1 == 0x04:  # by DF name
        if not 1 <= len(data) <= 16:
            raise Refusal(SW.WRONG_LENGTH)
        return _found(_df_by_name(card, bytes(data)))
    if p1 in (0x08, 0x09):  # path from the MF / from the current DF
        if not data or len(data) % FID_BYTES:
            raise Refusal(SW.WRONG_LENGTH)
        return _by_path(card.image.mf if p1 == 0x08 else current, data)
    raise Refusal(SW.WRONG_P1P2)


def _df_by_name(card: VirtualCard, name: bytes) -> DedicatedFile | None:
    names = card.memo.get(_df_by_name)
    if names is None:
        names = card.memo[_df_by_name] = {}
        for df in card.image.mf.walk():
            if df.name is not None:
                names.setdefault(df.name, df)  # the first in walk order, as find_by_name
    return names.get(name)


def _found(target: DedicatedFile | ElementaryFile | None) -> DedicatedFile | ElementaryFile:
    if target is None:
        raise Refusal(SW.FILE_NOT_FOUND)
    return target


def _by_fid(card: VirtualCard, current: DedicatedFile, fid: int) -> DedicatedFile | ElementaryFile:
    """ISO search order: MF, the current DF itself, its children, its parent, the parent's children."""
    if fid == MF_FID:
        return card.image.mf
    if current.fid == fid:
        return current
    found: DedicatedFile | ElementaryFile | None = current.ef_by_fid(fid) or current.df_by_fid(fid)
    parent = current.parent
    if found is None and parent is not None:
        found = parent if parent.fid == fid else parent.df_by_fid(fid)
    return _found(found)


def _by_path(start: DedicatedFile, path: bytes) -> DedicatedFile | ElementaryFile:
    fids = [int.from_bytes(path[i : i + 2], "big") for i in range(0, len(path), 2)]
    df = start
    for position, fid in enumerate(fids):
        last = position == len(fids) - 1
        child_df = df.df_by_fid(fid)
        if child_df is not None:
            df = child_df
            continue
        ef = df.ef_by_fid(fid)
        if ef is not None and last:
            return ef
        raise Refusal(SW.FILE_NOT_FOUND)
    return df


# -- addressing shared by BINARY and RECORD commands ---------------------------------------------


def _ef_by_sfi(card: VirtualCard, sfi: int) -> ElementaryFile:
    if not 1 <= sfi <= SFI_MAX:
        raise Refusal(SW.WRONG_P1P2)
    ef = card.current_df.ef_by_sfi(sfi)
    if ef is None:
        raise Refusal(SW.FILE_NOT_FOUND)
    return ef


def _current_ef(card: VirtualCard) -> ElementaryFile:
    if card.current_ef is None:
        raise Refusal(SW.NO_CURRENT_EF)
    return card.current_ef


def _binary_target(card: VirtualCard, command: Command) -> tuple[ElementaryFile, int]:
    """P1 b8 = 1: P1 b5-b1 = SFI and P2 = offset; otherwise P1 P2 = 15-bit offset in the current EF."""
    if command.p1 & 0x80:
        if command.p1 & 0x60:
            raise Refusal(SW.WRONG_P1P2)
        return _ef_by_sfi(card, command.p1 & 0x1F), command.p2
    return _current_ef(card), command.p1p2


def _record_target(card: VirtualCard, p2: int) -> tuple[ElementaryFile, int]:
    """P2 b8-b4 = SFI (0: current EF), b3-b1 = the addressing mode."""
    sfi, mode = p2 >> 3, p2 & 0x07
    ef = _current_ef(card) if sfi == 0 else _ef_by_sfi(card, sfi)
    return ef, mode


def _check_access(card: VirtualCard, condition: Access) -> None:
    if condition is Access.ALWAYS:
        return
    if condition is Access.PIN and card.pin_verified:
        return
    if condition is Access.AUTH and card.authenticated:
        return
    raise Refusal(SW.SECURITY_STATUS)


# -- READ / UPDATE BINARY -------------------------------------------------------------------------


def read_binary(card: VirtualCard, command: Command, pending: object) -> bytes:
    ef, offset = _binary_target(card, command)
    if command.data:
        raise Refusal(SW.WRONG_LENGTH)
    if ef.is_record_file:
        raise Refusal(SW.FILE_STRUCTURE)
    _check_access(card, ef.read)
    # No Le at all: be lenient (T=1 terminals often omit it) and send what one short response holds.
    wanted = command.ne if command.ne is not None else SHORT_NE_MAX
    chunk = ef.read_binary(offset, wanted)
    reply = respond(command, chunk, short_read=True)
    card.current_ef = ef
    return reply


def update_binary(card: VirtualCard, command: Command, pending: object) -> bytes:
    ef, offset = _binary_target(card, command)
    if not command.data:
        raise Refusal(SW.WRONG_LENGTH)
    if ef.is_record_file:
        raise Refusal(SW.FILE_STRUCTURE)
    _check_access(card, ef.update)
    ef.check_update_binary(offset, command.data)
    reply = respond(command)
    ef.update_binary(offset, command.data)
    card.current_ef = ef
    card.commit(ef)
    return reply


# -- READ / UPDATE / APPEND RECORD ------------------------------------------------------------------


def _record_number(ef: ElementaryFile, p1: int, mode: int) -> int:
    if mode == RECORD_MODE_BY_NUMBER:
        if p1 in (0x00, 0xFF):  # 00 = "current record" (not tracked by this card), FF reserved
            raise Refusal(SW.WRONG_P1P2)
        ef.record(p1)
        return p1
    if mode == RECORD_MODE_FIRST_WITH_ID:
        if p1 in (0x00, 0xFF):
            raise Refusal(SW.WRONG_P1P2)
        return ef.find_record(p1)
    raise Refusal(SW.WRONG_P1P2)


def read_record(card: VirtualCard, command: Command, pending: object) -> bytes:
    """By number (P2 mode 100, P1 = number) or by identifier (mode 000, P1 = TLV tag), §4.2."""
    ef, mode = _record_target(card, command.p2)
    if command.data:
        raise Refusal(SW.WRONG_LENGTH)
    if not ef.is_record_file:
        raise Refusal(SW.FILE_STRUCTURE)
    _check_access(card, ef.read)
    number = _record_number(ef, command.p1, mode)
    reply = respond(command, ef.record(number), short_read=True)
    card.current_ef = ef
    return reply


def update_record(card: VirtualCard, command: Command, pending: object) -> bytes:
    ef, mode = _record_target(card, command.p2)
    if not command.data:
        raise Refusal(SW.WRONG_LENGTH)
    if not ef.is_record_file:
        raise Refusal(SW.FILE_STRUCTURE)
    _check_access(card, ef.update)
    number = _record_number(ef, command.p1, mode)
    ef.check_record(command.data)
    if ef.tlv and mode == RECORD_MODE_FIRST_WITH_ID and command.data[0] != command.p1:
        raise Refusal(SW.WRONG_DATA)  # the record would lose the identifier it was found by
    reply = respond(command)
    ef.update_record(number, command.data)
    card.current_ef = ef
    card.commit(ef)
    return reply


def append_record(card: VirtualCard, command: Command, pending: object) -> bytes:
    ef, mode = _record_target(card, command.p2)
    if command.p1 != 0x00 or mode != 0:
        raise Refusal(SW.WRONG_P1P2)
    if not command.data:
        raise Refusal(SW.WRONG_LENGTH)
    if not ef.is_record_file:
        raise Refusal(SW.FILE_STRUCTURE)
    _check_access(card, ef.update)
    ef.check_append(command.data)
    reply = respond(command)
    ef.append_record(command.data)
    card.current_ef = ef
    card.commit(ef)
    return reply


# INS -> handler, CLA 00.
HANDLERS = {
    0xA4: select,
    0xB0: read_binary,
    0xD6: update_binary,
    0xB2: read_record,
    0xDC: update_record,
    0xE2: append_record,
}
