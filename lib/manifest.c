/* The manifests of DESIGN §3.4. SHA256SUMS is what `sha256sum -c` reads ("HEX  NAME\n", sorted
 * by name); tensors.sha256.json maps each logical tensor to its dtype, shape and SHA-256. */
#include "manifest.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "hf_ckpt.h"
#include "sha256.h"

#define SUMS_NAME "SHA256SUMS"
#define TENSORS_NAME "tensors.sha256.json"

void manifest_init(manifest *m)
{
	memset(m, 0, sizeof *m);
}

void manifest_free(manifest *m)
{
	for (size_t i = 0; i < m->n_files; i++)
		free(m->files[i].name);
	for (size_t i = 0; i < m->n_tensors; i++)
		free(m->tensors[i].name);
	free(m->files);
	free(m->tensors);
	manifest_init(m);
}

int manifest_add_file(manifest *m, const char *name, const uint8_t sha256[32])
{
	if (m->n_files == m->cap_files) {
		size_t cap = m->cap_files ? 2 * m->cap_files : 16;
		manifest_file *f = realloc(m->files, cap * sizeof *f);
		if (!f)
			return -1;
		m->files = f;
		m->cap_files = cap;
	}
	char *copy = strdup(name);
	if (!copy)
		return -1;
	m->files[m->n_files].name = copy;
	memcpy(m->files[m->n_files].sha256, sha256, 32);
	m->n_files++;
	return 0;
}

int manifest_add_tensor(manifest *m, const char *name, st_dtype dtype, int ndim,
			const int64_t *shape, const uint8_t sha256[32])
{
	if (ndim < 0 || ndim > 8)
		return -1;
	if (m->n_tensors == m->cap_tensors) {
		size_t cap = m->cap_tensors ? 2 * m->cap_tensors : 64;
		manifest_tensor *t = realloc(m->tensors, cap * sizeof *t);
		if (!t)
			return -1;
		m->tensors = t;
		m->cap_tensors = cap;
	}
	manifest_tensor *t = &m->tensors[m->n_tensors];
	memset(t, 0, sizeof *t);
	t->name = strdup(name);
	if (!t->name)
		return -1;
	t->dtype = dtype;
	t->ndim = ndim;
	for (int d = 0; d < ndim; d++)
		t->shape[d] = shape[d];
	memcpy(t->sha256, sha256, 32);
	m->n_tensors++;
	return 0;
}

/* ---- writing ---- */

static int cmp_tensor_ptr(const void *a, const void *b)
{
	const manifest_tensor *x = *(const manifest_tensor *const *)a;
	const manifest_tensor *y = *(const manifest_tensor *const *)b;
	return strcmp(x->name, y->name);
}

static int cmp_file_ptr(const void *a, const void *b)
{
	const manifest_file *x = *(const manifest_file *const *)a;
	const manifest_file *y = *(const manifest_file *const *)b;
	return strcmp(x->name, y->name);
}

static json_t *tensor_json(const manifest_tensor *t)
{
	char hex[65];
	sha256_hex(t->sha256, hex);
	json_t *shape = json_array();
	for (int d = 0; d < t->ndim; d++)
		json_array_append_new(shape, json_integer(t->shape[d]));
	const char *dt = dtype_name(t->dtype);
	return json_pack("{s:s, s:o, s:s}", "dtype", dt ? dt : "?", "shape", shape, "sha256", hex);
}

