/* The tools against outputs of independent implementations: golden/tools/ holds SHA-256 lists of
 * what PyTorch + the Python safetensors library wrote on the GPU machine (golden/make_tool_refs.py)
 * for the same synthetic checkpoints, and a small file written by that serializer. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "safetensors.h"
#include "support/test_support.h"

static char *work;

static int setup(void **state)
{
	(void)state;
	if (!(work = tmp_dir_create("golden")))
		return -1;
	/* The references were made from these exact checkpoints. */
	if (run_synth("tiny", 1, "--files 3", path_in(work, "tiny")) ||
	    run_synth("tiny-v2", 2, "--files 2", path_in(work, "tiny-v2")))
		return -1;
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	remove_tree(work);
	free(work);
	return 0;
}

/* `sha256sum -c` of a golden list inside a directory: an independent hasher. */
static int check_list(const char *dir, const char *list)
{
	char cwd[4096];
	if (!getcwd(cwd, sizeof cwd))
		return -1;
	return run_noting_failure("cd %s && sha256sum --quiet -c %s/golden/tools/%s", dir, cwd, list);
}

static void test_synth_reproduces_the_golden_inputs(void **state)
{
	(void)state;
	char d[128];
	snprintf(d, sizeof d, "%s/tiny", work);
	assert_int_equal(check_list(d, "tiny-input.sha256"), 0);
	snprintf(d, sizeof d, "%s/tiny-v2", work);
	assert_int_equal(check_list(d, "tiny-v2-input.sha256"), 0);
}

static void convert_matches(const char *label, int experts, int mp)
{
	char d[128], list[64];
	snprintf(d, sizeof d, "%s/%s-mp%d", work, label, mp);
	assert_int_equal(run_noting_failure("%s/dsv3-convert --hf-ckpt-path %s/%s --save-path %s "
					    "--n-experts %d --model-parallel %d 2>/dev/null",
					    bin_dir(), work, label, d, experts, mp), 0);
	snprintf(list, sizeof list, "%s-convert-mp%d.sha256", label, mp);
	assert_int_equal(check_list(d, list), 0);
}

static void test_convert_matches_torch_reference_tiny(void **state)
{
	(void)state;
	convert_matches("tiny", 16, 1);
	convert_matches("tiny", 16, 2);
	convert_matches("tiny", 16, 4);
}

static void test_convert_matches_torch_reference_tiny_v2(void **state)
{
	(void)state;
	convert_matches("tiny-v2", 16, 1);
	convert_matches("tiny-v2", 16, 2);
	convert_matches("tiny-v2", 16, 4);
}

static void test_fp8_to_bf16_matches_torch_reference(void **state)
{
	(void)state;
	char d[128];
	snprintf(d, sizeof d, "%s/tiny-bf16", work);
	assert_int_equal(run_noting_failure("%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s/tiny "
					    "--output-bf16-hf-path %s 2>/dev/null", bin_dir(), work, d),
			 0);
	assert_int_equal(check_list(d, "tiny-fp8-to-bf16.sha256"), 0);
}

/* Rewrites a file the Python serializer wrote, from its tensors alone, and compares the bytes. */
static void rewrite_matches(const char *fixture, const char *const *metadata)
{
	char path[256], out[256];
	snprintf(path, sizeof path, "golden/tools/%s", fixture);
	snprintf(out, sizeof out, "%s/%s", work, fixture);
	st_file f;
	dsv3_error err = {0};
	assert_int_equal(st_open(&f, path, &err), 0);
	st_spec *specs = calloc(f.n_tensors, sizeof *specs);
	for (size_t i = 0; i < f.n_tensors; i++) {
		specs[i].name = f.tensors[i].name;
		specs[i].dtype = f.tensors[i].dtype;
		specs[i].ndim = f.tensors[i].ndim;
		memcpy(specs[i].shape, f.tensors[i].shape, sizeof specs[i].shape);
	}
	st_writer *w;
	assert_int_equal(st_writer_open(&w, out, specs, f.n_tensors, metadata, &err), 0);
	for (size_t pos = 0; pos < f.n_tensors; pos++) {
		const st_tensor *t = &f.tensors[st_writer_order(w, pos)];
		assert_int_equal(st_writer_write(w, t->data, t->nbytes, &err), 0);
	}
	assert_int_equal(st_writer_finish(w, NULL, &err), 0);
	size_t la, lb;
	char *a = assert_read_file(path, &la), *b = assert_read_file(out, &lb);
	assert_int_equal(la, lb);
	assert_memory_equal(a, b, la);
	free(a);
	free(b);
	free(specs);
	st_close(&f);
}

static void test_writer_reproduces_python_serializer(void **state)
{
	(void)state;
	/* The fixtures themselves are the ones whose hashes were recorded on the GPU machine. */
	assert_int_equal(check_list("golden/tools", "writer_fixture.sha256"), 0);
	rewrite_matches("writer_fixture.safetensors", NULL);
	const char *meta[] = {"format", "pt", NULL};
	rewrite_matches("writer_fixture_meta.safetensors", meta);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_writer_reproduces_python_serializer),
		cmocka_unit_test(test_synth_reproduces_the_golden_inputs),
		cmocka_unit_test(test_convert_matches_torch_reference_tiny),
		cmocka_unit_test(test_convert_matches_torch_reference_tiny_v2),
		cmocka_unit_test(test_fp8_to_bf16_matches_torch_reference),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
