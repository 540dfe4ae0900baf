/* dsv3-verify end to end: checksums on HF and converted directories (clean, a flipped bit, a
 * deleted file, a diverging replicated copy) and ckpt against config.json (clean synthetic
 * checkpoints and their mp2 conversions; a dropped tensor, a wrong shape, a wrong scale shape). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "safetensors.h"
#include "support/test_support.h"

/* ---- helpers ---- */

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "verify");
}

/* stderr of the last verify run, in the test's directory */
static const char *err_path(const char *tmp)
{
	return path_in(tmp, "stderr");
}

static int verify(const char *tmp, const char *cmd, const char *dir)
{
	return run_shell("%s/dsv3-verify %s %s >%s 2>%s", bin_dir(), cmd, dir, path_in(tmp, "stdout"),
		   err_path(tmp));
}

static void synth(const char *preset, const char *dir, int files)
{
	char args[32];
	snprintf(args, sizeof args, "--files %d", files);
	assert_int_equal(run_synth(preset, 1, args, dir), 0);
}

static int config_experts(const char *dir)
{
	json_error_t jerr;
	json_t *cfg = json_load_file(path_in(dir, "config.json"), 0, &jerr);
	assert_non_null(cfg);
	int e = (int)json_integer_value(json_object_get(cfg, "n_routed_experts"));
	json_decref(cfg);
	return e;
}

static void convert(const char *in, const char *out, int mp)
{
	assert_int_equal(run_shell("%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts %d "
			     "--model-parallel %d 2>/dev/null",
			     bin_dir(), in, out, config_experts(in), mp),
			 0);
}

/* Flips one bit in the middle of tensor `name`'s data in `file`; the offset comes from the
 * format: 8-byte length, header, data area. */
static void flip_bit(const char *file, const char *name)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, file, &err), 0);
	const st_tensor *t = st_find(&f, name);
	assert_non_null(t);
	assert_true(t->nbytes > 0);
	off_t off = (off_t)(8 + f.header_len + t->begin + t->nbytes / 2);
	st_close(&f);
	int fd = open(file, O_RDWR);
	assert_true(fd >= 0);
	uint8_t b;
	assert_int_equal(pread(fd, &b, 1, off), 1);
	b ^= 0x10;
	assert_int_equal(pwrite(fd, &b, 1, off), 1);
	close(fd);
}

/* Name of the first tensor in `file` whose name ends with `suffix` and has `ndim` dims. */
static char *tensor_with(const char *file, const char *suffix, int ndim, int skip)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, file, &err), 0);
	char *found = NULL;
	for (size_t i = 0; i < f.n_tensors && !found; i++) {
		const char *n = f.tensors[i].name;
		size_t a = strlen(n), b = strlen(suffix);
		if (a >= b && !strcmp(n + a - b, suffix) && f.tensors[i].ndim == ndim && skip-- == 0)
			found = strdup(n);
	}
	st_close(&f);
	assert_non_null(found);
	return found;
}

/* ---- checksums ---- */

static void test_verify_checksums_ok_on_synth(void **state)
{
	const char *tmp = *state;
	char *dir = strdup(path_in(tmp, "fp8"));
	synth("tiny", dir, 3);
	assert_int_equal(verify(tmp, "checksums", dir), 0);
	assert_true(file_contains(path_in(tmp, "stdout"), "OK: "));
	free(dir);
}

static void test_verify_checksums_names_flipped_tensor(void **state)
{
	const char *tmp = *state;
	char *dir = strdup(path_in(tmp, "fp8"));
	synth("tiny", dir, 3);
	char *file = strdup(path_in(dir, "model-00002-of-00003.safetensors"));
	char *name = tensor_with(file, ".weight", 2, 0);
	flip_bit(file, name);
	assert_int_equal(verify(tmp, "checksums", dir), 2);
	char line[1024];
	snprintf(line, sizeof line, "model-00002-of-00003.safetensors: tensor %s: SHA-256 differs",
		 name);
	assert_true(file_contains(err_path(tmp), line));
	assert_true(file_contains(err_path(tmp),
				  "model-00002-of-00003.safetensors: SHA-256 differs from SHA256SUMS"));
	free(name);
	free(file);
	free(dir);
}

static void test_verify_checksums_names_deleted_file(void **state)
{
	const char *tmp = *state;
	char *dir = strdup(path_in(tmp, "fp8"));
	synth("tiny", dir, 3);
	assert_int_equal(unlink(path_in(dir, "model-00003-of-00003.safetensors")), 0);
	assert_int_equal(verify(tmp, "checksums", dir), 2);
	assert_true(file_contains(err_path(tmp), "model-00003-of-00003.safetensors: missing"));
	free(dir);
}

