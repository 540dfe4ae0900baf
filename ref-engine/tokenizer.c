/* DeepSeek-V3's byte-level BPE tokenizer (see tokenizer.h for the order of the steps). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SPLITS 8

typedef struct {
	char *content;
	size_t len;
	int32_t id;
	int normalized;
} added_token;

/* (left id, right id) -> rank and merged id, open addressing. */
typedef struct {
	uint64_t *keys; /* UINT64_MAX = empty */
	int32_t *rank;
	int32_t *merged;
	size_t mask;
} pair_map;

struct dsv3_tokenizer {
	int32_t n_ids;
	char **id_bytes; /* what each id decodes to */
	size_t *id_len;
	int32_t byte_id[256]; /* the single-byte token of each byte */
	pair_map merges;
	added_token *added;
	size_t n_added;
	/* Where an added token may start, so that most positions need no comparison: the first
	 * byte of one-byte tokens, and a bit per first two bytes of the others. */
	unsigned char added_single[256];
	uint8_t added_pair[65536 / 8];
	pcre2_code *splits[MAX_SPLITS];
	size_t n_splits;
	int32_t bos, eos;
	int add_bos;
};

/* ---- UTF-8 ---- */

enum utf8_status { UTF8_VALID, UTF8_INVALID, UTF8_TRUNCATED };

/* Classifies the sequence at s (n > 0 bytes left) by Unicode's table of well-formed UTF-8
 * (Table 3-7): VALID with *len its length, INVALID with *len the maximal ill-formed subpart
 * (one U+FFFD each), or TRUNCATED when the n bytes are a proper prefix of a valid sequence. */
static enum utf8_status utf8_classify(const unsigned char *s, size_t n, size_t *len)
{
	unsigned char c = s[0], lo = 0x80, hi = 0xBF;
	size_t need;

	if (c < 0x80) {
		*len = 1;
		return UTF8_VALID;
	}
	if (c >= 0xC2 && c <= 0xDF)
		need = 1;
	else if (c == 0xE0)
		need = 2, lo = 0xA0;
	else if (c == 0xED)
		need = 2, hi = 0x9F;
	else if (c >= 0xE1 && c <= 0xEF)
		need = 2;
	else if (c == 0xF0)
		need = 3, lo = 0x90;
	else if (c == 0xF4)
		need = 3, hi = 0x8F;
	else if (c >= 0xF1 && c <= 0xF3)
		need = 3;
	else {
		*len = 1;
		return UTF8_INVALID;
	}
	for (size_t i = 1; i <= need; i++) {
		if (i >= n) {
			*len = i;
			return UTF8_TRUNCATED;
		}
		if (s[i] < lo || s[i] > hi) {
			*len = i;
			return UTF8_INVALID;
		}
		lo = 0x80, hi = 0xBF;
	}
	*len = need + 1;
	return UTF8_VALID;
}

static const char replacement_char[] = "\xEF\xBF\xBD";

char *utf8_replace_invalid(const char *in, size_t len, size_t *out_len)
{
	const unsigned char *s = (const unsigned char *)in;
	char *out = malloc(len * 3 + 1); /* each bad byte becomes at most 3 */
	size_t o = 0, i = 0;

	if (!out)
		return NULL;
	while (i < len) {
		size_t n;
		if (utf8_classify(s + i, len - i, &n) == UTF8_VALID) {
			memcpy(out + o, s + i, n);
			o += n;
		} else {
			memcpy(out + o, replacement_char, 3);
			o += 3;
		}
		i += n;
	}
	out[o] = 0;
	*out_len = o;
	return out;
}

/* ---- GPT-2's byte-to-unicode map ---- */

/* Printable Latin-1 bytes stand for themselves; the others take code points 256, 257, ... in
 * byte order, so that every token is printable text. */
static int byte_is_printable(int b)
{
	return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

static void byte_map_build(uint32_t byte_cp[256], int16_t cp_byte[324])
{
	int next = 256;
	for (int c = 0; c < 324; c++)
		cp_byte[c] = -1;
	for (int b = 0; b < 256; b++) {
		byte_cp[b] = byte_is_printable(b) ? (uint32_t)b : (uint32_t)next++;
		cp_byte[byte_cp[b]] = (int16_t)b;
	}
}

static size_t utf8_put(char *out, uint32_t cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | cp >> 6);
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	out[0] = (char)(0xE0 | cp >> 12);
	out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
	out[2] = (char)(0x80 | (cp & 0x3F));
	return 3;
}

