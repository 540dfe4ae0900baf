/* The cast, in the order fp8_cast_bf16.py does it: files sorted by name, within a file every
 * tensor (scales dropped, F8_E4M3 weights dequantised, the rest copied), then the index
 * without the converted weights' scales. Differences: the input is checked whole first, a
 * weight without a scale is refused instead of copied as FP8, and config.json, the other
 * files and the manifests are written too, all through one atomic output directory. */
#include "fp8_cast.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "hf_ckpt.h"
#include "hf_json.h"
#include "manifest.h"
#include "out_dir.h"
#include "progress.h"
#include "resume.h"
#include "py_json.h"
#include "safetensors.h"
#include "sha256.h"
#include "tensor_rules.h"
#include "threadpool.h"
#include "write_pipe.h"

#define INDEX_NAME "model.safetensors.index.json"
#define CONFIG_NAME "config.json"
#define SCALE_SUFFIX "_scale_inv"
#define CHUNK_BYTES (16u << 20) /* output bytes dequantised per step */
#define COPY_PIECE (8u << 20)   /* copied tensors reach the writer in pieces this big */
#define THREADS_PER_FILE 4      /* a file's writer, hasher and ~2 dequantisers */

/* One output tensor and where its bytes come from. */
typedef struct {
	const st_tensor *src;
	size_t file;
	const st_tensor *scale; /* F8_E4M3 weights only */
	size_t scale_file;
	st_spec spec;
} cast_item;

typedef struct {
	const fp8_cast_options *opt;
	hf_ckpt ckpt;
	json_t *config; /* NULL when the input has no config.json */
	int block_rows, block_cols;
	out_dir out;
	resume_log res;
	manifest man;
	progress bar;
	fp8_cast_stats *stats;
	pthread_mutex_t lock; /* out, res, man, bar, next_file and failed, shared by the file workers */
	size_t next_file;
	int failed;
} fp8_cast;

/* Writes one output file at a time with its own dequantisation pool and writer pipeline.
 * A file's SHA-256 is one serial pass inside st_writer_write, so throughput comes from
 * several files in flight at once. */
typedef struct {
	fp8_cast *fc;
	thread_pool *pool;
	write_pipe pipe;
	int next_buffer;
	fp8_cast_stats stats;
	pthread_t thread;
	int rc;
	dsv3_error err;
} file_worker;

/* ---- small helpers ---- */

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int64_t ceil_div(int64_t a, int64_t b)
{
	return (a + b - 1) / b;
}

