/* DeepSeek-V3 on one GPU (DESIGN §5): the weights uploaded once in their stored format, the
 * compressed KV cache on the device, and the forward pass of model.c strung from kernels.cu.
 * run_tokens() is the whole pass over up to GEMV_MAX_TOKENS tokens, each of its own sequence
 * and position; a decode step is that pass captured once per (batch, context bucket) in a CUDA
 * graph and replayed, with the inputs and logits copied inside the graph: no allocation, no
 * host sync and no host round trip inside the step. Prefill runs the same pass over chunks of
 * one sequence's prompt, with cuBLAS for the matrices when a chunk is long.
 *
 * Tensor parallelism (DESIGN §5, issue 8): rank r of `world` holds its slices of the weights
 * (Config's n_local_heads, vocab_lo/vocab_n, experts [e_lo, e_lo + e_n)) and sums its partial
 * results with the other ranks' through NCCL on the engine's stream, at model.c's points: the
 * embedding, after wo, after the dense MLP, once after each MoE (routed + shared), and an
 * all-gather of the head's logits. The blocks then write their outputs to `part` instead of
 * adding them to the residual x: part is summed over the ranks and added to x. One rank
 * (world 1) makes no NCCL call and runs exactly the code of one GPU. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "cuda_model.h"
#include "dtype.h"
}
#include "kernels.cuh"
#include "tp.cuh"

/* DSV3_CUDA_PROFILE=1: decode steps run without the graph, CUDA events between these stages,
 * and the mean time of each per step is printed when the model is closed. */
enum { ST_OTHER, ST_ATT_PROJ, ST_ATT_CORE, ST_ATT_WO, ST_DENSE, ST_ROUTE, ST_EXPERTS, ST_SHARED, ST_HEAD,
       ST_COPY, N_STAGES };
static const char *const stage_names[N_STAGES] = {
	"embed, norms", "attn projections (wq_a/wkv_a/wq_b)", "attn core (rope, cache, MLA)", "attn wo",
	"dense MLP", "gate + routing", "routed experts", "shared expert + combine", "head", "copies in/out",
};
#define MAX_MARKS 512
/* Prompts of at least PREFILL_BLAS_MIN tokens go through cuBLAS in chunks of PREFILL_BLAS
 * (linear_blas: bf16 halves, fp32-grade) with the experts through the grouped GEMV; shorter
 * ones, and decode, through the GEMV kernels alone. */
#define PREFILL_BLAS 512
#define PREFILL_BLAS_MIN 64

struct dlayer {
	dweight wq, wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo, attn_norm, ffn_norm;
	dweight w1, w2, w3, gate, gate_bias;
	dweight ew1, ew2, ew3; /* routed experts, stacked */
	int has_bias;
};

struct graph_entry {
	int n, cap;
	cudaGraphExec_t exec;
};

struct cuda_model {
	Config cf;
	int n_seqs, max_tokens, dim, vocab, hidden, K;
	int in_cap;       /* tokens one pass takes: max(max_tokens, PREFILL_BLAS) */
	int blas_min;     /* PREFILL_BLAS_MIN, or DSV3_CUDA_BLAS_MIN */
	int prefilling;   /* in cuda_forward_prompt: every token of the pass is of one sequence */
	int prefill_seq, chunk_pos0; /* that sequence, the position of the chunk's first token */
	int bf16_act;     /* DSV3_CUDA_BF16_ACT=1: prefill activations rounded to bf16 once */
	int debug_parts;  /* DSV3_CUDA_GEMV_PARTS: 1 linears, 2 MoE through the GEMV path in slices,
			   * 4 a prefill chunk's attention through the decode kernels */
	float *split_out; /* [2 * in_cap, widest output] of a split GEMM */
	size_t widest_out;
	dweight embed, norm, head;
	dlayer *layers;
	void **allocs;
	int n_allocs, cap_allocs;
	size_t bytes_allocated; /* sum of the cudaMalloc sizes asked for (DSV3_CUDA_MEM=1 prints it) */
	cudaStream_t stream;
	cublasHandle_t blas;
	/* state */
	float *cache; /* [layer][seq][max_seq_len][lora + rope] */
	float *inv_freq;
	int *vp_tab;      /* mla_vproj_table */
	float *x, *xn, *q_a, *q, *kv, *attn, *h1, *h3, *gscore, *moe_y, *logits, *rw, *att;
	int *topk, *g_count, *g_exp, *g_cnt, *g_tok, *g_pair; /* MoE groups (device), g_cap of each */
	int g_cap, max_groups;
	int *h_groups; /* the same laid out on the host, for a prefill chunk */
	int *d_in;        /* [3][in_cap]: ids, seqs, pos */
	int *h_in;        /* pinned */
	void *xb16, *wb16;   /* prefill: bf16 activations [in_cap, widest input], one dequantised weight */
	size_t wb16_bytes;
	int *h_topk, *h_rows; /* prefill MoE: top-k on the host, pairs by expert */
	float *h_logits;  /* pinned [max_tokens][vocab] */
	graph_entry *graphs;
	int n_graphs;
	int sync_each;    /* DSV3_CUDA_SYNC=1: no graphs, a sync after every op */
	int profile;      /* DSV3_CUDA_PROFILE=1 */
	/* tensor parallelism (world > 1); one rank: world 1, e_lo 0, e_n all the experts */
	int world, rank;
	tp_link *tp;
	int e_lo, e_n;        /* this rank's routed experts, slots 0 .. e_n - 1 of its stacks */
	int vocab_lo, vocab_n;
	float *part;          /* [in_cap, dim]: a block's output before its all-reduce */
	float *logits_local;  /* [max_tokens, vocab_n]: this rank's rows of the head */
	float *gathered;      /* [world, max_tokens, vocab_n]: every rank's, as the all-gather lays them */
	cudaEvent_t marks[MAX_MARKS];
	int mark_stage[MAX_MARKS], n_marks, prof_steps[2], prof_n[2];
	double prof_ms[2][N_STAGES], prof_total[2]; /* [0]: decode steps, [1]: prefill chunks */
};

static void mark(cuda_model *g, int stage)
{
	if (!g->profile || g->n_marks == MAX_MARKS)
		return;
	g->mark_stage[g->n_marks] = stage;
	CK(cudaEventRecord(g->marks[g->n_marks++], g->stream));
}

/* After a profiled step or chunk (table 0 or 1): each mark's stage gets the time to the next. */
static void profile_collect(cuda_model *g, int table, int n)
{
	if (!g->profile || g->n_marks < 2)
		return;
	CK(cudaEventSynchronize(g->marks[g->n_marks - 1]));
	for (int i = 0; i + 1 < g->n_marks; i++) {
		float ms;
		CK(cudaEventElapsedTime(&ms, g->marks[i], g->marks[i + 1]));
		g->prof_ms[table][g->mark_stage[i]] += ms;
		g->prof_total[table] += ms;
	}
	g->n_marks = 0;
	g->prof_steps[table]++;
	g->prof_n[table] += n;
}

static void profile_print(const cuda_model *g)
{
	static const char *const what[2] = { "decode step", "prefill chunk" };
	for (int k = 0; g->profile && k < 2; k++) {
		int steps = g->prof_steps[k];
		if (!steps)
			continue;
		fprintf(stderr, "%s profile (mean of %d, %.1f tokens each; CUDA events, no graph):\n", what[k], steps,
			(double)g->prof_n[k] / steps);
		for (int s = 0; s < N_STAGES; s++)
			fprintf(stderr, "  %-36s %8.3f ms  %5.1f%%\n", stage_names[s], g->prof_ms[k][s] / steps,
				100.0 * g->prof_ms[k][s] / g->prof_total[k]);
		fprintf(stderr, "  %-36s %8.3f ms\n", "total", g->prof_total[k] / steps);
	}
}

