/* The conversion, file by file in name order: within a file every quantisable BF16 weight
 * becomes F8_E4M3 plus its F32 scale, everything else is copied; then the index (each scale
 * right after its weight), config.json with quantization_config, the other files and the
 * manifests, all through one atomic output directory. The writer lays tensors out by dtype
 * rank (F32 before F8_E4M3), so a weight's scales are computed and written first and kept
 * until its FP8 bytes follow. */
#include "quantise.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "py_json.h"
#include "write_pipe.h"
#include "dtype.h"
#include "hf_ckpt.h"
#include "hf_json.h"
#include "manifest.h"
#include "out_dir.h"
#include "progress.h"
#include "safetensors.h"
#include "sha256.h"
#include "tensor_rules.h"
#include "threadpool.h"

#define INDEX_NAME "model.safetensors.index.json"
#define CONFIG_NAME "config.json"
#define SCALE_SUFFIX "_scale_inv"
#define CHUNK_BYTES (16u << 20) /* FP8 bytes quantised per step */
#define COPY_PIECE (8u << 20)

enum { ITEM_COPY, ITEM_WEIGHT, ITEM_SCALE };

/* One output tensor: a copy, a quantised weight, or the scale of weight `partner`. */
typedef struct {
	int kind;
	const st_tensor *src; /* the BF16 weight for ITEM_WEIGHT and ITEM_SCALE */
	size_t partner;
	char *scale_name;     /* ITEM_SCALE: owned */
	float *scales;        /* ITEM_WEIGHT: [ceil(rows/128)][ceil(cols/128)], set by its scale */
	st_spec spec;
} quant_item;

typedef struct {
	const quant_options *opt;
	hf_ckpt ckpt;
	json_t *config;
	out_dir out;
	manifest man;
	progress bar;
	thread_pool *pool;
	write_pipe pipe;
	int next_buffer;
	quant_stats *stats;
} quant;

/* ---- the numbers ---- */

int fp8_weight_name(const char *n)
{
	static const char prefix[] = "model.layers.", suffix[] = "_proj.weight";
	size_t len = strlen(n), sl = sizeof suffix - 1;
	if (strncmp(n, prefix, sizeof prefix - 1) != 0 || len < sl || strcmp(n + len - sl, suffix))
		return 0;
	size_t end = len - strlen(".weight");
	size_t start = end;
	while (start > 0 && n[start - 1] != '.')
		start--;
	return !(end - start == 7 && strncmp(n + start, "eh_proj", 7) == 0);
}

float quant_block_scale(float amax, int ue8m0)
{
	float s = (amax > SCALE_FLOOR ? amax : SCALE_FLOOR) / E4M3_MAX;
	if (!ue8m0)
		return s;
	int e;
	float m = frexpf(s, &e); /* s = m * 2^e, m in [0.5, 1): exact */
	return m == 0.5f ? s : ldexpf(1.0f, e);
}

static int64_t ceil_div(int64_t a, int64_t b)
{
	return (a + b - 1) / b;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && strcmp(s + a - b, suffix) == 0;
}

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static float bf16_at(const uint8_t *p, int64_t i)
{
	uint16_t v;
	memcpy(&v, p + 2 * i, 2); /* tensor data need not be 2-aligned */
	return bf16_to_float(v);
}

/* ---- scales ---- */

typedef struct {
	const st_tensor *t;
	float *scales;
	int64_t scale_cols;
	int ue8m0;
	int nonfinite; /* set by any block with a NaN or infinity (racy writes of 1 only) */
} scale_job;

