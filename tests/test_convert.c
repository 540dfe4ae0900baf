/* dsv3-convert: convert.py's name mapping row by row, exact slices and expert ranges in the
 * rank files, logical hashes, every refusal (exit 2, nothing written) and a run killed mid-write.
 * Inputs come from dsv3-synth; expected bytes are computed here from the input, independently. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "convert_names.h"
#include "hf_ckpt.h"
#include "manifest.h"
#include "safetensors.h"
#include "sha256.h"
#include "support/test_support.h"

/* ---- helpers ----------------------------------------------------------------------------- */

typedef struct {
	char *root;	/* the temp dir of this test binary */
	char tiny[128]; /* dsv3-synth --preset tiny --seed 1 --files 3 --mtp */
} fixture;

static int convert(const char *in, const char *out, int n_experts, int mp, const char *extra)
{
	return run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts %d "
			 "--model-parallel %d %s", bin_dir(), in, out, n_experts, mp,
			 extra ? extra : "");
}

static int setup(void **state)
{
	fixture *fx = calloc(1, sizeof *fx);
	if (!fx || !(fx->root = tmp_dir_create("convert")))
		return -1;
	snprintf(fx->tiny, sizeof fx->tiny, "%s/tiny", fx->root);
	if (run_synth("tiny", 1, "--files 3 --mtp", fx->tiny) != 0)
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

/* A fresh output path under the fixture's root. */
static const char *out_path(const fixture *fx, const char *name)
{
	return fresh_path(fx->root, name);
}

/* ---- names ------------------------------------------------------------------------------- */

typedef struct {
	const char *hf, *converted;
	int split, expert, layer;
} name_case;

/* Every row of DESIGN §3.3 (and convert.py's "scale" row), scales, the gate bias, routed and
 * shared experts, the MTP layer's own modules; expected names written out by hand. */
static const name_case name_cases[] = {
	{ "model.embed_tokens.weight", "embed.weight", 0, -1, -1 },
	{ "model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight", -1, -1, 0 },
	{ "model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight", -1, -1, 0 },
	{ "model.layers.0.self_attn.q_proj.weight", "layers.0.attn.wq.weight", 0, -1, 0 },
	{ "model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.wq_a.weight", -1, -1, 0 },
	{ "model.layers.0.self_attn.q_a_proj.weight_scale_inv", "layers.0.attn.wq_a.scale", -1, -1, 0 },
	{ "model.layers.0.self_attn.q_a_layernorm.weight", "layers.0.attn.q_norm.weight", -1, -1, 0 },
	{ "model.layers.0.self_attn.q_b_proj.weight", "layers.0.attn.wq_b.weight", 0, -1, 0 },
	{ "model.layers.0.self_attn.q_b_proj.weight_scale_inv", "layers.0.attn.wq_b.scale", 0, -1, 0 },
	{ "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "layers.1.attn.wkv_a.weight", -1, -1, 1 },
	{ "model.layers.1.self_attn.kv_a_layernorm.weight", "layers.1.attn.kv_norm.weight", -1, -1, 1 },
	{ "model.layers.1.self_attn.kv_b_proj.weight", "layers.1.attn.wkv_b.weight", 0, -1, 1 },
	{ "model.layers.1.self_attn.o_proj.weight", "layers.1.attn.wo.weight", 1, -1, 1 },
	{ "model.layers.1.self_attn.o_proj.weight_scale_inv", "layers.1.attn.wo.scale", 1, -1, 1 },
	{ "model.layers.7.mlp.gate.weight", "layers.7.ffn.gate.weight", -1, -1, 7 },
	{ "model.layers.7.mlp.gate.e_score_correction_bias", "layers.7.ffn.gate.bias", -1, -1, 7 },
	{ "model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.w1.weight", 0, -1, 0 },
	{ "model.layers.0.mlp.down_proj.weight", "layers.0.ffn.w2.weight", 1, -1, 0 },
	{ "model.layers.0.mlp.up_proj.weight_scale_inv", "layers.0.ffn.w3.scale", 0, -1, 0 },
	{ "model.layers.12.mlp.experts.17.down_proj.weight_scale_inv", "layers.12.ffn.experts.17.w2.scale", 1, 17, 12 },
	{ "model.layers.12.mlp.experts.0.gate_proj.weight", "layers.12.ffn.experts.0.w1.weight", 0, 0, 12 },
	{ "model.layers.12.mlp.shared_experts.up_proj.weight", "layers.12.ffn.shared_experts.w3.weight", 0, -1, 12 },
	{ "model.norm.weight", "norm.weight", -1, -1, -1 },
	{ "lm_head.weight", "head.weight", 0, -1, -1 },
	{ "model.layers.0.self_attn.scale.weight", "layers.0.attn.scale.weight", -1, -1, 0 },
	/* MTP layer (our own rules: convert.py drops the layer) */
	{ "model.layers.61.enorm.weight", "layers.61.enorm.weight", -1, -1, 61 },
	{ "model.layers.61.hnorm.weight", "layers.61.hnorm.weight", -1, -1, 61 },
	{ "model.layers.61.eh_proj.weight", "layers.61.eh_proj.weight", -1, -1, 61 },
	{ "model.layers.61.eh_proj.weight_scale_inv", "layers.61.eh_proj.scale", -1, -1, 61 },
	{ "model.layers.61.embed_tokens.weight", "layers.61.embed.weight", 0, -1, 61 },
	{ "model.layers.61.shared_head.norm.weight", "layers.61.shared_head.norm.weight", -1, -1, 61 },
	{ "model.layers.61.shared_head.head.weight", "layers.61.shared_head.head.weight", 0, -1, 61 },
};

static void test_convert_name_maps_every_design_row(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof name_cases / sizeof name_cases[0]; i++) {
		const name_case *c = &name_cases[i];
		converted_name out;
		assert_int_equal(convert_name(c->hf, &out), 0);
		assert_string_equal(out.name, c->converted);
		assert_int_equal(out.split_dim, c->split);
		assert_int_equal(out.expert, c->expert);
		assert_int_equal(out.layer, c->layer);
	}
}

static void test_convert_name_rejects_unknown_modules(void **state)
{
	(void)state;
	static const char *const bad[] = {
		"model.layers.0.self_attn.rotary_emb.inv_freq", /* key rotary_emb */
		"weight",					/* no key at all */
		"model.layers.0.mlp.experts.x.up_proj.weight",	/* expert index not a number */
		"model.layers.61.head.weight",			/* head only as shared_head.head */
		"lm_head.bias.weight",				/* key bias */
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		converted_name out;
		assert_int_equal(convert_name(bad[i], &out), -1);
	}
	assert_int_equal(hf_name_is_mtp_module("model.layers.61.enorm.weight"), 1);
	assert_int_equal(hf_name_is_mtp_module("model.layers.61.shared_head.head.weight"), 1);
	assert_int_equal(hf_name_is_mtp_module("model.layers.61.self_attn.o_proj.weight"), 0);
}

static void test_converted_name_info_recovers_split_and_expert(void **state)
{
	(void)state;
	static const name_case cases[] = {
		{ NULL, "layers.0.attn.wq.weight", 0, -1, 0 },
		{ NULL, "layers.0.attn.wq_b.scale", 0, -1, 0 },
		{ NULL, "layers.0.attn.wkv_b.weight", 0, -1, 0 },
		{ NULL, "layers.2.attn.wo.scale", 1, -1, 2 },
		{ NULL, "layers.0.ffn.w1.weight", 0, -1, 0 },
		{ NULL, "layers.0.ffn.w2.weight", 1, -1, 0 },
		{ NULL, "layers.0.ffn.w3.scale", 0, -1, 0 },
		{ NULL, "embed.weight", 0, -1, -1 },
		{ NULL, "head.weight", 0, -1, -1 },
		{ NULL, "layers.61.shared_head.head.weight", 0, -1, 61 },
		{ NULL, "layers.61.embed.weight", 0, -1, 61 },
		{ NULL, "layers.0.attn.wq_a.weight", -1, -1, 0 },
		{ NULL, "layers.0.attn.wkv_a.scale", -1, -1, 0 },
		{ NULL, "norm.weight", -1, -1, -1 },
		{ NULL, "layers.3.ffn.gate.bias", -1, -1, 3 },
		{ NULL, "layers.3.ffn.experts.9.w2.weight", 1, 9, 3 },
		{ NULL, "layers.3.ffn.shared_experts.w2.weight", 1, -1, 3 },
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		converted_name out;
		assert_int_equal(converted_name_info(cases[i].converted, &out), 0);
		assert_string_equal(out.name, cases[i].converted);
		assert_int_equal(out.split_dim, cases[i].split);
		assert_int_equal(out.expert, cases[i].expert);
		assert_int_equal(out.layer, cases[i].layer);
	}
	assert_int_equal(expert_rank(9, 16, 4), 2);
}

/* ---- conversions ------------------------------------------------------------------------ */

static void assert_converted_dir(const char *out, int mp)
{
	for (int r = 0; r < mp; r++) {
		char name[64];
		snprintf(name, sizeof name, "model%d-mp%d.safetensors", r, mp);
		assert_true(path_exists(path_in(out, name)));
	}
	assert_true(path_exists(path_in(out, "config.json")));
	assert_true(path_exists(path_in(out, "SHA256SUMS")));
	assert_true(path_exists(path_in(out, "tensors.sha256.json")));
	int finals, temps;
	count_dir_entries(out, &finals, &temps);
	assert_int_equal(finals, mp + 3);
	assert_int_equal(temps, 0);
}

static void test_convert_mp1_mp2_mp4_succeed(void **state)
{
	fixture *fx = *state;
	static const int mps[] = { 1, 2, 4 };
	for (size_t i = 0; i < 3; i++) {
		char name[16];
		snprintf(name, sizeof name, "mp%d", mps[i]);
		const char *out = out_path(fx, name);
		assert_int_equal(convert(fx->tiny, out, 16, mps[i], NULL), 0);
		assert_converted_dir(out, mps[i]);
		assert_int_equal(run_quiet(NULL, "cd %s && sha256sum --quiet -c SHA256SUMS", out), 0);
	}
}

/* The test's own reading of DESIGN §3.3: split dim by converted module name. */
static int expected_split(const char *converted)
{
	static const struct {
		const char *key;
		int dim;
	} rows[] = { { "wq", 0 }, { "wq_b", 0 }, { "wkv_b", 0 }, { "wo", 1 }, { "w1", 0 },
		     { "w2", 1 }, { "w3", 0 },	 { "embed", 0 }, { "head", 0 } };
	const char *end = strrchr(converted, '.'), *start = end;
	while (start > converted && start[-1] != '.')
		start--;
	for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
		if (strlen(rows[i].key) == (size_t)(end - start) &&
		    !strncmp(rows[i].key, start, (size_t)(end - start)))
			return rows[i].dim;
	return -1;
}

/* Routed expert index from "layers.L.ffn.experts.J.*", else -1. */
static int expected_expert(const char *converted)
{
	int layer, j, used = 0;
	if (sscanf(converted, "layers.%d.ffn.experts.%d.%n", &layer, &j, &used) == 2 && used > 0)
		return j;
	return -1;
}

typedef struct {
	st_file files[8];
	size_t n;
} file_set;

static void open_set(file_set *s, const char *dir, const char *pattern)
{
	char **names;
	dsv3_error err;
	assert_int_equal(dir_glob(dir, pattern, &names, &s->n, &err), 0);
	assert_true(s->n > 0 && s->n <= 8);
	for (size_t i = 0; i < s->n; i++) {
		assert_int_equal(st_open(&s->files[i], path_in(dir, names[i]), &err), 0);
		free(names[i]);
	}
	free(names);
}

static void close_set(file_set *s)
{
	for (size_t i = 0; i < s->n; i++)
		st_close(&s->files[i]);
}

/* Rank r's part of t along dim (1-D or 2-D), computed byte by byte from the definition. */
static uint8_t *expected_slice(const st_tensor *t, int dim, int r, int mp, size_t *len)
{
	size_t es = dtype_size(t->dtype);
	size_t rows = t->ndim == 2 ? (size_t)t->shape[0] : 1;
	size_t cols = t->ndim == 2 ? (size_t)t->shape[1] : (size_t)t->shape[0];
	uint8_t *out = malloc(t->nbytes / (size_t)mp), *p = out;
	for (size_t i = 0; i < rows; i++)
		for (size_t j = 0; j < cols; j++) {
			int keep = t->ndim == 2 && dim == 0 ? i / (rows / (size_t)mp) == (size_t)r
							    : j / (cols / (size_t)mp) == (size_t)r;
			if (keep) {
				memcpy(p, t->data + (i * cols + j) * es, es);
				p += es;
			}
		}
	*len = (size_t)(p - out);
	return out;
}

static void check_tensor_on_ranks(const st_tensor *in, const char *cname, file_set *outs, int mp,
				  int n_experts, size_t *expect_count)
{
	int expert = expected_expert(cname), dim = expected_split(cname);
	for (int r = 0; r < mp; r++) {
		const st_tensor *o = st_find(&outs->files[r], cname);
		if (expert >= 0) {
			int owner = expert / (n_experts / mp);
			assert_int_equal(o != NULL, owner == r);
			if (o) {
				assert_int_equal(o->nbytes, in->nbytes);
				assert_memory_equal(o->data, in->data, in->nbytes);
				expect_count[r]++;
			}
			continue;
		}
		assert_non_null(o);
		expect_count[r]++;
		assert_int_equal(o->dtype, in->dtype);
		assert_int_equal(o->ndim, in->ndim);
		if (dim < 0) {
			assert_memory_equal(o->shape, in->shape, sizeof in->shape[0] * (size_t)in->ndim);
			assert_memory_equal(o->data, in->data, in->nbytes);
			continue;
		}
		for (int d = 0; d < in->ndim; d++)
			assert_int_equal(o->shape[d], d == dim ? in->shape[d] / mp : in->shape[d]);
		size_t len;
		uint8_t *want = expected_slice(in, dim, r, mp, &len);
		assert_int_equal(o->nbytes, len);
		assert_memory_equal(o->data, want, len);
		free(want);
	}
}

/* Every output tensor is exactly its slice of the input, nothing else is in the files, and each
 * logical hash is the SHA-256 of the whole input tensor. */
static void test_convert_mp2_writes_exact_slices(void **state)
{
	fixture *fx = *state;
	const char *out = out_path(fx, "slices");
	assert_int_equal(convert(fx->tiny, out, 16, 2, NULL), 0);
	file_set ins, outs;
	open_set(&ins, fx->tiny, "*.safetensors");
	open_set(&outs, out, "model*-mp2.safetensors");
	assert_int_equal(outs.n, 2);
	manifest m;
	dsv3_error err;
	assert_int_equal(manifest_read(&m, out, &err), 0);
	size_t count[2] = { 0, 0 }, n_logical = 0;
	for (size_t f = 0; f < ins.n; f++)
		for (size_t k = 0; k < ins.files[f].n_tensors; k++) {
			const st_tensor *in = &ins.files[f].tensors[k];
			if (!strncmp(in->name, "model.layers.3.", 15))
				continue; /* the tiny preset's MTP layer: dropped by default */
			converted_name cn;
			assert_int_equal(convert_name(in->name, &cn), 0);
			check_tensor_on_ranks(in, cn.name, &outs, 2, 16, count);
			uint8_t sha[32];
			sha256_buffer(in->data, in->nbytes, sha);
			size_t found = 0;
			for (size_t i = 0; i < m.n_tensors; i++)
				if (!strcmp(m.tensors[i].name, cn.name)) {
					assert_memory_equal(m.tensors[i].sha256, sha, 32);
					assert_memory_equal(m.tensors[i].shape, in->shape,
							    sizeof in->shape[0] * (size_t)in->ndim);
					found++;
				}
			assert_int_equal(found, 1);
			n_logical++;
		}
	assert_int_equal(outs.files[0].n_tensors, count[0]);
	assert_int_equal(outs.files[1].n_tensors, count[1]);
	assert_int_equal(m.n_tensors, n_logical);
	assert_int_equal(outs.files[0].n_metadata, 0); /* save_file without metadata */
	manifest_free(&m);
	close_set(&ins);
	close_set(&outs);
}

/* mp 4 of 16 experts: rank r holds experts [4r, 4r+4) of each MoE layer (1 and 2), whole. */
static void test_convert_rank_files_hold_their_expert_ranges(void **state)
{
	fixture *fx = *state;
	const char *out = out_path(fx, "experts");
	assert_int_equal(convert(fx->tiny, out, 16, 4, NULL), 0);
	file_set outs;
	open_set(&outs, out, "model*-mp4.safetensors");
	assert_int_equal(outs.n, 4);
	for (int r = 0; r < 4; r++) {
		int seen[3][16] = { { 0 } };
		const st_file *f = &outs.files[r];
		for (size_t k = 0; k < f->n_tensors; k++) {
			int layer, j, used = 0;
			if (sscanf(f->tensors[k].name, "layers.%d.ffn.experts.%d.%n", &layer, &j, &used) == 2 &&
			    used > 0) {
				assert_true(layer >= 1 && layer <= 2 && j >= 0 && j < 16);
				seen[layer][j]++;
			}
		}
		for (int layer = 1; layer <= 2; layer++)
			for (int j = 0; j < 16; j++) /* w1, w2, w3 and their scales */
				assert_int_equal(seen[layer][j], j / 4 == r ? 6 : 0);
	}
	close_set(&outs);
}

static void test_convert_logical_hashes_equal_across_mp(void **state)
{
	fixture *fx = *state;
	const char *a = out_path(fx, "lh1"), *b = out_path(fx, "lh4");
	assert_int_equal(convert(fx->tiny, a, 16, 1, NULL), 0);
	assert_int_equal(convert(fx->tiny, b, 16, 4, NULL), 0);
	size_t la, lb;
	char *ja = read_whole_file(path_in(a, "tensors.sha256.json"), &la);
	char *jb = read_whole_file(path_in(b, "tensors.sha256.json"), &lb);
	assert_non_null(ja);
	assert_non_null(jb);
	assert_int_equal(la, lb);
	assert_memory_equal(ja, jb, la);
	free(ja);
	free(jb);
}

/* --keep-mtp keeps layer 3 of the tiny preset (num_hidden_layers 3): its own modules too. */
static void test_convert_keep_mtp_keeps_the_mtp_layer(void **state)
{
	fixture *fx = *state;
	const char *out = out_path(fx, "mtp");
	assert_int_equal(convert(fx->tiny, out, 16, 2, "--keep-mtp"), 0);
	file_set outs, ins;
	open_set(&outs, out, "model*-mp2.safetensors");
	open_set(&ins, fx->tiny, "*.safetensors");
	const st_tensor *in_head = NULL;
	for (size_t f = 0; f < ins.n && !in_head; f++)
		in_head = st_find(&ins.files[f], "model.layers.3.shared_head.head.weight");
	assert_non_null(in_head);
	for (int r = 0; r < 2; r++) {
		assert_non_null(st_find(&outs.files[r], "layers.3.enorm.weight"));
		assert_non_null(st_find(&outs.files[r], "layers.3.hnorm.weight"));
		assert_non_null(st_find(&outs.files[r], "layers.3.eh_proj.weight"));
		assert_non_null(st_find(&outs.files[r], "layers.3.shared_head.norm.weight"));
		assert_non_null(st_find(&outs.files[r], "layers.3.embed.weight"));
		const st_tensor *h = st_find(&outs.files[r], "layers.3.shared_head.head.weight");
		assert_non_null(h);
		assert_int_equal(h->shape[0], in_head->shape[0] / 2); /* split by rows, like lm_head */
		size_t len;
		uint8_t *want = expected_slice(in_head, 0, r, 2, &len);
		assert_memory_equal(h->data, want, len);
		free(want);
	}
	close_set(&outs);
	close_set(&ins);
	/* and by default it is gone */
	const char *plain = out_path(fx, "nomtp");
	assert_int_equal(convert(fx->tiny, plain, 16, 2, NULL), 0);
	assert_false(file_contains(path_in(plain, "tensors.sha256.json"), "layers.3."));
}

static void test_convert_copies_token_files_and_config(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "tok-in"), *out = out_path(fx, "tok-out");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s && printf '{\"x\":1}' > %s/tokenizer_config.json"
				   " && printf 'vocab' > %s/my.token.txt", fx->tiny, in, in, in), 0);
	assert_int_equal(convert(in, out, 16, 2, NULL), 0);
	assert_int_equal(run_quiet(NULL, "cmp %s/tokenizer_config.json %s/tokenizer_config.json && "
			 "cmp %s/my.token.txt %s/my.token.txt && cmp %s/config.json %s/config.json",
			 in, out, in, out, in, out), 0);
	assert_true(file_contains(path_in(out, "SHA256SUMS"), "  tokenizer_config.json\n"));
	assert_true(file_contains(path_in(out, "SHA256SUMS"), "  my.token.txt\n"));
	assert_false(path_exists(path_in(out, "model.safetensors.index.json")));
}