/* Decodes one well-formed UTF-8 character at s (n bytes left); returns its length or 0. */
static size_t utf8_get(const unsigned char *s, size_t n, uint32_t *cp)
{
	size_t len;
	if (utf8_classify(s, n, &len) != UTF8_VALID)
		return 0;
	if (len == 1)
		*cp = s[0];
	else if (len == 2)
		*cp = (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
	else if (len == 3)
		*cp = (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
	else
		*cp = (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 |
		      (s[3] & 0x3F);
	return len;
}

/* What a token's text decodes to, as HF's ByteLevel decoder does: every character through the
 * reversed byte map, or, when one character is not in the map, the token's own UTF-8 bytes. */
static char *token_text_to_bytes(const char *text, const int16_t cp_byte[324], size_t *out_len)
{
	size_t n = strlen(text), o = 0;
	const unsigned char *s = (const unsigned char *)text;
	char *out = malloc(n + 1);

	if (!out)
		return NULL;
	for (size_t i = 0; i < n;) {
		uint32_t cp;
		size_t l = utf8_get(s + i, n - i, &cp);
		if (!l || cp >= 324 || cp_byte[cp] < 0) {
			memcpy(out, text, n);
			o = n;
			break;
		}
		out[o++] = (char)cp_byte[cp];
		i += l;
	}
	out[o] = 0;
	*out_len = o;
	return out;
}

/* ---- merges ---- */

static uint64_t pair_key(int32_t a, int32_t b)
{
	return (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
}

static size_t pair_slot(const pair_map *m, uint64_t key)
{
	size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 17) & m->mask;
	while (m->keys[i] != UINT64_MAX && m->keys[i] != key)
		i = (i + 1) & m->mask;
	return i;
}

static int pair_map_init(pair_map *m, size_t n)
{
	size_t cap = 1024;
	while (cap < 2 * n)
		cap *= 2;
	m->mask = cap - 1;
	m->keys = malloc(cap * sizeof *m->keys);
	m->rank = malloc(cap * sizeof *m->rank);
	m->merged = malloc(cap * sizeof *m->merged);
	if (!m->keys || !m->rank || !m->merged)
		return -1;
	memset(m->keys, 0xFF, cap * sizeof *m->keys);
	return 0;
}

static void pair_map_free(pair_map *m)
{
	free(m->keys);
	free(m->rank);
	free(m->merged);
}

/* The merge of (a, b): its rank, or -1 when the pair never merges. */
static int32_t pair_rank(const pair_map *m, int32_t a, int32_t b, int32_t *merged)
{
	size_t i = pair_slot(m, pair_key(a, b));
	if (m->keys[i] == UINT64_MAX)
		return -1;
	*merged = m->merged[i];
	return m->rank[i];
}

/* ---- loading ---- */

static int vocab_id(json_t *vocab, const char *text, size_t len, int32_t *id)
{
	char buf[512];
	json_t *v;
	if (len >= sizeof buf)
		return -1;
	memcpy(buf, text, len);
	buf[len] = 0;
	v = json_object_get(vocab, buf);
	if (!json_is_integer(v))
		return -1;
	*id = (int32_t)json_integer_value(v);
	return 0;
}

/* One merge is "left right" (older files) or ["left", "right"]. */
static int merge_parts(json_t *m, const char **l, size_t *ll, const char **r, size_t *rl)
{
	if (json_is_string(m)) {
		const char *s = json_string_value(m), *sp = strchr(s, ' ');
		if (!sp || strchr(sp + 1, ' '))
			return -1;
		*l = s, *ll = (size_t)(sp - s), *r = sp + 1, *rl = strlen(sp + 1);
		return 0;
	}
	if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
	    json_is_string(json_array_get(m, 1))) {
		*l = json_string_value(json_array_get(m, 0));
		*r = json_string_value(json_array_get(m, 1));
		*ll = strlen(*l), *rl = strlen(*r);
		return 0;
	}
	return -1;
}

static int load_merges(dsv3_tokenizer *tok, json_t *vocab, json_t *merges, const char *file, dsv3_error *err)
{
	size_t n = json_array_size(merges);
	char buf[1024];

	if (pair_map_init(&tok->merges, n))
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", file);
	for (size_t k = 0; k < n; k++) {
		const char *l, *r;
		size_t ll, rl;
		int32_t a, b, ab;
		if (merge_parts(json_array_get(merges, k), &l, &ll, &r, &rl) || ll + rl >= sizeof buf)
			return dsv3_fail(err, DSV3_EDATA, "%s: model.merges[%zu] is not a pair of tokens", file, k);
		memcpy(buf, l, ll);
		memcpy(buf + ll, r, rl);
		if (vocab_id(vocab, l, ll, &a) || vocab_id(vocab, r, rl, &b) || vocab_id(vocab, buf, ll + rl, &ab))
			return dsv3_fail(err, DSV3_EDATA, "%s: model.merges[%zu] names a token not in the vocab", file,
					 k);
		size_t i = pair_slot(&tok->merges, pair_key(a, b));
		if (tok->merges.keys[i] != UINT64_MAX)
			continue; /* a repeated merge keeps its first (lowest) rank */
		tok->merges.keys[i] = pair_key(a, b);
		tok->merges.rank[i] = (int32_t)k;
		tok->merges.merged[i] = ab;
	}
	return DSV3_OK;
}

static int set_id_text(dsv3_tokenizer *tok, int32_t id, const char *text, const int16_t cp_byte[324])
{
	free(tok->id_bytes[id]);
	tok->id_bytes[id] = token_text_to_bytes(text, cp_byte, &tok->id_len[id]);
	return tok->id_bytes[id] ? 0 : -1;
}

static int count_ids(json_t *vocab, json_t *added, const char *file, int32_t *n_ids, dsv3_error *err)
{
	const char *key;
	json_t *v;
	size_t i;
	json_int_t max = -1;

	json_object_foreach(vocab, key, v) {
		if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 0x7FFFFFF)
			return dsv3_fail(err, DSV3_EDATA, "%s: model.vocab[\"%s\"] is not a valid id", file, key);
		if (json_integer_value(v) > max)
			max = json_integer_value(v);
	}
	json_array_foreach(added, i, v) {
		json_t *id = json_object_get(v, "id");
		if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) > 0x7FFFFFF ||
		    !json_is_string(json_object_get(v, "content")))
			return dsv3_fail(err, DSV3_EDATA, "%s: added_tokens[%zu] has no valid id and content", file, i);
		if (json_integer_value(id) > max)
			max = json_integer_value(id);
	}
	*n_ids = (int32_t)(max + 1);
	return DSV3_OK;
}