/* ---- device memory ---- */

static void *dalloc(cuda_model *g, size_t bytes, const char *what)
{
	void *p = NULL;
	cuda_where(-1, what);
	CK(cudaMalloc(&p, bytes ? bytes : 16));
	g->bytes_allocated += bytes ? bytes : 16;
	if (g->n_allocs == g->cap_allocs) {
		g->cap_allocs = g->cap_allocs ? 2 * g->cap_allocs : 256;
		g->allocs = (void **)realloc(g->allocs, sizeof(void *) * g->cap_allocs);
		if (!g->allocs) {
			fprintf(stderr, "dsv3: out of host memory\n");
			cuda_fatal(3);
		}
	}
	g->allocs[g->n_allocs++] = p;
	return p;
}

static int dtype_of(st_dtype t)
{
	return t == ST_F8_E4M3 ? DW_F8 : t == ST_BF16 ? DW_BF16 : t == ST_F32 ? DW_F32 : -1;
}

static size_t dtype_bytes(int dt) { return dt == DW_F8 ? 1 : dt == DW_BF16 ? 2 : 4; }

/* Whether the pieces' FP8 scale grids line up with the merged matrix's 128x128 blocks. */
static int pieces_aligned(const weight_view *v)
{
	for (int i = 0; i + 1 < v->n_pieces; i++) {
		int along = v->split_dim == 1 ? v->pieces[i].cols : v->pieces[i].rows;
		if (along % 128)
			return 0;
	}
	return 1;
}

/* A merged FP8 view whose pieces do not split on 128 boundaries (only tiny test shapes) goes
 * up as BF16 values of its dequantised weights: one scale per 128x128 block cannot hold it. */
static int upload_dequantised(cuda_model *g, dweight *d, const weight_view *v, const char *name)
{
	size_t n = (size_t)v->rows * v->cols;
	uint16_t *h = (uint16_t *)malloc(n * 2);
	if (!h)
		return -1;
	int r0 = 0, c0 = 0;
	for (int i = 0; i < v->n_pieces; i++) {
		const weight_piece *p = &v->pieces[i];
		for (int r = 0; r < p->rows; r++)
			for (int c = 0; c < p->cols; c++) {
				float f = e4m3_to_float(((const uint8_t *)p->data)[(size_t)r * p->cols + c]) *
					  p->scale[(r / 128) * p->scale_cols + c / 128];
				h[(size_t)(r0 + r) * v->cols + c0 + c] = bf16_from_float(f);
			}
		if (v->split_dim == 1)
			c0 += p->cols;
		else
			r0 += p->rows;
	}
	d->dtype = DW_BF16;
	d->data = dalloc(g, n * 2, name);
	CK(cudaMemcpy((void *)d->data, h, n * 2, cudaMemcpyHostToDevice));
	free(h);
	return 0;
}

/* The view as one device matrix [rows, cols]; pieces of a split laid side by side. dst/sdst
 * non-NULL: into that place (an expert of a stack) instead of a new allocation. */
static int upload_into(cuda_model *g, dweight *d, const weight_view *v, const char *name, void *dst, float *sdst,
		       dsv3_error *err)
{
	int dt = dtype_of(v->pieces[0].dtype);
	if (dt < 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: dtype %s: the CUDA backend takes F8_E4M3, BF16 or F32",
				 name, dtype_name(v->pieces[0].dtype));
	memset(d, 0, sizeof *d);
	d->dtype = dt;
	d->rows = v->rows;
	d->cols = v->cols;
	cuda_where(-1, name);
	if (dt == DW_F8 && !pieces_aligned(v) && !dst)
		return upload_dequantised(g, d, v, name) ? dsv3_fail(err, DSV3_EIO, "%s: out of memory", name) : 0;
	size_t es = dtype_bytes(dt);
	char *base = (char *)(dst ? dst : dalloc(g, (size_t)v->rows * v->cols * es, name));
	int rb = (v->rows + 127) / 128, cb = (v->cols + 127) / 128;
	float *sbase = NULL;
	if (dt == DW_F8) {
		sbase = sdst ? sdst : (float *)dalloc(g, sizeof(float) * rb * cb, name);
		d->scale = sbase;
		d->scale_cols = cb;
	}
	int r0 = 0, c0 = 0;
	for (int i = 0; i < v->n_pieces; i++) {
		const weight_piece *p = &v->pieces[i];
		if (dtype_of(p->dtype) != dt)
			return dsv3_fail(err, DSV3_EDATA, "%s: pieces of different dtypes", name);
		CK(cudaMemcpy2D(base + ((size_t)r0 * v->cols + c0) * es, (size_t)v->cols * es, p->data,
				(size_t)p->cols * es, (size_t)p->cols * es, p->rows, cudaMemcpyHostToDevice));
		if (dt == DW_F8) {
			int prb = (p->rows + 127) / 128, pcb = (p->cols + 127) / 128;
			CK(cudaMemcpy2D(sbase + (size_t)(r0 / 128) * cb + c0 / 128, sizeof(float) * cb, p->scale,
					sizeof(float) * p->scale_cols, sizeof(float) * pcb, prb, cudaMemcpyHostToDevice));
		}
		if (v->split_dim == 1)
			c0 += p->cols;
		else
			r0 += p->rows;
	}
	d->data = base;
	return 0;
}

static int upload(cuda_model *g, dweight *d, const weight_view *v, const char *name, dsv3_error *err)
{
	size_t bf16 = (size_t)v->rows * v->cols * 2;
	if (strcmp(name, "embed") && strcmp(name, "head") && bf16 > g->wb16_bytes)
		g->wb16_bytes = bf16;
	if (strcmp(name, "embed") && strcmp(name, "head") && (size_t)v->rows > g->widest_out)
		g->widest_out = (size_t)v->rows;
	return upload_into(g, d, v, name, NULL, NULL, err);
}

/* The n routed experts of a layer as one stack: expert e at e * rows * cols. */
static int upload_experts(cuda_model *g, dweight *d, const weight_view *v, int n, const char *name, dsv3_error *err)
{
	int dt = dtype_of(v[0].pieces[0].dtype), rb = (v[0].rows + 127) / 128, cb = (v[0].cols + 127) / 128;
	if (dt < 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: dtype %s: the CUDA backend takes F8_E4M3, BF16 or F32",
				 name, dtype_name(v[0].pieces[0].dtype));
	size_t per = (size_t)v[0].rows * v[0].cols, es = dtype_bytes(dt);

	char *base = (char *)dalloc(g, per * es * n, name);
	float *sbase = dt == DW_F8 ? (float *)dalloc(g, sizeof(float) * rb * cb * n, name) : NULL;
	for (int e = 0; e < n; e++) {
		dweight one;
		int rc = upload_into(g, &one, &v[e], name, base + per * es * e, sbase ? sbase + (size_t)rb * cb * e : NULL, err);
		if (rc)
			return rc;
	}
	memset(d, 0, sizeof *d);
	d->dtype = dt;
	d->rows = v[0].rows;
	d->cols = v[0].cols;
	d->data = base;
	d->scale = sbase;
	d->scale_cols = dt == DW_F8 ? cb : 0;
	d->estride = (long long)per;
	d->sstride = (long long)rb * cb;
	return 0;
}

