# cython: language_level=3
"""The compiled twin of a purchase's hot path: card, journal line, SAM and terminal, byte for byte.

Why it exists: through PC/SC a purchase's own work costs about twice its hot-loop time (cold caches
after every trip through pcscd), and in Python that work (~50 µs hot beyond the SELECT: ~23 µs the
card's DEBIT, ~8 its INITIALIZE, the rest the terminal and the SAM) kept the purchase at ~1.0 times
its target of 4 bare round trips. The Python code stays as the twin and the reference (purse.py,
state.py, sam.py, flows.py, apdu.py); each module picks the function here at import, unless
`CITYCARD_NO_EXTENSIONS=1`. tests/card/test_purchase_twin.py drives both with the same random and
compares every answer, journal line and receipt.

What is done here rather than there, and why it is the same:

* parse_command: the seven APDU shapes of apdu.parse_command, the same Command tuples;
* the card's INITIALIZE FOR PURCHASE and DEBIT FOR PURCHASE: the same checks in the same order (so the
  same status word for every malformed or out-of-sequence command), the same mutations, then the same
  `card.commit_record(line)` before the answer leaves (a failed save still answers 65 81 and rolls
  back, in cos.py). The DES work stays in card/_des.pyx's DesCipher (called through its methods);
* the journal line of a purchase with a cyclic detail file and no CAPP record (every purchase a
  terminal or gate makes but the composite one): built straight into a buffer from pieces the card
  encodes once with state.json_bytes (its pointers), which are the bytes change_record would write.
  Anything else (a linear detail file, a CAPP record) goes through purse._transaction_changes and
  change_record as in Python;
* the SAM's INIT FOR PURCHASE and MAC2 check, and the terminal's purchase flow: the same APDUs, the same
  SAM calls through the PurchaseSam protocol, the same exceptions (unusual input goes to the Python
  builders, which raise what they always raised).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_Insert
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdio cimport snprintf
from libc.string cimport memcpy

from .apdu import Command
from .fs import EfKind
from .purse import Proof, PurchaseSession, PurseContext, _context, _initialize_for_load, _transaction_changes
from .sw import SW, Refusal

cdef object _CYCLIC = EfKind.CYCLIC
cdef object _new_tuple = tuple.__new__
cdef object _Command = Command
cdef object _Proof = Proof
cdef object _PurchaseSession = PurchaseSession
cdef object _PurseContext = PurseContext

cdef enum:
    ED = 0x01
    EP = 0x02
    PURCHASE_ED = 0x05
    PURCHASE_EP = 0x06
    CAPP = 0x09
    COUNTER_MAX = 0xFFFF
    PROOFS_KEPT = 8
    SHORT_NE_MAX = 256
    EXTENDED_NE_MAX = 65536
    CARD_NC_MAX = 4096

cdef const char *_HEX = b"0123456789abcdef"


# -- small byte helpers -----------------------------------------------------------------------------


cdef inline void _put_be(unsigned char *out, unsigned long long value, int count) noexcept:
    cdef int i
    for i in range(count - 1, -1, -1):
        out[i] = value & 0xFF
        value >>= 8


cdef inline unsigned long long _get_be(const unsigned char *data, int count) noexcept:
    cdef unsigned long long value = 0
    cdef int i
    for i in range(count):
        value = (value << 8) | data[i]
    return value


cdef inline bint _is_bcd(const unsigned char *data, int count) noexcept:
    """purse._require_bcd: every nibble a decimal digit."""
    cdef int i
    for i in range(count):
        if (data[i] >> 4) > 9 or (data[i] & 0x0F) > 9:
            return False
    return True


cdef inline bint _macs_equal(bytes computed, bytes given) noexcept:
    """crypto.macs_equal (hmac.compare_digest): constant time over the bytes, lengths compared first."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(computed), i
    cdef const unsigned char *a = <const unsigned char *>PyBytes_AS_STRING(computed)
    cdef const unsigned char *b = <const unsigned char *>PyBytes_AS_STRING(given)
    cdef unsigned char diff = 0
    if n != PyBytes_GET_SIZE(given):
        return False
    for i in range(n):
        diff |= a[i] ^ b[i]
    return diff == 0