static void test_verify_checksums_converted_mp2(void **state)
{
	const char *tmp = *state;
	char *in = strdup(path_in(tmp, "fp8")), *mp = strdup(path_in(tmp, "mp2"));
	synth("tiny", in, 3);
	convert(in, mp, 2);
	assert_int_equal(verify(tmp, "checksums", mp), 0);
	assert_true(file_contains(path_in(tmp, "stdout"), "OK: "));

	/* a row-split weight on rank 1: the logical tensor's hash no longer matches */
	char *file = strdup(path_in(mp, "model1-mp2.safetensors"));
	flip_bit(file, "layers.0.attn.wq_b.weight");
	assert_int_equal(verify(tmp, "checksums", mp), 2);
	assert_true(file_contains(err_path(tmp), "tensor layers.0.attn.wq_b.weight: SHA-256 differs"));
	assert_true(file_contains(err_path(tmp), "model1-mp2.safetensors: SHA-256 differs"));
	free(file);
	free(in);
	free(mp);
}

/* A replicated tensor whose rank-1 copy differs from rank 0's is named with its file. */
static void test_verify_checksums_converted_replica_differs(void **state)
{
	const char *tmp = *state;
	char *in = strdup(path_in(tmp, "fp8")), *mp = strdup(path_in(tmp, "mp2"));
	synth("tiny", in, 1);
	convert(in, mp, 2);
	flip_bit(path_in(mp, "model1-mp2.safetensors"), "layers.1.attn_norm.weight");
	assert_int_equal(verify(tmp, "checksums", mp), 2);
	assert_true(file_contains(err_path(tmp), "model1-mp2.safetensors: tensor "
						 "layers.1.attn_norm.weight: replicated copy differs"));
	free(in);
	free(mp);
}

/* ---- ckpt ---- */

static void test_verify_ckpt_ok_on_synth_and_conversions(void **state)
{
	const char *tmp = *state;
	static const char *presets[] = { "tiny", "tiny-v2" };
	for (int i = 0; i < 2; i++) {
		char *in = strdup(path_in(tmp, presets[i])), *mp = strdup(path_in(tmp, "mp2"));
		synth(presets[i], in, 2);
		assert_int_equal(verify(tmp, "ckpt", in), 0);
		assert_true(file_contains(path_in(tmp, "stdout"), "OK: "));
		convert(in, mp, 2);
		assert_int_equal(verify(tmp, "ckpt", mp), 0);
		assert_true(file_contains(path_in(tmp, "stdout"), "converted layout"));
		assert_int_equal(run_shell("rm -rf %s", mp), 0);
		free(in);
		free(mp);
	}
}

/* Rewrites `file` without tensor `drop`, with `reshape` given one element fewer in dim 0 and
 * the scale `rescale` given one more column: data is zeros where the size changed. */
static void rewrite_broken(const char *file, const char *drop, const char *reshape,
			   const char *rescale)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, file, &err), 0);
	st_spec *specs = calloc(f.n_tensors, sizeof *specs);
	const uint8_t **data = calloc(f.n_tensors, sizeof *data);
	uint64_t *bytes = calloc(f.n_tensors, sizeof *bytes);
	size_t n = 0;
	for (size_t i = 0; i < f.n_tensors; i++) {
		const st_tensor *t = &f.tensors[i];
		if (!strcmp(t->name, drop))
			continue;
		specs[n] = (st_spec){ .name = t->name, .dtype = t->dtype, .ndim = t->ndim };
		memcpy(specs[n].shape, t->shape, sizeof specs[n].shape);
		data[n] = t->data;
		bytes[n] = t->nbytes;
		if (!strcmp(t->name, reshape)) {
			specs[n].shape[0]--;
			data[n] = NULL;
			bytes[n] = t->nbytes / (uint64_t)t->shape[0] * (uint64_t)specs[n].shape[0];
		} else if (!strcmp(t->name, rescale)) {
			specs[n].shape[1]++;
			data[n] = NULL;
			bytes[n] = 4 * (uint64_t)specs[n].shape[0] * (uint64_t)specs[n].shape[1];
		}
		n++;
	}
	char tmp[8192];
	snprintf(tmp, sizeof tmp, "%s.new", file);
	st_writer *w;
	assert_int_equal(st_writer_open(&w, tmp, specs, n, NULL, &err), 0);
	for (size_t pos = 0; pos < n; pos++) {
		size_t k = st_writer_order(w, pos);
		uint8_t *zeros = data[k] ? NULL : calloc(1, bytes[k] + 1);
		assert_int_equal(st_writer_write(w, data[k] ? data[k] : zeros, bytes[k], &err), 0);
		free(zeros);
	}
	assert_int_equal(st_writer_finish(w, NULL, &err), 0);
	st_close(&f);
	assert_int_equal(rename(tmp, file), 0);
	free(specs);
	free(data);
	free(bytes);
}

static void test_verify_ckpt_names_each_structural_problem(void **state)
{
	const char *tmp = *state;
	char *dir = strdup(path_in(tmp, "fp8"));
	synth("tiny", dir, 3);
	char *file = strdup(path_in(dir, "model-00001-of-00003.safetensors"));
	char *drop = tensor_with(file, "norm.weight", 1, 0);
	char *reshape = tensor_with(file, "norm.weight", 1, 1);
	char *rescale = tensor_with(file, ".weight_scale_inv", 2, 0);
	rewrite_broken(file, drop, reshape, rescale);
	assert_int_equal(verify(tmp, "ckpt", dir), 2);
	char line[1024];
	snprintf(line, sizeof line, "tensor %s: missing", drop);
	assert_true(file_contains(err_path(tmp), line));
	snprintf(line, sizeof line, "model-00001-of-00003.safetensors: tensor %s: shape", reshape);
	assert_true(file_contains(err_path(tmp), line));
	snprintf(line, sizeof line, "model-00001-of-00003.safetensors: tensor %s: shape", rescale);
	assert_true(file_contains(err_path(tmp), line));
	free(drop);
	free(reshape);
	free(rescale);
	free(file);
	free(dir);
}

