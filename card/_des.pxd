# C-level declarations of the compiled DES core (card/_des.pyx): the slice of libcrypto's EVP API it
# uses, and the cipher object. Only card/crypto.py imports the module.

# Single DES (8-byte keys: session, TAC and PIN reload keys) runs on libcrypto's low-level DES API: a
# key schedule set in ~0.1 µs and ~0.05 µs a block, where an EVP context costs ~0.4 µs to key and
# ~0.3 µs a block. OpenSSL 3 marks that API deprecated but builds and exports it (apps/bus/_tac.pxd
# uses it the same way); the define keeps this module's build warning-free and comes before any header.
cdef extern from *:
    """
    #define OPENSSL_SUPPRESS_DEPRECATED 1
    """

cdef extern from "openssl/des.h" nogil:
    ctypedef unsigned int DES_LONG
    ctypedef unsigned char const_DES_cblock[8]
    ctypedef struct DES_key_schedule:
        pass

    int DES_ENCRYPT
    void DES_set_key_unchecked(const_DES_cblock *key, DES_key_schedule *schedule)
    # The block as two DES_LONGs loaded little-endian from its 8 bytes (des.h's c2l), result the same way.
    void DES_encrypt1(DES_LONG *data, DES_key_schedule *ks, int enc)

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct OSSL_LIB_CTX:
        pass
    ctypedef struct ENGINE:
        pass

    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    EVP_CIPHER *EVP_CIPHER_fetch(OSSL_LIB_CTX *libctx, const char *algorithm, const char *properties)
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *data, int inl)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int padding)

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void *ptr, size_t len)


cdef class DesCipher:
    cdef EVP_CIPHER_CTX *_ctx  # 16-byte keys
    cdef DES_key_schedule _schedule  # 8-byte keys
    cdef readonly int key_bytes

    cdef int _set_key(self, const unsigned char *key, Py_ssize_t key_len) except -1
    cdef int _ecb(self, const unsigned char *data, unsigned char *out, Py_ssize_t length) except -1
    cdef bytes _ecb_bytes(self, bytes data)
