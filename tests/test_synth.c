/* dsv3-synth: determinism, the HF layout it writes, the file split, the values' scale, presets
 * and failures. Runs the binary at $DSV3_BIN in a fresh temporary directory. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "model_layout.h"
#include "safetensors.h"
#include "sha256.h"
#include "support/test_support.h"

static char tmp_root[256];

static int setup(void **state)
{
	(void)state;
	char *dir = tmp_dir_create("synth");
	if (!dir)
		return -1;
	snprintf(tmp_root, sizeof tmp_root, "%s", dir);
	free(dir);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	remove_tree(tmp_root);
	return 0;
}

/* Path of `name` under the temporary root (static buffers, rotating, so a few can coexist). */
static const char *tmp_path(const char *fmt, ...)
{
	static char bufs[8][512];
	static int next;
	char *b = bufs[next++ % 8];
	int n = snprintf(b, sizeof bufs[0], "%s/", tmp_root);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(b + n, sizeof bufs[0] - (size_t)n, fmt, ap);
	va_end(ap);
	return b;
}

/* Runs dsv3-synth with `args`, stderr to tmp_root/stderr; returns its exit status. */
static int synth(const char *args)
{
	return run_shell("%s/dsv3-synth %s 2>%s/stderr", bin_dir(), args, tmp_root);
}

/* Writes a checkpoint under tmp_root/<dir> and asserts success. */
static void synth_ok(const char *dir, const char *args)
{
	char full[1024];
	snprintf(full, sizeof full, "%s --out %s", args, tmp_path("%s", dir));
	assert_int_equal(synth(full), 0);
}

static json_t *load_json(const char *path)
{
	json_error_t je;
	json_t *j = json_load_file(path, 0, &je);
	if (!j)
		fail_msg("%s: %s", path, je.text);
	return j;
}

/* The index's weight_map of checkpoint dir (caller decrefs the root it returns via *root). */
static json_t *weight_map(const char *dir, json_t **root)
{
	*root = load_json(tmp_path("%s/model.safetensors.index.json", dir));
	json_t *map = json_object_get(*root, "weight_map");
	assert_true(json_is_object(map));
	return map;
}

/* Opens the file that holds `name` (per the index) and returns the tensor. */
static const st_tensor *open_tensor(const char *dir, const char *name, st_file *f)
{
	json_t *root;
	json_t *map = weight_map(dir, &root);
	const char *file = json_string_value(json_object_get(map, name));
	if (!file)
		fail_msg("%s: %s not in the index", dir, name);
	dsv3_error err;
	if (st_open(f, tmp_path("%s/%s", dir, file), &err))
		fail_msg("%s", err.msg);
	json_decref(root);
	const st_tensor *t = st_find(f, name);
	if (!t)
		fail_msg("%s: %s not in %s", dir, name, file);
	return t;
}

static void assert_shape(const st_tensor *t, st_dtype dtype, int64_t rows, int64_t cols)
{
	assert_int_equal(t->dtype, dtype);
	assert_int_equal(t->ndim, cols ? 2 : 1);
	assert_int_equal(t->shape[0], rows);
	if (cols)
		assert_int_equal(t->shape[1], cols);
}

static void check_tensor(const char *dir, const char *name, st_dtype dtype, int64_t rows,
			 int64_t cols)
{
	st_file f;
	assert_shape(open_tensor(dir, name, &f), dtype, rows, cols);
	st_close(&f);
}

static int in_index(const char *dir, const char *name)
{
	json_t *root;
	int found = json_object_get(weight_map(dir, &root), name) != NULL;
	json_decref(root);
	return found;
}

/* Names of the regular files in a directory, sorted, one per line. */
static char *dir_listing(const char *dir)
{
	struct dirent **list;
	int n = scandir(dir, &list, NULL, alphasort);
	assert_true(n >= 0);
	char *s = calloc(1, 65536);
	for (int i = 0; i < n; i++) {
		if (list[i]->d_name[0] != '.') {
			strcat(s, list[i]->d_name);
			strcat(s, "\n");
		}
		free(list[i]);
	}
	free(list);
	return s;
}

static void assert_same_file(const char *a, const char *b)
{
	size_t la, lb;
	char *x = assert_read_file(a, &la), *y = assert_read_file(b, &lb);
	if (la != lb || memcmp(x, y, la))
		fail_msg("%s and %s differ", a, b);
	free(x);
	free(y);
}

