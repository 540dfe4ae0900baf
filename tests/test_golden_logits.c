/* The CPU engine against golden logits of Hugging Face transformers (float32, GPU machine:
 * golden/make_golden.py). Each golden file names the dsv3-synth arguments of its checkpoint and
 * the SHA-256 of that checkpoint's SHA256SUMS; the test regenerates the checkpoint, checks it is
 * the same one, and runs `dsv3-verify logits` (rel-L2 <= 1e-4, top-1 100%) on every layout the
 * engine loads: the HF FP8 directory, converted shards mp 1, 2 and 4, and the BF16 cast. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "support/test_support.h"

typedef struct {
	char *root;
	char tiny[256], tiny_v2[256], tiny_bf16[256];
} fixture;

static int setup(void **state)
{
	fixture *fx = calloc(1, sizeof *fx);
	if (!fx || !(fx->root = tmp_dir_create("golden-logits")))
		return -1;
	snprintf(fx->tiny, sizeof fx->tiny, "%s/tiny", fx->root);
	snprintf(fx->tiny_v2, sizeof fx->tiny_v2, "%s/tiny-v2", fx->root);
	snprintf(fx->tiny_bf16, sizeof fx->tiny_bf16, "%s/tiny-bf16", fx->root);
	/* The arguments recorded in the golden files' synth_args metadata. */
	if (run_synth("tiny", 1, "", fx->tiny) || run_synth("tiny-v2", 2, "", fx->tiny_v2) ||
	    run_quiet(NULL, "%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s --output-bf16-hf-path %s",
		      bin_dir(), fx->tiny, fx->tiny_bf16))
		return -1;
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	fixture *fx = *state;
	remove_tree(fx->root);
	free(fx->root);
	free(fx);
	return 0;
}

/* The golden file's weights_sha256 (a metadata value in its header) is the SHA-256 of the
 * checkpoint's SHA256SUMS: compare with sha256sum's, so a changed dsv3-synth cannot pass. */
static void assert_same_weights(const char *golden, const char *ckpt)
{
	assert_int_equal(run_noting_failure("want=$(sha256sum < %s/SHA256SUMS | cut -c1-64) && "
					    "grep -aq \"\\\"weights_sha256\\\":\\\"$want\\\"\" %s",
					    ckpt, golden), 0);
}

static void verify_logits(const char *ckpt, const char *golden)
{
	assert_int_equal(run_noting_failure("%s/dsv3-verify logits --ckpt-path %s --golden %s >&2",
					    bin_dir(), ckpt, golden), 0);
}

/* The golden cases on the HF directory and on its conversions for 1, 2 and 4 ranks. */
static void check_all_layouts(const fixture *fx, const char *ckpt, const char *label,
			      const char *const *goldens, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		assert_same_weights(goldens[i], ckpt);
		verify_logits(ckpt, goldens[i]);
	}
	static const int mp[] = { 1, 2, 4 };
	for (size_t k = 0; k < sizeof mp / sizeof mp[0]; k++) {
		char out[300];
		snprintf(out, sizeof out, "%s/%s-mp%d", fx->root, label, mp[k]);
		assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s "
					   "--n-experts 16 --model-parallel %d", bin_dir(), ckpt, out,
					   mp[k]), 0);
		for (size_t i = 0; i < n; i++)
			verify_logits(out, goldens[i]);
	}
}

static void test_engine_matches_hf_on_tiny_fp8_every_layout(void **state)
{
	const char *g[] = { "golden/tiny.safetensors", "golden/tiny-4096.safetensors" };
	check_all_layouts(*state, ((fixture *)*state)->tiny, "tiny", g, 2);
}

static void test_engine_matches_hf_on_tiny_v2_bf16_every_layout(void **state)
{
	const char *g[] = { "golden/tiny-v2.safetensors", "golden/tiny-v2-4096.safetensors" };
	check_all_layouts(*state, ((fixture *)*state)->tiny_v2, "tiny-v2", g, 2);
}

/* dsv3-fp8-to-bf16's output has its own golden: the BF16 rounding of the weights moves the
 * logits by ~1e-3, more than the fp32 limit against the FP8 golden allows. */
static void test_engine_matches_hf_on_bf16_cast(void **state)
{
	fixture *fx = *state;
	const char *g[] = { "golden/tiny-bf16.safetensors" };
	check_all_layouts(fx, fx->tiny_bf16, "tiny-bf16", g, 1);
}

/* A wrong model must fail: the tiny-v2 golden on the tiny checkpoint exits 2. */
static void test_verify_logits_fails_on_the_wrong_checkpoint(void **state)
{
	fixture *fx = *state;
	int rc = run_quiet(NULL, "%s/dsv3-verify logits --ckpt-path %s --golden "
			   "golden/tiny-v2.safetensors", bin_dir(), fx->tiny);
	assert_int_equal(rc, 2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_engine_matches_hf_on_tiny_fp8_every_layout),
		cmocka_unit_test(test_engine_matches_hf_on_tiny_v2_bf16_every_layout),
		cmocka_unit_test(test_engine_matches_hf_on_bf16_cast),
		cmocka_unit_test(test_verify_logits_fails_on_the_wrong_checkpoint),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
