# C-level declarations of the compiled clearing pass (apps/bus/_tac.pyx): the slice of
# libcrypto's low-level DES API it uses. Only apps/bus/tac.py imports the module.
#
# OpenSSL 3 marks this API deprecated but still builds and exports it (Debian's libcrypto3 does); it
# is the only libcrypto entry that takes a precomputed key schedule and one block per call, which a
# per-record TAC check needs (EVP would cost a context re-key per record, ~1 us). setup.py defines
# OPENSSL_SUPPRESS_DEPRECATED for this extension so the build stays warning-free.

cdef extern from "openssl/des.h" nogil:
    ctypedef unsigned int DES_LONG
    ctypedef unsigned char DES_cblock[8]
    ctypedef unsigned char const_DES_cblock[8]
    ctypedef struct DES_key_schedule:
        pass

    int DES_ENCRYPT
    void DES_set_key_unchecked(const_DES_cblock *key, DES_key_schedule *schedule)
    # Both take the block as two DES_LONGs loaded little-endian from its 8 bytes (des.h's c2l), and
    # leave the result in the same form.
    void DES_encrypt1(DES_LONG *data, DES_key_schedule *ks, int enc)
    void DES_encrypt3(DES_LONG *data, DES_key_schedule *ks1, DES_key_schedule *ks2, DES_key_schedule *ks3)

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void *ptr, size_t len)
