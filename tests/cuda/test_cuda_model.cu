/* The CUDA backend against the CPU path (make test-cuda, on a GPU machine): each op on random
 * inputs of awkward shapes against the CPU op, and the whole model on synthetic checkpoints
 * (FP8 and BF16, q_lora and not, sigmoid and softmax routing, converted shards, contexts past
 * 4k) through prefill, decode and batched decode. Both paths compute in fp32 from the same
 * weights, so they agree far inside DESIGN §6's GPU limits: we ask rel-L2 <= 1e-4 and the
 * same greedy tokens. Without a GPU every test is skipped, and says so. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
extern "C" {
#include <cmocka.h>

#include "cuda_model.h"
#include "dtype.h"
#include "model.h"
#include "ops.h"
#include "support/test_support.h"
}
#include "cuda/kernels.cuh"

#define REL_TOL 1e-4  /* fp32 on both sides: the GEMV path of decode and short prompts */
#define BLAS_TOL 1e-3 /* prompts of 64+ tokens: cuBLAS, activations as two bf16 halves */

static int have_gpu(void)
{
	char why[256];
	if (cuda_model_available(why, sizeof why))
		return 1;
	fprintf(stderr, "test_cuda_model: skipped: %s\n", why);
	return 0;
}

#define NEED_GPU()              \
	do {                    \
		if (!have_gpu()) \
			skip();  \
	} while (0)

static double rel_l2(const float *a, const float *b, size_t n)
{
	double d = 0, r = 0;
	for (size_t i = 0; i < n; i++) {
		d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
		r += (double)b[i] * b[i];
	}
	return sqrt(d / (r > 0 ? r : 1));
}

