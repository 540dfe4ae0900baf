/* The safetensors format (DESIGN §3.1): a validating mmap reader and a streaming writer.
 *
 * Reader: st_parse validates every rule of §3.1 on a byte buffer; st_open maps a file and hands
 * the mapping to st_parse. Tensors keep header order; a name index sorted by strcmp lives in the
 * same allocation, right after tensors[n_tensors], so st_find is a binary search.
 *
 * Writer: bytes identical to `safetensors.torch.save_file` (safetensors 0.4-0.8):
 *   - 8-byte little-endian header length N, then N bytes of JSON padded with spaces to a
 *     multiple of 8, then the data area;
 *   - the JSON is compact (serde_json: no spaces), `"__metadata__"` first when metadata is given,
 *     then one entry per tensor, keys in the order dtype, shape, data_offsets;
 *   - tensors (header entries and data alike) in layout order: dtype rank descending (st_dtype
 *     value), ties by name in byte order; data_offsets consecutive from 0;
 *   - strings escaped like serde_json: \" \\ \b \f \n \r \t, other bytes below 0x20 as \u00xx
 *     (lowercase hex), everything else raw (non-ASCII UTF-8 and '/' included);
 *   - several metadata keys are written sorted by key in byte order. (The reference keeps them in
 *     a Rust HashMap, whose order is unspecified, so no order can match it byte for byte; sorted
 *     is deterministic. With none or one key, the usual case, the bytes match exactly.)
 * st_writer_finish on failure leaves the writer alive: the caller then calls st_writer_abort
 * (a caller that does not only leaks it; the file is still a temporary of lib/out_dir). */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sha256.h"

#define ST_WRITEBACK_EVERY (64u << 20) /* bytes written between writeback starts */

/* Messages --------------------------------------------------------------------------------- */

/* "LABEL: message" as DSV3_EDATA. */
static int __attribute__((format(printf, 3, 4)))
bad_file(dsv3_error *err, const char *label, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	return dsv3_fail(err, DSV3_EDATA, "%s: %s", label, msg);
}

/* "LABEL: tensor 'NAME': message" as DSV3_EDATA. */
static int __attribute__((format(printf, 4, 5)))
bad_tensor(dsv3_error *err, const char *label, const char *name, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	return dsv3_fail(err, DSV3_EDATA, "%s: tensor '%.200s': %s", label, name, msg);
}

static int out_of_memory(dsv3_error *err, const char *label)
{
	return dsv3_fail(err, DSV3_EIO, "%s: out of memory", label);
}

static uint64_t read_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

/* Reader: one tensor entry ------------------------------------------------------------------ */

static int parse_dtype(st_tensor *t, json_t *v, const char *label, dsv3_error *err)
{
	if (!json_is_string(v))
		return bad_tensor(err, label, t->name, "dtype is not a string");
	if (dtype_from_name(json_string_value(v), &t->dtype) != 0)
		return bad_tensor(err, label, t->name, "unknown dtype '%.40s'", json_string_value(v));
	return 0;
}

/* Fills shape and ndim; *bytes gets numel * dtype size, refusing products that overflow. */
static int parse_shape(st_tensor *t, json_t *v, uint64_t *bytes, const char *label,
		       dsv3_error *err)
{
	if (!json_is_array(v))
		return bad_tensor(err, label, t->name, "shape is not an array");
	if (json_array_size(v) > ST_MAX_DIMS)
		return bad_tensor(err, label, t->name, "shape has %zu dimensions, more than %d",
				  json_array_size(v), ST_MAX_DIMS);
	uint64_t numel = 1;
	size_t i;
	json_t *d;
	json_array_foreach(v, i, d) {
		if (!json_is_integer(d) || json_integer_value(d) < 0)
			return bad_tensor(err, label, t->name,
					  "shape[%zu] is not a non-negative integer", i);
		t->shape[i] = json_integer_value(d);
		if (__builtin_mul_overflow(numel, (uint64_t)t->shape[i], &numel))
			return bad_tensor(err, label, t->name, "shape's element count overflows");
	}
	t->ndim = (int)json_array_size(v);
	if (__builtin_mul_overflow(numel, (uint64_t)dtype_size(t->dtype), bytes))
		return bad_tensor(err, label, t->name, "shape's byte count overflows");
	return 0;
}

