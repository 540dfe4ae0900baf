/* dsv3-plan's arithmetic (see plan.h). The split rules are convert_name's and mp_check's, the
 * same functions dsv3-convert runs; the GPU figures follow ref-engine/cuda/model.cu state_alloc. */
#include "plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_ckpt.h"
#include "model_layout.h"
#include "mp_shards.h"
#include "problems.h"

#define MAX_PROBLEMS 20

static int load_config(plan_model *m, const char *path, dsv3_error *err)
{
	int rc = config_load(&m->cfg, path, err);
	if (rc)
		err->code = DSV3_EDATA;
	return rc ? DSV3_EDATA : 0;
}

/* "model.layers.N." -> N, else -1 (convert.py drops layers >= n_layers: the MTP layers). */
static long hf_layer(const char *name)
{
	static const char prefix[] = "model.layers.";
	if (strncmp(name, prefix, sizeof prefix - 1) != 0)
		return -1;
	char *end;
	long v = strtol(name + sizeof prefix - 1, &end, 10);
	return *end == '.' && end != name + sizeof prefix - 1 ? v : -1;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && strcmp(s + a - b, suffix) == 0;
}

static uint64_t shape_bytes(st_dtype d, int ndim, const int64_t *shape)
{
	uint64_t n = dtype_size(d);
	for (int i = 0; i < ndim; i++)
		n *= (uint64_t)shape[i];
	return n;
}

/* Adds one input tensor; the ones convert writes also go to m->t, unknown names to pr. */
static void add_tensor(plan_model *m, const char *name, st_dtype dtype, int ndim,
		       const int64_t *shape, problem_list *pr)
{
	plan_tensor *a = &m->all[m->n_all++];
	memset(a, 0, sizeof *a);
	snprintf(a->hf, sizeof a->hf, "%s", name);
	a->dtype = dtype;
	a->ndim = ndim;
	memcpy(a->shape, shape, (size_t)ndim * sizeof *shape);
	a->nbytes = shape_bytes(dtype, ndim, shape);
	a->fp8_weight = dtype == ST_F8_E4M3 && ndim == 2;
	a->is_scale = ends_with(name, "_scale_inv");
	m->input_bytes += a->nbytes;
	if (a->nbytes > m->largest_tensor)
		m->largest_tensor = a->nbytes;
	long layer = hf_layer(name);
	if (layer >= m->cfg.n_layers)
		return;
	if (convert_name(name, &a->cn) != 0 || hf_name_is_mtp_module(name)) {
		problem_add(pr, "%s: tensor %s: unknown tensor name (dsv3-convert has no rule for it)",
			    m->source, name);
		return;
	}
	m->t[m->n++] = *a;
}

static int alloc_tensors(plan_model *m, size_t n, dsv3_error *err)
{
	m->t = calloc(n ? n : 1, sizeof *m->t);
	m->all = calloc(n ? n : 1, sizeof *m->all);
	if (!m->t || !m->all)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	return 0;
}

static int finish(plan_model *m, problem_list *pr, dsv3_error *err)
{
	if (m->n == 0)
		problem_add(pr, "%s: no tensors to convert", m->source);
	int rc = problem_list_to_error(pr, MAX_PROBLEMS, err);
	problem_list_free(pr);
	return rc;
}

int plan_from_ckpt(plan_model *m, const char *dir, dsv3_error *err)
{
	memset(m, 0, sizeof *m);
	snprintf(m->source, sizeof m->source, "%s", dir);
	char path[4200];
	snprintf(path, sizeof path, "%s/config.json", dir);
	int rc = load_config(m, path, err);
	if (rc)
		return rc;
	hf_ckpt c;
	if ((rc = hf_ckpt_open(&c, dir, err)))
		return rc;
	size_t total = 0;
	for (size_t i = 0; i < c.n_files; i++)
		total += c.files[i].n_tensors;
	problem_list pr = { 0 };
	rc = alloc_tensors(m, total, err);
	for (size_t i = 0; i < c.n_files && !rc; i++) {
		const st_file *f = &c.files[i];
		m->input_header_bytes += 8 + f->header_len;
		for (size_t k = 0; k < f->n_tensors; k++) {
			const st_tensor *t = &f->tensors[k];
			add_tensor(m, t->name, t->dtype, t->ndim, t->shape, &pr);
			m->all[m->n_all - 1].nbytes = t->nbytes;
		}
	}
	m->n_input_files = c.n_files;
	hf_ckpt_close(&c);
	if (rc) {
		problem_list_free(&pr);
		return rc;
	}
	return finish(m, &pr, err);
}