static void scale_block(void *arg, size_t i)
{
	scale_job *j = arg;
	int64_t rows = j->t->shape[0], cols = j->t->shape[1];
	int64_t r0 = (int64_t)i / j->scale_cols * QUANT_BLOCK, c0 = (int64_t)i % j->scale_cols * QUANT_BLOCK;
	int64_t r1 = r0 + QUANT_BLOCK < rows ? r0 + QUANT_BLOCK : rows;
	int64_t c1 = c0 + QUANT_BLOCK < cols ? c0 + QUANT_BLOCK : cols;
	float amax = 0.0f;
	for (int64_t r = r0; r < r1; r++)
		for (int64_t c = c0; c < c1; c++) {
			float a = fabsf(bf16_at(j->t->data, r * cols + c));
			if (!isfinite(a))
				__atomic_store_n(&j->nonfinite, 1, __ATOMIC_RELAXED);
			else if (a > amax)
				amax = a;
		}
	j->scales[i] = quant_block_scale(amax, j->ue8m0);
}

static int compute_scales(quant *q, quant_item *w, size_t file, dsv3_error *err)
{
	const st_tensor *t = w->src;
	int64_t sr = ceil_div(t->shape[0], QUANT_BLOCK), sc = ceil_div(t->shape[1], QUANT_BLOCK);
	w->scales = malloc((size_t)(sr * sc + 1) * sizeof *w->scales);
	if (!w->scales)
		return dsv3_fail(err, DSV3_EIO, "%s: tensor %s: out of memory",
				 q->ckpt.files[file].path, t->name);
	scale_job j = { .t = t, .scales = w->scales, .scale_cols = sc, .ue8m0 = q->opt->ue8m0 };
	thread_pool_for(q->pool, (size_t)(sr * sc), scale_block, &j);
	if (j.nonfinite)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s holds NaN or infinity; cannot quantise",
				 q->ckpt.files[file].path, t->name);
	return 0;
}

/* ---- the output pieces ---- */

static void push_piece(quant *q, const uint8_t *data, size_t len, int buffer, long tensor)
{
	pipe_piece piece = { .data = data, .len = len, .buffer = buffer, .tensor = tensor };
	write_pipe_push(&q->pipe, &piece);
	progress_add(&q->bar, len);
	q->stats->bytes_out += len;
}

static uint8_t *next_buffer(quant *q, size_t size, int *b)
{
	*b = q->next_buffer;
	q->next_buffer = (*b + 1) % PIPE_BUFFERS;
	return write_pipe_buffer(&q->pipe, *b, size ? size : 1);
}

/* The scale tensor's bytes go through a pipe buffer: a piece from outside one would have its
 * pages dropped once written, and the weight still needs them. */
static int write_scale(quant *q, quant_item *items, size_t k, size_t file, dsv3_error *err)
{
	quant_item *w = &items[items[k].partner];
	int rc = compute_scales(q, w, file, err);
	if (rc)
		return rc;
	size_t len = (size_t)(items[k].spec.shape[0] * items[k].spec.shape[1]) * 4;
	int b;
	uint8_t *buf = next_buffer(q, len, &b);
	if (!buf)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", q->ckpt.files[file].path);
	memcpy(buf, w->scales, len);
	push_piece(q, buf, len, b, (long)k);
	return 0;
}

typedef struct {
	const uint8_t *src; /* BF16 bytes of the chunk's first row */
	uint8_t *dst;
	const float *scales;
	int64_t row0, cols, scale_cols;
} quant_chunk;

/* One row: q = E4M3(float32(x) / s), a float32 division rounded to nearest even. */
static void quant_row(void *arg, size_t i)
{
	const quant_chunk *d = arg;
	int64_t r = d->row0 + (int64_t)i;
	const float *srow = d->scales + (r / QUANT_BLOCK) * d->scale_cols;
	const uint8_t *src = d->src + (int64_t)i * d->cols * 2;
	uint8_t *dst = d->dst + (int64_t)i * d->cols;
	for (int64_t c = 0; c < d->cols; c++)
		dst[c] = e4m3_from_float(bf16_at(src, c) / srow[c / QUANT_BLOCK]);
}

