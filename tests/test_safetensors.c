/* lib/safetensors: every rejection rule of DESIGN §3.1 on bytes built here, the writer's exact
 * bytes against hand-written expectations, and round trips through real files. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "sha256.h"
#include "support/test_support.h"

#define LABEL "label-under-test.safetensors"

/* Fixtures --------------------------------------------------------------------------------- */

/* 8-byte length + header + data_len bytes of data (byte i of the data is i & 0xFF). */
static uint8_t *make_file(const char *header, size_t header_len, size_t data_len, size_t *size)
{
	*size = 8 + header_len + data_len;
	uint8_t *b = malloc(*size + 1);
	assert_non_null(b);
	for (int i = 0; i < 8; i++)
		b[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
	memcpy(b + 8, header, header_len);
	for (size_t i = 0; i < data_len; i++)
		b[8 + header_len + i] = (uint8_t)i;
	return b;
}

/* st_parse must refuse with DSV3_EDATA, naming the label and (when given) the tensor. */
static void expect_reject_bytes(const char *header, size_t header_len, size_t data_len,
				const char *tensor)
{
	size_t size;
	uint8_t *b = make_file(header, header_len, data_len, &size);
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_parse(&f, b, size, LABEL, &err), DSV3_EDATA);
	assert_int_equal(err.code, DSV3_EDATA);
	if (!strstr(err.msg, LABEL) || (tensor && !strstr(err.msg, tensor)))
		fail_msg("message '%s' does not name %s / %s", err.msg, LABEL, tensor);
	st_close(&f); /* harmless after a failed parse */
	free(b);
}

static void expect_reject(const char *header, size_t data_len, const char *tensor)
{
	expect_reject_bytes(header, strlen(header), data_len, tensor);
}

static void parse_ok(st_file *f, const uint8_t *b, size_t size)
{
	dsv3_error err = { 0 };
	int rc = st_parse(f, b, size, LABEL, &err);
	if (rc)
		fail_msg("st_parse: %s", err.msg);
}

static int make_tmpdir(void **state)
{
	return tmp_dir_setup(state, "st");
}

/* Reader: rejections ------------------------------------------------------------------------ */

static void test_parse_rejects_file_shorter_than_8_bytes(void **state)
{
	(void)state;
	uint8_t b[8] = { 2, 0, 0, 0, 0, 0, 0, 0 };
	for (size_t n = 0; n < 8; n++) {
		st_file f;
		dsv3_error err = { 0 };
		assert_int_equal(st_parse(&f, b, n, LABEL, &err), DSV3_EDATA);
		assert_non_null(strstr(err.msg, LABEL));
	}
}

static void test_parse_rejects_header_longer_than_file(void **state)
{
	(void)state;
	size_t size;
	uint8_t *b = make_file("{}      ", 8, 0, &size);
	b[0] = 9; /* claims one byte more than there is */
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_parse(&f, b, size, LABEL, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, LABEL));
	b[0] = 0xFF;
	b[7] = 0xFF; /* 2^64 - 1: must not wrap */
	assert_int_equal(st_parse(&f, b, size, LABEL, &err), DSV3_EDATA);
	free(b);
}

static void test_parse_rejects_header_over_100MB(void **state)
{
	(void)state;
	size_t size = 8 + (size_t)ST_MAX_HEADER + 1;
	uint8_t *b = calloc(1, size); /* big enough for the claimed header: only the limit fails */
	assert_non_null(b);
	uint64_t n = (uint64_t)ST_MAX_HEADER + 1;
	for (int i = 0; i < 8; i++)
		b[i] = (uint8_t)(n >> (8 * i));
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_parse(&f, b, size, LABEL, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, LABEL));
	assert_non_null(strstr(err.msg, "limit"));
	free(b);
}

static void test_parse_rejects_invalid_utf8(void **state)
{
	(void)state;
	expect_reject("{\"bad\xff\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
		      NULL);
	/* an overlong encoding of '/' */
	expect_reject("{\"a\xc0\xaf\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
		      NULL);
	/* a lone surrogate, encoded */
	expect_reject("{\"__metadata__\":{\"k\":\"\xed\xa0\x80\"}}", 0, NULL);
}

static void test_parse_rejects_invalid_json(void **state)
{
	(void)state;
	expect_reject("{\"a\":", 0, NULL);
	expect_reject("{} x", 0, NULL);
	expect_reject("", 0, NULL);
	expect_reject("{'a':1}", 0, NULL);
	expect_reject_bytes("{}\0     ", 8, 0, NULL); /* NUL after the object */
}

