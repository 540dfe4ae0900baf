/* The DeepSeek-V3 tokenizer against Hugging Face `tokenizers`: golden/tokenizer_ids.txt holds the
 * ids that golden/make_tokenizer_ids.py got on the GPU machine for the committed corpus. Work in
 * progress: not in `make test` until that file is committed (rename to tests/test_tokenizer_hf.c).
 * Skips when the file is missing; fails when it was made from another corpus or tokenizer.json. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sha256.h"
#include "tokenizer.h"

#define TOK_DIR ".deps/tokenizer"
#define FIXTURES "tests/fixtures/tokenizer/"
#define HF_IDS "golden/tokenizer_ids.txt"

typedef struct {
	char *text;
	size_t len;
} text_case;

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	size_t cap = 0, n = 0, r;
	if (!f)
		return NULL;
	do {
		if (n + 4096 + 1 > cap) {
			cap = 2 * cap + 8192;
			buf = realloc(buf, cap);
			assert_non_null(buf);
		}
		r = fread(buf + n, 1, 4096, f);
		n += r;
	} while (r > 0);
	fclose(f);
	buf[n] = 0;
	*len = n;
	return buf;
}

static size_t put_utf8(char *o, uint32_t cp)
{
	if (cp < 0x80)
		return o[0] = (char)cp, 1;
	if (cp < 0x800)
		return o[0] = (char)(0xC0 | cp >> 6), o[1] = (char)(0x80 | (cp & 0x3F)), 2;
	if (cp < 0x10000)
		return o[0] = (char)(0xE0 | cp >> 12), o[1] = (char)(0x80 | (cp >> 6 & 0x3F)),
		       o[2] = (char)(0x80 | (cp & 0x3F)), 3;
	return o[0] = (char)(0xF0 | cp >> 18), o[1] = (char)(0x80 | (cp >> 12 & 0x3F)),
	       o[2] = (char)(0x80 | (cp >> 6 & 0x3F)), o[3] = (char)(0x80 | (cp & 0x3F)), 4;
}

/* The corpus escapes (see corpus.txt): \n \r \t \\ \u{HEX}; any other stays as written. */
static text_case unescape(const char *s, size_t n)
{
	text_case c = { malloc(n + 1), 0 };
	assert_non_null(c.text);
	for (size_t i = 0; i < n; i++) {
		char e = i + 1 < n ? s[i + 1] : 0;
		if (s[i] != '\\' || !e) {
			c.text[c.len++] = s[i];
		} else if (e == 'u' && i + 2 < n && s[i + 2] == '{') {
			char *end;
			c.len += put_utf8(c.text + c.len, (uint32_t)strtoul(s + i + 3, &end, 16));
			i = (size_t)(end - s);
		} else if (strchr("nrt\\", e)) {
			c.text[c.len++] = e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : '\\';
			i++;
		} else {
			c.text[c.len++] = s[i];
		}
	}
	c.text[c.len] = 0;
	return c;
}

/* The header line "# NAME sha256 HEX" must name the file's current SHA-256. */
static void check_header_hash(const char *ids, const char *name, const char *path)
{
	char want[128], hex[65];
	uint8_t d[32];
	size_t len;
	char *data = read_file(path, &len);
	assert_non_null(data);
	sha256_buffer(data, len, d);
	sha256_hex(d, hex);
	snprintf(want, sizeof want, "# %s sha256 %s\n", name, hex);
	if (!strstr(ids, want))
		fail_msg(HF_IDS " was made from another %s: run golden/make_tokenizer_ids.py again", name);
	free(data);
}

static void test_encode_matches_hf_tokenizers_on_corpus(void **state)
{
	(void)state;
	size_t len, clen, blen;
	char *ids = read_file(HF_IDS, &len);
	if (!ids)
		skip();
	check_header_hash(ids, "tokenizer.json", TOK_DIR "/tokenizer.json");
	check_header_hash(ids, "corpus.txt", FIXTURES "corpus.txt");
	check_header_hash(ids, "invalid_utf8.bin", FIXTURES "invalid_utf8.bin");

	dsv3_tokenizer *tok;
	dsv3_error err = { 0 };
	assert_int_equal(tokenizer_open(&tok, TOK_DIR, &err), DSV3_OK);
	char *corpus = read_file(FIXTURES "corpus.txt", &clen), *p = corpus, *line = ids;
	size_t bad = 0, n_cases = 0;
	int last = 0;
	assert_non_null(corpus);
	while (!last) {
		text_case c;
		char *nl = memchr(p, '\n', (size_t)(corpus + clen - p));
		size_t l = nl ? (size_t)(nl - p) : (size_t)(corpus + clen - p);
		if (p >= corpus + clen) { /* the corpus is done: the binary file is the last case */
			c.text = read_file(FIXTURES "invalid_utf8.bin", &blen);
			assert_non_null(c.text);
			c.len = blen;
			last = 1;
		} else {
			char *start = p;
			p += l + 1;
			if (!l || start[0] == '#')
				continue;
			c = unescape(start, l);
		}
		while (*line == '#')
			line = strchr(line, '\n') + 1;
		char *end_line = strchr(line, '\n');
		assert_non_null(end_line);
		*end_line = 0;
		int32_t *got;
		size_t ng, nw = 0;
		assert_int_equal(tokenizer_encode(tok, c.text, c.len, 0, &got, &ng, &err), DSV3_OK);
		char *q = line, *e;
		int same = 1;
		for (long v; (v = strtol(q, &e, 10)), e != q; q = e, nw++)
			same = same && nw < ng && got[nw] == v;
		if (!same || nw != ng) {
			fprintf(stderr, "case %zu differs: \"%s\"\n  hf  : %s\n  ours:", n_cases, c.text, line);
			for (size_t i = 0; i < ng; i++)
				fprintf(stderr, " %d", (int)got[i]);
			fprintf(stderr, "\n");
			bad++;
		}
		line = end_line + 1;
		n_cases++;
		free(got);
		free(c.text);
	}
	assert_int_equal(*line, 0); /* as many id lines as cases */
	assert_int_equal(bad, 0);
	free(corpus);
	free(ids);
	tokenizer_close(tok);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_encode_matches_hf_tokenizers_on_corpus),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
