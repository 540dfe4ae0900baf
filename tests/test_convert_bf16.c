/* dsv3-convert --dtype bf16: an FP8 checkpoint straight to BF16 model-parallel shards. The
 * expected output is what dsv3-fp8-to-bf16 followed by dsv3-convert write (both checked
 * against PyTorch in test_golden_tools); the one-pass directory must equal it in every file,
 * byte for byte. Also: --dtype fp8 and BF16 inputs are the normal conversion, a bad --dtype is
 * a usage error, a weight without its scale is refused with nothing written. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "support/test_support.h"

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "convbf16");
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The sorted entry names of dir (at most 64). */
static size_t list_dir(const char *dir, char **names)
{
	DIR *d = opendir(dir);
	assert_non_null(d);
	size_t n = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		assert_true(n < 64);
		names[n++] = strdup(e->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof *names, cmp_str);
	return n;
}

/* The same file names in both directories, each file the same bytes. */
static void assert_dirs_equal(const char *expect, const char *got)
{
	char *a[64], *b[64];
	size_t na = list_dir(expect, a), nb = list_dir(got, b);
	assert_int_equal(na, nb);
	for (size_t i = 0; i < na; i++) {
		assert_string_equal(a[i], b[i]);
		size_t la, lb;
		char *x = assert_read_file(path_in(expect, a[i]), &la);
		char *y = assert_read_file(path_in(got, b[i]), &lb);
		if (la != lb || memcmp(x, y, la) != 0)
			fail_msg("%s differs from %s", path_in(got, b[i]), path_in(expect, a[i]));
		free(x);
		free(y);
		free(a[i]);
		free(b[i]);
	}
}

/* A tiny FP8 checkpoint in two files with the MTP layer and a tokenizer file to copy. */
static const char *make_fp8_input(const char *tmp)
{
	const char *in = fresh_path(tmp, "in");
	assert_int_equal(run_synth("tiny", 11, "--files 2 --mtp", in), 0);
	write_text_file(path_in(in, "tokenizer_config.json"), "{\"model_max_length\": 16}\n");
	return in;
}

/* The two existing tools, the intermediate in tmp/mid. */
static void two_step(const char *tmp, const char *in, const char *out, const char *args)
{
	const char *mid = fresh_path(tmp, "mid");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s "
				   "--output-bf16-hf-path %s", bin_dir(), in, mid), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s %s",
				   bin_dir(), mid, out, args), 0);
	remove_tree(mid);
}

static void check_one_pass(void **state, int mp, const char *extra)
{
	const char *tmp = *state;
	const char *in = make_fp8_input(tmp);
	char args[128];
	snprintf(args, sizeof args, "--n-experts 16 --model-parallel %d %s", mp, extra);
	const char *expect = fresh_path(tmp, "two-step");
	two_step(tmp, in, expect, args);
	const char *got = fresh_path(tmp, "one-pass");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s %s "
				   "--dtype bf16 --threads 2", bin_dir(), in, got, args), 0);
	assert_dirs_equal(expect, got);
	/* Not the trivial equality of two FP8 outputs: every weight is BF16, no scale is left. */
	assert_false(file_contains(path_in(got, "tensors.sha256.json"), "F8_E4M3"));
	assert_false(file_contains(path_in(got, "tensors.sha256.json"), ".scale\""));
	assert_false(file_contains(path_in(got, "config.json"), "quantization_config"));
	assert_true(file_contains(path_in(got, "SHA256SUMS"), "  tokenizer_config.json\n"));
}

static void test_one_pass_bf16_equals_cast_then_convert_mp1(void **state)
{
	check_one_pass(state, 1, "");
}

static void test_one_pass_bf16_equals_cast_then_convert_mp2(void **state)
{
	check_one_pass(state, 2, "");
}

static void test_one_pass_bf16_equals_cast_then_convert_mp4(void **state)
{
	check_one_pass(state, 4, "");
}

static void test_one_pass_bf16_keeps_mtp_like_two_steps(void **state)
{
	check_one_pass(state, 2, "--keep-mtp");
}

/* --dtype fp8 is today's conversion, and --dtype bf16 of a BF16 input too. */
static void test_dtype_fp8_and_bf16_input_are_the_normal_conversion(void **state)
{
	const char *tmp = *state;
	const char *in = make_fp8_input(tmp);
	const char *plain = fresh_path(tmp, "plain"), *fp8 = fresh_path(tmp, "fp8");
	const char *args = "--n-experts 16 --model-parallel 2";
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s %s",
				   bin_dir(), in, plain, args), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s %s "
				   "--dtype fp8", bin_dir(), in, fp8, args), 0);
	assert_dirs_equal(plain, fp8);
	assert_true(file_contains(path_in(fp8, "tensors.sha256.json"), "F8_E4M3"));

	const char *bin = fresh_path(tmp, "bf16-in");
	assert_int_equal(run_synth("tiny", 12, "--dtype bf16", bin), 0);
	const char *a = fresh_path(tmp, "a"), *b = fresh_path(tmp, "b");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s %s",
				   bin_dir(), bin, a, args), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s %s "
				   "--dtype bf16", bin_dir(), bin, b, args), 0);
	assert_dirs_equal(a, b);
}

