/* Tensors no tool has a rule for (issue 7 §5, lib/tensor_rules.h): the rules by name and dtype,
 * then every tool that writes a checkpoint on synthetic checkpoints holding (a) V3.2-Exp's
 * indexer tensors, (b) an F8 weight without its scale (and an F8_E5M2 tensor), (c) scales under
 * names the tools do not know, (d) unknown module names: each tool exits 2, prints every line
 * the rules give for the checkpoint, and leaves no file under a final name (dsv3-plan refuses
 * the same way). Which tensors those lines name is stated here, from the cases themselves; their
 * text comes from the rules. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_ckpt.h"
#include "problems.h"
#include "safetensors.h"
#include "support/test_support.h"
#include "tensor_rules.h"


#define FILE1 "model-00001-of-00001.safetensors"
#define L0 "model.layers.0."
#define IDX L0 "self_attn.indexer."
#define W2 L0 "mlp.down_proj.weight" /* layer 0 of the tiny preset is dense */
#define W3 L0 "mlp.up_proj.weight"
#define N_EXPERTS 16 /* the tiny preset's */

/* ---- the rules by name and dtype ---- */

static const char *why_of(const char *name, st_dtype dtype, int converted, unsigned flags)
{
	static char why[512];
	if (!tensor_rule_by_name(name, dtype, converted, flags, why, sizeof why))
		return NULL;
	return why;
}

/* DeepSeek-V3's own names (DESIGN §3.2, §3.3) all have a rule, in both layouts. */
static void test_rules_know_every_deepseek_v3_name(void **state)
{
	(void)state;
	static const struct {
		const char *name;
		st_dtype dtype;
	} hf[] = {
		{ "model.embed_tokens.weight", ST_BF16 },
		{ "model.norm.weight", ST_BF16 },
		{ "lm_head.weight", ST_BF16 },
		{ L0 "input_layernorm.weight", ST_BF16 },
		{ L0 "self_attn.q_a_proj.weight", ST_F8_E4M3 },
		{ L0 "self_attn.q_a_proj.weight_scale_inv", ST_F32 },
		{ L0 "self_attn.q_a_layernorm.weight", ST_BF16 },
		{ L0 "self_attn.kv_a_proj_with_mqa.weight", ST_F8_E4M3 },
		{ L0 "self_attn.o_proj.weight", ST_F8_E4M3 },
		{ "model.layers.3.mlp.gate.weight", ST_BF16 },
		{ "model.layers.3.mlp.gate.e_score_correction_bias", ST_F32 },
		{ "model.layers.3.mlp.experts.255.down_proj.weight", ST_F8_E4M3 },
		{ "model.layers.3.mlp.shared_experts.up_proj.weight_scale_inv", ST_F32 },
		{ "model.layers.61.eh_proj.weight", ST_BF16 },
		{ "model.layers.61.shared_head.head.weight", ST_BF16 },
	};
	for (size_t i = 0; i < sizeof hf / sizeof hf[0]; i++)
		assert_null(why_of(hf[i].name, hf[i].dtype, 0, 0));
	static const char *const converted[] = {
		"embed.weight", "norm.weight", "head.weight", "layers.0.attn_norm.weight",
		"layers.0.attn.wq_a.scale", "layers.0.attn.kv_norm.weight",
		"layers.3.ffn.gate.bias", "layers.3.ffn.experts.7.w2.weight",
		"layers.61.shared_head.head.weight", "layers.61.enorm.weight",
	};
	for (size_t i = 0; i < sizeof converted / sizeof converted[0]; i++)
		assert_null(why_of(converted[i], strstr(converted[i], ".scale") ? ST_F32 : ST_BF16,
				   1, 0));
	assert_null(why_of("layers.0.ffn.w1.weight", ST_F8_E4M3, 1, 0));
}

/* V3.2-Exp's lightning indexer, named by the variant, in both layouts; dsv3-fp8-to-bf16, which
 * judges by dtype alone, has a rule for its F8 weights and their scales. */