/* Every file of directory a equals the same-named file of b, and both hold the same names. */
static void assert_same_dirs(const char *a, const char *b)
{
	char *la = dir_listing(tmp_path("%s", a)), *lb = dir_listing(tmp_path("%s", b));
	assert_string_equal(la, lb);
	for (char *name = strtok(la, "\n"); name; name = strtok(NULL, "\n"))
		assert_same_file(tmp_path("%s/%s", a, name), tmp_path("%s/%s", b, name));
	free(la);
	free(lb);
}

static void test_synth_same_arguments_give_identical_bytes(void **state)
{
	(void)state;
	synth_ok("same1", "--preset tiny --seed 7 --files 3");
	synth_ok("same2", "--preset tiny --seed 7 --files 3 --threads 1");
	assert_same_file(tmp_path("same1/SHA256SUMS"), tmp_path("same2/SHA256SUMS"));
	assert_same_dirs("same1", "same2");
}

static void test_synth_different_seed_gives_different_weights(void **state)
{
	(void)state;
	synth_ok("seed7", "--preset tiny --seed 7");
	synth_ok("seed8", "--preset tiny --seed 8");
	assert_same_file(tmp_path("seed7/config.json"), tmp_path("seed8/config.json"));
	static const char *const names[] = { "model.layers.0.self_attn.q_a_proj.weight",
					     "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
					     "model.embed_tokens.weight", "model.norm.weight" };
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
		st_file f7, f8;
		const st_tensor *a = open_tensor("seed7", names[i], &f7);
		const st_tensor *b = open_tensor("seed8", names[i], &f8);
		assert_int_equal(a->nbytes, b->nbytes);
		assert_true(memcmp(a->data, b->data, a->nbytes) != 0);
		st_close(&f7);
		st_close(&f8);
	}
}

/* Shapes from DESIGN §3.2 and the tiny preset's numbers (dim 256, 8 heads of 64+64, v 64,
 * q_lora 192, kv_lora 128, 16 experts of 256, 2 shared, dense inter 512, vocab 1024). */
