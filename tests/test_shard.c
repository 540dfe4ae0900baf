/* dsv3-shard: resharding gives the files dsv3-convert writes for that rank count, byte for byte,
 * with the same logical hashes; refusals exit 2 and write nothing. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "safetensors.h"
#include "support/test_support.h"

typedef struct {
	char *root;
	char tiny[128];	   /* dsv3-synth --preset tiny --seed 1 --files 3 */
	char conv[3][128]; /* dsv3-convert of tiny for mp 1, 2, 4 */
} fixture;

static const int conv_mp[3] = { 1, 2, 4 };

static int shard(const char *in, const char *out, int mp)
{
	return run_quiet(NULL, "%s/dsv3-shard --input %s --save-path %s --model-parallel %d",
			 bin_dir(), in, out, mp);
}

static int setup(void **state)
{
	fixture *fx = calloc(1, sizeof *fx);
	if (!fx || !(fx->root = tmp_dir_create("shard")))
		return -1;
	snprintf(fx->tiny, sizeof fx->tiny, "%s/tiny", fx->root);
	if (run_synth("tiny", 1, "--files 3", fx->tiny))
		return -1;
	for (int i = 0; i < 3; i++) {
		snprintf(fx->conv[i], sizeof fx->conv[i], "%s/conv-mp%d", fx->root, conv_mp[i]);
		if (run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts 16 "
			"--model-parallel %d", bin_dir(), fx->tiny, fx->conv[i], conv_mp[i]))
			return -1;
	}
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

/* Every file of `want` (a dsv3-convert output) is in `got` with the same bytes, and nothing else. */
static void assert_same_dir(const char *got, const char *want)
{
	assert_int_equal(count_final_entries(got), count_final_entries(want));
	DIR *d = opendir(want);
	assert_non_null(d);
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		if (run_quiet(NULL, "cmp %s %s", path_in(want, e->d_name), path_in(got, e->d_name)) != 0) {
			print_error("%s differs from %s\n", path_in(got, e->d_name),
				    path_in(want, e->d_name));
			fail();
		}
	}
	closedir(d);
}

/* convert mp4 -> shard 2 -> shard 1: each step byte-identical to converting directly (files,
 * SHA256SUMS and tensors.sha256.json included: the logical hashes never change). */
static void test_shard_round_trip_matches_direct_conversion(void **state)
{
	fixture *fx = *state;
	const char *to2 = fresh_path(fx->root, "to2"), *to1 = fresh_path(fx->root, "to1");
	assert_int_equal(shard(fx->conv[2], to2, 2), 0);
	assert_same_dir(to2, fx->conv[1]);
	assert_int_equal(shard(to2, to1, 1), 0);
	assert_same_dir(to1, fx->conv[0]);
}

static void test_shard_splits_one_into_four_like_convert(void **state)
{
	fixture *fx = *state;
	const char *to4 = fresh_path(fx->root, "1to4");
	assert_int_equal(shard(fx->conv[0], to4, 4), 0);
	assert_same_dir(to4, fx->conv[2]);
}

static void test_shard_to_same_count_is_a_copy(void **state)
{
	fixture *fx = *state;
	const char *same = fresh_path(fx->root, "2to2");
	assert_int_equal(shard(fx->conv[1], same, 2), 0);
	assert_same_dir(same, fx->conv[1]);
}

/* The logical hashes of mp 1, 2 and 4 and of every reshard are one file. */
static void test_shard_logical_hashes_identical_everywhere(void **state)
{
	fixture *fx = *state;
	const char *a = fresh_path(fx->root, "lh4to2"), *b = fresh_path(fx->root, "lh1to4");
	assert_int_equal(shard(fx->conv[2], a, 2), 0);
	assert_int_equal(shard(fx->conv[0], b, 4), 0);
	const char *ref = path_in(fx->conv[0], "tensors.sha256.json");
	assert_int_equal(run_quiet(NULL, "cmp %s %s", ref, path_in(fx->conv[1], "tensors.sha256.json")), 0);
	assert_int_equal(run_quiet(NULL, "cmp %s %s", ref, path_in(fx->conv[2], "tensors.sha256.json")), 0);
	assert_int_equal(run_quiet(NULL, "cmp %s %s", ref, path_in(a, "tensors.sha256.json")), 0);
	assert_int_equal(run_quiet(NULL, "cmp %s %s", ref, path_in(b, "tensors.sha256.json")), 0);
}

/* Without config.json or manifests the expert count is read from the tensor names. */
static void test_shard_counts_experts_without_config(void **state)
{
	fixture *fx = *state;
	const char *in = fresh_path(fx->root, "bare-in"), *out = fresh_path(fx->root, "bare-out");
	assert_int_equal(run_quiet(NULL, "mkdir %s && cp %s/model*-mp4.safetensors %s", in, fx->conv[2], in), 0);
	assert_int_equal(shard(in, out, 2), 0);
	for (int r = 0; r < 2; r++) {
		char name[64];
		snprintf(name, sizeof name, "model%d-mp2.safetensors", r);
		assert_int_equal(run_quiet(NULL, "cmp %s %s", path_in(out, name), path_in(fx->conv[1], name)), 0);
	}
	assert_false(path_exists(path_in(out, "config.json")));
}

/* ---- refusals ----------------------------------------------------------------------------- */

