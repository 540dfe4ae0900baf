/* Model-parallel shard files from mmapped pieces (see mp_shards.h).
 *
 * A logical tensor is viewed as [outer, D, inner]: D is its split dimension, outer the product of
 * the dims before it, inner the bytes of one step along D. Rank r of mp gets [r*D/mp, (r+1)*D/mp)
 * of D for every outer index, which is torch's narrow(dim).contiguous(). The bytes may come in
 * n_pieces equal parts along D (the ranks of an earlier split): step d of D lives in piece
 * d/(D/n_pieces). Tensors without a split dim (and routed experts) are one step of D.
 *
 * Work: one task per rank file, each writing its tensors in the file's layout order (st_writer
 * hashes the file on a thread of its own). Logical hashes need each whole tensor once: they sit
 * in one queue in the same global layout order and as many hashing threads as concurrent writers
 * take the items some writer has reached, so all threads move through the inputs together and a
 * page read from disk serves every one while it is still cached. The hashers run beside the
 * writers rather than inside them: a writer busy hashing a 2 GB embedding would leave the disk
 * idle. A walk drops the input pages it read as it leaves each ST_FOLIO block (below). */
#include "mp_shards.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "convert_names.h"
#include "hf_ckpt.h"
#include "manifest.h"
#include "progress.h"
#include "sha256.h"
#include "threadpool.h"

#define PROGRESS_EVERY (8u << 20)
#define DEQUANT_CHUNK (4u << 20)  /* BF16 bytes made per step from an FP8 weight, per thread */

/* ---- geometry ------------------------------------------------------------------------------ */

void mp_file_name(char *buf, size_t len, int rank, int mp)
{
	snprintf(buf, len, "model%d-mp%d.safetensors", rank, mp);
}

static int is_split(const mp_tensor *t)
{
	return t->expert < 0 && t->split_dim != SPLIT_NONE;
}

static uint64_t tensor_bytes(const mp_tensor *t)
{
	uint64_t n = dtype_size(t->dtype);
	for (int i = 0; i < t->ndim; i++)
		n *= (uint64_t)t->shape[i];
	return n;
}

typedef struct {
	uint64_t outer, dim, inner; /* inner in bytes */
} geometry;

static geometry tensor_geometry(const mp_tensor *t)
{
	geometry g = { 1, 1, tensor_bytes(t) };
	if (!is_split(t))
		return g;
	g.inner = dtype_size(t->dtype);
	for (int i = 0; i < t->ndim; i++) {
		if (i < t->split_dim)
			g.outer *= (uint64_t)t->shape[i];
		else if (i > t->split_dim)
			g.inner *= (uint64_t)t->shape[i];
	}
	g.dim = (uint64_t)t->shape[t->split_dim];
	return g;
}

/* Whether rank r of mp holds t, and which steps [*a, *b) of its split dim. */
static int rank_slice(const mp_tensor *t, int r, int mp, int n_experts, uint64_t *a, uint64_t *b)
{
	geometry g = tensor_geometry(t);
	*a = 0;
	*b = g.dim;
	if (t->expert >= 0)
		return expert_rank(t->expert, n_experts, mp) == r;
	if (is_split(t)) {
		*a = g.dim / (uint64_t)mp * (uint64_t)r;
		*b = *a + g.dim / (uint64_t)mp;
	}
	return 1;
}

void mp_check(const mp_tensor *t, size_t n, int mp, int n_experts, problem_list *p)
{
	if (mp < 1 || n_experts < 0 || n_experts % mp != 0)
		problem_add(p, "%d experts cannot be divided among %d ranks", n_experts, mp);
	for (size_t i = 0; i < n; i++) {
		const char *src = t[i].pieces[0].file->path;
		if (t[i].expert >= n_experts) {
			problem_add(p, "%s: tensor %s: expert %d, but there are %d experts", src,
				    t[i].name, t[i].expert, n_experts);
		} else if (is_split(&t[i]) && t[i].ndim <= t[i].split_dim) {
			problem_add(p, "%s: tensor %s: has %d dims, cannot be split along dim %d",
				    src, t[i].name, t[i].ndim, t[i].split_dim);
		} else if (is_split(&t[i]) && t[i].shape[t[i].split_dim] % mp != 0) {
			size_t len = strlen(t[i].name);
			int scale = len > 6 && strcmp(t[i].name + len - 6, ".scale") == 0;
			problem_add(p, "%s: tensor %s: %s %lld (dim %d) is not divisible by %d",
				    src, t[i].name, scale ? "scale block count" : "size",
				    (long long)t[i].shape[t[i].split_dim], t[i].split_dim, mp);
		}
	}
}