static int upload_layer(cuda_model *g, dlayer *d, const LayerWeights *lw, int l, dsv3_error *err)
{
	const dsv3_config *c = &g->cf.c;
	char n[64];
	int rc = 0;
#define UP(field)                                                           \
	do {                                                                \
		snprintf(n, sizeof n, "layers.%d." #field, l);              \
		if (!rc)                                                    \
			rc = upload(g, &d->field, &lw->field, n, err);      \
	} while (0)
	if (c->q_lora_rank > 0) {
		UP(wq_a);
		UP(q_norm);
		UP(wq_b);
	} else {
		UP(wq);
	}
	UP(wkv_a);
	UP(kv_norm);
	UP(wkv_b);
	UP(wo);
	UP(attn_norm);
	UP(ffn_norm);
	if (l < c->n_dense_layers || c->n_shared_experts > 0) {
		UP(w1);
		UP(w2);
		UP(w3);
	}
	if (l >= c->n_dense_layers) {
		UP(gate);
		d->has_bias = lw->gate_bias.rows > 0;
		if (d->has_bias)
			UP(gate_bias);
		/* this rank's experts only (all of them for one rank) */
		snprintf(n, sizeof n, "layers.%d.ffn.experts.w1", l);
		if (!rc)
			rc = upload_experts(g, &d->ew1, lw->ew1 + g->e_lo, g->e_n, n, err);
		snprintf(n, sizeof n, "layers.%d.ffn.experts.w2", l);
		if (!rc)
			rc = upload_experts(g, &d->ew2, lw->ew2 + g->e_lo, g->e_n, n, err);
		snprintf(n, sizeof n, "layers.%d.ffn.experts.w3", l);
		if (!rc)
			rc = upload_experts(g, &d->ew3, lw->ew3 + g->e_lo, g->e_n, n, err);
	}
#undef UP
	return rc;
}

/* ---- state ---- */

static void state_alloc(cuda_model *g)
{
	const dsv3_config *c = &g->cf.c;
	size_t T = (size_t)g->in_cap, P = (size_t)g->max_tokens * (g->K > 0 ? g->K : 1);
	size_t D = (size_t)c->kv_lora_rank + c->qk_rope_head_dim;
	size_t H = (size_t)g->cf.n_local_heads;
	P = P > T ? P : T;
	g->cache = (float *)dalloc(g, sizeof(float) * c->n_layers * g->n_seqs * (size_t)g->cf.max_seq_len * D,
				   "the KV cache");
	g->inv_freq = (float *)dalloc(g, sizeof(float) * c->qk_rope_head_dim / 2, "inv_freq");
	float *f = (float *)malloc(sizeof(float) * c->qk_rope_head_dim / 2);
	model_rope_freqs(f, c, g->cf.max_seq_len);
	CK(cudaMemcpy(g->inv_freq, f, sizeof(float) * c->qk_rope_head_dim / 2, cudaMemcpyHostToDevice));
	free(f);
	g->x = (float *)dalloc(g, sizeof(float) * T * g->dim, "x");
	g->xn = (float *)dalloc(g, sizeof(float) * T * g->dim, "xn");
	g->q_a = (float *)dalloc(g, sizeof(float) * T * (c->q_lora_rank > 0 ? c->q_lora_rank : 1), "q_a");
	g->q = (float *)dalloc(g, sizeof(float) * T * H * g->cf.q_head_dim, "q");
	g->kv = (float *)dalloc(g, sizeof(float) * T * D, "kv");
	g->attn = (float *)dalloc(g, sizeof(float) * T * H * c->v_head_dim, "attn");
	size_t kk = (size_t)(g->K > 0 ? g->K : 1), hrows = P * g->hidden;
	if (T * kk * c->moe_inter_dim > hrows) /* a prefill chunk's expert pairs */
		hrows = T * kk * c->moe_inter_dim;
	g->h1 = (float *)dalloc(g, sizeof(float) * hrows, "h1");
	g->h3 = (float *)dalloc(g, sizeof(float) * hrows, "h3");
	g->gscore = (float *)dalloc(g, sizeof(float) * T * (c->n_routed_experts > 0 ? c->n_routed_experts : 1), "gate scores");
	g->moe_y = (float *)dalloc(g, sizeof(float) * T * kk * g->dim, "expert outputs");
	g->logits = (float *)dalloc(g, sizeof(float) * T * g->vocab, "logits");
	size_t R = T * (g->K > 0 ? g->K : 1);
	g->rw = (float *)dalloc(g, sizeof(float) * R, "route weights");
	g->topk = (int *)dalloc(g, sizeof(int) * R, "topk");
	/* groups of the decode MoE, or of a prefill chunk's: one per (expert, 16 of its tokens) */
	g->max_groups = (int)(T * kk / GEMV_MAX_TOKENS + (size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1));
	size_t G = (size_t)g->max_groups > P ? (size_t)g->max_groups : P;
	g->g_count = (int *)dalloc(g, sizeof(int) * (4 + G * (2 + 2 * GEMV_MAX_TOKENS)), "groups");
	g->h_groups = (int *)malloc(sizeof(int) * (4 + G * (2 + 2 * GEMV_MAX_TOKENS)));
	g->g_exp = g->g_count + 4;
	g->g_cnt = g->g_exp + G;
	g->g_tok = g->g_cnt + G;
	g->g_pair = g->g_tok + G * GEMV_MAX_TOKENS;
	g->g_cap = (int)G;
	float *dummy;
	size_t att = mla_scratch_floats((int)H, c->kv_lora_rank, c->qk_rope_head_dim, g->max_tokens,
					g->cf.max_seq_len, &dummy, &dummy, &dummy, NULL);
	g->att = (float *)dalloc(g, sizeof(float) * att, "attention scratch");
	g->d_in = (int *)dalloc(g, sizeof(int) * 3 * T, "inputs");
	g->vp_tab = mla_vproj_table((int)H);
	CK(cudaMallocHost(&g->h_in, sizeof(int) * 3 * T));
	CK(cudaMallocHost(&g->h_logits, sizeof(float) * g->max_tokens * g->vocab));
	size_t widest = (size_t)g->dim > H * c->v_head_dim ? (size_t)g->dim : H * c->v_head_dim;
	widest = widest > (size_t)g->hidden ? widest : (size_t)g->hidden;
	widest = widest > (size_t)c->q_lora_rank ? widest : (size_t)c->q_lora_rank;
	g->xb16 = dalloc(g, 2 * 2 * T * widest, "prefill activations (bf16 halves)");
	g->split_out = (float *)dalloc(g, sizeof(float) * 4 * T * g->widest_out, "prefill GEMM parts");
	g->wb16 = dalloc(g, 2 * g->wb16_bytes, "prefill weight (bf16 halves)");
	g->h_topk = (int *)malloc(sizeof(int) * T * (g->K > 0 ? g->K : 1) * 2);
	g->h_rows = g->h_topk + T * (g->K > 0 ? g->K : 1);
	if (g->world > 1) {
		g->part = (float *)dalloc(g, sizeof(float) * T * g->dim, "block outputs (all-reduced)");
		g->logits_local = (float *)dalloc(g, sizeof(float) * g->max_tokens * g->vocab_n, "logits (local)");
		g->gathered = (float *)dalloc(g, sizeof(float) * g->max_tokens * g->vocab, "logits (gathered)");
	}
}

/* ---- the forward pass ---- */

static void sync_point(cuda_model *g, int layer, const char *what)
{
	if (!g->sync_each)
		return;
	cuda_where(layer, what);
	CK(cudaStreamSynchronize(g->stream));
}

/* Y[n, rows] (+)= X[n, K] W^T through cuBLAS in bf16 with fp32 accumulation. X goes as two bf16
 * halves (hi + lo: 16 bits) and so does W unless it is BF16 already (an FP8 value times its
 * fp32 block scale needs more than bf16's 8 bits), all in one GEMM of [ws rows, xs n] whose parts
 * are then summed: fp32-grade results, like the CPU's. With DSV3_CUDA_BF16_ACT=1, X and W are
 * rounded to bf16 once instead (the official demo's bf16 GEMM: faster, ~1e-2 off). */
static void linear_blas(cuda_model *g, const dweight *w, int expert, const float *x, int ldx, float *y, int ldy,
			int n, int acc, int layer, const char *what)
{
	cuda_where(layer, what);
	if (ldx != w->cols)
		cuda_check(cudaErrorInvalidValue, "linear_blas: rows of x are not packed");
	if (g->bf16_act)
		k_to_bf16(g->stream, g->xb16, x, (size_t)n * w->cols);
	else
		k_split_bf16(g->stream, g->xb16, x, (size_t)n * w->cols);
	const void *wb = w->data;
	int ws = 1, xs = g->bf16_act ? 1 : 2;
	if (w->dtype == DW_BF16) {
		wb = (const char *)w->data + (size_t)expert * w->estride * 2;
	} else {
		ws = g->bf16_act ? 1 : 2;
		k_weight_bf16(g->stream, g->wb16, w, expert, ws == 2);
		wb = g->wb16;
	}
	const float one = 1.0f, beta = acc && xs * ws == 1 ? 1.0f : 0.0f;
	float *out = xs * ws == 1 ? y : g->split_out;
	cublasStatus_t st = cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, ws * w->rows, xs * n, w->cols, &one, wb,
					 CUDA_R_16BF, w->cols, g->xb16, CUDA_R_16BF, w->cols, &beta, out, CUDA_R_32F,
					 xs * ws == 1 ? ldy : ws * w->rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
	if (st != CUBLAS_STATUS_SUCCESS) {
		fprintf(stderr, "dsv3: cuBLAS error %d in cublasGemmEx (layer %d, %s)\n", (int)st, layer, what);
		cuda_fatal(3);
	}
	if (xs * ws > 1)
		k_join_parts(g->stream, y, ldy, g->split_out, w->rows, n, xs, ws, acc);
	sync_point(g, layer, what);
}

/* y1 (+)= W1 x and, when w3 is not NULL, y3 = W3 x in the same launch: the GEMV for up to
 * GEMV_MAX_TOKENS tokens, cuBLAS past that. */
static void gemv_or_blas(cuda_model *g, const dweight *w1, const dweight *w3, const float *x, int ldx, float *y1,
			 float *y3, int ldy, int ldy3, int n, int acc, int layer, const char *what)
{
	if (n > GEMV_MAX_TOKENS && (g->debug_parts & 1)) { /* diagnosis: the GEMV, 16 tokens at a time */
		for (int i = 0; i < n; i += GEMV_MAX_TOKENS)
			gemv_or_blas(g, w1, w3, x + (size_t)i * ldx, ldx, y1 + (size_t)i * ldy,
				     w3 ? y3 + (size_t)i * ldy3 : NULL, ldy, ldy3,
				     n - i < GEMV_MAX_TOKENS ? n - i : GEMV_MAX_TOKENS, acc, layer, what);
		return;
	}
	if (n > GEMV_MAX_TOKENS) {
		linear_blas(g, w1, 0, x, ldx, y1, ldy, n, acc, layer, what);
		if (w3)
			linear_blas(g, w3, 0, x, ldx, y3, ldy3, n, 0, layer, what);
		return;
	}
	cuda_where(layer, what);
	gemv_call c = {};
	c.w = w1, c.w2 = w3, c.x = x, c.ldx = ldx;
	c.y = y1, c.y2 = y3, c.ldy = ldy, c.ldy2 = ldy3, c.n = n, c.accumulate = acc;
	k_gemv(g->stream, &c);
	sync_point(g, layer, what);
}

static void linear(cuda_model *g, const dweight *w, const float *x, int ldx, float *y, int ldy, int n, int acc,
		   int layer, const char *what)
{
	gemv_or_blas(g, w, NULL, x, ldx, y, NULL, ldy, 0, n, acc, layer, what);
}

static void linear_pair(cuda_model *g, const dweight *w1, const dweight *w3, const float *x, int ldx, float *y1,
			float *y3, int ldy, int ldy3, int n, int layer, const char *what)
{
	gemv_or_blas(g, w1, w3, x, ldx, y1, y3, ldy, ldy3, n, 0, layer, what);
}

/* Where a block's output goes: added to the residual x on one rank; on several, written to
 * part (overwriting: acc_out 0), which reduce_out sums over the ranks and adds to x. */
static float *block_out(const cuda_model *g) { return g->world > 1 ? g->part : g->x; }
static int acc_out(const cuda_model *g) { return g->world == 1; }

/* x += the sum over the ranks of part[0:n] (nothing on one rank). */
static void reduce_out(cuda_model *g, int n, int layer, const char *what)
{
	if (g->world == 1)
		return;
	cuda_where(layer, what);
	tp_allreduce(g->tp, g->part, (size_t)n * g->dim, g->stream, what);
	k_add(g->stream, g->x, g->part, (size_t)n * g->dim);
	sync_point(g, layer, what);
}

/* x += w2(silu(w1 xn) * w3 xn) for n tokens (block_out on several ranks). */
static void mlp(cuda_model *g, const dlayer *d, int n, int layer)
{
	int inter = d->w1.rows;
	linear_pair(g, &d->w1, &d->w3, g->xn, g->dim, g->h1, g->h3, inter, inter, n, layer, "mlp.w1/w3");
	k_silu_mul(g->stream, g->h1, g->h3, (size_t)n * inter); /* once, not per row block of w2 */
	linear(g, &d->w2, g->h1, inter, block_out(g), g->dim, n, acc_out(g), layer, "mlp.w2");
}

/* The routed experts' sum added to block_out: k_moe_combine on one rank, this rank's experts
 * only on several (the shared experts' output is already there, or zeros without them). */
static void moe_combine(cuda_model *g, const dsv3_config *c, int n, int K)
{
	if (g->world == 1) {
		k_moe_combine(g->stream, g->x, g->moe_y, g->rw, n, K, g->dim);
		return;
	}
	if (c->n_shared_experts <= 0)
		CK(cudaMemsetAsync(g->part, 0, sizeof(float) * n * g->dim, g->stream));
	k_moe_combine_local(g->stream, g->part, g->moe_y, g->rw, g->topk, g->e_lo, g->e_n, n, K, g->dim);
}

/* MoE over a prefill chunk: routing on the device, the top-k to the host (one sync), then the
 * experts through the grouped GEMV in one launch per matrix: each expert's tokens in groups of
 * up to 16, each group reading its expert's FP8 or BF16 weights as stored (fp32 results, the
 * same numbers as decode's). */
static void moe_chunk(cuda_model *g, const dlayer *d, int n, int layer)
{
	const dsv3_config *c = &g->cf.c;
	int E = c->n_routed_experts, K = c->n_activated_experts, inter = d->ew1.rows, T = GEMV_MAX_TOKENS;
	linear(g, &d->gate, g->xn, g->dim, g->gscore, E, n, 0, layer, "ffn.gate");
	route_args ra = { E, K, c->n_expert_groups > 0 ? c->n_expert_groups : 1, c->n_limited_groups,
			  c->score_sigmoid, (float)c->route_scale, d->has_bias ? &d->gate_bias : NULL };
	cuda_where(layer, "ffn.gate (routing)");
	k_route(g->stream, &ra, g->gscore, n, g->topk, g->rw);
	CK(cudaMemcpyAsync(g->h_topk, g->topk, sizeof(int) * n * K, cudaMemcpyDeviceToHost, g->stream));
	CK(cudaStreamSynchronize(g->stream));
	/* pairs p = t * K + k by expert (counting sort), then groups of up to T of them */
	int *start = (int *)calloc((size_t)E + 1, sizeof(int)), *fill = (int *)malloc(sizeof(int) * E);
	for (int p = 0; p < n * K; p++)
		start[g->h_topk[p] + 1]++;
	for (int e = 0; e < E; e++)
		start[e + 1] += start[e];
	memcpy(fill, start, sizeof(int) * E);
	for (int p = 0; p < n * K; p++)
		g->h_rows[fill[g->h_topk[p]]++] = p;
	int Gc = g->g_cap, G = 0;
	int *hc = g->h_groups, *hexp = hc + 4, *hcnt = hexp + Gc, *htok = hcnt + Gc, *hpair = htok + Gc * T;
	for (int e = g->e_lo; e < g->e_lo + g->e_n; e++) /* this rank's experts, as local slots */
		for (int i = start[e]; i < start[e + 1]; i += T, G++) {
			int m = start[e + 1] - i < T ? start[e + 1] - i : T;
			hexp[G] = e - g->e_lo, hcnt[G] = m;
			for (int j = 0; j < m; j++) {
				htok[G * T + j] = g->h_rows[i + j] / K;
				hpair[G * T + j] = g->h_rows[i + j];
			}
		}
	hc[0] = G;
	free(start);
	free(fill);
	CK(cudaMemcpyAsync(g->g_count, hc, sizeof(int) * (4 + (size_t)Gc * (2 + 2 * T)), cudaMemcpyHostToDevice,
			   g->stream));
	gemv_groups in_tok = { g->g_count, g->g_exp, g->g_cnt, g->g_tok, g->g_pair, G };
	gemv_groups in_pair = { g->g_count, g->g_exp, g->g_cnt, g->g_pair, g->g_pair, G };
	if (G > 0) { /* a rank of several may get no token of the chunk at all */
		cuda_where(layer, "ffn.experts.w1/w3");
		gemv_call c13 = {};
		c13.w = &d->ew1, c13.w2 = &d->ew3, c13.x = g->xn, c13.ldx = g->dim;
		c13.y = g->h1, c13.y2 = g->h3, c13.ldy = inter, c13.n = T, c13.groups = &in_tok;
		k_gemv(g->stream, &c13);
		k_silu_mul(g->stream, g->h1, g->h3, (size_t)n * K * inter);
		cuda_where(layer, "ffn.experts.w2");
		gemv_call c2 = {};
		c2.w = &d->ew2, c2.x = g->h1, c2.ldx = inter, c2.y = g->moe_y, c2.ldy = g->dim, c2.n = T,
		c2.groups = &in_pair;
		k_gemv(g->stream, &c2);
	}
	if (c->n_shared_experts > 0)
		mlp(g, d, n, layer);
	cuda_where(layer, "ffn (combine)");
	moe_combine(g, c, n, K);
	sync_point(g, layer, "ffn (experts)");
	reduce_out(g, n, layer, "ffn (all-reduce of the MoE)");
}

static void moe(cuda_model *g, const dlayer *d, int n, int layer)
{
	if (n > g->max_tokens && (g->debug_parts & 2)) {
		float *x = g->x, *xn = g->xn, *part = g->part;
		for (int i = 0; i < n; i += g->max_tokens) {
			g->x = x + (size_t)i * g->dim, g->xn = xn + (size_t)i * g->dim;
			if (part)
				g->part = part + (size_t)i * g->dim;
			moe(g, d, n - i < g->max_tokens ? n - i : g->max_tokens, layer);
		}
		g->x = x, g->xn = xn, g->part = part;
		return;
	}
	if (n > g->max_tokens) {
		moe_chunk(g, d, n, layer);
		return;
	}
	const dsv3_config *c = &g->cf.c;
	int E = c->n_routed_experts, K = c->n_activated_experts, inter = d->ew1.rows;
	mark(g, ST_ROUTE);
	linear(g, &d->gate, g->xn, g->dim, g->gscore, E, n, 0, layer, "ffn.gate");
	route_args ra = { E, K, c->n_expert_groups > 0 ? c->n_expert_groups : 1, c->n_limited_groups,
			  c->score_sigmoid, (float)c->route_scale, d->has_bias ? &d->gate_bias : NULL };
	cuda_where(layer, "ffn.gate (routing)");
	k_route(g->stream, &ra, g->gscore, n, g->topk, g->rw);
	k_moe_groups_local(g->stream, g->topk, n, K, g->e_lo, g->e_n, g->g_count, g->g_exp, g->g_cnt, g->g_tok,
			   g->g_pair);
	sync_point(g, layer, "ffn.gate (routing)");

	int max_groups = n * K < g->e_n ? n * K : g->e_n;
	gemv_groups in_tok = { g->g_count, g->g_exp, g->g_cnt, g->g_tok, g->g_pair, max_groups };
	gemv_groups in_pair = { g->g_count, g->g_exp, g->g_cnt, g->g_pair, g->g_pair, max_groups };
	mark(g, ST_EXPERTS);
	cuda_where(layer, "ffn.experts.w1/w3");
	gemv_call c13 = {};
	c13.w = &d->ew1;
	c13.w2 = &d->ew3;
	c13.x = g->xn;
	c13.ldx = g->dim;
	c13.y = g->h1;
	c13.y2 = g->h3;
	c13.ldy = inter;
	c13.n = n;
	c13.groups = &in_tok;
	k_gemv(g->stream, &c13);
	sync_point(g, layer, "ffn.experts.w1/w3");
	cuda_where(layer, "ffn.experts.w2");
	k_silu_mul(g->stream, g->h1, g->h3, (size_t)n * K * inter);
	gemv_call c2 = {};
	c2.w = &d->ew2;
	c2.x = g->h1;
	c2.ldx = inter;
	c2.y = g->moe_y;
	c2.ldy = g->dim;
	c2.n = n;
	c2.groups = &in_pair;
	k_gemv(g->stream, &c2);
	sync_point(g, layer, "ffn.experts.w2");
	mark(g, ST_SHARED);
	if (c->n_shared_experts > 0)
		mlp(g, d, n, layer);
	cuda_where(layer, "ffn (combine)");
	moe_combine(g, c, n, K);
	sync_point(g, layer, "ffn (combine)");
	reduce_out(g, n, layer, "ffn (all-reduce of the MoE)");
}

/* The attention of up to max_tokens queries of one sequence whose last position is need - 1,
 * with the scores and P.C as fp32 GEMMs over every cache row up to need (a prefill chunk: the
 * kernels of k_mla_attention re-read each cache row for every query). */
static void attention_gemm(cuda_model *g, mla_args *a, int layer, int need, const float *q, float *out)
{
	const int D = a->lora + a->rope, nh = a->n * a->H;
	const float *rows = a->cache.base + (size_t)g->prefill_seq * a->cache.seq_stride * D;
	const float zero = 0.0f, one = 1.0f;
	k_mla_absorb(g->stream, a, q);
	cublasStatus_t st = cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, need, nh, D, &a->softmax_scale, rows, D,
					a->qc, D, &zero, a->scores, a->ctx_cap);
	a->zero_to = need;
	k_mla_softmax(g->stream, a);
	if (st == CUBLAS_STATUS_SUCCESS) /* oc [n * H, lora] where qc was */
		st = cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, a->lora, nh, need, &one, rows, D, a->scores,
				 a->ctx_cap, &zero, a->qc, a->lora);
	if (st != CUBLAS_STATUS_SUCCESS) {
		fprintf(stderr, "dsv3: cuBLAS error %d in cublasSgemm (layer %d, attention of a prefill chunk)\n",
			(int)st, layer);
		cuda_fatal(3);
	}
	k_mla_vproj(g->stream, a, a->qc, out);
}

