/* The reference engine (ref-engine/): kernels against independent computations written here,
 * absorbed MLA against the naive (expanded k/v) attention, and invariants of the whole model:
 * every checkpoint layout gives the same logits, causality, per-sequence caches. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"
#include "ops.h"
#include "support/test_support.h"

#define N_TOKENS 6
static const int tokens[N_TOKENS] = { 5, 17, 300, 2, 999, 45 };

/* ---- independent decoders ---- */

/* E4M3 fn from its definition: (-1)^s * 2^(e-7) * (1 + m/8), subnormal 2^-6 * m/8. */
static double e4m3_reference(uint8_t v)
{
	int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
	double mag = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m / 8.0, -6);
	return s ? -mag : mag;
}

static uint32_t lcg(uint32_t *s)
{
	*s = *s * 1664525u + 1013904223u;
	return *s >> 8;
}

static float uniform(uint32_t *s) { return (float)(lcg(s) % 20001) / 10000.0f - 1.0f; }

static weight_view one_piece(weight_piece *p, st_dtype t, int rows, int cols, const void *data,
			     const float *scale)
{
	*p = (weight_piece){ t, rows, cols, data, scale, (cols + 127) / 128 };
	return (weight_view){ rows, cols, -1, 1, p };
}

/* ---- kernels ---- */

static void test_rmsnorm_matches_definition(void **state)
{
	(void)state;
	float x[4] = { 1, 2, 3, 4 }, y[4];
	float w32[4] = { 1, 0.5f, 2, -1 };
	weight_piece p;
	weight_view w = one_piece(&p, ST_F32, 1, 4, w32, NULL);
	op_rmsnorm(y, x, &w, 4, 1e-6f);
	double rms = sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
	for (int i = 0; i < 4; i++)
		assert_true(fabs(y[i] - x[i] / rms * w32[i]) < 1e-6);
}

static void test_rope_rotates_adjacent_pairs(void **state)
{
	(void)state;
	float x[4] = { 1, 2, 3, 4 };
	float c[2] = { 0, -1 }, s[2] = { 1, 0 }; /* 90 and 180 degrees */
	op_rope(x, 4, c, s);
	assert_true(x[0] == -2 && x[1] == 1);
	assert_true(x[2] == -3 && x[3] == -4);
}

/* FP8 matvec over 2x2 scale blocks (a partial last block) against dequantise-then-multiply. */
static void test_fp8_matvec_equals_dequantised_product(void **state)
{
	(void)state;
	enum { R = 200, C = 300 };
	uint8_t *w = malloc(R * C);
	float scale[2 * 3], x[C], y[R];
	uint32_t seed = 7;
	for (int i = 0; i < R * C; i++) {
		w[i] = (uint8_t)lcg(&seed);
		if ((w[i] & 0x7F) == 0x7F)
			w[i] = 0x3C; /* no NaN codes */
	}
	for (int i = 0; i < 6; i++)
		scale[i] = 0.001f * (float)(i + 1);
	for (int i = 0; i < C; i++)
		x[i] = uniform(&seed);
	weight_piece p;
	weight_view v = one_piece(&p, ST_F8_E4M3, R, C, w, scale);
	op_matvec(NULL, y, &v, x);
	for (int r = 0; r < R; r++) {
		double ref = 0, mag = 0;
		for (int c = 0; c < C; c++) {
			double t = e4m3_reference(w[r * C + c]) * scale[(r / 128) * 3 + c / 128] * x[c];
			ref += t;
			mag += fabs(t);
		}
		assert_true(fabs(y[r] - ref) <= 1e-6 * mag + 1e-12);
	}
	free(w);
}

static void test_bf16_matvec_and_row_lookup(void **state)
{
	(void)state;
	/* bf16 0x3F80 = 1, 0x4000 = 2, 0xBF80 = -1, 0x3F00 = 0.5 */
	uint16_t w[2 * 3] = { 0x3F80, 0x4000, 0xBF80, 0x3F00, 0x3F80, 0x4000 };
	float x[3] = { 1, 2, 3 }, y[2], row[3];
	weight_piece p;
	weight_view v = one_piece(&p, ST_BF16, 2, 3, w, NULL);
	op_matvec(NULL, y, &v, x);
	assert_true(y[0] == 1 + 4 - 3 && y[1] == 0.5f + 2 + 6);
	op_weight_row(row, &v, 1);
	assert_true(row[0] == 0.5f && row[1] == 1 && row[2] == 2);
}