/* ---- walking the bytes ----------------------------------------------------------------- */

typedef int (*byte_sink)(void *ctx, const uint8_t *p, size_t len, dsv3_error *err);

typedef struct {
	const uint8_t *lo, *hi;
} span;

static void release_span(const mp_piece *pc, span *s)
{
	if (s->hi > s->lo) {
		st_tensor part = *pc->t;
		part.data = s->lo;
		part.nbytes = (uint64_t)(s->hi - s->lo);
		st_release(pc->file, &part);
	}
	s->lo = s->hi = NULL;
}

static void note_span(span *s, const uint8_t *p, size_t len)
{
	if (!s->lo || p < s->lo)
		s->lo = p;
	if (p + len > s->hi)
		s->hi = p + len;
}

/* Reads of input pages: no read crosses an ST_FOLIO boundary, and a walk about to read in
 * another block than the one it holds drops that one first (st_release takes its whole block).
 * So a walk holds at most one block per piece it reads at once, whatever the folios' sizes, and
 * what a tool holds is fixed by how many walks it runs (tools/plan models it). */
static size_t in_block(const uint8_t *p, uint64_t len)
{
	uint64_t left = ST_FOLIO - ((uintptr_t)p & (ST_FOLIO - 1));
	return (size_t)(len < left ? len : left);
}

static uintptr_t block_of(const uint8_t *p)
{
	return (uintptr_t)p & ~(uintptr_t)(ST_FOLIO - 1);
}

static void walk_to(const mp_piece *pc, span *s, const uint8_t *p)
{
	if (s->lo && block_of(p) != block_of(s->lo))
		release_span(pc, s);
}

/* ---- FP8 weights read as BF16 (mp_dequant) --------------------------------------------- */

/* BF16 elements [e, e + count) of t in row-major order into dst; each row's run is cut at the
 * block columns, every piece times its block's scale (e4m3_scale_to_bf16, as the cast does). */
static void dequant_elements(const mp_tensor *t, uint64_t e, uint64_t count, uint16_t *dst)
{
	const mp_dequant *q = t->dequant;
	const uint8_t *src = t->pieces[0].t->data;
	uint64_t cols = (uint64_t)t->shape[1], bc = (uint64_t)q->block_cols;
	uint64_t br = (uint64_t)q->block_rows, scale_cols = (uint64_t)q->scale->shape[1];
	while (count > 0) {
		uint64_t r = e / cols, c = e % cols;
		uint64_t end = (c / bc + 1) * bc < cols ? (c / bc + 1) * bc : cols;
		uint64_t n = end - c < count ? end - c : count;
		float s;
		/* tensor data need not be 4-aligned */
		memcpy(&s, q->scale->data + 4 * ((r / br) * scale_cols + c / bc), 4);
		e4m3_scale_to_bf16(dst, src + e, (size_t)n, s);
		dst += n;
		e += n;
		count -= n;
	}
}

/* walk_slice for a dequantised tensor: the BF16 bytes are made a chunk at a time in a buffer
 * of at most DEQUANT_CHUNK bytes per thread, and the FP8 pages read are dropped as they go. */