static int write_weight(quant *q, quant_item *it, long k, size_t file, dsv3_error *err)
{
	const st_tensor *t = it->src;
	int64_t rows = t->shape[0], cols = t->shape[1];
	if (rows == 0 || cols == 0) {
		push_piece(q, NULL, 0, -1, k);
		return 0;
	}
	size_t block_bytes = (size_t)cols * QUANT_BLOCK;
	int64_t chunk_rows = QUANT_BLOCK * (block_bytes >= CHUNK_BYTES ? 1 : (int64_t)(CHUNK_BYTES / block_bytes));
	quant_chunk d = { .cols = cols, .scales = it->scales, .scale_cols = ceil_div(cols, QUANT_BLOCK) };
	for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
		int64_t n = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
		int b;
		uint8_t *buf = next_buffer(q, (size_t)(n * cols), &b);
		if (!buf)
			return dsv3_fail(err, DSV3_EIO, "%s: tensor %s: out of memory",
					 q->ckpt.files[file].path, t->name);
		d.src = t->data + (size_t)(r0 * cols) * 2;
		d.dst = buf;
		d.row0 = r0;
		thread_pool_for(q->pool, (size_t)n, quant_row, &d);
		release_input_range(d.src, (size_t)(n * cols) * 2);
		push_piece(q, buf, (size_t)(n * cols), b, r0 + n >= rows ? k : -1);
	}
	return 0;
}

static void copy_tensor(quant *q, const st_tensor *t, long k)
{
	uint64_t off = 0;
	do {
		uint64_t len = t->nbytes - off < COPY_PIECE ? t->nbytes - off : COPY_PIECE;
		prefault_input_range(t->data + off, len);
		push_piece(q, t->data + off, len, -1, off + len >= t->nbytes ? k : -1);
		off += len;
	} while (off < t->nbytes);
}

/* ---- one file ---- */

static void free_items(quant_item *items, size_t n)
{
	for (size_t i = 0; items && i < n; i++) {
		free(items[i].scale_name);
		free(items[i].scales);
	}
	free(items);
}

static void spec_of(st_spec *s, const st_tensor *t, st_dtype dtype)
{
	s->name = t->name;
	s->dtype = dtype;
	s->ndim = t->ndim;
	memcpy(s->shape, t->shape, sizeof s->shape);
}

/* The output tensors of file f: each input tensor, and a scale after each quantised weight. */
static int plan_file(const quant *q, size_t f, quant_item **items, size_t *n, dsv3_error *err)
{
	const st_file *sf = &q->ckpt.files[f];
	*n = 0;
	*items = calloc(2 * sf->n_tensors + 1, sizeof **items);
	if (!*items)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", sf->path);
	for (size_t i = 0; i < sf->n_tensors; i++) {
		const st_tensor *t = &sf->tensors[i];
		quant_item *it = &(*items)[(*n)++];
		it->src = t;
		if (!fp8_weight_name(t->name)) {
			it->kind = ITEM_COPY;
			spec_of(&it->spec, t, t->dtype);
			continue;
		}
		it->kind = ITEM_WEIGHT;
		spec_of(&it->spec, t, ST_F8_E4M3);
		quant_item *s = &(*items)[(*n)++];
		s->kind = ITEM_SCALE;
		s->src = t;
		s->partner = (size_t)(it - *items);
		if (asprintf(&s->scale_name, "%s%s", t->name, SCALE_SUFFIX) < 0) {
			s->scale_name = NULL;
			return dsv3_fail(err, DSV3_EIO, "%s: out of memory", sf->path);
		}
		s->spec = (st_spec){ .name = s->scale_name, .dtype = ST_F32, .ndim = 2,
				     .shape = { ceil_div(t->shape[0], QUANT_BLOCK),
						ceil_div(t->shape[1], QUANT_BLOCK) } };
	}
	return 0;
}

typedef struct {
	quant *q;
	quant_item *items;
	size_t n, f;
} file_job;

/* write_pipe_producer: the tensors of one file in the writer's layout order. */
static int stream_file(void *ctx, st_writer *w, dsv3_error *err)
{
	file_job *j = ctx;
	quant *q = j->q;
	quant_item *items = j->items;
	size_t n = j->n, f = j->f;
	int rc = 0;
	for (size_t pos = 0; pos < n && !rc; pos++) {
		size_t k = st_writer_order(w, pos);
		if (items[k].kind == ITEM_SCALE) {
			rc = write_scale(q, items, k, f, err);
		} else if (items[k].kind == ITEM_WEIGHT) {
			rc = write_weight(q, &items[k], (long)k, f, err);
			q->stats->quantised++;
		} else {
			copy_tensor(q, items[k].src, (long)k);
		}
		q->stats->tensors++;
	}
	return rc;
}

