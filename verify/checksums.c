/* dsv3-verify checksums DIR: every line of SHA256SUMS against its file, then every logical
 * tensor of tensors.sha256.json recomputed from the files (DESIGN §3.4). In a converted
 * directory a logical tensor is reassembled from the ranks while it is hashed, never held
 * whole in memory. Files, then tensors, are hashed in parallel. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "convert_names.h"
#include "manifest.h"
#include "sha256.h"
#include "threadpool.h"
#include "verify.h"

#define READ_CHUNK (4u << 20)
#define HASH_BATCH (1u << 20) /* small row pieces are gathered before hashing */
#define DROP_CHUNK (32u << 20) /* mapped bytes are dropped from RSS in pieces this big */

/* Moves the jobs' findings into the list, in job order, so output is deterministic. */
static void collect(problem_list *problems, problem_list *results, size_t n)
{
	for (size_t i = 0; i < n; i++)
		problem_list_take(problems, &results[i]);
}

/* ---- files ---- */

typedef struct {
	const char *dir;
	const manifest *m;
	problem_list *results; /* one per job: the threads never share one */
} file_jobs;

static void check_file(void *arg, size_t i)
{
	file_jobs *j = arg;
	const manifest_file *f = &j->m->files[i];
	problem_list *r = &j->results[i];
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", j->dir, f->name);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT)
			problem_add(r, "%s: missing (listed in SHA256SUMS)", path);
		else
			problem_add(r, "%s: cannot open: %s", path, strerror(errno)), r->io = 1;
		return;
	}
	sha256_ctx *ctx = sha256_new();
	uint8_t *buf = malloc(READ_CHUNK);
	int failed = !ctx || !buf;
	while (!failed) {
		ssize_t n = read(fd, buf, READ_CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			failed = 1;
		if (n <= 0)
			break;
		sha256_update(ctx, buf, (size_t)n);
	}
	/* Hashing leaves file pages cached, not in our resident set. */
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	close(fd);
	uint8_t got[32];
	if (failed) {
		problem_add(r, "%s: cannot read: %s", path, strerror(errno));
		r->io = 1;
	} else {
		sha256_final(ctx, got);
		if (memcmp(got, f->sha256, 32) != 0)
			problem_add(r, "%s: SHA-256 differs from SHA256SUMS", path);
	}
	sha256_free(ctx);
	free(buf);
}

/* A weight file on disk that SHA256SUMS does not cover would go unchecked. */
static void check_unlisted(const ckpt_dir *d, const manifest *m, problem_list *problems)
{
	for (size_t i = 0; i < d->n_files; i++) {
		if (!d->file_names[i])
			continue;
		size_t k = 0;
		while (k < m->n_files && strcmp(m->files[k].name, d->file_names[i]) != 0)
			k++;
		if (k == m->n_files)
			problem_add(problems, "%s/%s: not listed in SHA256SUMS", d->dir,
				    d->file_names[i]);
	}
}

/* ---- tensors ---- */

/* SHA-256 fed in batches: a column-split tensor arrives in row pieces of a few hundred bytes. */
typedef struct {
	sha256_ctx *ctx;
	uint8_t *buf;
	size_t len;
} batch_hash;

static void batch_add(batch_hash *h, const uint8_t *p, size_t n)
{
	if (n >= HASH_BATCH || !h->buf) {
		if (h->len)
			sha256_update(h->ctx, h->buf, h->len);
		h->len = 0;
		sha256_update(h->ctx, p, n);
		return;
	}
	if (h->len + n > HASH_BATCH) {
		sha256_update(h->ctx, h->buf, h->len);
		h->len = 0;
	}
	memcpy(h->buf + h->len, p, n);
	h->len += n;
}

/* Mapped bytes, dropped from our resident set as they are hashed. */
static void batch_add_mapped(batch_hash *h, const uint8_t *p, size_t n)
{
	for (size_t off = 0; off < n; off += DROP_CHUNK) {
		size_t len = n - off < DROP_CHUNK ? n - off : DROP_CHUNK;
		batch_add(h, p + off, len);
		drop_mapped_pages(p + off, len);
	}
}

static void batch_final(batch_hash *h, uint8_t out[32])
{
	if (h->len)
		sha256_update(h->ctx, h->buf, h->len);
	h->len = 0;
	sha256_final(h->ctx, out);
}

typedef struct {
	const ckpt_dir *d;
	const manifest *m;
	problem_list *results; /* one per job: the threads never share one */
} tensor_jobs;

/* The logical tensor's dtype and shape, and its hash, once assembled. */
typedef struct {
	st_dtype dtype;
	int ndim;
	int64_t shape[ST_MAX_DIMS];
	uint8_t sha[32];
} logical_tensor;