/* ---- refusals ----------------------------------------------------------------------------- */

/* Runs convert, expects exit 2 with `needle` in its message and nothing created at `out`. */
static void assert_refused(const fixture *fx, const char *in, int n_experts, int mp,
			   const char *needle)
{
	const char *out = out_path(fx, "refused");
	const char *msg = path_in(fx->root, "stderr.txt");
	int rc = run_quiet(msg, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts %d "
		     "--model-parallel %d", bin_dir(), in, out, n_experts, mp);
	assert_int_equal(rc, 2);
	assert_file_contains(msg, needle);
	assert_false(path_exists(out));
}

static void test_convert_refuses_expert_count_mismatch(void **state)
{
	fixture *fx = *state;
	assert_refused(fx, fx->tiny, 8, 2, "n_routed_experts 16");
}

static void test_convert_refuses_experts_not_divisible(void **state)
{
	fixture *fx = *state;
	assert_refused(fx, fx->tiny, 16, 3, "16 experts cannot be divided among 3 ranks");
}

/* mp 8 divides the 16 experts and every weight dim of the tiny preset (256, 512, 1024 rows or
 * columns), but not its scale block counts: hidden 256 and 512-wide projections have 2 and 4
 * blocks of 128, so e.g. wo's scale [2, 4] cannot be split 8 ways along its columns. */
