/* Streams a synthetic checkpoint to disk (see checkpoint.h). Memory stays at two fixed chunks:
 * tensors are cut into chunks, and while one chunk is written (the writer hashes the file as it
 * goes) and hashed for its tensor's logical hash, the next is generated on the other cores. */
#include "checkpoint.h"

#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "manifest.h"
#include "out_dir.h"
#include "plan.h"
#include "progress.h"
#include "safetensors.h"
#include "sha256.h"
#include "threadpool.h"
#include "values.h"

#define CHUNK_BYTES (16u << 20) /* generated, then written, at a time */
#define PIECE_BYTES (1u << 20)  /* one thread's share of a chunk */
#define INDEX_NAME "model.safetensors.index.json"

/* Everything one run holds. */
typedef struct {
	const synth_job *job;
	out_dir out;
	manifest man;
	thread_pool *pool;
	fp8_table *table;
	uint8_t *buf[2]; /* one chunk being generated while the other is written */
	sha256_ctx *tensor_sha;
	progress prog;
} synth_run;

/* A piece of one tensor, at most one chunk: the unit of the pipeline. */
typedef struct {
	size_t ti;      /* layout index */
	uint64_t first; /* element */
	size_t n;       /* elements */
	int last;       /* the tensor's last chunk */
	value_gen gen;
	uint8_t *buf;
} chunk;

/* Walks a file's tensors in the writer's order, chunk by chunk. */
typedef struct {
	synth_run *r;
	st_writer *w;
	const size_t *idx; /* layout index of each spec */
	size_t m, pos;
	uint64_t first;
} chunk_cursor;

static uint64_t numel(const layout_tensor *t)
{
	return (uint64_t)t->shape[0] * (uint64_t)(t->ndim == 2 ? t->shape[1] : 1);
}

/* The next chunk into `buf`; 0 when the file is done. */
static int next_chunk(chunk_cursor *cur, chunk *c, uint8_t *buf)
{
	const synth_job *job = cur->r->job;
	if (cur->pos == cur->m)
		return 0;
	size_t ti = cur->idx[st_writer_order(cur->w, cur->pos)];
	const layout_tensor *t = &job->tensors[ti];
	uint64_t total = numel(t), per_chunk = CHUNK_BYTES / dtype_size(t->dtype);
	uint64_t left = total - cur->first;
	*c = (chunk){ .ti = ti, .first = cur->first, .buf = buf,
		      .n = (size_t)(left < per_chunk ? left : per_chunk) };
	c->last = c->n == left;
	/* a scale follows its weight in the layout; its values depend on the weight's fan-in */
	int64_t weight_fan_in = t->role == ROLE_SCALE ? job->tensors[ti - 1].fan_in : 0;
	value_gen_init(&c->gen, t, ti, weight_fan_in, job->seed, job->config, cur->r->table);
	cur->first += c->n;
	if (c->last) {
		cur->pos++;
		cur->first = 0;
	}
	return 1;
}

/* Streams a file's pages to disk as it grows and drops them from the page cache once written,
 * so dirty pages never pile up (the final fsync does not stall the run) and the page cache is
 * not filled with data nobody reads. Purely advice: errors are ignored, the fsync decides. */
typedef struct {
	int fd;           /* a second descriptor on the file the writer writes; -1: none */
	uint64_t kicked;  /* writeback started below this offset */
	uint64_t dropped; /* written back and dropped below this offset */
} writeback;

#define WRITEBACK_LAG (64ull << 20)

static void writeback_advance(writeback *wb)
{
	struct stat st;
	if (wb->fd < 0 || fstat(wb->fd, &st) != 0)
		return;
	uint64_t end = (uint64_t)st.st_size;
	if (end > wb->kicked) {
		sync_file_range(wb->fd, (off_t)wb->kicked, (off_t)(end - wb->kicked),
				SYNC_FILE_RANGE_WRITE);
		wb->kicked = end;
	}
	if (end > wb->dropped + 2 * WRITEBACK_LAG) {
		uint64_t to = end - WRITEBACK_LAG;
		sync_file_range(wb->fd, (off_t)wb->dropped, (off_t)(to - wb->dropped),
				SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
					SYNC_FILE_RANGE_WAIT_AFTER);
		posix_fadvise(wb->fd, (off_t)wb->dropped, (off_t)(to - wb->dropped),
			      POSIX_FADV_DONTNEED);
		wb->dropped = to;
	}
}

/* One pipeline step, as one parallel-for: task 0 writes the previous chunk to the file (the
 * writer hashes the file as it goes), task 1 hashes it for its tensor's logical hash, tasks
 * 2.. generate the next chunk's pieces. Whoever is not blocked on the disk generates. */
typedef struct {
	st_writer *w;
	writeback *wb;
	sha256_ctx *tensor_sha;
	const chunk *done; /* NULL at the start of a file */
	const chunk *next; /* NULL at its end */
	size_t piece;      /* elements per generation task */
	int rc;
	dsv3_error err;
} pipeline_step;

