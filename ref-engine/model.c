/* DeepSeek-V3 / V2 forward pass on the CPU, one token of one sequence at a time, exactly
 * DESIGN §4 (the official model.py's semantics; its names: MLA, Gate, MoE, MLP, Block).
 * Read top to bottom: config, state, then RMSNorm -> MLA -> MoE/MLP per block, then the head. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "cuda_model.h"
#include "model_load.h"
#include "parallel.h"

/* ---- derived numbers ---- */

float model_softmax_scale(const dsv3_config *c, int max_seq_len)
{
	float scale = 1.0f / sqrtf((float)(c->qk_nope_head_dim + c->qk_rope_head_dim));
	if (max_seq_len > c->original_seq_len && c->rope_factor > 1.0) {
		float m = 0.1f * (float)c->mscale * logf((float)c->rope_factor) + 1.0f;
		scale *= m * m;
	}
	return scale;
}

/* YaRN's correction dim: the rotary index whose wavelength fits `rotations` times in L0. */
static float correction_dim(float rotations, int d, float theta, int l0)
{
	return (float)d * logf((float)l0 / (rotations * 2.0f * (float)M_PI)) / (2.0f * logf(theta));
}

void model_rope_freqs(float *inv_freq, const dsv3_config *c, int max_seq_len)
{
	int d = c->qk_rope_head_dim;
	float theta = (float)c->rope_theta;
	for (int i = 0; i < d / 2; i++)
		inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)d);
	if (max_seq_len <= c->original_seq_len)
		return;
	float low = floorf(correction_dim((float)c->beta_fast, d, theta, c->original_seq_len));
	float high = ceilf(correction_dim((float)c->beta_slow, d, theta, c->original_seq_len));
	if (low < 0.0f)
		low = 0.0f;
	if (high > (float)(d - 1))
		high = (float)(d - 1);
	if (low == high)
		high += 0.001f;
	for (int i = 0; i < d / 2; i++) {
		float ramp = ((float)i - low) / (high - low);
		ramp = ramp < 0.0f ? 0.0f : ramp > 1.0f ? 1.0f : ramp;
		inv_freq[i] = inv_freq[i] / (float)c->rope_factor * ramp + inv_freq[i] * (1.0f - ramp);
	}
}

/* ---- state ---- */

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int chunk_alloc(RunState *s, const Config *cf, int hidden)
{
	const dsv3_config *c = &cf->c;
	size_t B = PREFILL_CHUNK, dim = (size_t)c->dim, K = (size_t)(c->n_activated_experts > 0 ? c->n_activated_experts : 1);
	size_t qa = (size_t)(c->q_lora_rank > 0 ? c->q_lora_rank : 1);
	size_t q = (size_t)c->n_heads * cf->q_head_dim, kv = (size_t)(c->kv_lora_rank + c->qk_rope_head_dim);
	size_t att = (size_t)c->n_heads * c->v_head_dim, half = (size_t)c->qk_rope_head_dim / 2;
	size_t total = B * (6 * dim + qa + q + kv + att + 2 * (size_t)hidden + 2 * half + K);
	float *f = calloc(total, sizeof(float));
	s->chunk.topk = calloc(B * (K + 1), sizeof(int));
	if (!f || !s->chunk.topk) {
		free(f);
		return -1;
	}
	s->chunk.x = f;
	s->chunk.xn = s->chunk.x + B * dim;
	s->chunk.tmp = s->chunk.xn + B * dim;
	s->chunk.moe_out = s->chunk.tmp + B * dim;
	s->chunk.gx = s->chunk.moe_out + B * dim;
	s->chunk.gout = s->chunk.gx + B * dim;
	s->chunk.q_a = s->chunk.gout + B * dim;
	s->chunk.q = s->chunk.q_a + B * qa;
	s->chunk.kv = s->chunk.q + B * q;
	s->chunk.attn_out = s->chunk.kv + B * kv;
	s->chunk.h1 = s->chunk.attn_out + B * att;
	s->chunk.h3 = s->chunk.h1 + B * hidden;
	s->chunk.cos_a = s->chunk.h3 + B * hidden;
	s->chunk.sin_a = s->chunk.cos_a + B * half;
	s->chunk.weights = s->chunk.sin_a + B * half;
	s->chunk.rows = s->chunk.topk + B * K;
	return 0;
}