/* ---- absorbed attention against the naive one ---- */

static void test_absorbed_mla_equals_naive_attention(void **state)
{
	(void)state;
	enum { H = 3, NOPE = 8, ROPE = 4, V = 6, LORA = 10, T = 5 };
	float wkv_b[H * (NOPE + V) * LORA], q[H * (NOPE + ROPE)], c[T * LORA], pe[T * ROPE];
	float out[H * V], scratch[H * (2 * LORA + T)];
	uint32_t seed = 3;
	for (size_t i = 0; i < sizeof wkv_b / 4; i++)
		wkv_b[i] = uniform(&seed);
	for (size_t i = 0; i < sizeof q / 4; i++)
		q[i] = uniform(&seed);
	for (size_t i = 0; i < sizeof c / 4; i++)
		c[i] = uniform(&seed);
	for (size_t i = 0; i < sizeof pe / 4; i++)
		pe[i] = uniform(&seed);
	weight_piece p;
	weight_view w = one_piece(&p, ST_F32, H * (NOPE + V), LORA, wkv_b, NULL);
	mla_dims d = { H, NOPE, ROPE, V, LORA, 0.3f };
	op_mla_attention(NULL, out, q, &w, c, pe, T, &d, scratch);

	for (int h = 0; h < H; h++) {
		double k[T][NOPE], v[T][V], sc[T], max = -1e30, sum = 0;
		const float *wk = wkv_b + (size_t)h * (NOPE + V) * LORA, *wv = wk + NOPE * LORA;
		for (int t = 0; t < T; t++) {
			for (int i = 0; i < NOPE; i++) {
				k[t][i] = 0;
				for (int l = 0; l < LORA; l++)
					k[t][i] += (double)c[t * LORA + l] * wk[i * LORA + l];
			}
			for (int i = 0; i < V; i++) {
				v[t][i] = 0;
				for (int l = 0; l < LORA; l++)
					v[t][i] += (double)c[t * LORA + l] * wv[i * LORA + l];
			}
			sc[t] = 0;
			for (int i = 0; i < NOPE; i++)
				sc[t] += q[h * (NOPE + ROPE) + i] * k[t][i];
			for (int i = 0; i < ROPE; i++)
				sc[t] += (double)q[h * (NOPE + ROPE) + NOPE + i] * pe[t * ROPE + i];
			sc[t] *= 0.3;
			max = fmax(max, sc[t]);
		}
		for (int t = 0; t < T; t++)
			sum += (sc[t] = exp(sc[t] - max));
		for (int i = 0; i < V; i++) {
			double o = 0;
			for (int t = 0; t < T; t++)
				o += sc[t] / sum * v[t][i];
			assert_true(fabs(out[h * V + i] - o) < 1e-5);
		}
	}
}

/* ---- the whole model ---- */

typedef struct {
	char *dir;
	char *tiny, *v2;
} fixture;

static int setup(void **state)
{
	fixture *f = calloc(1, sizeof *f);
	f->dir = tmp_dir_create("engine");
	f->tiny = strdup(path_in(f->dir, "tiny"));
	f->v2 = strdup(path_in(f->dir, "tiny-v2"));
	if (run_synth("tiny", 1, "", f->tiny) || run_synth("tiny-v2", 2, "", f->v2))
		return -1;
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	fixture *f = *state;
	remove_tree(f->dir);
	free(f->dir);
	free(f->tiny);
	free(f->v2);
	free(f);
	return 0;
}

/* Logits [N_TOKENS, vocab] of the token list from the checkpoint in dir (malloc'd). */
static float *run_tokens(const char *dir, int max_seq_len, int *vocab)
{
	Model m;
	dsv3_error err = { 0 };
	if (model_open(&m, dir, max_seq_len, 1, 2, &err))
		fail_msg("%s", err.msg);
	int V = m.config.c.vocab_size;
	float *all = malloc(sizeof(float) * V * N_TOKENS);
	for (int p = 0; p < N_TOKENS; p++)
		memcpy(all + (size_t)p * V, forward(&m, 0, tokens[p], p), sizeof(float) * V);
	model_close(&m);
	*vocab = V;
	return all;
}

