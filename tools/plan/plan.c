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
#include "tensor_rules.h"

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
static void add_tensor(plan_model *m, int file, const char *name, st_dtype dtype, int ndim,
		       const int64_t *shape, problem_list *pr)
{
	plan_tensor *a = &m->all[m->n_all++];
	memset(a, 0, sizeof *a);
	a->file = file;
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

static int alloc_tensors(plan_model *m, size_t n, size_t files, dsv3_error *err)
{
	m->t = calloc(n ? n : 1, sizeof *m->t);
	m->all = calloc(n ? n : 1, sizeof *m->all);
	m->file_header_bytes = calloc(files ? files : 1, sizeof *m->file_header_bytes);
	if (!m->t || !m->all || !m->file_header_bytes)
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
	rc = alloc_tensors(m, total, c.n_files, err);
	for (size_t i = 0; i < c.n_files && !rc; i++) {
		const st_file *f = &c.files[i];
		m->file_header_bytes[i] = 8 + f->header_len;
		m->input_header_bytes += 8 + f->header_len;
		for (size_t k = 0; k < f->n_tensors; k++) {
			const st_tensor *t = &f->tensors[k];
			/* What dsv3-convert would refuse by the shared rules (the MTP layer it
			 * drops aside) is refused here too, listed the same way. */
			if (hf_layer(t->name) < m->cfg.n_layers &&
			    tensor_rules_check_hf(&c, f, t, 0, &pr))
				continue;
			add_tensor(m, (int)i, t->name, t->dtype, t->ndim, t->shape, &pr);
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
	rc = alloc_tensors(m, n, 1, err);
	for (size_t i = 0; i < n && !rc; i++)
		add_tensor(m, 0, lt[i].name, lt[i].dtype, lt[i].ndim, lt[i].shape, &pr);
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
	m->input_header_bytes = m->file_header_bytes[0] = 8 + len;
	m->n_input_files = 1;
	return finish(m, &pr, err);
}

void plan_free(plan_model *m)
{
	free(m->t);
	free(m->all);
	free(m->file_header_bytes);
	m->t = m->all = NULL;
	m->file_header_bytes = NULL;
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

/* ---- the tools' peak RAM ----
 *
 * A tool's peak RSS (what /usr/bin/time -f %M reports) is modelled as
 *   BASE_RSS                the program, libc, libcrypto, thread stacks and small heap,
 *                           measured once (below);
 * + 2 x input headers       their mapped pages and the parsed tensor list;
 * + anonymous buffers       st_writer's two ST_WRITE_BUF buffers, resident only as far as writes
 *                           have been copied into them (simulated with the same rule as
 *                           lib/safetensors.c put_bytes), and dsv3-fp8-to-bf16's pipe buffers;
 * + input pages mapped      from the fault that maps them to the madvise(MADV_DONTNEED) that
 *                           drops them; a fault on a file mapping maps the whole page-cache
 *                           folio around it (ST_FOLIO, up to 2 MiB on ext4 and xfs).
 * dsv3-convert and dsv3-shard (lib/mp_shards.c) read no more than a chunk at a time and never
 * across an ST_FOLIO boundary, and a walk drops the block it holds before it reads in another: a
 * walking thread holds one ST_FOLIO block per input stream it reads at once (mp_write_ram). With
 * W = min(threads, N) they run W writers, each with its two buffers, and W hashers. The cast
 * (one file in flight) is replayed piece by piece in its layout order. Where threads can
 * overlap in more than one way (several files cast at once) the figure is the most that can be
 * at once: an upper bound, flagged. */

/* MP_CHUNK (lib/mp_shards.h), ST_WRITE_BUF and ST_FOLIO (lib/safetensors.h) are the tools' own. */
/* tools/fp8_to_bf16: 16 MiB dequantised per step, 3 pipe buffers, 4 threads per file, copied
 * tensors in 8 MiB pieces through a ring of 8 slots. */
#define CAST_CHUNK (16ull << 20)
#define CAST_BUFFERS 3
#define CAST_THREADS_PER_FILE 4
#define CAST_COPY_PIECE (8ull << 20)
#define CAST_SLOTS 8
/* Measured: /usr/bin/time -f %M dsv3-convert --model-parallel 1 on the "mid" checkpoint of
 * tests/test_plan.c (73.2 MB while lib/mp_shards.c dropped pages every 64 MiB) less that 64 MiB
 * window and ST_FOLIO; the libraries' mapped pages (libcrypto 3.3 MB, libc 1.5 MB) are most of it.
 * With one block per walk the same command measures 26.7 MB against 26.8 MB planned. */
#define BASE_RSS (5632ull << 10)

/* The bytes st_writer holds in its two buffers: put_bytes copies a write into the current
 * buffer when it fits; otherwise it flushes, switches buffers, and writes pieces of half a
 * buffer or more in place. */
typedef struct {
	uint64_t len, touched[2];
	int cur;
} writer_sim;

static void writer_put(writer_sim *w, uint64_t len)
{
	if (w->len + len > ST_WRITE_BUF) {
		w->cur ^= 1;
		w->len = 0;
		if (len >= ST_WRITE_BUF / 2)
			return;
	}
	w->len += len;
	w->touched[w->cur] = max_u(w->touched[w->cur], w->len);
}

static uint64_t writer_resident(const writer_sim *w)
{
	return w->touched[0] + w->touched[1];
}

static int cmp_layout(st_dtype da, const char *na, st_dtype db, const char *nb)
{
	if (da != db)
		return da > db ? -1 : 1;
	return strcmp(na, nb);
}

/* qsort_r: converted tensors in the writer's layout order (dtype rank descending, name). */
static int cmp_converted(const void *x, const void *y, void *ctx)
{
	const plan_tensor *t = ctx, *a = &t[*(const size_t *)x], *b = &t[*(const size_t *)y];
	return cmp_layout(a->dtype, a->cn.name, b->dtype, b->cn.name);
}

static st_dtype cast_dtype(const plan_tensor *t)
{
	return t->fp8_weight ? ST_BF16 : t->dtype;
}

/* qsort_r: input tensors by file, then in the cast's output layout order (FP8 becomes BF16). */
static int cmp_cast(const void *x, const void *y, void *ctx)
{
	const plan_tensor *t = ctx, *a = &t[*(const size_t *)x], *b = &t[*(const size_t *)y];
	if (a->file != b->file)
		return a->file < b->file ? -1 : 1;
	return cmp_layout(cast_dtype(a), a->hf, cast_dtype(b), b->hf);
}

static size_t *sorted_index(const plan_tensor *t, size_t n,
			    int (*cmp)(const void *, const void *, void *))
{
	size_t *idx = malloc((n ? n : 1) * sizeof *idx);
	if (!idx)
		return NULL;
	for (size_t i = 0; i < n; i++)
		idx[i] = i;
	qsort_r(idx, n, sizeof *idx, cmp, (void *)t);
	return idx;
}

/* The writes mp_write makes of rank r's share of t: a run per outer index (a row's slice for a
 * tensor split along a later dim), each cut into MP_CHUNK calls. */
static void rank_writes(const plan_tensor *t, int mp, writer_sim *w)
{
	uint64_t outer = 1, run = t->nbytes;
	if (t->cn.expert < 0 && t->cn.split_dim != SPLIT_NONE) {
		for (int i = 0; i < t->cn.split_dim && i < t->ndim; i++)
			outer *= (uint64_t)t->shape[i];
		run = outer ? t->nbytes / outer / (uint64_t)mp : 0;
	}
	for (uint64_t o = 0; o < outer; o++)
		for (uint64_t off = 0; off < run; off += MP_CHUNK)
			writer_put(w, run - off < MP_CHUNK ? run - off : MP_CHUNK);
}

/* The most any rank's writer holds in its buffers: its header, then its tensors in layout
 * order. */
static int writer_buffers(const plan_model *m, int mp, uint64_t *most, dsv3_error *err)
{
	size_t *idx = sorted_index(m->t, m->n, cmp_converted);
	uint64_t *w = malloc((size_t)mp * sizeof *w);
	int rc = !idx || !w ? dsv3_fail(err, DSV3_EIO, "out of memory") : 0;
	if (!rc)
		plan_rank_weights(m, mp, w);
	*most = 0;
	for (int r = 0; r < mp && !rc; r++) {
		uint64_t file;
		if ((rc = plan_rank_file_bytes(m, mp, r, &file, err)))
			break;
		writer_sim s = { 0 };
		writer_put(&s, 8);
		writer_put(&s, file - 8 - w[r]);
		for (size_t k = 0; k < m->n; k++) {
			uint64_t b;
			if (rank_share(&m->t[idx[k]], mp, m->cfg.n_routed_experts, r, &b))
				rank_writes(&m->t[idx[k]], mp, &s);
		}
		*most = max_u(*most, writer_resident(&s));
	}
	free(idx);
	free(w);
	return rc;
}

/* mp_write runs 2W pool threads, W = min(threads, mp): tasks 0..W-1 hash, the next mp write
 * ranks 0..mp-1 in turn, no more than W at once (a hasher out of work waits for a writer to
 * finish before it takes the next rank). So at most W writers, each with its buffers and the
 * one block it reads, and W hashers walk the input at once, a hasher holding one block. In
 * dsv3-shard of N > 1 ranks (`shard`) a hasher reads more at once: a replicated tensor beside
 * its copy (two blocks) and a tensor split along a later dim (wo, w2) row by row across the N
 * files (a block in each). How much of that meets the others' blocks, rather than sharing the
 * block of the writer a hasher follows, goes with timing. Measured (tests/test_plan.c, N 2 and
 * 4, 1 and 2 threads, 2 cores), the peak lies above the same split's dsv3-convert by 0-1.1
 * blocks at N 2 (either W), 1.1-3.1 at N 4 with W 1 and 2-4 at N 4 with W 2: the figure takes
 * W N / 2 + 1 hasher blocks (N / 2 each on average, one more beside a copy): the middle of
 * the ranges at N 4, the top at N 2 (where a run cannot come below dsv3-convert's figure, 8.7%
 * under it). */
static int mp_write_ram(const plan_model *m, int mp, int threads, int shard, uint64_t *ram,
			dsv3_error *err)
{
	uint64_t buffers;
	int rc = writer_buffers(m, mp, &buffers, err);
	if (rc)
		return rc;
	uint64_t W = (uint64_t)(threads < mp ? threads : mp);
	uint64_t hasher_blocks = shard && mp > 1 ? W * (uint64_t)mp / 2 + 1 : W;
	*ram = BASE_RSS + 2 * m->input_header_bytes + W * (buffers + ST_FOLIO) +
	       hasher_blocks * ST_FOLIO;
	return 0;
}

/* The cast's pipe: the pieces in its PIPE_SLOTS slots, the input bytes each holds (copied
 * tensors are pieces of the input mapping, dropped when both consumers are done; dequantised
 * chunks live in the pipe buffers). The consumers are the slow side, so the ring runs full. */
typedef struct {
	uint64_t ring[CAST_SLOTS];
	size_t head;
	uint64_t buffers[CAST_BUFFERS];
	int next_buffer;
	writer_sim w;
	uint64_t peak;
} cast_sim;

static uint64_t ring_bytes(const cast_sim *c)
{
	uint64_t sum = 0;
	for (int i = 0; i < CAST_SLOTS; i++)
		sum += c->ring[i];
	return sum;
}

/* The producer holds `input` bytes of the mapping (a piece prefaulted, or the FP8 rows being
 * dequantised) while the ring is full; then pushes a piece holding `kept` of them. */
static void cast_step(cast_sim *c, uint64_t input, uint64_t kept, uint64_t written)
{
	writer_put(&c->w, written);
	uint64_t buffers = 0;
	for (int b = 0; b < CAST_BUFFERS; b++)
		buffers += c->buffers[b];
	c->peak = max_u(c->peak, writer_resident(&c->w) + buffers + ring_bytes(c) + input + ST_FOLIO);
	c->ring[c->head++ % CAST_SLOTS] = kept;
}

/* cast_fp8_tensor: whole 128-row blocks of BF16 (at least one) about CAST_CHUNK a step, each
 * in the next pipe buffer, grown to the largest chunk it has held. Dequantising is as slow as
 * the consumers: they have retired the copied pieces before it (the ring holds no input). */
static void cast_fp8_steps(cast_sim *c, const plan_tensor *t, int block_rows)
{
	uint64_t rows = (uint64_t)t->shape[0], cols = (uint64_t)t->shape[1];
	uint64_t block = cols * 2 * (uint64_t)block_rows;
	uint64_t chunk_rows =
		(uint64_t)block_rows * (block >= CAST_CHUNK || !block ? 1 : CAST_CHUNK / block);
	for (uint64_t r = 0; r < rows; r += chunk_rows) {
		uint64_t n = rows - r < chunk_rows ? rows - r : chunk_rows;
		int b = c->next_buffer;
		c->next_buffer = (b + 1) % CAST_BUFFERS;
		c->buffers[b] = max_u(c->buffers[b], n * cols * 2);
		memset(c->ring, 0, sizeof c->ring);
		cast_step(c, n * cols, 0, n * cols * 2);
	}
}

static void cast_copy_steps(cast_sim *c, const plan_tensor *t)
{
	uint64_t off = 0;
	do {
		uint64_t len = t->nbytes - off < CAST_COPY_PIECE ? t->nbytes - off : CAST_COPY_PIECE;
		cast_step(c, len, len, len);
		off += len;
	} while (off < t->nbytes);
}

/* One file worker casting every file in name order; the pipe drains at each file's end. */
static int cast_ram_one(const plan_model *m, uint64_t *ram)
{
	size_t *idx = sorted_index(m->all, m->n_all, cmp_cast);
	if (!idx)
		return -1;
	cast_sim c = { 0 };
	int file = -1;
	for (size_t k = 0; k < m->n_all; k++) {
		const plan_tensor *t = &m->all[idx[k]];
		if (t->is_scale)
			continue;
		if (t->file != file) {
			file = t->file;
			memset(c.ring, 0, sizeof c.ring);
			memset(&c.w, 0, sizeof c.w);
			writer_put(&c.w, 8);
			writer_put(&c.w, m->file_header_bytes[file] - 8);
		}
		if (t->fp8_weight)
			cast_fp8_steps(&c, t, m->cfg.block_rows);
		else
			cast_copy_steps(&c, t);
	}
	free(idx);
	*ram = c.peak;
	return 0;
}

static int cast_costs(const plan_model *m, int threads, plan_tools *o, dsv3_error *err)
{
	uint64_t out = 0, any = 0;
	for (size_t i = 0; i < m->n_all; i++) {
		const plan_tensor *t = &m->all[i];
		any |= (uint64_t)t->fp8_weight;
		if (!t->is_scale)
			out += t->fp8_weight ? t->nbytes * 2 : t->nbytes;
	}
	if (!any)
		return 0;
	uint64_t files = (uint64_t)(threads / CAST_THREADS_PER_FILE);
	files = files < 1 ? 1 : files;
	files = files > m->n_input_files ? m->n_input_files : files;
	uint64_t one;
	if (cast_ram_one(m, &one))
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	/* several files in flight: each worker at its own peak at once, the bound */
	o->cast_ram = BASE_RSS + 2 * m->input_header_bytes + files * one;
	o->cast_ram_bound = files > 1;
	o->cast_disk = out + m->input_header_bytes;
	return 0;
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
	/* dsv3-shard reads the converted files and writes the same bytes again, with the same
	 * writers and hashers */
	int rc = mp_write_ram(m, mp, threads, 0, &o->convert_ram, err);
	if (!rc)
		rc = mp_write_ram(m, mp, threads, 1, &o->shard_ram, err);
	o->shard_disk = o->convert_disk;
	if (!rc)
		rc = cast_costs(m, threads, o, err);
	return rc;
}