static int state_alloc(RunState *s, const Config *cf, int n_seqs)
{
	const dsv3_config *c = &cf->c;
	int H = c->n_heads, lora = c->kv_lora_rank, rope = c->qk_rope_head_dim;
	int hidden = max3(c->inter_dim, c->n_shared_experts * c->moe_inter_dim, c->moe_inter_dim);
	size_t cache_rows = (size_t)n_seqs * c->n_layers * cf->max_seq_len;
	int experts = c->n_routed_experts > 0 ? c->n_routed_experts : 1;
	s->n_seqs = n_seqs;
	s->x = calloc((size_t)c->dim * 4, sizeof(float));
	s->xn = s->x + c->dim;
	s->tmp = s->xn + c->dim;
	s->moe_out = s->tmp + c->dim;
	s->q_a = calloc((size_t)(c->q_lora_rank > 0 ? c->q_lora_rank : 1), sizeof(float));
	s->q = calloc((size_t)H * cf->q_head_dim, sizeof(float));
	s->kv = calloc((size_t)(lora + rope), sizeof(float));
	s->attn_out = calloc((size_t)H * c->v_head_dim, sizeof(float));
	s->h1 = calloc((size_t)hidden * 2, sizeof(float));
	s->h3 = s->h1 + hidden;
	s->scores = calloc((size_t)experts * 3 + (size_t)c->n_expert_groups + 1, sizeof(float));
	s->scores0 = s->scores + experts;
	s->bias = s->scores0 + experts;
	s->group_score = s->bias + experts;
	s->topk = calloc((size_t)(c->n_activated_experts > 0 ? c->n_activated_experts : 1), sizeof(int));
	s->att_scratch = calloc((size_t)H * (2 * (size_t)lora + cf->max_seq_len), sizeof(float));
	s->rope_cos = calloc((size_t)rope * 2, sizeof(float));
	s->rope_sin = s->rope_cos + rope / 2;
	s->inv_freq = s->rope_sin + rope / 2;
	s->cache_c = calloc(cache_rows * lora, sizeof(float));
	s->cache_pe = calloc(cache_rows * rope, sizeof(float));
	s->logits = calloc((size_t)c->vocab_size, sizeof(float));
	s->logits_local = cf->world > 1 ? calloc((size_t)cf->vocab_n, sizeof(float)) : s->logits;
	if (chunk_alloc(s, cf, hidden) || !s->logits_local)
		return -1;
	if (!s->x || !s->q_a || !s->q || !s->kv || !s->attn_out || !s->h1 || !s->scores ||
	    !s->topk || !s->att_scratch || !s->rope_cos || !s->cache_c || !s->cache_pe || !s->logits)
		return -1;
	model_rope_freqs(s->inv_freq, c, cf->max_seq_len);
	return 0;
}

static void state_free(RunState *s)
{
	free(s->x);
	free(s->q_a);
	free(s->q);
	free(s->kv);
	free(s->attn_out);
	free(s->h1);
	free(s->scores);
	free(s->topk);
	free(s->att_scratch);
	free(s->rope_cos);
	free(s->cache_c);
	free(s->cache_pe);
	if (s->logits_local != s->logits)
		free(s->logits_local);
	free(s->logits);
	free(s->chunk.x);
	free(s->chunk.topk);
	memset(s, 0, sizeof *s);
}