static void test_rules_name_the_v32_indexer(void **state)
{
	(void)state;
	static const char *const names[] = {
		IDX "wq_b.weight", IDX "wq_b.weight_scale_inv", IDX "wk.weight",
		IDX "k_norm.weight", IDX "k_norm.bias", IDX "weights_proj.weight",
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		assert_string_equal(why_of(names[i], ST_BF16, 0, 0), "V3.2-Exp indexer: no rule");
	assert_string_equal(why_of("layers.0.attn.indexer.wk.weight", ST_BF16, 1, 0),
			    "V3.2-Exp indexer: no rule");
	assert_null(why_of(IDX "wk.weight", ST_F8_E4M3, 0, TENSOR_RULES_ANY_MODULE));
	assert_null(why_of(IDX "wk.weight_scale_inv", ST_F32, 0, TENSOR_RULES_ANY_MODULE));
}

#define UNKNOWN_SCALE "a scale under a name the tools do not know (they read "

static void test_rules_refuse_scales_under_unknown_names(void **state)
{
	(void)state;
	const unsigned any = TENSOR_RULES_ANY_MODULE;
	assert_string_equal(why_of(W2 "_scale", ST_F32, 0, 0), UNKNOWN_SCALE W2 "_scale_inv)");
	assert_string_equal(why_of(L0 "mlp.up_proj.scale_inv", ST_F32, 0, any),
			    UNKNOWN_SCALE W3 "_scale_inv)");
	assert_string_equal(why_of(L0 "mlp.up_proj.input_scale", ST_F32, 0, 0),
			    UNKNOWN_SCALE W3 "_scale_inv)");
	assert_string_equal(why_of("layers.0.ffn.w2.weight_scale", ST_F32, 1, 0),
			    UNKNOWN_SCALE "layers.0.ffn.w2.scale)");
	assert_string_equal(why_of(W2 "_scale_inv", ST_BF16, 0, 0),
			    "a scale must be F32, not BF16");
}

static void test_rules_refuse_unknown_names(void **state)
{
	(void)state;
	assert_string_equal(why_of(L0 "self_attn.rotary_emb.inv_freq", ST_F32, 0, 0),
			    "unknown tensor name (no rule for a tensor named inv_freq)");
	assert_string_equal(why_of(L0 "mlp.foo_proj.weight", ST_BF16, 0, 0),
			    "unknown tensor name (its module is not in the mapping of convert.py)");
	assert_string_equal(why_of("layers.0.ffn.foo.weight", ST_BF16, 1, 0),
			    "unknown tensor name (its module is not one dsv3-convert writes)");
	/* by dtype alone, any module is a tensor to copy */
	assert_null(why_of(L0 "mlp.foo_proj.weight", ST_BF16, 0, TENSOR_RULES_ANY_MODULE));
}

/* The only 1-byte tensor with a rule is an F8_E4M3 NAME.weight. */
static void test_rules_refuse_other_one_byte_tensors(void **state)
{
	(void)state;
	static const st_dtype one_byte[] = { ST_F8_E5M2, ST_I8, ST_U8, ST_BOOL };
	static const char *const names[] = { "F8_E5M2", "I8", "U8", "BOOL" };
	for (size_t i = 0; i < 4; i++) {
		char expect[256];
		snprintf(expect, sizeof expect,
			 "1-byte %s tensor: no rule (FP8 weights are F8_E4M3 with an F32 scale)",
			 names[i]);
		assert_string_equal(why_of(W2, one_byte[i], 0, TENSOR_RULES_ANY_MODULE), expect);
	}
	assert_string_equal(why_of(L0 "mlp.gate.e_score_correction_bias", ST_F8_E4M3, 0, 0),
			    "F8_E4M3, but only a NAME.weight tensor has a scale");
	assert_null(why_of(W2, ST_F8_E4M3, 0, 0));
}

/* ---- checkpoints with edits ---- */

typedef struct {
	char root[256];
	char fp8[300];  /* dsv3-synth --preset tiny --files 1 */
	char bf16[300]; /* the same in BF16 */
	char mp2[300];  /* dsv3-convert of fp8 for 2 ranks */
} fixture;

static int setup(void **state)
{
	fixture *fx = calloc(1, sizeof *fx);
	char *root = tmp_dir_create("rules");
	if (!fx || !root)
		return -1;
	snprintf(fx->root, sizeof fx->root, "%s", root);
	free(root);
	snprintf(fx->fp8, sizeof fx->fp8, "%s/fp8", fx->root);
	snprintf(fx->bf16, sizeof fx->bf16, "%s/bf16", fx->root);
	snprintf(fx->mp2, sizeof fx->mp2, "%s/mp2", fx->root);
	if (run_synth("tiny", 3, "--files 1", fx->fp8) ||
	    run_synth("tiny", 3, "--files 1 --dtype bf16", fx->bf16) ||
	    run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts %d "
		      "--model-parallel 2", bin_dir(), fx->fp8, fx->mp2, N_EXPERTS))
		return -1;
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	fixture *fx = *state;
	remove_tree(fx->root);
	free(fx);
	return 0;
}