static int walk_slice_dequant(const mp_tensor *t, uint64_t a, uint64_t b, byte_sink sink,
			      void *ctx, const atomic_int *stop, dsv3_error *err)
{
	geometry g = tensor_geometry(t);
	const mp_piece *pc = &t->pieces[0];
	uint64_t run = (b - a) * g.inner;
	size_t cap = run < DEQUANT_CHUNK ? (size_t)run : DEQUANT_CHUNK;
	uint16_t *buf = malloc(cap ? cap : 2);
	if (!buf)
		return dsv3_fail(err, DSV3_EIO, "tensor %s: out of memory", t->name);
	span fp8 = { 0 };
	int rc = 0;
	for (uint64_t o = 0; o < g.outer && !rc; o++) {
		uint64_t off = (o * g.dim + a) * g.inner, len = run;
		while (len > 0 && !rc) {
			const uint8_t *src = pc->t->data + off / 2;
			size_t c = 2 * in_block(src, (len < cap ? len : cap) / 2);
			walk_to(pc, &fp8, src);
			if (stop && atomic_load(stop)) {
				rc = dsv3_fail(err, DSV3_EIO, "cancelled");
			} else {
				dequant_elements(t, off / 2, c / 2, buf);
				rc = sink(ctx, (const uint8_t *)buf, c, err);
			}
			note_span(&fp8, src, c / 2);
			off += c;
			len -= c;
		}
	}
	release_span(pc, &fp8);
	st_release(t->dequant->scale_file, t->dequant->scale);
	free(buf);
	return rc;
}

/* Feeds steps [a, b) of t's split dim, for every outer index, to sink in row-major order. */
static int walk_slice(const mp_tensor *t, uint64_t a, uint64_t b, byte_sink sink, void *ctx,
		      const atomic_int *stop, dsv3_error *err)
{
	if (t->dequant)
		return walk_slice_dequant(t, a, b, sink, ctx, stop, err);
	geometry g = tensor_geometry(t);
	uint64_t per_piece = g.dim / (uint64_t)t->n_pieces;
	span *spans = calloc((size_t)t->n_pieces, sizeof *spans);
	if (!spans)
		return dsv3_fail(err, DSV3_EIO, "tensor %s: out of memory", t->name);
	int rc = 0;
	for (uint64_t o = 0; o < g.outer && !rc; o++) {
		for (uint64_t d = a; d < b && !rc;) {
			uint64_t p = d / per_piece, local = d % per_piece;
			uint64_t run = b - d < per_piece - local ? b - d : per_piece - local;
			const uint8_t *src = t->pieces[p].t->data + (o * per_piece + local) * g.inner;
			uint64_t len = run * g.inner;
			while (len > 0 && !rc) {
				size_t c = in_block(src, len < MP_CHUNK ? len : MP_CHUNK);
				walk_to(&t->pieces[p], &spans[p], src);
				if (stop && atomic_load(stop))
					rc = dsv3_fail(err, DSV3_EIO, "cancelled");
				else
					rc = sink(ctx, src, c, err);
				note_span(&spans[p], src, c);
				src += c;
				len -= c;
			}
			d += run;
		}
	}
	for (int k = 0; k < t->n_pieces; k++)
		release_span(&t->pieces[k], &spans[k]);
	free(spans);
	return rc;
}

/* ---- the shared state of one mp_write ---------------------------------------------------- */

typedef struct {
	const mp_tensor *t;
	size_t n;
	int mp, n_experts;
	const char **tmp_paths;	 /* per rank */
	uint8_t (*file_sha)[32]; /* per rank */
	unsigned char *kept;	 /* per rank: a resumed run's finished file, not written again */
	resume_log *res;
	uint8_t (*tensor_sha)[32];
	size_t *order; /* global layout order: dtype rank descending, then name */
	size_t *gpos;  /* gpos[order[k]] == k */
	atomic_size_t next_hash;
	size_t n_hashers; /* tasks [0, n_hashers) hash, the next mp tasks write ranks */
	size_t reached;	  /* furthest global layout position a writer has started, + 1 */
	int writers_left; /* rank tasks not yet finished */
	/* Ranks being written now, at most max_writing (--threads): a hasher that runs out of
	 * work takes the next rank, but waits for a writer to finish first, so no more than
	 * max_writing writers' buffers and windows are ever held at once. */
	int writing, max_writing;
	pthread_cond_t progress_cond; /* reached, writers_left or writing changed, or stop */
	atomic_int stop;
	pthread_mutex_t lock; /* progress, first_err, reached, writers_left, writing */
	progress bar;
	dsv3_error first_err;
} write_job;