static const char *convert(const char *in, const char *root, int mp, int experts)
{
	char name[32];
	snprintf(name, sizeof name, "mp%d-%d", mp, experts);
	const char *out = fresh_path(root, name);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s "
				   "--n-experts %d --model-parallel %d", bin_dir(), in, out, experts, mp), 0);
	return out;
}

static void assert_layouts_bit_identical(const char *hf, const char *root, int experts)
{
	int V, V2;
	float *ref = run_tokens(hf, 256, &V);
	for (int mp = 1; mp <= 4; mp *= 2) {
		float *got = run_tokens(convert(hf, root, mp, experts), 256, &V2);
		assert_int_equal(V, V2);
		if (memcmp(ref, got, sizeof(float) * V * N_TOKENS))
			fail_msg("mp%d logits differ from the HF directory's", mp);
		free(got);
	}
	free(ref);
}

static void test_fp8_hf_and_converted_shards_give_identical_logits(void **state)
{
	fixture *f = *state;
	assert_layouts_bit_identical(f->tiny, f->dir, 16);
}

static void test_bf16_v2_hf_and_converted_shards_give_identical_logits(void **state)
{
	fixture *f = *state;
	Model m;
	dsv3_error err = { 0 };
	assert_int_equal(model_open(&m, f->v2, 64, 1, 1, &err), 0);
	int E = m.config.c.n_routed_experts;
	model_close(&m);
	assert_layouts_bit_identical(f->v2, f->dir, E);
}

static double rel_l2(const float *a, const float *b, size_t n)
{
	double d = 0, r = 0;
	for (size_t i = 0; i < n; i++) {
		d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
		r += (double)b[i] * b[i];
	}
	return sqrt(d / r);
}

/* BF16 rounding of the dequantised weights moves the logits a little, never a lot. */
static void test_fp8_and_its_bf16_cast_are_close_not_identical(void **state)
{
	fixture *f = *state;
	const char *bf = fresh_path(f->dir, "bf16");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s "
				   "--output-bf16-hf-path %s", bin_dir(), f->tiny, bf), 0);
	int V;
	float *a = run_tokens(f->tiny, 256, &V), *b = run_tokens(bf, 256, &V);
	double e = rel_l2(b, a, (size_t)V * N_TOKENS);
	assert_true(e > 0 && e < 1e-2);
	free(a);
	free(b);
}

/* Two sequences in one state: the logits at position t depend on tokens[0..t] only, one
 * sequence's cache never leaks into the other's, and a sequence can be restarted. */
static void test_causal_and_sequences_independent(void **state)
{
	fixture *f = *state;
	Model m;
	dsv3_error err = { 0 };
	assert_int_equal(model_open(&m, f->tiny, 256, 2, 2, &err), 0);
	int V = m.config.c.vocab_size;
	float *a = malloc(sizeof(float) * V * N_TOKENS);
	for (int p = 0; p < N_TOKENS; p++) {
		memcpy(a + (size_t)p * V, forward(&m, 0, tokens[p], p), sizeof(float) * V);
		/* sequence 1: the same prefix up to 2, then other tokens */
		float *b = forward(&m, 1, p < 3 ? tokens[p] : 11 * p, p);
		if (p < 3)
			assert_memory_equal(a + (size_t)p * V, b, sizeof(float) * V);
		else
			assert_memory_not_equal(a + (size_t)p * V, b, sizeof(float) * V);
	}
	/* Prompt positions fed without the head leave the same state behind. */
	for (int p = 0; p < N_TOKENS - 1; p++)
		forward_no_logits(&m, 1, tokens[p], p);
	assert_memory_equal(a + (size_t)(N_TOKENS - 1) * V,
			    forward(&m, 1, tokens[N_TOKENS - 1], N_TOKENS - 1), sizeof(float) * V);
	model_close(&m);
	int V2;
	float *alone = run_tokens(f->tiny, 256, &V2);
	assert_memory_equal(a, alone, sizeof(float) * V * N_TOKENS);
	free(a);
	free(alone);
}

/* A prompt fed in chunks (41 tokens: a full chunk and a partial one) leaves the logits and the
 * cache of token-by-token decoding, bit for bit; decoding then goes on alike. */
