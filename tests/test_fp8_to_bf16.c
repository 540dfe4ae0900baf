/* dsv3-fp8-to-bf16 end to end: every BF16 value against an independent computation from the
 * E4M3 definition and round-to-nearest-even, the index byte for byte as Python's json.dump
 * writes it, config/tokenizer handling, refusals that write nothing, BF16 pass-through and
 * ue8m0 (power-of-two) scales. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hf_ckpt.h"
#include "safetensors.h"
#include "support/test_support.h"

/* ---- helpers ---- */

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "fp8");
}

typedef struct {
	const char *name;
	st_dtype dtype;
	int ndim;
	int64_t shape[2];
	const void *data;
} tensor_def;

/* A safetensors file written with the library's writer (its layout is not under test here). */
static void write_st(const char *path, const tensor_def *t, size_t n)
{
	st_spec specs[16];
	const void *data[16];
	assert_true(n <= 16);
	for (size_t i = 0; i < n; i++) {
		specs[i] = (st_spec){ t[i].name, t[i].dtype, t[i].ndim, { t[i].shape[0], t[i].shape[1] } };
		data[i] = t[i].data;
	}
	write_safetensors(path, specs, data, n);
}

/* ---- the reference: E4M3 and BF16 from their definitions ---- */

/* E4M3 "fn": sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
 * (m/8 * 2^-6), S.1111.111 is NaN, no infinities. */
static double e4m3_reference(uint8_t v)
{
	int sign = v >> 7, e = (v >> 3) & 15, m = v & 7;
	if (e == 15 && m == 7)
		return NAN;
	double mag = e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
	return sign ? -mag : mag;
}

static double bf16_value(uint16_t b)
{
	uint32_t bits = (uint32_t)b << 16;
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

/* Round-to-nearest-even by comparing the two BF16 neighbours of f (the truncation and the next
 * code away from zero) in exact double arithmetic; ties pick the even code. Finite f only. */
static uint16_t bf16_reference(float f)
{
	uint32_t bits;
	memcpy(&bits, &f, 4);
	uint16_t down = (uint16_t)(bits >> 16), up = (uint16_t)(down + 1);
	double x = f, dd = fabs(x - bf16_value(down)), du = fabs(bf16_value(up) - x);
	if (dd < du)
		return down;
	if (du < dd)
		return up;
	return (down & 1) ? up : down;
}

static float read_f32(const uint8_t *p)
{
	float f;
	memcpy(&f, p, 4);
	return f;
}

/* Checks every element of out (BF16) against bf16(float32(e4m3(w)) * float32(scale block)). */
static void check_dequant(const st_tensor *w, const st_tensor *scale, const st_tensor *out)
{
	assert_int_equal(out->dtype, ST_BF16);
	assert_int_equal(out->ndim, 2);
	assert_int_equal(out->shape[0], w->shape[0]);
	assert_int_equal(out->shape[1], w->shape[1]);
	int64_t rows = w->shape[0], cols = w->shape[1], scols = scale->shape[1];
	for (int64_t r = 0; r < rows; r++) {
		for (int64_t c = 0; c < cols; c++) {
			uint8_t q = w->data[r * cols + c];
			float s = read_f32(scale->data + 4 * ((r / 128) * scols + c / 128));
			uint16_t got;
			memcpy(&got, out->data + 2 * (r * cols + c), 2);
			double v = e4m3_reference(q);
			if (isnan(v)) {
				assert_true(isnan(bf16_value(got)));
				continue;
			}
			float product = (float)v * s; /* float32, as fp8_cast_bf16.py's kernel */
			if (bf16_reference(product) != got)
				fail_msg("%s[%lld][%lld]: fp8 0x%02x * %a: got 0x%04x, expected 0x%04x",
					 w->name, (long long)r, (long long)c, q, (double)s, got,
					 bf16_reference(product));
		}
	}
}

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int cast_threads(const char *in, const char *out, const char *stderr_path, int threads)
{
	return run_shell("%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s --output-bf16-hf-path %s "
		   "--threads %d 2>%s",
		   bin_dir(), in, out, threads, stderr_path ? stderr_path : "/dev/null");
}

static int cast(const char *in, const char *out, const char *stderr_path)
{
	return cast_threads(in, out, stderr_path, 2);
}

/* ---- synthetic checkpoint ---- */

/* Every output file has the input's name; every FP8 weight became exactly the reference BF16;
 * every other tensor is byte-identical; no scale remains; SHA256SUMS checks out. */
static void test_fp8_cast_synth_values_match_reference(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096];
	snprintf(in, sizeof in, "%s/fp8", tmp);
	snprintf(out, sizeof out, "%s/bf16", tmp);
	assert_int_equal(run_synth("tiny", 1, "--files 3", in), 0);
	/* 12 threads: three files in flight at once */
	assert_int_equal(cast_threads(in, out, NULL, 12), 0);

	hf_ckpt ic, oc;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&ic, in, &err), 0);
	assert_int_equal(hf_ckpt_open(&oc, out, &err), 0);
	assert_int_equal(oc.n_files, ic.n_files);
	for (size_t f = 0; f < ic.n_files; f++)
		assert_string_equal(oc.file_names[f], ic.file_names[f]);

	size_t dequantised = 0, scale_elsewhere = 0, copied = 0;
	for (size_t f = 0; f < ic.n_files; f++) {
		const st_file *sf = &ic.files[f];
		for (size_t i = 0; i < sf->n_tensors; i++) {
			const st_tensor *t = &sf->tensors[i];
			size_t of;
			const st_tensor *o = hf_ckpt_find(&oc, t->name, &of);
			if (ends_with(t->name, "_scale_inv")) {
				assert_null(o);
				continue;
			}
			assert_non_null(o);
			assert_string_equal(oc.file_names[of], ic.file_names[f]);
			if (t->dtype != ST_F8_E4M3) {
				assert_int_equal(o->dtype, t->dtype);
				assert_int_equal(o->nbytes, t->nbytes);
				assert_memory_equal(o->data, t->data, t->nbytes);
				copied++;
				continue;
			}
			char sname[512];
			snprintf(sname, sizeof sname, "%s_scale_inv", t->name);
			size_t sfile;
			const st_tensor *s = hf_ckpt_find(&ic, sname, &sfile);
			assert_non_null(s);
			scale_elsewhere += sfile != f;
			check_dequant(t, s, o);
			dequantised++;
		}
	}
	assert_true(dequantised > 0);
	assert_true(copied > 0);
	assert_true(scale_elsewhere > 0); /* the cross-file lookup was exercised */
	for (size_t i = 0; i < oc.n_index; i++)
		assert_false(ends_with(oc.index_tensors[i], "_scale_inv"));
	assert_int_equal(oc.n_index, ic.n_index - dequantised);
	hf_ckpt_close(&ic);
	hf_ckpt_close(&oc);
	assert_int_equal(run_shell("cd %s && sha256sum --quiet -c SHA256SUMS", out), 0);
}

