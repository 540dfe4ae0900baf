/* Streaming SHA-256 over OpenSSL EVP. */
#ifndef DSV3_SHA256_H
#define DSV3_SHA256_H
#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct sha256_ctx sha256_ctx; /* wraps EVP_MD_CTX */

sha256_ctx *sha256_new(void); /* NULL on allocation failure */
void sha256_update(sha256_ctx *c, const void *data, size_t len);
void sha256_final(sha256_ctx *c, uint8_t out[32]); /* the ctx may be reused after final */
void sha256_free(sha256_ctx *c);
void sha256_hex(const uint8_t digest[32], char hex[65]); /* lowercase, NUL-terminated */
void sha256_buffer(const void *data, size_t len, uint8_t out[32]);
/* The SHA-256 of a whole file, read 1 MiB at a time; DSV3_EIO naming it on failure. */
int sha256_file(const char *path, uint8_t out[32], dsv3_error *err);

#endif