int plan_from_config(plan_model *m, const char *path, dsv3_error *err)
{
	memset(m, 0, sizeof *m);
	snprintf(m->source, sizeof m->source, "%s", path);
	int rc = load_config(m, path, err);
	if (rc)
		return rc;
	layout_tensor *lt;
	size_t n;
	if ((rc = model_layout(&m->cfg, 1, &lt, &n)))
		return dsv3_fail(err, rc, "%s: cannot lay out the model of this config", path);
	problem_list pr = { 0 };
	rc = alloc_tensors(m, n, err);
	for (size_t i = 0; i < n && !rc; i++)
		add_tensor(m, lt[i].name, lt[i].dtype, lt[i].ndim, lt[i].shape, &pr);
	free(lt);
	if (rc) {
		problem_list_free(&pr);
		return rc;
	}
	/* One file; its header as the writer would lay it out. */
	st_spec *specs = calloc(m->n_all ? m->n_all : 1, sizeof *specs);
	if (!specs) {
		problem_list_free(&pr);
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	}
	for (size_t i = 0; i < m->n_all; i++) {
		specs[i].name = m->all[i].hf;
		specs[i].dtype = m->all[i].dtype;
		specs[i].ndim = m->all[i].ndim;
		memcpy(specs[i].shape, m->all[i].shape, sizeof specs[i].shape);
	}
	char *json;
	size_t len;
	rc = st_header_json(specs, m->n_all, NULL, &json, &len, err);
	free(specs);
	if (rc) {
		problem_list_free(&pr);
		return rc;
	}
	free(json);
	m->input_header_bytes = 8 + len;
	m->n_input_files = 1;
	return finish(m, &pr, err);
}

void plan_free(plan_model *m)
{
	free(m->t);
	free(m->all);
	m->t = m->all = NULL;
}

int plan_check_split(const plan_model *m, int mp, dsv3_error *err)
{
	st_file src = { .path = (char *)m->source };
	mp_piece piece = { .file = &src };
	mp_tensor *t = calloc(m->n ? m->n : 1, sizeof *t);
	if (!t)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	for (size_t i = 0; i < m->n; i++) {
		snprintf(t[i].name, sizeof t[i].name, "%s", m->t[i].cn.name);
		t[i].dtype = m->t[i].dtype;
		t[i].ndim = m->t[i].ndim;
		memcpy(t[i].shape, m->t[i].shape, sizeof t[i].shape);
		t[i].split_dim = m->t[i].cn.split_dim;
		t[i].expert = m->t[i].cn.expert;
		t[i].pieces = &piece;
		t[i].n_pieces = 1;
	}
	problem_list pr = { 0 };
	mp_check(t, m->n, mp, m->cfg.n_routed_experts, &pr);
	free(t);
	int rc = problem_list_to_error(&pr, MAX_PROBLEMS, err);
	problem_list_free(&pr);
	return rc;
}

/* 1 when rank r holds (a part of) t; *bytes gets its bytes there. */
static int rank_share(const plan_tensor *t, int mp, int n_experts, int r, uint64_t *bytes)
{
	if (t->cn.expert >= 0) {
		*bytes = t->nbytes;
		return expert_rank(t->cn.expert, n_experts, mp) == r;
	}
	*bytes = t->cn.split_dim == SPLIT_NONE ? t->nbytes : t->nbytes / (uint64_t)mp;
	return 1;
}

void plan_rank_weights(const plan_model *m, int mp, uint64_t *w)
{
	for (int r = 0; r < mp; r++) {
		w[r] = 0;
		for (size_t i = 0; i < m->n; i++) {
			uint64_t b;
			if (rank_share(&m->t[i], mp, m->cfg.n_routed_experts, r, &b))
				w[r] += b;
		}
	}
}