cdef inline char *_hex(char *out, const unsigned char *data, Py_ssize_t count) noexcept:
    cdef Py_ssize_t i
    for i in range(count):
        out[0] = _HEX[data[i] >> 4]
        out[1] = _HEX[data[i] & 0x0F]
        out += 2
    return out


cdef inline char *_copy(char *out, bytes piece) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(piece)
    memcpy(out, PyBytes_AS_STRING(piece), n)
    return out + n


cdef inline char *_decimal(char *out, unsigned long long value) noexcept:
    return out + snprintf(out, 24, b"%llu", value)


cdef bytes _respond(command, const unsigned char *data, Py_ssize_t length):
    """apdu.respond(command, data) for a fixed-size answer: data || 90 00, or the same Le refusal."""
    ne = command[5]
    cdef Py_ssize_t ne_value
    if ne is not None:
        ne_value = ne
        ne_max = EXTENDED_NE_MAX if command[6] else SHORT_NE_MAX
        if ne_value != ne_max and ne_value != length and ne_value < length:
            raise Refusal(SW.wrong_le(length) if length <= SHORT_NE_MAX else SW.WRONG_LENGTH)
    out = PyBytes_FromStringAndSize(NULL, length + 2)
    cdef unsigned char *o = <unsigned char *>PyBytes_AS_STRING(out)
    memcpy(o, data, length)
    o[length] = 0x90
    o[length + 1] = 0x00
    return out


# -- apdu.parse_command ------------------------------------------------------------------------------


def parse_command(raw):
    """apdu.parse_command: a command APDU's Command, or Refusal(67 00) if its lengths do not add up."""
    cdef bytes data
    if type(raw) is not bytes:
        raw = bytes(raw)
    data = <bytes>raw
    cdef const unsigned char *r = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), lc
    cdef int b1, le
    if n < 4:
        raise Refusal(SW.WRONG_LENGTH)
    cla, ins, p1, p2 = r[0], r[1], r[2], r[3]
    if n == 4:  # case 1
        return _new_tuple(_Command, (cla, ins, p1, p2, b"", None, False))
    b1 = r[4]
    if n == 5:  # case 2S
        return _new_tuple(_Command, (cla, ins, p1, p2, b"", b1 or SHORT_NE_MAX, False))
    if b1 != 0:  # short Lc
        if n == 5 + b1:  # case 3S
            return _new_tuple(_Command, (cla, ins, p1, p2, PyBytes_FromStringAndSize(<char *>r + 5, b1), None, False))
        if n == 6 + b1:  # case 4S
            return _new_tuple(_Command, (cla, ins, p1, p2, PyBytes_FromStringAndSize(<char *>r + 5, b1),
                                         r[n - 1] or SHORT_NE_MAX, False))
        raise Refusal(SW.WRONG_LENGTH)
    if n == 7:  # case 2E
        le = (r[5] << 8) | r[6]
        return _new_tuple(_Command, (cla, ins, p1, p2, b"", le or EXTENDED_NE_MAX, True))
    if n < 8:
        raise Refusal(SW.WRONG_LENGTH)
    lc = (r[5] << 8) | r[6]
    if lc == 0:  # an extended Lc of zero is not a valid encoding
        raise Refusal(SW.WRONG_LENGTH)
    if n == 7 + lc:  # case 3E
        if lc > CARD_NC_MAX:
            raise Refusal(SW.WRONG_LENGTH)
        return _new_tuple(_Command, (cla, ins, p1, p2, PyBytes_FromStringAndSize(<char *>r + 7, lc), None, True))
    if n == 9 + lc:  # case 4E
        if lc > CARD_NC_MAX:
            raise Refusal(SW.WRONG_LENGTH)
        le = (r[n - 2] << 8) | r[n - 1]
        return _new_tuple(_Command, (cla, ins, p1, p2, PyBytes_FromStringAndSize(<char *>r + 7, lc),
                                     le or EXTENDED_NE_MAX, True))
    raise Refusal(SW.WRONG_LENGTH)