static void shape_text(const st_tensor *t, char *buf, size_t len)
{
	size_t o = (size_t)snprintf(buf, len, "[");
	for (int d = 0; d < t->ndim && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}

/* The scale of weight `name`, anywhere in the checkpoint (fp8_cast_bf16.py looks it up through
 * the index, so it may sit in another file). */
static const st_tensor *find_scale(const hf_ckpt *c, const char *name, size_t *file)
{
	char scale_name[1024];
	if ((size_t)snprintf(scale_name, sizeof scale_name, "%s%s", name, SCALE_SUFFIX) >=
	    sizeof scale_name)
		return NULL;
	return hf_ckpt_find(c, scale_name, file);
}

/* ---- input ---- */

/* fp8_cast_bf16.py needs no config.json; one is rewritten only when present. */
static int load_config(fp8_cast *fc, dsv3_error *err)
{
	fc->block_rows = fc->block_cols = 128;
	int rc = hf_config_load(fc->opt->in_dir, &fc->config, err);
	if (!rc && fc->config)
		rc = hf_config_block_size(fc->config, &fc->block_rows, &fc->block_cols,
					  fc->opt->in_dir, err);
	return rc;
}

/* Checks one F8_E4M3 weight: 2-D, its scale present, F32, [ceil(rows/br), ceil(cols/bc)]. */
static void check_fp8_weight(const fp8_cast *fc, size_t file, const st_tensor *t,
			     problem_list *problems, size_t *missing)
{
	const char *fname = fc->ckpt.file_names[file];
	char shape[128], sshape[128];
	shape_text(t, shape, sizeof shape);
	if (t->ndim != 2) {
		problem_add(problems, "%s/%s: tensor %s: F8_E4M3 weight of shape %s is not 2-D",
			    fc->opt->in_dir, fname, t->name, shape);
		return;
	}
	size_t sfile;
	const st_tensor *s = find_scale(&fc->ckpt, t->name, &sfile);
	if (!s) {
		problem_add(problems, "%s/%s: tensor %s: F8_E4M3 weight has no scale %s%s",
			    fc->opt->in_dir, fname, t->name, t->name, SCALE_SUFFIX);
		(*missing)++;
		return;
	}
	const char *sname = fc->ckpt.file_names[sfile];
	shape_text(s, sshape, sizeof sshape);
	int64_t er = ceil_div(t->shape[0], fc->block_rows), ec = ceil_div(t->shape[1], fc->block_cols);
	if (s->dtype != ST_F32)
		problem_add(problems, "%s/%s: tensor %s: scale %s in %s is %s, expected F32",
			    fc->opt->in_dir, fname, t->name, s->name, sname, dtype_name(s->dtype));
	else if (s->ndim != 2 || s->shape[0] != er || s->shape[1] != ec)
		problem_add(problems,
			    "%s/%s: tensor %s of shape %s: scale %s in %s has shape %s, expected [%lld, %lld]",
			    fc->opt->in_dir, fname, t->name, shape, s->name, sname, sshape,
			    (long long)er, (long long)ec);
}

/* Everything that would make the cast fail on its input, found before anything is written. */
static int check_input(fp8_cast *fc, problem_list *problems, dsv3_error *err)
{
	size_t missing = 0;
	for (size_t f = 0; f < fc->ckpt.n_files; f++) {
		const st_file *sf = &fc->ckpt.files[f];
		for (size_t i = 0; i < sf->n_tensors; i++)
			if (sf->tensors[i].dtype == ST_F8_E4M3 &&
			    !ends_with(sf->tensors[i].name, SCALE_SUFFIX))
				check_fp8_weight(fc, f, &sf->tensors[i], problems, &missing);
	}
	/* By dtype, as fp8_cast_bf16.py works, so any module is cast (V3.2-Exp's indexer too); the
	 * scale and 1-byte rules still hold (a weight_scale, an F8_E5M2, a scale without its FP8
	 * weight). The scales of F8 weights were checked above. */
	tensor_rules_check_hf_ckpt(&fc->ckpt, TENSOR_RULES_ANY_MODULE | TENSOR_RULES_OWN_SCALE_CHECK,
				   problems);
	if (problem_list_exit_code(problems) == DSV3_OK)
		return 0;
	if (missing)
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: %zu problem(s), %zu F8_E4M3 weight(s) without a scale; nothing written",
				 fc->opt->in_dir, problems->n, missing);
	return dsv3_fail(err, DSV3_EDATA, "%s: %zu problem(s) with its tensors; nothing written",
			 fc->opt->in_dir, problems->n);
}

/* The output tensors of file f (scales dropped), with their sources. */
static int plan_file(const fp8_cast *fc, size_t f, cast_item **items, size_t *n, dsv3_error *err)
{
	const st_file *sf = &fc->ckpt.files[f];
	*items = calloc(sf->n_tensors + 1, sizeof **items);
	*n = 0;
	if (!*items)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", sf->path);
	for (size_t i = 0; i < sf->n_tensors; i++) {
		const st_tensor *t = &sf->tensors[i];
		if (ends_with(t->name, SCALE_SUFFIX))
			continue;
		cast_item *it = &(*items)[(*n)++];
		it->src = t;
		it->file = f;
		it->spec.name = t->name;
		it->spec.dtype = t->dtype;
		it->spec.ndim = t->ndim;
		memcpy(it->spec.shape, t->shape, sizeof it->spec.shape);
		if (t->dtype == ST_F8_E4M3) {
			it->scale = find_scale(&fc->ckpt, t->name, &it->scale_file);
			it->spec.dtype = ST_BF16;
		}
	}
	return 0;
}