enum { DROP, RENAME, TO_F8, ADD };

/* One change to a file: drop a tensor, rename it, store it as F8_E4M3 (its first elements'
 * worth of bytes), or add one filled with `fill`. */
typedef struct {
	int op;
	const char *name, *new_name;
	st_dtype dtype;
	int ndim;
	int64_t shape[2];
	uint8_t fill;
} edit;

#define ADD1(n, dt, d0, f) { ADD, n, NULL, dt, 1, { d0, 0 }, f }
#define ADD2(n, dt, d0, d1, f) { ADD, n, NULL, dt, 2, { d0, d1 }, f }

static uint64_t spec_bytes(const st_spec *s)
{
	uint64_t n = dtype_size(s->dtype);
	for (int d = 0; d < s->ndim; d++)
		n *= (uint64_t)s->shape[d];
	return n;
}

/* Applies one edit to tensor t (specs[*n] from it), or 0 when no edit names it. */
static int apply_edit(const edit *e, size_t n_edits, const st_tensor *t, st_spec *spec, int *keep)
{
	*keep = 1;
	for (size_t k = 0; k < n_edits; k++) {
		if (e[k].op == ADD || strcmp(e[k].name, t->name) != 0)
			continue;
		if (e[k].op == DROP)
			*keep = 0;
		else if (e[k].op == RENAME)
			spec->name = e[k].new_name;
		else
			spec->dtype = ST_F8_E4M3;
		return 1;
	}
	return 0;
}

static void edit_file(const char *path, const edit *e, size_t n_edits)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, path, &err), 0);
	st_spec *specs = calloc(f.n_tensors + n_edits, sizeof *specs);
	const void **data = calloc(f.n_tensors + n_edits, sizeof *data);
	void **owned = calloc(n_edits + 1, sizeof *owned);
	assert_non_null(specs);
	assert_non_null(data);
	assert_non_null(owned);
	size_t n = 0, edited = 0;
	for (size_t i = 0; i < f.n_tensors; i++) {
		const st_tensor *t = &f.tensors[i];
		int keep;
		specs[n] = (st_spec){ .name = t->name, .dtype = t->dtype, .ndim = t->ndim };
		memcpy(specs[n].shape, t->shape, sizeof specs[n].shape);
		data[n] = t->data;
		edited += (size_t)apply_edit(e, n_edits, t, &specs[n], &keep);
		n += (size_t)keep;
	}
	for (size_t k = 0; k < n_edits; k++) {
		if (e[k].op != ADD)
			continue;
		specs[n] = (st_spec){ .name = e[k].name, .dtype = e[k].dtype, .ndim = e[k].ndim,
				      .shape = { e[k].shape[0], e[k].shape[1] } };
		owned[k] = malloc(spec_bytes(&specs[n]) + 1);
		assert_non_null(owned[k]);
		memset(owned[k], e[k].fill, spec_bytes(&specs[n]));
		data[n++] = owned[k];
		edited++;
	}
	assert_int_equal(edited, n_edits);
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.new", path);
	write_safetensors(tmp, specs, (const void *const *)data, n);
	st_close(&f);
	assert_int_equal(rename(tmp, path), 0);
	for (size_t k = 0; k < n_edits; k++)
		free(owned[k]);
	free(owned);
	free(specs);
	free(data);
}