static void test_parse_rejects_header_that_is_not_an_object(void **state)
{
	(void)state;
	expect_reject("[]", 0, NULL);
	expect_reject("[{\"dtype\":\"U8\"}]", 0, NULL);
	expect_reject("\"x\"", 0, NULL);
	expect_reject("7", 0, NULL);
}

static void test_parse_rejects_duplicate_names(void **state)
{
	(void)state;
	expect_reject("{\"dup.weight\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		      "\"dup.weight\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
		      8, "dup.weight");
}

static void test_parse_rejects_entry_that_is_not_an_object(void **state)
{
	(void)state;
	expect_reject("{\"t.bad\":[\"U8\",[1],[0,1]]}", 1, "t.bad");
	expect_reject("{\"t.bad\":null}", 0, "t.bad");
}

static void test_parse_rejects_entry_missing_a_key(void **state)
{
	(void)state;
	expect_reject("{\"no.dtype\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "no.dtype");
	expect_reject("{\"no.shape\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1, "no.shape");
	expect_reject("{\"no.offsets\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1, "no.offsets");
}

static void test_parse_rejects_entry_with_extra_key(void **state)
{
	(void)state;
	expect_reject("{\"t.extra\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],"
		      "\"offset\":0}}", 1, "t.extra");
}

static void test_parse_rejects_unknown_dtype(void **state)
{
	(void)state;
	expect_reject("{\"t.q\":{\"dtype\":\"F8_E4M3FN\",\"shape\":[1],\"data_offsets\":[0,1]}}",
		      1, "t.q");
	expect_reject("{\"t.q\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "t.q");
	expect_reject("{\"t.q\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "t.q");
}

static void test_parse_rejects_bad_shapes(void **state)
{
	(void)state;
	static const char *const shapes[] = {
		"3", "\"[3]\"", "[2.0]", "[-1]", "[1,-2]", "[\"2\"]", "[null]", "[[2]]", "[true]",
		"[1,1,1,1,1,1,1,1,1]", /* nine dimensions */
		"{\"0\":2}",
	};
	for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
		char h[256];
		snprintf(h, sizeof h,
			 "{\"t.shape\":{\"dtype\":\"U8\",\"shape\":%s,\"data_offsets\":[0,2]}}",
			 shapes[i]);
		expect_reject(h, 2, "t.shape");
	}
}

static void test_parse_rejects_shape_product_overflow(void **state)
{
	(void)state;
	/* element count 2^64 */
	expect_reject("{\"t.big\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],"
		      "\"data_offsets\":[0,0]}}", 0, "t.big");
	/* element count 2^63 fits, times 4 bytes does not */
	expect_reject("{\"t.big\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,2],"
		      "\"data_offsets\":[0,0]}}", 0, "t.big");
	/* a zero dimension after huge ones still overflows on the way: refused, not wrapped */
	expect_reject("{\"t.big\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,0],"
		      "\"data_offsets\":[0,0]}}", 0, "t.big");
}

static void test_parse_rejects_bad_data_offsets(void **state)
{
	(void)state;
	static const char *const offsets[] = {
		"4", "[]", "[0]", "[0,4,4]", "[-4,0]", "[0,-4]", "[0.0,4]", "[0,4.0]",
		"[\"0\",4]", "[null,4]", "{\"begin\":0}",
		"[4,0]", /* begin after end */
	};
	for (size_t i = 0; i < sizeof offsets / sizeof offsets[0]; i++) {
		char h[256];
		snprintf(h, sizeof h,
			 "{\"t.off\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":%s}}",
			 offsets[i]);
		expect_reject(h, 4, "t.off");
	}
}

static void test_parse_rejects_offsets_not_matching_shape(void **state)
{
	(void)state;
	expect_reject("{\"t.size\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
		      "t.size");
	expect_reject("{\"t.size\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
		      16, "t.size");
	expect_reject("{\"t.size\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,0]}}", 0,
		      "t.size");
}

static void test_parse_rejects_overlapping_ranges(void **state)
{
	(void)state;
	expect_reject("{\"first.w\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
		      "\"second.w\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
		      12, "second.w");
	/* the same range twice */
	expect_reject("{\"first.w\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
		      "\"twin.w\":{\"dtype\":\"I8\",\"shape\":[8],\"data_offsets\":[0,8]}}",
		      8, "w");
}

static void test_parse_rejects_holes(void **state)
{
	(void)state;
	expect_reject("{\"first.w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		      "\"second.w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]}}",
		      12, "second.w");
	/* not starting at 0 */
	expect_reject("{\"late.w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 8,
		      "late.w");
}

static void test_parse_rejects_bytes_after_last_tensor(void **state)
{
	(void)state;
	expect_reject("{\"t.w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 6, NULL);
	expect_reject("{}", 1, NULL);
}

static void test_parse_rejects_range_past_end_of_file(void **state)
{
	(void)state;
	expect_reject("{\"t.long\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}", 4,
		      "t.long");
	expect_reject("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		      "\"t.long\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 4,
		      "t.long");
}

static void test_parse_rejects_bad_metadata(void **state)
{
	(void)state;
	expect_reject("{\"__metadata__\":\"pt\"}", 0, NULL);
	expect_reject("{\"__metadata__\":null}", 0, NULL);
	expect_reject("{\"__metadata__\":[\"format\",\"pt\"]}", 0, NULL);
	expect_reject("{\"__metadata__\":{\"format\":1}}", 0, "format");
	expect_reject("{\"__metadata__\":{\"format\":{\"a\":\"b\"}}}", 0, "format");
}

/* Reader: accepted files ------------------------------------------------------------------- */

static void test_parse_accepts_zero_tensors(void **state)
{
	(void)state;
	static const char *const headers[] = { "{}", "{}      ", "  {}  ",
					       "{\"__metadata__\":{}}" };
	for (size_t i = 0; i < sizeof headers / sizeof headers[0]; i++) {
		size_t size;
		uint8_t *b = make_file(headers[i], strlen(headers[i]), 0, &size);
		st_file f;
		parse_ok(&f, b, size);
		assert_int_equal(f.n_tensors, 0);
		assert_int_equal(f.n_metadata, 0);
		assert_null(st_find(&f, "x"));
		assert_int_equal(f.header_len, strlen(headers[i]));
		st_close(&f);
		free(b);
	}
}

static void test_parse_keeps_header_order_and_offsets(void **state)
{
	(void)state;
	const char *h = "{\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,4]},"
			"\"b.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
			"\"__metadata__\":{\"format\":\"pt\",\"a\":\"\"},"
			"\"a\":{\"dtype\":\"I16\",\"shape\":[1,2],\"data_offsets\":[0,4]},"
			"\"y\":{\"dtype\":\"BOOL\",\"shape\":[0,3],\"data_offsets\":[8,8]},"
			"\"e\":{\"dtype\":\"F8_E4M3\",\"shape\":[1,1,1,1,1,1,1,2],"
			"\"data_offsets\":[8,10]}}  ";
	size_t size, hl = strlen(h);
	uint8_t *b = make_file(h, hl, 10, &size);
	st_file f;
	parse_ok(&f, b, size);
	static const char *const names[] = { "z", "b.w", "a", "y", "e" };
	static const st_dtype types[] = { ST_U8, ST_F32, ST_I16, ST_BOOL, ST_F8_E4M3 };
	static const uint64_t begins[] = { 4, 4, 0, 8, 8 }, sizes[] = { 0, 4, 4, 0, 2 };
	static const int ndims[] = { 1, 1, 2, 2, 8 };
	assert_int_equal(f.n_tensors, 5);
	for (size_t i = 0; i < 5; i++) {
		const st_tensor *t = &f.tensors[i];
		assert_string_equal(t->name, names[i]);
		assert_int_equal(t->dtype, types[i]);
		assert_int_equal(t->begin, begins[i]);
		assert_int_equal(t->nbytes, sizes[i]);
		assert_int_equal(t->ndim, ndims[i]);
		assert_ptr_equal(t->data, b + 8 + hl + begins[i]);
		assert_ptr_equal(st_find(&f, names[i]), t);
	}
	assert_int_equal(f.tensors[2].shape[1], 2);
	assert_int_equal(st_numel(&f.tensors[2]), 2);
	assert_int_equal(st_numel(&f.tensors[3]), 0);
	assert_int_equal(st_numel(&f.tensors[4]), 2);
	assert_null(st_find(&f, "b"));
	assert_null(st_find(&f, "b.w "));
	assert_int_equal(f.n_metadata, 2);
	assert_string_equal(f.metadata[0], "format");
	assert_string_equal(f.metadata[1], "pt");
	assert_string_equal(f.metadata[2], "a");
	assert_string_equal(f.metadata[3], "");
	assert_null(f.map);
	st_close(&f);
	free(b);
}

static void test_find_among_many_tensors(void **state)
{
	(void)state;
	enum { N = 300 };
	size_t cap = N * 80 + 16, len = 0;
	char *h = malloc(cap);
	assert_non_null(h);
	len += (size_t)snprintf(h + len, cap - len, "{");
	for (int i = 0; i < N; i++) /* header order unrelated to name order */
		len += (size_t)snprintf(h + len, cap - len,
					"%s\"layer.%d.w\":{\"dtype\":\"U8\",\"shape\":[1],"
					"\"data_offsets\":[%d,%d]}",
					i ? "," : "", (i * 7919) % N, i, i + 1);
	len += (size_t)snprintf(h + len, cap - len, "}");
	size_t size;
	uint8_t *b = make_file(h, len, N, &size);
	st_file f;
	parse_ok(&f, b, size);
	for (int i = 0; i < N; i++) {
		char name[32];
		snprintf(name, sizeof name, "layer.%d.w", i);
		const st_tensor *t = st_find(&f, name);
		assert_non_null(t);
		assert_string_equal(t->name, name);
	}
	assert_null(st_find(&f, "layer.300.w"));
	assert_null(st_find(&f, ""));
	st_close(&f);
	free(b);
	free(h);
}

/* Writer: exact bytes ---------------------------------------------------------------------- */

static char *padded(const char *json)
{
	size_t n = strlen(json), p = (n + 7) / 8 * 8;
	char *s = malloc(p + 1);
	assert_non_null(s);
	memcpy(s, json, n);
	memset(s + n, ' ', p - n);
	s[p] = '\0';
	return s;
}

static void expect_header(const st_spec *specs, size_t n, const char *const *metadata,
			  const char *expected_json)
{
	char *json = NULL, *want = padded(expected_json);
	size_t len = 0;
	dsv3_error err = { 0 };
	int rc = st_header_json(specs, n, metadata, &json, &len, &err);
	if (rc)
		fail_msg("st_header_json: %s", err.msg);
	assert_int_equal(len, strlen(want));
	assert_memory_equal(json, want, len);
	free(json);
	free(want);
}

static void test_header_matches_hand_written_json(void **state)
{
	(void)state;
	const st_spec specs[] = {
		{ "scale", ST_F16, 0, { 0 } },
		{ "layers.0.w", ST_BF16, 2, { 2, 2 } },
		{ "emb", ST_F32, 1, { 3 } },
	};
	const char *const md[] = { "format", "pt", NULL };
	expect_header(specs, 3, md,
		      "{\"__metadata__\":{\"format\":\"pt\"},"
		      "\"emb\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
		      "\"layers.0.w\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[12,20]},"
		      "\"scale\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[20,22]}}");
	expect_header(specs, 3, NULL,
		      "{\"emb\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
		      "\"layers.0.w\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[12,20]},"
		      "\"scale\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[20,22]}}");
}

static void test_header_of_zero_tensors(void **state)
{
	(void)state;
	char *json;
	size_t len;
	dsv3_error err = { 0 };
	assert_int_equal(st_header_json(NULL, 0, NULL, &json, &len, &err), 0);
	assert_int_equal(len, 8);
	assert_memory_equal(json, "{}      ", 8);
	free(json);
	/* exactly 32 bytes: no padding at all */
	const char *const md[] = { "format", "pt", NULL };
	assert_int_equal(st_header_json(NULL, 0, md, &json, &len, &err), 0);
	assert_int_equal(len, 32);
	assert_memory_equal(json, "{\"__metadata__\":{\"format\":\"pt\"}}", 32);
	free(json);
}

static void test_header_sorts_metadata_keys_bytewise(void **state)
{
	(void)state;
	const char *const md[] = { "zeta", "1", "Alpha", "2", "alpha", "3", NULL };
	const st_spec s = { "x", ST_U8, 1, { 1 } };
	expect_header(&s, 1, md,
		      "{\"__metadata__\":{\"Alpha\":\"2\",\"alpha\":\"3\",\"zeta\":\"1\"},"
		      "\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}");
}

static void test_header_escapes_like_serde_json(void **state)
{
	(void)state;
	const st_spec s = { "q\"b\\s\n\r\t\b\f\x01\x1f/\xc3\xa9\x7f~", ST_U8, 1, { 1 } };
	const char *const md[] = { "k\"", "v\\\x02", NULL };
	expect_header(&s, 1, md,
		      "{\"__metadata__\":{\"k\\\"\":\"v\\\\\\u0002\"},"
		      "\"q\\\"b\\\\s\\n\\r\\t\\b\\f\\u0001\\u001f/\xc3\xa9\x7f~\":"
		      "{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}");
}

static void test_header_lays_out_by_dtype_rank_then_bytewise_name(void **state)
{
	/* Given in a scrambled order; the expected order is written out from DESIGN §3.1. */
	const st_spec specs[] = {
		{ "bool", ST_BOOL, 1, { 1 } },	   { "a.9", ST_F32, 1, { 1 } },
		{ "f16", ST_F16, 1, { 1 } },	   { "u8", ST_U8, 1, { 1 } },
		{ "a.10", ST_F32, 1, { 1 } },	   { "e5m2", ST_F8_E5M2, 1, { 1 } },
		{ "bf16", ST_BF16, 1, { 1 } },	   { "B", ST_F32, 1, { 1 } },
		{ "i8", ST_I8, 1, { 1 } },	   { "u64", ST_U64, 1, { 1 } },
		{ "e4m3", ST_F8_E4M3, 1, { 1 } },  { "i16", ST_I16, 1, { 1 } },
		{ "_", ST_F32, 1, { 1 } },	   { "u16", ST_U16, 1, { 1 } },
		{ "i32", ST_I32, 1, { 1 } },	   { "a.1", ST_F32, 1, { 1 } },
		{ "u32", ST_U32, 1, { 1 } },	   { "f64", ST_F64, 1, { 1 } },
		{ "i64", ST_I64, 1, { 1 } },	   { "a", ST_BF16, 1, { 1 } },
	};
	static const char *const want[] = {
		"u64", "i64", "f64", "B", "_", "a.1", "a.10", "a.9", "u32", "i32", "a", "bf16",
		"f16", "u16", "i16", "e4m3", "e5m2", "i8", "u8", "bool",
	};
	enum { N = sizeof specs / sizeof specs[0] };
	char *json;
	size_t len;
	dsv3_error err = { 0 };
	assert_int_equal(st_header_json(specs, N, NULL, &json, &len, &err), 0);
	/* Read the header back: header order and consecutive offsets in that order. */
	uint64_t data = 0;
	for (size_t i = 0; i < N; i++)
		data += dtype_size(specs[i].dtype);
	size_t size;
	uint8_t *b = make_file(json, len, data, &size);
	st_file f;
	parse_ok(&f, b, size);
	assert_int_equal(f.n_tensors, N);
	uint64_t offset = 0;
	for (size_t i = 0; i < N; i++) {
		assert_string_equal(f.tensors[i].name, want[i]);
		assert_int_equal(f.tensors[i].begin, offset);
		offset += f.tensors[i].nbytes;
	}
	st_close(&f);
	free(b);
	free(json);

	st_writer *w;
	const char *path = path_in(*state, "order.safetensors");
	assert_int_equal(st_writer_open(&w, path, specs, N, NULL, &err), 0);
	for (size_t i = 0; i < N; i++)
		assert_string_equal(specs[st_writer_order(w, i)].name, want[i]);
	st_writer_abort(w);
	assert_int_equal(access(path, F_OK), -1);
}

static void test_header_is_padded_with_spaces_to_8(void **state)
{
	(void)state;
	char name[32];
	for (size_t n = 1; n < 24; n++) {
		memset(name, 'n', n);
		name[n] = '\0';
		st_spec s = { name, ST_U8, 1, { 3 } };
		char *json;
		size_t len;
		dsv3_error err = { 0 };
		assert_int_equal(st_header_json(&s, 1, NULL, &json, &len, &err), 0);
		/* {"n...":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}} is n + 52 bytes */
		size_t raw = n + 52;
		assert_int_equal(len, (raw + 7) / 8 * 8);
		assert_int_equal(json[raw - 1], '}');
		for (size_t i = raw; i < len; i++)
			assert_int_equal(json[i], ' ');
		free(json);
	}
}

static void test_header_writes_large_dims_and_offsets(void **state)
{
	(void)state;
	const st_spec s = { "w", ST_BF16, 3, { 1, 129280, 7168 } };
	expect_header(&s, 1, NULL,
		      "{\"w\":{\"dtype\":\"BF16\",\"shape\":[1,129280,7168],"
		      "\"data_offsets\":[0,1853358080]}}");
}

/* Writer: refusals ------------------------------------------------------------------------- */

static void expect_writer_refuses(void **state, const st_spec *specs, size_t n,
				  const char *const *md, const char *tensor)
{
	const char *path = path_in(*state, "refused.safetensors");
	st_writer *w = (st_writer *)1;
	dsv3_error err = { 0 };
	int rc = st_writer_open(&w, path, specs, n, md, &err);
	assert_true(rc == DSV3_EDATA || rc == DSV3_EUSAGE);
	assert_null(w);
	if (!strstr(err.msg, path) || (tensor && !strstr(err.msg, tensor)))
		fail_msg("message '%s' does not name %s / %s", err.msg, path, tensor);
	assert_int_equal(access(path, F_OK), -1); /* nothing created */
}

static void test_writer_refuses_bad_specs(void **state)
{
	const st_spec dup_same[] = { { "dup.w", ST_F32, 1, { 1 } }, { "x", ST_U8, 0, { 0 } },
				     { "dup.w", ST_F32, 1, { 2 } } };
	expect_writer_refuses(state, dup_same, 3, NULL, "dup.w");
	const st_spec dup_mixed[] = { { "dup.w", ST_F32, 1, { 1 } },
				      { "dup.w", ST_BF16, 1, { 1 } } };
	expect_writer_refuses(state, dup_mixed, 2, NULL, "dup.w");
	const st_spec nine = { "nine.w", ST_U8, 9, { 1 } };
	expect_writer_refuses(state, &nine, 1, NULL, "nine.w");
	const st_spec neg = { "neg.w", ST_U8, 2, { 2, -1 } };
	expect_writer_refuses(state, &neg, 1, NULL, "neg.w");
	const st_spec meta = { "__metadata__", ST_U8, 1, { 1 } };
	expect_writer_refuses(state, &meta, 1, NULL, "__metadata__");
	const st_spec utf = { "bad\xff", ST_U8, 1, { 1 } };
	expect_writer_refuses(state, &utf, 1, NULL, NULL);
	const st_spec huge = { "huge.w", ST_F32, 2, { INT64_MAX, 4 } };
	expect_writer_refuses(state, &huge, 1, NULL, "huge.w");
	const st_spec ok = { "ok", ST_U8, 1, { 1 } };
	const char *const dup_md[] = { "k", "1", "k", "2", NULL };
	expect_writer_refuses(state, &ok, 1, dup_md, "k");
	const char *const odd_md[] = { "k", NULL };
	expect_writer_refuses(state, &ok, 1, odd_md, "k");
}

/* Writer: files ---------------------------------------------------------------------------- */

static void test_writer_round_trip_through_a_file(void **state)
{
	const char *path = path_in(*state, "round.safetensors");
	const st_spec specs[] = {
		{ "model.embed.weight", ST_BF16, 2, { 3, 5 } },
		{ "model.norm.scale", ST_F32, 0, { 0 } },
		{ "experts.0.w1", ST_F8_E4M3, 2, { 4, 4 } },
		{ "experts.0.w1.scale", ST_F32, 2, { 1, 1 } },
		{ "empty", ST_I64, 2, { 0, 7 } },
		{ "big.w", ST_U8, 1, { 5 << 20 } }, /* > half the write buffer: direct writes */
	};
	enum { N = sizeof specs / sizeof specs[0] };
	const char *const md[] = { "format", "pt", NULL };
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, specs, N, md, &err), 0);
	/* Each tensor's bytes: a pattern seeded by its spec index. */
	uint8_t *bufs[N];
	for (size_t i = 0; i < N; i++) {
		size_t bytes = dtype_size(specs[i].dtype);
		for (int d = 0; d < specs[i].ndim; d++)
			bytes *= (size_t)specs[i].shape[d];
		bufs[i] = malloc(bytes + 1);
		for (size_t k = 0; k < bytes; k++)
			bufs[i][k] = (uint8_t)(k * 31 + i * 101 + (k >> 8));
	}
	for (size_t pos = 0; pos < N; pos++) {
		size_t i = st_writer_order(w, pos);
		size_t bytes = dtype_size(specs[i].dtype);
		for (int d = 0; d < specs[i].ndim; d++)
			bytes *= (size_t)specs[i].shape[d];
		/* odd chunking: 1 byte, then 7, then the rest */
		size_t a = bytes < 1 ? bytes : 1, b = bytes - a < 7 ? bytes - a : 7;
		assert_int_equal(st_writer_write(w, bufs[i], a, &err), 0);
		assert_int_equal(st_writer_write(w, bufs[i] + a, b, &err), 0);
		assert_int_equal(st_writer_write(w, bufs[i] + a + b, bytes - a - b, &err), 0);
	}
	uint8_t sha[32], want[32];
	assert_int_equal(st_writer_finish(w, sha, &err), 0);

	size_t size;
	uint8_t *whole = (uint8_t *)assert_read_file(path, &size);
	sha256_buffer(whole, size, want);
	assert_memory_equal(sha, want, 32);
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	mode_t mask = umask(0);
	umask(mask);
	assert_int_equal(st.st_mode & 0777, 0644 & ~mask);

	st_file f;
	assert_int_equal(st_open(&f, path, &err), 0);
	assert_non_null(f.map);
	assert_int_equal(f.size, size);
	assert_int_equal(f.n_tensors, N);
	assert_int_equal(f.n_metadata, 1);
	assert_string_equal(f.metadata[0], "format");
	assert_string_equal(f.metadata[1], "pt");
	for (size_t i = 0; i < N; i++) {
		const st_tensor *t = st_find(&f, specs[i].name);
		assert_non_null(t);
		assert_int_equal(t->dtype, specs[i].dtype);
		assert_int_equal(t->ndim, specs[i].ndim);
		for (int d = 0; d < t->ndim; d++)
			assert_int_equal(t->shape[d], specs[i].shape[d]);
		assert_memory_equal(t->data, bufs[i], t->nbytes);
		st_release(&f, t);
		/* released pages come back from the page cache unchanged */
		assert_memory_equal(t->data, bufs[i], t->nbytes);
		assert_memory_equal(t->data, whole + 8 + f.header_len + t->begin, t->nbytes);
	}
	/* I64 ranks first, then the F32s by name */
	assert_string_equal(f.tensors[0].name, "empty");
	assert_string_equal(f.tensors[1].name, "experts.0.w1.scale");
	assert_string_equal(f.tensors[2].name, "model.norm.scale");
	st_close(&f);
	free(whole);
	for (size_t i = 0; i < N; i++)
		free(bufs[i]);
}

static void test_writer_file_of_zero_tensors(void **state)
{
	const char *path = path_in(*state, "empty.safetensors");
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, NULL, 0, NULL, &err), 0);
	assert_int_equal(st_writer_finish(w, NULL, &err), 0);
	size_t size;
	uint8_t *b = (uint8_t *)assert_read_file(path, &size);
	assert_int_equal(size, 16);
	assert_memory_equal(b, "\x08\0\0\0\0\0\0\0{}      ", 16);
	free(b);
	st_file f;
	assert_int_equal(st_open(&f, path, &err), 0);
	assert_int_equal(f.n_tensors, 0);
	st_close(&f);
}

