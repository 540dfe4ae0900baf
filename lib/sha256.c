/* Streaming SHA-256 over OpenSSL's EVP interface. */
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <unistd.h>

struct sha256_ctx {
	EVP_MD_CTX *md;
};

sha256_ctx *sha256_new(void)
{
	sha256_ctx *c = malloc(sizeof *c);
	if (!c)
		return NULL;
	c->md = EVP_MD_CTX_new();
	if (!c->md || EVP_DigestInit_ex(c->md, EVP_sha256(), NULL) != 1) {
		EVP_MD_CTX_free(c->md);
		free(c);
		return NULL;
	}
	return c;
}

void sha256_update(sha256_ctx *c, const void *data, size_t len)
{
	EVP_DigestUpdate(c->md, data, len);
}

void sha256_final(sha256_ctx *c, uint8_t out[32])
{
	unsigned int n = 32;
	EVP_DigestFinal_ex(c->md, out, &n);
	/* Re-initialise so the same ctx can hash the next message. */
	EVP_DigestInit_ex(c->md, EVP_sha256(), NULL);
}

void sha256_free(sha256_ctx *c)
{
	if (!c)
		return;
	EVP_MD_CTX_free(c->md);
	free(c);
}

void sha256_hex(const uint8_t digest[32], char hex[65])
{
	static const char digits[] = "0123456789abcdef";
	for (int i = 0; i < 32; i++) {
		hex[2 * i] = digits[digest[i] >> 4];
		hex[2 * i + 1] = digits[digest[i] & 15];
	}
	hex[64] = '\0';
}

void sha256_buffer(const void *data, size_t len, uint8_t out[32])
{
	unsigned int n = 32;
	EVP_Digest(data, len, out, &n, EVP_sha256(), NULL);
}

int sha256_file(const char *path, uint8_t out[32], dsv3_error *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return dsv3_fail_errno(err, "cannot open %s", path);
	sha256_ctx *ctx = sha256_new();
	char *buf = malloc(1u << 20);
	int rc = ctx && buf ? 0 : dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	while (!rc) {
		ssize_t r = read(fd, buf, 1u << 20);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			rc = dsv3_fail_errno(err, "cannot read %s", path);
		if (r <= 0)
			break;
		sha256_update(ctx, buf, (size_t)r);
	}
	if (!rc)
		sha256_final(ctx, out);
	sha256_free(ctx);
	free(buf);
	close(fd);
	return rc;
}