/* The index rewritten from the one file's tensors, so that it matches the edited file. */
static void rewrite_index(const char *dir)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, path_in(dir, FILE1), &err), 0);
	json_t *map = json_object(), *root = json_object();
	for (size_t i = 0; i < f.n_tensors; i++)
		json_object_set_new(map, f.tensors[i].name, json_string(FILE1));
	json_object_set_new(root, "metadata", json_object());
	json_object_set_new(root, "weight_map", map);
	assert_int_equal(json_dump_file(root, path_in(dir, "model.safetensors.index.json"),
					JSON_INDENT(2)), 0);
	json_decref(root);
	st_close(&f);
}

/* A copy of an HF checkpoint with edits to its one file. */
static const char *edited_hf(const fixture *fx, const char *base, const char *name,
			     const edit *e, size_t n)
{
	const char *dir = fresh_path(fx->root, name);
	assert_int_equal(run_shell("cp -r %s %s", base, dir), 0);
	edit_file(path_in(dir, FILE1), e, n);
	rewrite_index(dir);
	return dir;
}

/* A copy of the 2-rank conversion with the same edits to both rank files. */
static const char *edited_mp2(const fixture *fx, const char *name, const edit *e, size_t n)
{
	const char *dir = fresh_path(fx->root, name);
	assert_int_equal(run_shell("cp -r %s %s", fx->mp2, dir), 0);
	edit_file(path_in(dir, "model0-mp2.safetensors"), e, n);
	edit_file(path_in(dir, "model1-mp2.safetensors"), e, n);
	return dir;
}

/* ---- what the rules say of a checkpoint ---- */

static void expected_hf(const char *dir, unsigned flags, problem_list *pr)
{
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), 0);
	tensor_rules_check_hf_ckpt(&c, flags, pr);
	hf_ckpt_close(&c);
}

static void expected_mp2(const char *dir, problem_list *pr)
{
	for (int r = 0; r < 2; r++) {
		st_file f;
		dsv3_error err = { 0 };
		char name[64];
		snprintf(name, sizeof name, "model%d-mp2.safetensors", r);
		assert_int_equal(st_open(&f, path_in(dir, name), &err), 0);
		for (size_t i = 0; i < f.n_tensors; i++)
			tensor_rules_check_converted(&f, &f.tensors[i], pr);
		st_close(&f);
	}
}

/* The lines name exactly these tensors, each `per_name` times (once per rank file). */
static void assert_lines_name(const problem_list *pr, const char *const *names, size_t n,
			      size_t per_name)
{
	assert_int_equal(pr->n, n * per_name);
	for (size_t i = 0; i < n; i++) {
		char needle[512];
		snprintf(needle, sizeof needle, ": tensor %s: ", names[i]);
		size_t found = 0;
		for (size_t k = 0; k < pr->n; k++)
			found += strstr(pr->lines[k], needle) != NULL;
		assert_int_equal(found, per_name);
	}
}