static size_t chunk_bytes(const synth_run *r, const chunk *c)
{
	return c->n * dtype_size(r->job->tensors[c->ti].dtype);
}

static void step_task(void *arg, size_t i)
{
	pipeline_step *s = arg;
	if (i < 2) {
		if (!s->done)
			return;
		size_t len = s->done->n * dtype_size(s->done->gen.dtype);
		if (i == 0) {
			s->rc = st_writer_write(s->w, s->done->buf, len, &s->err);
			writeback_advance(s->wb);
		} else {
			sha256_update(s->tensor_sha, s->done->buf, len);
		}
		return;
	}
	const chunk *c = s->next;
	size_t begin = (i - 2) * s->piece;
	size_t n = c->n - begin < s->piece ? c->n - begin : s->piece;
	value_gen_fill(&c->gen, c->first + begin, n, c->buf + begin * dtype_size(c->gen.dtype));
}

/* After a chunk is on its way to disk: progress, and the tensor's hash when it was its last. */
static int chunk_written(synth_run *r, const chunk *c, dsv3_error *err)
{
	progress_add(&r->prog, chunk_bytes(r, c));
	if (!c->last)
		return 0;
	const layout_tensor *t = &r->job->tensors[c->ti];
	uint8_t digest[32];
	sha256_final(r->tensor_sha, digest);
	if (manifest_add_tensor(&r->man, t->name, t->dtype, t->ndim, t->shape, digest))
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", t->name);
	return 0;
}

static int stream_tensors(synth_run *r, st_writer *w, writeback *wb, const size_t *idx,
			  size_t m, dsv3_error *err)
{
	chunk_cursor cur = { .r = r, .w = w, .idx = idx, .m = m };
	chunk slot[2];
	chunk *done = NULL, *next = next_chunk(&cur, &slot[0], r->buf[0]) ? &slot[0] : NULL;
	for (int k = 1; done || next; k ^= 1) {
		pipeline_step s = { .w = w, .wb = wb, .tensor_sha = r->tensor_sha, .done = done,
				    .next = next };
		size_t tasks = 2;
		if (next) {
			s.piece = PIECE_BYTES / dtype_size(next->gen.dtype);
			tasks += (next->n + s.piece - 1) / s.piece;
		}
		thread_pool_for(r->pool, tasks, step_task, &s);
		if (s.rc) {
			*err = s.err;
			return s.rc;
		}
		int rc = done ? chunk_written(r, done, err) : 0;
		if (rc)
			return rc;
		done = next;
		next = next_chunk(&cur, &slot[k], r->buf[k]) ? &slot[k] : NULL;
	}
	return 0;
}

static void file_name(char *buf, size_t size, int k, int n_files)
{
	snprintf(buf, size, "model-%05d-of-%05d.safetensors", k + 1, n_files);
}

/* Writes tensors with `idx` (layout indices, m of them) into one safetensors file, in the
 * order the writer lays them out. */
static int write_tensors(synth_run *r, const char *name, const size_t *idx, st_spec *specs,
			 size_t m, dsv3_error *err)
{
	static const char *const metadata[] = { "format", "pt", NULL };
	const char *path = out_dir_add(&r->out, name, err);
	if (!path)
		return err->code;
	st_writer *w;
	int rc = st_writer_open(&w, path, specs, m, metadata, err);
	if (rc)
		return rc;
	writeback wb = { .fd = open(path, O_RDONLY | O_CLOEXEC) };
	rc = stream_tensors(r, w, &wb, idx, m, err);
	if (wb.fd >= 0)
		close(wb.fd);
	uint8_t digest[32];
	if (!rc)
		rc = st_writer_finish(w, digest, err);
	if (rc) {
		st_writer_abort(w);
		return rc;
	}
	if (manifest_add_file(&r->man, name, digest))
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", name);
	return 0;
}

static int write_file(synth_run *r, int k, dsv3_error *err)
{
	const synth_job *job = r->job;
	size_t m = 0;
	for (size_t i = 0; i < job->n_tensors; i++)
		m += job->file_of[i] == k;
	size_t *idx = malloc(m * sizeof *idx);
	st_spec *specs = calloc(m, sizeof *specs);
	char name[64];
	file_name(name, sizeof name, k, job->n_files);
	if (!idx || !specs) {
		free(idx);
		free(specs);
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", name);
	}
	for (size_t i = 0, j = 0; i < job->n_tensors; i++) {
		const layout_tensor *t = &job->tensors[i];
		if (job->file_of[i] != k)
			continue;
		idx[j] = i;
		specs[j] = (st_spec){ .name = t->name, .dtype = t->dtype, .ndim = t->ndim };
		memcpy(specs[j].shape, t->shape, sizeof t->shape);
		j++;
	}
	int rc = write_tensors(r, name, idx, specs, m, err);
	free(idx);
	free(specs);
	return rc;
}