static void test_writer_bytes_equal_hand_built_file(void **state)
{
	const char *path = path_in(*state, "small.safetensors");
	const st_spec specs[] = { { "b", ST_U8, 1, { 2 } }, { "a", ST_I16, 1, { 1 } } };
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, specs, 2, NULL, &err), 0);
	assert_int_equal(st_writer_write(w, "\x01\x02\x03\x04", 4, &err), 0);
	assert_int_equal(st_writer_finish(w, NULL, &err), 0);
	const char *json = "{\"a\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[0,2]},"
			   "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}";
	/* 106 bytes of JSON and 6 spaces: N = 112 = 0x70 */
	assert_int_equal(strlen(json), 106);
	size_t size;
	uint8_t *b = (uint8_t *)assert_read_file(path, &size);
	assert_int_equal(size, 8 + 112 + 4);
	assert_memory_equal(b, "\x70\0\0\0\0\0\0\0", 8);
	assert_memory_equal(b + 8, json, 106);
	assert_memory_equal(b + 8 + 106, "      ", 6);
	assert_memory_equal(b + 120, "\x01\x02\x03\x04", 4);
	free(b);
}

static void test_writer_refuses_too_many_or_too_few_bytes(void **state)
{
	const char *path = path_in(*state, "count.safetensors");
	const st_spec s = { "count.w", ST_F32, 1, { 2 } };
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, &s, 1, NULL, &err), 0);
	uint8_t buf[16] = { 0 };
	assert_int_equal(st_writer_write(w, buf, 9, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, path));
	assert_int_equal(st_writer_write(w, buf, 7, &err), 0);
	assert_int_equal(st_writer_finish(w, NULL, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, path));
	/* a failed finish leaves the writer to st_writer_abort, which removes the file */
	st_writer_abort(w);
	assert_int_equal(access(path, F_OK), -1);
	st_writer_abort(NULL);
}