static int argmax(const float *x, int n)
{
	int b = 0;
	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

static void assert_within(const float *got, const float *ref, size_t n, const char *what, int step, double tol)
{
	double e = rel_l2(got, ref, n);
	if (!(e <= tol))
		fail_msg("%s step %d: rel-L2 %.3g > %.0e", what, step, e, tol);
}

static void assert_close(const float *got, const float *ref, size_t n, const char *what, int step)
{
	assert_within(got, ref, n, what, step, REL_TOL);
}

/* The same greedy token, wherever the reference's top two are further apart than twice the
 * largest difference between the two logits vectors (closer than that, either is right). */
static void assert_same_greedy(const float *got, const float *ref, int n, const char *what, int step)
{
	int t = argmax(ref, n);
	float second = -INFINITY, err = 0.0f;
	for (int i = 0; i < n; i++) {
		if (i != t && ref[i] > second)
			second = ref[i];
		err = fmaxf(err, fabsf(got[i] - ref[i]));
	}
	if (ref[t] - second > 2.0f * err && argmax(got, n) != t)
		fail_msg("%s step %d: greedy token %d, the CPU's %d (margin %g, max error %g)", what, step,
			 argmax(got, n), t, ref[t] - second, err);
}

/* ---- one random generator for the inputs ---- */

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static void *to_dev(const void *h, size_t bytes)
{
	void *d;
	CK(cudaMalloc(&d, bytes));
	CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
	return d;
}

/* A random [rows, cols] weight in format dt: host piece for the CPU op and the device copy. */
struct test_weight {
	weight_piece piece;
	weight_view view;
	dweight dev;
	void *host;
	float *hscale;
};

static void make_weight(test_weight *w, int dt, int rows, int cols)
{
	size_t n = (size_t)rows * cols;
	int rb = (rows + 127) / 128, cb = (cols + 127) / 128;
	memset(w, 0, sizeof *w);
	if (dt == DW_F8) {
		uint8_t *h = (uint8_t *)malloc(n);
		for (size_t i = 0; i < n; i++) {
			rng = rng * 6364136223846793005ull + 1442695040888963407ull;
			h[i] = (uint8_t)(rng >> 56);
			if ((h[i] & 0x7f) == 0x7f) /* no NaN codes */
				h[i] ^= 1;
		}
		w->hscale = (float *)malloc(sizeof(float) * rb * cb);
		for (int i = 0; i < rb * cb; i++)
			w->hscale[i] = 0.001f * (1.5f + frand());
		w->host = h;
		w->piece.dtype = ST_F8_E4M3;
		w->piece.scale = w->hscale;
		w->piece.scale_cols = cb;
		w->dev.scale = (const float *)to_dev(w->hscale, sizeof(float) * rb * cb);
		w->dev.scale_cols = cb;
		w->dev.data = to_dev(h, n);
	} else {
		uint16_t *h = (uint16_t *)malloc(n * 2);
		for (size_t i = 0; i < n; i++)
			h[i] = bf16_from_float(frand() * 0.05f);
		w->host = h;
		w->piece.dtype = ST_BF16;
		w->dev.data = to_dev(h, n * 2);
	}
	w->piece.rows = rows, w->piece.cols = cols, w->piece.data = w->host;
	w->view.rows = rows, w->view.cols = cols, w->view.split_dim = -1, w->view.n_pieces = 1;
	w->view.pieces = &w->piece;
	w->dev.dtype = dt, w->dev.rows = rows, w->dev.cols = cols;
}

static void free_weight(test_weight *w)
{
	cudaFree((void *)w->dev.data);
	cudaFree((void *)w->dev.scale);
	free(w->host);
	free(w->hscale);
}

static float *random_vec(size_t n)
{
	float *x = (float *)malloc(sizeof(float) * n);
	for (size_t i = 0; i < n; i++)
		x[i] = frand();
	return x;
}

/* GEMV of n tokens against op_matmul on the CPU, for shapes that are and are not multiples
 * of 128 (and of 16: the kernel's scalar path). Token t's x is scaled by mag[t] when mag is
 * given, and each token is compared on its own, so a small one's errors cannot hide. */
static void check_gemv_mag(int dt, int rows, int cols, int n, int accumulate, const float *mag)
{
	test_weight w;
	make_weight(&w, dt, rows, cols);
	float *x = random_vec((size_t)n * cols), *y0 = random_vec((size_t)n * rows);
	for (int t = 0; mag && t < n; t++)
		for (int i = 0; i < cols; i++)
			x[(size_t)t * cols + i] *= mag[t];
	float *ref = (float *)malloc(sizeof(float) * n * rows), *got = (float *)malloc(sizeof(float) * n * rows);
	thread_pool *pool = thread_pool_create(2);
	op_matmul(pool, ref, &w.view, x, n);
	if (accumulate)
		for (int i = 0; i < n * rows; i++)
			ref[i] += y0[i];
	float *dx = (float *)to_dev(x, sizeof(float) * n * cols), *dy = (float *)to_dev(y0, sizeof(float) * n * rows);
	gemv_call c = {};
	c.w = &w.dev, c.x = dx, c.ldx = cols, c.y = dy, c.ldy = rows, c.n = n, c.accumulate = accumulate;
	k_gemv(0, &c);
	CK(cudaMemcpy(got, dy, sizeof(float) * n * rows, cudaMemcpyDeviceToHost));
	char what[96];
	snprintf(what, sizeof what, "gemv %s %dx%d n=%d token", dt == DW_F8 ? "fp8" : "bf16", rows, cols, n);
	for (int t = 0; t < n; t++)
		assert_close(got + (size_t)t * rows, ref + (size_t)t * rows, rows, what, t);
	thread_pool_destroy(pool);
	cudaFree(dx), cudaFree(dy);
	free(x), free(y0), free(ref), free(got);
	free_weight(&w);
}

static void check_gemv(int dt, int rows, int cols, int n, int accumulate)
{
	check_gemv_mag(dt, rows, cols, n, accumulate, NULL);
}

static void test_gemv_matches_cpu(void **state)
{
	(void)state;
	NEED_GPU();
	static const int shapes[][2] = { { 7168, 512 }, { 300, 200 }, { 129, 1000 }, { 576, 7168 }, { 1, 16 }, { 257, 129 } };
	static const int ns[] = { 1, 3, 8, 16 };
	for (int dt = DW_BF16; dt <= DW_F8; dt++)
		for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
			for (size_t k = 0; k < sizeof ns / sizeof *ns; k++)
				check_gemv(dt, shapes[s][0], shapes[s][1], ns[k], (int)(k & 1));
}

/* Grouped GEMV (the decode MoE): the groups made on the device from top-k lists, each expert's
 * rows against op_matvec of that expert. */
static void test_grouped_experts_match_cpu(void **state)
{
	(void)state;
	NEED_GPU();
	const int E = 12, K = 3, n = 5, rows = 200, cols = 384;
	test_weight ex[E];
	for (int e = 0; e < E; e++)
		make_weight(&ex[e], DW_F8, rows, cols);
	/* the stack of experts, as model.cu uploads it */
	int rb = 2, cb = 3;
	uint8_t *stack = (uint8_t *)malloc((size_t)E * rows * cols);
	float *sst = (float *)malloc(sizeof(float) * E * rb * cb);
	for (int e = 0; e < E; e++) {
		memcpy(stack + (size_t)e * rows * cols, ex[e].host, (size_t)rows * cols);
		memcpy(sst + e * rb * cb, ex[e].hscale, sizeof(float) * rb * cb);
	}
	dweight d = {};
	d.dtype = DW_F8, d.rows = rows, d.cols = cols, d.scale_cols = cb;
	d.data = to_dev(stack, (size_t)E * rows * cols);
	d.scale = (const float *)to_dev(sst, sizeof(float) * E * rb * cb);
	d.estride = (long long)rows * cols, d.sstride = rb * cb;
	int topk[n * K] = { 0, 4, 7, 4, 7, 11, 1, 2, 3, 0, 7, 11, 5, 6, 4 };
	float *x = random_vec((size_t)n * cols);
	int *dtop = (int *)to_dev(topk, sizeof topk);
	int *gbuf;
	CK(cudaMalloc(&gbuf, sizeof(int) * (4 + n * K * (2 + 2 * GEMV_MAX_TOKENS))));
	int *count = gbuf, *exp = gbuf + 4, *cnt = exp + n * K, *tok = cnt + n * K, *pair = tok + n * K * GEMV_MAX_TOKENS;
	k_moe_groups(0, dtop, n, K, count, exp, cnt, tok, pair);
	float *dx = (float *)to_dev(x, sizeof(float) * n * cols), *dy;
	CK(cudaMalloc(&dy, sizeof(float) * n * K * rows));
	gemv_groups gr = { count, exp, cnt, tok, pair, n * K };
	gemv_call c = {};
	c.w = &d, c.x = dx, c.ldx = cols, c.y = dy, c.ldy = rows, c.n = n, c.groups = &gr;
	k_gemv(0, &c);
	float *got = (float *)malloc(sizeof(float) * n * K * rows), *ref = (float *)malloc(sizeof(float) * rows);
	CK(cudaMemcpy(got, dy, sizeof(float) * n * K * rows, cudaMemcpyDeviceToHost));
	int host_count;
	CK(cudaMemcpy(&host_count, count, sizeof(int), cudaMemcpyDeviceToHost));
	assert_int_equal(host_count, 9); /* distinct experts in topk */
	thread_pool *pool = thread_pool_create(2);
	for (int p = 0; p < n * K; p++) {
		op_matvec(pool, ref, &ex[topk[p]].view, x + (size_t)(p / K) * cols);
		assert_close(got + (size_t)p * rows, ref, rows, "grouped expert", p);
	}
	thread_pool_destroy(pool);
	for (int e = 0; e < E; e++)
		free_weight(&ex[e]);
	cudaFree((void *)d.data), cudaFree((void *)d.scale), cudaFree(dtop), cudaFree(gbuf), cudaFree(dx), cudaFree(dy);
	free(stack), free(sst), free(x), free(got), free(ref);
}

/* The tensor-core GEMV (2-16 tokens, rows of whole 16-byte pieces): rows that are not a
 * multiple of 16, K in whole and part steps, the dense MLP's shapes, one and two n-tiles. The
 * BF16 18432x7168 case is left out: its CPU reference alone would take most of a minute. */
static void test_gemv_mma_shapes_match_cpu(void **state)
{
	(void)state;
	NEED_GPU();
	static const int shapes[][2] = { { 7168, 2048 }, { 200, 7168 }, { 18432, 7168 } };
	static const int ns[] = { 2, 8, 16 };
	for (int dt = DW_BF16; dt <= DW_F8; dt++)
		for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
			for (size_t k = 0; k < sizeof ns / sizeof *ns; k++)
				if (dt == DW_F8 || shapes[s][0] < 10000)
					check_gemv(dt, shapes[s][0], shapes[s][1], ns[k], (int)(k & 1));
}

/* f16 holds the FP8 path's x: tokens of 1e5 (past f16's range) and 1e-6 (below its normal
 * numbers) must come out as exact as tokens near 1. */
static void test_gemv_mma_wide_range_x(void **state)
{
	(void)state;
	NEED_GPU();
	static const float mag[] = { 1e5f, 1e-6f, 1.0f, 3e3f, 2e-4f, 1e5f, 1e-6f, 0.5f, 7e4f, 1e-7f };
	for (int dt = DW_BF16; dt <= DW_F8; dt++) {
		check_gemv_mag(dt, 300, 1024, 10, 0, mag);
		check_gemv_mag(dt, 300, 1024, 3, 1, mag);
	}
}

/* Two weights at once (y = W1 u, y2 = W3 u) with the SILU input u = silu(x) * b, y2 at its
 * own row stride: the 1-token kernel and the tensor-core one. */
static void test_gemv_pair_silu_matches_cpu(void **state)
{
	(void)state;
	NEED_GPU();
	const int rows = 200, cols = 2048, ldy2 = rows + 8;
	static const int ns[] = { 1, 5, 16 };
	thread_pool *pool = thread_pool_create(2);
	for (int dt = DW_BF16; dt <= DW_F8; dt++)
		for (size_t k = 0; k < sizeof ns / sizeof *ns; k++) {
			int n = ns[k];
			test_weight w1, w3;
			make_weight(&w1, dt, rows, cols);
			make_weight(&w3, dt, rows, cols);
			float *x = random_vec((size_t)n * cols), *b = random_vec((size_t)n * cols);
			float *u = (float *)malloc(sizeof(float) * n * cols);
			memcpy(u, x, sizeof(float) * n * cols);
			op_silu_mul(u, b, n * cols);
			float *r1 = (float *)malloc(sizeof(float) * n * rows), *r3 = (float *)malloc(sizeof(float) * n * rows);
			op_matmul(pool, r1, &w1.view, u, n);
			op_matmul(pool, r3, &w3.view, u, n);
			float *dx = (float *)to_dev(x, sizeof(float) * n * cols), *db = (float *)to_dev(b, sizeof(float) * n * cols);
			float *dy, *dy2;
			CK(cudaMalloc(&dy, sizeof(float) * n * rows));
			CK(cudaMalloc(&dy2, sizeof(float) * n * ldy2));
			gemv_call c = {};
			c.w = &w1.dev, c.w2 = &w3.dev, c.x = dx, c.silu_b = db, c.ldx = cols;
			c.y = dy, c.y2 = dy2, c.ldy = rows, c.ldy2 = ldy2, c.n = n;
			k_gemv(0, &c);
			float *g1 = (float *)malloc(sizeof(float) * n * rows), *g3 = (float *)malloc(sizeof(float) * n * ldy2);
			CK(cudaMemcpy(g1, dy, sizeof(float) * n * rows, cudaMemcpyDeviceToHost));
			CK(cudaMemcpy(g3, dy2, sizeof(float) * n * ldy2, cudaMemcpyDeviceToHost));
			for (int t = 0; t < n; t++) {
				assert_close(g1 + (size_t)t * rows, r1 + (size_t)t * rows, rows, "gemv pair w1 token", t);
				assert_close(g3 + (size_t)t * ldy2, r3 + (size_t)t * rows, rows, "gemv pair w3 token", t);
			}
			cudaFree(dx), cudaFree(db), cudaFree(dy), cudaFree(dy2);
			free(x), free(b), free(u), free(r1), free(r3), free(g1), free(g3);
			free_weight(&w1), free_weight(&w3);
		}
	thread_pool_destroy(pool);
}

/* Grouped GEMV of 16 tokens (the tensor-core kernel's two n-tiles): expert 0 is in every
 * token's top-k, the others in some; rows not a multiple of 16. */
static void check_grouped_16(int dt)
{
	enum { E = 6, K = 3, n = 16 };
	const int rows = 200, cols = 2048;
	test_weight ex[E];
	for (int e = 0; e < E; e++)
		make_weight(&ex[e], dt, rows, cols);
	const size_t esz = dt == DW_F8 ? 1 : 2, wbytes = (size_t)rows * cols * esz;
	const int rb = (rows + 127) / 128, cb = (cols + 127) / 128;
	uint8_t *stack = (uint8_t *)malloc(E * wbytes);
	float *sst = (float *)malloc(sizeof(float) * E * rb * cb);
	for (int e = 0; e < E; e++) {
		memcpy(stack + e * wbytes, ex[e].host, wbytes);
		if (dt == DW_F8)
			memcpy(sst + e * rb * cb, ex[e].hscale, sizeof(float) * rb * cb);
	}
	dweight d = {};
	d.dtype = dt, d.rows = rows, d.cols = cols;
	d.data = to_dev(stack, E * wbytes);
	d.estride = (long long)rows * cols;
	if (dt == DW_F8) {
		d.scale_cols = cb, d.sstride = rb * cb;
		d.scale = (const float *)to_dev(sst, sizeof(float) * E * rb * cb);
	}
	int topk[n * K];
	for (int t = 0; t < n; t++) {
		topk[t * K] = 0;
		topk[t * K + 1] = 1 + t % 5;
		topk[t * K + 2] = 1 + (t + 2) % 5;
	}
	float *x = random_vec((size_t)n * cols);
	int *dtop = (int *)to_dev(topk, sizeof topk);
	int *gbuf;
	CK(cudaMalloc(&gbuf, sizeof(int) * (4 + n * K * (2 + 2 * GEMV_MAX_TOKENS))));
	int *count = gbuf, *exp = gbuf + 4, *cnt = exp + n * K, *tok = cnt + n * K, *pair = tok + n * K * GEMV_MAX_TOKENS;
	k_moe_groups(0, dtop, n, K, count, exp, cnt, tok, pair);
	float *dx = (float *)to_dev(x, sizeof(float) * n * cols), *dy;
	CK(cudaMalloc(&dy, sizeof(float) * n * K * rows));
	gemv_groups gr = { count, exp, cnt, tok, pair, E };
	gemv_call c = {};
	c.w = &d, c.x = dx, c.ldx = cols, c.y = dy, c.ldy = rows, c.n = n, c.groups = &gr;
	k_gemv(0, &c);
	float *got = (float *)malloc(sizeof(float) * n * K * rows), *ref = (float *)malloc(sizeof(float) * rows);
	CK(cudaMemcpy(got, dy, sizeof(float) * n * K * rows, cudaMemcpyDeviceToHost));
	int host_count;
	CK(cudaMemcpy(&host_count, count, sizeof(int), cudaMemcpyDeviceToHost));
	assert_int_equal(host_count, E);
	thread_pool *pool = thread_pool_create(2);
	for (int p = 0; p < n * K; p++) {
		op_matvec(pool, ref, &ex[topk[p]].view, x + (size_t)(p / K) * cols);
		assert_close(got + (size_t)p * rows, ref, rows, dt == DW_F8 ? "grouped fp8 x16" : "grouped bf16 x16", p);
	}
	thread_pool_destroy(pool);
	for (int e = 0; e < E; e++)
		free_weight(&ex[e]);
	cudaFree((void *)d.data), cudaFree((void *)d.scale), cudaFree(dtop), cudaFree(gbuf), cudaFree(dx), cudaFree(dy);
	free(stack), free(sst), free(x), free(got), free(ref);
}

static void test_grouped_16_tokens_match_cpu(void **state)
{
	(void)state;
	NEED_GPU();
	check_grouped_16(DW_F8);
	check_grouped_16(DW_BF16);
}

/* MLA decode attention of several queries at awkward context lengths (past 4k included)
 * against op_mla_attention: odd widths (the generic kernels), DeepSeek-V3's head widths in FP8
 * and BF16 (the v projection through the grouped GEMV). */
static void check_mla(int dt, int H, int nope, int rope, int v, int lora)
{
	const int D = lora + rope, max_seq = 4700, n = 5, nseq = 5;
	static const int pos[] = { 0, 1, 130, 4100, 4699 };
	test_weight wkv;
	make_weight(&wkv, dt, H * (nope + v), lora);
	float *cache = random_vec((size_t)nseq * max_seq * D);
	float *q = random_vec((size_t)n * H * (nope + rope));
	int seqs[n] = { 0, 1, 2, 3, 4 };
	float *dcache = (float *)to_dev(cache, sizeof(float) * nseq * max_seq * D);
	float *dq = (float *)to_dev(q, sizeof(float) * n * H * (nope + rope));
	int *dseq = (int *)to_dev(seqs, sizeof seqs), *dpos = (int *)to_dev(pos, sizeof pos);
	float *scratch, *dout;
	size_t sf = mla_scratch_floats(H, lora, rope, n, 8192, NULL, NULL, NULL, NULL);
	CK(cudaMalloc(&scratch, sizeof(float) * sf));
	CK(cudaMalloc(&dout, sizeof(float) * n * H * v));
	mla_args a = {};
	a.H = H, a.nope = nope, a.rope = rope, a.v = v, a.lora = lora, a.softmax_scale = 0.17f;
	a.wkv_b = wkv.dev;
	a.vp_tab = mla_vproj_table(H);
	a.cache = mla_cache{ dcache, max_seq };
	a.seqs = dseq, a.pos = dpos, a.n = n, a.ctx_cap = 8192;
	mla_scratch_floats(H, lora, rope, n, 8192, &a.qc, &a.scores, &a.partial, scratch);
	k_mla_attention(0, &a, dq, dout);
	float *got = (float *)malloc(sizeof(float) * n * H * v), *ref = (float *)malloc(sizeof(float) * H * v);
	CK(cudaMemcpy(got, dout, sizeof(float) * n * H * v, cudaMemcpyDeviceToHost));
	cudaFree((void *)a.vp_tab);
	float *cs = (float *)malloc(sizeof(float) * max_seq * lora), *ps = (float *)malloc(sizeof(float) * max_seq * rope);
	float *hs = (float *)malloc(sizeof(float) * H * (2 * lora + max_seq));
	thread_pool *pool = thread_pool_create(2);
	mla_dims dims = { H, nope, rope, v, lora, 0.17f };
	char what[64];
	snprintf(what, sizeof what, "mla attention %s H%d nope%d lora%d", dt == DW_F8 ? "fp8" : "bf16", H, nope, lora);
	for (int t = 0; t < n; t++) {
		for (int p = 0; p <= pos[t]; p++) {
			memcpy(cs + (size_t)p * lora, cache + ((size_t)seqs[t] * max_seq + p) * D, sizeof(float) * lora);
			memcpy(ps + (size_t)p * rope, cache + ((size_t)seqs[t] * max_seq + p) * D + lora, sizeof(float) * rope);
		}
		op_mla_attention(pool, ref, q + (size_t)t * H * (nope + rope), &wkv.view, cs, ps, pos[t] + 1, &dims, hs);
		assert_close(got + (size_t)t * H * v, ref, (size_t)H * v, what, pos[t]);
	}
	thread_pool_destroy(pool);
	free_weight(&wkv);
	cudaFree(dcache), cudaFree(dq), cudaFree(dseq), cudaFree(dpos), cudaFree(scratch), cudaFree(dout);
	free(cache), free(q), free(got), free(ref), free(cs), free(ps), free(hs);
}

static void test_mla_attention_matches_cpu(void **state)
{
	(void)state;
	NEED_GPU();
	check_mla(DW_F8, 5, 24, 8, 20, 72);
	check_mla(DW_F8, 3, 128, 64, 128, 512);
	check_mla(DW_BF16, 3, 128, 64, 128, 512);
	check_mla(DW_BF16, 2, 40, 8, 24, 100);
}

/* ---- the whole model ---- */

struct fixture {
	char *dir;
};

static int setup(void **state)
{
	fixture *f = (fixture *)calloc(1, sizeof *f);
	f->dir = tmp_dir_create("cuda");
	*state = f;
	return f->dir ? 0 : -1;
}

static int teardown(void **state)
{
	fixture *f = (fixture *)*state;
	remove_tree(f->dir);
	free(f->dir);
	free(f);
	return 0;
}

static void open_both(Model *cpu, Model *gpu, const char *dir, int max_seq, int n_seqs)
{
	dsv3_error err = {};
	if (model_open_device(cpu, dir, NULL, max_seq, n_seqs, 0, MODEL_DEVICE_CPU, &err))
		fail_msg("%s", err.msg);
	if (model_open_device(gpu, dir, NULL, max_seq, n_seqs, 0, MODEL_DEVICE_CUDA, &err))
		fail_msg("%s", err.msg);
}

/* Prefill of a prompt of n tokens (crossing chunk boundaries), then greedy decode; every
 * logits vector compared and the greedy tokens equal. */
static void check_prompt_and_decode(const char *dir, int n_prompt, int n_decode, int max_seq)
{
	Model cpu, gpu;
	open_both(&cpu, &gpu, dir, max_seq, 1);
	int V = cpu.config.c.vocab_size;
	int *tokens = (int *)malloc(sizeof(int) * (n_prompt + n_decode + 1));
	for (int i = 0; i < n_prompt; i++)
		tokens[i] = (int)((i * 7919u + 13) % (unsigned)V);
	float *ref = (float *)malloc(sizeof(float) * V);
	memcpy(ref, forward_prompt(&cpu, 0, tokens, n_prompt, 0), sizeof(float) * V);
	float *got = forward_prompt(&gpu, 0, tokens, n_prompt, 0);
	double tol = n_prompt >= 64 ? BLAS_TOL : REL_TOL;
	char what[512];
	snprintf(what, sizeof what, "%s, prompt of %d", dir, n_prompt);
	dir = what;
	assert_within(got, ref, V, dir, 0, tol);
	for (int s = 0; s < n_decode; s++) {
		assert_same_greedy(got, ref, V, dir, s);
		int t = argmax(ref, V); /* the CPU's token on both: teacher forced */
		int pos = n_prompt + s;
		memcpy(ref, forward(&cpu, 0, t, pos), sizeof(float) * V);
		got = forward(&gpu, 0, t, pos);
		assert_within(got, ref, V, dir, s + 1, tol);
	}
	free(tokens);
	free(ref);
	model_close(&cpu);
	model_close(&gpu);
}

/* Sequences of different prompt lengths decoding together (forward_batch, one graph replay a
 * step) against each one alone on the CPU. */
static void check_batch(const char *dir, int n_seqs, int steps)
{
	Model cpu, gpu;
	open_both(&cpu, &gpu, dir, 256, n_seqs);
	int V = cpu.config.c.vocab_size;
	int seqs[16], toks[16], pos[16];
	float *ref = (float *)malloc(sizeof(float) * V * n_seqs);
	for (int i = 0; i < n_seqs; i++) {
		int n = 3 + 5 * i, prompt[64];
		for (int k = 0; k < n; k++)
			prompt[k] = (k * 31 + i * 101 + 1) % V;
		memcpy(ref + (size_t)i * V, forward_prompt(&cpu, i, prompt, n, 0), sizeof(float) * V);
		forward_prompt(&gpu, i, prompt, n, 0);
		seqs[i] = i, pos[i] = n;
	}
	for (int s = 0; s < steps; s++) {
		for (int i = 0; i < n_seqs; i++) {
			toks[i] = argmax(ref + (size_t)i * V, V);
			memcpy(ref + (size_t)i * V, forward(&cpu, i, toks[i], pos[i]), sizeof(float) * V);
		}
		float *got = forward_batch(&gpu, n_seqs, seqs, toks, pos);
		for (int i = 0; i < n_seqs; i++) {
			assert_close(got + (size_t)i * V, ref + (size_t)i * V, V, "batch", s);
			assert_int_equal(argmax(got + (size_t)i * V, V), argmax(ref + (size_t)i * V, V));
			pos[i]++;
		}
	}
	free(ref);
	model_close(&cpu);
	model_close(&gpu);
}

static const char *synth(fixture *f, const char *preset, int seed)
{
	const char *out = fresh_path(f->dir, preset);
	assert_int_equal(run_synth(preset, seed, "", out), 0);
	return out;
}

static void test_tiny_fp8_prompt_decode(void **state)
{
	NEED_GPU();
	const char *d = synth((fixture *)*state, "tiny", 1);
	check_prompt_and_decode(d, 1, 4, 256);
	check_prompt_and_decode(d, 40, 12, 256);
}

static void test_tiny_v2_bf16_prompt_decode(void **state)
{
	NEED_GPU();
	const char *d = synth((fixture *)*state, "tiny-v2", 2);
	check_prompt_and_decode(d, 37, 12, 256);
}

static void test_tiny_fp8_cast_to_bf16(void **state)
{
	NEED_GPU();
	fixture *f = (fixture *)*state;
	const char *d = synth(f, "tiny", 3);
	const char *b = fresh_path(f->dir, "tiny-bf16");
	assert_int_equal(run_quiet(NULL, "%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s --output-bf16-hf-path %s",
				   bin_dir(), d, b), 0);
	check_prompt_and_decode(b, 20, 8, 256);
}

static void test_converted_shards(void **state)
{
	NEED_GPU();
	fixture *f = (fixture *)*state;
	const char *d = synth(f, "tiny", 4);
	for (int mp = 2; mp <= 4; mp *= 2) {
		char name[16];
		snprintf(name, sizeof name, "mp%d", mp);
		const char *out = fresh_path(f->dir, name);
		assert_int_equal(run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts 16 "
					   "--model-parallel %d", bin_dir(), d, out, mp), 0);
		check_prompt_and_decode(out, 19, 6, 256);
	}
}