# -- the card: INITIALIZE (purse.initialize) --------------------------------------------------------------


def initialize(card, command, pending):
    """purse.initialize: INITIALIZE FOR LOAD (in Python), FOR PURCHASE and FOR CAPP PURCHASE (here)."""
    cdef int p1 = command[2], p2 = command[3]
    if p1 == 0x00:
        return _initialize_for_load(card, command)
    if p1 == 0x01:
        if p2 != ED and p2 != EP:
            raise Refusal(SW.WRONG_P1P2)
        return _initialize_for_purchase(card, command, PURCHASE_ED if p2 == ED else PURCHASE_EP)
    if p1 == 0x03:
        if p2 != EP:  # the composite purchase runs on the EP only
            raise Refusal(SW.WRONG_P1P2)
        return _initialize_for_purchase(card, command, CAPP)
    if p1 == 0x02 or p1 == 0x04 or p1 == 0x05:  # cash withdraw, overdraft update, unload: not built
        raise Refusal(SW.FUNCTION_NOT_SUPPORTED)
    raise Refusal(SW.WRONG_P1P2)


cdef object _purse_context(card):
    """purse._context, the memo looked up without a Python frame."""
    memo = card.memo
    cdef PyObject *entry = PyDict_GetItem(memo, (_PurseContext, card.current_df))
    if entry is NULL:
        return _context(card)
    return <object>entry


cdef bytes _initialize_for_purchase(card, command, int tx_type):
    cdef int purse = command[3]
    cdef bytes data = command[4]
    if PyBytes_GET_SIZE(data) != INIT_DATA_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    cdef const unsigned char *d = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef int key_index = d[0]
    cdef long long amount_fen = <long long>_get_be(d + 1, 4)
    if purse == ED and not card.pin_verified:
        raise Refusal(SW.SECURITY_STATUS)
    context = _purse_context(card)
    entry = context[0].get(key_index)  # PurseContext.purchase_keys
    if entry is None:
        raise Refusal(SW.KEY_INDEX_NOT_SUPPORTED)
    purchase_key, purchase_cipher = entry
    state = card.purse
    counter = state.offline_counters[purse]
    if counter >= COUNTER_MAX:
        raise Refusal(SW.COUNTER_EXHAUSTED)
    balance = state.balances[purse]
    if amount_fen > balance:
        raise Refusal(SW.INSUFFICIENT_BALANCE)
    tac = context[1]
    if tac is None:
        raise Refusal(SW.KEY_NOT_FOUND)
    card_random = card.random(4)
    cdef unsigned char answer[INIT_ANSWER_BYTES]
    _put_be(answer, balance, 4)
    _put_be(answer + 4, counter, 2)
    _put_be(answer + 6, state.overdraft_fen, 3)
    answer[9] = purchase_key.version
    answer[10] = purchase_key.algorithm
    memcpy(answer + 11, PyBytes_AS_STRING(card_random), 4)
    reply = _respond(command, answer, INIT_ANSWER_BYTES)
    card.pending = _new_tuple(_PurchaseSession, (
        purse, tx_type, amount_fen, PyBytes_FromStringAndSize(<char *>d + 5, TERMINAL_ID_BYTES), counter, balance,
        card_random, purchase_cipher, tac, None))
    return reply


# -- the card: DEBIT FOR PURCHASE (purse.debit_for_purchase) -------------------------------------------------