static void test_convert_refuses_unknown_dtype(void **state)
{
	const char *tmp = *state;
	const char *in = make_fp8_input(tmp);
	const char *out = fresh_path(tmp, "out");
	const char *err = path_in(tmp, "err.txt");
	assert_int_equal(run_quiet(err, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s "
				   "--n-experts 16 --model-parallel 1 --dtype fp16", bin_dir(), in,
				   out), 1);
	assert_file_contains(err, "--dtype");
	assert_false(path_exists(out));
	assert_int_equal(run_shell("%s/dsv3-convert --help > %s", bin_dir(),
				   path_in(tmp, "help.txt")), 0);
	assert_file_contains(path_in(tmp, "help.txt"), "--dtype");
}

/* The input rewritten without one weight's scale (and without its index, which would name it). */
static void drop_one_scale(const char *in, char *dropped, size_t len)
{
	const char *file = path_in(in, "model-00001-of-00001.safetensors");
	char *bytes;
	size_t size;
	bytes = assert_read_file(file, &size);
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_parse(&f, (const uint8_t *)bytes, size, file, &err), 0);
	st_spec specs[512];
	const void *data[512];
	size_t n = 0;
	dropped[0] = 0;
	for (size_t i = 0; i < f.n_tensors; i++) {
		const st_tensor *t = &f.tensors[i];
		const char *suffix = strstr(t->name, "weight_scale_inv");
		if (!dropped[0] && suffix && strstr(t->name, "mlp.experts.3.")) {
			snprintf(dropped, len, "%.*sweight", (int)(suffix - t->name), t->name);
			continue;
		}
		assert_true(n < 512);
		specs[n] = (st_spec){ t->name, t->dtype, t->ndim, { 0 } };
		memcpy(specs[n].shape, t->shape, sizeof specs[n].shape);
		data[n++] = t->data;
	}
	assert_true(dropped[0] != 0);
	char tmp_file[4096];
	snprintf(tmp_file, sizeof tmp_file, "%s.new", file);
	write_safetensors(tmp_file, specs, data, n);
	st_close(&f);
	free(bytes);
	assert_int_equal(rename(tmp_file, file), 0);
	assert_int_equal(remove(path_in(in, "model.safetensors.index.json")), 0);
}

static void test_missing_scale_is_refused_with_nothing_written(void **state)
{
	const char *tmp = *state;
	const char *in = fresh_path(tmp, "in");
	assert_int_equal(run_synth("tiny", 13, "", in), 0);
	char dropped[256];
	drop_one_scale(in, dropped, sizeof dropped);
	const char *out = fresh_path(tmp, "out");
	const char *err = path_in(tmp, "err.txt");
	assert_int_equal(run_quiet(err, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s "
				   "--n-experts 16 --model-parallel 2 --dtype bf16", bin_dir(), in,
				   out), 2);
	assert_file_contains(err, dropped);
	assert_file_contains(err, "no scale");
	int finals, temps;
	count_dir_entries(out, &finals, &temps);
	assert_int_equal(finals, 0);
	assert_int_equal(temps, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_one_pass_bf16_equals_cast_then_convert_mp1,
						make_tmp, tmp_dir_teardown),
		cmocka_unit_test_setup_teardown(test_one_pass_bf16_equals_cast_then_convert_mp2,
						make_tmp, tmp_dir_teardown),
		cmocka_unit_test_setup_teardown(test_one_pass_bf16_equals_cast_then_convert_mp4,
						make_tmp, tmp_dir_teardown),
		cmocka_unit_test_setup_teardown(test_one_pass_bf16_keeps_mtp_like_two_steps,
						make_tmp, tmp_dir_teardown),
		cmocka_unit_test_setup_teardown(test_dtype_fp8_and_bf16_input_are_the_normal_conversion,
						make_tmp, tmp_dir_teardown),
		cmocka_unit_test_setup_teardown(test_convert_refuses_unknown_dtype, make_tmp,
						tmp_dir_teardown),
		cmocka_unit_test_setup_teardown(test_missing_scale_is_refused_with_nothing_written,
						make_tmp, tmp_dir_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