static int load_vocab(dsv3_tokenizer *tok, json_t *vocab, const int16_t cp_byte[324], const uint32_t byte_cp[256],
		      const char *file, dsv3_error *err)
{
	const char *key;
	json_t *v;

	json_object_foreach(vocab, key, v) {
		if (set_id_text(tok, (int32_t)json_integer_value(v), key, cp_byte))
			return dsv3_fail(err, DSV3_EIO, "%s: out of memory", file);
	}
	for (int b = 0; b < 256; b++) {
		char one[4];
		size_t l = utf8_put(one, byte_cp[b]);
		if (vocab_id(vocab, one, l, &tok->byte_id[b]))
			return dsv3_fail(err, DSV3_EDATA, "%s: model.vocab has no token for byte 0x%02x", file, b);
	}
	return DSV3_OK;
}

static int load_added(dsv3_tokenizer *tok, json_t *added, const int16_t cp_byte[324], const char *file,
		      dsv3_error *err)
{
	size_t i;
	json_t *a;

	tok->added = calloc(json_array_size(added) + 1, sizeof *tok->added);
	if (!tok->added)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", file);
	json_array_foreach(added, i, a) {
		added_token *t = &tok->added[tok->n_added++];
		const char *content = json_string_value(json_object_get(a, "content"));
		if (json_is_true(json_object_get(a, "lstrip")) || json_is_true(json_object_get(a, "rstrip")) ||
		    json_is_true(json_object_get(a, "single_word")) || !*content)
			return dsv3_fail(err, DSV3_EDATA,
					 "%s: added_tokens[%zu]: lstrip, rstrip, single_word or empty content "
					 "are not supported",
					 file, i);
		t->content = strdup(content);
		t->len = strlen(content);
		t->id = (int32_t)json_integer_value(json_object_get(a, "id"));
		t->normalized = json_is_true(json_object_get(a, "normalized"));
		if (t->len == 1) {
			tok->added_single[(unsigned char)content[0]] = 1;
		} else {
			unsigned pair = (unsigned char)content[0] << 8 | (unsigned char)content[1];
			tok->added_pair[pair / 8] |= (uint8_t)(1u << (pair % 8));
		}
		if (!t->content || set_id_text(tok, t->id, content, cp_byte))
			return dsv3_fail(err, DSV3_EIO, "%s: out of memory", file);
	}
	return DSV3_OK;
}

/* The only normalizer this tokenizer has: none (null or an empty Sequence). */
static int check_normalizer(json_t *norm, const char *file, dsv3_error *err)
{
	if (json_is_null(norm) || !norm)
		return DSV3_OK;
	if (!strcmp(json_string_value(json_object_get(norm, "type")) ?: "", "Sequence") &&
	    json_array_size(json_object_get(norm, "normalizers")) == 0)
		return DSV3_OK;
	return dsv3_fail(err, DSV3_EDATA, "%s: a normalizer is not supported (DeepSeek-V3 has none)", file);
}