/* A tool's run: exit 2, every line of pr in its stderr, nothing under a final name. */
static void assert_refused_with(const fixture *fx, const problem_list *pr, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void assert_refused_with(const fixture *fx, const problem_list *pr, const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof cmd, fmt, ap);
	va_end(ap);
	const char *out = fresh_path(fx->root, "out"), *msg = path_in(fx->root, "stderr.txt");
	assert_int_equal(run_quiet(msg, "%s/%s %s", bin_dir(), cmd, out), 2);
	for (size_t i = 0; i < pr->n; i++)
		assert_file_contains(msg, pr->lines[i]);
	int finals, temps;
	count_dir_entries(out, &finals, &temps);
	assert_int_equal(finals, 0);
	assert_int_equal(temps, 0);
}

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))
#define CONVERT_ARGS "--n-experts 16 --model-parallel 2 --hf-ckpt-path %s --save-path"
#define CONVERT "dsv3-convert " CONVERT_ARGS
#define CONVERT_BF16 "dsv3-convert --dtype bf16 " CONVERT_ARGS
#define TO_FP8 "dsv3-bf16-to-fp8 --input-bf16-hf-path %s --output-fp8-hf-path"
#define TO_BF16 "dsv3-fp8-to-bf16 --input-fp8-hf-path %s --output-bf16-hf-path"
#define SHARD "dsv3-shard --model-parallel 1 --input %s --save-path"

/* The HF case on the FP8 checkpoint through dsv3-convert (both dtypes), dsv3-plan and, when
 * `cast_refuses`, dsv3-fp8-to-bf16; `names` are the tensors the rules must name. */
static void check_fp8_case(const fixture *fx, const char *dir, const char *const *names,
			   size_t n, int cast_refuses)
{
	problem_list pr = { 0 }, own = { 0 }, cast = { 0 };
	expected_hf(dir, 0, &pr);
	assert_lines_name(&pr, names, n, 1);
	assert_refused_with(fx, &pr, CONVERT, dir);
	expected_hf(dir, TENSOR_RULES_OWN_SCALE_CHECK, &own);
	assert_refused_with(fx, &own, CONVERT_BF16, dir);
	expected_hf(dir, TENSOR_RULES_ANY_MODULE | TENSOR_RULES_OWN_SCALE_CHECK, &cast);
	if (cast_refuses)
		assert_refused_with(fx, &cast, TO_BF16, dir);
	const char *msg = path_in(fx->root, "plan.txt");
	assert_int_equal(run_quiet(msg, "%s/dsv3-plan --model-parallel 2 --ckpt-path %s",
				   bin_dir(), dir), 2);
	for (size_t i = 0; i < pr.n; i++)
		assert_file_contains(msg, pr.lines[i]);
	problem_list_free(&pr);
	problem_list_free(&own);
	problem_list_free(&cast);
}

static void check_bf16_case(const fixture *fx, const char *dir, const char *const *names,
			    size_t n)
{
	problem_list pr = { 0 };
	expected_hf(dir, 0, &pr);
	assert_lines_name(&pr, names, n, 1);
	assert_refused_with(fx, &pr, TO_FP8, dir);
	problem_list_free(&pr);
}

static void check_mp2_case(const fixture *fx, const char *dir, const char *const *names,
			   size_t n)
{
	problem_list pr = { 0 };
	expected_mp2(dir, &pr);
	assert_lines_name(&pr, names, n, 2);
	assert_refused_with(fx, &pr, SHARD, dir);
	problem_list_free(&pr);
}

/* ---- (a) V3.2-Exp's lightning indexer ---- */