static void job_fail(write_job *j, const dsv3_error *err)
{
	/* A task cancelled by the stop flag fails after the first one has recorded its error. */
	pthread_mutex_lock(&j->lock);
	if (!j->first_err.code)
		j->first_err = *err;
	atomic_store(&j->stop, 1);
	pthread_cond_broadcast(&j->progress_cond);
	pthread_mutex_unlock(&j->lock);
}

static int cmp_layout(const mp_tensor *a, const mp_tensor *b)
{
	if (a->dtype != b->dtype)
		return a->dtype > b->dtype ? -1 : 1;
	return strcmp(a->name, b->name);
}

/* qsort_r (GNU; the build defines _GNU_SOURCE): the comparison needs the tensor array. */
static int cmp_layout_index(const void *a, const void *b, void *ctx)
{
	const mp_tensor *t = ctx;
	return cmp_layout(&t[*(const size_t *)a], &t[*(const size_t *)b]);
}

/* ---- logical hashes ------------------------------------------------------------------------- */

static int sha_sink(void *ctx, const uint8_t *p, size_t len, dsv3_error *err)
{
	(void)err;
	sha256_update(ctx, p, len);
	return 0;
}

/* Replicated tensors of dsv3-shard: every rank's copy must equal rank 0's. */
static int compare_copy(const mp_tensor *t, const mp_piece *copy, dsv3_error *err)
{
	const mp_piece *ref = &t->pieces[0];
	uint64_t n = ref->t->nbytes;
	span a = { 0 }, b = { 0 };
	int differ = 0;
	for (uint64_t off = 0; off < n && !differ;) {
		const uint8_t *x = ref->t->data + off, *y = copy->t->data + off;
		size_t c = in_block(y, in_block(x, n - off < MP_CHUNK ? n - off : MP_CHUNK));
		walk_to(ref, &a, x);
		walk_to(copy, &b, y);
		differ = memcmp(x, y, c) != 0;
		note_span(&a, x, c);
		note_span(&b, y, c);
		off += c;
	}
	release_span(ref, &a);
	release_span(copy, &b);
	if (differ)
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: tensor %s: differs from the copy in %s (a replicated tensor must be "
				 "the same on every rank)",
				 copy->file->path, t->name, ref->file->path);
	return 0;
}

static int hash_tensor(write_job *j, size_t i, sha256_ctx *sha, dsv3_error *err)
{
	const mp_tensor *t = &j->t[i];
	geometry g = tensor_geometry(t);
	int rc = walk_slice(t, 0, g.dim, sha_sink, sha, &j->stop, err);
	sha256_final(sha, j->tensor_sha[i]);
	for (int k = 0; k < t->n_copies && !rc; k++)
		rc = compare_copy(t, &t->copies[k], err);
	if (!rc && t->expect_sha256 && memcmp(t->expect_sha256, j->tensor_sha[i], 32) != 0)
		rc = dsv3_fail(err, DSV3_EDATA,
			       "%s: tensor %s: its bytes do not match the SHA-256 in the input's "
			       "tensors.sha256.json",
			       t->pieces[0].file->path, t->name);
	return rc;
}

/* Hashes queued tensors below global layout position `upto` (all: SIZE_MAX); 0 when none is
 * left there. */
static int hash_queue(write_job *j, size_t upto, sha256_ctx *sha, dsv3_error *err)
{
	for (;;) {
		size_t k = atomic_load(&j->next_hash);
		if (k >= j->n || k >= upto || atomic_load(&j->stop))
			return 0;
		if (!atomic_compare_exchange_weak(&j->next_hash, &k, k + 1))
			continue;
		int rc = hash_tensor(j, j->order[k], sha, err);
		if (rc)
			return rc;
	}
}