def debit_for_purchase(card, command, pending):
    """purse.debit_for_purchase: check MAC1, debit, keep the record and proof, commit, answer TAC || MAC2."""
    cdef int p1 = command[2], p2 = command[3]
    if p1 == 0x03:  # DEBIT FOR UNLOAD
        raise Refusal(SW.FUNCTION_NOT_SUPPORTED)
    if p1 != 0x01 or p2 != 0x00:
        raise Refusal(SW.WRONG_P1P2)
    if not isinstance(pending, _PurchaseSession):
        raise Refusal(SW.CONDITIONS_OF_USE)
    cdef bytes data = command[4]
    if PyBytes_GET_SIZE(data) != DEBIT_DATA_BYTES:
        raise Refusal(SW.WRONG_LENGTH)
    cdef const unsigned char *d = <const unsigned char *>PyBytes_AS_STRING(data)  # seq, date time, MAC1
    if not _is_bcd(d + 4, DATE_TIME_BYTES):
        raise Refusal(SW.WRONG_DATA)
    s_purse, s_tx_type, s_amount, s_terminal_id, s_counter, s_balance, s_random, s_key, s_tac, s_capp = pending
    cdef int purse = s_purse, tx_type = s_tx_type, counter = s_counter
    cdef long long amount_fen = s_amount, balance_fen = s_balance
    cdef unsigned char block[8]
    memcpy(block, PyBytes_AS_STRING(s_random), 4)
    _put_be(block + 4, counter, 2)
    block[6], block[7] = d[2], d[3]
    session = card.purchase_session_cipher(s_key.session_key(PyBytes_FromStringAndSize(<char *>block, 8)))
    # MAC1 and the TAC both begin amount || tx type || terminal id; the TAC then has seq || date time.
    cdef unsigned char tac_input[TAC_INPUT_BYTES]
    cdef unsigned char mac1_input[MAC1_INPUT_BYTES]
    _put_be(tac_input, amount_fen, 4)
    tac_input[4] = tx_type
    memcpy(tac_input + 5, PyBytes_AS_STRING(s_terminal_id), TERMINAL_ID_BYTES)
    memcpy(mac1_input, tac_input, 11)
    memcpy(mac1_input + 11, d + 4, DATE_TIME_BYTES)
    memcpy(tac_input + 11, d, 4 + DATE_TIME_BYTES)
    mac1 = session.mac(PyBytes_FromStringAndSize(<char *>mac1_input, MAC1_INPUT_BYTES))
    if not _macs_equal(mac1, PyBytes_FromStringAndSize(<char *>d + 11, PURCHASE_MAC_BYTES)):
        raise Refusal(SW.MAC_INVALID)
    state = card.purse
    balances, counters = state.balances, state.offline_counters
    if balances[purse] != balance_fen or counters[purse] != counter:
        raise Refusal(SW.CONDITIONS_OF_USE)  # cannot happen: nothing runs between INIT and DEBIT
    tac = s_tac.mac(PyBytes_FromStringAndSize(<char *>tac_input, TAC_INPUT_BYTES))
    mac2 = session.mac(PyBytes_FromStringAndSize(<char *>tac_input, 4))
    cdef unsigned char answer[8]
    memcpy(answer, PyBytes_AS_STRING(tac), 4)
    memcpy(answer + 4, PyBytes_AS_STRING(mac2), 4)
    cdef unsigned char rec[DETAIL_RECORD_BYTES]
    _put_be(rec, counter, 2)
    _put_be(rec + 2, state.overdraft_fen, 3)
    memcpy(rec + 5, tac_input, 11)  # amount || tx type || terminal id
    memcpy(rec + 16, d + 4, DATE_TIME_BYTES)
    record = PyBytes_FromStringAndSize(<char *>rec, DETAIL_RECORD_BYTES)
    reply = _respond(command, answer, 8)
    detail = _purse_context(card)[2]
    if detail is None:
        raise Refusal(SW.FILE_NOT_FOUND)
    cdef bint plain_cyclic = detail.kind is _CYCLIC and not detail.tlv and detail.record_bytes == DETAIL_RECORD_BYTES
    if not plain_cyclic:
        detail.check_append(record)
    if s_capp is not None:
        capp_file, number, capp_record = s_capp
        capp_file.record(number)
        capp_file.check_record(capp_record)

    balances[purse] = balance_fen - amount_fen
    counters[purse] = counter + 1
    if plain_cyclic:  # ElementaryFile.append_checked_record of a cyclic file
        records = detail.records
        PyList_Insert(records, 0, record)
        del records[detail.records_max:]
    else:
        detail.append_checked_record(record)
    proofs = state.proofs  # PurseData.keep_proof
    PyList_Insert(proofs, 0, _new_tuple(_Proof, (tx_type, counter + 1, mac2, tac)))
    del proofs[PROOFS_KEPT:]
    if plain_cyclic and s_capp is None:
        card.commit_record(_purchase_line(card, purse, detail, balance_fen - amount_fen, counter + 1, tx_type,
                                          <const unsigned char *>PyBytes_AS_STRING(mac2),
                                          <const unsigned char *>PyBytes_AS_STRING(tac), rec))
        return reply
    changes, pushes = _transaction_changes(card, purse, "offline_counters", detail)
    if s_capp is not None:
        capp_file.update_record(number, capp_record)
        pointer, value = card.image.record_changed(capp_file, number)
        changes[pointer] = value
    card.commit_changes(changes, pushes)
    return reply