static int add_to_manifest(quant *q, const char *name, const uint8_t file_sha[32],
			   const quant_item *items, size_t n, uint8_t (*sha)[32], dsv3_error *err)
{
	if (manifest_add_file(&q->man, name, file_sha))
		return dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
	for (size_t i = 0; i < n; i++) {
		const st_spec *s = &items[i].spec;
		if (manifest_add_tensor(&q->man, s->name, s->dtype, s->ndim, s->shape, sha[i]))
			return dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
	}
	return 0;
}

static int quant_file(quant *q, size_t f, dsv3_error *err)
{
	const char *name = q->ckpt.file_names[f];
	quant_item *items = NULL;
	size_t n = 0;
	int rc = plan_file(q, f, &items, &n, err);
	st_spec *specs = calloc(n + 1, sizeof *specs);
	uint8_t(*sha)[32] = calloc(n + 1, sizeof *sha);
	const char *tmp = NULL;
	if (!rc && (!specs || !sha))
		rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", name);
	if (!rc && !(tmp = out_dir_add(&q->out, name, err)))
		rc = err->code;
	for (size_t i = 0; !rc && i < n; i++)
		specs[i] = items[i].spec;
	file_job job = { q, items, n, f };
	uint8_t file_sha[32];
	if (!rc)
		rc = write_pipe_file(&q->pipe, tmp, specs, n, stream_file, &job, file_sha, sha, err);
	if (!rc)
		rc = add_to_manifest(q, name, file_sha, items, n, sha, err);
	free(specs);
	free(sha);
	free_items(items, n);
	q->stats->files++;
	return rc;
}

/* ---- input checks ---- */

static int load_config(quant *q, dsv3_error *err)
{
	int rc = hf_config_load(q->opt->in_dir, &q->config, err);
	if (!rc && q->config && json_object_get(q->config, "quantization_config"))
		rc = dsv3_fail(err, DSV3_EDATA,
			       "%s/%s has a quantization_config: the checkpoint is already "
			       "quantised (convert it to BF16 with dsv3-fp8-to-bf16 first)",
			       q->opt->in_dir, CONFIG_NAME);
	return rc;
}

static void shape_text(const st_tensor *t, char *buf, size_t len)
{
	size_t o = (size_t)snprintf(buf, len, "[");
	for (int d = 0; d < t->ndim && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}

/* Tensors with no rule are refused (tensor_rules.h); FP8 tensors or scales mean the input is
 * already quantised; a weight to quantise must be a 2-D BF16 matrix. Every offending tensor is
 * listed. */
static void check_tensor(const quant *q, size_t f, const st_tensor *t, problem_list *problems,
			 size_t *quantised)
{
	const char *where = q->ckpt.file_names[f];
	char shape[128];
	shape_text(t, shape, sizeof shape);
	/* A tensor no rule covers (V3.2-Exp's indexer, an unknown module, a stray scale) would be
	 * copied, or quantised by its name alone: listed once, by the shared rules. */
	if (tensor_rules_check_hf(&q->ckpt, &q->ckpt.files[f], t, 0, problems))
		return;
	if (t->dtype == ST_F8_E4M3 || t->dtype == ST_F8_E5M2 || ends_with(t->name, SCALE_SUFFIX)) {
		problem_add(problems, "%s/%s: tensor %s (%s): already quantised", q->opt->in_dir,
			    where, t->name, dtype_name(t->dtype));
		(*quantised)++;
	} else if (fp8_weight_name(t->name) && (t->dtype != ST_BF16 || t->ndim != 2)) {
		problem_add(problems, "%s/%s: tensor %s is %s of shape %s; expected a 2-D BF16 weight",
			    q->opt->in_dir, where, t->name, dtype_name(t->dtype), shape);
	}
}

static int check_input(quant *q, problem_list *problems, dsv3_error *err)
{
	size_t quantised = 0;
	for (size_t f = 0; f < q->ckpt.n_files; f++)
		for (size_t i = 0; i < q->ckpt.files[f].n_tensors; i++)
			check_tensor(q, f, &q->ckpt.files[f].tensors[i], problems, &quantised);
	if (problem_list_exit_code(problems) == DSV3_OK)
		return 0;
	if (quantised)
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: %zu FP8 tensor(s) or scale(s): the checkpoint is already quantised "
				 "(dsv3-fp8-to-bf16 makes a BF16 one); nothing written",
				 q->opt->in_dir, quantised);
	return dsv3_fail(err, DSV3_EDATA, "%s: %zu problem(s); nothing written", q->opt->in_dir,
			 problems->n);
}