/* A writer is about to read the tensor at global layout position k: hashers may follow. */
static void note_reached(write_job *j, size_t k)
{
	pthread_mutex_lock(&j->lock);
	if (k + 1 > j->reached) {
		j->reached = k + 1;
		pthread_cond_broadcast(&j->progress_cond);
	}
	pthread_mutex_unlock(&j->lock);
}

static void take_writer_slot(write_job *j)
{
	pthread_mutex_lock(&j->lock);
	while (j->writing >= j->max_writing && !atomic_load(&j->stop))
		pthread_cond_wait(&j->progress_cond, &j->lock);
	j->writing++;
	pthread_mutex_unlock(&j->lock);
}

static void give_writer_slot(write_job *j)
{
	pthread_mutex_lock(&j->lock);
	j->writing--;
	pthread_cond_broadcast(&j->progress_cond);
	pthread_mutex_unlock(&j->lock);
}

static void note_writer_done(write_job *j)
{
	pthread_mutex_lock(&j->lock);
	j->writers_left--;
	pthread_cond_broadcast(&j->progress_cond);
	pthread_mutex_unlock(&j->lock);
}

/* A hashing task: takes what the writers have reached, waiting for them, until the queue is
 * empty (once every writer is done, whatever is left). */
static int hash_behind_writers(write_job *j, sha256_ctx *sha, dsv3_error *err)
{
	for (;;) {
		pthread_mutex_lock(&j->lock);
		while (j->writers_left > 0 && atomic_load(&j->next_hash) >= j->reached &&
		       atomic_load(&j->next_hash) < j->n && !atomic_load(&j->stop))
			pthread_cond_wait(&j->progress_cond, &j->lock);
		size_t upto = j->writers_left > 0 ? j->reached : SIZE_MAX;
		pthread_mutex_unlock(&j->lock);
		if (atomic_load(&j->next_hash) >= j->n || atomic_load(&j->stop))
			return 0;
		int rc = hash_queue(j, upto, sha, err);
		if (rc)
			return rc;
	}
}

/* ---- rank files --------------------------------------------------------------------------- */

typedef struct {
	write_job *job;
	st_writer *w;
	uint64_t written, unreported;
} rank_sink_ctx;

static int rank_sink(void *ctx, const uint8_t *p, size_t len, dsv3_error *err)
{
	rank_sink_ctx *c = ctx;
	int rc = st_writer_write(c->w, p, len, err);
	c->written += len;
	c->unreported += len;
	if (c->unreported >= PROGRESS_EVERY) {
		pthread_mutex_lock(&c->job->lock);
		progress_add(&c->job->bar, c->unreported);
		pthread_mutex_unlock(&c->job->lock);
		c->unreported = 0;
	}
	return rc;
}

/* The tensors rank r holds, with their shapes on that rank. */
static int rank_specs(const write_job *j, int r, st_spec **specs, size_t **index, size_t *n)
{
	*specs = malloc((j->n ? j->n : 1) * sizeof **specs);
	*index = malloc((j->n ? j->n : 1) * sizeof **index);
	if (!*specs || !*index)
		return -1;
	*n = 0;
	for (size_t i = 0; i < j->n; i++) {
		const mp_tensor *t = &j->t[i];
		uint64_t a, b;
		if (!rank_slice(t, r, j->mp, j->n_experts, &a, &b))
			continue;
		st_spec *s = &(*specs)[*n];
		s->name = t->name;
		s->dtype = t->dtype;
		s->ndim = t->ndim;
		memcpy(s->shape, t->shape, sizeof s->shape);
		if (is_split(t))
			s->shape[t->split_dim] = (int64_t)(b - a);
		(*index)[(*n)++] = i;
	}
	return 0;
}