/* ---- dequantisation ---- */

typedef struct {
	const uint8_t *src;   /* first FP8 row of the chunk */
	uint16_t *dst;        /* first BF16 row of the chunk */
	const uint8_t *scale; /* the scale's F32 bytes */
	int64_t row0, cols, scale_cols;
	int block_rows, block_cols;
} dequant_chunk;

/* One row: each 128-column piece times its block's scale (a float32 product rounded to BF16,
 * as fp8_cast_bf16.py's kernel computes it). */
static void dequant_row(void *arg, size_t i)
{
	const dequant_chunk *d = arg;
	int64_t r = d->row0 + (int64_t)i;
	const uint8_t *src = d->src + (int64_t)i * d->cols;
	uint16_t *dst = d->dst + (int64_t)i * d->cols;
	const uint8_t *srow = d->scale + (size_t)(r / d->block_rows) * (size_t)d->scale_cols * 4;
	for (int64_t c = 0, b = 0; c < d->cols; c += d->block_cols, b++) {
		float s;
		memcpy(&s, srow + 4 * b, 4); /* tensor data need not be 4-aligned */
		int64_t n = d->cols - c < d->block_cols ? d->cols - c : d->block_cols;
		e4m3_scale_to_bf16(dst + c, src + c, (size_t)n, s);
	}
}

static void push_piece(file_worker *w, const uint8_t *data, size_t len, int buffer, long tensor,
		       const st_file *file)
{
	pipe_piece piece = { .data = data, .len = len, .buffer = buffer, .tensor = tensor,
			     .file = file };
	write_pipe_push(&w->pipe, &piece);
	pthread_mutex_lock(&w->fc->lock);
	progress_add(&w->fc->bar, len);
	pthread_mutex_unlock(&w->fc->lock);
	w->stats.bytes_out += len;
}

/* Dequantises in chunks of whole 128-row blocks across the pool while the writer writes the
 * previous chunk, so memory stays at a few chunk buffers whatever the tensor's size. */
static int cast_fp8_tensor(file_worker *w, const cast_item *it, long k, dsv3_error *err)
{
	fp8_cast *fc = w->fc;
	const st_tensor *t = it->src;
	int64_t rows = t->shape[0], cols = t->shape[1];
	if (rows == 0 || cols == 0) {
		push_piece(w, NULL, 0, -1, k, NULL);
		return 0;
	}
	size_t row_bytes = (size_t)cols * 2;
	size_t block_bytes = row_bytes * (size_t)fc->block_rows;
	int64_t chunk_rows = (int64_t)fc->block_rows *
			     (block_bytes >= CHUNK_BYTES ? 1 : (int64_t)(CHUNK_BYTES / block_bytes));
	dequant_chunk d = { .cols = cols, .scale = it->scale->data,
			    .scale_cols = it->scale->shape[1], .block_rows = fc->block_rows,
			    .block_cols = fc->block_cols };
	for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
		int64_t n = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
		int b = w->next_buffer;
		w->next_buffer = (b + 1) % PIPE_BUFFERS;
		uint8_t *buf = write_pipe_buffer(&w->pipe, b, (size_t)n * row_bytes);
		if (!buf)
			return dsv3_fail(err, DSV3_EIO, "%s: tensor %s: out of memory",
					 fc->ckpt.files[it->file].path, t->name);
		d.src = t->data + (size_t)r0 * (size_t)cols;
		d.dst = (uint16_t *)buf;
		d.row0 = r0;
		thread_pool_for(w->pool, (size_t)n, dequant_row, &d);
		st_tensor part = { .data = d.src, .nbytes = (uint64_t)n * (uint64_t)cols };
		st_release(&fc->ckpt.files[it->file], &part);
		push_piece(w, buf, (size_t)n * row_bytes, b, r0 + n >= rows ? k : -1, NULL);
	}
	st_release(&fc->ckpt.files[it->scale_file], it->scale);
	return 0;
}