static int open_input(quant *q, problem_list *problems, dsv3_error *err)
{
	if (access(q->opt->in_dir, R_OK | X_OK) != 0)
		return dsv3_fail_errno(err, "cannot open input directory %s", q->opt->in_dir);
	int rc = out_dir_refuse_input(q->opt->out_dir, q->opt->in_dir, err);
	if (!rc)
		rc = hf_ckpt_open(&q->ckpt, q->opt->in_dir, err);
	if (rc)
		return rc;
	if (!q->ckpt.has_index)
		return dsv3_fail(err, DSV3_EDATA, "%s/%s is missing", q->opt->in_dir, INDEX_NAME);
	rc = load_config(q, err);
	if (!rc)
		rc = check_input(q, problems, err);
	return rc;
}

/* ---- small files ---- */

/* Bytes of the output tensors a tensor becomes: FP8 weight and scales, or itself. */
static uint64_t tensor_bytes(const st_tensor *t)
{
	if (!fp8_weight_name(t->name))
		return t->nbytes;
	uint64_t scales = (uint64_t)(ceil_div(t->shape[0], QUANT_BLOCK) *
				     ceil_div(t->shape[1], QUANT_BLOCK)) * 4;
	return t->nbytes / 2 + scales;
}

/* The index as json.dump(..., indent=2) writes {"metadata": {"total_size": N}, "weight_map":
 * ...}: the input's weight_map in its order with each scale right after its weight, N the
 * output's tensor bytes (headers excluded, as Hugging Face counts it). */
static int write_index(quant *q, dsv3_error *err)
{
	const hf_ckpt *c = &q->ckpt;
	char **names = calloc(2 * c->n_index + 1, sizeof *names);
	char **files = calloc(2 * c->n_index + 1, sizeof *files);
	char **owned = calloc(c->n_index + 1, sizeof *owned);
	size_t n = 0, n_owned = 0;
	uint64_t total = 0;
	int rc = names && files && owned ? 0 : dsv3_fail(err, DSV3_EIO, "out of memory (index)");
	for (size_t f = 0; !rc && f < c->n_files; f++)
		for (size_t i = 0; i < c->files[f].n_tensors; i++)
			total += tensor_bytes(&c->files[f].tensors[i]);
	for (size_t i = 0; !rc && i < c->n_index; i++) {
		names[n] = c->index_tensors[i];
		files[n++] = c->index_files[i];
		if (!fp8_weight_name(c->index_tensors[i]))
			continue;
		if (asprintf(&owned[n_owned], "%s%s", c->index_tensors[i], SCALE_SUFFIX) < 0) {
			rc = dsv3_fail(err, DSV3_EIO, "out of memory (index)");
			break;
		}
		names[n] = owned[n_owned++];
		files[n++] = c->index_files[i];
	}
	char *text = NULL;
	size_t len = 0;
	if (!rc && py_json_index(names, files, n, &total, &text, &len))
		rc = dsv3_fail(err, DSV3_EDATA, "%s/%s: a name is not valid UTF-8", q->opt->in_dir,
			       INDEX_NAME);
	if (!rc)
		rc = manifest_write_small(&q->man, &q->out, INDEX_NAME, text, len, err);
	free(text);
	for (size_t i = 0; i < n_owned; i++)
		free(owned[i]);
	free(owned);
	free(names);
	free(files);
	return rc;
}