static int parse_offsets(st_tensor *t, json_t *v, uint64_t bytes, const char *label,
			 dsv3_error *err)
{
	json_t *b = json_array_get(v, 0), *e = json_array_get(v, 1);
	if (!json_is_array(v) || json_array_size(v) != 2 || !json_is_integer(b) ||
	    !json_is_integer(e) || json_integer_value(b) < 0 || json_integer_value(e) < 0)
		return bad_tensor(err, label, t->name,
				  "data_offsets is not two non-negative integers");
	uint64_t begin = (uint64_t)json_integer_value(b), end = (uint64_t)json_integer_value(e);
	if (begin > end)
		return bad_tensor(err, label, t->name, "data_offsets begin %" PRIu64
				  " is after end %" PRIu64, begin, end);
	if (end - begin != bytes)
		return bad_tensor(err, label, t->name,
				  "data_offsets span %" PRIu64 " bytes, the %s shape needs %" PRIu64,
				  end - begin, dtype_name(t->dtype), bytes);
	t->begin = begin;
	t->nbytes = bytes;
	return 0;
}

static int parse_tensor(st_tensor *t, json_t *entry, const char *label, dsv3_error *err)
{
	if (!json_is_object(entry))
		return bad_tensor(err, label, t->name, "entry is not an object");
	const char *key;
	json_t *v;
	json_object_foreach(entry, key, v) {
		if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets"))
			return bad_tensor(err, label, t->name, "unexpected key '%.40s'", key);
	}
	static const char *const needed[] = { "dtype", "shape", "data_offsets" };
	for (size_t i = 0; i < 3; i++) {
		if (!json_object_get(entry, needed[i]))
			return bad_tensor(err, label, t->name, "no %s", needed[i]);
	}
	uint64_t bytes = 0;
	int rc = parse_dtype(t, json_object_get(entry, "dtype"), label, err);
	if (!rc)
		rc = parse_shape(t, json_object_get(entry, "shape"), &bytes, label, err);
	if (!rc)
		rc = parse_offsets(t, json_object_get(entry, "data_offsets"), bytes, label, err);
	return rc;
}

/* Reader: the header as a whole ------------------------------------------------------------ */

static int parse_metadata(st_file *f, json_t *meta, const char *label, dsv3_error *err)
{
	if (!json_is_object(meta))
		return bad_file(err, label, "__metadata__ is not an object");
	size_t n = json_object_size(meta);
	if (n == 0)
		return 0;
	f->metadata = calloc(2 * n, sizeof *f->metadata);
	if (!f->metadata)
		return out_of_memory(err, label);
	const char *key;
	json_t *v;
	json_object_foreach(meta, key, v) {
		if (!json_is_string(v))
			return bad_file(err, label, "__metadata__ value of '%.200s' is not a string",
					key);
		char **pair = f->metadata + 2 * f->n_metadata;
		pair[0] = strdup(key);
		pair[1] = strdup(json_string_value(v));
		f->n_metadata++;
		if (!pair[0] || !pair[1])
			return out_of_memory(err, label);
	}
	return 0;
}

static int parse_entries(st_file *f, json_t *root, const char *label, dsv3_error *err)
{
	size_t n = json_object_size(root);
	/* tensors[n] followed by the name index; calloc(0) may give NULL, so take one more. */
	f->tensors = calloc(1, (n + 1) * (sizeof(st_tensor) + sizeof(size_t)));
	if (!f->tensors)
		return out_of_memory(err, label);
	const char *key;
	json_t *v;
	json_object_foreach(root, key, v) {
		int rc;
		if (strcmp(key, "__metadata__") == 0) {
			rc = parse_metadata(f, v, label, err);
		} else {
			st_tensor *t = &f->tensors[f->n_tensors++];
			t->name = strdup(key);
			if (!t->name)
				return out_of_memory(err, label);
			rc = parse_tensor(t, v, label, err);
		}
		if (rc)
			return rc;
	}
	return 0;
}

static int cmp_by_offsets(const void *a, const void *b)
{
	const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	uint64_t xe = x->begin + x->nbytes, ye = y->begin + y->nbytes;
	return xe < ye ? -1 : xe > ye;
}

