/* dsv3-bf16-to-fp8 end to end: every output tensor's bytes against the independent reference
 * golden/make_bf16_to_fp8_ref.py (PyTorch, or its plain-Python twin) for both scale formats;
 * the index and config.json; dsv3-fp8-to-bf16 of the result against the input within E4M3's
 * precision; refusals with their exit codes and no partial output. */
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
#include <unistd.h>

#include "hf_ckpt.h"
#include "safetensors.h"
#include "sha256.h"
#include "support/test_support.h"

#define GOLDEN "golden/bf16_to_fp8"
#define INPUT GOLDEN "/input"

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "bf16fp8");
}

/* Runs the tool; stderr to errf (may be NULL); returns its exit code. */
static int quantise(const char *in, const char *out, const char *extra, const char *errf)
{
	return run_quiet(errf, "%s/dsv3-bf16-to-fp8 --input-bf16-hf-path %s --output-fp8-hf-path %s %s",
			 bin_dir(), in, out, extra);
}

static void shape_text(const st_tensor *t, char *buf, size_t len)
{
	size_t o = 0;
	buf[0] = '\0';
	for (int d = 0; d < t->ndim && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? "x" : "", (long long)t->shape[d]);
}

/* Every line of expected.sha256 for `fmt` names an output tensor with that dtype, shape and
 * SHA-256 of its bytes, and the output has no other tensor. */
static void check_against_reference(const char *out, const char *fmt)
{
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, out, &err), 0);
	FILE *f = fopen(GOLDEN "/expected.sha256", "r");
	assert_non_null(f);
	char line[1024], sha[80], lfmt[32], name[512], dtype[32], shape[64];
	size_t lines = 0;
	while (fgets(line, sizeof line, f)) {
		if (line[0] == '#')
			continue;
		assert_int_equal(sscanf(line, "%79s %31s %511s %31s %63s", sha, lfmt, name, dtype, shape), 5);
		if (strcmp(lfmt, fmt) != 0)
			continue;
		lines++;
		const st_tensor *t = hf_ckpt_find(&c, name, NULL);
		if (!t)
			fail_msg("%s: tensor %s missing", fmt, name);
		char got_shape[64], hex[65];
		uint8_t digest[32];
		shape_text(t, got_shape, sizeof got_shape);
		sha256_buffer(t->data, t->nbytes, digest);
		sha256_hex(digest, hex);
		if (strcmp(dtype_name(t->dtype), dtype) || strcmp(got_shape, shape) || strcmp(hex, sha))
			fail_msg("%s: %s: got %s %s %s, reference %s %s %s", fmt, name,
				 dtype_name(t->dtype), got_shape, hex, dtype, shape, sha);
	}
	fclose(f);
	assert_true(lines > 0);
	assert_int_equal(c.n_lookup, lines);
	hf_ckpt_close(&c);
}

/* The index: each scale right after its weight in the same file, total_size the output's
 * tensor bytes; config.json: DeepSeek's quantization_config. */
static void check_index_and_config(const char *out, int ue8m0)
{
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, out, &err), 0);
	uint64_t total = 0;
	for (size_t f = 0; f < c.n_files; f++)
		for (size_t i = 0; i < c.files[f].n_tensors; i++)
			total += c.files[f].tensors[i].nbytes;
	size_t scales = 0;
	for (size_t i = 0; i < c.n_index; i++) {
		const char *n = c.index_tensors[i];
		size_t len = strlen(n);
		if (len > 10 && strcmp(n + len - 10, "_scale_inv") == 0) {
			assert_true(i > 0);
			assert_int_equal(strncmp(c.index_tensors[i - 1], n, len - 10), 0);
			assert_int_equal(strlen(c.index_tensors[i - 1]), len - 10);
			assert_string_equal(c.index_files[i - 1], c.index_files[i]);
			scales++;
		}
	}
	assert_int_equal(scales, 6); /* the input's 6 *_proj weights other than eh_proj */
	assert_int_equal(c.n_index, c.n_lookup);
	hf_ckpt_close(&c);
	json_error_t jerr;
	json_t *idx = json_load_file(path_in(out, "model.safetensors.index.json"), 0, &jerr);
	assert_non_null(idx);
	assert_int_equal(json_integer_value(json_object_get(json_object_get(idx, "metadata"),
							    "total_size")), (json_int_t)total);
	json_decref(idx);
	json_t *cfg = json_load_file(path_in(out, "config.json"), 0, &jerr);
	assert_non_null(cfg);
	json_t *q = json_object_get(cfg, "quantization_config");
	assert_string_equal(json_string_value(json_object_get(q, "activation_scheme")), "dynamic");
	assert_string_equal(json_string_value(json_object_get(q, "fmt")), "e4m3");
	assert_string_equal(json_string_value(json_object_get(q, "quant_method")), "fp8");
	json_t *bs = json_object_get(q, "weight_block_size");
	assert_int_equal(json_array_size(bs), 2);
	assert_int_equal(json_integer_value(json_array_get(bs, 0)), 128);
	assert_int_equal(json_integer_value(json_array_get(bs, 1)), 128);
	if (ue8m0)
		assert_string_equal(json_string_value(json_object_get(q, "scale_fmt")), "ue8m0");
	else
		assert_null(json_object_get(q, "scale_fmt"));
	assert_int_equal(json_object_size(q), ue8m0 ? 5 : 4);
	assert_string_equal(json_string_value(json_object_get(cfg, "model_type")), "deepseek_v3");
	json_decref(cfg);
}