/* A BF16 checkpoint has nothing to dequantise: every tensor comes out byte-identical. */
static void test_fp8_cast_bf16_input_passes_through(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096];
	snprintf(in, sizeof in, "%s/v2", tmp);
	snprintf(out, sizeof out, "%s/v2out", tmp);
	assert_int_equal(run_synth("tiny-v2", 1, "", in), 0);
	assert_int_equal(cast(in, out, NULL), 0);
	hf_ckpt ic, oc;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&ic, in, &err), 0);
	assert_int_equal(hf_ckpt_open(&oc, out, &err), 0);
	size_t n = 0;
	for (size_t f = 0; f < ic.n_files; f++) {
		for (size_t i = 0; i < ic.files[f].n_tensors; i++) {
			const st_tensor *t = &ic.files[f].tensors[i];
			const st_tensor *o = hf_ckpt_find(&oc, t->name, NULL);
			assert_non_null(o);
			assert_int_equal(o->dtype, t->dtype);
			assert_int_equal(o->nbytes, t->nbytes);
			assert_memory_equal(o->data, t->data, t->nbytes);
			n++;
		}
	}
	size_t on = 0;
	for (size_t f = 0; f < oc.n_files; f++)
		on += oc.files[f].n_tensors;
	assert_int_equal(on, n);
	assert_int_equal(oc.n_index, ic.n_index);
	hf_ckpt_close(&ic);
	hf_ckpt_close(&oc);
}

/* ---- a hand-made checkpoint ---- */

#define FILE1 "model-00001-of-00002.safetensors"
#define FILE2 "model-00002-of-00002.safetensors"

static const uint8_t down_fp8[6] = { 0x38, 0xb8, 0x01, 0x7e, 0x00, 0x40 }; /* 1 -1 2^-9 448 0 2 */
static const float half_scale[1] = { 0.5f };
static const uint16_t norm_bf16[3] = { 0x3f80, 0x4000, 0xbf80 };
static const uint16_t cafe_bf16[1] = { 0x4040 };
static const uint16_t orphan_bf16[4] = { 1, 2, 3, 4 };