static int write_rank_tensors(write_job *j, int r, st_writer *w, const size_t *index, size_t n,
			      dsv3_error *err)
{
	rank_sink_ctx c = { j, w, 0, 0 };
	int rc = 0;
	for (size_t pos = 0; pos < n && !rc; pos++) {
		size_t i = index[st_writer_order(w, pos)];
		uint64_t a, b;
		rank_slice(&j->t[i], r, j->mp, j->n_experts, &a, &b);
		note_reached(j, j->gpos[i]);
		rc = walk_slice(&j->t[i], a, b, rank_sink, &c, &j->stop, err);
	}
	pthread_mutex_lock(&j->lock);
	progress_add(&j->bar, c.unreported);
	pthread_mutex_unlock(&j->lock);
	return rc;
}

static int write_rank(write_job *j, int r, sha256_ctx *sha, dsv3_error *err)
{
	if (j->kept[r]) {
		note_writer_done(j);
		return hash_queue(j, SIZE_MAX, sha, err);
	}
	st_spec *specs = NULL;
	size_t *index = NULL, n = 0;
	st_writer *w = NULL;
	take_writer_slot(j);
	int rc = rank_specs(j, r, &specs, &index, &n)
			 ? dsv3_fail(err, DSV3_EIO, "%s: out of memory", j->tmp_paths[r])
			 : st_writer_open(&w, j->tmp_paths[r], specs, n, NULL, err);
	if (!rc)
		rc = write_rank_tensors(j, r, w, index, n, err);
	if (!rc)
		rc = st_writer_finish(w, j->file_sha[r], err);
	else
		st_writer_abort(w); /* the temporary would be removed by out_dir_close anyway */
	give_writer_slot(j);
	if (!rc && j->res) {
		char name[64];
		mp_file_name(name, sizeof name, r, j->mp);
		rc = resume_finish(j->res, name, j->file_sha[r], NULL, 0, err);
	}
	note_writer_done(j);
	if (!rc)
		rc = hash_queue(j, SIZE_MAX, sha, err); /* help with what nobody has taken yet */
	free(specs);
	free(index);
	return rc;
}

/* Tasks below n_hashers hash; the others write rank i - n_hashers. */
static void run_task(void *arg, size_t i)
{
	write_job *j = arg;
	dsv3_error err = { 0 };
	sha256_ctx *sha = sha256_new();
	int rc;
	if (!sha)
		rc = dsv3_fail(&err, DSV3_EIO, "out of memory");
	else if (i >= j->n_hashers)
		rc = write_rank(j, (int)(i - j->n_hashers), sha, &err);
	else
		rc = hash_behind_writers(j, sha, &err);
	if (rc)
		job_fail(j, &err);
	sha256_free(sha);
}

/* ---- mp_write ----------------------------------------------------------------------------- */

static int job_init(write_job *j, const mp_tensor *t, size_t n, int mp, int n_experts)
{
	memset(j, 0, sizeof *j);
	j->t = t;
	j->n = n;
	j->mp = mp;
	j->n_experts = n_experts;
	j->tmp_paths = calloc((size_t)mp, sizeof *j->tmp_paths);
	j->file_sha = calloc((size_t)mp, sizeof *j->file_sha);
	j->kept = calloc((size_t)mp, 1);
	j->tensor_sha = calloc(n ? n : 1, sizeof *j->tensor_sha);
	j->order = malloc((n ? n : 1) * sizeof *j->order);
	j->gpos = malloc((n ? n : 1) * sizeof *j->gpos);
	if (!j->tmp_paths || !j->file_sha || !j->kept || !j->tensor_sha || !j->order || !j->gpos)
		return -1;
	for (size_t i = 0; i < n; i++)
		j->order[i] = i;
	qsort_r(j->order, n, sizeof *j->order, cmp_layout_index, (void *)t);
	for (size_t k = 0; k < n; k++)
		j->gpos[j->order[k]] = k;
	atomic_init(&j->next_hash, 0);
	atomic_init(&j->stop, 0);
	j->writers_left = mp;
	pthread_mutex_init(&j->lock, NULL);
	pthread_cond_init(&j->progress_cond, NULL);
	return 0;
}

static void job_free(write_job *j)
{
	free(j->tmp_paths);
	free(j->file_sha);
	free(j->kept);
	free(j->tensor_sha);
	free(j->order);
	free(j->gpos);
	pthread_mutex_destroy(&j->lock);
	pthread_cond_destroy(&j->progress_cond);
}

