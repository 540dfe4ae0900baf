/* DeepSeek-V3 on one GPU (DESIGN §5): the weights uploaded once in their stored format, the
 * compressed KV cache on the device, and the forward pass of model.c strung from kernels.cu.
 * run_tokens() is the whole pass over up to GEMV_MAX_TOKENS tokens, each of its own sequence
 * and position; a decode step is that pass captured once per (batch, context bucket) in a CUDA
 * graph and replayed, with the inputs and logits copied inside the graph: no allocation, no
 * host sync and no host round trip inside the step. Prefill runs the same pass over chunks of
 * one sequence's prompt, with cuBLAS for the matrices when a chunk is long. */
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

#define STAGES 8 /* decode profile: embed, attention, dense MLP, gate, experts, shared, head, copy */

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
	dweight embed, norm, head;
	dlayer *layers;
	void **allocs;
	int n_allocs, cap_allocs;
	cudaStream_t stream;
	cublasHandle_t blas;
	/* state */
	float *cache; /* [layer][seq][max_seq_len][lora + rope] */
	float *inv_freq;
	float *x, *xn, *q_a, *q, *kv, *attn, *h1, *h3, *gscore, *moe_y, *logits, *rw, *att;
	int *topk, *g_count, *g_exp, *g_cnt, *g_tok, *g_pair;
	int *d_in;        /* [3][max_tokens]: ids, seqs, pos */
	int *h_in;        /* pinned */
	float *h_logits;  /* pinned [max_tokens][vocab] */
	graph_entry *graphs;
	int n_graphs;
	int sync_each;    /* DSV3_CUDA_SYNC=1: no graphs, a sync after every op */
};

/* ---- device memory ---- */