/* Non-FP8 tensors go to the writer straight from the mapping, released once written. */
static void copy_tensor(file_worker *w, const cast_item *it, long k)
{
	const st_tensor *t = it->src;
	uint64_t off = 0;
	do {
		uint64_t len = t->nbytes - off < COPY_PIECE ? t->nbytes - off : COPY_PIECE;
		/* Faulting the pages in here keeps that cost off the writer, the slowest stage. */
		prefault_input_range(t->data + off, len);
		push_piece(w, t->data + off, len, -1, off + len >= t->nbytes ? k : -1,
			   &w->fc->ckpt.files[it->file]);
		off += len;
	} while (off < t->nbytes);
}

/* ---- output ---- */

static int add_file_to_manifest(fp8_cast *fc, const char *name, const uint8_t file_sha[32],
				const cast_item *items, size_t n, uint8_t (*sha)[32], dsv3_error *err)
{
	int rc = 0;
	pthread_mutex_lock(&fc->lock);
	if (manifest_add_file(&fc->man, name, file_sha))
		rc = dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
	for (size_t i = 0; i < n && !rc; i++) {
		const st_spec *s = &items[i].spec;
		if (manifest_add_tensor(&fc->man, s->name, s->dtype, s->ndim, s->shape, sha[i]))
			rc = dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
	}
	pthread_mutex_unlock(&fc->lock);
	return rc;
}

typedef struct {
	file_worker *fw;
	const cast_item *items;
	size_t n;
} file_job;

/* write_pipe_producer: the tensors of one file in the writer's layout order. */
static int stream_file(void *ctx, st_writer *w, dsv3_error *err)
{
	file_job *j = ctx;
	file_worker *fw = j->fw;
	const cast_item *items = j->items;
	size_t n = j->n;
	int rc = 0;
	for (size_t pos = 0; pos < n && !rc; pos++) {
		size_t k = st_writer_order(w, pos);
		if (items[k].scale) {
			rc = cast_fp8_tensor(fw, &items[k], (long)k, err);
			fw->stats.dequantised++;
		} else {
			copy_tensor(fw, &items[k], (long)k);
		}
		fw->stats.tensors++;
	}
	return rc;
}

/* A file an interrupted run finished: its records go to the manifest, nothing is written. */
static int keep_file(file_worker *fw, const resume_file *k, const cast_item *items, size_t n,
		     size_t n_scales, dsv3_error *err)
{
	fp8_cast *fc = fw->fc;
	int rc = 0;
	uint64_t bytes = 0;
	if (manifest_add_file(&fc->man, k->name, k->sha256))
		rc = dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
	for (size_t i = 0; i < k->n_tensors && !rc; i++) {
		const manifest_tensor *t = &k->tensors[i];
		uint64_t b = dtype_size(t->dtype);
		for (int d = 0; d < t->ndim; d++)
			b *= (uint64_t)t->shape[d];
		bytes += b;
		if (manifest_add_tensor(&fc->man, t->name, t->dtype, t->ndim, t->shape, t->sha256))
			rc = dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
	}
	progress_add(&fc->bar, bytes);
	for (size_t i = 0; i < n; i++)
		fw->stats.dequantised += items[i].scale != NULL;
	fw->stats.tensors += k->n_tensors;
	fw->stats.scales_dropped += n_scales;
	fw->stats.bytes_out += bytes;
	return rc;
}