static uint64_t total_written(const write_job *j)
{
	uint64_t total = 0;
	for (size_t i = 0; i < j->n; i++) {
		uint64_t bytes = tensor_bytes(&j->t[i]);
		total += is_split(&j->t[i]) || j->t[i].expert >= 0 ? bytes : bytes * (uint64_t)j->mp;
	}
	return total;
}

/* Tensor bytes of rank r's file. */
static uint64_t rank_bytes(const write_job *j, int r)
{
	uint64_t total = 0;
	for (size_t i = 0; i < j->n; i++) {
		uint64_t a, b;
		if (!rank_slice(&j->t[i], r, j->mp, j->n_experts, &a, &b))
			continue;
		geometry g = tensor_geometry(&j->t[i]);
		total += g.outer * g.inner * (b - a);
	}
	return total;
}

/* Each rank file is taken from a resumed run or registered to be written. */
static int register_ranks(write_job *j, out_dir *o, uint64_t *kept_bytes, dsv3_error *err)
{
	*kept_bytes = 0;
	for (int r = 0; r < j->mp; r++) {
		char name[64];
		mp_file_name(name, sizeof name, r, j->mp);
		const resume_file *f = NULL;
		int rc = j->res ? resume_take(j->res, name, &f, err) : 0;
		if (rc)
			return rc;
		if (f) {
			j->kept[r] = 1;
			memcpy(j->file_sha[r], f->sha256, 32);
			*kept_bytes += rank_bytes(j, r);
			continue;
		}
		j->tmp_paths[r] = out_dir_add(o, name, err);
		if (!j->tmp_paths[r])
			return err->code ? err->code : DSV3_EIO;
	}
	return 0;
}

static int record_manifest(const write_job *j, manifest *m, dsv3_error *err)
{
	for (int r = 0; r < j->mp; r++) {
		char name[64];
		mp_file_name(name, sizeof name, r, j->mp);
		if (manifest_add_file(m, name, j->file_sha[r]))
			return dsv3_fail(err, DSV3_EIO, "manifest: out of memory");
	}
	for (size_t i = 0; i < j->n; i++) {
		const mp_tensor *t = &j->t[i];
		if (manifest_add_tensor(m, t->name, t->dtype, t->ndim, t->shape, j->tensor_sha[i]))
			return dsv3_fail(err, DSV3_EIO, "manifest: out of memory");
	}
	return 0;
}

static int resolve_threads(int threads)
{
	if (threads > 0)
		return threads;
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (int)n : 1;
}

int mp_write(const mp_tensor *t, size_t n, int mp, int n_experts, int threads, out_dir *o,
	     resume_log *res, manifest *m, mp_stats *stats, dsv3_error *err)
{
	write_job j;
	if (job_init(&j, t, n, mp, n_experts)) {
		job_free(&j);
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	}
	j.res = res;
	uint64_t kept_bytes = 0;
	int rc = register_ranks(&j, o, &kept_bytes, err);
	thread_pool *pool = NULL;
	if (!rc) {
		/* `threads` writers at once (their files' hashes on threads of their own) and as
		 * many logical hashers: the two hash about the same number of bytes. */
		int writers = resolve_threads(threads);
		writers = writers < mp ? writers : mp;
		pool = thread_pool_create(2 * writers);
		if (!pool)
			rc = dsv3_fail(err, DSV3_EIO, "cannot start threads");
		/* A hasher waits for writers: at least one thread must be left to write (a pool
		 * may start fewer threads than asked; without hashers writers hash at the end). */
		else if (thread_pool_size(pool) - 1 < writers)
			writers = thread_pool_size(pool) - 1;
		j.n_hashers = (size_t)writers;
		j.max_writing = writers > 0 ? writers : 1;
	}
	if (!rc) {
		progress_start(&j.bar, "writing", total_written(&j) - kept_bytes);
		thread_pool_for(pool, j.n_hashers + (size_t)mp, run_task, &j);
		progress_end(&j.bar);
		if (j.first_err.code) {
			*err = j.first_err;
			rc = err->code;
		}
	}
	if (pool)
		thread_pool_destroy(pool);
	if (!rc)
		rc = record_manifest(&j, m, err);
	if (!rc && stats) {
		stats->bytes_written = total_written(&j);
		stats->n_files = (size_t)mp;
	}
	job_free(&j);
	return rc;
}