/* The ranges must tile the data area exactly: no overlap, no hole, nothing past its end. */
static int check_layout(const st_file *f, uint64_t data_size, const char *label,
			dsv3_error *err)
{
	for (size_t i = 0; i < f->n_tensors; i++) {
		const st_tensor *t = &f->tensors[i];
		if (t->begin + t->nbytes > data_size)
			return bad_tensor(err, label, t->name,
					  "data_offsets end %" PRIu64 " runs past the end of the "
					  "data area (%" PRIu64 " bytes)", t->begin + t->nbytes, data_size);
	}
	const st_tensor **by_offset = malloc((f->n_tensors + 1) * sizeof *by_offset);
	if (!by_offset)
		return out_of_memory(err, label);
	for (size_t i = 0; i < f->n_tensors; i++)
		by_offset[i] = &f->tensors[i];
	qsort(by_offset, f->n_tensors, sizeof *by_offset, cmp_by_offsets);
	uint64_t expected = 0;
	const char *prev = NULL;
	int rc = 0;
	for (size_t i = 0; i < f->n_tensors && !rc; i++) {
		const st_tensor *t = by_offset[i];
		if (t->begin < expected)
			rc = bad_tensor(err, label, t->name, "data overlaps tensor '%.200s'", prev);
		else if (t->begin > expected)
			rc = bad_tensor(err, label, t->name, "hole of %" PRIu64
					" bytes in the data area before it", t->begin - expected);
		expected = t->begin + t->nbytes;
		prev = t->name;
	}
	free(by_offset);
	if (!rc && expected != data_size)
		rc = bad_file(err, label, "%" PRIu64 " bytes of the data area belong to no tensor",
			      data_size - expected);
	return rc;
}


static size_t *name_index(const st_file *f)
{
	return (size_t *)(void *)(f->tensors + f->n_tensors + 1);
}

static int cmp_tensor_names(const void *a, const void *b)
{
	return strcmp((*(const st_tensor *const *)a)->name, (*(const st_tensor *const *)b)->name);
}

static int build_name_index(st_file *f, const char *label, dsv3_error *err)
{
	const st_tensor **sorted = malloc((f->n_tensors + 1) * sizeof *sorted);
	if (!sorted)
		return out_of_memory(err, label);
	for (size_t i = 0; i < f->n_tensors; i++)
		sorted[i] = &f->tensors[i];
	qsort(sorted, f->n_tensors, sizeof *sorted, cmp_tensor_names);
	size_t *idx = name_index(f);
	for (size_t i = 0; i < f->n_tensors; i++)
		idx[i] = (size_t)(sorted[i] - f->tensors);
	free(sorted);
	return 0;
}

static int too_short(size_t size, const char *label, dsv3_error *err)
{
	return bad_file(err, label, "%zu bytes, shorter than the 8-byte header length", size);
}

static int parse_header(st_file *f, const uint8_t *bytes, size_t size, const char *label,
			dsv3_error *err)
{
	if (size < 8)
		return too_short(size, label, err);
	uint64_t n = read_le64(bytes);
	if (n > ST_MAX_HEADER)
		return bad_file(err, label, "header length %" PRIu64 " exceeds the limit of %u bytes",
				n, ST_MAX_HEADER);
	if (n > size - 8)
		return bad_file(err, label, "header length %" PRIu64 " exceeds the %zu bytes after "
				"the length field", n, size - 8);
	f->header_len = n;
	json_error_t jerr;
	json_t *root = json_loadb((const char *)bytes + 8, n, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return bad_file(err, label, "header is not valid JSON (byte %d): %s",
				jerr.position, jerr.text);
	int rc = 0;
	if (!json_is_object(root))
		rc = bad_file(err, label, "header is not a JSON object");
	if (!rc)
		rc = parse_entries(f, root, label, err);
	json_decref(root);
	return rc;
}

int st_parse(st_file *f, const uint8_t *bytes, size_t size, const char *label, dsv3_error *err)
{
	memset(f, 0, sizeof *f);
	f->path = strdup(label);
	if (!f->path)
		return out_of_memory(err, label);
	f->size = size;
	int rc = parse_header(f, bytes, size, label, err);
	if (!rc)
		rc = check_layout(f, size - 8 - f->header_len, label, err);
	if (!rc)
		rc = build_name_index(f, label, err);
	if (rc) {
		st_close(f);
		return rc;
	}
	const uint8_t *data = bytes + 8 + f->header_len;
	for (size_t i = 0; i < f->n_tensors; i++)
		f->tensors[i].data = data + f->tensors[i].begin;
	return 0;
}

int st_open(st_file *f, const char *path, dsv3_error *err)
{
	memset(f, 0, sizeof *f);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return dsv3_fail_errno(err, "%s: open", path);
	struct stat st;
	if (fstat(fd, &st) != 0) {
		int rc = dsv3_fail_errno(err, "%s: stat", path);
		close(fd);
		return rc;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return bad_file(err, path, "not a regular file");
	}
	size_t size = (size_t)st.st_size;
	if (size < 8) {
		close(fd);
		return too_short(size, path, err);
	}
	void *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd); /* the mapping keeps the file */
	if (map == MAP_FAILED)
		return dsv3_fail_errno(err, "%s: mmap", path);
	int rc = st_parse(f, map, size, path, err);
	if (rc) {
		munmap(map, size);
		return rc;
	}
	f->map = map;
	return 0;
}