/* The limits of this engine's gate (fixed-size scratch) and of the model's own arithmetic. */
static int check_config(const dsv3_config *c, const char *path, dsv3_error *err)
{
	int E = c->n_routed_experts, G = c->n_expert_groups > 0 ? c->n_expert_groups : 1;
	if (c->qk_rope_head_dim % 2)
		return dsv3_fail(err, DSV3_EDATA, "%s: qk_rope_head_dim %d must be even", path,
				 c->qk_rope_head_dim);
	if (c->n_dense_layers >= c->n_layers)
		return 0; /* no MoE layer */
	if (E < 1 || E > 1024 || E % G)
		return dsv3_fail(err, DSV3_EDATA, "%s: n_routed_experts %d: the engine runs 1..1024, "
				 "a multiple of n_group %d", path, E, G);
	if (c->n_limited_groups < 1 || c->n_limited_groups > G)
		return dsv3_fail(err, DSV3_EDATA, "%s: topk_group %d outside 1..n_group %d", path,
				 c->n_limited_groups, G);
	if (c->n_activated_experts < 1 || c->n_activated_experts > 256 ||
	    c->n_activated_experts > E / G * c->n_limited_groups)
		return dsv3_fail(err, DSV3_EDATA, "%s: num_experts_per_tok %d: want 1..256 and at most "
				 "the experts of topk_group groups (%d)", path, c->n_activated_experts,
				 E / G * c->n_limited_groups);
	return 0;
}

int model_open(Model *m, const char *dir, int max_seq_len, int n_seqs, int n_threads,
	       dsv3_error *err)
{
	return model_open_config(m, dir, NULL, max_seq_len, n_seqs, n_threads, err);
}

int model_open_config(Model *m, const char *dir, const char *config_path, int max_seq_len,
		      int n_seqs, int n_threads, dsv3_error *err)
{
	return model_open_device(m, dir, config_path, max_seq_len, n_seqs, n_threads, MODEL_DEVICE_CPU, err);
}

int model_device_parse(const char *name, model_device *out, dsv3_error *err)
{
	if (!strcmp(name, "cpu"))
		*out = MODEL_DEVICE_CPU;
	else if (!strcmp(name, "cuda"))
		*out = MODEL_DEVICE_CUDA;
	else if (!strcmp(name, "auto"))
		*out = MODEL_DEVICE_AUTO;
	else
		return dsv3_fail(err, DSV3_EUSAGE, "--device: unknown device '%s' (cpu, cuda or auto)", name);
	return DSV3_OK;
}

const char *model_device_name(model_device d)
{
	return d == MODEL_DEVICE_CUDA ? "cuda" : d == MODEL_DEVICE_CPU ? "cpu" : "auto";
}

int model_open_device(Model *m, const char *dir, const char *config_path, int max_seq_len,
		      int n_seqs, int n_threads, model_device device, dsv3_error *err)
{
	return model_open_parallel(m, dir, config_path, max_seq_len, n_seqs, n_threads, device,
				   NULL, err);
}

/* This rank's share of DESIGN §3.3's split (parallel_preflight checks that it divides). */
static void set_ranks(Config *cf, const comm *c)
{
	cf->rank = comm_rank(c);
	cf->world = comm_size(c);
	cf->n_local_heads = cf->c.n_heads / cf->world;
	cf->vocab_n = cf->c.vocab_size / cf->world;
	cf->vocab_lo = cf->rank * cf->vocab_n;
}