/* FP8 down_proj in file 1 with its scale in file 2; a non-ASCII name; a BF16 weight. (A scale
 * whose weight is not FP8, which fp8_cast_bf16.py drops from the file and keeps in the index, is
 * refused: tests/test_tensor_rules.c.) */
static void write_small_ckpt(const char *dir)
{
	mkdir(dir, 0777);
	tensor_def f1[] = {
		{ "model.layers.0.mlp.down_proj.weight", ST_F8_E4M3, 2, { 2, 3 }, down_fp8 },
		{ "model.norm.weight", ST_BF16, 1, { 3, 0 }, norm_bf16 },
	};
	tensor_def f2[] = {
		{ "model.layers.0.mlp.down_proj.weight_scale_inv", ST_F32, 2, { 1, 1 }, half_scale },
		{ "caf\xc3\xa9.weight", ST_BF16, 1, { 1, 0 }, cafe_bf16 },
		{ "orphan.weight", ST_BF16, 2, { 2, 2 }, orphan_bf16 },
	};
	write_st(path_in(dir, FILE1), f1, 2);
	write_st(path_in(dir, FILE2), f2, 3);
	write_text_file(path_in(dir, "model.safetensors.index.json"),
		   "{\"metadata\":{\"total_size\":1},\"weight_map\":{"
		   "\"model.norm.weight\":\"" FILE1 "\","
		   "\"model.layers.0.mlp.down_proj.weight_scale_inv\":\"" FILE2 "\","
		   "\"caf\\u00e9.weight\":\"" FILE2 "\","
		   "\"model.layers.0.mlp.down_proj.weight\":\"" FILE1 "\","
		   "\"orphan.weight\":\"" FILE2 "\"}}\n");
	write_text_file(path_in(dir, "config.json"),
		   "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 3,\n"
		   " \"quantization_config\": {\"fmt\": \"e4m3\", \"quant_method\": \"fp8\",\n"
		   "   \"weight_block_size\": [128, 128]}, \"torch_dtype\": \"bfloat16\"}\n");
	write_text_file(path_in(dir, "tokenizer.json"), "{\"model\": {\"type\": \"BPE\"}}\n");
	write_text_file(path_in(dir, "tokenizer_config.json"), "{\"add_bos_token\": true}\n");
	write_text_file(path_in(dir, "generation_config.json"), "{\"temperature\": 0.6}\n");
	write_text_file(path_in(dir, ".hidden"), "not copied\n");
}

/* Written by hand from json.dump's rules (indent=2: ",\n" between items, ": " after keys,
 * ensure_ascii: é as \u00e9, no trailing newline); the input's order, minus the converted
 * weight's scale. */
static const char expected_index[] =
	"{\n"
	"  \"metadata\": {},\n"
	"  \"weight_map\": {\n"
	"    \"model.norm.weight\": \"model-00001-of-00002.safetensors\",\n"
	"    \"caf\\u00e9.weight\": \"model-00002-of-00002.safetensors\",\n"
	"    \"model.layers.0.mlp.down_proj.weight\": \"model-00001-of-00002.safetensors\",\n"
	"    \"orphan.weight\": \"model-00002-of-00002.safetensors\"\n"
	"  }\n"
	"}";

static void test_fp8_cast_index_is_python_json_dump(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096];
	snprintf(in, sizeof in, "%s/small", tmp);
	snprintf(out, sizeof out, "%s/small-bf16", tmp);
	write_small_ckpt(in);
	assert_int_equal(cast(in, out, NULL), 0);
	size_t len;
	char *index = read_whole_file(path_in(out, "model.safetensors.index.json"), &len);
	assert_non_null(index);
	assert_int_equal(len, strlen(expected_index));
	assert_string_equal(index, expected_index);
	free(index);
}

