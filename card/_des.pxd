# C-level declarations of the compiled DES core (card/_des.pyx): the slice of libcrypto's EVP API it
# uses, and the cipher object. Only card/crypto.py imports the module.

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
    cdef EVP_CIPHER_CTX *_ctx
    cdef readonly int key_bytes

    cdef int _set_key(self, const unsigned char *key, Py_ssize_t key_len) except -1
    cdef int _ecb(self, const unsigned char *data, unsigned char *out, Py_ssize_t length) except -1
    cdef bytes _ecb_bytes(self, bytes data)