static void assert_prompt_chunks_equal_decode(const char *dir)
{
	enum { P = 41 };
	int prompt[P];
	for (int i = 0; i < P; i++)
		prompt[i] = (i * 37 + 11) % 1000;
	Model m;
	dsv3_error err = { 0 };
	if (model_open(&m, dir, 16384, 2, 2, &err))
		fail_msg("%s", err.msg);
	int V = m.config.c.vocab_size;
	float *one = malloc(sizeof(float) * V);
	for (int p = 0; p < P; p++)
		memcpy(one, forward(&m, 0, prompt[p], p), sizeof(float) * V);
	assert_memory_equal(forward_prompt(&m, 1, prompt, P, 0), one, sizeof(float) * V);
	memcpy(one, forward(&m, 0, 7, P), sizeof(float) * V);
	assert_memory_equal(forward(&m, 1, 7, P), one, sizeof(float) * V);
	free(one);
	model_close(&m);
}

static void test_prompt_in_chunks_equals_token_by_token(void **state)
{
	fixture *f = *state;
	assert_prompt_chunks_equal_decode(f->tiny);
	assert_prompt_chunks_equal_decode(f->v2);
}

/* YaRN applies only beyond original_seq_len (4096 in tiny): the logits change with it. */
static void test_max_seq_len_beyond_original_changes_logits(void **state)
{
	fixture *f = *state;
	int V;
	float *a = run_tokens(f->tiny, 4096, &V), *b = run_tokens(f->tiny, 4097, &V);
	assert_memory_not_equal(a, b, sizeof(float) * V * N_TOKENS);
	free(a);
	free(b);
}

/* The engine against tests/engine_reference.py (double precision, naive attention, written
 * from DESIGN §4 without the engine's code): rel-L2 within the CPU limit, same argmax. */
static void assert_matches_python_reference(const char *dir, const char *root, int max_seq_len)
{
	if (run_quiet(NULL, "python3 -c 'import json, struct'") != 0)
		skip();
	const char *out = fresh_path(root, "reference.f32");
	assert_int_equal(run_noting_failure("python3 tests/engine_reference.py %s 5,17,300,2,999,45 %d %s",
					    dir, max_seq_len, out), 0);
	size_t len;
	float *ref = (float *)assert_read_file(out, &len);
	int V;
	float *got = run_tokens(dir, max_seq_len, &V);
	assert_int_equal(len, sizeof(float) * V * N_TOKENS);
	for (int p = 0; p < N_TOKENS; p++) {
		const float *r = ref + (size_t)p * V, *g = got + (size_t)p * V;
		int br = 0, bg = 0;
		for (int i = 1; i < V; i++) {
			br = r[i] > r[br] ? i : br;
			bg = g[i] > g[bg] ? i : bg;
		}
		double e = rel_l2(g, r, (size_t)V);
		if (e > 1e-5 || br != bg)
			fail_msg("%s position %d: rel-L2 %.3e, argmax %d vs reference %d", dir, p, e, bg, br);
	}
	free(ref);
	free(got);
}

static void test_v3_fp8_matches_python_reference_with_yarn(void **state)
{
	fixture *f = *state;
	assert_matches_python_reference(f->tiny, f->dir, 16384);
}

static void test_v2_bf16_matches_python_reference_without_yarn(void **state)
{
	fixture *f = *state;
	assert_matches_python_reference(f->v2, f->dir, 1024);
}

/* A golden file (the dsv3-verify logits format) from the Python reference's logits: tokens
 * 0..5, prompt_len 2, rows = reference positions 1..4; `bump` raises one logit of row 1 so the
 * argmax changes. */
static const char *write_golden(const char *root, const float *ref, int V, int bump)
{
	enum { P = 2, S = N_TOKENS - 2 };
	int64_t tok[N_TOKENS];
	float *rows = malloc(sizeof(float) * V * S);
	for (int i = 0; i < N_TOKENS; i++)
		tok[i] = tokens[i];
	memcpy(rows, ref + (size_t)(P - 1) * V, sizeof(float) * V * S);
	if (bump)
		rows[V + 7] += 1000.0f;
	st_spec specs[2] = { { "c.tokens", ST_I64, 1, { N_TOKENS } },
			     { "c.logits", ST_F32, 2, { S, V } } };
	const char *meta[] = { "c.prompt_len", "2", "max_seq_len", "16384", NULL };
	const char *path = fresh_path(root, bump ? "golden-bad.safetensors" : "golden.safetensors");
	st_writer *w;
	dsv3_error err = { 0 };
	assert_int_equal(st_writer_open(&w, path, specs, 2, meta, &err), 0);
	for (size_t pos = 0; pos < 2; pos++) {
		size_t i = st_writer_order(w, pos);
		if (i == 0)
			assert_int_equal(st_writer_write(w, tok, sizeof tok, &err), 0);
		else
			assert_int_equal(st_writer_write(w, rows, sizeof(float) * V * S, &err), 0);
	}
	assert_int_equal(st_writer_finish(w, NULL, &err), 0);
	free(rows);
	return path;
}