static int copy_one(const char *in_dir, const char *name, out_dir *o, manifest *m, dsv3_error *err)
{
	char path[4096];
	uint8_t sha[32];
	snprintf(path, sizeof path, "%s/%s", in_dir, name);
	int rc = sha256_file(path, sha, err);
	if (!rc)
		rc = out_dir_copy_file(o, path, name, err);
	if (!rc && manifest_add_file(m, name, sha))
		rc = dsv3_fail(err, DSV3_EIO, "manifest: out of memory");
	return rc;
}

static int is_regular_file(const char *dir, const char *name)
{
	char path[4096];
	struct stat st;
	snprintf(path, sizeof path, "%s/%s", dir, name);
	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Every regular file whose name contains "token", as convert.py copies them. */
static int copy_token_files(const char *in_dir, out_dir *o, manifest *m, size_t *n_copied,
			    dsv3_error *err)
{
	char **names = NULL;
	size_t n = 0;
	*n_copied = 0;
	int rc = dir_glob(in_dir, "*token*", &names, &n, err);
	for (size_t i = 0; i < n && !rc; i++) {
		if (!is_regular_file(in_dir, names[i]))
			continue;
		rc = copy_one(in_dir, names[i], o, m, err);
		*n_copied += !rc;
	}
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	return rc;
}

int mp_copy_small_files(const char *in_dir, out_dir *o, manifest *m, size_t *n_copied,
			dsv3_error *err)
{
	int rc = copy_token_files(in_dir, o, m, n_copied, err);
	if (!rc && is_regular_file(in_dir, "config.json")) {
		rc = copy_one(in_dir, "config.json", o, m, err);
		*n_copied += !rc;
	}
	return rc;
}

/* The token files copied and config.json written from text. */
static int copy_small_files_config(const char *in_dir, const char *config_text,
				   size_t config_len, out_dir *o, manifest *m, size_t *n_copied,
				   dsv3_error *err)
{
	if (!config_text)
		return mp_copy_small_files(in_dir, o, m, n_copied, err);
	uint8_t sha[32];
	int rc = copy_token_files(in_dir, o, m, n_copied, err);
	sha256_buffer(config_text, config_len, sha);
	if (!rc)
		rc = out_dir_write_file(o, "config.json", config_text, config_len, err);
	if (!rc && manifest_add_file(m, "config.json", sha))
		rc = dsv3_fail(err, DSV3_EIO, "manifest: out of memory");
	*n_copied += !rc;
	return rc;
}

/* ---- the whole checkpoint ---------------------------------------------------------------- */

int mp_write_checkpoint(const mp_checkpoint *c, const mp_tensor *t, size_t n, mp_stats *stats,
			size_t *n_small, dsv3_error *err)
{
	out_dir o;
	manifest m;
	manifest_init(&m);
	int rc = out_dir_open(&o, c->out, err);
	if (rc) {
		manifest_free(&m);
		return rc;
	}
	resume_log res;
	rc = resume_open(&res, &o, c->run_key, c->resume, c->threads, err);
	if (!rc)
		rc = copy_small_files_config(c->in_dir, c->config_text, c->config_len, &o, &m,
					     n_small, err);
	if (!rc)
		rc = mp_write(t, n, c->mp, c->n_experts, c->threads, &o, &res, &m, stats, err);
	if (!rc)
		rc = manifest_write(&m, &o, err);
	if (!rc)
		rc = out_dir_commit(&o, err);
	if (!rc)
		rc = resume_complete(&res, err);
	if (stats)
		stats->resumed = res.stats;
	resume_close(&res);
	out_dir_close(&o);
	manifest_free(&m);
	return rc;
}