static void test_synth_tiny_has_the_layout_shapes(void **state)
{
	(void)state;
	synth_ok("shapes", "--preset tiny --seed 1");
	const char *d = "shapes";
	check_tensor(d, "model.embed_tokens.weight", ST_BF16, 1024, 256);
	check_tensor(d, "lm_head.weight", ST_BF16, 1024, 256);
	check_tensor(d, "model.norm.weight", ST_BF16, 256, 0);
	check_tensor(d, "model.layers.0.input_layernorm.weight", ST_BF16, 256, 0);
	check_tensor(d, "model.layers.0.self_attn.q_a_proj.weight", ST_F8_E4M3, 192, 256);
	check_tensor(d, "model.layers.0.self_attn.q_a_proj.weight_scale_inv", ST_F32, 2, 2);
	check_tensor(d, "model.layers.0.self_attn.q_a_layernorm.weight", ST_BF16, 192, 0);
	check_tensor(d, "model.layers.0.self_attn.q_b_proj.weight", ST_F8_E4M3, 1024, 192);
	check_tensor(d, "model.layers.0.self_attn.q_b_proj.weight_scale_inv", ST_F32, 8, 2);
	check_tensor(d, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", ST_F8_E4M3, 192, 256);
	check_tensor(d, "model.layers.0.self_attn.kv_a_layernorm.weight", ST_BF16, 128, 0);
	check_tensor(d, "model.layers.0.self_attn.kv_b_proj.weight", ST_F8_E4M3, 1024, 128);
	check_tensor(d, "model.layers.0.self_attn.kv_b_proj.weight_scale_inv", ST_F32, 8, 1);
	check_tensor(d, "model.layers.0.self_attn.o_proj.weight", ST_F8_E4M3, 256, 512);
	check_tensor(d, "model.layers.0.mlp.gate_proj.weight", ST_F8_E4M3, 512, 256);
	check_tensor(d, "model.layers.0.mlp.down_proj.weight", ST_F8_E4M3, 256, 512);
	check_tensor(d, "model.layers.0.mlp.down_proj.weight_scale_inv", ST_F32, 2, 4);
	check_tensor(d, "model.layers.1.mlp.gate.weight", ST_BF16, 16, 256);
	check_tensor(d, "model.layers.1.mlp.gate.e_score_correction_bias", ST_F32, 16, 0);
	check_tensor(d, "model.layers.2.mlp.experts.15.up_proj.weight", ST_F8_E4M3, 256, 256);
	check_tensor(d, "model.layers.2.mlp.experts.15.down_proj.weight_scale_inv", ST_F32, 2, 2);
	check_tensor(d, "model.layers.2.mlp.shared_experts.gate_proj.weight", ST_F8_E4M3, 512, 256);
	check_tensor(d, "model.layers.2.mlp.shared_experts.down_proj.weight", ST_F8_E4M3, 256, 512);
	assert_false(in_index(d, "model.layers.1.mlp.gate_proj.weight"));
	assert_false(in_index(d, "model.layers.0.mlp.gate.weight"));
	assert_false(in_index(d, "model.layers.2.mlp.experts.16.up_proj.weight"));
	assert_false(in_index(d, "model.layers.3.input_layernorm.weight"));
}

/* Everything model_layout lists for the written config is there with its dtype and shape, and
 * nothing else is. */
static void test_synth_tiny_has_every_model_layout_tensor(void **state)
{
	(void)state;
	synth_ok("layout", "--preset tiny --seed 1 --files 2");
	dsv3_config c;
	dsv3_error err;
	if (config_load(&c, tmp_path("layout/config.json"), &err))
		fail_msg("%s", err.msg);
	layout_tensor *lt;
	size_t n;
	assert_int_equal(model_layout(&c, 0, &lt, &n), 0);
	for (size_t i = 0; i < n; i++)
		check_tensor("layout", lt[i].name, lt[i].dtype, lt[i].shape[0],
			     lt[i].ndim == 2 ? lt[i].shape[1] : 0);
	json_t *root;
	assert_int_equal(json_object_size(weight_map("layout", &root)), n);
	json_decref(root);
	free(lt);
}

static void test_synth_three_files_put_a_scale_apart_from_its_weight(void **state)
{
	(void)state;
	synth_ok("k3", "--preset tiny --seed 1 --files 3");
	char *list = dir_listing(tmp_path("k3"));
	assert_non_null(strstr(list, "model-00001-of-00003.safetensors\n"
				     "model-00002-of-00003.safetensors\n"
				     "model-00003-of-00003.safetensors\n"));
	assert_null(strstr(list, "model-00004"));
	free(list);
	json_t *root;
	json_t *map = weight_map("k3", &root);
	const char *name;
	json_t *file;
	int apart = 0;
	json_object_foreach(map, name, file) {
		size_t len = strlen(name);
		if (len < 17 || strcmp(name + len - 17, ".weight_scale_inv") != 0)
			continue;
		char weight[256];
		snprintf(weight, sizeof weight, "%.*s.weight", (int)(len - 17), name);
		json_t *wf = json_object_get(map, weight);
		assert_non_null(wf);
		apart += strcmp(json_string_value(wf), json_string_value(file)) != 0;
	}
	assert_true(apart >= 1);
	json_decref(root);
}

/* Every tensor of every file is in the index under that file, the index lists nothing more, and
 * total_size is the sum of the tensors' bytes. */
static void test_synth_index_maps_every_tensor_to_its_file(void **state)
{
	(void)state;
	synth_ok("idx", "--preset tiny --seed 3 --files 3 --mtp");
	json_t *root;
	json_t *map = weight_map("idx", &root);
	size_t seen = 0;
	uint64_t bytes = 0;
	for (int k = 1; k <= 3; k++) {
		char file[64];
		snprintf(file, sizeof file, "model-%05d-of-00003.safetensors", k);
		st_file f;
		dsv3_error err;
		if (st_open(&f, tmp_path("idx/%s", file), &err))
			fail_msg("%s", err.msg);
		assert_true(f.n_tensors > 0);
		for (size_t i = 0; i < f.n_tensors; i++) {
			const char *in = json_string_value(json_object_get(map, f.tensors[i].name));
			assert_non_null(in);
			assert_string_equal(in, file);
			bytes += f.tensors[i].nbytes;
		}
		/* HF checkpoints carry {"format": "pt"} */
		assert_int_equal(f.n_metadata, 1);
		assert_string_equal(f.metadata[0], "format");
		assert_string_equal(f.metadata[1], "pt");
		seen += f.n_tensors;
		st_close(&f);
	}
	assert_int_equal(seen, json_object_size(map));
	json_t *total = json_object_get(json_object_get(root, "metadata"), "total_size");
	assert_int_equal(json_integer_value(total), bytes);
	json_decref(root);
}

/* E4M3 ("fn") by its definition: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals
 * m * 2^-9; 0x7F/0xFF are NaN. */
static double e4m3_value(uint8_t v)
{
	int e = (v >> 3) & 0xF, m = v & 7;
	double mag = e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
	return v & 0x80 ? -mag : mag;
}

static float f32_at(const uint8_t *p)
{
	uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
	float f;
	memcpy(&f, &u, sizeof f);
	return f;
}

static double bf16_at(const uint8_t *p)
{
	uint32_t u = ((uint32_t)p[0] | (uint32_t)p[1] << 8) << 16;
	float f;
	memcpy(&f, &u, sizeof f);
	return f;
}

/* RMS of the dequantised weight `name` (FP8 with its 128x128 block scales). */
static double fp8_weight_rms(const char *dir, const char *name, int64_t *fan_in)
{
	char scale_name[256];
	snprintf(scale_name, sizeof scale_name, "%s_scale_inv", name);
	st_file fw, fs;
	const st_tensor *w = open_tensor(dir, name, &fw);
	const st_tensor *s = open_tensor(dir, scale_name, &fs);
	assert_int_equal(w->dtype, ST_F8_E4M3);
	int64_t rows = w->shape[0], cols = w->shape[1], scols = s->shape[1];
	assert_int_equal(s->shape[0], (rows + 127) / 128);
	assert_int_equal(scols, (cols + 127) / 128);
	double sum = 0;
	for (int64_t r = 0; r < rows; r++) {
		for (int64_t c = 0; c < cols; c++) {
			uint8_t code = w->data[r * cols + c];
			assert_true(code != 0x7F && code != 0xFF);
			float scale = f32_at(s->data + 4 * ((r / 128) * scols + c / 128));
			assert_true(isfinite(scale) && scale > 0);
			double v = e4m3_value(code) * scale;
			sum += v * v;
		}
	}
	*fan_in = cols;
	st_close(&fw);
	st_close(&fs);
	return sqrt(sum / (double)(rows * cols));
}

static void assert_rms_near(double rms, int64_t fan_in, const char *name)
{
	double want = 1.0 / sqrt((double)fan_in);
	if (!(rms > want / 2 && rms < want * 2))
		fail_msg("%s: RMS %g, expected about %g", name, rms, want);
}

static void test_synth_fp8_weights_are_finite_with_std_near_inverse_sqrt_fan_in(void **state)
{
	(void)state;
	synth_ok("fp8", "--preset tiny --seed 5");
	static const char *const names[] = {
		"model.layers.0.self_attn.q_a_proj.weight",
		"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", /* 192 rows: a partial block */
		"model.layers.0.self_attn.kv_b_proj.weight",
		"model.layers.0.mlp.down_proj.weight",
		"model.layers.1.mlp.experts.0.gate_proj.weight",
		"model.layers.2.mlp.experts.15.down_proj.weight",
		"model.layers.2.mlp.shared_experts.up_proj.weight",
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
		int64_t fan_in;
		double rms = fp8_weight_rms("fp8", names[i], &fan_in);
		assert_rms_near(rms, fan_in, names[i]);
	}
	/* no NaN code anywhere */
	st_file f;
	dsv3_error err;
	if (st_open(&f, tmp_path("fp8/model-00001-of-00001.safetensors"), &err))
		fail_msg("%s", err.msg);
	for (size_t i = 0; i < f.n_tensors; i++) {
		const st_tensor *t = &f.tensors[i];
		for (uint64_t j = 0; t->dtype == ST_F8_E4M3 && j < t->nbytes; j++)
			if ((t->data[j] & 0x7F) == 0x7F)
				fail_msg("%s: NaN code at %llu", t->name, (unsigned long long)j);
	}
	st_close(&f);
}

/* Norms are 1 + U(-0.1, 0.1), the gate bias U(-0.05, 0.05), embeddings U(-1, 1). */
static void test_synth_small_tensors_stay_in_their_ranges(void **state)
{
	(void)state;
	synth_ok("ranges", "--preset tiny --seed 5");
	st_file f;
	const st_tensor *t = open_tensor("ranges", "model.layers.1.post_attention_layernorm.weight", &f);
	for (int64_t i = 0; i < t->shape[0]; i++) {
		double v = bf16_at(t->data + 2 * i);
		assert_true(v >= 0.9 - 1e-3 && v <= 1.1 + 1e-3);
	}
	st_close(&f);
	t = open_tensor("ranges", "model.layers.1.mlp.gate.e_score_correction_bias", &f);
	for (int64_t i = 0; i < t->shape[0]; i++)
		assert_true(fabs(f32_at(t->data + 4 * i)) <= 0.05);
	st_close(&f);
	t = open_tensor("ranges", "model.embed_tokens.weight", &f);
	for (uint64_t i = 0; i < st_numel(t); i++)
		assert_true(fabs(bf16_at(t->data + 2 * i)) <= 1.0);
	st_close(&f);
}

static void test_synth_mtp_adds_the_layer_after_the_last(void **state)
{
	(void)state;
	synth_ok("mtp", "--preset tiny --seed 1 --mtp");
	const char *d = "mtp";
	check_tensor(d, "model.layers.3.embed_tokens.weight", ST_BF16, 1024, 256);
	check_tensor(d, "model.layers.3.enorm.weight", ST_BF16, 256, 0);
	check_tensor(d, "model.layers.3.hnorm.weight", ST_BF16, 256, 0);
	/* BF16 without a scale, as in DeepSeek's FP8 releases */
	check_tensor(d, "model.layers.3.eh_proj.weight", ST_BF16, 256, 512);
	assert_false(in_index(d, "model.layers.3.eh_proj.weight_scale_inv"));
	check_tensor(d, "model.layers.3.shared_head.norm.weight", ST_BF16, 256, 0);
	check_tensor(d, "model.layers.3.shared_head.head.weight", ST_BF16, 1024, 256);
	check_tensor(d, "model.layers.3.self_attn.q_b_proj.weight", ST_F8_E4M3, 1024, 192);
	check_tensor(d, "model.layers.3.mlp.gate.weight", ST_BF16, 16, 256);
	check_tensor(d, "model.layers.3.mlp.experts.15.down_proj.weight", ST_F8_E4M3, 256, 256);
	check_tensor(d, "model.layers.3.mlp.shared_experts.up_proj.weight", ST_F8_E4M3, 512, 256);
	assert_false(in_index(d, "model.layers.4.input_layernorm.weight"));
	json_t *cfg = load_json(tmp_path("mtp/config.json"));
	assert_int_equal(json_integer_value(json_object_get(cfg, "num_nextn_predict_layers")), 1);
	json_decref(cfg);
}

static void test_synth_tiny_v2_is_bf16_with_q_proj_and_no_bias(void **state)
{
	(void)state;
	synth_ok("v2", "--preset tiny-v2 --seed 1");
	const char *d = "v2";
	check_tensor(d, "model.layers.0.self_attn.q_proj.weight", ST_BF16, 1024, 256);
	check_tensor(d, "model.layers.1.mlp.experts.3.gate_proj.weight", ST_BF16, 256, 256);
	check_tensor(d, "model.layers.1.mlp.gate.weight", ST_BF16, 16, 256);
	assert_false(in_index(d, "model.layers.0.self_attn.q_a_proj.weight"));
	assert_false(in_index(d, "model.layers.1.mlp.gate.e_score_correction_bias"));
	assert_false(in_index(d, "model.layers.2.input_layernorm.weight"));
	json_t *root;
	const char *name;
	json_t *file;
	json_t *map = weight_map(d, &root);
	json_object_foreach(map, name, file)
		assert_null(strstr(name, "scale_inv"));
	json_decref(root);
	json_t *cfg = load_json(tmp_path("v2/config.json"));
	assert_null(json_object_get(cfg, "quantization_config"));
	assert_string_equal(json_string_value(json_object_get(cfg, "model_type")), "deepseek_v2");
	assert_true(json_is_null(json_object_get(cfg, "q_lora_rank")));
	json_decref(cfg);
}

/* BF16 linears from --dtype bf16 have std near 1/sqrt(fan_in) too. */
static void test_synth_dtype_bf16_drops_scales(void **state)
{
	(void)state;
	synth_ok("bf16", "--preset tiny --seed 1 --dtype bf16");
	st_file f;
	const st_tensor *t = open_tensor("bf16", "model.layers.0.self_attn.o_proj.weight", &f);
	assert_shape(t, ST_BF16, 256, 512);
	double sum = 0;
	for (uint64_t i = 0; i < st_numel(t); i++)
		sum += bf16_at(t->data + 2 * i) * bf16_at(t->data + 2 * i);
	assert_rms_near(sqrt(sum / (double)st_numel(t)), 512, t->name);
	st_close(&f);
	assert_false(in_index("bf16", "model.layers.0.self_attn.o_proj.weight_scale_inv"));
}

/* --config with the config.json a preset wrote gives the same checkpoint. */
static void test_synth_config_file_reproduces_the_preset(void **state)
{
	(void)state;
	synth_ok("pre", "--preset tiny --seed 11 --files 2");
	char args[1024];
	snprintf(args, sizeof args, "--config %s --seed 11 --files 2", tmp_path("pre/config.json"));
	synth_ok("cfg", args);
	assert_same_dirs("pre", "cfg");
}

/* SHA256SUMS checks with sha256sum, and each tensor's logical hash is that of its bytes. */
static void test_synth_manifests_match_the_files(void **state)
{
	(void)state;
	synth_ok("sums", "--preset tiny --seed 2 --files 2");
	char cmd[1024];
	snprintf(cmd, sizeof cmd, "cd %s && sha256sum --quiet -c SHA256SUMS", tmp_path("sums"));
	assert_int_equal(system(cmd), 0);
	json_t *m = load_json(tmp_path("sums/tensors.sha256.json"));
	static const char *const names[] = { "lm_head.weight",
					     "model.layers.2.mlp.experts.7.up_proj.weight_scale_inv" };
	for (size_t i = 0; i < 2; i++) {
		st_file f;
		const st_tensor *t = open_tensor("sums", names[i], &f);
		uint8_t d[32];
		char hex[65];
		sha256_buffer(t->data, t->nbytes, d);
		sha256_hex(d, hex);
		json_t *e = json_object_get(m, names[i]);
		assert_non_null(e);
		assert_string_equal(json_string_value(json_object_get(e, "sha256")), hex);
		st_close(&f);
	}
	json_decref(m);
}

static void test_synth_unknown_preset_fails_and_writes_nothing(void **state)
{
	(void)state;
	char args[1024];
	snprintf(args, sizeof args, "--preset tiny-v9 --seed 1 --out %s", tmp_path("unknown"));
	int rc = synth(args);
	assert_true(rc == 1 || rc == 2);
	size_t len;
	char *msg = assert_read_file(tmp_path("stderr"), &len);
	assert_non_null(strstr(msg, "tiny-v9"));
	free(msg);
	struct stat st;
	if (stat(tmp_path("unknown"), &st) == 0) {
		char *list = dir_listing(tmp_path("unknown"));
		assert_string_equal(list, "");
		free(list);
	}
}

static void test_synth_refuses_bad_arguments(void **state)
{
	(void)state;
	const char *out = tmp_path("bad");
	char args[1024];
	snprintf(args, sizeof args, "--preset tiny --seed 1 --files 0 --out %s", out);
	assert_int_equal(synth(args), 1);
	snprintf(args, sizeof args, "--preset tiny --seed 1 --files 100000 --out %s", out);
	assert_int_equal(synth(args), 1);
	snprintf(args, sizeof args, "--preset tiny --seed 1 --dtype fp16 --out %s", out);
	assert_int_equal(synth(args), 1);
	snprintf(args, sizeof args, "--preset tiny --out %s", out);
	assert_int_equal(synth(args), 1);
	assert_int_equal(synth("--preset tiny --seed 1 --out /proc/dsv3-not-writable"), 3);
	assert_int_equal(synth("--help >/dev/null"), 0);
}

static void test_synth_bad_config_is_a_data_error_naming_the_key(void **state)
{
	(void)state;
	const char *cfg = tmp_path("badcfg.json");
	FILE *f = fopen(cfg, "w");
	assert_non_null(f);
	fputs("{\"model_type\": \"deepseek_v3\", \"vocab_size\": 1024}\n", f);
	fclose(f);
	char args[1024];
	snprintf(args, sizeof args, "--config %s --seed 1 --out %s", cfg, tmp_path("badcfg"));
	assert_int_equal(synth(args), 2);
	size_t len;
	char *msg = assert_read_file(tmp_path("stderr"), &len);
	assert_non_null(strstr(msg, "hidden_size"));
	free(msg);
}

/* DeepSeek-V3/R1's published FP8 checkpoint: 91991 tensors holding 684,531,386,000 numbers. */
static void test_model_layout_of_deepseek_v3_matches_the_release(void **state)
{
	(void)state;
	static const char v3[] =
		"{\"model_type\": \"deepseek_v3\", \"vocab_size\": 129280, \"hidden_size\": 7168,"
		" \"intermediate_size\": 18432, \"moe_intermediate_size\": 2048,"
		" \"num_hidden_layers\": 61, \"first_k_dense_replace\": 3,"
		" \"num_attention_heads\": 128, \"num_key_value_heads\": 128,"
		" \"n_routed_experts\": 256, \"n_shared_experts\": 1, \"num_experts_per_tok\": 8,"
		" \"n_group\": 8, \"topk_group\": 4, \"routed_scaling_factor\": 2.5,"
		" \"scoring_func\": \"sigmoid\", \"topk_method\": \"noaux_tc\","
		" \"q_lora_rank\": 1536, \"kv_lora_rank\": 512, \"qk_nope_head_dim\": 128,"
		" \"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"rope_theta\": 10000,"
		" \"max_position_embeddings\": 163840, \"rms_norm_eps\": 1e-06,"
		" \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40,"
		" \"original_max_position_embeddings\": 4096, \"beta_fast\": 32, \"beta_slow\": 1,"
		" \"mscale\": 1.0, \"mscale_all_dim\": 1.0}, \"num_nextn_predict_layers\": 1,"
		" \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\","
		" \"quant_method\": \"fp8\", \"weight_block_size\": [128, 128]}}";
	dsv3_config c;
	dsv3_error err;
	if (config_parse(&c, v3, "v3", &err))
		fail_msg("%s", err.msg);
	layout_tensor *lt;
	size_t n;
	assert_int_equal(model_layout(&c, 1, &lt, &n), 0);
	assert_int_equal(n, 91991);
	uint64_t numbers = 0;
	for (size_t i = 0; i < n; i++)
		numbers += (uint64_t)lt[i].shape[0] * (uint64_t)(lt[i].ndim == 2 ? lt[i].shape[1] : 1);
	assert_int_equal(numbers, 684531386000ull);
	free(lt);
	/* without the MTP layer: 61 layers' worth only */
	assert_int_equal(model_layout(&c, 0, &lt, &n), 0);
	assert_string_equal(lt[n - 1].name, "lm_head.weight");
	for (size_t i = 0; i < n; i++)
		assert_true(lt[i].layer < 61);
	free(lt);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_model_layout_of_deepseek_v3_matches_the_release),
		cmocka_unit_test(test_synth_same_arguments_give_identical_bytes),
		cmocka_unit_test(test_synth_different_seed_gives_different_weights),
		cmocka_unit_test(test_synth_tiny_has_the_layout_shapes),
		cmocka_unit_test(test_synth_tiny_has_every_model_layout_tensor),
		cmocka_unit_test(test_synth_three_files_put_a_scale_apart_from_its_weight),
		cmocka_unit_test(test_synth_index_maps_every_tensor_to_its_file),
		cmocka_unit_test(test_synth_fp8_weights_are_finite_with_std_near_inverse_sqrt_fan_in),
		cmocka_unit_test(test_synth_small_tensors_stay_in_their_ranges),
		cmocka_unit_test(test_synth_mtp_adds_the_layer_after_the_last),
		cmocka_unit_test(test_synth_tiny_v2_is_bf16_with_q_proj_and_no_bias),
		cmocka_unit_test(test_synth_dtype_bf16_drops_scales),
		cmocka_unit_test(test_synth_config_file_reproduces_the_preset),
		cmocka_unit_test(test_synth_manifests_match_the_files),
		cmocka_unit_test(test_synth_unknown_preset_fails_and_writes_nothing),
		cmocka_unit_test(test_synth_refuses_bad_arguments),
		cmocka_unit_test(test_synth_bad_config_is_a_data_error_naming_the_key),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