static void test_tools_refuse_v32_indexer(void **state)
{
	fixture *fx = *state;
	static const edit fp8[] = {
		ADD2(IDX "wq_b.weight", ST_F8_E4M3, 8, 16, 0x38),
		ADD2(IDX "wq_b.weight_scale_inv", ST_F32, 1, 1, 0),
		ADD2(IDX "wk.weight", ST_F8_E4M3, 8, 16, 0x38),
		ADD2(IDX "wk.weight_scale_inv", ST_F32, 1, 1, 0),
		ADD1(IDX "k_norm.weight", ST_F32, 8, 0),
		ADD1(IDX "k_norm.bias", ST_F32, 8, 0),
		ADD2(IDX "weights_proj.weight", ST_BF16, 4, 16, 0),
	};
	static const char *const fp8_names[] = {
		IDX "wq_b.weight", IDX "wq_b.weight_scale_inv", IDX "wk.weight",
		IDX "wk.weight_scale_inv", IDX "k_norm.weight", IDX "k_norm.bias",
		IDX "weights_proj.weight",
	};
	check_fp8_case(fx, edited_hf(fx, fx->fp8, "a-fp8", fp8, N_OF(fp8)), fp8_names,
		       N_OF(fp8_names), 0);

	/* A BF16 V3.2-Exp: wq_b and wk would stay BF16 and weights_proj, by its name, be
	 * quantised, unlike the FP8 release. */
	static const edit bf16[] = {
		ADD2(IDX "wq_b.weight", ST_BF16, 8, 16, 0),
		ADD2(IDX "wk.weight", ST_BF16, 8, 16, 0),
		ADD1(IDX "k_norm.weight", ST_F32, 8, 0),
		ADD1(IDX "k_norm.bias", ST_F32, 8, 0),
		ADD2(IDX "weights_proj.weight", ST_BF16, 4, 16, 0),
	};
	static const char *const bf16_names[] = {
		IDX "wq_b.weight", IDX "wk.weight", IDX "k_norm.weight", IDX "k_norm.bias",
		IDX "weights_proj.weight",
	};
	check_bf16_case(fx, edited_hf(fx, fx->bf16, "a-bf16", bf16, N_OF(bf16)), bf16_names,
			N_OF(bf16_names));

#define CIDX "layers.0.attn.indexer."
	static const edit mp[] = {
		ADD2(CIDX "wk.weight", ST_F8_E4M3, 8, 16, 0x38),
		ADD2(CIDX "wk.scale", ST_F32, 1, 1, 0),
		ADD1(CIDX "k_norm.weight", ST_F32, 8, 0),
		ADD2(CIDX "weights_proj.weight", ST_BF16, 4, 16, 0),
	};
	static const char *const mp_names[] = {
		CIDX "wk.weight", CIDX "wk.scale", CIDX "k_norm.weight", CIDX "weights_proj.weight",
	};
	check_mp2_case(fx, edited_mp2(fx, "a-mp2", mp, N_OF(mp)), mp_names, N_OF(mp_names));
}

/* dsv3-fp8-to-bf16 judges by dtype, as fp8_cast_bf16.py: the indexer's F8 weights are
 * dequantised by their scales, the rest copied. E4M3 0x38 is 1.0 (exponent 7, bias 7); the
 * scale's bytes 0x40404040 are the float 2 * (1 + 0x404040 / 2^23); their product rounded to
 * BF16 (nearest even) keeps the upper half, 0x4040, as the lower half 0x4040 < 0x8000. */
static void test_fp8_to_bf16_casts_v32_indexer(void **state)
{
	fixture *fx = *state;
	static const edit fp8[] = {
		ADD2(IDX "wk.weight", ST_F8_E4M3, 8, 16, 0x38),
		ADD2(IDX "wk.weight_scale_inv", ST_F32, 1, 1, 0x40),
		ADD1(IDX "k_norm.bias", ST_F32, 8, 0x11),
	};
	const char *dir = edited_hf(fx, fx->fp8, "a-cast", fp8, N_OF(fp8));
	st_file f;
	dsv3_error err = { 0 };
	const char *out = fresh_path(fx->root, "cast-out");
	assert_int_equal(run_quiet(NULL, "%s/" TO_BF16 " %s", bin_dir(), dir, out), 0);
	assert_int_equal(st_open(&f, path_in(out, FILE1), &err), 0);
	const st_tensor *wk = st_find(&f, IDX "wk.weight");
	assert_non_null(wk);
	assert_int_equal(wk->dtype, ST_BF16);
	for (int i = 0; i < 8 * 16; i++) {
		uint16_t v;
		memcpy(&v, wk->data + 2 * i, 2);
		assert_int_equal(v, 0x4040);
	}
	assert_null(st_find(&f, IDX "wk.weight_scale_inv"));
	const st_tensor *b = st_find(&f, IDX "k_norm.bias");
	assert_non_null(b);
	assert_int_equal(b->dtype, ST_F32);
	for (int i = 0; i < 8 * 4; i++)
		assert_int_equal(b->data[i], 0x11);
	st_close(&f);
}