# -- the journal line of a purchase (state.change_record of purse._transaction_changes) ----------------


cdef object _json_bytes = None
# The memo key of the pieces (a cdef function is no stable Python object: each mention makes a new one).
cdef object _LINE_PIECES = object()


cdef tuple _line_pieces(card, int purse, detail):
    """The fixed parts of a purchase's journal line on this card, encoded once: the JSON of each pointer
    (by state.json_bytes, the encoder of every other line) and the detail file's records_max."""
    global _json_bytes
    if _json_bytes is None:
        from .state import json_bytes  # here, not at import: state imports purse, which imports this module
        _json_bytes = json_bytes
    image = card.image
    at = image.pointer(card.purse)
    detail_at, (_, records_max) = image.appended(detail)
    pieces = (b'{"replace":{' + _json_bytes(f"{at}/balances/{purse}") + b":",
              b"," + _json_bytes(f"{at}/offline_counters/{purse}") + b":",
              b'},"push":{' + _json_bytes(f"{at}/proofs") + b":[[",
              b'"],' + str(PROOFS_KEPT).encode() + b"]," + _json_bytes(detail_at) + b':["',
              b'",' + str(records_max).encode() + b"]}}")
    if sum(len(piece) for piece in pieces) > JOURNAL_LINE_BYTES_MAX // 2:
        raise ValueError("the purse's JSON pointers are too long for a purchase's journal line")
    return pieces


cdef bytes _purchase_line(card, int purse, detail, long long balance_fen, int counter, int tx_type,
                          const unsigned char *mac2, const unsigned char *tac, const unsigned char *rec):
    """change_record({balance_at: balance, counter_at: counter}, {proofs_at: [[tx type, counter, MAC2,
    TAC], 8], detail_at: [record, records_max]}): crc32 (8 hex) SP payload LF."""
    key = (_LINE_PIECES, purse, detail)
    memo = card.memo
    cdef PyObject *found = PyDict_GetItem(memo, key)
    if found is NULL:
        pieces = memo[key] = _line_pieces(card, purse, detail)
    else:
        pieces = <object>found
    cdef char line[JOURNAL_LINE_BYTES_MAX]
    cdef char *payload = line + 9
    cdef char *o = payload
    o = _copy(o, <bytes>PyTuple_GET_ITEM(pieces, 0))
    o = _decimal(o, <unsigned long long>balance_fen)
    o = _copy(o, <bytes>PyTuple_GET_ITEM(pieces, 1))
    o = _decimal(o, <unsigned long long>counter)
    o = _copy(o, <bytes>PyTuple_GET_ITEM(pieces, 2))
    o = _decimal(o, <unsigned long long>tx_type)
    o[0] = b","
    o = _decimal(o + 1, <unsigned long long>counter)
    o[0], o[1] = b",", b'"'
    o = _hex(o + 2, mac2, PURCHASE_MAC_BYTES)
    memcpy(o, b'","', 3)
    o = _hex(o + 3, tac, PURCHASE_MAC_BYTES)
    o = _copy(o, <bytes>PyTuple_GET_ITEM(pieces, 3))
    o = _hex(o, rec, DETAIL_RECORD_BYTES)
    o = _copy(o, <bytes>PyTuple_GET_ITEM(pieces, 4))
    cdef unsigned long crc = crc32(0, <const unsigned char *>payload, <unsigned int>(o - payload))
    snprintf(line, 9, b"%08lx", crc)
    line[8] = b" "
    o[0] = b"\n"
    return PyBytes_FromStringAndSize(line, o + 1 - line)