static void test_convert_refuses_indivisible_split(void **state)
{
	fixture *fx = *state;
	assert_refused(fx, fx->tiny, 16, 8,
		       "tensor layers.0.attn.wo.scale: scale block count 4 (dim 1) is not divisible by 8");
}

/* Converting into the input directory would replace the input's SHA256SUMS, tensors.sha256.json
 * and config.json: refused as a usage error (another spelling of the path included), the
 * input's files untouched. */
static void test_convert_refuses_output_in_input_dir(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "same-in");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s && cp %s/SHA256SUMS %s.sums", fx->tiny, in, in,
				   in), 0);
	int rc = run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s/. --n-experts 16 "
			   "--model-parallel 2", bin_dir(), in, in);
	assert_int_equal(rc, 1);
	assert_int_equal(run_quiet(NULL, "cmp %s/SHA256SUMS %s.sums && cd %s && sha256sum -c --quiet "
				   "SHA256SUMS && ! ls model0-mp2.safetensors", in, in, in), 0);
}

/* Writes one extra BF16 tensor `name` into DIR/extra.safetensors. */
static void add_tensor_file(const char *dir, const char *name)
{
	st_spec spec = { name, ST_BF16, 1, { 4 } };
	static const uint8_t zeros[8] = { 0 };
	const void *data[1] = { zeros };
	write_safetensors(path_in(dir, "extra.safetensors"), &spec, data, 1);
}