/* Group-limited routing without a bias ranks groups by their max (DESIGN §4): tiny-v2 with its
 * 16 experts in 4 groups, 2 kept, against the Python reference. */
static void test_v2_group_limited_routing_matches_python_reference(void **state)
{
	fixture *f = *state;
	const char *cfg = fresh_path(f->dir, "v2-groups.json");
	const char *dir = fresh_path(f->dir, "v2-groups");
	assert_int_equal(run_noting_failure("sed 's/\"n_group\": 1,/\"n_group\": 4,/; "
					    "s/\"topk_group\": 1,/\"topk_group\": 2,/; "
					    "s/\"greedy\"/\"group_limited_greedy\"/' %s/config.json > %s",
					    f->v2, cfg), 0);
	assert_true(file_contains(cfg, "\"n_group\": 4,"));
	assert_int_equal(run_noting_failure("%s/dsv3-synth --config %s --seed 5 --out %s > /dev/null",
					    bin_dir(), cfg, dir), 0);
	Model m;
	dsv3_error err = { 0 };
	assert_int_equal(model_open(&m, dir, 64, 1, 1, &err), 0);
	assert_int_equal(m.config.c.n_expert_groups, 4);
	assert_int_equal(m.weights.has_gate_bias, 0);
	model_close(&m);
	assert_matches_python_reference(dir, f->dir, 16384);
}

static void test_verify_logits_passes_reference_golden_and_fails_a_changed_one(void **state)
{
	fixture *f = *state;
	if (run_quiet(NULL, "python3 -c 'import json, struct'") != 0)
		skip();
	const char *out = fresh_path(f->dir, "reference.f32");
	assert_int_equal(run_noting_failure("python3 tests/engine_reference.py %s 5,17,300,2,999,45 16384 %s",
					    f->tiny, out), 0);
	size_t len;
	float *ref = (float *)assert_read_file(out, &len);
	int V = (int)(len / sizeof(float) / N_TOKENS);
	const char *good = write_golden(f->dir, ref, V, 0), *bad = write_golden(f->dir, ref, V, 1);
	const char *mp2 = convert(f->tiny, f->dir, 2, 16);
	const char *log = path_in(f->dir, "verify.log");
	assert_int_equal(run_noting_failure("%s/dsv3-verify logits --ckpt-path %s --golden %s > %s",
					    bin_dir(), f->tiny, good, log), 0);
	assert_file_contains(log, "OK   c: rows 4");
	assert_int_equal(run_noting_failure("%s/dsv3-verify logits --ckpt-path %s --golden %s --threads 1 > /dev/null",
					    bin_dir(), mp2, good), 0);
	assert_int_equal(run_shell("%s/dsv3-verify logits --ckpt-path %s --golden %s > %s 2>/dev/null",
				   bin_dir(), f->tiny, bad, log), DSV3_EDATA);
	assert_file_contains(log, "FAIL c:");
	assert_file_contains(log, "top1 3/4");
	free(ref);
}

static void test_missing_rank_file_is_named(void **state)
{
	fixture *f = *state;
	const char *mp2 = convert(f->tiny, f->dir, 2, 16);
	char path[4096];
	snprintf(path, sizeof path, "%s/model1-mp2.safetensors", mp2);
	assert_int_equal(unlink(path), 0);
	Model m;
	dsv3_error err = { 0 };
	assert_int_equal(model_open(&m, mp2, 64, 1, 1, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "model1-mp2.safetensors"));
}

/* The official demo's flow: converted shards with the demo's config format given apart (its
 * keys, model.py's defaults); the logits are those of the HF directory, bit for bit. */