int model_open_parallel(Model *m, const char *dir, const char *config_path, int max_seq_len,
			int n_seqs, int n_threads, model_device device, comm *c, dsv3_error *err)
{
	char path[4096];
	int rc;
	memset(m, 0, sizeof *m);
	snprintf(path, sizeof path, "%s", config_path ? config_path : "");
	if (!config_path)
		snprintf(path, sizeof path, "%s/config.json", dir);
	if ((rc = config_load(&m->config.c, path, err)))
		return rc;
	Config *cf = &m->config;
	cf->max_seq_len = max_seq_len > 0 ? max_seq_len : MODEL_DEFAULT_MAX_SEQ_LEN;
	cf->q_head_dim = cf->c.qk_nope_head_dim + cf->c.qk_rope_head_dim;
	cf->softmax_scale = model_softmax_scale(&cf->c, cf->max_seq_len);
	cf->eps = 1e-6f;
	if (n_seqs < 1)
		return dsv3_fail(err, DSV3_EUSAGE, "model_open: n_seqs %d < 1", n_seqs);
	if ((rc = check_config(&cf->c, path, err)))
		return rc;
	set_ranks(cf, c);
	m->comm = cf->world > 1 ? c : NULL;
	/* Every check that can fail on one rank comes before the first collective: a rank that
	 * fails ends the job (comm_fail) instead of leaving the others waiting. */
	if (m->comm && (rc = parallel_preflight(c, dir, &cf->c, err)))
		return rc;
	/* Several ranks: GPU ranks when asked for, or when the ranks are GPU threads (an NCCL
	 * comm); CPU ranks (mpirun) otherwise. */
	if (m->comm && device == MODEL_DEVICE_AUTO)
		device = c->kind && !strcmp(c->kind, "nccl") ? MODEL_DEVICE_CUDA : MODEL_DEVICE_CPU;
	rc = m->comm ? weights_load_rank(&m->weights, &cf->c, dir, cf->rank, err)
		     : weights_load(&m->weights, &cf->c, dir, err);
	if (!rc && m->comm && weights_mp(&m->weights) != cf->world)
		rc = dsv3_fail(err, DSV3_EUSAGE, "%s holds shards for %d ranks, the job has %d",
			       dir, weights_mp(&m->weights), cf->world);
	if (rc) {
		model_close(m);
		return rc;
	}
	m->pool = thread_pool_create(n_threads);
	m->batch_logits = calloc((size_t)n_seqs * cf->c.vocab_size, sizeof(float));
	if (!m->pool || !m->batch_logits || state_alloc(&m->state, cf, n_seqs)) {
		model_close(m);
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory for the state (max_seq_len %d)",
				 dir, cf->max_seq_len);
	}
	if (device == MODEL_DEVICE_AUTO)
		device = cuda_model_available(NULL, 0) ? MODEL_DEVICE_CUDA : MODEL_DEVICE_CPU;
	m->device = device;
	if (device == MODEL_DEVICE_CUDA) {
		char why[256];
		if (!cuda_model_available(why, sizeof why)) {
			model_close(m);
			return dsv3_fail(err, DSV3_EUSAGE, "--device cuda: %s", why);
		}
		if ((rc = cuda_model_open_parallel(&m->gpu, cf, &m->weights, n_seqs, m->comm, err))) {
			model_close(m);
			return rc;
		}
	}
	return 0;
}

void model_close(Model *m)
{
	if (m->gpu)
		cuda_model_close(m->gpu);
	m->gpu = NULL;
	free(m->batch_logits);
	m->batch_logits = NULL;
	weights_free(&m->weights, &m->config.c);
	state_free(&m->state);
	if (m->pool)
		thread_pool_destroy(m->pool);
	m->pool = NULL;
}

/* ---- the blocks ---- */

static float *cache_row(float *cache, const Config *cf, int width, int seq, int layer, int pos)
{
	size_t row = ((size_t)seq * cf->c.n_layers + layer) * cf->max_seq_len + pos;
	return cache + row * width;
}

/* MLA: queries, the new cache entry (c, k_pe), absorbed attention over the cache, wo. */
static void mla(Model *m, const LayerWeights *lw, int layer, int seq, int pos, float *out)
{
	const Config *cf = &m->config;
	const dsv3_config *c = &cf->c;
	RunState *s = &m->state;
	int lora = c->kv_lora_rank, rope = c->qk_rope_head_dim, nope = c->qk_nope_head_dim;

	if (c->q_lora_rank > 0) {
		op_matvec(m->pool, s->q_a, &lw->wq_a, s->xn);
		op_rmsnorm(s->q_a, s->q_a, &lw->q_norm, c->q_lora_rank, cf->eps);
		op_matvec(m->pool, s->q, &lw->wq_b, s->q_a);
	} else {
		op_matvec(m->pool, s->q, &lw->wq, s->xn);
	}
	for (int h = 0; h < cf->n_local_heads; h++)
		op_rope(s->q + (size_t)h * cf->q_head_dim + nope, rope, s->rope_cos, s->rope_sin);

	op_matvec(m->pool, s->kv, &lw->wkv_a, s->xn);
	float *c_new = cache_row(s->cache_c, cf, lora, seq, layer, pos);
	float *pe_new = cache_row(s->cache_pe, cf, rope, seq, layer, pos);
	op_rmsnorm(c_new, s->kv, &lw->kv_norm, lora, cf->eps);
	memcpy(pe_new, s->kv + lora, sizeof(float) * rope);
	op_rope(pe_new, rope, s->rope_cos, s->rope_sin);

	mla_dims d = { cf->n_local_heads, nope, rope, c->v_head_dim, lora, cf->softmax_scale };
	op_mla_attention(m->pool, s->attn_out, s->q, &lw->wkv_b,
			 cache_row(s->cache_c, cf, lora, seq, layer, 0),
			 cache_row(s->cache_pe, cf, rope, seq, layer, 0), pos + 1, &d, s->att_scratch);
	op_matvec(m->pool, out, &lw->wo, s->attn_out);
	comm_allreduce_sum(m->comm, out, (size_t)c->dim); /* wo is split by its input columns */
}