static void test_writer_reports_disk_full(void **state)
{
	if (access("/dev/full", W_OK) != 0)
		skip();
	/* a link, so that abort unlinks the link and never the device */
	const char *path = path_in(*state, "full.safetensors");
	assert_int_equal(symlink("/dev/full", path), 0);
	const st_spec s = { "w", ST_U8, 1, { 100 } };
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, &s, 1, NULL, &err), 0);
	uint8_t buf[100] = { 0 };
	int rc = st_writer_write(w, buf, sizeof buf, &err);
	if (!rc)
		rc = st_writer_finish(w, NULL, &err);
	assert_int_equal(rc, DSV3_EIO);
	assert_non_null(strstr(err.msg, path));
	assert_non_null(strstr(err.msg, strerror(ENOSPC)));
	st_writer_abort(w);
	assert_int_equal(access("/dev/full", F_OK), 0);
}

static void test_writer_reports_unwritable_path(void **state)
{
	const char *path = path_in(*state, "no/such/dir/x.safetensors");
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, NULL, 0, NULL, &err), DSV3_EIO);
	assert_null(w);
	assert_non_null(strstr(err.msg, path));
}

/* st_open on real files -------------------------------------------------------------------- */

static void write_bytes(const char *path, const void *b, size_t n)
{
	FILE *fp = fopen(path, "wb");
	assert_non_null(fp);
	assert_int_equal(fwrite(b, 1, n, fp), n);
	fclose(fp);
}