void st_close(st_file *f)
{
	for (size_t i = 0; i < f->n_tensors; i++)
		free(f->tensors[i].name);
	free(f->tensors);
	for (size_t i = 0; i < 2 * f->n_metadata; i++)
		free(f->metadata[i]);
	free(f->metadata);
	if (f->map)
		munmap(f->map, f->size);
	free(f->path);
	memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name)
{
	if (!f->tensors)
		return NULL;
	const size_t *idx = name_index(f);
	size_t lo = 0, hi = f->n_tensors;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		const st_tensor *t = &f->tensors[idx[mid]];
		int c = strcmp(name, t->name);
		if (c == 0)
			return t;
		if (c < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return NULL;
}

uint64_t st_numel(const st_tensor *t)
{
	uint64_t n = 1;
	for (int i = 0; i < t->ndim; i++)
		n *= (uint64_t)t->shape[i];
	return n;
}

void st_release(const st_file *f, const st_tensor *t)
{
	/* Only a file mapping: DONTNEED on a caller's anonymous buffer would zero it. */
	if (!f->map || !t->data || t->nbytes == 0)
		return;
	/* Whole ST_FOLIO blocks around the range, kept inside the file's mapping: a fault maps the
	 * whole folio, so the next tensor's first page would map this one's dropped tail back, and
	 * it would stay until munmap. A neighbour's pages dropped too only cost it a minor fault. */
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	uintptr_t lo = (uintptr_t)f->map, hi = (lo + f->size + page - 1) & ~(page - 1);
	uintptr_t start = (uintptr_t)t->data & ~(uintptr_t)(ST_FOLIO - 1);
	uintptr_t end = ((uintptr_t)t->data + t->nbytes + ST_FOLIO - 1) & ~(uintptr_t)(ST_FOLIO - 1);
	start = start > lo ? start : lo;
	end = end < hi ? end : hi;
	madvise((void *)start, end - start, MADV_DONTNEED); /* advice only: errors do not matter */
}

/* Writer: the header ---------------------------------------------------------------------- */

typedef struct {
	char *p;
	size_t len, cap;
	int oom;
} strbuf;

static void sb_putn(strbuf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			b->oom = 1;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sb_puts(strbuf *b, const char *s)
{
	sb_putn(b, s, strlen(s));
}

static void sb_put_u64(strbuf *b, uint64_t v)
{
	char num[24];
	int n = snprintf(num, sizeof num, "%" PRIu64, v);
	sb_putn(b, num, (size_t)n);
}

/* A JSON string as serde_json writes it (see the top of this file). */
static void sb_put_json_string(strbuf *b, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	sb_putn(b, "\"", 1);
	for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
		char esc[7] = { '\\', 0, 0, 0, 0, 0, 0 };
		size_t n = 2;
		switch (*c) {
		case '"': esc[1] = '"'; break;
		case '\\': esc[1] = '\\'; break;
		case '\b': esc[1] = 'b'; break;
		case '\f': esc[1] = 'f'; break;
		case '\n': esc[1] = 'n'; break;
		case '\r': esc[1] = 'r'; break;
		case '\t': esc[1] = 't'; break;
		default:
			if (*c >= 0x20) {
				sb_putn(b, (const char *)c, 1);
				continue;
			}
			memcpy(esc + 1, "u00", 3);
			esc[4] = hex[*c >> 4];
			esc[5] = hex[*c & 15];
			n = 6;
		}
		sb_putn(b, esc, n);
	}
	sb_putn(b, "\"", 1);
}

/* The reference's layout order: dtype rank descending, then name in byte order. */
static int cmp_layout(const void *a, const void *b)
{
	const st_spec *x = *(const st_spec *const *)a, *y = *(const st_spec *const *)b;
	if (x->dtype != y->dtype)
		return x->dtype > y->dtype ? -1 : 1;
	return strcmp(x->name, y->name);
}

static int cmp_spec_names(const void *a, const void *b)
{
	return strcmp((*(const st_spec *const *)a)->name, (*(const st_spec *const *)b)->name);
}

static int cmp_metadata_keys(const void *a, const void *b)
{
	return strcmp(**(const char *const *const *)a, **(const char *const *const *)b);
}

/* jansson refuses to make a string of invalid UTF-8; a reader would refuse the file. */
static int is_utf8(const char *s)
{
	json_t *j = json_string(s);
	json_decref(j);
	return j != NULL;
}

static int check_spec(const st_spec *s, const char *label, uint64_t *bytes, dsv3_error *err)
{
	if (!s->name)
		return dsv3_fail(err, DSV3_EUSAGE, "%s: a tensor without a name", label);
	if (!is_utf8(s->name) || strcmp(s->name, "__metadata__") == 0)
		return bad_tensor(err, label, s->name, "not a valid tensor name");
	if ((unsigned)s->dtype >= ST_DTYPE_COUNT)
		return bad_tensor(err, label, s->name, "unknown dtype %d", (int)s->dtype);
	if (s->ndim < 0 || s->ndim > ST_MAX_DIMS)
		return bad_tensor(err, label, s->name, "%d dimensions (at most %d)", s->ndim,
				  ST_MAX_DIMS);
	uint64_t n = dtype_size(s->dtype);
	for (int i = 0; i < s->ndim; i++) {
		if (s->shape[i] < 0)
			return bad_tensor(err, label, s->name, "negative dimension %" PRId64,
					  s->shape[i]);
		if (__builtin_mul_overflow(n, (uint64_t)s->shape[i], &n))
			return bad_tensor(err, label, s->name, "byte count overflows");
	}
	*bytes = n;
	return 0;
}

/* Sorts pointers to the specs into layout order after validating every spec. */
static int order_specs(const st_spec *specs, size_t n, const st_spec **sorted,
		       const char *label, dsv3_error *err)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t bytes;
		int rc = check_spec(&specs[i], label, &bytes, err);
		if (rc)
			return rc;
		sorted[i] = &specs[i];
	}
	qsort(sorted, n, sizeof *sorted, cmp_spec_names);
	for (size_t i = 1; i < n; i++) {
		if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0)
			return bad_tensor(err, label, sorted[i]->name, "duplicate tensor name");
	}
	qsort(sorted, n, sizeof *sorted, cmp_layout);
	return 0;
}