/* Renders tensors.sha256.json (sorted by name, 2-space indent, trailing newline). */
static int tensors_json_text(const manifest *m, const char *dir, char **text, dsv3_error *err)
{
	const manifest_tensor **order = malloc((m->n_tensors + 1) * sizeof *order);
	if (!order)
		return dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", dir, TENSORS_NAME);
	for (size_t i = 0; i < m->n_tensors; i++)
		order[i] = &m->tensors[i];
	qsort(order, m->n_tensors, sizeof *order, cmp_tensor_ptr);
	int rc = 0;
	json_t *root = json_object();
	for (size_t i = 0; i < m->n_tensors && !rc; i++) {
		if (i > 0 && strcmp(order[i - 1]->name, order[i]->name) == 0)
			rc = dsv3_fail(err, DSV3_EDATA, "%s/%s: tensor %s listed twice", dir,
				       TENSORS_NAME, order[i]->name);
		else if (json_object_set_new(root, order[i]->name, tensor_json(order[i])) != 0)
			rc = dsv3_fail(err, DSV3_EIO, "%s/%s: cannot encode tensor %s", dir,
				       TENSORS_NAME, order[i]->name);
	}
	free(order);
	if (!rc) {
		char *body = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		size_t len = body ? strlen(body) : 0;
		*text = body ? malloc(len + 2) : NULL;
		if (*text) {
			memcpy(*text, body, len);
			memcpy(*text + len, "\n", 2);
		} else {
			rc = dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", dir, TENSORS_NAME);
		}
		free(body);
	}
	json_decref(root);
	return rc;
}

/* Renders SHA256SUMS over m's files plus `extra` (SHA256SUMS itself is never listed). */
static int sums_text(const manifest *m, const manifest_file *extra, const char *dir, char **text,
		     dsv3_error *err)
{
	const manifest_file **order = malloc((m->n_files + 1) * sizeof *order);
	size_t n = 0;
	if (!order)
		return dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", dir, SUMS_NAME);
	for (size_t i = 0; i < m->n_files; i++)
		if (strcmp(m->files[i].name, SUMS_NAME) != 0)
			order[n++] = &m->files[i];
	order[n++] = extra;
	qsort(order, n, sizeof *order, cmp_file_ptr);

	size_t cap = 1;
	for (size_t i = 0; i < n; i++)
		cap += 64 + 2 + strlen(order[i]->name) + 1;
	char *out = malloc(cap), *p = out;
	int rc = out ? 0 : dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", dir, SUMS_NAME);
	for (size_t i = 0; i < n && !rc; i++) {
		if (i > 0 && strcmp(order[i - 1]->name, order[i]->name) == 0) {
			rc = dsv3_fail(err, DSV3_EDATA, "%s/%s: file %s listed twice", dir, SUMS_NAME,
				       order[i]->name);
			break;
		}
		if (strchr(order[i]->name, '\n') || strchr(order[i]->name, '\\')) {
			/* sha256sum would need its escaped form; our tools never make such names. */
			rc = dsv3_fail(err, DSV3_EDATA, "%s: file name \"%s\" cannot be listed in %s",
				       dir, order[i]->name, SUMS_NAME);
			break;
		}
		sha256_hex(order[i]->sha256, p);
		p += 64;
		p += sprintf(p, "  %s\n", order[i]->name);
	}
	free(order);
	if (rc) {
		free(out);
		return rc;
	}
	*p = '\0';
	*text = out;
	return 0;
}

int manifest_write_small(manifest *m, out_dir *o, const char *name, const void *data, size_t len,
			 dsv3_error *err)
{
	uint8_t sha[32];
	sha256_buffer(data, len, sha);
	int rc = out_dir_write_file(o, name, data, len, err);
	if (!rc && manifest_add_file(m, name, sha))
		rc = dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory (manifest)", o->dir, name);
	return rc;
}

int manifest_write(const manifest *m, out_dir *o, dsv3_error *err)
{
	char *json = NULL, *sums = NULL;
	int rc = tensors_json_text(m, o->dir, &json, err);
	if (rc)
		return rc;
	manifest_file json_entry = { .name = TENSORS_NAME };
	sha256_buffer(json, strlen(json), json_entry.sha256);
	rc = sums_text(m, &json_entry, o->dir, &sums, err);
	if (!rc)
		rc = out_dir_write_file(o, TENSORS_NAME, json, strlen(json), err);
	if (!rc)
		rc = out_dir_write_file(o, SUMS_NAME, sums, strlen(sums), err);
	free(json);
	free(sums);
	return rc;
}

/* ---- reading ---- */