# -- the SAM: SoftSam.init_for_purchase and check_mac2 -------------------------------------------------------
# Imported when first used: sam.py and flows.py import purse, which imports this module.

cdef object _sam = None
cdef object _PURCHASE_USAGE = None


cdef object _sam_module():
    global _sam, _PURCHASE_USAGE
    if _sam is None:
        from . import sam
        from .keys import KeyUsage
        _sam, _PURCHASE_USAGE = sam, KeyUsage.PURCHASE
    return _sam


def sam_init_for_purchase(sam, request):
    """SoftSam.init_for_purchase. A request of unusual types or sizes goes to the Python method whole, so
    it fails (or not) exactly as there; the usual one is checked and served here in the same order."""
    module = _sam_module()
    card_random, offline_counter, amount_fen, tx_type, date_time, key_version, algorithm, app_serial = request
    terminal_id = sam.terminal_id
    if not (type(card_random) is bytes and PyBytes_GET_SIZE(card_random) == 4 and type(offline_counter) is int
            and 0 <= offline_counter <= 0xFFFF and type(amount_fen) is int and 0 <= amount_fen <= 0xFFFFFFFF
            and type(tx_type) is int and 0 <= tx_type <= 0xFF and type(date_time) is bytes
            and PyBytes_GET_SIZE(date_time) == DATE_TIME_BYTES and type(terminal_id) is bytes
            and PyBytes_GET_SIZE(terminal_id) == TERMINAL_ID_BYTES):
        return sam.py_init_for_purchase(request)
    master = sam._keys.get("purse", _PURCHASE_USAGE)
    if key_version != master.version or algorithm != 0x00:
        raise module.SamError(f"no purchase key of version {key_version:02X}, algorithm {algorithm:02X}")
    if tx_type != PURCHASE_ED and tx_type != PURCHASE_EP and tx_type != CAPP:
        raise module.SamError(f"transaction type {tx_type:02X} is not a purchase")
    seq = sam._next_seq
    if seq > 0xFFFFFFFF:
        raise module.SamError("terminal transaction numbers exhausted")
    sam._next_seq = seq + 1
    cdef unsigned char block[8]
    memcpy(block, PyBytes_AS_STRING(card_random), 4)
    _put_be(block + 4, offline_counter, 2)
    _put_be(block + 6, seq & 0xFFFF, 2)
    sam._session = None  # dropped first, as in Python: a failure below never leaves it on the new key
    card_cipher = sam._card_ciphers.get((master.version, app_serial if type(app_serial) is bytes else bytes(app_serial)))
    if card_cipher is None or sam._card_cipher_master is not master:
        card_cipher = sam._purchase_key_cipher(master, app_serial)
    session_key8 = card_cipher.session_key(PyBytes_FromStringAndSize(<char *>block, 8))
    session = sam._session_cipher
    if session is None:
        session = sam._session_cipher = module.DesCipher(session_key8)
    else:
        session.rekey(session_key8)
    cdef unsigned char mac_input[MAC1_INPUT_BYTES]
    _put_be(mac_input, amount_fen, 4)
    mac_input[4] = tx_type
    memcpy(mac_input + 5, PyBytes_AS_STRING(terminal_id), TERMINAL_ID_BYTES)
    memcpy(mac_input + 11, PyBytes_AS_STRING(date_time), DATE_TIME_BYTES)
    mac1 = session.mac(PyBytes_FromStringAndSize(<char *>mac_input, MAC1_INPUT_BYTES))
    sam._session = module._Session(session, amount_fen)
    return _new_tuple(module.PurchaseAuthorization, (seq, mac1))