/* MLP: w2(silu(w1 x) * w3 x). */
static void mlp(Model *m, const weight_view *w1, const weight_view *w2, const weight_view *w3,
		const float *x, float *out)
{
	RunState *s = &m->state;
	op_matvec(m->pool, s->h1, w1, x);
	op_matvec(m->pool, s->h3, w3, x);
	op_silu_mul(s->h1, s->h3, w1->rows);
	op_matvec(m->pool, out, w2, s->h1);
}

/* Index of the largest of x[0:n] not yet taken (ties: the lower index, as torch.topk on CPU). */
static int argmax_free(const float *x, int n, const unsigned char *taken)
{
	int best = -1;
	for (int i = 0; i < n; i++)
		if (!taken[i] && (best < 0 || x[i] > x[best]))
			best = i;
	return best;
}

/* Gate: scores, bias, group limit, top-k; weights from the unbiased scores. */
static void gate(Model *m, const LayerWeights *lw, const float *x, int *topk, float *weights)
{
	const dsv3_config *c = &m->config.c;
	RunState *s = &m->state;
	int E = c->n_routed_experts, G = c->n_expert_groups > 0 ? c->n_expert_groups : 1;
	int per = E / G, has_bias = lw->gate_bias.rows > 0;
	unsigned char taken[1024];

	op_matvec(m->pool, s->scores, &lw->gate, x);
	if (c->score_sigmoid)
		for (int e = 0; e < E; e++)
			s->scores[e] = 1.0f / (1.0f + expf(-s->scores[e]));
	else
		op_softmax(s->scores, E);
	memcpy(s->scores0, s->scores, sizeof(float) * E);
	if (has_bias) {
		op_weight_row(s->bias, &lw->gate_bias, 0);
		op_add_scaled(s->scores, s->bias, 1.0f, E);
	}
	if (G > 1) {
		for (int g = 0; g < G; g++) {
			memset(taken, 0, (size_t)per);
			int a = argmax_free(s->scores + g * per, per, taken);
			float v = s->scores[g * per + a];
			if (has_bias && per > 1) {
				taken[a] = 1;
				v += s->scores[g * per + argmax_free(s->scores + g * per, per, taken)];
			}
			s->group_score[g] = v;
		}
		memset(taken, 0, (size_t)G);
		for (int k = 0; k < c->n_limited_groups; k++)
			taken[argmax_free(s->group_score, G, taken)] = 1;
		for (int g = 0; g < G; g++)
			if (!taken[g])
				for (int e = 0; e < per; e++)
					s->scores[g * per + e] = -INFINITY;
	}
	memset(taken, 0, (size_t)E);
	for (int k = 0; k < c->n_activated_experts; k++)
		taken[argmax_free(s->scores, E, taken)] = 1;
	float sum = 0.0f;
	int k = 0;
	for (int e = 0; e < E; e++) /* expert order, as model.py's loop over experts */
		if (taken[e]) {
			topk[k] = e;
			weights[k] = s->scores0[e];
			sum += weights[k++];
		}
	for (k = 0; k < c->n_activated_experts; k++)
		weights[k] = (c->score_sigmoid ? weights[k] / sum : weights[k]) * (float)c->route_scale;
}