static void attention(cuda_model *g, const dlayer *d, int n, int cap, int layer)
{
	const Config *cf = &g->cf;
	const dsv3_config *c = &cf->c;
	int H = cf->n_local_heads, lora = c->kv_lora_rank, rope = c->qk_rope_head_dim, D = lora + rope;
	const int *seqs = g->d_in + g->in_cap, *pos = g->d_in + 2 * g->in_cap;
	mark(g, ST_ATT_PROJ);
	if (c->q_lora_rank > 0) {
		linear_pair(g, &d->wq_a, &d->wkv_a, g->xn, g->dim, g->q_a, g->kv, c->q_lora_rank, D, n, layer,
			    "attn.wq_a/wkv_a");
		cuda_where(layer, "attn.q_norm");
		k_rmsnorm(g->stream, g->q_a, g->q_a, c->q_lora_rank, &d->q_norm, c->q_lora_rank, n, cf->eps);
		linear(g, &d->wq_b, g->q_a, c->q_lora_rank, g->q, H * cf->q_head_dim, n, 0, layer, "attn.wq_b");
	} else {
		linear_pair(g, &d->wq, &d->wkv_a, g->xn, g->dim, g->q, g->kv, H * cf->q_head_dim, D, n, layer,
			    "attn.wq/wkv_a");
	}
	mark(g, ST_ATT_CORE);
	mla_cache cache = { g->cache + (size_t)layer * g->n_seqs * cf->max_seq_len * D, cf->max_seq_len };
	cuda_where(layer, "attn.kv_norm (rope, cache)");
	k_rope_kv(g->stream, g->q, g->kv, &d->kv_norm, cache, seqs, pos, n, H, c->qk_nope_head_dim, rope, lora,
		  g->inv_freq, cf->eps);
	cuda_where(layer, "attn (MLA over the cache, wkv_b)");
	for (int i = 0; i < n; i += g->max_tokens) { /* the scratch holds max_tokens queries */
		mla_args a = {};
		a.H = H, a.nope = c->qk_nope_head_dim, a.rope = rope, a.v = c->v_head_dim, a.lora = lora;
		a.softmax_scale = cf->softmax_scale;
		a.wkv_b = d->wkv_b;
		a.vp_tab = g->vp_tab;
		a.one_seq = g->prefilling;
		a.cache = cache;
		a.seqs = seqs + i, a.pos = pos + i, a.n = n - i < g->max_tokens ? n - i : g->max_tokens;
		a.ctx_cap = cap;
		mla_scratch_floats(H, lora, rope, a.n, cap, &a.qc, &a.scores, &a.partial, g->att);
		const float *q = g->q + (size_t)i * H * cf->q_head_dim;
		float *out = g->attn + (size_t)i * H * c->v_head_dim;
		if (g->prefilling && n > g->max_tokens && !(g->debug_parts & 4))
			attention_gemm(g, &a, layer, g->chunk_pos0 + i + a.n, q, out);
		else
			k_mla_attention(g->stream, &a, q, out);
	}
	sync_point(g, layer, "attn");
	mark(g, ST_ATT_WO);
	linear(g, &d->wo, g->attn, H * c->v_head_dim, block_out(g), g->dim, n, acc_out(g), layer, "attn.wo");
	reduce_out(g, n, layer, "attn.wo (all-reduce)");
}