int plan_rank_file_bytes(const plan_model *m, int mp, int r, uint64_t *bytes, dsv3_error *err)
{
	st_spec *specs = calloc(m->n ? m->n : 1, sizeof *specs);
	if (!specs)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	size_t n = 0;
	uint64_t data = 0;
	for (size_t i = 0; i < m->n; i++) {
		const plan_tensor *t = &m->t[i];
		uint64_t b;
		if (!rank_share(t, mp, m->cfg.n_routed_experts, r, &b))
			continue;
		specs[n].name = t->cn.name;
		specs[n].dtype = t->dtype;
		specs[n].ndim = t->ndim;
		memcpy(specs[n].shape, t->shape, sizeof specs[n].shape);
		if (t->cn.expert < 0 && t->cn.split_dim != SPLIT_NONE)
			specs[n].shape[t->cn.split_dim] /= mp;
		data += b;
		n++;
	}
	char *json;
	size_t len;
	int rc = st_header_json(specs, n, NULL, &json, &len, err);
	free(specs);
	if (rc)
		return rc;
	free(json);
	*bytes = 8 + len + data;
	return 0;
}

uint64_t plan_kv_bytes_per_token(const dsv3_config *c)
{
	return (uint64_t)c->n_layers * (uint64_t)(c->kv_lora_rank + c->qk_rope_head_dim) * 4;
}