static void test_bf16_to_fp8_matches_reference(void **state)
{
	const char *out = path_in(*state, "fp8");
	assert_int_equal(quantise(INPUT, out, "--threads 2", NULL), 0);
	check_against_reference(out, "default");
	check_index_and_config(out, 0);
	assert_true(file_contains(path_in(out, "generation_config.json"), "temperature"));
	assert_int_equal(run_shell("cd %s && sha256sum --quiet -c SHA256SUMS", out), 0);
	assert_true(file_contains(path_in(out, "tensors.sha256.json"), "q_a_proj.weight_scale_inv"));
}

static void test_bf16_to_fp8_ue8m0_matches_reference(void **state)
{
	const char *out = path_in(*state, "fp8-ue8m0");
	assert_int_equal(quantise(INPUT, out, "--scale-fmt ue8m0 --threads 1", NULL), 0);
	check_against_reference(out, "ue8m0");
	check_index_and_config(out, 1);
}

/* The output does not depend on the thread count. */
static void test_bf16_to_fp8_same_bytes_for_any_thread_count(void **state)
{
	char a[4096], b[4096];
	snprintf(a, sizeof a, "%s/t1", (const char *)*state);
	snprintf(b, sizeof b, "%s/t3", (const char *)*state);
	assert_int_equal(quantise(INPUT, a, "--threads 1", NULL), 0);
	assert_int_equal(quantise(INPUT, b, "--threads 3", NULL), 0);
	assert_int_equal(run_shell("diff -r %s %s >/dev/null", a, b), 0);
}

/* ---- round trip ---- */