static int compile_split(dsv3_tokenizer *tok, json_t *split, const char *file, dsv3_error *err)
{
	json_t *pat = json_object_get(split, "pattern");
	const char *re = json_string_value(json_object_get(pat, "Regex"));
	const char *lit = json_string_value(json_object_get(pat, "String"));
	const char *behavior = json_string_value(json_object_get(split, "behavior"));
	int code;
	PCRE2_SIZE at;

	if ((!re && !lit) || !behavior || strcmp(behavior, "Isolated") ||
	    json_is_true(json_object_get(split, "invert")) || tok->n_splits == MAX_SPLITS)
		return dsv3_fail(err, DSV3_EDATA, "%s: pre_tokenizer: only Split with behavior Isolated is supported",
				 file);
	tok->splits[tok->n_splits] = pcre2_compile((PCRE2_SPTR)(re ? re : lit), PCRE2_ZERO_TERMINATED,
						   PCRE2_UTF | PCRE2_UCP | (re ? 0 : PCRE2_LITERAL), &code, &at, NULL);
	if (!tok->splits[tok->n_splits]) {
		PCRE2_UCHAR msg[256];
		pcre2_get_error_message(code, msg, sizeof msg);
		return dsv3_fail(err, DSV3_EDATA, "%s: pre_tokenizer pattern %zu: %s at offset %zu", file,
				 tok->n_splits, (char *)msg, (size_t)at);
	}
	pcre2_jit_compile(tok->splits[tok->n_splits++], PCRE2_JIT_COMPLETE); /* optional: speed */
	return DSV3_OK;
}

/* Sequence[Split..., ByteLevel(add_prefix_space false, use_regex false)], as DeepSeek-V3's. */
static int load_pre_tokenizer(dsv3_tokenizer *tok, json_t *pre, const char *file, dsv3_error *err)
{
	json_t *list = json_object_get(pre, "pretokenizers");
	size_t n = json_array_size(list);
	const char *type = json_string_value(json_object_get(pre, "type"));

	if (!type || strcmp(type, "Sequence") || n == 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: pre_tokenizer must be a Sequence ending in ByteLevel", file);
	for (size_t i = 0; i + 1 < n; i++) {
		json_t *p = json_array_get(list, i);
		if (strcmp(json_string_value(json_object_get(p, "type")) ?: "", "Split"))
			return dsv3_fail(err, DSV3_EDATA, "%s: pre_tokenizer %zu: only Split is supported", file, i);
		int rc = compile_split(tok, p, file, err);
		if (rc)
			return rc;
	}
	json_t *bl = json_array_get(list, n - 1);
	if (strcmp(json_string_value(json_object_get(bl, "type")) ?: "", "ByteLevel") ||
	    json_is_true(json_object_get(bl, "add_prefix_space")) || json_is_true(json_object_get(bl, "use_regex")))
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: pre_tokenizer must end in ByteLevel without prefix space and regex", file);
	return DSV3_OK;
}

static int check_model(json_t *model, const char *file, dsv3_error *err)
{
	const char *type = json_string_value(json_object_get(model, "type"));
	if (!type || strcmp(type, "BPE") || !json_is_object(json_object_get(model, "vocab")) ||
	    !json_is_array(json_object_get(model, "merges")))
		return dsv3_fail(err, DSV3_EDATA, "%s: model is not a BPE with vocab and merges", file);
	if (json_is_true(json_object_get(model, "byte_fallback")) || json_is_true(json_object_get(model, "ignore_merges")) ||
	    json_is_string(json_object_get(model, "continuing_subword_prefix")) ||
	    json_is_string(json_object_get(model, "end_of_word_suffix")) ||
	    (json_object_get(model, "dropout") && !json_is_null(json_object_get(model, "dropout"))))
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: BPE options byte_fallback, ignore_merges, prefixes, suffixes and dropout are "
				 "not supported",
				 file);
	return DSV3_OK;
}

static int load_tokenizer_json(dsv3_tokenizer *tok, const char *file, dsv3_error *err)
{
	json_error_t jerr;
	json_t *root = json_load_file(file, 0, &jerr);
	int16_t cp_byte[324];
	uint32_t byte_cp[256];
	int rc;

	if (!root && access(file, R_OK))
		return dsv3_fail_errno(err, "%s: cannot read", file);
	if (!root)
		return dsv3_fail(err, DSV3_EDATA, "%s: line %d: %s", file, jerr.line, jerr.text);
	json_t *model = json_object_get(root, "model"), *added = json_object_get(root, "added_tokens");
	json_t *vocab = json_object_get(model, "vocab");
	byte_map_build(byte_cp, cp_byte);
	rc = check_model(model, file, err);
	if (!rc)
		rc = check_normalizer(json_object_get(root, "normalizer"), file, err);
	if (!rc)
		rc = load_pre_tokenizer(tok, json_object_get(root, "pre_tokenizer"), file, err);
	if (!rc)
		rc = count_ids(vocab, added, file, &tok->n_ids, err);
	if (!rc) {
		tok->id_bytes = calloc((size_t)tok->n_ids, sizeof *tok->id_bytes);
		tok->id_len = calloc((size_t)tok->n_ids, sizeof *tok->id_len);
		if (!tok->id_bytes || !tok->id_len)
			rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", file);
	}
	if (!rc)
		rc = load_vocab(tok, vocab, cp_byte, byte_cp, file, err);
	if (!rc)
		rc = load_added(tok, added, cp_byte, file, err);
	if (!rc)
		rc = load_merges(tok, vocab, json_object_get(model, "merges"), file, err);
	json_decref(root);
	return rc;
}