/* Moves a written file to its finished name, with its tensors, for --resume. */
static int finish_file(fp8_cast *fc, const char *name, const uint8_t file_sha[32],
		       const cast_item *items, size_t n, uint8_t (*sha)[32], dsv3_error *err)
{
	manifest_tensor *t = calloc(n + 1, sizeof *t);
	if (!t)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", name);
	for (size_t i = 0; i < n; i++) {
		t[i].name = (char *)items[i].spec.name;
		t[i].dtype = items[i].spec.dtype;
		t[i].ndim = items[i].spec.ndim;
		memcpy(t[i].shape, items[i].spec.shape, sizeof t[i].shape);
		memcpy(t[i].sha256, sha[i], 32);
	}
	pthread_mutex_lock(&fc->lock);
	int rc = resume_finish(&fc->res, name, file_sha, t, n, err);
	pthread_mutex_unlock(&fc->lock);
	free(t);
	return rc;
}

static int cast_file(file_worker *fw, size_t f, dsv3_error *err)
{
	fp8_cast *fc = fw->fc;
	const char *name = fc->ckpt.file_names[f];
	cast_item *items;
	size_t n;
	int rc = plan_file(fc, f, &items, &n, err);
	if (rc)
		return rc;
	const resume_file *kept;
	pthread_mutex_lock(&fc->lock);
	rc = resume_take(&fc->res, name, &kept, err);
	if (!rc && kept)
		rc = keep_file(fw, kept, items, n, fc->ckpt.files[f].n_tensors - n, err);
	pthread_mutex_unlock(&fc->lock);
	if (rc || kept) {
		free(items);
		return rc;
	}
	fw->stats.scales_dropped += fc->ckpt.files[f].n_tensors - n;
	st_spec *specs = calloc(n + 1, sizeof *specs);
	uint8_t(*sha)[32] = calloc(n + 1, sizeof *sha);
	pthread_mutex_lock(&fc->lock);
	const char *tmp = out_dir_add(&fc->out, name, err);
	pthread_mutex_unlock(&fc->lock);
	if (!specs || !sha)
		rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", name);
	else if (!tmp)
		rc = err->code;
	for (size_t i = 0; !rc && i < n; i++)
		specs[i] = items[i].spec;
	file_job job = { fw, items, n };
	uint8_t file_sha[32];
	if (!rc)
		rc = write_pipe_file(&fw->pipe, tmp, specs, n, stream_file, &job, file_sha, sha, err);
	if (!rc)
		rc = add_file_to_manifest(fc, name, file_sha, items, n, sha, err);
	if (!rc)
		rc = finish_file(fc, name, file_sha, items, n, sha, err);
	free(specs);
	free(sha);
	free(items);
	return rc;
}

/* The index fp8_cast_bf16.py writes: the input's weight_map in its order without the scales of
 * the weights it converted (other *_scale_inv entries stay, as there). */
static int write_index(fp8_cast *fc, dsv3_error *err)
{
	const hf_ckpt *c = &fc->ckpt;
	char **names = calloc(c->n_index + 1, sizeof *names);
	char **files = calloc(c->n_index + 1, sizeof *files);
	size_t n = 0;
	int rc = 0;
	if (!names || !files)
		rc = dsv3_fail(err, DSV3_EIO, "out of memory (index)");
	for (size_t i = 0; !rc && i < c->n_index; i++) {
		const char *t = c->index_tensors[i];
		if (ends_with(t, SCALE_SUFFIX)) {
			char base[1024];
			size_t len = strlen(t) - strlen(SCALE_SUFFIX);
			snprintf(base, sizeof base, "%.*s", (int)len, t);
			const st_tensor *w = hf_ckpt_find(c, base, NULL);
			if (w && w->dtype == ST_F8_E4M3)
				continue;
		}
		names[n] = c->index_tensors[i];
		files[n] = c->index_files[i];
		n++;
	}
	char *text = NULL;
	size_t len = 0;
	if (!rc && py_json_index(names, files, n, NULL, &text, &len))
		rc = dsv3_fail(err, DSV3_EDATA, "%s/%s: a name is not valid UTF-8", fc->opt->in_dir,
			       INDEX_NAME);
	if (!rc)
		rc = manifest_write_small(&fc->man, &fc->out, INDEX_NAME, text, len, err);
	free(text);
	free(names);
	free(files);
	return rc;
}