static int put_metadata(strbuf *b, const char *const *metadata, const char *label,
			dsv3_error *err)
{
	size_t n = 0;
	while (metadata[2 * n]) {
		if (!metadata[2 * n + 1])
			return dsv3_fail(err, DSV3_EUSAGE, "%s: metadata key '%.200s' has no value",
					 label, metadata[2 * n]);
		if (!is_utf8(metadata[2 * n]) || !is_utf8(metadata[2 * n + 1]))
			return bad_file(err, label, "metadata '%.200s' is not valid UTF-8",
					metadata[2 * n]);
		n++;
	}
	const char *const **keys = malloc((n + 1) * sizeof *keys);
	if (!keys)
		return out_of_memory(err, label);
	for (size_t i = 0; i < n; i++)
		keys[i] = &metadata[2 * i];
	qsort(keys, n, sizeof *keys, cmp_metadata_keys);
	int rc = 0;
	sb_puts(b, "\"__metadata__\":{");
	for (size_t i = 0; i < n && !rc; i++) {
		if (i > 0 && strcmp(keys[i - 1][0], keys[i][0]) == 0)
			rc = bad_file(err, label, "metadata key '%.200s' given twice", keys[i][0]);
		if (i > 0)
			sb_puts(b, ",");
		sb_put_json_string(b, keys[i][0]);
		sb_puts(b, ":");
		sb_put_json_string(b, keys[i][1]);
	}
	sb_puts(b, "}");
	free(keys);
	return rc;
}