static void test_open_rejects_truncated_file(void **state)
{
	const char *path = path_in(*state, "trunc.safetensors");
	const st_spec s = { "cut.w", ST_F32, 1, { 4 } };
	st_writer *w;
	dsv3_error err = { 0 };
	uint8_t buf[16] = { 0 };
	assert_int_equal(st_writer_open(&w, path, &s, 1, NULL, &err), 0);
	assert_int_equal(st_writer_write(w, buf, 16, &err), 0);
	assert_int_equal(st_writer_finish(w, NULL, &err), 0);
	st_file f;
	assert_int_equal(st_open(&f, path, &err), 0);
	st_close(&f);
	assert_int_equal(truncate(path, 8 + 64 + 15), 0);
	assert_int_equal(st_open(&f, path, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, path));
	assert_non_null(strstr(err.msg, "cut.w"));
	assert_int_equal(truncate(path, 40), 0); /* inside the header */
	assert_int_equal(st_open(&f, path, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, path));
	assert_int_equal(truncate(path, 5), 0);
	assert_int_equal(st_open(&f, path, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, path));
	assert_int_equal(truncate(path, 0), 0);
	assert_int_equal(st_open(&f, path, &err), DSV3_EDATA);
}

static void test_open_reports_missing_file_and_directory(void **state)
{
	st_file f;
	dsv3_error err = { 0 };
	const char *path = path_in(*state, "missing.safetensors");
	assert_int_equal(st_open(&f, path, &err), DSV3_EIO);
	assert_non_null(strstr(err.msg, path));
	assert_int_not_equal(st_open(&f, (char *)*state, &err), 0);
	assert_non_null(strstr(err.msg, (char *)*state));
}