/* The head of a rank of several: its rows of the vocabulary for nh tokens, all-gathered
 * ([world][nh][vocab_n]), then each rank's columns put in place in logits [nh, vocab]. */
static void head_parallel(cuda_model *g, int nh)
{
	const size_t vn = (size_t)g->vocab_n;
	if (nh > g->max_tokens)
		cuda_check(cudaErrorInvalidValue, "head: more rows than the gather buffer holds");
	linear(g, &g->head, g->xn, g->dim, g->logits_local, g->vocab_n, nh, 0, -1, "head");
	cuda_where(-1, "head (all-gather of the logits)");
	tp_allgather(g->tp, g->logits_local, g->gathered, (size_t)nh * vn, g->stream, "the logits");
	for (int r = 0; r < g->world; r++)
		CK(cudaMemcpy2DAsync(g->logits + r * vn, sizeof(float) * g->vocab, g->gathered + (size_t)r * nh * vn,
				     sizeof(float) * vn, sizeof(float) * vn, nh, cudaMemcpyDeviceToDevice, g->stream));
}

/* The pass over n tokens whose ids, sequences and positions are in d_in; cap bounds every
 * position + 1. Logits of the tokens from `head_from` on go to logits. */
static void run_tokens(cuda_model *g, int n, int cap, int head_from)
{
	const Config *cf = &g->cf;
	const dsv3_config *c = &cf->c;
	cuda_where(-1, "embed");
	if (g->world == 1) {
		k_embed(g->stream, g->x, &g->embed, g->d_in, n);
	} else { /* vocab-parallel: this rank's rows, zeros for the others', summed */
		k_embed_range(g->stream, g->x, &g->embed, g->d_in, n, g->vocab_lo);
		tp_allreduce(g->tp, g->x, (size_t)n * g->dim, g->stream, "embed");
	}
	for (int l = 0; l < c->n_layers; l++) {
		const dlayer *d = &g->layers[l];
		mark(g, ST_OTHER);
		cuda_where(l, "attn_norm");
		k_rmsnorm(g->stream, g->xn, g->x, g->dim, &d->attn_norm, g->dim, n, cf->eps);
		attention(g, d, n, cap, l);
		mark(g, ST_OTHER);
		cuda_where(l, "ffn_norm");
		k_rmsnorm(g->stream, g->xn, g->x, g->dim, &d->ffn_norm, g->dim, n, cf->eps);
		mark(g, ST_DENSE);
		if (l < c->n_dense_layers) {
			mlp(g, d, n, l);
			reduce_out(g, n, l, "mlp.w2 (all-reduce)");
		} else {
			moe(g, d, n, l);
		}
	}
	if (head_from >= n)
		return;
	mark(g, ST_HEAD);
	cuda_where(-1, "norm");
	int nh = n - head_from;
	k_rmsnorm(g->stream, g->xn, g->x + (size_t)head_from * g->dim, g->dim, &g->norm, g->dim, nh, cf->eps);
	if (g->world == 1)
		linear(g, &g->head, g->xn, g->dim, g->logits, g->vocab, nh, 0, -1, "head");
	else
		head_parallel(g, nh);
}