static double bf16_value(const uint8_t *p)
{
	uint16_t b;
	memcpy(&b, p, 2);
	uint32_t bits = (uint32_t)b << 16;
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

/* The most |y - x| may be after quantising x with scale s and dequantising to y:
 * q = e4m3(fl32(x/s)) is within half an E4M3 ulp h of x/s (h = 2^(e-4) for |x/s| in
 * [2^e, 2^(e+1)), e >= -6, and 2^-10 below, where the steps are 2^-9), plus fl32's 2^-24
 * relative error of x/s; y = bf16(fl32(q*s)) adds fl32's 2^-24 and BF16's half ulp (8
 * significant bits: 2^(e-8) for |y| in [2^e, 2^(e+1)), so at most 2^-8 |y|, and
 * |y| <= |x| + s*h). The 2^-20 margins cover the float32 steps. */
static double round_trip_bound(double x, double s)
{
	double v = fabs(x) / s;
	int e;
	frexp(v, &e); /* v in [2^(e-1), 2^e) */
	int binade = e - 1 < -6 ? -6 : e - 1;
	double h = ldexp(1.0, binade - 4) + v * 0x1p-24;
	double err = s * h * (1 + 0x1p-20);
	return err + ldexp(fabs(x) + err, -8) * (1 + 0x1p-20);
}

static void check_round_trip(const hf_ckpt *in, const hf_ckpt *fp8, const hf_ckpt *back)
{
	assert_int_equal(back->n_lookup, in->n_lookup);
	for (size_t f = 0; f < in->n_files; f++)
		for (size_t i = 0; i < in->files[f].n_tensors; i++) {
			const st_tensor *x = &in->files[f].tensors[i];
			const st_tensor *y = hf_ckpt_find(back, x->name, NULL);
			const st_tensor *q = hf_ckpt_find(fp8, x->name, NULL);
			assert_non_null(y);
			assert_int_equal(y->dtype, ST_BF16);
			assert_int_equal(y->nbytes, x->nbytes);
			if (q->dtype != ST_F8_E4M3) {
				assert_memory_equal(y->data, x->data, x->nbytes);
				continue;
			}
			char sname[600];
			snprintf(sname, sizeof sname, "%s_scale_inv", x->name);
			const st_tensor *s = hf_ckpt_find(fp8, sname, NULL);
			assert_non_null(s);
			int64_t cols = x->shape[1];
			double worst = 0;
			for (int64_t k = 0; k < x->shape[0] * cols; k++) {
				float sv;
				memcpy(&sv, s->data + 4 * ((k / cols / 128) * s->shape[1] + k % cols / 128), 4);
				double xv = bf16_value(x->data + 2 * k), yv = bf16_value(y->data + 2 * k);
				double bound = round_trip_bound(xv, sv);
				if (fabs(yv - xv) > bound)
					fail_msg("%s[%lld]: x %a, back %a, scale %a: error %a > bound %a",
						 x->name, (long long)k, xv, yv, (double)sv, fabs(yv - xv), bound);
				if (bound > 0 && fabs(yv - xv) / bound > worst)
					worst = fabs(yv - xv) / bound;
			}
			assert_true(worst > 0.4); /* the bound is not vacuous */
		}
}

static void round_trip(const char *tmp, const char *extra)
{
	char fp8[4096], back[4096];
	snprintf(fp8, sizeof fp8, "%s/rt-fp8", tmp);
	snprintf(back, sizeof back, "%s/rt-bf16", tmp);
	remove_tree(fp8);
	remove_tree(back);
	assert_int_equal(quantise(INPUT, fp8, extra, NULL), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s "
				   "--output-bf16-hf-path %s", bin_dir(), fp8, back), 0);
	hf_ckpt a, b, c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&a, INPUT, &err), 0);
	assert_int_equal(hf_ckpt_open(&b, fp8, &err), 0);
	assert_int_equal(hf_ckpt_open(&c, back, &err), 0);
	check_round_trip(&a, &b, &c);
	hf_ckpt_close(&a);
	hf_ckpt_close(&b);
	hf_ckpt_close(&c);
	/* The way back drops quantization_config again: the config is the input's (as JSON; the
	 * two writers format numbers differently). */
	json_error_t jerr;
	json_t *x = json_load_file(INPUT "/config.json", 0, &jerr);
	json_t *y = json_load_file(path_in(back, "config.json"), 0, &jerr);
	assert_true(x && y && json_equal(x, y));
	json_decref(x);
	json_decref(y);
}

static void test_bf16_to_fp8_round_trip_within_e4m3_precision(void **state)
{
	round_trip(*state, "");
}

static void test_bf16_to_fp8_ue8m0_round_trip_within_e4m3_precision(void **state)
{
	round_trip(*state, "--scale-fmt ue8m0");
}

/* ---- refusals ---- */

static void test_bf16_to_fp8_refuses_fp8_input(void **state)
{
	const char *tmp = *state;
	char fp8[4096], again[4096], errf[4096];
	snprintf(fp8, sizeof fp8, "%s/fp8", tmp);
	snprintf(again, sizeof again, "%s/again", tmp);
	snprintf(errf, sizeof errf, "%s/stderr", tmp);
	assert_int_equal(quantise(INPUT, fp8, "", NULL), 0);
	assert_int_equal(quantise(fp8, again, "", errf), 2);
	assert_true(file_contains(errf, "already quantised"));
	assert_int_equal(count_final_entries(again), 0);
	/* Without the config's hint too: the FP8 tensors themselves are named. */
	unlink(path_in(fp8, "config.json"));
	assert_int_equal(quantise(fp8, again, "", errf), 2);
	assert_true(file_contains(errf, "model.layers.0.self_attn.q_a_proj.weight"));
	assert_true(file_contains(errf, "already quantised"));
	assert_int_equal(count_final_entries(again), 0);
}