/* A small file written whole, and its line in SHA256SUMS. */
static int write_small(synth_run *r, const char *name, const char *text, dsv3_error *err)
{
	int rc = out_dir_write_file(&r->out, name, text, strlen(text), err);
	if (rc)
		return rc;
	uint8_t digest[32];
	sha256_buffer(text, strlen(text), digest);
	if (manifest_add_file(&r->man, name, digest))
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", name);
	return 0;
}

/* {"metadata": {"total_size": N}, "weight_map": {tensor: file}} in layout order, indent 2. */
static int write_index(synth_run *r, dsv3_error *err)
{
	const synth_job *job = r->job;
	json_t *map = json_object();
	uint64_t total = 0;
	int bad = !map;
	for (size_t i = 0; i < job->n_tensors && !bad; i++) {
		char name[64];
		file_name(name, sizeof name, job->file_of[i], job->n_files);
		bad = json_object_set_new(map, job->tensors[i].name, json_string(name)) != 0;
		total += layout_tensor_bytes(&job->tensors[i]);
	}
	json_t *root = json_pack("{s:{s:I}}", "metadata", "total_size", (json_int_t)total);
	char *text = NULL;
	if (root && !bad && json_object_set(root, "weight_map", map) == 0)
		text = json_dumps(root, JSON_INDENT(2));
	json_decref(root);
	json_decref(map);
	if (!text)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", INDEX_NAME);
	int rc = write_small(r, INDEX_NAME, text, err);
	free(text);
	return rc;
}

static int hash_file(const char *path, uint8_t digest[32], dsv3_error *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return dsv3_fail_errno(err, "cannot open %s", path);
	sha256_ctx *h = sha256_new();
	char buf[65536];
	ssize_t k = 0;
	while (h && (k = read(fd, buf, sizeof buf)) > 0)
		sha256_update(h, buf, (size_t)k);
	int rc = 0;
	if (!h)
		rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	else if (k < 0)
		rc = dsv3_fail_errno(err, "cannot read %s", path);
	else
		sha256_final(h, digest);
	sha256_free(h);
	close(fd);
	return rc;
}

static int copy_tokenizer(synth_run *r, dsv3_error *err)
{
	static const char *const names[] = { "tokenizer.json", "tokenizer_config.json" };
	for (size_t i = 0; i < 2; i++) {
		char src[4096];
		int len = snprintf(src, sizeof src, "%s/%s", r->job->tokenizer_dir, names[i]);
		if (len < 0 || (size_t)len >= sizeof src)
			return dsv3_fail(err, DSV3_EUSAGE, "--tokenizer: path too long");
		int rc = out_dir_copy_file(&r->out, src, names[i], err);
		uint8_t digest[32];
		/* hash the copy just written (the last registered temporary), not the source */
		if (!rc)
			rc = hash_file(r->out.tmp_paths[r->out.n - 1], digest, err);
		if (rc)
			return rc;
		if (manifest_add_file(&r->man, names[i], digest))
			return dsv3_fail(err, DSV3_EIO, "%s: out of memory", names[i]);
	}
	return 0;
}

static int run_open(synth_run *r, const synth_job *job, const char *out, dsv3_error *err)
{
	memset(r, 0, sizeof *r);
	r->job = job;
	manifest_init(&r->man);
	r->pool = thread_pool_create(job->threads);
	r->table = malloc(sizeof *r->table);
	r->buf[0] = malloc(CHUNK_BYTES);
	r->buf[1] = malloc(CHUNK_BYTES);
	r->tensor_sha = sha256_new();
	if (!r->pool || !r->table || !r->buf[0] || !r->buf[1] || !r->tensor_sha)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	fp8_table_init(r->table);
	return out_dir_open(&r->out, out, err);
}

static void run_close(synth_run *r)
{
	out_dir_close(&r->out); /* removes the temporaries of a failed run */
	manifest_free(&r->man);
	if (r->pool)
		thread_pool_destroy(r->pool);
	free(r->table);
	free(r->buf[0]);
	free(r->buf[1]);
	sha256_free(r->tensor_sha);
}

static int write_everything(synth_run *r, dsv3_error *err)
{
	const synth_job *job = r->job;
	uint64_t total = 0;
	for (size_t i = 0; i < job->n_tensors; i++)
		total += layout_tensor_bytes(&job->tensors[i]);
	int rc = write_small(r, "config.json", job->config_text, err);
	progress_start(&r->prog, "dsv3-synth", total);
	for (int k = 0; k < job->n_files && !rc; k++)
		rc = write_file(r, k, err);
	progress_end(&r->prog);
	if (!rc)
		rc = write_index(r, err);
	if (!rc && job->tokenizer_dir)
		rc = copy_tokenizer(r, err);
	if (!rc)
		rc = manifest_write(&r->man, &r->out, err);
	if (!rc)
		rc = out_dir_commit(&r->out, err);
	return rc;
}

int synth_write_checkpoint(const synth_job *job, const char *out, dsv3_error *err)
{
	synth_run r;
	int rc = run_open(&r, job, out, err);
	if (!rc)
		rc = write_everything(&r, err);
	run_close(&r);
	return rc;
}