static void test_open_reads_a_hand_built_file(void **state)
{
	const char *path = path_in(*state, "hand.safetensors");
	const char *h = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
	size_t size;
	uint8_t *b = make_file(h, strlen(h), 8, &size);
	write_bytes(path, b, size);
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, path, &err), 0);
	assert_string_equal(f.path, path);
	const st_tensor *t = st_find(&f, "x");
	assert_non_null(t);
	assert_memory_equal(t->data, "\x00\x01\x02\x03\x04\x05\x06\x07", 8);
	assert_ptr_equal(t->data, f.map + 8 + strlen(h));
	st_close(&f);
	free(b);
}

#define T(f) cmocka_unit_test(f)
#define TD(f) cmocka_unit_test_setup_teardown(f, make_tmpdir, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_parse_rejects_file_shorter_than_8_bytes),
		T(test_parse_rejects_header_longer_than_file),
		T(test_parse_rejects_header_over_100MB),
		T(test_parse_rejects_invalid_utf8),
		T(test_parse_rejects_invalid_json),
		T(test_parse_rejects_header_that_is_not_an_object),
		T(test_parse_rejects_duplicate_names),
		T(test_parse_rejects_entry_that_is_not_an_object),
		T(test_parse_rejects_entry_missing_a_key),
		T(test_parse_rejects_entry_with_extra_key),
		T(test_parse_rejects_unknown_dtype),
		T(test_parse_rejects_bad_shapes),
		T(test_parse_rejects_shape_product_overflow),
		T(test_parse_rejects_bad_data_offsets),
		T(test_parse_rejects_offsets_not_matching_shape),
		T(test_parse_rejects_overlapping_ranges),
		T(test_parse_rejects_holes),
		T(test_parse_rejects_bytes_after_last_tensor),
		T(test_parse_rejects_range_past_end_of_file),
		T(test_parse_rejects_bad_metadata),
		T(test_parse_accepts_zero_tensors),
		T(test_parse_keeps_header_order_and_offsets),
		T(test_find_among_many_tensors),
		T(test_header_matches_hand_written_json),
		T(test_header_of_zero_tensors),
		T(test_header_sorts_metadata_keys_bytewise),
		T(test_header_escapes_like_serde_json),
		TD(test_header_lays_out_by_dtype_rank_then_bytewise_name),
		T(test_header_is_padded_with_spaces_to_8),
		T(test_header_writes_large_dims_and_offsets),
		TD(test_writer_refuses_bad_specs),
		TD(test_writer_round_trip_through_a_file),
		TD(test_writer_file_of_zero_tensors),
		TD(test_writer_bytes_equal_hand_built_file),
		TD(test_writer_refuses_too_many_or_too_few_bytes),
		TD(test_writer_reports_disk_full),
		TD(test_writer_reports_unwritable_path),
		TD(test_open_rejects_truncated_file),
		TD(test_open_reports_missing_file_and_directory),
		TD(test_open_reads_a_hand_built_file),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