static void put_tensor(strbuf *b, const st_spec *s, uint64_t begin, uint64_t end)
{
	sb_put_json_string(b, s->name);
	sb_puts(b, ":{\"dtype\":\"");
	sb_puts(b, dtype_name(s->dtype));
	sb_puts(b, "\",\"shape\":[");
	for (int i = 0; i < s->ndim; i++) {
		if (i > 0)
			sb_puts(b, ",");
		sb_put_u64(b, (uint64_t)s->shape[i]);
	}
	sb_puts(b, "],\"data_offsets\":[");
	sb_put_u64(b, begin);
	sb_puts(b, ",");
	sb_put_u64(b, end);
	sb_puts(b, "]}");
}

/* Builds the padded header JSON for specs already in layout order; *data_size gets the total. */
static int build_header(strbuf *b, const st_spec *const *sorted, size_t n,
			const char *const *metadata, uint64_t *data_size, const char *label,
			dsv3_error *err)
{
	sb_puts(b, "{");
	if (metadata) {
		int rc = put_metadata(b, metadata, label, err);
		if (rc)
			return rc;
	}
	uint64_t offset = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t bytes = 0, end;
		check_spec(sorted[i], label, &bytes, err); /* validated already: only sizes it */
		if (__builtin_add_overflow(offset, bytes, &end))
			return bad_tensor(err, label, sorted[i]->name, "data area size overflows");
		if (i > 0 || metadata)
			sb_puts(b, ",");
		put_tensor(b, sorted[i], offset, end);
		offset = end;
	}
	sb_puts(b, "}");
	while (b->len % 8)
		sb_puts(b, " ");
	if (b->oom)
		return out_of_memory(err, label);
	*data_size = offset;
	return 0;
}

/* Validates, orders and serialises: the part of writing that touches no file. */
static int plan_file(const st_spec *specs, size_t n, const char *const *metadata,
		     const st_spec ***sorted, strbuf *hdr, uint64_t *data_size, const char *label,
		     dsv3_error *err)
{
	memset(hdr, 0, sizeof *hdr);
	*sorted = malloc((n + 1) * sizeof **sorted);
	if (!*sorted)
		return out_of_memory(err, label);
	int rc = order_specs(specs, n, *sorted, label, err);
	if (!rc)
		rc = build_header(hdr, *sorted, n, metadata, data_size, label, err);
	if (rc) {
		free(*sorted);
		*sorted = NULL;
		free(hdr->p);
		hdr->p = NULL;
	}
	return rc;
}

int st_header_json(const st_spec *specs, size_t n, const char *const *metadata, char **json,
		   size_t *len, dsv3_error *err)
{
	const st_spec **sorted;
	strbuf hdr;
	uint64_t data_size;
	int rc = plan_file(specs, n, metadata, &sorted, &hdr, &data_size, "safetensors header",
			   err);
	if (rc)
		return rc;
	free(sorted);
	*json = hdr.p;
	*len = hdr.len;
	return 0;
}

/* Writer: the file ------------------------------------------------------------------------ */

/* The file's SHA-256 runs on a thread of its own, beside the write() calls of the caller's
 * thread: hashing costs about as much CPU as copying into the page cache, and a write blocked
 * by dirty-page throttling no longer stalls it. The hasher takes one job at a time, in order.
 * Small pieces gather in one of two buffers; a full buffer is hashed while the other fills.
 * Large pieces are hashed and written in place, and st_writer_write returns only once the
 * hasher is done with them, so a caller may reuse its memory at once. */
typedef struct {
	pthread_t thread;
	int started;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	sha256_ctx *sha;
	const void *job; /* bytes to hash, or NULL when idle */
	size_t job_len;
	int quit;
} file_hasher;

struct st_writer {
	int fd;
	int created; /* the file is ours to unlink on abort */
	char *path;
	const st_spec *specs;
	const st_spec **sorted; /* layout order */
	file_hasher hasher;
	uint8_t *bufs[2];
	int cur;     /* the buffer being filled */
	size_t buf_len;
	uint64_t data_size, written;
	uint64_t file_pos, kicked; /* bytes written to the file; writeback started below kicked */
};