static int same_layout_except(const st_tensor *a, const st_tensor *b, int dim)
{
	if (a->dtype != b->dtype || a->ndim != b->ndim)
		return 0;
	for (int k = 0; k < a->ndim; k++)
		if (k != dim && a->shape[k] != b->shape[k])
			return 0;
	return 1;
}

/* Tensor of the HF layout, or a routed expert of a converted one: the bytes of one file. */
static int hash_single(const dir_tensor *t, logical_tensor *out, batch_hash *h)
{
	out->dtype = t->tensor->dtype;
	out->ndim = t->tensor->ndim;
	memcpy(out->shape, t->tensor->shape, sizeof out->shape);
	batch_add_mapped(h, t->tensor->data, t->tensor->nbytes);
	batch_final(h, out->sha);
	return 0;
}

/* Equal bytes, compared piecewise so neither copy is ever resident whole. */
static int same_bytes(const uint8_t *a, const uint8_t *b, size_t n)
{
	int same = 1;
	for (size_t off = 0; off < n && same; off += DROP_CHUNK) {
		size_t len = n - off < DROP_CHUNK ? n - off : DROP_CHUNK;
		same = memcmp(a + off, b + off, len) == 0;
		drop_mapped_pages(a + off, len);
		drop_mapped_pages(b + off, len);
	}
	return same;
}

/* Replicated in a converted checkpoint: rank 0's bytes; every other copy must equal them. */
static int hash_replicated(const ckpt_dir *d, const dir_tensor *t, size_t n, logical_tensor *out,
			   batch_hash *h, problem_list *r)
{
	char path[4096];
	for (size_t k = 1; k < n; k++) {
		const st_tensor *a = t[0].tensor, *b = t[k].tensor;
		if (!same_layout_except(a, b, -1) || !same_bytes(a->data, b->data, a->nbytes)) {
			ckpt_dir_file_path(d, t[k].file, path, sizeof path);
			problem_add(r, "%s: tensor %s: replicated copy differs from rank %zu's",
				    path, t->name, t[0].file);
		}
	}
	return hash_single(&t[0], out, h);
}

/* Dim-1 split: row by row, each rank's piece of the row in rank order. */
static void hash_column_split(const dir_tensor *t, size_t n, int64_t rows, batch_hash *h)
{
	int64_t done = 0; /* rows whose pages were dropped */
	size_t row_bytes = 0;
	for (size_t k = 0; k < n; k++)
		row_bytes += rows ? t[k].tensor->nbytes / (size_t)rows : 0;
	int64_t rows_per_drop = row_bytes ? (int64_t)(DROP_CHUNK / row_bytes) + 1 : rows;
	for (int64_t row = 0; row < rows; row++) {
		for (size_t k = 0; k < n; k++) {
			size_t piece = t[k].tensor->nbytes / (size_t)rows;
			batch_add(h, t[k].tensor->data + (size_t)row * piece, piece);
		}
		if (row + 1 - done >= rows_per_drop || row + 1 == rows) {
			for (size_t k = 0; k < n; k++) {
				size_t piece = t[k].tensor->nbytes / (size_t)rows;
				drop_mapped_pages(t[k].tensor->data + (size_t)done * piece,
						  (size_t)(row + 1 - done) * piece);
			}
			done = row + 1;
		}
	}
}

/* Split along dim 0: concatenation in rank order; dim 1: per row, the ranks' column pieces. */
static int hash_split(const ckpt_dir *d, const dir_tensor *t, size_t n, int dim,
		      logical_tensor *out, batch_hash *h, problem_list *r)
{
	char path[4096];
	const st_tensor *first = t[0].tensor;
	if (n != (size_t)d->mp || first->ndim <= dim) {
		problem_add(r, "%s: tensor %s: split along dim %d but found on %zu of %d ranks",
			    d->dir, t->name, dim, n, d->mp);
		return -1;
	}
	out->dtype = first->dtype;
	out->ndim = first->ndim;
	memcpy(out->shape, first->shape, sizeof out->shape);
	out->shape[dim] = 0;
	for (size_t k = 0; k < n; k++) {
		if (!same_layout_except(first, t[k].tensor, dim)) {
			ckpt_dir_file_path(d, t[k].file, path, sizeof path);
			problem_add(r, "%s: tensor %s: dtype or shape does not match "
				    "rank 0's piece", path, t->name);
			return -1;
		}
		out->shape[dim] += t[k].tensor->shape[dim];
	}
	if (dim == 0) {
		for (size_t k = 0; k < n; k++)
			batch_add_mapped(h, t[k].tensor->data, t[k].tensor->nbytes);
	} else {
		/* rows = product of dims before `dim`, each rank's row piece = the rest */
		int64_t rows = 1;
		for (int k = 0; k < dim; k++)
			rows *= first->shape[k];
		hash_column_split(t, n, rows, h);
	}
	batch_final(h, out->sha);
	return 0;
}