/* A token of tokenizer_config.json ("bos_token": "..." or {"content": "..."}) as an id. */
static int config_token_id(const dsv3_tokenizer *tok, json_t *cfg, const char *key, int32_t *id)
{
	json_t *v = json_object_get(cfg, key);
	const char *content = json_is_string(v) ? json_string_value(v) : json_string_value(json_object_get(v, "content"));
	*id = -1;
	if (!content)
		return -1;
	for (size_t i = 0; i < tok->n_added; i++)
		if (!strcmp(tok->added[i].content, content)) {
			*id = tok->added[i].id;
			return 0;
		}
	return -1;
}

static int load_config(dsv3_tokenizer *tok, const char *file, dsv3_error *err)
{
	json_error_t jerr;
	json_t *cfg = json_load_file(file, 0, &jerr);

	if (!cfg && access(file, R_OK))
		return dsv3_fail_errno(err, "%s: cannot read", file);
	if (!cfg)
		return dsv3_fail(err, DSV3_EDATA, "%s: line %d: %s", file, jerr.line, jerr.text);
	tok->add_bos = json_is_true(json_object_get(cfg, "add_bos_token"));
	int bad = config_token_id(tok, cfg, "bos_token", &tok->bos) || config_token_id(tok, cfg, "eos_token", &tok->eos);
	json_decref(cfg);
	if (bad)
		return dsv3_fail(err, DSV3_EDATA, "%s: bos_token or eos_token is missing or not an added token", file);
	return DSV3_OK;
}

int tokenizer_open(dsv3_tokenizer **out, const char *dir, dsv3_error *err)
{
	char path[4096];
	dsv3_tokenizer *tok = calloc(1, sizeof *tok);
	int rc;

	*out = NULL;
	if (!tok)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	snprintf(path, sizeof path, "%s/tokenizer.json", dir);
	rc = load_tokenizer_json(tok, path, err);
	if (!rc) {
		snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
		rc = load_config(tok, path, err);
	}
	if (rc) {
		tokenizer_close(tok);
		return rc;
	}
	*out = tok;
	return DSV3_OK;
}

void tokenizer_close(dsv3_tokenizer *tok)
{
	if (!tok)
		return;
	for (int32_t i = 0; tok->id_bytes && i < tok->n_ids; i++)
		free(tok->id_bytes[i]);
	free(tok->id_bytes);
	free(tok->id_len);
	for (size_t i = 0; i < tok->n_added; i++)
		free(tok->added[i].content);
	free(tok->added);
	for (size_t i = 0; i < tok->n_splits; i++)
		pcre2_code_free(tok->splits[i]);
	pair_map_free(&tok->merges);
	free(tok);
}

int32_t tokenizer_n_ids(const dsv3_tokenizer *tok)
{
	return tok->n_ids;
}

int32_t tokenizer_bos_id(const dsv3_tokenizer *tok)
{
	return tok->bos;
}

int32_t tokenizer_eos_id(const dsv3_tokenizer *tok)
{
	return tok->eos;
}

int tokenizer_adds_bos(const dsv3_tokenizer *tok)
{
	return tok->add_bos;
}

/* ---- encoding ---- */

typedef struct {
	int32_t *v;
	size_t n, cap;
} id_list;

static int id_push(id_list *l, int32_t id)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 256;
		int32_t *v = realloc(l->v, cap * sizeof *v);
		if (!v)
			return -1;
		l->v = v, l->cap = cap;
	}
	l->v[l->n++] = id;
	return 0;
}

typedef struct {
	size_t off, len;
} span;

typedef struct {
	span *v;
	size_t n, cap;
} span_list;

static int span_push(span_list *l, size_t off, size_t len)
{
	if (!len)
		return 0;
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 64;
		span *v = realloc(l->v, cap * sizeof *v);
		if (!v)
			return -1;
		l->v = v, l->cap = cap;
	}
	l->v[l->n++] = (span){ off, len };
	return 0;
}