static int ctx_bucket(const cuda_model *g, int need)
{
	int cap = 64;
	while (cap < need)
		cap *= 2;
	return cap < g->cf.max_seq_len ? cap : g->cf.max_seq_len;
}

/* One replayable step: inputs in, the pass, logits out. */
static void step_body(cuda_model *g, int n, int cap)
{
	int T = g->in_cap;
	mark(g, ST_COPY);
	for (int k = 0; k < 3; k++)
		CK(cudaMemcpyAsync(g->d_in + k * T, g->h_in + k * T, sizeof(int) * n, cudaMemcpyHostToDevice, g->stream));
	run_tokens(g, n, cap, 0);
	mark(g, ST_COPY);
	CK(cudaMemcpyAsync(g->h_logits, g->logits, sizeof(float) * n * g->vocab, cudaMemcpyDeviceToHost, g->stream));
	mark(g, ST_COPY);
}

static cudaGraphExec_t step_graph(cuda_model *g, int n, int cap)
{
	for (int i = 0; i < g->n_graphs; i++)
		if (g->graphs[i].n == n && g->graphs[i].cap == cap)
			return g->graphs[i].exec;
	cudaGraph_t graph;
	cudaGraphExec_t exec;
	cuda_where(-1, "decode step (capture)");
	CK(cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal));
	step_body(g, n, cap);
	cuda_where(-1, "decode step (capture)");
	CK(cudaStreamEndCapture(g->stream, &graph));
	CK(cudaGraphInstantiate(&exec, graph, 0));
	CK(cudaGraphDestroy(graph));
	g->graphs = (graph_entry *)realloc(g->graphs, sizeof(graph_entry) * (g->n_graphs + 1));
	g->graphs[g->n_graphs++] = graph_entry{ n, cap, exec };
	return exec;
}

