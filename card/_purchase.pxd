# C-level declarations of the compiled purchase path (card/_purchase.pyx). Only card/purse.py,
# card/sam.py, card/flows.py and card/apdu.py import the module, each choosing it over its own
# Python code at import time (CITYCARD_NO_EXTENSIONS=1 keeps the Python code).

cdef extern from "zlib.h" nogil:
    # The journal line's checksum: zlib.crc32 is this function (the same bytes in, the same number out).
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int length)

cdef enum:
    PURCHASE_MAC_BYTES = 4
    DATE_TIME_BYTES = 7
    TERMINAL_ID_BYTES = 6
    DETAIL_RECORD_BYTES = 23
    INIT_DATA_BYTES = 11  # key index (1) || amount (4) || terminal id (6)
    INIT_ANSWER_BYTES = 15  # balance (4) || counter (2) || overdraft (3) || key version, algorithm || random (4)
    DEBIT_DATA_BYTES = 15  # terminal txn seq (4) || date (4) || time (3) || MAC1 (4)
    MAC1_INPUT_BYTES = 18  # amount (4) || tx type || terminal id (6) || date time (7)
    TAC_INPUT_BYTES = 22  # amount (4) || tx type || terminal id (6) || terminal seq (4) || date time (7)
    JOURNAL_LINE_BYTES_MAX = 1024  # a purchase's line is ~0.22 KB; the pointers are checked to fit