/* MoE: sum_k w_k expert_k(x) + shared_experts(x), into out. */
static void moe(Model *m, const LayerWeights *lw, float *out)
{
	const dsv3_config *c = &m->config.c;
	RunState *s = &m->state;
	float weights[256];

	gate(m, lw, s->xn, s->topk, weights);
	memset(s->moe_out, 0, sizeof(float) * c->dim);
	for (int k = 0; k < c->n_activated_experts; k++) {
		int e = s->topk[k];
		if (!lw->ew1[e].rows)
			continue; /* another rank's expert */
		mlp(m, &lw->ew1[e], &lw->ew2[e], &lw->ew3[e], s->xn, out);
		op_add_scaled(s->moe_out, out, weights[k], c->dim);
	}
	mlp(m, &lw->w1, &lw->w2, &lw->w3, s->xn, out);
	for (int i = 0; i < c->dim; i++)
		out[i] = s->moe_out[i] + out[i];
	/* this rank's experts plus its slice of the shared experts: one sum over the ranks */
	comm_allreduce_sum(m->comm, out, (size_t)c->dim);
}

/* ---- forward ---- */

/* The embedding rows of tokens[0:n] into x [n, dim], vocab-parallel: this rank's rows of the
 * vocabulary, zeros for tokens another rank holds, summed over the ranks. */
static void embed(Model *m, float *x, const int *tokens, int n)
{
	const Config *cf = &m->config;
	int dim = cf->c.dim;
	for (int b = 0; b < n; b++) {
		int t = tokens[b] - cf->vocab_lo;
		if (t >= 0 && t < cf->vocab_n)
			op_weight_row(x + (size_t)b * dim, &m->weights.embed, t);
		else
			memset(x + (size_t)b * dim, 0, sizeof(float) * dim);
	}
	comm_allreduce_sum(m->comm, x, (size_t)n * dim);
}

/* The head over the final hidden state x: this rank's rows of the vocabulary, gathered. */
static float *head(Model *m, const float *x)
{
	RunState *s = &m->state;
	op_matvec(m->pool, s->logits_local, &m->weights.head, x);
	comm_allgather(m->comm, s->logits_local, (size_t)m->config.vocab_n, s->logits);
	return s->logits;
}

/* The blocks over one token: the residual stream s->x after the last layer, the cache filled. */
static void forward_blocks(Model *m, int seq, int token, int pos)
{
	const Config *cf = &m->config;
	const dsv3_config *c = &cf->c;
	RunState *s = &m->state;
	const Weights *w = &m->weights;

	embed(m, s->x, &token, 1);
	for (int i = 0; i < c->qk_rope_head_dim / 2; i++) {
		float angle = (float)pos * s->inv_freq[i];
		s->rope_cos[i] = cosf(angle);
		s->rope_sin[i] = sinf(angle);
	}
	for (int l = 0; l < c->n_layers; l++) {
		const LayerWeights *lw = &w->layers[l];
		op_rmsnorm(s->xn, s->x, &lw->attn_norm, c->dim, cf->eps);
		mla(m, lw, l, seq, pos, s->tmp);
		op_add_scaled(s->x, s->tmp, 1.0f, c->dim);
		op_rmsnorm(s->xn, s->x, &lw->ffn_norm, c->dim, cf->eps);
		if (l < c->n_dense_layers) {
			mlp(m, &lw->w1, &lw->w2, &lw->w3, s->xn, s->tmp);
			comm_allreduce_sum(m->comm, s->tmp, (size_t)c->dim);
		} else {
			moe(m, lw, s->tmp);
		}
		op_add_scaled(s->x, s->tmp, 1.0f, c->dim);
	}
}

void forward_no_logits(Model *m, int seq, int token, int pos)
{
	if (m->gpu) {
		cuda_forward_prompt(m->gpu, seq, &token, 1, pos, NULL);
		return;
	}
	forward_blocks(m, seq, token, pos);
}

float *forward(Model *m, int seq, int token, int pos)
{
	RunState *s = &m->state;
	if (m->gpu)
		return cuda_forward_batch(m->gpu, 1, &seq, &token, &pos, s->logits);
	forward_blocks(m, seq, token, pos);
	op_rmsnorm(s->x, s->x, &m->weights.norm, m->config.c.dim, m->config.eps);
	return head(m, s->x);
}

/* ---- a chunk of prompt tokens at once ---- */

/* MLP over n rows of X into OUT (both [n, dim]). */
static void mlp_chunk(Model *m, const weight_view *w1, const weight_view *w2, const weight_view *w3,
		      const float *x, int n, float *out)
{
	RunState *s = &m->state;
	op_matmul(m->pool, s->chunk.h1, w1, x, n);
	op_matmul(m->pool, s->chunk.h3, w3, x, n);
	op_silu_mul(s->chunk.h1, s->chunk.h3, w1->rows * n);
	op_matmul(m->pool, out, w2, s->chunk.h1, n);
}

