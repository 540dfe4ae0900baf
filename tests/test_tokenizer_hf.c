/* The DeepSeek-V3 tokenizer against Hugging Face `tokenizers`: golden/tokenizer_ids.txt holds the
 * ids that golden/make_tokenizer_ids.py got on the GPU machine (tokenizers 0.23.2) for the
 * committed corpus: corpus.txt, invalid_utf8.bin, then hf_only.txt (whitespace the JS reference
 * of test_tokenizer.c reads differently). Fails when the ids were made from another corpus or
 * tokenizer.json, or when the file is missing. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sha256.h"
#include "support/test_support.h"
#include "support/text_corpus.h"
#include "tokenizer.h"

#define TOK_DIR ".deps/tokenizer"
#define FIXTURES "tests/fixtures/tokenizer/"
#define HF_IDS "golden/tokenizer_ids.txt"



/* The header line "# NAME sha256 HEX" must name the file's current SHA-256. */
static void check_header_hash(const char *ids, const char *name, const char *path)
{
	char want[128], hex[65];
	uint8_t d[32];
	size_t len;
	char *data = read_whole_file(path, &len);
	assert_non_null(data);
	sha256_buffer(data, len, d);
	sha256_hex(d, hex);
	snprintf(want, sizeof want, "# %s sha256 %s\n", name, hex);
	if (!strstr(ids, want))
		fail_msg(HF_IDS " was made from another %s: run golden/make_tokenizer_ids.py again", name);
	free(data);
}

typedef struct {
	text_case *v;
	size_t n, cap;
} case_list;

static void case_push(case_list *l, text_case c)
{
	if (l->n == l->cap) {
		l->cap = l->cap ? 2 * l->cap : 128;
		l->v = realloc(l->v, l->cap * sizeof *l->v);
		assert_non_null(l->v);
	}
	l->v[l->n++] = c;
}

static void read_escaped_lines(const char *path, case_list *l)
{
	size_t len;
	char *all = read_whole_file(path, &len), *p = all;
	assert_non_null(all);
	while (p < all + len) {
		char *nl = memchr(p, '\n', (size_t)(all + len - p));
		size_t n = nl ? (size_t)(nl - p) : (size_t)(all + len - p);
		if (n && p[0] != '#')
			case_push(l, corpus_unescape(p, n));
		p += n + 1;
	}
	free(all);
}

/* In the order of make_tokenizer_ids.py: corpus.txt, the raw binary file, hf_only.txt. */
static case_list read_cases(void)
{
	case_list l = { 0 };
	text_case bin;
	read_escaped_lines(FIXTURES "corpus.txt", &l);
	bin.text = read_whole_file(FIXTURES "invalid_utf8.bin", &bin.len);
	assert_non_null(bin.text);
	case_push(&l, bin);
	read_escaped_lines(FIXTURES "hf_only.txt", &l);
	return l;
}

static void test_encode_matches_hf_tokenizers_on_corpus(void **state)
{
	(void)state;
	size_t len, bad = 0;
	char *ids = read_whole_file(HF_IDS, &len), *line;
	if (!ids)
		fail_msg(HF_IDS " is missing: golden/make_tokenizer_ids.py writes it");
	check_header_hash(ids, "tokenizer.json", TOK_DIR "/tokenizer.json");
	check_header_hash(ids, "corpus.txt", FIXTURES "corpus.txt");
	check_header_hash(ids, "invalid_utf8.bin", FIXTURES "invalid_utf8.bin");
	check_header_hash(ids, "hf_only.txt", FIXTURES "hf_only.txt");

	dsv3_tokenizer *tok;
	dsv3_error err = { 0 };
	if (tokenizer_open(&tok, TOK_DIR, &err))
		fail_msg("%s (run `make deps`)", err.msg);
	case_list cases = read_cases();
	for (line = ids; *line == '#';)
		line = strchr(line, '\n') + 1;
	for (size_t k = 0; k < cases.n; k++) {
		char *end_line = strchr(line, '\n'), *q, *e;
		int32_t *got;
		size_t ng, nw = 0;
		int same = 1;
		assert_non_null(end_line);
		*end_line = 0;
		assert_int_equal(tokenizer_encode(tok, cases.v[k].text, cases.v[k].len, 0, &got, &ng, &err), DSV3_OK);
		for (q = line;; q = e, nw++) {
			long v = strtol(q, &e, 10);
			if (e == q)
				break;
			same = same && nw < ng && got[nw] == v;
		}
		if (!same || nw != ng) {
			fprintf(stderr, "case %zu differs: \"%s\"\n  hf  : %s\n  ours:", k, cases.v[k].text, line);
			for (size_t i = 0; i < ng; i++)
				fprintf(stderr, " %d", (int)got[i]);
			fprintf(stderr, "\n");
			bad++;
		}
		line = end_line + 1;
		free(got);
		free(cases.v[k].text);
	}
	assert_int_equal(*line, 0); /* as many id lines as cases */
	assert_int_equal(bad, 0);
	free(cases.v);
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