static void *hasher_main(void *arg)
{
	file_hasher *h = arg;
	pthread_mutex_lock(&h->lock);
	for (;;) {
		while (!h->job && !h->quit)
			pthread_cond_wait(&h->cond, &h->lock);
		if (!h->job)
			break;
		const void *p = h->job;
		size_t len = h->job_len;
		pthread_mutex_unlock(&h->lock);
		sha256_update(h->sha, p, len);
		pthread_mutex_lock(&h->lock);
		h->job = NULL;
		pthread_cond_broadcast(&h->cond);
	}
	pthread_mutex_unlock(&h->lock);
	return NULL;
}

static int hasher_start(file_hasher *h)
{
	h->sha = sha256_new();
	if (!h->sha)
		return -1;
	if (pthread_mutex_init(&h->lock, NULL))
		return -1;
	if (pthread_cond_init(&h->cond, NULL)) {
		pthread_mutex_destroy(&h->lock);
		return -1;
	}
	h->started = 1;
	if (pthread_create(&h->thread, NULL, hasher_main, h)) {
		h->started = -1; /* lock and cond exist, no thread */
		return -1;
	}
	return 0;
}

static void hasher_wait_locked(file_hasher *h)
{
	while (h->job)
		pthread_cond_wait(&h->cond, &h->lock);
}

/* Waits for the previous job, then queues [p, p+len). */
static void hasher_submit(file_hasher *h, const void *p, size_t len)
{
	if (!len)
		return;
	pthread_mutex_lock(&h->lock);
	hasher_wait_locked(h);
	h->job = p;
	h->job_len = len;
	pthread_cond_broadcast(&h->cond);
	pthread_mutex_unlock(&h->lock);
}

static void hasher_wait(file_hasher *h)
{
	pthread_mutex_lock(&h->lock);
	hasher_wait_locked(h);
	pthread_mutex_unlock(&h->lock);
}

/* Finishes the queued job and joins the thread. */
static void hasher_stop(file_hasher *h)
{
	if (h->started == 1) {
		pthread_mutex_lock(&h->lock);
		hasher_wait_locked(h);
		h->quit = 1;
		pthread_cond_broadcast(&h->cond);
		pthread_mutex_unlock(&h->lock);
		pthread_join(h->thread, NULL);
	}
	if (h->started) {
		pthread_cond_destroy(&h->cond);
		pthread_mutex_destroy(&h->lock);
	}
	h->started = 0;
	sha256_free(h->sha);
	h->sha = NULL;
}

/* Starts writing the file's dirty pages to disk without waiting: the disk then works while we
 * compute, instead of the kernel holding gigabytes back for the final fsync to stall on. */
static void start_writeback(st_writer *w)
{
	if (w->file_pos - w->kicked < ST_WRITEBACK_EVERY)
		return;
	sync_file_range(w->fd, (off_t)w->kicked, (off_t)(w->file_pos - w->kicked),
			SYNC_FILE_RANGE_WRITE); /* advice: fsync still makes it durable */
	w->kicked = w->file_pos;
}

static int write_all(st_writer *w, const void *p, size_t len, dsv3_error *err)
{
	const uint8_t *c = p;
	w->file_pos += len;
	while (len > 0) {
		ssize_t k = write(w->fd, c, len);
		if (k < 0 && errno == EINTR)
			continue;
		if (k == 0)
			errno = ENOSPC;
		if (k <= 0)
			return dsv3_fail_errno(err, "%s: write", w->path);
		c += k;
		len -= (size_t)k;
	}
	start_writeback(w);
	return 0;
}

/* Hands the filled buffer to the hasher, writes it, and switches to the other buffer (whose
 * hashing hasher_submit has seen finish). */
static int flush_buf(st_writer *w, dsv3_error *err)
{
	uint8_t *b = w->bufs[w->cur];
	size_t len = w->buf_len;
	hasher_submit(&w->hasher, b, len);
	w->cur ^= 1;
	w->buf_len = 0;
	return write_all(w, b, len, err);
}