/* config.json without quantization_config, so loaders take the result for BF16. */
static int write_config(fp8_cast *fc, dsv3_error *err)
{
	if (!fc->config)
		return 0;
	json_object_del(fc->config, "quantization_config");
	size_t len;
	char *text = hf_config_text(fc->config, &len);
	int rc = text ? manifest_write_small(&fc->man, &fc->out, CONFIG_NAME, text, len, err)
		      : dsv3_fail(err, DSV3_EIO, "out of memory (config.json)");
	free(text);
	return rc;
}

/* Files the cast itself produces or replaces; everything else regular is copied. */
/* Tokenizer files, generation_config.json, README, ...: copied as they are, in name order. */
/* ---- the run ---- */

static uint64_t output_bytes(const fp8_cast *fc)
{
	uint64_t total = 0;
	for (size_t f = 0; f < fc->ckpt.n_files; f++) {
		const st_file *sf = &fc->ckpt.files[f];
		for (size_t i = 0; i < sf->n_tensors; i++) {
			const st_tensor *t = &sf->tensors[i];
			if (ends_with(t->name, SCALE_SUFFIX))
				continue;
			total += t->dtype == ST_F8_E4M3 ? 2 * t->nbytes : t->nbytes;
		}
	}
	return total;
}

/* The output must not overwrite the input it is reading. */
static int check_paths(const fp8_cast_options *opt, dsv3_error *err)
{
	if (access(opt->in_dir, R_OK | X_OK) != 0)
		return dsv3_fail_errno(err, "cannot open input directory %s", opt->in_dir);
	return out_dir_refuse_input(opt->out_dir, opt->in_dir, err);
}

static int open_input(fp8_cast *fc, problem_list *problems, dsv3_error *err)
{
	int rc = check_paths(fc->opt, err);
	if (!rc)
		rc = hf_ckpt_open(&fc->ckpt, fc->opt->in_dir, err);
	if (rc)
		return rc;
	if (!fc->ckpt.has_index)
		return dsv3_fail(err, DSV3_EDATA, "%s/%s is missing", fc->opt->in_dir, INDEX_NAME);
	rc = load_config(fc, err);
	if (!rc)
		rc = check_input(fc, problems, err);
	return rc;
}

static void *file_worker_main(void *arg)
{
	file_worker *w = arg;
	fp8_cast *fc = w->fc;
	for (;;) {
		pthread_mutex_lock(&fc->lock);
		size_t f = fc->next_file++;
		int stop = fc->failed || f >= fc->ckpt.n_files;
		pthread_mutex_unlock(&fc->lock);
		if (stop)
			break;
		w->rc = cast_file(w, f, &w->err);
		w->stats.files++;
		if (w->rc) {
			pthread_mutex_lock(&fc->lock);
			fc->failed = 1;
			pthread_mutex_unlock(&fc->lock);
			break;
		}
	}
	return NULL;
}

static void add_stats(fp8_cast_stats *to, const fp8_cast_stats *s)
{
	to->files += s->files;
	to->tensors += s->tensors;
	to->dequantised += s->dequantised;
	to->scales_dropped += s->scales_dropped;
	to->bytes_out += s->bytes_out;
}

/* All cores split between files in flight (THREADS_PER_FILE each) and, within a file, the
 * dequantisation pool. */