static void assert_refused(const fixture *fx, const char *in, int mp, const char *needle)
{
	const char *out = fresh_path(fx->root, "refused"), *msg = path_in(fx->root, "stderr.txt");
	int rc = run_quiet(msg, "%s/dsv3-shard --input %s --save-path %s --model-parallel %d", bin_dir(), in,
		     out, mp);
	assert_int_equal(rc, 2);
	assert_file_contains(msg, needle);
	assert_int_equal(count_final_entries(out), 0);
}

static void test_shard_refuses_experts_not_divisible(void **state)
{
	fixture *fx = *state;
	assert_refused(fx, fx->conv[2], 3, "16 experts cannot be divided among 3 ranks");
	assert_false(path_exists(path_in(fx->root, "refused"))); /* refused before creating anything */
}

static void test_shard_refuses_indivisible_split(void **state)
{
	fixture *fx = *state;
	/* 8 divides 16 experts but not wo's 4 column blocks of scale (see test_convert) */
	assert_refused(fx, fx->conv[2], 8, "layers.0.attn.wo.scale");
}

/* Resharding into the input directory would overwrite its manifests and mix rank counts. */
static void test_shard_refuses_output_in_input_dir(void **state)
{
	fixture *fx = *state;
	const char *in = fresh_path(fx->root, "same");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s", fx->conv[2], in), 0);
	int rc = run_quiet(NULL, "%s/dsv3-shard --input %s --save-path %s/../same --model-parallel 2",
			   bin_dir(), in, in);
	assert_int_equal(rc, 1);
	assert_int_equal(run_quiet(NULL, "cd %s && sha256sum -c --quiet SHA256SUMS && "
				   "! ls model0-mp2.safetensors", in), 0);
}

static void test_shard_refuses_missing_rank_file(void **state)
{
	fixture *fx = *state;
	const char *in = fresh_path(fx->root, "norank");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s && rm %s/model2-mp4.safetensors", fx->conv[2], in, in), 0);
	assert_refused(fx, in, 2, "model2-mp4.safetensors: missing");
}

/* A replicated tensor (norm.weight) that differs between ranks is corrupt input. The input's
 * manifest is removed so the copy check itself must catch it. */
static void test_shard_refuses_differing_replicated_copies(void **state)
{
	fixture *fx = *state;
	const char *in = fresh_path(fx->root, "badcopy");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s && rm %s/tensors.sha256.json", fx->conv[1], in, in), 0);
	st_file f;
	dsv3_error err;
	const char *path = path_in(in, "model1-mp2.safetensors");
	assert_int_equal(st_open(&f, path, &err), 0);
	const st_tensor *t = st_find(&f, "norm.weight");
	assert_non_null(t);
	long off = (long)(8 + f.header_len + t->begin);
	st_close(&f);
	FILE *fp = fopen(path, "r+b");
	assert_non_null(fp);
	fseek(fp, off, SEEK_SET);
	int c = fgetc(fp);
	fseek(fp, off, SEEK_SET);
	fputc(c ^ 1, fp);
	fclose(fp);
	assert_refused(fx, in, 1, "norm.weight: differs");
}

/* A rank file whose bytes no longer match the input's tensors.sha256.json. */
static void test_shard_refuses_bytes_not_matching_manifest(void **state)
{
	fixture *fx = *state;
	const char *in = fresh_path(fx->root, "badhash");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s", fx->conv[1], in), 0);
	st_file f;
	dsv3_error err;
	const char *path = path_in(in, "model0-mp2.safetensors");
	assert_int_equal(st_open(&f, path, &err), 0);
	const st_tensor *t = st_find(&f, "embed.weight");
	assert_non_null(t);
	long off = (long)(8 + f.header_len + t->begin + 5);
	st_close(&f);
	FILE *fp = fopen(path, "r+b");
	assert_non_null(fp);
	fseek(fp, off, SEEK_SET);
	int c = fgetc(fp);
	fseek(fp, off, SEEK_SET);
	fputc(c ^ 0x10, fp);
	fclose(fp);
	assert_refused(fx, in, 4, "embed.weight: its bytes do not match");
}

static void test_shard_usage_errors_exit_1(void **state)
{
	fixture *fx = *state;
	const char *out = fresh_path(fx->root, "usage");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-shard --input %s --save-path %s", bin_dir(), fx->conv[1], out), 1);
	assert_int_equal(shard(fx->conv[1], out, 0), 1);
	assert_false(path_exists(out));
	assert_int_equal(run_quiet(NULL, "%s/dsv3-shard --help", bin_dir()), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-shard --version | grep -q '^dsv3-shard '", bin_dir()), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_shard_round_trip_matches_direct_conversion),
		cmocka_unit_test(test_shard_splits_one_into_four_like_convert),
		cmocka_unit_test(test_shard_to_same_count_is_a_copy),
		cmocka_unit_test(test_shard_logical_hashes_identical_everywhere),
		cmocka_unit_test(test_shard_counts_experts_without_config),
		cmocka_unit_test(test_shard_refuses_experts_not_divisible),
		cmocka_unit_test(test_shard_refuses_indivisible_split),
		cmocka_unit_test(test_shard_refuses_missing_rank_file),
		cmocka_unit_test(test_shard_refuses_output_in_input_dir),
		cmocka_unit_test(test_shard_refuses_differing_replicated_copies),
		cmocka_unit_test(test_shard_refuses_bytes_not_matching_manifest),
		cmocka_unit_test(test_shard_usage_errors_exit_1),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