static void test_bf16_to_fp8_usage_errors(void **state)
{
	const char *tmp = *state;
	const char *bin = bin_dir();
	char errf[4096];
	snprintf(errf, sizeof errf, "%s/stderr", tmp);
	assert_int_equal(run_quiet(errf, "%s/dsv3-bf16-to-fp8 --input-bf16-hf-path %s", bin, INPUT), 1);
	assert_true(file_contains(errf, "required"));
	assert_int_equal(run_quiet(errf, "%s/dsv3-bf16-to-fp8 --output-fp8-hf-path %s/o", bin, tmp), 1);
	assert_int_equal(quantise(INPUT, path_in(tmp, "o"), "--scale-fmt e8m0", errf), 1);
	assert_true(file_contains(errf, "ue8m0"));
	assert_int_equal(quantise(INPUT, path_in(tmp, "o"), "--threads 0", NULL), 1);
	assert_int_equal(quantise(INPUT, path_in(tmp, "o"), "stray", NULL), 1);
	assert_int_equal(quantise(INPUT, path_in(tmp, "o"), "--bogus", NULL), 1);
	assert_false(path_exists(path_in(tmp, "o")));
	assert_int_equal(run_shell("%s/dsv3-bf16-to-fp8 --help | grep -q scale-fmt", bin), 0);
	assert_int_equal(run_shell("%s/dsv3-bf16-to-fp8 --version | grep -q dsv3-bf16-to-fp8", bin), 0);
}

/* Output over the input (any spelling) is refused before anything is written. */
static void test_bf16_to_fp8_refuses_output_equal_to_input(void **state)
{
	const char *tmp = *state;
	char in[4096];
	snprintf(in, sizeof in, "%s/in", tmp);
	assert_int_equal(run_shell("cp -r %s %s", INPUT, in), 0);
	int before = count_final_entries(in);
	assert_int_equal(quantise(in, in, "", NULL), 1);
	assert_int_equal(quantise(in, path_in(in, "."), "", NULL), 1);
	assert_int_equal(count_final_entries(in), before);
	assert_int_equal(run_shell("diff -r %s %s >/dev/null", INPUT, in), 0);
}

/* A checkpoint of one tiny file with a given weight; its index names it. */
static void write_one_weight(const char *dir, const char *name, st_dtype dtype, const void *data)
{
	mkdir(dir, 0777);
	st_spec spec = { name, dtype, 2, { 2, 2 } };
	const void *d[] = { data };
	write_safetensors(path_in(dir, "model.safetensors"), &spec, d, 1);
	char idx[1024];
	snprintf(idx, sizeof idx, "{\"weight_map\":{\"%s\":\"model.safetensors\"}}", name);
	write_text_file(path_in(dir, "model.safetensors.index.json"), idx);
}

/* A NaN is found while writing: the run fails with no file under a final name and no
 * temporary left. */
static void test_bf16_to_fp8_nan_leaves_no_partial_output(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096], errf[4096];
	snprintf(in, sizeof in, "%s/nan", tmp);
	snprintf(out, sizeof out, "%s/nan-out", tmp);
	snprintf(errf, sizeof errf, "%s/stderr", tmp);
	const uint16_t bits[] = { 0x3f80, 0x7fc0, 0x4000, 0xbf80 };
	write_one_weight(in, "model.layers.0.mlp.up_proj.weight", ST_BF16, bits);
	assert_int_equal(quantise(in, out, "", errf), 2);
	assert_true(file_contains(errf, "model.layers.0.mlp.up_proj.weight"));
	int finals, temps;
	count_dir_entries(out, &finals, &temps);
	assert_int_equal(finals, 0);
	assert_int_equal(temps, 0);
}

/* A weight to quantise must be BF16: an F32 one is refused, named, before writing. */
static void test_bf16_to_fp8_refuses_non_bf16_weight(void **state)
{
	const char *tmp = *state;
	char in[4096], out[4096], errf[4096];
	snprintf(in, sizeof in, "%s/f32", tmp);
	snprintf(out, sizeof out, "%s/f32-out", tmp);
	snprintf(errf, sizeof errf, "%s/stderr", tmp);
	const float vals[] = { 1, 2, 3, 4 };
	write_one_weight(in, "model.layers.0.self_attn.o_proj.weight", ST_F32, vals);
	assert_int_equal(quantise(in, out, "", errf), 2);
	assert_true(file_contains(errf, "o_proj.weight is F32"));
	assert_int_equal(count_final_entries(out), 0);
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_bf16_to_fp8_matches_reference),
		T(test_bf16_to_fp8_ue8m0_matches_reference),
		T(test_bf16_to_fp8_same_bytes_for_any_thread_count),
		T(test_bf16_to_fp8_round_trip_within_e4m3_precision),
		T(test_bf16_to_fp8_ue8m0_round_trip_within_e4m3_precision),
		T(test_bf16_to_fp8_refuses_fp8_input),
		T(test_bf16_to_fp8_usage_errors),
		T(test_bf16_to_fp8_refuses_output_equal_to_input),
		T(test_bf16_to_fp8_nan_leaves_no_partial_output),
		T(test_bf16_to_fp8_refuses_non_bf16_weight),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