/* The values of the hand-made weight, worked out by hand: 0.5 * {1, -1, 2^-9, 448, 0, 2}. */
static void test_fp8_cast_small_values_by_hand(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096];
	snprintf(in, sizeof in, "%s/small", tmp);
	snprintf(out, sizeof out, "%s/small-bf16", tmp);
	write_small_ckpt(in);
	assert_int_equal(cast(in, out, NULL), 0);
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, path_in(out, FILE1), &err), 0);
	const st_tensor *t = st_find(&f, "model.layers.0.mlp.down_proj.weight");
	assert_non_null(t);
	assert_int_equal(t->dtype, ST_BF16);
	/* 0.5 = 0x3f00, -0.5 = 0xbf00, 2^-10 = 0x3a80, 224 = 0x4360, 0, 1 = 0x3f80 */
	const uint16_t expect[6] = { 0x3f00, 0xbf00, 0x3a80, 0x4360, 0x0000, 0x3f80 };
	assert_memory_equal(t->data, expect, sizeof expect);
	const st_tensor *n = st_find(&f, "model.norm.weight");
	assert_non_null(n);
	assert_memory_equal(n->data, norm_bf16, sizeof norm_bf16);
	assert_int_equal(f.n_metadata, 0); /* save_file without metadata */
	st_close(&f);
}

/* config.json loses quantization_config only; tokenizer and generation files are copied
 * byte for byte; hidden files are not. */
static void test_fp8_cast_rewrites_config_and_copies_other_files(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096];
	snprintf(in, sizeof in, "%s/small", tmp);
	snprintf(out, sizeof out, "%s/small-bf16", tmp);
	write_small_ckpt(in);
	assert_int_equal(cast(in, out, NULL), 0);
	json_error_t jerr;
	json_t *cfg = json_load_file(path_in(out, "config.json"), 0, &jerr);
	assert_non_null(cfg);
	assert_null(json_object_get(cfg, "quantization_config"));
	assert_string_equal(json_string_value(json_object_get(cfg, "model_type")), "deepseek_v3");
	assert_int_equal(json_integer_value(json_object_get(cfg, "hidden_size")), 3);
	assert_string_equal(json_string_value(json_object_get(cfg, "torch_dtype")), "bfloat16");
	json_decref(cfg);
	const char *copied[] = { "tokenizer.json", "tokenizer_config.json", "generation_config.json" };
	for (size_t i = 0; i < 3; i++) {
		char *a = read_whole_file(path_in(in, copied[i]), NULL);
		char *b = read_whole_file(path_in(out, copied[i]), NULL);
		assert_non_null(b);
		assert_string_equal(a, b);
		free(a);
		free(b);
	}
	assert_int_not_equal(access(path_in(out, ".hidden"), F_OK), 0);
	assert_int_equal(run_shell("cd %s && sha256sum --quiet -c SHA256SUMS", out), 0);
}

/* Two FP8 weights without scales: refused before writing, both named. */
static void test_fp8_cast_refuses_missing_scales_naming_each(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096], errf[4096];
	snprintf(in, sizeof in, "%s/noscale", tmp);
	snprintf(out, sizeof out, "%s/noscale-bf16", tmp);
	snprintf(errf, sizeof errf, "%s/stderr", tmp);
	mkdir(in, 0777);
	tensor_def t[] = {
		{ "a.weight", ST_F8_E4M3, 2, { 2, 3 }, down_fp8 },
		{ "b.weight", ST_F8_E4M3, 2, { 3, 2 }, down_fp8 },
		{ "c.weight", ST_F8_E4M3, 2, { 2, 3 }, down_fp8 },
		{ "c.weight_scale_inv", ST_F32, 2, { 1, 1 }, half_scale },
	};
	write_st(path_in(in, FILE1), t, 4);
	write_text_file(path_in(in, "model.safetensors.index.json"),
		   "{\"weight_map\":{\"a.weight\":\"" FILE1 "\",\"b.weight\":\"" FILE1
		   "\",\"c.weight\":\"" FILE1 "\",\"c.weight_scale_inv\":\"" FILE1 "\"}}");
	assert_int_equal(cast(in, out, errf), 2);
	assert_true(file_contains(errf, "a.weight"));
	assert_true(file_contains(errf, "b.weight"));
	assert_false(file_contains(errf, "c.weight"));
	assert_int_equal(count_final_entries(out), 0);
}

/* A scale of the wrong shape names both the weight and the scale. */
static void test_fp8_cast_refuses_wrong_scale_shape(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096], errf[4096];
	snprintf(in, sizeof in, "%s/badscale", tmp);
	snprintf(out, sizeof out, "%s/badscale-bf16", tmp);
	snprintf(errf, sizeof errf, "%s/stderr", tmp);
	mkdir(in, 0777);
	const float scales[2] = { 1, 1 };
	tensor_def t[] = {
		{ "a.weight", ST_F8_E4M3, 2, { 2, 3 }, down_fp8 },
		{ "a.weight_scale_inv", ST_F32, 2, { 1, 2 }, scales },
	};
	write_st(path_in(in, FILE1), t, 2);
	write_text_file(path_in(in, "model.safetensors.index.json"),
		   "{\"weight_map\":{\"a.weight\":\"" FILE1 "\",\"a.weight_scale_inv\":\"" FILE1
		   "\"}}");
	assert_int_equal(cast(in, out, errf), 2);
	assert_true(file_contains(errf, "a.weight_scale_inv"));
	assert_true(file_contains(errf, "[1, 2]"));
	assert_int_equal(count_final_entries(out), 0);
}