def sam_check_mac2(sam, mac2):
    """SoftSam.check_mac2: the card's MAC2 proves it debited; raises SamMacError if not."""
    module = _sam_module()
    session, sam._session = sam._session, None
    if session is None:
        raise module.SamError("no purchase session to check MAC2 against")
    amount_fen = session.amount_fen
    if type(mac2) is not bytes or type(amount_fen) is not int or not 0 <= amount_fen <= 0xFFFFFFFF:
        if not module.macs_equal(session.key.mac(module._u32(amount_fen)), mac2):
            raise module.SamMacError("MAC2 from the card does not verify")
        return
    cdef unsigned char amount[4]
    _put_be(amount, amount_fen, 4)
    if not _macs_equal(session.key.mac(PyBytes_FromStringAndSize(<char *>amount, 4)), mac2):
        raise module.SamMacError("MAC2 from the card does not verify")


# -- the terminal: CardChannel.send and Terminal.purchase ------------------------------------------------------


cdef object _Apdu = None
cdef object _Response = None
cdef object _check = None
cdef object _PurchaseInit = None
cdef object _PurchaseRequest = None
cdef object _TransportError = None
cdef object _PendingPurchase = None
cdef object _PurchaseInterrupted = None
cdef object _PurchaseReceipt = None
cdef object _debit_apdu = None


cdef void _terminal_names() except *:
    global _Apdu, _Response, _check, _PurchaseInit, _PurchaseRequest, _TransportError, _PendingPurchase
    global _PurchaseInterrupted, _PurchaseReceipt, _debit_apdu
    if _PurchaseReceipt is not None:
        return
    from . import flows
    from .channel import Apdu, Response
    from .sw import check
    _Apdu, _Response, _check, _PurchaseInit = Apdu, Response, check, flows.PurchaseInit
    _PurchaseRequest, _TransportError, _PendingPurchase = flows.PurchaseRequest, flows.TransportError, flows.PendingPurchase
    _PurchaseInterrupted, _debit_apdu = flows.PurchaseInterrupted, flows.cmd.debit_for_purchase
    _PurchaseReceipt = flows.PurchaseReceipt


def channel_send(channel, apdu):
    """CardChannel.send without observers (a traced channel runs the Python method): transmit, check the
    status word, return data and SW."""
    if channel.observers:
        return channel.py_send(apdu)
    _terminal_names()
    raw = channel.transport.transmit(apdu[1])  # Apdu.raw
    cdef Py_ssize_t n = len(raw)
    if type(raw) is not bytes or n < 2:  # as in Python, whatever the transport gave
        split = max(n - 2, 0)  # raw[-2:] and raw[:-2] (this module is compiled without wraparound)
        sw = int.from_bytes(raw[split:], "big")
        if sw != 0x9000:
            _check(sw, apdu[0])
        return _new_tuple(_Response, (raw[:split], sw))
    cdef const unsigned char *r = <const unsigned char *>PyBytes_AS_STRING(raw)
    cdef int status = (r[n - 2] << 8) | r[n - 1]
    if status != 0x9000:  # anything but 90 00 goes through the checker chain
        _check(status, apdu[0])
    return _new_tuple(_Response, (PyBytes_FromStringAndSize(<char *>r, n - 2), status))