static int worker_count(const fp8_cast *fc, int *pool_threads)
{
	int threads = fc->opt->threads;
	if (threads <= 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		threads = n > 0 ? (int)n : 1;
	}
	size_t k = (size_t)(threads / THREADS_PER_FILE);
	if (k < 1)
		k = 1;
	if (k > fc->ckpt.n_files)
		k = fc->ckpt.n_files ? fc->ckpt.n_files : 1;
	*pool_threads = threads / (int)k > 0 ? threads / (int)k : 1;
	return (int)k;
}

/* Runs the file workers; returns the first failure. */
static int cast_files(fp8_cast *fc, dsv3_error *err)
{
	int pool_threads, k = worker_count(fc, &pool_threads);
	file_worker *w = calloc((size_t)k, sizeof *w);
	if (!w)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	int started = 0, rc = 0;
	for (; started < k; started++) {
		w[started].fc = fc;
		write_pipe_init(&w[started].pipe);
		w[started].pool = thread_pool_create(pool_threads);
		if (!w[started].pool ||
		    pthread_create(&w[started].thread, NULL, file_worker_main, &w[started]) != 0) {
			rc = dsv3_fail(err, DSV3_EIO, "cannot start worker threads");
			thread_pool_destroy(w[started].pool);
			write_pipe_free(&w[started].pipe);
			pthread_mutex_lock(&fc->lock);
			fc->failed = 1;
			pthread_mutex_unlock(&fc->lock);
			break;
		}
	}
	for (int i = 0; i < started; i++) {
		pthread_join(w[i].thread, NULL);
		if (w[i].rc && !rc) {
			*err = w[i].err;
			rc = w[i].rc;
		}
		add_stats(fc->stats, &w[i].stats);
		thread_pool_destroy(w[i].pool);
		write_pipe_free(&w[i].pipe);
	}
	free(w);
	return rc;
}

static int write_output(fp8_cast *fc, dsv3_error *err)
{
	int rc = out_dir_open(&fc->out, fc->opt->out_dir, err);
	if (rc)
		return rc;
	uint8_t key[32];
	rc = resume_key("dsv3-fp8-to-bf16", NULL, 0, fc->opt->in_dir, key, err);
	if (!rc)
		rc = resume_open(&fc->res, &fc->out, key, fc->opt->resume, fc->opt->threads, err);
	fc->stats->resumed = fc->res.stats;
	if (rc)
		return rc;
	progress_start(&fc->bar, "fp8-to-bf16", output_bytes(fc));
	rc = cast_files(fc, err);
	progress_end(&fc->bar);
	if (!rc)
		rc = write_index(fc, err);
	if (!rc)
		rc = write_config(fc, err);
	if (!rc)
		rc = manifest_copy_side_files(&fc->man, &fc->out, fc->opt->in_dir, &fc->stats->other_files, err);
	if (!rc)
		rc = manifest_write(&fc->man, &fc->out, err);
	if (!rc)
		rc = out_dir_commit(&fc->out, err);
	if (!rc)
		rc = resume_complete(&fc->res, err);
	fc->stats->resumed = fc->res.stats;
	return rc;
}

int fp8_cast_run(const fp8_cast_options *opt, problem_list *problems, fp8_cast_stats *stats,
		 dsv3_error *err)
{
	fp8_cast fc;
	memset(&fc, 0, sizeof fc);
	memset(stats, 0, sizeof *stats);
	fc.opt = opt;
	fc.stats = stats;
	manifest_init(&fc.man);
	pthread_mutex_init(&fc.lock, NULL);
	double t0 = now_seconds();
	int rc = open_input(&fc, problems, err);
	if (!rc)
		rc = write_output(&fc, err);
	stats->seconds = now_seconds() - t0;
	if (fc.out.dir) {
		resume_close(&fc.res);
		out_dir_close(&fc.out);
	}
	pthread_mutex_destroy(&fc.lock);
	manifest_free(&fc.man);
	if (fc.config)
		json_decref(fc.config);
	hf_ckpt_close(&fc.ckpt);
	return rc;
}