/* DeepSeek-V3.1 (scale_fmt ue8m0): power-of-two scales, blocks cut at 128 rows and columns,
 * a product that is subnormal in float32 and BF16. */
static void test_fp8_cast_ue8m0_power_of_two_scales(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096];
	snprintf(in, sizeof in, "%s/ue8m0", tmp);
	snprintf(out, sizeof out, "%s/ue8m0-bf16", tmp);
	mkdir(in, 0777);
	enum { ROWS = 130, COLS = 260 };
	static uint8_t w[ROWS * COLS];
	for (size_t i = 0; i < sizeof w; i++)
		w[i] = (uint8_t)(i * 37 + i / 251);
	const float scales[6] = { ldexpf(1, -7), ldexpf(1, 4), 1.0f, ldexpf(1, -120), ldexpf(1, 10),
				  ldexpf(1, -1) };
	tensor_def f1[] = { { "model.layers.0.mlp.up_proj.weight", ST_F8_E4M3, 2, { ROWS, COLS }, w } };
	tensor_def f2[] = { { "model.layers.0.mlp.up_proj.weight_scale_inv", ST_F32, 2, { 2, 3 },
			      scales } };
	write_st(path_in(in, FILE1), f1, 1);
	write_st(path_in(in, FILE2), f2, 1);
	write_text_file(path_in(in, "model.safetensors.index.json"),
		   "{\"weight_map\":{\"model.layers.0.mlp.up_proj.weight\":\"" FILE1
		   "\",\"model.layers.0.mlp.up_proj.weight_scale_inv\":\"" FILE2 "\"}}");
	write_text_file(path_in(in, "config.json"),
		   "{\"quantization_config\": {\"fmt\": \"e4m3\", \"scale_fmt\": \"ue8m0\", "
		   "\"weight_block_size\": [128, 128]}}");
	assert_int_equal(cast(in, out, NULL), 0);
	st_file o, fw, fs;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&o, path_in(out, FILE1), &err), 0);
	assert_int_equal(st_open(&fw, path_in(in, FILE1), &err), 0);
	assert_int_equal(st_open(&fs, path_in(in, FILE2), &err), 0);
	check_dequant(&fw.tensors[0], &fs.tensors[0], &o.tensors[0]);
	st_close(&o);
	st_close(&fw);
	st_close(&fs);
	/* the scale's file keeps no tensors but still exists, as fp8_cast_bf16.py writes it */
	assert_int_equal(access(path_in(out, FILE2), F_OK), 0);
}

static void test_fp8_cast_usage_help_version(void **state)
{
	(void)state;
	assert_int_equal(run_shell("%s/dsv3-fp8-to-bf16 --help >/dev/null", bin_dir()), 0);
	assert_int_equal(run_shell("%s/dsv3-fp8-to-bf16 --version | grep -q '^dsv3-fp8-to-bf16 '",
			     bin_dir()), 0);
	assert_int_equal(run_shell("%s/dsv3-fp8-to-bf16 2>/dev/null", bin_dir()), 1);
	assert_int_equal(run_shell("%s/dsv3-fp8-to-bf16 --input-fp8-hf-path x 2>/dev/null", bin_dir()), 1);
	assert_int_equal(run_shell("%s/dsv3-fp8-to-bf16 -i a -o b --threads 0 2>/dev/null", bin_dir()), 1);
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_fp8_cast_synth_values_match_reference),
		T(test_fp8_cast_bf16_input_passes_through),
		T(test_fp8_cast_index_is_python_json_dump),
		T(test_fp8_cast_small_values_by_hand),
		T(test_fp8_cast_rewrites_config_and_copies_other_files),
		T(test_fp8_cast_refuses_missing_scales_naming_each),
		T(test_fp8_cast_refuses_wrong_scale_shape),
		T(test_fp8_cast_ue8m0_power_of_two_scales),
		cmocka_unit_test(test_fp8_cast_usage_help_version),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