/* Buffers small pieces; large ones are hashed and written in place. */
static int put_bytes(st_writer *w, const void *p, size_t len, dsv3_error *err)
{
	if (w->buf_len + len > ST_WRITE_BUF) {
		int rc = flush_buf(w, err);
		if (rc)
			return rc;
		if (len >= ST_WRITE_BUF / 2) {
			hasher_submit(&w->hasher, p, len);
			rc = write_all(w, p, len, err);
			hasher_wait(&w->hasher);
			return rc;
		}
	}
	memcpy(w->bufs[w->cur] + w->buf_len, p, len);
	w->buf_len += len;
	return 0;
}

/* The two write buffers are mappings of their own, not malloc's: unmapped, their pages go back
 * at once, where glibc would keep a freed 8 MiB block in the thread's arena for whichever file
 * that thread writes next (so the RAM a tool holds would follow which thread wrote what). */
static uint8_t *buf_map(void)
{
	void *p = mmap(NULL, ST_WRITE_BUF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		       -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void buf_unmap(uint8_t *p)
{
	if (p)
		munmap(p, ST_WRITE_BUF);
}

static void writer_free(st_writer *w)
{
	hasher_stop(&w->hasher); /* before the buffers it may be reading go */
	if (w->fd >= 0)
		close(w->fd);
	buf_unmap(w->bufs[0]);
	buf_unmap(w->bufs[1]);
	free(w->sorted);
	free(w->path);
	free(w);
}

static int writer_start(st_writer *w, const char *path, const strbuf *hdr, dsv3_error *err)
{
	w->path = strdup(path);
	w->bufs[0] = buf_map();
	w->bufs[1] = buf_map();
	if (!w->path || !w->bufs[0] || !w->bufs[1])
		return out_of_memory(err, path);
	if (hasher_start(&w->hasher))
		return dsv3_fail(err, DSV3_EIO, "%s: cannot start the hashing thread", path);
	w->fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
	if (w->fd < 0)
		return dsv3_fail_errno(err, "%s: create", path);
	w->created = 1;
	uint8_t len[8];
	for (int i = 0; i < 8; i++)
		len[i] = (uint8_t)((uint64_t)hdr->len >> (8 * i));
	int rc = put_bytes(w, len, 8, err);
	if (!rc)
		rc = put_bytes(w, hdr->p, hdr->len, err);
	return rc;
}

int st_writer_open(st_writer **wp, const char *path, const st_spec *specs, size_t n,
		   const char *const *metadata, dsv3_error *err)
{
	*wp = NULL;
	st_writer *w = calloc(1, sizeof *w);
	if (!w)
		return out_of_memory(err, path);
	w->fd = -1;
	w->specs = specs;
	strbuf hdr;
	int rc = plan_file(specs, n, metadata, &w->sorted, &hdr, &w->data_size, path, err);
	if (!rc)
		rc = writer_start(w, path, &hdr, err);
	free(hdr.p);
	if (rc) {
		st_writer_abort(w);
		return rc;
	}
	*wp = w;
	return 0;
}

size_t st_writer_order(const st_writer *w, size_t pos)
{
	return (size_t)(w->sorted[pos] - w->specs);
}

int st_writer_write(st_writer *w, const void *buf, size_t len, dsv3_error *err)
{
	if (len > w->data_size - w->written)
		return bad_file(err, w->path, "%zu more bytes than the tensors hold (%" PRIu64
				" of %" PRIu64 " written)", len, w->written, w->data_size);
	w->written += len;
	return put_bytes(w, buf, len, err);
}

int st_writer_finish(st_writer *w, uint8_t sha256[32], dsv3_error *err)
{
	if (w->written != w->data_size)
		return bad_file(err, w->path, "only %" PRIu64 " of the %" PRIu64
				" data bytes were written", w->written, w->data_size);
	int rc = flush_buf(w, err);
	hasher_wait(&w->hasher);
	if (rc)
		return rc;
	if (fsync(w->fd) != 0)
		return dsv3_fail_errno(err, "%s: fsync", w->path);
	int fd = w->fd;
	w->fd = -1;
	if (close(fd) != 0)
		return dsv3_fail_errno(err, "%s: close", w->path);
	uint8_t digest[32];
	sha256_final(w->hasher.sha, digest);
	if (sha256)
		memcpy(sha256, digest, 32);
	writer_free(w);
	return 0;
}

void st_writer_abort(st_writer *w)
{
	if (!w)
		return;
	if (w->created)
		unlink(w->path);
	writer_free(w);
}