static void *dalloc(cuda_model *g, size_t bytes, const char *what)
{
	void *p = NULL;
	cuda_where(-1, what);
	CK(cudaMalloc(&p, bytes ? bytes : 16));
	if (g->n_allocs == g->cap_allocs) {
		g->cap_allocs = g->cap_allocs ? 2 * g->cap_allocs : 256;
		g->allocs = (void **)realloc(g->allocs, sizeof(void *) * g->cap_allocs);
		if (!g->allocs) {
			fprintf(stderr, "dsv3: out of host memory\n");
			exit(3);
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
		snprintf(n, sizeof n, "layers.%d.ffn.experts.w1", l);
		if (!rc)
			rc = upload_experts(g, &d->ew1, lw->ew1, c->n_routed_experts, n, err);
		snprintf(n, sizeof n, "layers.%d.ffn.experts.w2", l);
		if (!rc)
			rc = upload_experts(g, &d->ew2, lw->ew2, c->n_routed_experts, n, err);
		snprintf(n, sizeof n, "layers.%d.ffn.experts.w3", l);
		if (!rc)
			rc = upload_experts(g, &d->ew3, lw->ew3, c->n_routed_experts, n, err);
	}
#undef UP
	return rc;
}

/* ---- state ---- */

static void state_alloc(cuda_model *g)
{
	const dsv3_config *c = &g->cf.c;
	size_t T = (size_t)g->max_tokens, P = T * (g->K > 0 ? g->K : 1);
	size_t D = (size_t)c->kv_lora_rank + c->qk_rope_head_dim;
	size_t H = (size_t)c->n_heads;
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
	g->h1 = (float *)dalloc(g, sizeof(float) * P * g->hidden, "h1");
	g->h3 = (float *)dalloc(g, sizeof(float) * P * g->hidden, "h3");
	g->gscore = (float *)dalloc(g, sizeof(float) * T * (c->n_routed_experts > 0 ? c->n_routed_experts : 1), "gate scores");
	g->moe_y = (float *)dalloc(g, sizeof(float) * P * g->dim, "expert outputs");
	g->logits = (float *)dalloc(g, sizeof(float) * T * g->vocab, "logits");
	g->rw = (float *)dalloc(g, sizeof(float) * P, "route weights");
	g->topk = (int *)dalloc(g, sizeof(int) * P, "topk");
	g->g_count = (int *)dalloc(g, sizeof(int) * (4 + P * (2 + 2 * GEMV_MAX_TOKENS)), "groups");
	g->g_exp = g->g_count + 4;
	g->g_cnt = g->g_exp + P;
	g->g_tok = g->g_cnt + P;
	g->g_pair = g->g_tok + P * GEMV_MAX_TOKENS;
	float *dummy;
	size_t att = mla_scratch_floats((int)H, c->kv_lora_rank, c->qk_rope_head_dim, (int)T, g->cf.max_seq_len,
					&dummy, &dummy, &dummy, NULL);
	g->att = (float *)dalloc(g, sizeof(float) * att, "attention scratch");
	g->d_in = (int *)dalloc(g, sizeof(int) * 3 * T, "inputs");
	CK(cudaMallocHost(&g->h_in, sizeof(int) * 3 * T));
	CK(cudaMallocHost(&g->h_logits, sizeof(float) * T * g->vocab));
}

/* ---- the forward pass ---- */

static void sync_point(cuda_model *g, int layer, const char *what)
{
	if (!g->sync_each)
		return;
	cuda_where(layer, what);
	CK(cudaStreamSynchronize(g->stream));
}

static void linear(cuda_model *g, const dweight *w, const float *x, int ldx, float *y, int ldy, int n, int acc,
		   int layer, const char *what)
{
	cuda_where(layer, what);
	gemv_call c = {};
	c.w = w;
	c.x = x;
	c.ldx = ldx;
	c.y = y;
	c.ldy = ldy;
	c.n = n;
	c.accumulate = acc;
	k_gemv(g->stream, &c);
	sync_point(g, layer, what);
}

/* y1 = W1 x, y3 = W3 x in one launch. */
static void linear_pair(cuda_model *g, const dweight *w1, const dweight *w3, const float *x, int ldx, float *y1,
			float *y3, int ldy, int ldy3, int n, int layer, const char *what)
{
	cuda_where(layer, what);
	gemv_call c = {};
	c.w = w1;
	c.w2 = w3;
	c.x = x;
	c.ldx = ldx;
	c.y = y1;
	c.y2 = y3;
	c.ldy = ldy;
	c.ldy2 = ldy3;
	c.n = n;
	k_gemv(g->stream, &c);
	sync_point(g, layer, what);
}

/* x += w2(silu(w1 xn) * w3 xn) for n tokens. */
static void mlp(cuda_model *g, const dlayer *d, int n, int layer)
{
	int inter = d->w1.rows;
	linear_pair(g, &d->w1, &d->w3, g->xn, g->dim, g->h1, g->h3, inter, inter, n, layer, "mlp.w1/w3");
	cuda_where(layer, "mlp.w2");
	gemv_call c = {};
	c.w = &d->w2;
	c.x = g->h1;
	c.silu_b = g->h3;
	c.ldx = inter;
	c.y = g->x;
	c.ldy = g->dim;
	c.n = n;
	c.accumulate = 1;
	k_gemv(g->stream, &c);
	sync_point(g, layer, "mlp.w2");
}

static void moe(cuda_model *g, const dlayer *d, int n, int layer)
{
	const dsv3_config *c = &g->cf.c;
	int E = c->n_routed_experts, K = c->n_activated_experts, inter = d->ew1.rows;
	linear(g, &d->gate, g->xn, g->dim, g->gscore, E, n, 0, layer, "ffn.gate");
	route_args ra = { E, K, c->n_expert_groups > 0 ? c->n_expert_groups : 1, c->n_limited_groups,
			  c->score_sigmoid, (float)c->route_scale, d->has_bias ? &d->gate_bias : NULL };
	cuda_where(layer, "ffn.gate (routing)");
	k_route(g->stream, &ra, g->gscore, n, g->topk, g->rw);
	k_moe_groups(g->stream, g->topk, n, K, g->g_count, g->g_exp, g->g_cnt, g->g_tok, g->g_pair);
	sync_point(g, layer, "ffn.gate (routing)");

	int max_groups = n * K < E ? n * K : E;
	gemv_groups in_tok = { g->g_count, g->g_exp, g->g_cnt, g->g_tok, g->g_pair, max_groups };
	gemv_groups in_pair = { g->g_count, g->g_exp, g->g_cnt, g->g_pair, g->g_pair, max_groups };
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
	gemv_call c2 = {};
	c2.w = &d->ew2;
	c2.x = g->h1;
	c2.silu_b = g->h3;
	c2.ldx = inter;
	c2.y = g->moe_y;
	c2.ldy = g->dim;
	c2.n = n;
	c2.groups = &in_pair;
	k_gemv(g->stream, &c2);
	sync_point(g, layer, "ffn.experts.w2");
	if (c->n_shared_experts > 0)
		mlp(g, d, n, layer);
	cuda_where(layer, "ffn (combine)");
	k_moe_combine(g->stream, g->x, g->moe_y, g->rw, n, K, g->dim);
	sync_point(g, layer, "ffn (combine)");
}

static void attention(cuda_model *g, const dlayer *d, int n, int cap, int layer)
{
	const Config *cf = &g->cf;
	const dsv3_config *c = &cf->c;
	int H = c->n_heads, lora = c->kv_lora_rank, rope = c->qk_rope_head_dim, D = lora + rope;
	const int *seqs = g->d_in + g->max_tokens, *pos = g->d_in + 2 * g->max_tokens;
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
	mla_cache cache = { g->cache + (size_t)layer * g->n_seqs * cf->max_seq_len * D, cf->max_seq_len };
	cuda_where(layer, "attn.kv_norm (rope, cache)");
	k_rope_kv(g->stream, g->q, g->kv, &d->kv_norm, cache, seqs, pos, n, H, c->qk_nope_head_dim, rope, lora,
		  g->inv_freq, cf->eps);
	mla_args a = {};
	a.H = H, a.nope = c->qk_nope_head_dim, a.rope = rope, a.v = c->v_head_dim, a.lora = lora;
	a.softmax_scale = cf->softmax_scale;
	a.wkv_b = d->wkv_b;
	a.cache = cache;
	a.seqs = seqs, a.pos = pos, a.n = n, a.ctx_cap = cap;
	mla_scratch_floats(H, lora, rope, n, cap, &a.qc, &a.scores, &a.partial, g->att);
	cuda_where(layer, "attn (MLA over the cache, wkv_b)");
	k_mla_attention(g->stream, &a, g->q, g->attn);
	sync_point(g, layer, "attn");
	linear(g, &d->wo, g->attn, H * c->v_head_dim, g->x, g->dim, n, 1, layer, "attn.wo");
}

/* The pass over n tokens whose ids, sequences and positions are in d_in; cap bounds every
 * position + 1. Logits of the tokens from `head_from` on go to logits. */
static void run_tokens(cuda_model *g, int n, int cap, int head_from)
{
	const Config *cf = &g->cf;
	const dsv3_config *c = &cf->c;
	cuda_where(-1, "embed");
	k_embed(g->stream, g->x, &g->embed, g->d_in, n);
	for (int l = 0; l < c->n_layers; l++) {
		const dlayer *d = &g->layers[l];
		cuda_where(l, "attn_norm");
		k_rmsnorm(g->stream, g->xn, g->x, g->dim, &d->attn_norm, g->dim, n, cf->eps);
		attention(g, d, n, cap, l);
		cuda_where(l, "ffn_norm");
		k_rmsnorm(g->stream, g->xn, g->x, g->dim, &d->ffn_norm, g->dim, n, cf->eps);
		if (l < c->n_dense_layers)
			mlp(g, d, n, l);
		else
			moe(g, d, n, l);
	}
	if (head_from >= n)
		return;
	cuda_where(-1, "norm");
	int nh = n - head_from;
	k_rmsnorm(g->stream, g->xn, g->x + (size_t)head_from * g->dim, g->dim, &g->norm, g->dim, nh, cf->eps);
	linear(g, &g->head, g->xn, g->dim, g->logits, g->vocab, nh, 0, -1, "head");
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
	int T = g->max_tokens;
	for (int k = 0; k < 3; k++)
		CK(cudaMemcpyAsync(g->d_in + k * T, g->h_in + k * T, sizeof(int) * n, cudaMemcpyHostToDevice, g->stream));
	run_tokens(g, n, cap, 0);
	CK(cudaMemcpyAsync(g->h_logits, g->logits, sizeof(float) * n * g->vocab, cudaMemcpyDeviceToHost, g->stream));
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
	int T = g->max_tokens;
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
	if (g->sync_each) {
		step_body(g, n, cap);
	} else {
		cudaGraphExec_t exec = step_graph(g, n, cap);
		cuda_where(-1, "decode step (graph replay)");
		CK(cudaGraphLaunch(exec, g->stream));
	}
	cuda_where(-1, "decode step");
	CK(cudaStreamSynchronize(g->stream));
	memcpy(logits, g->h_logits, sizeof(float) * n * g->vocab);
}

extern "C" void cuda_forward_batch(cuda_model *g, int n, const int *seqs, const int *tokens, const int *pos,
				   float *logits)
{
	for (int i = 0; i < n; i += g->max_tokens) {
		int m = n - i < g->max_tokens ? n - i : g->max_tokens;
		decode_step(g, m, seqs + i, tokens + i, pos + i, logits + (size_t)i * g->vocab);
	}
}

extern "C" void cuda_forward_prompt(cuda_model *g, int seq, const int *tokens, int n, int pos, float *logits)
{
	int seqs[GEMV_MAX_TOKENS], ps[GEMV_MAX_TOKENS];
	for (int done = 0; done < n;) {
		int m = n - done < g->max_tokens ? n - done : g->max_tokens;
		for (int i = 0; i < m; i++)
			seqs[i] = seq, ps[i] = pos + done + i;
		set_inputs(g, m, tokens + done, seqs, ps);
		int T = g->max_tokens;
		for (int k = 0; k < 3; k++)
			CK(cudaMemcpyAsync(g->d_in + k * T, g->h_in + k * T, sizeof(int) * m, cudaMemcpyHostToDevice,
					   g->stream));
		done += m;
		int last = done == n && logits;
		run_tokens(g, m, ctx_bucket(g, pos + done), last ? m - 1 : m);
		if (last)
			CK(cudaMemcpyAsync(g->h_logits, g->logits, sizeof(float) * g->vocab, cudaMemcpyDeviceToHost,
					   g->stream));
		cuda_where(-1, "prefill");
		CK(cudaStreamSynchronize(g->stream)); /* h_in is reused by the next chunk */
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
	for (int i = 0; i < g->n_graphs; i++)
		cudaGraphExecDestroy(g->graphs[i].exec);
	free(g->graphs);
	for (int i = 0; i < g->n_allocs; i++)
		cudaFree(g->allocs[i]);
	free(g->allocs);
	if (g->h_in)
		cudaFreeHost(g->h_in);
	if (g->h_logits)
		cudaFreeHost(g->h_logits);
	if (g->blas)
		cublasDestroy(g->blas);
	if (g->stream)
		cudaStreamDestroy(g->stream);
	free(g->layers);
	free(g);
}

extern "C" int cuda_model_open(cuda_model **out, const Config *cf, const Weights *w, int n_seqs, dsv3_error *err)
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
	const char *sync = getenv("DSV3_CUDA_SYNC");
	g->sync_each = sync && *sync == '1';
	cuda_where(-1, "setup");
	CK(cudaSetDevice(0));
	CK(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
	if (cublasCreate(&g->blas) != CUBLAS_STATUS_SUCCESS) {
		cuda_model_close(g);
		return dsv3_fail(err, DSV3_EIO, "cuBLAS: cublasCreate failed");
	}
	cublasSetStream(g->blas, g->stream);
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
	state_alloc(g);
	CK(cudaDeviceSynchronize());
	*out = g;
	return 0;
}