static void test_convert_refuses_unknown_tensor_name(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "unknown-in");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s", fx->tiny, in), 0);
	add_tensor_file(in, "model.layers.0.self_attn.rotary_emb.inv_freq");
	assert_refused(fx, in, 16, 2, "tensor model.layers.0.self_attn.rotary_emb.inv_freq: unknown");
}

/* "embed_tokens.weight" (no "model.") converts to embed.weight, as model.embed_tokens.weight
 * does: convert.py would silently keep one of them. */
static void test_convert_refuses_duplicate_converted_names(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "dup-in");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s", fx->tiny, in), 0);
	add_tensor_file(in, "embed_tokens.weight");
	assert_refused(fx, in, 16, 2, "converts to embed.weight");
}

static void test_convert_refuses_missing_indexed_file(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "missing-in");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s && rm %s/model-00002-of-00003.safetensors",
				   fx->tiny, in, in), 0);
	assert_refused(fx, in, 16, 2, "model-00002-of-00003.safetensors");
}

static void test_convert_refuses_missing_config(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "noconfig-in");
	assert_int_equal(run_quiet(NULL, "cp -r %s %s && rm %s/config.json", fx->tiny, in, in), 0);
	assert_refused(fx, in, 16, 2, "config.json");
}

static void test_convert_usage_errors_exit_1(void **state)
{
	fixture *fx = *state;
	const char *out = out_path(fx, "usage");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s "
				   "--n-experts 16", bin_dir(), fx->tiny, out), 1);
	assert_int_equal(convert(fx->tiny, out, 16, 0, NULL), 1);
	assert_int_equal(convert(fx->tiny, out, -1, 2, NULL), 1);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --bogus", bin_dir()), 1);
	assert_false(path_exists(out));
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --help", bin_dir()), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --version | grep -q '^dsv3-convert '",
				   bin_dir()), 0);
}