/* A tensor the config does not describe is reported as unexpected. */
static void test_verify_ckpt_names_unexpected_tensor(void **state)
{
	const char *tmp = *state;
	char *dir = strdup(path_in(tmp, "v2"));
	synth("tiny-v2", dir, 1);
	assert_int_equal(run_shell("%s/dsv3-synth --preset tiny --seed 1 --files 1 --out %s/fp8 >/dev/null "
			     "&& cp %s/fp8/model-00001-of-00001.safetensors %s/extra.safetensors",
			     bin_dir(), tmp, tmp, dir),
			 0);
	assert_int_equal(verify(tmp, "ckpt", dir), 2);
	assert_true(file_contains(err_path(tmp), "extra.safetensors: tensor "));
	assert_true(file_contains(err_path(tmp), ": unexpected"));
	free(dir);
}

static void test_verify_usage_help_version(void **state)
{
	(void)state;
	assert_int_equal(run_shell("%s/dsv3-verify --help >/dev/null", bin_dir()), 0);
	assert_int_equal(run_shell("%s/dsv3-verify checksums --help >/dev/null", bin_dir()), 0);
	assert_int_equal(run_shell("%s/dsv3-verify ckpt --help >/dev/null", bin_dir()), 0);
	assert_int_equal(run_shell("%s/dsv3-verify --version | grep -q '^dsv3-verify '", bin_dir()), 0);
	assert_int_equal(run_shell("%s/dsv3-verify 2>/dev/null", bin_dir()), 1);
	assert_int_equal(run_shell("%s/dsv3-verify nonsense x 2>/dev/null", bin_dir()), 1);
	assert_int_equal(run_shell("%s/dsv3-verify checksums 2>/dev/null", bin_dir()), 1);
	assert_int_equal(run_shell("%s/dsv3-verify ckpt a b 2>/dev/null", bin_dir()), 1);
}

/* ---- logits --device: unknown and unavailable devices refused, the limits named ---- */

/* A GPU the CUDA backend could use; the no-GPU checks below only hold without one. */
static int gpu_visible(void)
{
	return run_shell("nvidia-smi -L >/dev/null 2>&1") == 0;
}

static int verify_logits_on_tiny(const char *tmp, const char *device)
{
	char *dir = strdup(path_in(tmp, "tiny"));
	if (!path_exists(dir))
		synth("tiny", dir, 1);
	int rc = run_shell("%s/dsv3-verify logits --ckpt-path %s --golden golden/tiny.safetensors --device %s "
			   ">%s 2>%s", bin_dir(), dir, device, path_in(tmp, "stdout"), err_path(tmp));
	free(dir);
	return rc;
}

static void test_verify_logits_unknown_device_exits_1_naming_it(void **state)
{
	const char *tmp = *state;
	assert_int_equal(verify_logits_on_tiny(tmp, "bogus"), 1);
	assert_file_contains(err_path(tmp), "'bogus'");
}

static void test_verify_logits_device_cuda_without_gpu_exits_1_saying_why(void **state)
{
	const char *tmp = *state;
	if (gpu_visible())
		skip();
	assert_int_equal(verify_logits_on_tiny(tmp, "cuda"), 1);
	assert_file_contains(err_path(tmp), "--device cuda: ");
	assert_false(file_contains(path_in(tmp, "stdout"), "OK "));
}

/* DESIGN §6: the CPU's limits are rel-L2 <= 1e-4 and top-1 100%; the run says so. */
static void test_verify_logits_cpu_states_its_limits(void **state)
{
	const char *tmp = *state;
	assert_int_equal(verify_logits_on_tiny(tmp, "cpu"), 0);
	assert_file_contains(path_in(tmp, "stdout"), "device cpu, limits: rel-L2 <= 1e-4 and top-1 100%");
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_verify_checksums_ok_on_synth),
		T(test_verify_checksums_names_flipped_tensor),
		T(test_verify_checksums_names_deleted_file),
		T(test_verify_checksums_converted_mp2),
		T(test_verify_checksums_converted_replica_differs),
		T(test_verify_ckpt_ok_on_synth_and_conversions),
		T(test_verify_ckpt_names_each_structural_problem),
		T(test_verify_ckpt_names_unexpected_tensor),
		cmocka_unit_test(test_verify_usage_help_version),
		T(test_verify_logits_unknown_device_exits_1_naming_it),
		T(test_verify_logits_device_cuda_without_gpu_exits_1_saying_why),
		T(test_verify_logits_cpu_states_its_limits),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
