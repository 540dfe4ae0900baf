/* dsv3-verify ckpt and 1-byte tensors (issue 7 §5): an F8_E4M3 weight with no scale, with its
 * scale under a name the tools do not know, left in a BF16 checkpoint, or under a name that has
 * no scale rule, is an error naming the weight, on the HF layout and on converted shards. The
 * clean synthetic checkpoints passing is test_verify's test_verify_ckpt_ok_on_synth_and_conversions. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "support/test_support.h"

#define FILE1 "model-00001-of-00001.safetensors"
/* layer 0 of the tiny preset is dense: its MLP weights are FP8 (tiny) or BF16 (tiny-v2) */
#define W2 "model.layers.0.mlp.down_proj.weight"

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "verify-scales");
}

/* One change to a tensor of a file: renamed (to NULL: dropped), or stored as F8_E4M3 (its
 * first elements' worth of bytes, one per element). */
typedef struct {
	const char *name, *new_name;
	int to_f8;
} tensor_edit;

/* Rewrites `file` with `edit` applied; the index is left as it was. */
static void rewrite(const char *file, const tensor_edit *edit)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, file, &err), 0);
	st_spec *specs = calloc(f.n_tensors, sizeof *specs);
	const void **data = calloc(f.n_tensors, sizeof *data);
	assert_non_null(specs);
	assert_non_null(data);
	size_t n = 0;
	int found = 0;
	for (size_t i = 0; i < f.n_tensors; i++) {
		const st_tensor *t = &f.tensors[i];
		specs[n] = (st_spec){ .name = t->name, .dtype = t->dtype, .ndim = t->ndim };
		memcpy(specs[n].shape, t->shape, sizeof specs[n].shape);
		data[n] = t->data;
		if (strcmp(t->name, edit->name) == 0) {
			found = 1;
			if (!edit->to_f8 && !edit->new_name)
				continue;
			if (edit->new_name)
				specs[n].name = edit->new_name;
			if (edit->to_f8)
				specs[n].dtype = ST_F8_E4M3;
		}
		n++;
	}
	assert_true(found);
	char out[4096];
	snprintf(out, sizeof out, "%s.tmp", file);
	write_safetensors(out, specs, (const void *const *)data, n);
	st_close(&f);
	assert_int_equal(rename(out, file), 0);
	free(specs);
	free(data);
}

/* dsv3-verify ckpt dir: exit code, stderr in tmp/stderr */
static int verify_ckpt(const char *tmp, const char *dir)
{
	return run_shell("%s/dsv3-verify ckpt %s >/dev/null 2>%s", bin_dir(), dir,
			 path_in(tmp, "stderr"));
}

static const char *synth_one_file(const char *tmp, const char *preset)
{
	const char *dir = fresh_path(tmp, preset);
	assert_int_equal(run_synth(preset, 1, "--files 1", dir), 0);
	return dir;
}

static void test_verify_ckpt_names_fp8_weight_without_scale(void **state)
{
	const char *tmp = *state, *dir = synth_one_file(tmp, "tiny");
	rewrite(path_in(dir, FILE1), &(tensor_edit){ W2 "_scale_inv", NULL, 0 });
	assert_int_equal(verify_ckpt(tmp, dir), 2);
	assert_file_contains(path_in(tmp, "stderr"),
			     FILE1 ": tensor " W2 ": F8_E4M3 without its scale " W2 "_scale_inv\n");
}

static void test_verify_ckpt_names_scale_under_unknown_name(void **state)
{
	const char *tmp = *state, *dir = synth_one_file(tmp, "tiny");
	rewrite(path_in(dir, FILE1), &(tensor_edit){ W2 "_scale_inv", W2 "_scale", 0 });
	assert_int_equal(verify_ckpt(tmp, dir), 2);
	assert_file_contains(path_in(tmp, "stderr"),
			     FILE1 ": tensor " W2 ": F8_E4M3 with its scale under a name the tools "
			     "do not know: " W2 "_scale (expected " W2 "_scale_inv)\n");
}

/* The pass-through users met: an FP8 weight left behind in a "BF16" checkpoint. */
static void test_verify_ckpt_names_fp8_weight_in_bf16_checkpoint(void **state)
{
	const char *tmp = *state, *dir = synth_one_file(tmp, "tiny-v2");
	rewrite(path_in(dir, FILE1), &(tensor_edit){ W2, NULL, 1 });
	assert_int_equal(verify_ckpt(tmp, dir), 2);
	assert_file_contains(path_in(tmp, "stderr"),
			     FILE1 ": tensor " W2 ": F8_E4M3 without its scale " W2 "_scale_inv\n");
}

/* An F8 tensor whose name is not NAME.weight has no scale name the tools could look for. */
static void test_verify_ckpt_names_fp8_tensor_without_scale_rule(void **state)
{
	const char *tmp = *state, *dir = synth_one_file(tmp, "tiny");
	const char *odd = "model.layers.0.mlp.down_proj.qweight";
	rewrite(path_in(dir, FILE1), &(tensor_edit){ W2, odd, 0 });
	assert_int_equal(verify_ckpt(tmp, dir), 2);
	assert_file_contains(path_in(tmp, "stderr"),
			     FILE1 ": tensor model.layers.0.mlp.down_proj.qweight: F8_E4M3, but "
			     "only a NAME.weight tensor has a scale\n");
}

/* Converted shards: each rank's FP8 weight needs its .scale in its own file. */
static void test_verify_ckpt_names_converted_fp8_weight_without_scale(void **state)
{
	const char *tmp = *state, *dir = synth_one_file(tmp, "tiny");
	const char *mp = fresh_path(tmp, "mp2");
	assert_int_equal(run_shell("%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts 16 "
				   "--model-parallel 2 2>/dev/null",
				   bin_dir(), dir, mp),
			 0);
	rewrite(path_in(mp, "model1-mp2.safetensors"),
		&(tensor_edit){ "layers.0.ffn.w2.scale", NULL, 0 });
	assert_int_equal(verify_ckpt(tmp, mp), 2);
	assert_file_contains(path_in(tmp, "stderr"),
			     "model1-mp2.safetensors: tensor layers.0.ffn.w2.weight: F8_E4M3 "
			     "without its scale layers.0.ffn.w2.scale\n");
	/* rank 0 kept its copy: its weight is fine */
	assert_false(file_contains(path_in(tmp, "stderr"),
				   "model0-mp2.safetensors: tensor layers.0.ffn.w2.weight: F8"));
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_verify_ckpt_names_fp8_weight_without_scale),
		T(test_verify_ckpt_names_scale_under_unknown_name),
		T(test_verify_ckpt_names_fp8_weight_in_bf16_checkpoint),
		T(test_verify_ckpt_names_fp8_tensor_without_scale_rule),
		T(test_verify_ckpt_names_converted_fp8_weight_without_scale),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