/* ---- a killed run ------------------------------------------------------------------------- */

/* A config of about 250 MB (the tiny preset is written too fast to be caught mid-write). */
static const char mid_config[] =
	"{\"architectures\":[\"DeepseekV3ForCausalLM\"],\"model_type\":\"deepseek_v3\","
	"\"vocab_size\":16384,\"hidden_size\":2048,\"intermediate_size\":4096,"
	"\"moe_intermediate_size\":512,\"num_hidden_layers\":3,\"first_k_dense_replace\":1,"
	"\"num_attention_heads\":8,\"num_key_value_heads\":8,\"n_routed_experts\":16,"
	"\"n_shared_experts\":2,\"num_experts_per_tok\":4,\"n_group\":4,\"topk_group\":2,"
	"\"routed_scaling_factor\":2.5,\"scoring_func\":\"sigmoid\",\"topk_method\":\"noaux_tc\","
	"\"norm_topk_prob\":true,\"q_lora_rank\":512,\"kv_lora_rank\":256,\"qk_nope_head_dim\":64,"
	"\"qk_rope_head_dim\":64,\"v_head_dim\":64,\"rope_theta\":10000,"
	"\"max_position_embeddings\":16384,\"rms_norm_eps\":1e-6,"
	"\"rope_scaling\":{\"type\":\"yarn\",\"factor\":40,\"original_max_position_embeddings\":4096,"
	"\"beta_fast\":32,\"beta_slow\":1,\"mscale\":1.0,\"mscale_all_dim\":1.0},"
	"\"num_nextn_predict_layers\":0,\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
	"\"bos_token_id\":0,\"eos_token_id\":1,\"hidden_act\":\"silu\",\"attention_bias\":false,"
	"\"quantization_config\":{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\","
	"\"quant_method\":\"fp8\",\"weight_block_size\":[128,128]}}";