/* A possible merge: the pair that starts at symbol pos, with its rank. */
typedef struct {
	int32_t rank;
	uint32_t pos;
} merge_cand;

static int cand_before(merge_cand a, merge_cand b)
{
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(merge_cand *h, size_t *n, merge_cand c)
{
	size_t i = (*n)++;
	while (i > 0 && cand_before(c, h[(i - 1) / 2])) {
		h[i] = h[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	h[i] = c;
}

static merge_cand heap_pop(merge_cand *h, size_t *n)
{
	merge_cand top = h[0], last = h[--*n];
	size_t i = 0;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= *n)
			break;
		if (c + 1 < *n && cand_before(h[c + 1], h[c]))
			c++;
		if (!cand_before(h[c], last))
			break;
		h[i] = h[c];
		i = c;
	}
	if (*n)
		h[i] = last;
	return top;
}

typedef struct {
	int32_t *sym;  /* token id of each symbol, -1 once merged into its left neighbour */
	int32_t *next; /* next live symbol, -1 at the end */
	int32_t *prev;
	merge_cand *heap;
	size_t n_heap;
} bpe_state;

static void push_pair(const dsv3_tokenizer *tok, bpe_state *b, int32_t i)
{
	int32_t merged, r;
	if (i < 0 || b->next[i] < 0)
		return;
	r = pair_rank(&tok->merges, b->sym[i], b->sym[b->next[i]], &merged);
	if (r >= 0)
		heap_push(b->heap, &b->n_heap, (merge_cand){ r, (uint32_t)i });
}

/* BPE inside one pre-token, as HF: start from its bytes and merge the lowest-ranked adjacent
 * pair (the leftmost among equals) until no pair merges. A heap of candidate pairs, checked
 * when taken (a pair may have changed since it was pushed): O(n log n) in the pre-token. */
static int bpe_word(const dsv3_tokenizer *tok, const unsigned char *s, size_t n, id_list *out)
{
	bpe_state b;
	int32_t *mem = malloc(n * 3 * sizeof(int32_t) + 3 * n * sizeof(merge_cand));
	int rc = 0;

	if (!mem)
		return -1;
	b.sym = mem, b.next = mem + n, b.prev = mem + 2 * n;
	b.heap = (merge_cand *)(mem + 3 * n), b.n_heap = 0;
	for (size_t i = 0; i < n; i++) {
		b.sym[i] = tok->byte_id[s[i]];
		b.prev[i] = (int32_t)i - 1;
		b.next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
	}
	for (size_t i = 0; i + 1 < n; i++)
		push_pair(tok, &b, (int32_t)i);
	while (b.n_heap) {
		merge_cand c = heap_pop(b.heap, &b.n_heap);
		int32_t i = (int32_t)c.pos, j = b.next[i], merged;
		if (b.sym[i] < 0 || j < 0 || pair_rank(&tok->merges, b.sym[i], b.sym[j], &merged) != c.rank)
			continue; /* stale: a rank names one pair, so an equal rank is the same pair */
		b.sym[i] = merged;
		b.sym[j] = -1;
		b.next[i] = b.next[j];
		if (b.next[j] >= 0)
			b.prev[b.next[j]] = i;
		push_pair(tok, &b, b.prev[i]);
		push_pair(tok, &b, i);
	}
	for (int32_t i = n ? 0 : -1; i >= 0 && !rc; i = b.next[i])
		rc = id_push(out, b.sym[i]);
	free(mem);
	return rc;
}

/* Split with behavior Isolated: every match and every gap between matches is a piece. The
 * piece is the regex's whole subject, as in HF (lookarounds see nothing outside it). */
static int split_isolated(const pcre2_code *re, pcre2_match_data *md, const char *text, span in, span_list *out)
{
	PCRE2_SPTR subject = (PCRE2_SPTR)(text + in.off);
	size_t pos = 0, prev = 0;

	while (pos <= in.len) {
		int rc = pcre2_match(re, subject, in.len, pos, PCRE2_NO_UTF_CHECK, md, NULL);
		if (rc == PCRE2_ERROR_NOMATCH)
			break;
		if (rc < 0)
			return -1;
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
		if (ov[1] == ov[0]) { /* an empty match splits nothing: step over one character */
			size_t l = 1;
			while (ov[0] + l < in.len && (subject[ov[0] + l] & 0xC0) == 0x80)
				l++;
			pos = ov[0] + l;
			continue;
		}
		if (span_push(out, in.off + prev, ov[0] - prev) || span_push(out, in.off + ov[0], ov[1] - ov[0]))
			return -1;
		prev = pos = ov[1];
	}
	return span_push(out, in.off + prev, in.len - prev);
}

/* Pre-tokenizes one piece of text between added tokens and appends the BPE ids of each pre-token. */
static int encode_plain(const dsv3_tokenizer *tok, const char *text, span piece, id_list *out)
{
	span_list cur = { 0 }, next = { 0 };
	int rc = span_push(&cur, piece.off, piece.len);

	for (size_t k = 0; k < tok->n_splits && !rc; k++) {
		pcre2_match_data *md = pcre2_match_data_create_from_pattern(tok->splits[k], NULL);
		next.n = 0;
		rc = md ? 0 : -1;
		for (size_t i = 0; i < cur.n && !rc; i++)
			rc = split_isolated(tok->splits[k], md, text, cur.v[i], &next);
		pcre2_match_data_free(md);
		span_list t = cur;
		cur = next, next = t;
	}
	for (size_t i = 0; i < cur.n && !rc; i++)
		rc = bpe_word(tok, (const unsigned char *)text + cur.v[i].off, cur.v[i].len, out);
	free(cur.v);
	free(next.v);
	return rc;
}

static int added_may_start(const dsv3_tokenizer *tok, const char *s, size_t left)
{
	unsigned pair = left >= 2 ? (unsigned char)s[0] << 8 | (unsigned char)s[1] : 0;
	return tok->added_single[(unsigned char)s[0]] || (left >= 2 && tok->added_pair[pair / 8] >> (pair % 8) & 1);
}

/* The leftmost, then longest, added token of the given kind in text[from, to). */
static const added_token *find_added(const dsv3_tokenizer *tok, const char *text, size_t from, size_t to,
				     int normalized, size_t *at)
{
	for (size_t p = from; p < to; p++) {
		const added_token *best = NULL;
		if (!added_may_start(tok, text + p, to - p))
			continue;
		for (size_t i = 0; i < tok->n_added; i++) {
			const added_token *t = &tok->added[i];
			if (t->normalized != normalized || t->content[0] != text[p] || t->len > to - p ||
			    (best && t->len <= best->len))
				continue;
			if (!memcmp(text + p, t->content, t->len))
				best = t;
		}
		if (best) {
			*at = p;
			return best;
		}
	}
	return NULL;
}

/* HF cuts out the added tokens that are not normalized first, then in what is left the
 * normalized ones (the normalizer is empty, so both see the raw text). */
static int encode_pass(const dsv3_tokenizer *tok, const char *text, span piece, int normalized, id_list *out)
{
	size_t pos = piece.off, end = piece.off + piece.len, at;
	const added_token *t;
	int rc = 0;

	while (!rc && (t = find_added(tok, text, pos, end, normalized, &at))) {
		span before = { pos, at - pos };
		if (before.len)
			rc = normalized ? encode_plain(tok, text, before, out) : encode_pass(tok, text, before, 1, out);
		if (!rc)
			rc = id_push(out, t->id);
		pos = at + t->len;
	}
	if (!rc && pos < end) {
		span rest = { pos, end - pos };
		rc = normalized ? encode_plain(tok, text, rest, out) : encode_pass(tok, text, rest, 1, out);
	}
	return rc;
}

int tokenizer_encode(const dsv3_tokenizer *tok, const char *text, size_t len, int add_bos, int32_t **ids,
		     size_t *n_ids, dsv3_error *err)
{
	size_t n;
	char *valid = utf8_replace_invalid(text, len, &n);
	id_list out = { 0 };
	int rc = valid ? 0 : -1;

	if (!rc && add_bos)
		rc = id_push(&out, tok->bos);
	if (!rc)
		rc = encode_pass(tok, valid, (span){ 0, n }, 0, &out);
	free(valid);
	if (rc) {
		free(out.v);
		return dsv3_fail(err, DSV3_EIO, "tokenizer: out of memory or regex failure");
	}
	*ids = out.v ? out.v : malloc(sizeof(int32_t));
	*n_ids = out.n;
	return DSV3_OK;
}

/* ---- decoding ---- */

const char *tokenizer_id_bytes(const dsv3_tokenizer *tok, int32_t id, size_t *len)
{
	if (id < 0 || id >= tok->n_ids || !tok->id_bytes[id])
		return NULL;
	*len = tok->id_len[id];
	return tok->id_bytes[id];
}

static int bytes_append(char **buf, size_t *len, size_t *cap, const void *p, size_t n)
{
	if (*len + n + 1 > *cap) {
		size_t c = *cap ? *cap : 64;
		while (c < *len + n + 1)
			c *= 2;
		char *b = realloc(*buf, c);
		if (!b)
			return -1;
		*buf = b, *cap = c;
	}
	memcpy(*buf + *len, p, n);
	*len += n;
	(*buf)[*len] = 0;
	return 0;
}

int tokenizer_decode(const dsv3_tokenizer *tok, const int32_t *ids, size_t n, char **out, size_t *len,
		     dsv3_error *err)
{
	char *buf = NULL;
	size_t l = 0, cap = 0;

	if (bytes_append(&buf, &l, &cap, "", 0))
		return dsv3_fail(err, DSV3_EIO, "tokenizer: out of memory");
	for (size_t i = 0; i < n; i++) {
		size_t bl;
		const char *b = tokenizer_id_bytes(tok, ids[i], &bl);
		if (!b) {
			free(buf);
			return dsv3_fail(err, DSV3_EDATA, "token id %d is out of range (0..%d)", (int)ids[i],
					 (int)tok->n_ids - 1);
		}
		if (bytes_append(&buf, &l, &cap, b, bl)) {
			free(buf);
			return dsv3_fail(err, DSV3_EIO, "tokenizer: out of memory");
		}
	}
	*out = buf;
	*len = l;
	return DSV3_OK;
}

/* Emits the whole characters of s, U+FFFD for ill-formed parts, and holds a truncated tail. */
static int stream_emit(tokenizer_stream *st, const unsigned char *s, size_t n, char **buf, size_t *len,
		       size_t *cap)
{
	size_t i = 0;
	while (i < n) {
		size_t l;
		enum utf8_status k = utf8_classify(s + i, n - i, &l);
		if (k == UTF8_TRUNCATED) {
			memcpy(st->held, s + i, n - i);
			st->n_held = n - i;
			return 0;
		}
		if (bytes_append(buf, len, cap, k == UTF8_VALID ? (const char *)s + i : replacement_char,
				 k == UTF8_VALID ? l : 3))
			return -1;
		i += l;
	}
	st->n_held = 0;
	return 0;
}

int tokenizer_stream_push(const dsv3_tokenizer *tok, tokenizer_stream *st, int32_t id, char **buf, size_t *len,
			  size_t *cap, dsv3_error *err)
{
	size_t bl;
	const char *b = tokenizer_id_bytes(tok, id, &bl);
	unsigned char *joined;

	if (!b)
		return dsv3_fail(err, DSV3_EDATA, "token id %d is out of range (0..%d)", (int)id, (int)tok->n_ids - 1);
	joined = malloc(st->n_held + bl + 1);
	if (!joined)
		return dsv3_fail(err, DSV3_EIO, "tokenizer: out of memory");
	memcpy(joined, st->held, st->n_held);
	memcpy(joined + st->n_held, b, bl);
	int rc = stream_emit(st, joined, st->n_held + bl, buf, len, cap);
	free(joined);
	if (rc || bytes_append(buf, len, cap, "", 0))
		return dsv3_fail(err, DSV3_EIO, "tokenizer: out of memory");
	return DSV3_OK;
}

int tokenizer_stream_finish(tokenizer_stream *st, char **buf, size_t *len, size_t *cap, dsv3_error *err)
{
	int rc = bytes_append(buf, len, cap, replacement_char, st->n_held ? 3 : 0);
	st->n_held = 0;
	if (rc)
		return dsv3_fail(err, DSV3_EIO, "tokenizer: out of memory");
	return DSV3_OK;
}

/* ---- chat ---- */

char *chat_format_prompt(const chat_turn *turns, size_t n)
{
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int rc = bytes_append(&buf, &len, &cap, "<｜begin▁of▁sentence｜>", strlen("<｜begin▁of▁sentence｜>"));
	int first_system = 1;

	/* The template gathers every system prompt first, wherever it stands. */
	for (size_t i = 0; i < n && !rc; i++) {
		if (turns[i].role != CHAT_SYSTEM)
			continue;
		if (!first_system)
			rc = bytes_append(&buf, &len, &cap, "\n\n", 2);
		if (!rc)
			rc = bytes_append(&buf, &len, &cap, turns[i].content, strlen(turns[i].content));
		first_system = 0;
	}
	for (size_t i = 0; i < n && !rc; i++) {
		const char *pre = turns[i].role == CHAT_USER ? "<｜User｜>" : "<｜Assistant｜>";
		if (turns[i].role == CHAT_SYSTEM)
			continue;
		rc = bytes_append(&buf, &len, &cap, pre, strlen(pre));
		if (!rc)
			rc = bytes_append(&buf, &len, &cap, turns[i].content, strlen(turns[i].content));
		if (!rc && turns[i].role == CHAT_ASSISTANT)
			rc = bytes_append(&buf, &len, &cap, "<｜end▁of▁sentence｜>", strlen("<｜end▁of▁sentence｜>"));
	}
	if (!rc)
		rc = bytes_append(&buf, &len, &cap, "<｜Assistant｜>", strlen("<｜Assistant｜>"));
	if (rc) {
		free(buf);
		return NULL;
	}
	return buf;
}