static void set_inputs(cuda_model *g, int n, const int *ids, const int *seqs, const int *pos)
{
	int T = g->in_cap;
	memcpy(g->h_in, ids, sizeof(int) * n);
	memcpy(g->h_in + T, seqs, sizeof(int) * n);
	memcpy(g->h_in + 2 * T, pos, sizeof(int) * n);
}

static void decode_step(cuda_model *g, int n, const int *seqs, const int *tokens, const int *pos, float *logits)
{
	int need = 0;
	for (int i = 0; i < n; i++)
		need = pos[i] + 1 > need ? pos[i] + 1 : need;
	int cap = ctx_bucket(g, need);
	set_inputs(g, n, tokens, seqs, pos);
	if (g->sync_each || g->profile || (g->tp && !tp_capturable(g->tp))) {
		step_body(g, n, cap);
	} else {
		cudaGraphExec_t exec = step_graph(g, n, cap);
		cuda_where(-1, "decode step (graph replay)");
		CK(cudaGraphLaunch(exec, g->stream));
	}
	cuda_where(-1, "decode step");
	CK(cudaStreamSynchronize(g->stream));
	profile_collect(g, 0, n);
	if (logits)
		memcpy(logits, g->h_logits, sizeof(float) * n * g->vocab);
}

extern "C" float *cuda_forward_batch(cuda_model *g, int n, const int *seqs, const int *tokens, const int *pos,
				     float *logits)
{
	if (n <= g->max_tokens) {
		decode_step(g, n, seqs, tokens, pos, NULL);
		return g->h_logits;
	}
	for (int i = 0; i < n; i += g->max_tokens) {
		int m = n - i < g->max_tokens ? n - i : g->max_tokens;
		decode_step(g, m, seqs + i, tokens + i, pos + i, logits + (size_t)i * g->vocab);
	}
	return logits;
}

extern "C" void cuda_forward_prompt(cuda_model *g, int seq, const int *tokens, int n, int pos, float *logits)
{
	int *seqs = g->h_topk, *ps = g->h_rows; /* host scratch of in_cap entries each */
	for (int done = 0; done < n;) {
		int left = n - done;
		int m = left >= g->blas_min ? (left < g->in_cap ? left : g->in_cap)
						 : (left < g->max_tokens ? left : g->max_tokens);
		for (int i = 0; i < m; i++)
			seqs[i] = seq, ps[i] = pos + done + i;
		set_inputs(g, m, tokens + done, seqs, ps);
		int T = g->in_cap;
		for (int k = 0; k < 3; k++)
			CK(cudaMemcpyAsync(g->d_in + k * T, g->h_in + k * T, sizeof(int) * m, cudaMemcpyHostToDevice,
					   g->stream));
		done += m;
		int last = done == n && logits;
		g->prefilling = 1, g->prefill_seq = seq, g->chunk_pos0 = pos + done - m;
		run_tokens(g, m, ctx_bucket(g, pos + done), last ? m - 1 : m);
		g->prefilling = 0;
		mark(g, ST_COPY);
		if (last)
			CK(cudaMemcpyAsync(g->h_logits, g->logits, sizeof(float) * g->vocab, cudaMemcpyDeviceToHost,
					   g->stream));
		mark(g, ST_COPY);
		cuda_where(-1, "prefill");
		CK(cudaStreamSynchronize(g->stream)); /* h_in is reused by the next chunk */
		profile_collect(g, 1, m);
	}
	if (logits)
		memcpy(logits, g->h_logits, sizeof(float) * g->vocab);
}

/* ---- open / close ---- */

extern "C" int cuda_model_available(char *why, size_t why_len)
{
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess || n < 1) {
		if (why && why_len)
			snprintf(why, why_len, "no CUDA GPU is visible (%s)",
				 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
		cudaGetLastError();
		return 0;
	}
	return 1;
}

extern "C" void cuda_model_close(cuda_model *g)
{
	if (!g)
		return;
	profile_print(g);
	if (g->profile)
		for (int i = 0; i < MAX_MARKS; i++)
			cudaEventDestroy(g->marks[i]);
	for (int i = 0; i < g->n_graphs; i++)
		cudaGraphExecDestroy(g->graphs[i].exec);
	free(g->graphs);
	for (int i = 0; i < g->n_allocs; i++)
		cudaFree(g->allocs[i]);
	free(g->allocs);
	free(g->h_topk);
	free(g->h_groups);
	if (g->vp_tab)
		cudaFree(g->vp_tab);
	if (g->h_in)
		cudaFreeHost(g->h_in);
	if (g->h_logits)
		cudaFreeHost(g->h_logits);
	if (g->blas)
		cublasDestroy(g->blas);
	if (g->stream)
		cudaStreamDestroy(g->stream);
	if (g->tp) {
		cuda_set_fatal(NULL, NULL);
		tp_detach(g->tp);
	}
	free(g->layers);
	free(g);
}

/* ---- a rank of several: memory preflight, the link to the others ---- */

static size_t view_bytes(const weight_view *v)
{
	if (!v->rows || !v->n_pieces)
		return 0; /* absent, or another rank's expert */
	int dt = dtype_of(v->pieces[0].dtype);
	size_t b = (size_t)v->rows * v->cols * dtype_bytes(dt < 0 ? DW_F32 : dt);
	if (dt == DW_F8)
		b += sizeof(float) * ((v->rows + 127) / 128) * ((v->cols + 127) / 128);
	return b;
}

/* The bytes this rank will ask cudaMalloc for, counted as dsv3-plan counts them (weights as
 * stored, the KV cache, the engine's scratch) but from this rank's own slices and heads. */