static void mla_chunk(Model *m, const LayerWeights *lw, int layer, int seq, int pos, int n)
{
	const Config *cf = &m->config;
	const dsv3_config *c = &cf->c;
	RunState *s = &m->state;
	int lora = c->kv_lora_rank, rope = c->qk_rope_head_dim, nope = c->qk_nope_head_dim;
	int qw = cf->n_local_heads * cf->q_head_dim, kvw = lora + rope, half = rope / 2;

	if (c->q_lora_rank > 0) {
		op_matmul(m->pool, s->chunk.q_a, &lw->wq_a, s->chunk.xn, n);
		for (int b = 0; b < n; b++) {
			float *qa = s->chunk.q_a + (size_t)b * c->q_lora_rank;
			op_rmsnorm(qa, qa, &lw->q_norm, c->q_lora_rank, cf->eps);
		}
		op_matmul(m->pool, s->chunk.q, &lw->wq_b, s->chunk.q_a, n);
	} else {
		op_matmul(m->pool, s->chunk.q, &lw->wq, s->chunk.xn, n);
	}
	op_matmul(m->pool, s->chunk.kv, &lw->wkv_a, s->chunk.xn, n);
	for (int b = 0; b < n; b++) {
		const float *cs = s->chunk.cos_a + (size_t)b * half, *sn = s->chunk.sin_a + (size_t)b * half;
		const float *kv = s->chunk.kv + (size_t)b * kvw;
		float *q = s->chunk.q + (size_t)b * qw;
		for (int h = 0; h < cf->n_local_heads; h++)
			op_rope(q + (size_t)h * cf->q_head_dim + nope, rope, cs, sn);
		float *c_new = cache_row(s->cache_c, cf, lora, seq, layer, pos + b);
		float *pe_new = cache_row(s->cache_pe, cf, rope, seq, layer, pos + b);
		op_rmsnorm(c_new, kv, &lw->kv_norm, lora, cf->eps);
		memcpy(pe_new, kv + lora, sizeof(float) * rope);
		op_rope(pe_new, rope, cs, sn);
	}
	mla_dims d = { cf->n_local_heads, nope, rope, c->v_head_dim, lora, cf->softmax_scale };
	for (int b = 0; b < n; b++) /* causal: token b sees the cache up to its own position */
		op_mla_attention(m->pool, s->chunk.attn_out + (size_t)b * cf->n_local_heads * c->v_head_dim,
				 s->chunk.q + (size_t)b * qw, &lw->wkv_b,
				 cache_row(s->cache_c, cf, lora, seq, layer, 0),
				 cache_row(s->cache_pe, cf, rope, seq, layer, 0), pos + b + 1, &d,
				 s->att_scratch);
	op_matmul(m->pool, s->chunk.tmp, &lw->wo, s->chunk.attn_out, n);
	comm_allreduce_sum(m->comm, s->chunk.tmp, (size_t)n * c->dim);
}

/* Routes every token, then runs each expert once over the tokens sent to it (in expert order,
 * as moe() adds them), then the shared experts. */