static int assemble_converted(const ckpt_dir *d, const char *name, const dir_tensor *t, size_t n,
			      logical_tensor *out, batch_hash *h, problem_list *r)
{
	converted_name info;
	if (converted_name_info(name, &info)) {
		problem_add(r, "%s: tensor %s: not a converted tensor name", d->dir, name);
		return -1;
	}
	if (info.expert >= 0) {
		if (n != 1) {
			problem_add(r, "%s: tensor %s: routed expert found on %zu ranks, "
				    "expected 1", d->dir, name, n);
			return -1;
		}
		return hash_single(t, out, h);
	}
	if (info.split_dim == SPLIT_NONE) {
		if (n != (size_t)d->mp)
			problem_add(r, "%s: tensor %s: replicated but found on %zu of %d ranks",
				    d->dir, name, n, d->mp);
		return hash_replicated(d, t, n, out, h, r);
	}
	return hash_split(d, t, n, info.split_dim, out, h, r);
}

static void compare_logical(const ckpt_dir *d, const manifest_tensor *mt, const dir_tensor *t,
			    size_t n, const logical_tensor *got, problem_list *r)
{
	char where[4096], s1[256], s2[256];
	if (n == 1)
		ckpt_dir_file_path(d, t->file, where, sizeof where);
	else
		snprintf(where, sizeof where, "%s (%zu ranks)", d->dir, n);
	int same_shape = got->ndim == mt->ndim;
	for (int k = 0; same_shape && k < got->ndim; k++)
		same_shape = got->shape[k] == mt->shape[k];
	if (got->dtype != mt->dtype) {
		problem_add(r, "%s: tensor %s: dtype %s, tensors.sha256.json says %s",
			    where, mt->name, dtype_name(got->dtype), dtype_name(mt->dtype));
	} else if (!same_shape) {
		shape_text(got->ndim, got->shape, s1, sizeof s1);
		shape_text(mt->ndim, mt->shape, s2, sizeof s2);
		problem_add(r, "%s: tensor %s: shape %s, tensors.sha256.json says %s",
			    where, mt->name, s1, s2);
	} else if (memcmp(got->sha, mt->sha256, 32) != 0) {
		problem_add(r, "%s: tensor %s: SHA-256 differs from tensors.sha256.json", where,
			    mt->name);
	}
}

static void check_tensor(void *arg, size_t i)
{
	tensor_jobs *j = arg;
	const manifest_tensor *mt = &j->m->tensors[i];
	problem_list *r = &j->results[i];
	size_t n;
	const dir_tensor *t = ckpt_dir_find(j->d, mt->name, &n);
	if (!t) {
		problem_add(r, "%s: tensor %s: in tensors.sha256.json but in no file", j->d->dir,
			    mt->name);
		return;
	}
	batch_hash h = { sha256_new(), malloc(HASH_BATCH), 0 };
	logical_tensor got;
	int rc;
	if (!h.ctx) {
		r->io = 1;
		rc = -1;
	} else if (j->d->converted) {
		rc = assemble_converted(j->d, mt->name, t, n, &got, &h, r);
	} else if (n != 1) {
		char a[4096], b[4096];
		ckpt_dir_file_path(j->d, t[0].file, a, sizeof a);
		ckpt_dir_file_path(j->d, t[1].file, b, sizeof b);
		problem_add(r, "%s: tensor %s: also in %s", a, mt->name, b);
		rc = -1;
	} else {
		rc = hash_single(t, &got, &h);
	}
	if (!rc)
		compare_logical(j->d, mt, t, n, &got, r);
	sha256_free(h.ctx);
	free(h.buf);
}

static int cmp_manifest_name(const void *key, const void *elem)
{
	return strcmp(key, ((const manifest_tensor *)elem)->name);
}

static int cmp_manifest_tensor(const void *a, const void *b)
{
	return strcmp(((const manifest_tensor *)a)->name, ((const manifest_tensor *)b)->name);
}

/* A tensor no manifest entry covers would go unchecked. */
static void check_uncovered(const ckpt_dir *d, const manifest *m, problem_list *problems)
{
	char path[4096];
	for (size_t i = 0; i < d->n_tensors; i++) {
		const dir_tensor *t = &d->tensors[i];
		if (i > 0 && strcmp(d->tensors[i - 1].name, t->name) == 0)
			continue;
		if (!bsearch(t->name, m->tensors, m->n_tensors, sizeof *m->tensors,
			     cmp_manifest_name)) {
			ckpt_dir_file_path(d, t->file, path, sizeof path);
			problem_add(problems, "%s: tensor %s: not in tensors.sha256.json", path,
				    t->name);
		}
	}
}

