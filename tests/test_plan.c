/* dsv3-plan: the weight bytes per rank against the files dsv3-convert really writes (their
 * headers read back here), the KV cache from the config's numbers, --config against
 * --ckpt-path, the fewest GPUs, dsv3-convert's peak RSS against the plan, and the refusals. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "support/test_support.h"

typedef struct {
	char *root;
	char tiny[128]; /* dsv3-synth --preset tiny --seed 1 --files 2 --mtp */
} fixture;

static int setup(void **state)
{
	fixture *fx = calloc(1, sizeof *fx);
	if (!fx || !(fx->root = tmp_dir_create("plan")))
		return -1;
	snprintf(fx->tiny, sizeof fx->tiny, "%s/tiny", fx->root);
	if (run_synth("tiny", 1, "--files 2 --mtp", fx->tiny) != 0)
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

/* dsv3-plan ARGS --json, parsed; fails the test unless it exits 0 with one JSON object. */
static json_t *plan_json(const fixture *fx, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static json_t *plan_json(const fixture *fx, const char *fmt, ...)
{
	char args[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof args, fmt, ap);
	va_end(ap);
	const char *out = fresh_path(fx->root, "plan.json");
	assert_int_equal(run_noting_failure("%s/dsv3-plan %s --json > %s", bin_dir(), args, out), 0);
	json_error_t e;
	json_t *j = json_load_file(out, 0, &e);
	if (!j)
		fail_msg("dsv3-plan --json: %s (line %d)", e.text, e.line);
	assert_true(json_is_object(j));
	return j;
}

static uint64_t get_u64(const json_t *j, const char *key)
{
	json_t *v = json_object_get(j, key);
	if (!json_is_integer(v))
		fail_msg("no integer %s in the plan", key);
	return (uint64_t)json_integer_value(v);
}

static uint64_t tool_u64(const json_t *j, const char *tool, const char *key)
{
	return get_u64(json_object_get(json_object_get(j, "tools"), tool), key);
}

/* The tensor data bytes of a safetensors file, from its own header. */
static uint64_t file_tensor_bytes(const char *path)
{
	st_file f;
	dsv3_error err = { 0 };
	if (st_open(&f, path, &err))
		fail_msg("%s", err.msg);
	uint64_t sum = 0;
	for (size_t i = 0; i < f.n_tensors; i++)
		sum += f.tensors[i].nbytes;
	st_close(&f);
	return sum;
}

static uint64_t file_size(const char *path)
{
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fclose(f);
	return (uint64_t)n;
}

static void convert(const fixture *fx, const char *out, int mp, const char *extra)
{
	assert_int_equal(run_noting_failure("%s/dsv3-convert --hf-ckpt-path %s --save-path %s "
					    "--n-experts 16 --model-parallel %d %s 2>/dev/null",
					    bin_dir(), fx->tiny, out, mp, extra), 0);
}

static void test_plan_weights_per_rank_equal_converted_files(void **state)
{
	fixture *fx = *state;
	static const int mps[] = { 1, 2, 4 };
	for (size_t k = 0; k < sizeof mps / sizeof *mps; k++) {
		int mp = mps[k];
		char name[32];
		snprintf(name, sizeof name, "mp%d", mp);
		const char *out = fresh_path(fx->root, name);
		convert(fx, out, mp, "");
		json_t *j = plan_json(fx, "--ckpt-path %s --model-parallel %d", fx->tiny, mp);
		json_t *w = json_object_get(j, "weight_bytes_per_rank");
		assert_int_equal(json_array_size(w), mp);
		uint64_t disk = 0;
		for (int r = 0; r < mp; r++) {
			char file[64];
			snprintf(file, sizeof file, "model%d-mp%d.safetensors", r, mp);
			const char *path = path_in(out, file);
			assert_int_equal(json_integer_value(json_array_get(w, (size_t)r)),
					 file_tensor_bytes(path));
			disk += file_size(path);
		}
		assert_int_equal(tool_u64(j, "dsv3-convert", "output_disk_bytes"), disk);
		json_decref(j);
	}
}

static void test_plan_config_agrees_with_checkpoint(void **state)
{
	fixture *fx = *state;
	for (int mp = 1; mp <= 4; mp *= 2) {
		json_t *a = plan_json(fx, "--ckpt-path %s --model-parallel %d", fx->tiny, mp);
		json_t *b = plan_json(fx, "--config %s/config.json --model-parallel %d", fx->tiny, mp);
		assert_true(json_equal(json_object_get(a, "weight_bytes_per_rank"),
				       json_object_get(b, "weight_bytes_per_rank")));
		assert_int_equal(get_u64(a, "input_bytes"), get_u64(b, "input_bytes"));
		assert_int_equal(get_u64(a, "kv_cache_bytes_per_token"),
				 get_u64(b, "kv_cache_bytes_per_token"));
		assert_int_equal(get_u64(a, "gpu_bytes_max"), get_u64(b, "gpu_bytes_max"));
		json_decref(a);
		json_decref(b);
	}
}

static int cfg_int(const json_t *c, const char *key)
{
	json_t *v = json_object_get(c, key);
	if (!json_is_integer(v))
		fail_msg("config.json: no %s", key);
	return (int)json_integer_value(v);
}

/* The engine keeps, per layer and position, the compressed KV (kv_lora_rank) and the rotary
 * key (qk_rope_head_dim) as fp32. */
static void test_plan_kv_cache_from_config_numbers(void **state)
{
	fixture *fx = *state;
	json_error_t e;
	json_t *c = json_load_file(path_in(fx->tiny, "config.json"), 0, &e);
	assert_non_null(c);
	uint64_t per_token = (uint64_t)cfg_int(c, "num_hidden_layers") *
			     (uint64_t)(cfg_int(c, "kv_lora_rank") + cfg_int(c, "qk_rope_head_dim")) * 4;
	json_decref(c);
	json_t *j = plan_json(fx, "--ckpt-path %s --max-seq-len 100 --batch 3", fx->tiny);
	assert_int_equal(get_u64(j, "kv_cache_bytes_per_token"), per_token);
	assert_int_equal(get_u64(j, "kv_cache_bytes"), per_token * 100 * 3);
	uint64_t w0 = (uint64_t)json_integer_value(
		json_array_get(json_object_get(j, "weight_bytes_per_rank"), 0));
	assert_int_equal(get_u64(j, "gpu_bytes_max"),
			 w0 + per_token * 300 + get_u64(j, "gpu_scratch_bytes"));
	json_decref(j);
}

/* The fewest GPUs: with room between the fullest rank of mp 2 and that of mp 1, two. */
static void test_plan_fewest_gpus_is_the_smallest_split_that_fits(void **state)
{
	fixture *fx = *state;
	json_t *one = plan_json(fx, "--ckpt-path %s --max-seq-len 64", fx->tiny);
	json_t *two = plan_json(fx, "--ckpt-path %s --max-seq-len 64 --model-parallel 2", fx->tiny);
	uint64_t g1 = get_u64(one, "gpu_bytes_max"), g2 = get_u64(two, "gpu_bytes_max");
	assert_true(g2 < g1);
	double gib = (double)(g1 + g2) / 2 / 1073741824.0;
	json_decref(one);
	json_decref(two);
	json_t *j = plan_json(fx, "--ckpt-path %s --max-seq-len 64 --gpu-memory %.9f", fx->tiny, gib);
	assert_int_equal(get_u64(j, "min_gpus"), 2);
	json_decref(j);
	j = plan_json(fx, "--ckpt-path %s --max-seq-len 64 --gpu-memory 1000", fx->tiny);
	assert_int_equal(get_u64(j, "min_gpus"), 1);
	json_decref(j);
	j = plan_json(fx, "--ckpt-path %s --gpu-memory 0.0001", fx->tiny);
	assert_true(json_is_null(json_object_get(j, "min_gpus")));
	json_decref(j);
}

/* Peak RSS of dsv3-convert (GNU time's %M, KiB) is at most the plan's figure: an upper bound,
 * not a figure within 10% (measured 8% under it at mp 1, 24-31% under at mp 2 and 4 here;
 * docs/tools.md). */
static void test_plan_convert_peak_ram_bounds_measured_rss(void **state)
{
	fixture *fx = *state;
	for (int mp = 1; mp <= 4; mp *= 2) {
		char name[32];
		snprintf(name, sizeof name, "rss%d", mp);
		const char *out = fresh_path(fx->root, name);
		const char *rss = fresh_path(fx->root, "rss.txt");
		assert_int_equal(run_noting_failure("/usr/bin/time -o %s -f %%M %s/dsv3-convert "
						    "--hf-ckpt-path %s --save-path %s --n-experts 16 "
						    "--model-parallel %d --threads 1 2>/dev/null",
						    rss, bin_dir(), fx->tiny, out, mp), 0);
		char *text = assert_read_file(rss, NULL);
		uint64_t measured = strtoull(text, NULL, 10) * 1024;
		free(text);
		json_t *j = plan_json(fx, "--ckpt-path %s --model-parallel %d --threads 1",
				      fx->tiny, mp);
		uint64_t planned = tool_u64(j, "dsv3-convert", "peak_ram_bytes");
		json_decref(j);
		assert_true(measured > 0);
		assert_true(measured <= planned);
	}
}

static void test_plan_refuses_a_split_convert_refuses(void **state)
{
	fixture *fx = *state;
	const char *err = fresh_path(fx->root, "err.txt");
	assert_int_equal(run_quiet(err, "%s/dsv3-plan --ckpt-path %s --model-parallel 3",
				   bin_dir(), fx->tiny), 2);
	assert_file_contains(err, "16 experts cannot be divided among 3 ranks");
}

static void test_plan_usage_errors(void **state)
{
	fixture *fx = *state;
	const char *b = bin_dir();
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --help", b), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --version", b), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan", b), 1);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --ckpt-path %s --config %s/config.json", b,
				   fx->tiny, fx->tiny), 1);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --ckpt-path %s --model-parallel 0", b,
				   fx->tiny), 1);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --ckpt-path %s --gpu-memory -1", b,
				   fx->tiny), 1);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --ckpt-path %s extra", b, fx->tiny), 1);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-plan --bogus", b), 1);
	const char *err = fresh_path(fx->root, "err.txt");
	assert_int_equal(run_quiet(err, "%s/dsv3-plan --ckpt-path %s/none", b, fx->root), 2);
	const char *bad = path_in(fx->root, "bad.json");
	write_text_file(bad, "{\"vocab_size\": ");
	assert_int_equal(run_quiet(err, "%s/dsv3-plan --config %s", b, bad), 2);
	assert_file_contains(err, "bad.json");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_plan_weights_per_rank_equal_converted_files),
		cmocka_unit_test(test_plan_config_agrees_with_checkpoint),
		cmocka_unit_test(test_plan_kv_cache_from_config_numbers),
		cmocka_unit_test(test_plan_fewest_gpus_is_the_smallest_split_that_fits),
		cmocka_unit_test(test_plan_convert_peak_ram_bounds_measured_rss),
		cmocka_unit_test(test_plan_refuses_a_split_convert_refuses),
		cmocka_unit_test(test_plan_usage_errors),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