static void moe_chunk(Model *m, const LayerWeights *lw, int n)
{
	const dsv3_config *c = &m->config.c;
	RunState *s = &m->state;
	int K = c->n_activated_experts, dim = c->dim;

	for (int b = 0; b < n; b++)
		gate(m, lw, s->chunk.xn + (size_t)b * dim, s->chunk.topk + (size_t)b * K,
		     s->chunk.weights + (size_t)b * K);
	memset(s->chunk.moe_out, 0, sizeof(float) * dim * n);
	for (int e = 0; e < c->n_routed_experts; e++) {
		if (!lw->ew1[e].rows)
			continue; /* another rank's expert */
		int g = 0;
		for (int b = 0; b < n; b++)
			for (int k = 0; k < K; k++)
				if (s->chunk.topk[b * K + k] == e) {
					s->chunk.rows[g] = b * K + k;
					memcpy(s->chunk.gx + (size_t)g++ * dim, s->chunk.xn + (size_t)b * dim,
					       sizeof(float) * dim);
				}
		if (!g)
			continue;
		mlp_chunk(m, &lw->ew1[e], &lw->ew2[e], &lw->ew3[e], s->chunk.gx, g, s->chunk.gout);
		for (int i = 0; i < g; i++) {
			int b = s->chunk.rows[i] / K;
			op_add_scaled(s->chunk.moe_out + (size_t)b * dim, s->chunk.gout + (size_t)i * dim,
				      s->chunk.weights[s->chunk.rows[i]], dim);
		}
	}
	mlp_chunk(m, &lw->w1, &lw->w2, &lw->w3, s->chunk.xn, n, s->chunk.tmp);
	for (int i = 0; i < dim * n; i++)
		s->chunk.tmp[i] = s->chunk.moe_out[i] + s->chunk.tmp[i];
	comm_allreduce_sum(m->comm, s->chunk.tmp, (size_t)n * dim);
}

static void forward_chunk(Model *m, int seq, const int *tokens, int n, int pos)
{
	const Config *cf = &m->config;
	const dsv3_config *c = &cf->c;
	RunState *s = &m->state;
	const Weights *w = &m->weights;
	int dim = c->dim, half = c->qk_rope_head_dim / 2;

	embed(m, s->chunk.x, tokens, n);
	for (int b = 0; b < n; b++) {
		for (int i = 0; i < half; i++) {
			float angle = (float)(pos + b) * s->inv_freq[i];
			s->chunk.cos_a[b * half + i] = cosf(angle);
			s->chunk.sin_a[b * half + i] = sinf(angle);
		}
	}
	for (int l = 0; l < c->n_layers; l++) {
		const LayerWeights *lw = &w->layers[l];
		for (int b = 0; b < n; b++)
			op_rmsnorm(s->chunk.xn + (size_t)b * dim, s->chunk.x + (size_t)b * dim,
				   &lw->attn_norm, dim, cf->eps);
		mla_chunk(m, lw, l, seq, pos, n);
		op_add_scaled(s->chunk.x, s->chunk.tmp, 1.0f, dim * n);
		for (int b = 0; b < n; b++)
			op_rmsnorm(s->chunk.xn + (size_t)b * dim, s->chunk.x + (size_t)b * dim,
				   &lw->ffn_norm, dim, cf->eps);
		if (l < c->n_dense_layers) {
			mlp_chunk(m, &lw->w1, &lw->w2, &lw->w3, s->chunk.xn, n, s->chunk.tmp);
			comm_allreduce_sum(m->comm, s->chunk.tmp, (size_t)n * dim);
		} else {
			moe_chunk(m, lw, n);
		}
		op_add_scaled(s->chunk.x, s->chunk.tmp, 1.0f, dim * n);
	}
}

float *forward_prompt(Model *m, int seq, const int *tokens, int n, int pos)
{
	RunState *s = &m->state;
	int dim = m->config.c.dim, last = 0;
	if (n < 1)
		return NULL;
	if (m->gpu) {
		cuda_forward_prompt(m->gpu, seq, tokens, n, pos, s->logits);
		return s->logits;
	}
	for (int done = 0; done < n; done += last) {
		last = n - done < PREFILL_CHUNK ? n - done : PREFILL_CHUNK;
		forward_chunk(m, seq, tokens + done, last, pos + done);
	}
	memcpy(s->x, s->chunk.x + (size_t)(last - 1) * dim, sizeof(float) * dim);
	op_rmsnorm(s->x, s->x, &m->weights.norm, dim, m->config.eps);
	return head(m, s->x);
}

float *forward_batch(Model *m, int n, const int *seqs, const int *tokens, const int *pos)
{
	size_t vocab = (size_t)m->config.c.vocab_size;
	if (m->gpu)
		return cuda_forward_batch(m->gpu, n, seqs, tokens, pos, m->batch_logits);
	for (int i = 0; i < n; i++)
		memcpy(m->batch_logits + i * vocab, forward(m, seqs[i], tokens[i], pos[i]),
		       sizeof(float) * vocab);
	return m->batch_logits;
}