static uint64_t max_u(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

/* The widest output rows and largest BF16 image of a non-expert matrix other than the
 * embedding and head (the engine's prefill buffers, sized as upload() sees its weights). */
static void widest_matrix(const plan_model *m, uint64_t *rows, uint64_t *bf16)
{
	*rows = *bf16 = 0;
	for (size_t i = 0; i < m->n; i++) {
		const plan_tensor *t = &m->t[i];
		if (t->ndim != 2 || t->is_scale || t->cn.expert >= 0 ||
		    !strcmp(t->cn.name, "embed.weight") || !strcmp(t->cn.name, "head.weight") ||
		    ends_with(t->cn.name, ".scale"))
			continue;
		*rows = max_u(*rows, (uint64_t)t->shape[0]);
		*bf16 = max_u(*bf16, (uint64_t)t->shape[0] * (uint64_t)t->shape[1] * 2);
	}
}

/* GEMV_MAX_TOKENS, PREFILL_BLAS, ATT_SPLITS of ref-engine/cuda. */
#define ENG_GEMV_MAX_TOKENS 16
#define ENG_PREFILL_BLAS 512
#define ENG_ATT_SPLITS 16

uint64_t plan_gpu_scratch(const plan_model *m, int max_seq_len)
{
	const dsv3_config *c = &m->cfg;
	uint64_t K = c->n_activated_experts, kk = K > 0 ? K : 1;
	uint64_t max_tokens = ENG_GEMV_MAX_TOKENS;
	while (K > 0 && max_tokens * K > 256)
		max_tokens /= 2;
	uint64_t T = max_u(ENG_PREFILL_BLAS, max_tokens), P = max_u(max_tokens * kk, T);
	uint64_t D = (uint64_t)c->kv_lora_rank + c->qk_rope_head_dim, H = c->n_heads;
	uint64_t hidden = max_u(max_u(c->inter_dim, (uint64_t)c->n_shared_experts * c->moe_inter_dim),
				c->moe_inter_dim);
	uint64_t E = c->n_routed_experts > 0 ? c->n_routed_experts : 1;
	uint64_t qhd = (uint64_t)c->qk_nope_head_dim + c->qk_rope_head_dim;
	uint64_t hrows = max_u(P * hidden, T * kk * c->moe_inter_dim);
	uint64_t floats = c->qk_rope_head_dim / 2 + 2 * T * c->dim +
			  T * (c->q_lora_rank > 0 ? c->q_lora_rank : 1) + T * H * qhd + T * D +
			  T * H * c->v_head_dim + 2 * hrows + T * E + T * kk * c->dim +
			  T * c->vocab_size + T * kk;
	uint64_t G = max_u(T * kk / ENG_GEMV_MAX_TOKENS + E, P);
	uint64_t ints = T * kk + 4 + G * (2 + 2 * ENG_GEMV_MAX_TOKENS) + 3 * T;
	uint64_t att = max_tokens * H * D + max_tokens * H * (uint64_t)max_seq_len +
		       max_tokens * ENG_ATT_SPLITS * H * c->kv_lora_rank;
	uint64_t widest = max_u(max_u(c->dim, H * c->v_head_dim), max_u(hidden, c->q_lora_rank));
	uint64_t wrows, wbf16;
	widest_matrix(m, &wrows, &wbf16);
	uint64_t bytes = 2 * 2 * T * widest + 4 * 4 * T * wrows + 2 * wbf16;
	return 4 * (floats + ints + att) + bytes;
}

/* ---- the tools' memory and disk ---- */

/* lib/mp_shards.c: 16 MiB per write/hash call, input pages dropped every 64 MiB touched. */
#define MP_CHUNK (16ull << 20)
#define MP_RELEASE_EVERY (64ull << 20)
#define ST_WRITE_BUF (8ull << 20) /* lib/safetensors.c: each writer has two */
/* tools/fp8_to_bf16: 16 MiB dequantised per step, 3 pipe buffers, 4 threads per file. */
#define CAST_CHUNK (16ull << 20)
#define CAST_BUFFERS 3
#define CAST_THREADS_PER_FILE 4
#define CAST_COPY_PIECE (8ull << 20)
#define CAST_SLOTS 8
/* What every tool holds besides its buffers: the program, libc, the parsed headers. */
#define BASE_RSS (5ull << 20) /* measured: dsv3-convert on a 10 MB checkpoint less its input */

/* mp_write: min(threads, mp) writers, each with its st_writer's two ST_WRITE_BUF buffers and
 * at most RELEASE_EVERY + CHUNK bytes of its current input resident (its largest tensor when
 * that is smaller; never more than the whole input); the logical hashers walk the pages the
 * writers have reached. An upper bound: measured 8% under it for one writer on a 10 MB
 * checkpoint, 18% for one writer and 35-50% for two on a 750 MB one (docs/tools.md). */
static uint64_t mp_write_ram(const plan_model *m, int mp, int threads)
{
	uint64_t writers = (uint64_t)(threads < mp ? threads : mp);
	uint64_t per = MP_RELEASE_EVERY + MP_CHUNK;
	per = per < m->largest_tensor ? per : m->largest_tensor;
	uint64_t window = writers * per;
	if (window > m->input_bytes)
		window = m->input_bytes;
	return BASE_RSS + 2 * m->input_header_bytes + writers * 2 * ST_WRITE_BUF + window;
}

/* A dequantisation step: whole 128-row blocks of BF16, at least one, about CAST_CHUNK. */
static uint64_t cast_buffer(const plan_model *m)
{
	uint64_t best = 0;
	for (size_t i = 0; i < m->n_all; i++) {
		const plan_tensor *t = &m->all[i];
		if (!t->fp8_weight)
			continue;
		uint64_t row = (uint64_t)t->shape[1] * 2, block = row * (uint64_t)m->cfg.block_rows;
		uint64_t step = block >= CAST_CHUNK ? block : block * (CAST_CHUNK / block);
		uint64_t whole = row * (uint64_t)t->shape[0];
		best = max_u(best, step < whole ? step : whole);
	}
	return best;
}

static void cast_costs(const plan_model *m, int threads, plan_tools *o)
{
	uint64_t out = 0, header = m->input_header_bytes, any = 0, copied = 0;
	for (size_t i = 0; i < m->n_all; i++) {
		const plan_tensor *t = &m->all[i];
		any |= (uint64_t)t->fp8_weight;
		if (!t->fp8_weight && !t->is_scale)
			copied = max_u(copied, t->nbytes);
		if (t->is_scale)
			continue;
		out += t->fp8_weight ? t->nbytes * 2 : t->nbytes;
	}
	if (!any)
		return;
	uint64_t files = (uint64_t)(threads / CAST_THREADS_PER_FILE);
	files = files < 1 ? 1 : files;
	files = files > m->n_input_files ? m->n_input_files : files;
	uint64_t buf = cast_buffer(m);
	/* per file in flight: its buffers, the FP8 source of one step, the copied pieces queued
	 * (pages of the input mapping, at most the largest copied tensor) */
	uint64_t queued = CAST_SLOTS * CAST_COPY_PIECE < copied ? CAST_SLOTS * CAST_COPY_PIECE : copied;
	uint64_t per = CAST_BUFFERS * buf + buf / 2 + queued;
	o->cast_ram = BASE_RSS + 2 * header + files * per;
	o->cast_disk = out + header;
}

int plan_tool_costs(const plan_model *m, int mp, int threads, plan_tools *o, dsv3_error *err)
{
	memset(o, 0, sizeof *o);
	for (int r = 0; r < mp; r++) {
		uint64_t b;
		int rc = plan_rank_file_bytes(m, mp, r, &b, err);
		if (rc)
			return rc;
		o->convert_disk += b;
	}
	o->convert_ram = mp_write_ram(m, mp, threads);
	/* dsv3-shard reads the converted files and writes the same bytes again */
	o->shard_disk = o->convert_disk;
	o->shard_ram = mp_write_ram(m, mp, threads);
	cast_costs(m, threads, o);
	return 0;
}