static size_t rank_bytes(const cuda_model *g, const Weights *w, size_t *weights, size_t *kv)
{
	const dsv3_config *c = &g->cf.c;
	size_t wrows = 0, wbf16 = 0;
	*weights = view_bytes(&w->embed) + view_bytes(&w->norm) + view_bytes(&w->head);
	for (int l = 0; l < c->n_layers; l++) {
		const LayerWeights *lw = &w->layers[l];
		const weight_view *v[] = { &lw->wq, &lw->wq_a, &lw->q_norm, &lw->wq_b, &lw->wkv_a, &lw->kv_norm,
					   &lw->wkv_b, &lw->wo, &lw->attn_norm, &lw->ffn_norm, &lw->w1, &lw->w2,
					   &lw->w3, &lw->gate, &lw->gate_bias };
		for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
			*weights += view_bytes(v[i]);
			wrows = (size_t)v[i]->rows > wrows ? (size_t)v[i]->rows : wrows;
			size_t b = (size_t)v[i]->rows * v[i]->cols * 2;
			wbf16 = b > wbf16 ? b : wbf16;
		}
		for (int e = g->e_lo; l >= c->n_dense_layers && e < g->e_lo + g->e_n; e++)
			*weights += view_bytes(&lw->ew1[e]) + view_bytes(&lw->ew2[e]) + view_bytes(&lw->ew3[e]);
	}
	size_t D = (size_t)c->kv_lora_rank + c->qk_rope_head_dim, H = (size_t)g->cf.n_local_heads;
	*kv = sizeof(float) * c->n_layers * (size_t)g->n_seqs * g->cf.max_seq_len * D;
	size_t T = (size_t)g->in_cap, kk = g->K > 0 ? (size_t)g->K : 1, MT = (size_t)g->max_tokens;
	size_t P = MT * kk > T ? MT * kk : T, E = c->n_routed_experts > 0 ? (size_t)c->n_routed_experts : 1;
	size_t hrows = P * g->hidden > T * kk * c->moe_inter_dim ? P * g->hidden : T * kk * c->moe_inter_dim;
	size_t qhd = (size_t)g->cf.q_head_dim, qa = c->q_lora_rank > 0 ? (size_t)c->q_lora_rank : 1;
	size_t floats = 3 * T * g->dim + T * qa + T * H * qhd + T * D + T * H * c->v_head_dim + 2 * hrows + T * E +
			T * kk * g->dim + T * g->vocab + T * kk + MT * (g->vocab_n + g->vocab) +
			MT * H * (D + g->cf.max_seq_len + 16 * (size_t)c->kv_lora_rank);
	size_t ints = T * kk + 4 + (T * kk / GEMV_MAX_TOKENS + E + P) * (2 + 2 * GEMV_MAX_TOKENS) + 3 * T;
	size_t widest = (size_t)g->dim > H * c->v_head_dim ? (size_t)g->dim : H * c->v_head_dim;
	widest = widest > (size_t)g->hidden ? widest : (size_t)g->hidden;
	return *weights + *kv + 4 * (floats + ints) + 2 * 2 * T * widest + 4 * 4 * T * wrows + 2 * wbf16;
}

/* Before any weight goes up: does this rank's share fit its GPU? (A rank that does not fit
 * says so in one line instead of failing half-way through the upload.) */
static int preflight_memory(cuda_model *g, const Weights *w, dsv3_error *err)
{
	size_t free_b = 0, total_b = 0, weights, kv, need = rank_bytes(g, w, &weights, &kv);
	const double GiB = 1024.0 * 1024.0 * 1024.0;
	CK(cudaMemGetInfo(&free_b, &total_b));
	if (need <= free_b)
		return 0;
	return dsv3_fail(err, DSV3_EUSAGE, "GPU %d: this rank needs %.2f GiB (weights %.2f, KV cache %.2f for %d "
			 "sequence(s) of %d tokens, scratch %.2f), %.2f GiB of %.2f are free: use more ranks or a "
			 "smaller --max-seq-len", tp_device(g->tp), need / GiB, weights / GiB, kv / GiB, g->n_seqs,
			 g->cf.max_seq_len, (need - weights - kv) / GiB, free_b / GiB, total_b / GiB);
}

static void abort_job(void *tp, int code) { tp_abort((tp_link *)tp, code); }

/* This rank's link to the others, its GPU current, the memory it needs there checked. */
static int attach_ranks(cuda_model *g, comm *c, const Weights *w, dsv3_error *err)
{
	if (comm_size(c) != g->world)
		return dsv3_fail(err, DSV3_EUSAGE, "cuda: the model is split for %d ranks, the comm has %d", g->world,
				 comm_size(c));
	int rc = tp_attach(&g->tp, c, err);
	if (rc)
		return rc;
	cuda_set_fatal(abort_job, g->tp); /* a CUDA error on this rank ends every rank */
	return preflight_memory(g, w, err);
}

extern "C" int cuda_model_open(cuda_model **out, const Config *cf, const Weights *w, int n_seqs, dsv3_error *err)
{
	return cuda_model_open_parallel(out, cf, w, n_seqs, NULL, err);
}

extern "C" int cuda_model_open_parallel(cuda_model **out, const Config *cf, const Weights *w, int n_seqs, comm *ranks,
					dsv3_error *err)
{
	const dsv3_config *c = &cf->c;
	cuda_model *g = (cuda_model *)calloc(1, sizeof *g);
	*out = NULL;
	if (!g)
		return dsv3_fail(err, DSV3_EIO, "out of host memory");
	g->cf = *cf;
	g->n_seqs = n_seqs;
	g->dim = c->dim;
	g->vocab = c->vocab_size;
	g->K = c->n_activated_experts;
	int sh = c->n_shared_experts * c->moe_inter_dim;
	g->hidden = c->inter_dim > sh ? c->inter_dim : sh;
	g->hidden = g->hidden > c->moe_inter_dim ? g->hidden : c->moe_inter_dim;
	g->max_tokens = GEMV_MAX_TOKENS;
	while (g->K > 0 && g->max_tokens * g->K > 256)
		g->max_tokens /= 2;
	g->in_cap = PREFILL_BLAS > g->max_tokens ? PREFILL_BLAS : g->max_tokens;
	const char *sync = getenv("DSV3_CUDA_SYNC");
	g->sync_each = sync && *sync == '1';
	const char *bm = getenv("DSV3_CUDA_BLAS_MIN"); /* experiments: where prompts go to cuBLAS */
	g->blas_min = bm ? atoi(bm) : PREFILL_BLAS_MIN;
	g->blas_min = g->blas_min > GEMV_MAX_TOKENS ? g->blas_min : GEMV_MAX_TOKENS + 1;
	const char *dp = getenv("DSV3_CUDA_GEMV_PARTS");
	g->debug_parts = dp ? atoi(dp) : 0;
	const char *ba = getenv("DSV3_CUDA_BF16_ACT");
	g->bf16_act = ba && *ba == '1';
	const char *prof = getenv("DSV3_CUDA_PROFILE");
	g->profile = prof && *prof == '1';
	g->world = cf->world > 1 ? cf->world : 1;
	g->rank = g->world > 1 ? cf->rank : 0;
	g->e_n = c->n_routed_experts / g->world;
	g->e_lo = g->rank * g->e_n;
	g->vocab_lo = g->world > 1 ? cf->vocab_lo : 0;
	g->vocab_n = g->world > 1 ? cf->vocab_n : g->vocab;
	cuda_where(-1, "setup");
	if (g->world > 1) {
		int rc = attach_ranks(g, ranks, w, err);
		if (rc) {
			cuda_model_close(g);
			return rc;
		}
	} else {
		CK(cudaSetDevice(0));
	}
	CK(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
	if (cublasCreate(&g->blas) != CUBLAS_STATUS_SUCCESS) {
		cuda_model_close(g);
		return dsv3_fail(err, DSV3_EIO, "cuBLAS: cublasCreate failed");
	}
	cublasSetStream(g->blas, g->stream);
	for (int i = 0; g->profile && i < MAX_MARKS; i++)
		CK(cudaEventCreate(&g->marks[i]));
	g->layers = (dlayer *)calloc(c->n_layers, sizeof(dlayer));
	int rc = upload(g, &g->embed, &w->embed, "embed", err);
	if (!rc)
		rc = upload(g, &g->norm, &w->norm, "norm", err);
	if (!rc)
		rc = upload(g, &g->head, &w->head, "head", err);
	for (int l = 0; !rc && l < c->n_layers; l++)
		rc = upload_layer(g, &g->layers[l], &w->layers[l], l, err);
	if (rc) {
		cuda_model_close(g);
		return rc;
	}
	size_t weights = g->bytes_allocated;
	state_alloc(g);
	CK(cudaDeviceSynchronize());
	/* What dsv3-plan's gpu_bytes_per_rank predicts: weights as stored, KV cache, scratch. */
	const char *mem = getenv("DSV3_CUDA_MEM");
	if (mem && *mem == '1')
		fprintf(stderr, "cuda: %zu bytes allocated (%zu weights, %zu state)\n",
			g->bytes_allocated, weights, g->bytes_allocated - weights);
	*out = g;
	return 0;
}