static int hex_digit(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int parse_hex(const char *s, uint8_t out[32])
{
	for (int i = 0; i < 32; i++) {
		int hi = hex_digit((unsigned char)s[2 * i]);
		int lo = hex_digit((unsigned char)s[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

/* Reads a whole small file; a missing manifest is bad checkpoint data, not an I/O failure. */
static int read_text(const char *path, char **text, size_t *len, dsv3_error *err)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		if (errno == ENOENT)
			return dsv3_fail(err, DSV3_EDATA, "%s is missing", path);
		return dsv3_fail_errno(err, "cannot open %s", path);
	}
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	while (buf) {
		if (n + 1 >= cap) {
			char *b = realloc(buf, cap * 2);
			if (!b) {
				free(buf);
				buf = NULL;
				break;
			}
			buf = b;
			cap *= 2;
		}
		size_t r = fread(buf + n, 1, cap - n - 1, f);
		n += r;
		if (r == 0)
			break;
	}
	int bad = ferror(f);
	fclose(f);
	if (!buf)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	if (bad) {
		free(buf);
		return dsv3_fail(err, DSV3_EIO, "cannot read %s", path);
	}
	buf[n] = '\0';
	*text = buf;
	*len = n;
	return 0;
}

/* One line "HEX  NAME" or "HEX *NAME" (sha256sum's binary-mode marker). */
static int parse_sums_line(manifest *m, char *line, const char *path, size_t lineno,
			   dsv3_error *err)
{
	uint8_t digest[32];
	size_t len = strlen(line);
	if (len < 67 || parse_hex(line, digest) != 0 || line[64] != ' ' ||
	    (line[65] != ' ' && line[65] != '*'))
		return dsv3_fail(err, DSV3_EDATA, "%s:%zu: malformed line (expected \"SHA256  NAME\")",
				 path, lineno);
	/* A checkpoint is one flat directory: a path could point outside it. */
	if (strchr(line + 66, '/'))
		return dsv3_fail(err, DSV3_EDATA, "%s:%zu: file name %s is not a base name", path,
				 lineno, line + 66);
	if (manifest_add_file(m, line + 66, digest) != 0)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	return 0;
}

static int no_duplicate_files(const manifest *m, const char *path, dsv3_error *err)
{
	const manifest_file **order = malloc((m->n_files + 1) * sizeof *order);
	if (!order)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	for (size_t i = 0; i < m->n_files; i++)
		order[i] = &m->files[i];
	qsort(order, m->n_files, sizeof *order, cmp_file_ptr);
	int rc = 0;
	for (size_t i = 1; i < m->n_files && !rc; i++)
		if (strcmp(order[i - 1]->name, order[i]->name) == 0)
			rc = dsv3_fail(err, DSV3_EDATA, "%s: file %s listed twice", path,
				       order[i]->name);
	free(order);
	return rc;
}

static int read_sums(manifest *m, const char *path, dsv3_error *err)
{
	char *text;
	size_t len;
	int rc = read_text(path, &text, &len, err);
	if (rc)
		return rc;
	if (strlen(text) != len)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: contains a NUL byte", path);
	size_t lineno = 0;
	for (char *line = text; !rc && *line;) {
		char *nl = strchr(line, '\n');
		lineno++;
		if (!nl) {
			rc = dsv3_fail(err, DSV3_EDATA, "%s:%zu: line does not end in a newline",
				       path, lineno);
			break;
		}
		*nl = '\0';
		rc = parse_sums_line(m, line, path, lineno, err);
		line = nl + 1;
	}
	free(text);
	return rc ? rc : no_duplicate_files(m, path, err);
}

static int parse_tensor_entry(manifest *m, const char *name, json_t *v, const char *path,
			      dsv3_error *err)
{
	const char *dt = json_string_value(json_object_get(v, "dtype"));
	json_t *shape = json_object_get(v, "shape");
	const char *hex = json_string_value(json_object_get(v, "sha256"));
	st_dtype dtype;
	uint8_t digest[32];
	int64_t dims[8];
	if (!json_is_object(v) || !dt || !json_is_array(shape) || !hex)
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: tensor %s: expected {\"dtype\", \"shape\", \"sha256\"}", path,
				 name);
	if (dtype_from_name(dt, &dtype) != 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: unknown dtype \"%s\"", path, name,
				 dt);
	if (strlen(hex) != 64 || parse_hex(hex, digest) != 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: sha256 is not 64 hex digits",
				 path, name);
	size_t ndim = json_array_size(shape);
	if (ndim > 8)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: more than 8 dimensions", path,
				 name);
	for (size_t d = 0; d < ndim; d++) {
		json_t *x = json_array_get(shape, d);
		if (!json_is_integer(x) || json_integer_value(x) < 0)
			return dsv3_fail(err, DSV3_EDATA,
					 "%s: tensor %s: shape has a non-integer or negative dim",
					 path, name);
		dims[d] = json_integer_value(x);
	}
	if (manifest_add_tensor(m, name, dtype, (int)ndim, dims, digest) != 0)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	return 0;
}

static int read_tensors(manifest *m, const char *path, dsv3_error *err)
{
	char *text;
	size_t len;
	int rc = read_text(path, &text, &len, err);
	if (rc)
		return rc;
	json_error_t jerr;
	json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
	free(text);
	if (!root)
		return dsv3_fail(err, DSV3_EDATA, "%s:%d: %s", path, jerr.line, jerr.text);
	if (!json_is_object(root))
		rc = dsv3_fail(err, DSV3_EDATA, "%s: not a JSON object", path);
	const char *name;
	json_t *v;
	json_object_foreach(root, name, v) {
		if (rc)
			break;
		rc = parse_tensor_entry(m, name, v, path, err);
	}
	json_decref(root);
	return rc;
}

int manifest_read(manifest *m, const char *dir, dsv3_error *err)
{
	manifest_init(m);
	size_t len = strlen(dir) + sizeof TENSORS_NAME + 2;
	char *path = malloc(len);
	if (!path)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	snprintf(path, len, "%s/%s", dir, SUMS_NAME);
	int rc = read_sums(m, path, err);
	if (!rc) {
		snprintf(path, len, "%s/%s", dir, TENSORS_NAME);
		rc = read_tensors(m, path, err);
	}
	free(path);
	if (rc)
		manifest_free(m);
	return rc;
}

/* Files a checkpoint tool writes itself; every other regular file is a side file. */
static int is_tool_file(const char *name)
{
	static const char *const own[] = { "model.safetensors.index.json", "config.json", "SHA256SUMS",
					   "tensors.sha256.json" };
	size_t len = strlen(name), ext = strlen(".safetensors");
	if (name[0] == '.' || (len >= ext && strcmp(name + len - ext, ".safetensors") == 0))
		return 1;
	for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
		if (strcmp(name, own[i]) == 0)
			return 1;
	return 0;
}

static int copy_side_file(manifest *m, out_dir *o, const char *in_dir, const char *name, size_t *copied,
			  dsv3_error *err)
{
	char *src = NULL;
	if (asprintf(&src, "%s/%s", in_dir, name) < 0)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	struct stat st;
	int rc = 0;
	if (stat(src, &st) == 0 && S_ISREG(st.st_mode)) {
		uint8_t sha[32];
		rc = out_dir_copy_file(o, src, name, err);
		if (!rc)
			rc = sha256_file(src, sha, err);
		if (!rc && manifest_add_file(m, name, sha))
			rc = dsv3_fail(err, DSV3_EIO, "out of memory (manifest)");
		if (!rc)
			(*copied)++;
	}
	free(src);
	return rc;
}

int manifest_copy_side_files(manifest *m, out_dir *o, const char *in_dir, size_t *copied, dsv3_error *err)
{
	char **names = NULL;
	size_t n = 0;
	int rc = dir_glob(in_dir, "*", &names, &n, err);
	for (size_t i = 0; i < n; i++) {
		if (!rc && !is_tool_file(names[i]))
			rc = copy_side_file(m, o, in_dir, names[i], copied, err);
		free(names[i]);
	}
	free(names);
	return rc;
}