/* DeepSeek's quantization_config ("scale_fmt" last, as V3.1 ships it). */
static json_t *quantization_config(int ue8m0)
{
	json_t *qc = json_pack("{s:s, s:s, s:s, s:[i,i]}", "activation_scheme", "dynamic", "fmt",
			       "e4m3", "quant_method", "fp8", "weight_block_size", QUANT_BLOCK,
			       QUANT_BLOCK);
	if (qc && ue8m0)
		json_object_set_new(qc, "scale_fmt", json_string("ue8m0"));
	return qc;
}

/* config.json with quantization_config put back where DeepSeek's sorted configs have it:
 * before the first key that sorts after it (at the end when none does). */
static int write_config(quant *q, dsv3_error *err)
{
	if (!q->config)
		return 0;
	json_t *out = json_object(), *qc = quantization_config(q->opt->ue8m0);
	int placed = 0, bad = !out || !qc;
	const char *key;
	json_t *v;
	json_object_foreach(q->config, key, v) {
		if (!placed && strcmp(key, "quantization_config") > 0) {
			bad |= json_object_set(out, "quantization_config", qc);
			placed = 1;
		}
		bad |= json_object_set(out, key, v);
	}
	if (!placed)
		bad |= json_object_set(out, "quantization_config", qc);
	size_t len;
	char *text = bad ? NULL : hf_config_text(out, &len);
	int rc = text ? manifest_write_small(&q->man, &q->out, CONFIG_NAME, text, len, err)
		      : dsv3_fail(err, DSV3_EIO, "out of memory (config.json)");
	free(text);
	json_decref(out);
	json_decref(qc);
	return rc;
}

/* Files the conversion writes itself; every other regular file is copied. */
/* ---- the run ---- */

static uint64_t output_bytes(const quant *q)
{
	uint64_t total = 0;
	for (size_t f = 0; f < q->ckpt.n_files; f++)
		for (size_t i = 0; i < q->ckpt.files[f].n_tensors; i++)
			total += tensor_bytes(&q->ckpt.files[f].tensors[i]);
	return total;
}

static int write_output(quant *q, dsv3_error *err)
{
	int rc = out_dir_open(&q->out, q->opt->out_dir, err);
	if (rc)
		return rc;
	q->pool = thread_pool_create(q->opt->threads);
	if (!q->pool)
		return dsv3_fail(err, DSV3_EIO, "cannot start worker threads");
	progress_start(&q->bar, "bf16-to-fp8", output_bytes(q));
	for (size_t f = 0; !rc && f < q->ckpt.n_files; f++)
		rc = quant_file(q, f, err);
	progress_end(&q->bar);
	if (!rc)
		rc = write_index(q, err);
	if (!rc)
		rc = write_config(q, err);
	if (!rc)
		rc = manifest_copy_side_files(&q->man, &q->out, q->opt->in_dir, &q->stats->other_files, err);
	if (!rc)
		rc = manifest_write(&q->man, &q->out, err);
	if (!rc)
		rc = out_dir_commit(&q->out, err);
	return rc;
}

int quant_run(const quant_options *opt, problem_list *problems, quant_stats *stats,
	      dsv3_error *err)
{
	quant q;
	memset(&q, 0, sizeof q);
	memset(stats, 0, sizeof *stats);
	q.opt = opt;
	q.stats = stats;
	manifest_init(&q.man);
	write_pipe_init(&q.pipe);
	double t0 = now_seconds();
	int rc = open_input(&q, problems, err);
	if (!rc)
		rc = write_output(&q, err);
	stats->seconds = now_seconds() - t0;
	if (q.out.dir)
		out_dir_close(&q.out);
	thread_pool_destroy(q.pool);
	write_pipe_free(&q.pipe);
	manifest_free(&q.man);
	if (q.config)
		json_decref(q.config);
	hf_ckpt_close(&q.ckpt);
	return rc;
}