static void test_batched_decode(void **state)
{
	NEED_GPU();
	const char *d = synth((fixture *)*state, "tiny", 5);
	check_batch(d, 1, 3);
	check_batch(d, 3, 6);
	check_batch(d, 8, 4);
}

/* Long prompts go through cuBLAS in chunks of 512: one chunk and a GEMV tail, two chunks,
 * and a context past 4k. */
static void test_prefill_through_cublas(void **state)
{
	NEED_GPU();
	const char *d = synth((fixture *)*state, "tiny", 6);
	check_prompt_and_decode(d, 64, 3, 1024);
	check_prompt_and_decode(d, 530, 3, 1024);
	check_prompt_and_decode(d, 600, 3, 1024);
	const char *v2 = synth((fixture *)*state, "tiny-v2", 7);
	check_prompt_and_decode(v2, 200, 3, 1024);
}

static void test_context_past_4k(void **state)
{
	NEED_GPU();
	const char *d = synth((fixture *)*state, "tiny", 6);
	check_prompt_and_decode(d, 4200, 3, 8192);
}

int main(void)
{
	if (getenv("TEST_FILTER")) /* e.g. TEST_FILTER=test_prefill* */
		cmocka_set_test_filter(getenv("TEST_FILTER"));
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_gemv_matches_cpu),
		cmocka_unit_test(test_grouped_experts_match_cpu),
		cmocka_unit_test(test_gemv_mma_shapes_match_cpu),
		cmocka_unit_test(test_gemv_mma_wide_range_x),
		cmocka_unit_test(test_gemv_pair_silu_matches_cpu),
		cmocka_unit_test(test_grouped_16_tokens_match_cpu),
		cmocka_unit_test(test_mla_attention_matches_cpu),
		cmocka_unit_test_setup_teardown(test_tiny_fp8_prompt_decode, setup, teardown),
		cmocka_unit_test_setup_teardown(test_tiny_v2_bf16_prompt_decode, setup, teardown),
		cmocka_unit_test_setup_teardown(test_tiny_fp8_cast_to_bf16, setup, teardown),
		cmocka_unit_test_setup_teardown(test_converted_shards, setup, teardown),
		cmocka_unit_test_setup_teardown(test_batched_decode, setup, teardown),
		cmocka_unit_test_setup_teardown(test_prefill_through_cublas, setup, teardown),
		cmocka_unit_test_setup_teardown(test_context_past_4k, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