/* ---- (b) an F8 weight without its scale, a 1-byte tensor of another type ---- */

static void test_tools_refuse_fp8_weight_without_scale(void **state)
{
	fixture *fx = *state;
	static const edit fp8[] = {
		{ DROP, W2 "_scale_inv", NULL, 0, 0, { 0, 0 }, 0 },
		ADD2(L0 "self_attn.q_proj.weight", ST_F8_E5M2, 2, 2, 0),
	};
	static const char *const fp8_names[] = { W2, L0 "self_attn.q_proj.weight" };
	const char *dir = edited_hf(fx, fx->fp8, "b-fp8", fp8, N_OF(fp8));
	check_fp8_case(fx, dir, fp8_names, N_OF(fp8_names), 1);
	/* dsv3-fp8-to-bf16 already names a weight without its scale, by itself */
	const char *out = fresh_path(fx->root, "b-out"), *msg = path_in(fx->root, "b.txt");
	assert_int_equal(run_quiet(msg, "%s/" TO_BF16 " %s", bin_dir(), dir, out), 2);
	assert_file_contains(msg, "tensor " W2 ": ");
	assert_int_equal(count_final_entries(out), 0);

	static const edit bf16[] = { { TO_F8, W2, NULL, 0, 0, { 0, 0 }, 0 } };
	static const char *const bf16_names[] = { W2 };
	check_bf16_case(fx, edited_hf(fx, fx->bf16, "b-bf16", bf16, N_OF(bf16)), bf16_names,
			N_OF(bf16_names));

	static const edit mp[] = { { DROP, "layers.0.ffn.w2.scale", NULL, 0, 0, { 0, 0 }, 0 } };
	static const char *const mp_names[] = { "layers.0.ffn.w2.weight" };
	check_mp2_case(fx, edited_mp2(fx, "b-mp2", mp, N_OF(mp)), mp_names, N_OF(mp_names));
}

/* A scale left beside a weight that is not FP8 (a weight cast to BF16 with its scale kept:
 * fp8_cast_bf16.py drops it from the file and keeps it in the index): every tool refuses it. */
static void test_tools_refuse_a_scale_whose_weight_is_not_fp8(void **state)
{
	fixture *fx = *state;
	static const edit bf16[] = { ADD2(W2 "_scale_inv", ST_F32, 1, 1, 0) };
	static const char *const names[] = { W2 "_scale_inv" };
	const char *dir = edited_hf(fx, fx->bf16, "s-bf16", bf16, N_OF(bf16));
	check_fp8_case(fx, dir, names, N_OF(names), 1);
	check_bf16_case(fx, dir, names, N_OF(names));
}

/* ---- (c) scales under names the tools do not know ---- */

static void test_tools_refuse_scales_under_unknown_names(void **state)
{
	fixture *fx = *state;
	static const edit fp8[] = {
		{ RENAME, W2 "_scale_inv", W2 "_scale", 0, 0, { 0, 0 }, 0 },
		{ RENAME, W3 "_scale_inv", L0 "mlp.up_proj.scale_inv", 0, 0, { 0, 0 }, 0 },
	};
	static const char *const fp8_names[] = { W2, W2 "_scale", W3, L0 "mlp.up_proj.scale_inv" };
	check_fp8_case(fx, edited_hf(fx, fx->fp8, "c-fp8", fp8, N_OF(fp8)), fp8_names,
		       N_OF(fp8_names), 1);

	static const edit bf16[] = {
		{ TO_F8, W2, NULL, 0, 0, { 0, 0 }, 0 },
		ADD2(W2 "_scale", ST_F32, 1, 1, 0),
		ADD2(L0 "mlp.up_proj.scale_inv", ST_F32, 1, 1, 0),
	};
	static const char *const bf16_names[] = { W2, W2 "_scale", L0 "mlp.up_proj.scale_inv" };
	check_bf16_case(fx, edited_hf(fx, fx->bf16, "c-bf16", bf16, N_OF(bf16)), bf16_names,
			N_OF(bf16_names));

#define CW2 "layers.0.ffn.w2."
#define CW3 "layers.0.ffn.w3."
	static const edit mp[] = {
		{ RENAME, CW2 "scale", CW2 "weight_scale", 0, 0, { 0, 0 }, 0 },
		{ RENAME, CW3 "scale", CW3 "scale_inv", 0, 0, { 0, 0 }, 0 },
	};
	static const char *const mp_names[] = { CW2 "weight", CW2 "weight_scale", CW3 "weight",
						CW3 "scale_inv" };
	check_mp2_case(fx, edited_mp2(fx, "c-mp2", mp, N_OF(mp)), mp_names, N_OF(mp_names));
}