/* Files and tensors in one parallel loop (a file's hash is one serial pass, so the big files
 * and the big tensors are best hashed side by side); findings are reported files first. */
typedef struct {
	file_jobs files;
	tensor_jobs tensors;
} all_jobs;

static void check_one(void *arg, size_t i)
{
	all_jobs *j = arg;
	if (i < j->files.m->n_files)
		check_file(&j->files, i);
	else
		check_tensor(&j->tensors, i - j->files.m->n_files);
}

static int check_all(const char *dir, const ckpt_dir *d, manifest *m, thread_pool *pool,
		     problem_list *problems)
{
	qsort(m->tensors, m->n_tensors, sizeof *m->tensors, cmp_manifest_tensor);
	size_t n = m->n_files + m->n_tensors;
	problem_list *results = calloc(n + 1, sizeof *results);
	if (!results)
		return -1;
	all_jobs j = { { dir, m, results }, { d, m, results + m->n_files } };
	thread_pool_for(pool, n, check_one, &j);
	collect(problems, results, n);
	free(results);
	check_unlisted(d, m, problems);
	check_uncovered(d, m, problems);
	return 0;
}

/* ---- the subcommand ---- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " VERIFY_PROG " checksums [--threads T] DIR\n"
		"\n"
		"Checks every line of DIR/SHA256SUMS against its file, then recomputes the SHA-256\n"
		"of every logical tensor in DIR/tensors.sha256.json (dtype, shape, hash). DIR is a\n"
		"Hugging Face checkpoint or a converted one (model{r}-mp{N}.safetensors), whose\n"
		"tensors are reassembled from the ranks as they are hashed.\n"
		"\n"
		"  -t, --threads T  hashing threads (default: all cores)\n"
		"  -h, --help       this help\n"
		"\n"
		"Prints \"OK: N files, M tensors verified\" or every problem; exit 0 ok, 2 a problem,\n"
		"3 an I/O error, 1 a usage error.\n");
}

static int parse_args(int argc, char **argv, const char **dir, int *threads, int *done)
{
	static const struct option longopts[] = {
		{ "threads", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	*done = 0;
	while ((c = getopt_long(argc, argv, "t:h", longopts, NULL)) != -1) {
		if (c == 'h') {
			usage(stdout);
			*done = 1;
			return 0;
		}
		if (c != 't') {
			usage(stderr);
			return DSV3_EUSAGE;
		}
		dsv3_error err = { 0 };
		if (cli_parse_int(optarg, "--threads", 1, 4096, threads, &err)) {
			dsv3_report(VERIFY_PROG " checksums", &err);
			usage(stderr);
			return DSV3_EUSAGE;
		}
	}
	if (argc - optind != 1) {
		fprintf(stderr, VERIFY_PROG " checksums: expected one directory\n");
		usage(stderr);
		return DSV3_EUSAGE;
	}
	*dir = argv[optind];
	return 0;
}

static int run_checks(const char *dir, manifest *m, thread_pool *pool, problem_list *problems,
		      dsv3_error *err)
{
	ckpt_dir d;
	int rc = ckpt_dir_open(&d, dir, problems, err);
	if (rc)
		return rc;
	if (check_all(dir, &d, m, pool, problems))
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	ckpt_dir_close(&d);
	return rc;
}

int verify_checksums(int argc, char **argv)
{
	const char *dir = NULL;
	int threads = 0, done;
	int rc = parse_args(argc, argv, &dir, &threads, &done);
	if (rc || done)
		return rc;
	dsv3_error err = { 0 };
	manifest m;
	manifest_init(&m);
	if ((rc = manifest_read(&m, dir, &err)))
		return dsv3_report(VERIFY_PROG, &err);
	thread_pool *pool = thread_pool_create(threads);
	if (!pool) {
		manifest_free(&m);
		dsv3_fail(&err, DSV3_EIO, "cannot start threads");
		return dsv3_report(VERIFY_PROG, &err);
	}
	problem_list problems = { 0 };
	rc = run_checks(dir, &m, pool, &problems, &err);
	if (rc)
		problem_add_error(&problems, &err);
	rc = problem_list_report(&problems, NULL);
	if (rc == DSV3_OK)
		printf("OK: %zu files, %zu tensors verified\n", m.n_files, m.n_tensors);
	else
		fprintf(stderr, VERIFY_PROG " checksums: %zu problem(s) in %s\n", problems.n, dir);
	problem_list_free(&problems);
	thread_pool_destroy(pool);
	manifest_free(&m);
	return rc;
}