/* Size of the first temporary rank file in dir (.dsv3-tmp.model*), 0 if none. */
static long tmp_model_file_size(const char *dir)
{
	long size = 0;
	DIR *d = opendir(dir);
	if (!d)
		return 0;
	struct dirent *e;
	while ((e = readdir(d)) && !size) {
		struct stat st;
		if (!strncmp(e->d_name, ".dsv3-tmp.model", 15) && stat(path_in(dir, e->d_name), &st) == 0)
			size = (long)st.st_size;
	}
	closedir(d);
	return size;
}

static pid_t start_convert(const char *in, const char *out)
{
	char exe[4096];
	snprintf(exe, sizeof exe, "%s/dsv3-convert", bin_dir());
	pid_t pid = fork();
	if (pid == 0) {
		freopen("/dev/null", "w", stderr);
		execl(exe, exe, "--hf-ckpt-path", in, "--save-path", out, "--n-experts", "16",
		      "--model-parallel", "2", "--threads", "1", (char *)NULL);
		_exit(127);
	}
	return pid;
}

static void test_convert_killed_mid_write_leaves_no_final_file(void **state)
{
	fixture *fx = *state;
	const char *in = out_path(fx, "mid-in"), *out = out_path(fx, "mid-out");
	const char *cfg = path_in(fx->root, "mid.json");
	write_text_file(cfg, mid_config);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-synth --config %s --seed 1 --out %s --files 2",
				   bin_dir(), cfg, in), 0);
	pid_t pid = start_convert(in, out);
	assert_true(pid > 0);
	int caught = 0;
	for (int i = 0; i < 20000 && !caught; i++) { /* up to 20 s */
		caught = tmp_model_file_size(out) > (1 << 20);
		if (!caught)
			usleep(1000);
	}
	kill(pid, SIGKILL);
	int st, finals, temps;
	waitpid(pid, &st, 0);
	assert_true(caught);				       /* it was caught writing a rank file */
	assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL); /* and did not finish */
	count_dir_entries(out, &finals, &temps);
	assert_int_equal(finals, 0);
	/* the next run cleans the leftovers and succeeds */
	assert_int_equal(convert(in, out, 16, 2, NULL), 0);
	assert_converted_dir(out, 2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_convert_name_maps_every_design_row),
		cmocka_unit_test(test_convert_name_rejects_unknown_modules),
		cmocka_unit_test(test_converted_name_info_recovers_split_and_expert),
		cmocka_unit_test(test_convert_mp1_mp2_mp4_succeed),
		cmocka_unit_test(test_convert_mp2_writes_exact_slices),
		cmocka_unit_test(test_convert_rank_files_hold_their_expert_ranges),
		cmocka_unit_test(test_convert_logical_hashes_equal_across_mp),
		cmocka_unit_test(test_convert_keep_mtp_keeps_the_mtp_layer),
		cmocka_unit_test(test_convert_copies_token_files_and_config),
		cmocka_unit_test(test_convert_refuses_expert_count_mismatch),
		cmocka_unit_test(test_convert_refuses_experts_not_divisible),
		cmocka_unit_test(test_convert_refuses_indivisible_split),
		cmocka_unit_test(test_convert_refuses_unknown_tensor_name),
		cmocka_unit_test(test_convert_refuses_duplicate_converted_names),
		cmocka_unit_test(test_convert_refuses_missing_indexed_file),
		cmocka_unit_test(test_convert_refuses_missing_config),
		cmocka_unit_test(test_convert_refuses_output_in_input_dir),
		cmocka_unit_test(test_convert_usage_errors_exit_1),
		cmocka_unit_test(test_convert_killed_mid_write_leaves_no_final_file),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