def terminal_purchase(terminal, amount_fen, purse=EP):
    """Terminal.purchase: SELECT, INITIALIZE FOR PURCHASE, DEBIT FOR PURCHASE, the SAM's MAC1 and MAC2 work.
    An amount, purse or terminal id out of the usual goes to the Python method whole (same errors)."""
    _terminal_names()
    sam = terminal.sam
    terminal_id = sam.terminal_id
    if not (type(amount_fen) is int and 0 <= amount_fen <= 0x7FFFFFFF and type(purse) is int and 0 <= purse <= 0xFF
            and type(terminal_id) is bytes and PyBytes_GET_SIZE(terminal_id) == TERMINAL_ID_BYTES):
        return terminal.py_purchase(amount_fen, purse)
    public = terminal.select_purse()
    cdef int tx_type = PURCHASE_ED if purse == ED else PURCHASE_EP
    cdef unsigned char init[17]  # 80 50 01 P2 0B key index || amount || terminal id, Le 0F
    init[0], init[1], init[2], init[3], init[4], init[5] = 0x80, 0x50, 0x01, purse, 0x0B, 0x01
    _put_be(init + 6, amount_fen, 4)
    memcpy(init + 10, PyBytes_AS_STRING(terminal_id), TERMINAL_ID_BYTES)
    init[16] = 0x0F
    channel = terminal.channel
    apdu = _new_tuple(_Apdu, ("INITIALIZE FOR PURCHASE", PyBytes_FromStringAndSize(<char *>init, 17), False))
    data = channel.send(apdu).data
    if type(data) is not bytes or PyBytes_GET_SIZE(data) != INIT_ANSWER_BYTES:
        _PurchaseInit.parse(data)  # raises its ResponseFormatError
    cdef const unsigned char *d = <const unsigned char *>PyBytes_AS_STRING(data)
    balance_fen = _get_be(d, 4)
    offline_counter = _get_be(d + 4, 2)
    card_random = PyBytes_FromStringAndSize(<char *>d + 11, 4)
    date_time = terminal._date_time()
    auth = sam.init_for_purchase(_new_tuple(_PurchaseRequest, (
        card_random, offline_counter, amount_fen, tx_type, date_time, d[9], d[10], public.app_serial)))
    terminal_seq, mac1 = auth.terminal_seq, auth.mac1
    cdef unsigned char debit[21]  # 80 54 01 00 0F seq || date time || MAC1, Le 08
    if (type(terminal_seq) is int and 0 <= terminal_seq <= 0xFFFFFFFF and type(date_time) is bytes
            and type(mac1) is bytes and PyBytes_GET_SIZE(date_time) + PyBytes_GET_SIZE(mac1) == 11):
        debit[0], debit[1], debit[2], debit[3], debit[4] = 0x80, 0x54, 0x01, 0x00, 0x0F
        _put_be(debit + 5, terminal_seq, 4)
        memcpy(debit + 9, PyBytes_AS_STRING(date_time), PyBytes_GET_SIZE(date_time))
        memcpy(debit + 9 + PyBytes_GET_SIZE(date_time), PyBytes_AS_STRING(mac1), PyBytes_GET_SIZE(mac1))
        debit[20] = 0x08
        apdu = _new_tuple(_Apdu, ("DEBIT FOR PURCHASE", PyBytes_FromStringAndSize(<char *>debit, 21), False))
    else:
        apdu = _debit_apdu(terminal_seq, date_time, mac1)
    try:
        answer = channel.send(apdu).data
    except _TransportError as exc:
        pending = _PendingPurchase(public.app_serial, purse, tx_type, amount_fen, balance_fen, offline_counter,
                                        sam.terminal_id, terminal_seq, date_time)
        raise _PurchaseInterrupted(pending, exc) from exc
    tac, mac2 = answer[0:4], answer[4:8]
    sam.check_mac2(mac2)
    return _new_tuple(_PurchaseReceipt, (public.app_serial, purse, tx_type, amount_fen, balance_fen,
                                              offline_counter, sam.terminal_id, terminal_seq, date_time, mac2, tac))