/* ---- (d) unknown module names ---- */

static void test_tools_refuse_unknown_module_names(void **state)
{
	fixture *fx = *state;
	static const edit hf[] = {
		ADD1(L0 "self_attn.rotary_emb.inv_freq", ST_F32, 4, 0),
		ADD2(L0 "mlp.foo_proj.weight", ST_BF16, 2, 2, 0),
	};
	static const char *const names[] = { L0 "self_attn.rotary_emb.inv_freq",
					     L0 "mlp.foo_proj.weight" };
	const char *dir = edited_hf(fx, fx->fp8, "d-fp8", hf, N_OF(hf));
	check_fp8_case(fx, dir, names, N_OF(names), 0);
	/* dsv3-fp8-to-bf16 copies them, as fp8_cast_bf16.py does */
	const char *out = fresh_path(fx->root, "d-out");
	assert_int_equal(run_quiet(NULL, "%s/" TO_BF16 " %s", bin_dir(), dir, out), 0);

	check_bf16_case(fx, edited_hf(fx, fx->bf16, "d-bf16", hf, N_OF(hf)), names, N_OF(names));

	static const edit mp[] = {
		ADD1("layers.0.attn.rotary_emb.inv_freq", ST_F32, 4, 0),
		ADD2("layers.0.ffn.foo.weight", ST_BF16, 2, 2, 0),
	};
	static const char *const mp_names[] = { "layers.0.attn.rotary_emb.inv_freq",
						"layers.0.ffn.foo.weight" };
	check_mp2_case(fx, edited_mp2(fx, "d-mp2", mp, N_OF(mp)), mp_names, N_OF(mp_names));
}

/* The unedited checkpoints pass every rule (their conversions are tested elsewhere). */
static void test_rules_pass_clean_checkpoints(void **state)
{
	fixture *fx = *state;
	problem_list pr = { 0 };
	expected_hf(fx->fp8, 0, &pr);
	expected_hf(fx->bf16, 0, &pr);
	expected_mp2(fx->mp2, &pr);
	for (size_t i = 0; i < pr.n; i++)
		fprintf(stderr, "%s\n", pr.lines[i]);
	assert_int_equal(pr.n, 0);
	problem_list_free(&pr);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rules_know_every_deepseek_v3_name),
		cmocka_unit_test(test_rules_name_the_v32_indexer),
		cmocka_unit_test(test_rules_refuse_scales_under_unknown_names),
		cmocka_unit_test(test_rules_refuse_unknown_names),
		cmocka_unit_test(test_rules_refuse_other_one_byte_tensors),
		cmocka_unit_test(test_rules_pass_clean_checkpoints),
		cmocka_unit_test(test_tools_refuse_v32_indexer),
		cmocka_unit_test(test_fp8_to_bf16_casts_v32_indexer),
		cmocka_unit_test(test_tools_refuse_fp8_weight_without_scale),
		cmocka_unit_test(test_tools_refuse_a_scale_whose_weight_is_not_fp8),
		cmocka_unit_test(test_tools_refuse_scales_under_unknown_names),
		cmocka_unit_test(test_tools_refuse_unknown_module_names),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