static void test_demo_config_with_converted_shards(void **state)
{
	fixture *f = *state;
	const char *mp2 = convert(f->tiny, f->dir, 2, 16);
	const char *cfg = fresh_path(f->dir, "config_tiny.json");
	write_text_file(cfg, "{\"vocab_size\": 1024, \"dim\": 256, \"inter_dim\": 512, "
			     "\"moe_inter_dim\": 256, \"n_layers\": 3, \"n_dense_layers\": 1, "
			     "\"n_heads\": 8, \"n_routed_experts\": 16, \"n_shared_experts\": 2, "
			     "\"n_activated_experts\": 4, \"n_expert_groups\": 4, "
			     "\"n_limited_groups\": 2, \"route_scale\": 2.5, \"score_func\": \"sigmoid\", "
			     "\"q_lora_rank\": 192, \"kv_lora_rank\": 128, \"qk_nope_head_dim\": 64, "
			     "\"qk_rope_head_dim\": 64, \"v_head_dim\": 64, \"dtype\": \"fp8\"}\n");
	int V;
	float *ref = run_tokens(f->tiny, 16384, &V);
	Model m;
	dsv3_error err = { 0 };
	if (model_open_config(&m, mp2, cfg, 16384, 1, 2, &err))
		fail_msg("%s", err.msg);
	for (int p = 0; p < N_TOKENS; p++)
		assert_memory_equal(forward(&m, 0, tokens[p], p), ref + (size_t)p * V, sizeof(float) * V);
	model_close(&m);
	free(ref);
}

static void test_verify_logits_usage(void **state)
{
	(void)state;
	assert_int_equal(run_quiet(NULL, "%s/dsv3-verify logits --help", bin_dir()), 0);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-verify logits --golden x", bin_dir()), DSV3_EUSAGE);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-verify logits --ckpt-path x --golden y --device cuda",
				   bin_dir()), DSV3_EUSAGE);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-verify logits --ckpt-path x --golden y extra",
				   bin_dir()), DSV3_EUSAGE);
	assert_int_equal(run_quiet(NULL, "%s/dsv3-verify logits --ckpt-path /nonexistent --golden /nonexistent",
				   bin_dir()), DSV3_EIO);
}

/* A config that does not fit the weights: the first tensor that disagrees is named, with both
 * shapes. */
static void test_misshapen_tensor_is_named(void **state)
{
	fixture *f = *state;
	const char *bad = fresh_path(f->dir, "bad-shape");
	assert_int_equal(run_shell("cp -r %s %s && sed -i 's/\"q_lora_rank\": 192/\"q_lora_rank\": 128/' %s/config.json",
				   f->tiny, bad, bad), 0);
	Model m;
	dsv3_error err = { 0 };
	assert_int_equal(model_open(&m, bad, 64, 1, 1, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "layers.0.attn.wq_a.weight (model.layers.0.self_attn.q_a_proj.weight)"));
	assert_non_null(strstr(err.msg, "[128, 256] expected from the config, found [192, 256]"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rmsnorm_matches_definition),
		cmocka_unit_test(test_rope_rotates_adjacent_pairs),
		cmocka_unit_test(test_fp8_matvec_equals_dequantised_product),
		cmocka_unit_test(test_bf16_matvec_and_row_lookup),
		cmocka_unit_test(test_absorbed_mla_equals_naive_attention),
		cmocka_unit_test(test_fp8_hf_and_converted_shards_give_identical_logits),
		cmocka_unit_test(test_bf16_v2_hf_and_converted_shards_give_identical_logits),
		cmocka_unit_test(test_fp8_and_its_bf16_cast_are_close_not_identical),
		cmocka_unit_test(test_causal_and_sequences_independent),
		cmocka_unit_test(test_max_seq_len_beyond_original_changes_logits),
		cmocka_unit_test(test_prompt_in_chunks_equals_token_by_token),
		cmocka_unit_test(test_v3_fp8_matches_python_reference_with_yarn),
		cmocka_unit_test(test_v2_bf16_matches_python_reference_without_yarn),
		cmocka_unit_test(test_v2_group_limited_routing_matches_python_reference),
		cmocka_unit_test(test_verify_logits_passes_reference_golden_and_fails_a_changed_one),
		cmocka_unit_test(test_demo_config_with_converted_shards),
		cmocka_unit_test(test_verify_logits_usage),
		cmocka_unit_test(test_missing_rank_file_is_named),
		cmocka_unit_test(test_misshapen_tensor_is_named),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
