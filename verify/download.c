/* dsv3-verify download DIR: a Hugging Face download checked before anything reads its weights.
 * The structure first (every file model.safetensors.index.json names is there, every header is
 * valid and its data area fills the file, every tensor sits in the file the index names), then,
 * when a list is given, every file's hash against it: the model tree API's JSON (LFS files by
 * SHA-256, small files by their git blob id) or a sha256sum file. Files are hashed in parallel,
 * largest first, so the slowest file starts early. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>

#include "cli.h"
#include "hf_ckpt.h"
#include "progress.h"
#include "threadpool.h"
#include "download.h"
#include "verify.h"

#define INDEX_NAME "model.safetensors.index.json"
#define READ_CHUNK (4u << 20)
#define MAX_WALK_DEPTH 32 /* a symlink loop in the download must not recurse forever */

/* ---- the list of expected files ---- */

typedef enum { HASH_SHA256, HASH_GIT_BLOB_SHA1 } hash_kind;

typedef struct {
	char *path;        /* relative to DIR, no "." or ".." components */
	hash_kind kind;
	uint8_t digest[32]; /* 32 bytes of SHA-256 or 20 of SHA-1 */
	int64_t size;      /* -1 when the list does not say (sha256sum) */
	size_t where;      /* line (sha256sum) or entry (tree) number, for messages */
} listed_file;

typedef struct {
	const char *source; /* the list file's path */
	int is_tree;
	listed_file *files;
	size_t n, cap;
} file_list;

static void file_list_free(file_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->files[i].path);
	free(l->files);
	l->files = NULL;
	l->n = l->cap = 0;
}

static int file_list_add(file_list *l, const listed_file *f, dsv3_error *err)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 64;
		listed_file *v = realloc(l->files, cap * sizeof *v);
		if (!v)
			return dsv3_fail(err, DSV3_EIO, "%s: out of memory", l->source);
		l->files = v;
		l->cap = cap;
	}
	l->files[l->n] = *f;
	if (!(l->files[l->n].path = strdup(f->path)))
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", l->source);
	l->n++;
	return 0;
}

static int parse_hex(const char *s, size_t n_bytes, uint8_t *out)
{
	for (size_t i = 0; i < 2 * n_bytes; i++) {
		int c = s[i], v;
		if (c >= '0' && c <= '9')
			v = c - '0';
		else if (c >= 'a' && c <= 'f')
			v = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v = c - 'A' + 10;
		else
			return -1;
		if (i % 2 == 0)
			out[i / 2] = (uint8_t)(v << 4);
		else
			out[i / 2] |= (uint8_t)v;
	}
	return s[2 * n_bytes] == '\0' || s[2 * n_bytes] == ' ' ? 0 : -1;
}

/* A listed path must name a file inside DIR: relative, no "..", no empty component. A leading
 * "./" (as `sha256sum ./NAME` writes it) is dropped. Returns the usable path or NULL. */
static const char *safe_relative_path(const char *p)
{
	while (p[0] == '.' && p[1] == '/')
		p += 2;
	if (!*p || *p == '/')
		return NULL;
	for (const char *c = p; *c;) {
		size_t len = strcspn(c, "/");
		if (len == 0 || (len == 2 && c[0] == '.' && c[1] == '.') ||
		    (len == 1 && c[0] == '.'))
			return NULL;
		c += len;
		if (*c == '/')
			c++;
		if (!*c && c[-1] == '/')
			return NULL;
	}
	return p;
}

static int cmp_listed_path(const void *a, const void *b)
{
	return strcmp(((const listed_file *)a)->path, ((const listed_file *)b)->path);
}

/* A file listed twice with two hashes would pass whichever matched: refuse the list. The list is
 * sorted by path afterwards. */
static int no_duplicates(file_list *l, dsv3_error *err)
{
	qsort(l->files, l->n, sizeof *l->files, cmp_listed_path);
	for (size_t i = 1; i < l->n; i++) {
		const listed_file *a = &l->files[i - 1], *b = &l->files[i];
		if (strcmp(a->path, b->path))
			continue;
		size_t first = a->where < b->where ? a->where : b->where;
		size_t second = a->where < b->where ? b->where : a->where;
		if (l->is_tree)
			return dsv3_fail(err, DSV3_EDATA, "%s: entry %zu (%s): listed twice (entry "
					 "%zu too)", l->source, second, b->path, first);
		return dsv3_fail(err, DSV3_EDATA, "%s:%zu: %s listed twice (line %zu too)",
				 l->source, second, b->path, first);
	}
	return 0;
}

/* sha256sum's escaped names (a line starting with '\'): "\\" and "\n" in the name. */
static int unescape_name(char *s)
{
	char *w = s;
	for (char *r = s; *r; r++) {
		if (*r != '\\') {
			*w++ = *r;
			continue;
		}
		r++;
		if (*r == '\\')
			*w++ = '\\';
		else if (*r == 'n')
			*w++ = '\n';
		else
			return -1;
	}
	*w = '\0';
	return 0;
}

/* "HEX  NAME", "HEX *NAME" (binary mode), or the BSD form "SHA256 (NAME) = HEX" (--tag). */
static int parse_sums_line(char *line, listed_file *f)
{
	int escaped = line[0] == '\\';
	char *s = line + escaped;
	char *name = NULL;
	const char *hex = NULL;
	size_t len = strlen(s);
	if (!strncmp(s, "SHA256 (", 8) && len >= 8 + 1 + 4 + 64 &&
	    !strncmp(s + len - 68, ") = ", 4)) {
		hex = s + len - 64;
		s[len - 68] = '\0';
		name = s + 8;
	} else if (len > 66 && s[64] == ' ' && (s[65] == ' ' || s[65] == '*')) {
		hex = s;
		name = s + 66;
	}
	if (!name || parse_hex(hex, 32, f->digest) || (escaped && unescape_name(name)))
		return -1;
	const char *p = safe_relative_path(name);
	if (!p)
		return -1;
	f->path = (char *)p;
	f->kind = HASH_SHA256;
	f->size = -1;
	return 0;
}

static int read_sums(file_list *l, dsv3_error *err)
{
	FILE *fp = fopen(l->source, "r");
	if (!fp)
		return dsv3_fail_errno(err, "cannot open %s", l->source);
	char *line = NULL;
	size_t cap = 0, lineno = 0;
	ssize_t len;
	int rc = 0;
	while (!rc && (len = getline(&line, &cap, fp)) >= 0) {
		lineno++;
		while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
			line[--len] = '\0';
		listed_file f = { .where = lineno };
		if (strlen(line) != (size_t)len || parse_sums_line(line, &f))
			rc = dsv3_fail(err, DSV3_EDATA, "%s:%zu: malformed line (expected "
				       "\"SHA256  NAME\" with a relative NAME)", l->source, lineno);
		else
			rc = file_list_add(l, &f, err);
	}
	if (!rc && ferror(fp))
		rc = dsv3_fail_errno(err, "cannot read %s", l->source);
	if (!rc && lineno == 0)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: empty list", l->source);
	free(line);
	fclose(fp);
	return rc ? rc : no_duplicates(l, err);
}

static int tree_error(const file_list *l, size_t entry, const char *path, const char *what,
		      dsv3_error *err)
{
	return dsv3_fail(err, DSV3_EDATA, "%s: entry %zu%s%s%s: %s", l->source, entry,
			 path ? " (" : "", path ? path : "", path ? ")" : "", what);
}

/* A size field: a non-negative JSON integer. */
static int tree_size(json_t *v, int64_t *size)
{
	if (!json_is_integer(v) || json_integer_value(v) < 0)
		return -1;
	*size = json_integer_value(v);
	return 0;
}

/* LFS files by their SHA-256 and size; the rest by their git blob id (SHA-1 of the blob). */
static int tree_file(const file_list *l, json_t *e, size_t entry, listed_file *f,
		     dsv3_error *err)
{
	json_t *path = json_object_get(e, "path"), *lfs = json_object_get(e, "lfs");
	if (!json_is_string(path))
		return tree_error(l, entry, NULL, "no \"path\" string", err);
	const char *name = json_string_value(path);
	if (!(f->path = (char *)safe_relative_path(name)))
		return tree_error(l, entry, name, "path is not relative to the repository", err);
	if (lfs && !json_is_null(lfs)) {
		json_t *oid = json_object_get(lfs, "oid");
		f->kind = HASH_SHA256;
		if (!json_is_object(lfs) || !json_is_string(oid) ||
		    strlen(json_string_value(oid)) != 64 ||
		    parse_hex(json_string_value(oid), 32, f->digest))
			return tree_error(l, entry, name, "lfs.oid is not a SHA-256", err);
		if (tree_size(json_object_get(lfs, "size"), &f->size))
			return tree_error(l, entry, name, "lfs.size is not a size", err);
		return 0;
	}
	json_t *oid = json_object_get(e, "oid");
	f->kind = HASH_GIT_BLOB_SHA1;
	if (!json_is_string(oid) || strlen(json_string_value(oid)) != 40 ||
	    parse_hex(json_string_value(oid), 20, f->digest))
		return tree_error(l, entry, name, "oid is not a git blob id (40 hex digits)", err);
	if (tree_size(json_object_get(e, "size"), &f->size))
		return tree_error(l, entry, name, "size is not a size", err);
	return 0;
}

static int tree_entry(file_list *l, json_t *e, size_t entry, dsv3_error *err)
{
	json_t *type = json_object_get(e, "type");
	if (!json_is_object(e) || !json_is_string(type))
		return tree_error(l, entry, NULL, "not an object with a \"type\" string", err);
	if (!strcmp(json_string_value(type), "directory"))
		return 0; /* its files, when listed (?recursive=true), are entries of their own */
	if (strcmp(json_string_value(type), "file"))
		return tree_error(l, entry, NULL, "type is not \"file\" or \"directory\"", err);
	listed_file f = { .where = entry };
	int rc = tree_file(l, e, entry, &f, err);
	return rc ? rc : file_list_add(l, &f, err);
}

static int read_tree(file_list *l, dsv3_error *err)
{
	json_error_t jerr;
	json_t *root = json_load_file(l->source, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		if (access(l->source, R_OK) != 0)
			return dsv3_fail_errno(err, "cannot open %s", l->source);
		return dsv3_fail(err, DSV3_EDATA, "%s:%d: invalid JSON: %s", l->source, jerr.line,
				 jerr.text);
	}
	int rc = 0;
	if (!json_is_array(root))
		rc = dsv3_fail(err, DSV3_EDATA, "%s: not a JSON array (the answer of "
			       "/api/models/REPO/tree/REVISION?recursive=true)", l->source);
	for (size_t i = 0; !rc && i < json_array_size(root); i++)
		rc = tree_entry(l, json_array_get(root, i), i + 1, err);
	if (!rc && l->n == 0)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: lists no files", l->source);
	json_decref(root);
	return rc ? rc : no_duplicates(l, err);
}

/* ---- the files on disk ---- */

typedef struct {
	char **v;
	size_t n, cap;
} name_list;

static void name_list_free(name_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->v[i]);
	free(l->v);
}

static int name_list_add(name_list *l, const char *name)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 64;
		char **v = realloc(l->v, cap * sizeof *v);
		if (!v)
			return -1;
		l->v = v;
		l->cap = cap;
	}
	if (!(l->v[l->n] = strdup(name)))
		return -1;
	l->n++;
	return 0;
}

static int cmp_str_ptr(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Files below DIR, relative paths, following symlinks (a hub cache snapshot is all links).
 * Hidden directories (.cache of `huggingface-cli download --local-dir`, .git) are not the
 * download; the list file itself, when it lies in DIR, is not either. */
typedef struct {
	dev_t skip_dev;
	ino_t skip_ino;
	int skip;
	name_list files;
} local_walk;

static int walk(local_walk *w, const char *dir, const char *rel, int depth, dsv3_error *err)
{
	DIR *d = opendir(dir);
	if (!d)
		return dsv3_fail_errno(err, "cannot open %s", dir);
	int rc = 0;
	struct dirent *e;
	char path[4096], sub[4096];
	while (!rc && (e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
		snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", e->d_name);
		struct stat st;
		if (stat(path, &st) != 0)
			continue; /* a dangling link: not a file of the download */
		if (S_ISDIR(st.st_mode) && e->d_name[0] != '.' && depth < MAX_WALK_DEPTH)
			rc = walk(w, path, sub, depth + 1, err);
		else if (S_ISREG(st.st_mode) &&
			 !(w->skip && st.st_dev == w->skip_dev && st.st_ino == w->skip_ino) &&
			 name_list_add(&w->files, sub))
			rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	}
	closedir(d);
	return rc;
}

/* ---- structure: index, headers, tensors ---- */

typedef struct {
	const char *dir;
	name_list names; /* safetensors files: on disk or named by the index, sorted, unique */
	st_file *files;
	int *present;    /* the file exists */
	dsv3_error *errs; /* per file, from st_open */
	char **index_tensors, **index_files;
	size_t n_index;
	int has_index;
} download_ckpt;

typedef struct {
	const char *tensor;
	const char *file;
} index_entry;

static int cmp_index_entry(const void *a, const void *b)
{
	return strcmp(((const index_entry *)a)->tensor, ((const index_entry *)b)->tensor);
}

static long find_name(const name_list *l, const char *name)
{
	char **hit = bsearch(&name, l->v, l->n, sizeof *l->v, cmp_str_ptr);
	return hit ? hit - l->v : -1;
}

/* The files to open: every *.safetensors in DIR and every file the index names. */
static int collect_file_names(download_ckpt *c, dsv3_error *err)
{
	char **glob;
	size_t n;
	int rc = dir_glob(c->dir, "*.safetensors", &glob, &n, err);
	if (rc)
		return rc;
	for (size_t i = 0; i < n; i++) {
		if (!rc && name_list_add(&c->names, glob[i]))
			rc = dsv3_fail(err, DSV3_EIO, "out of memory");
		free(glob[i]);
	}
	free(glob);
	for (size_t i = 0; !rc && i < c->n_index; i++)
		if (name_list_add(&c->names, c->index_files[i]))
			rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	if (rc)
		return rc;
	qsort(c->names.v, c->names.n, sizeof *c->names.v, cmp_str_ptr);
	size_t k = 0;
	for (size_t i = 0; i < c->names.n; i++) {
		if (k && !strcmp(c->names.v[k - 1], c->names.v[i]))
			free(c->names.v[i]);
		else
			c->names.v[k++] = c->names.v[i];
	}
	c->names.n = k;
	return 0;
}

static void open_one(void *arg, size_t i)
{
	download_ckpt *c = arg;
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", c->dir, c->names.v[i]);
	if (access(path, F_OK) != 0 && errno == ENOENT)
		return;
	c->present[i] = 1;
	if (st_open(&c->files[i], path, &c->errs[i]) == 0)
		c->errs[i].code = DSV3_OK;
	else if (!c->errs[i].code)
		c->errs[i].code = DSV3_EDATA;
}

/* Headers are parsed in parallel: 163 of them with ~10k tensors is a second's work. */
static int open_files(download_ckpt *c, thread_pool *pool, dsv3_error *err)
{
	size_t n = c->names.n + 1;
	c->files = calloc(n, sizeof *c->files);
	c->present = calloc(n, sizeof *c->present);
	c->errs = calloc(n, sizeof *c->errs);
	if (!c->files || !c->present || !c->errs)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	thread_pool_for(pool, c->names.n, open_one, c);
	return 0;
}

static int opened(const download_ckpt *c, size_t i)
{
	return c->present[i] && c->errs[i].code == DSV3_OK;
}

/* Per file: missing (naming how many tensors the index puts there), or its header's fault. */
static void check_files(const download_ckpt *c, problem_list *problems)
{
	for (size_t i = 0; i < c->names.n; i++) {
		if (c->present[i] && c->errs[i].code != DSV3_OK) {
			problem_add_error(problems, &c->errs[i]);
			continue;
		}
		if (c->present[i])
			continue;
		size_t count = 0;
		const char *first = NULL;
		for (size_t k = 0; k < c->n_index; k++)
			if (!strcmp(c->index_files[k], c->names.v[i]) && !count++)
				first = c->index_tensors[k];
		problem_add(problems, "%s/%s: missing (" INDEX_NAME " puts %zu tensor(s) in it, "
			    "e.g. %s)", c->dir, c->names.v[i], count, first ? first : "?");
	}
}

/* Every tensor of the index in the file it names. */
static void check_index_tensors(const download_ckpt *c, problem_list *problems)
{
	for (size_t k = 0; k < c->n_index; k++) {
		long i = find_name(&c->names, c->index_files[k]);
		if (i < 0 || !opened(c, (size_t)i))
			continue; /* reported with the file */
		if (!st_find(&c->files[i], c->index_tensors[k]))
			problem_add(problems, "%s/%s: tensor %s: not in this file, where "
				    INDEX_NAME " puts it", c->dir, c->index_files[k],
				    c->index_tensors[k]);
	}
}

static void check_file_tensors(const download_ckpt *c, size_t i, const index_entry *sorted,
			       problem_list *problems)
{
	const st_file *f = &c->files[i];
	const char *name = c->names.v[i];
	for (size_t t = 0; t < f->n_tensors; t++) {
		index_entry key = { f->tensors[t].name, NULL };
		const index_entry *e = bsearch(&key, sorted, c->n_index, sizeof *sorted,
					       cmp_index_entry);
		if (!e)
			problem_add(problems, "%s/%s: tensor %s: not in " INDEX_NAME, c->dir, name,
				    key.tensor);
		else if (strcmp(e->file, name))
			problem_add(problems, "%s/%s: tensor %s: " INDEX_NAME " puts it in %s",
				    c->dir, name, key.tensor, e->file);
	}
}

/* No tensor outside the index's file for it; a file the index never names is one problem. */
static int check_stray_tensors(const download_ckpt *c, problem_list *problems, dsv3_error *err)
{
	index_entry *sorted = malloc((c->n_index + 1) * sizeof *sorted);
	if (!sorted)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	for (size_t k = 0; k < c->n_index; k++)
		sorted[k] = (index_entry){ c->index_tensors[k], c->index_files[k] };
	qsort(sorted, c->n_index, sizeof *sorted, cmp_index_entry);
	for (size_t i = 0; i < c->names.n; i++) {
		if (!opened(c, i))
			continue;
		size_t k = 0;
		while (k < c->n_index && strcmp(c->index_files[k], c->names.v[i]))
			k++;
		if (k == c->n_index)
			problem_add(problems, "%s/%s: not named by " INDEX_NAME " (%zu tensors)",
				    c->dir, c->names.v[i], c->files[i].n_tensors);
		else
			check_file_tensors(c, i, sorted, problems);
	}
	free(sorted);
	return 0;
}

/* Without an index only a single-file model (model.safetensors) is whole. */
static void check_no_index(const download_ckpt *c, problem_list *problems)
{
	if (c->names.n == 0)
		problem_add(problems, "%s: no " INDEX_NAME " and no *.safetensors file", c->dir);
	else if (c->names.n > 1)
		problem_add(problems, "%s/" INDEX_NAME ": missing (%zu safetensors files)", c->dir,
			    c->names.n);
}

static void download_ckpt_close(download_ckpt *c)
{
	for (size_t i = 0; c->files && i < c->names.n; i++)
		if (opened(c, i))
			st_close(&c->files[i]);
	free(c->files);
	free(c->present);
	free(c->errs);
	name_list_free(&c->names);
	index_free(c->index_tensors, c->index_files, c->n_index);
}

static size_t count_tensors(const download_ckpt *c)
{
	size_t n = 0;
	for (size_t i = 0; i < c->names.n; i++)
		n += opened(c, i) ? c->files[i].n_tensors : 0;
	return n;
}

/* Returns non-zero only for a failure that stops the check (out of memory, DIR unreadable);
 * what is wrong with the download goes into `problems`. */
static int check_structure(const char *dir, thread_pool *pool, problem_list *problems,
			   size_t *n_files, size_t *n_tensors, dsv3_error *err)
{
	download_ckpt c = { .dir = dir };
	char path[4096];
	snprintf(path, sizeof path, "%s/" INDEX_NAME, dir);
	c.has_index = access(path, F_OK) == 0;
	int rc = 0;
	if (c.has_index) {
		dsv3_error ierr = { 0 };
		if (index_load(path, &c.index_tensors, &c.index_files, &c.n_index, &ierr))
			problem_add_error(problems, &ierr);
	}
	if (!rc)
		rc = collect_file_names(&c, err);
	if (!rc)
		rc = open_files(&c, pool, err);
	if (!rc) {
		if (!c.has_index)
			check_no_index(&c, problems);
		check_files(&c, problems);
		check_index_tensors(&c, problems);
		if (c.has_index && c.index_files)
			rc = check_stray_tensors(&c, problems, err);
		*n_files = c.names.n;
		*n_tensors = count_tensors(&c);
	}
	download_ckpt_close(&c);
	return rc;
}

/* ---- hashes ---- */

typedef struct {
	const char *dir;
	const file_list *list;
	const size_t *order;      /* job k hashes list->files[order[k]]: largest first */
	problem_list *results;    /* per listed file: the threads never share one */
	progress bar;
	pthread_mutex_t bar_lock; /* progress_add is not thread-safe */
} hash_jobs;

static const char *hash_name(const listed_file *f)
{
	return f->kind == HASH_SHA256 ? "SHA-256" : "git blob id (SHA-1)";
}

/* Streams the file through the digest; git's blob id hashes "blob SIZE\0" first. */
static int digest_file(hash_jobs *j, int fd, const listed_file *f, int64_t size, uint8_t *out)
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	uint8_t *buf = malloc(READ_CHUNK);
	const EVP_MD *md = f->kind == HASH_SHA256 ? EVP_sha256() : EVP_sha1();
	int failed = !ctx || !buf || !EVP_DigestInit_ex(ctx, md, NULL);
	if (!failed && f->kind == HASH_GIT_BLOB_SHA1) {
		char prefix[32];
		int n = snprintf(prefix, sizeof prefix, "blob %lld", (long long)size);
		EVP_DigestUpdate(ctx, prefix, (size_t)n + 1);
	}
	while (!failed) {
		ssize_t n = read(fd, buf, READ_CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			failed = n < 0;
			break;
		}
		EVP_DigestUpdate(ctx, buf, (size_t)n);
		pthread_mutex_lock(&j->bar_lock);
		progress_add(&j->bar, (uint64_t)n);
		pthread_mutex_unlock(&j->bar_lock);
	}
	if (!failed)
		failed = !EVP_DigestFinal_ex(ctx, out, NULL);
	EVP_MD_CTX_free(ctx);
	free(buf);
	return failed ? -1 : 0;
}

static void hash_one(void *arg, size_t k)
{
	hash_jobs *j = arg;
	size_t i = j->order[k];
	const listed_file *f = &j->list->files[i];
	problem_list *r = &j->results[i];
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", j->dir, f->path);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		problem_add(r, "%s: cannot open: %s", path, strerror(errno)), r->io = 1;
		if (fd >= 0)
			close(fd);
		return;
	}
	posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	uint8_t got[EVP_MAX_MD_SIZE];
	if (digest_file(j, fd, f, (int64_t)st.st_size, got) != 0)
		problem_add(r, "%s: cannot read: %s", path, strerror(errno)), r->io = 1;
	else if (memcmp(got, f->digest, f->kind == HASH_SHA256 ? 32 : 20) != 0)
		problem_add(r, "%s: %s differs from %s (%s %zu)", path, hash_name(f),
			    j->list->source, j->list->is_tree ? "entry" : "line", f->where);
	close(fd);
}

typedef struct {
	size_t index;
	int64_t size;
} sized_job;

static int cmp_larger_first(const void *a, const void *b)
{
	const sized_job *x = a, *y = b;
	if (x->size != y->size)
		return x->size > y->size ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

/* Listed files missing or of the wrong size are problems found without reading; the rest become
 * hash jobs, largest first. Returns the number of jobs, their byte total in *bytes. */
static size_t plan_hashes(const char *dir, const file_list *l, sized_job *jobs, uint64_t *bytes,
			  problem_list *results)
{
	size_t n = 0;
	*bytes = 0;
	char path[4096];
	for (size_t i = 0; i < l->n; i++) {
		const listed_file *f = &l->files[i];
		struct stat st;
		snprintf(path, sizeof path, "%s/%s", dir, f->path);
		if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
			problem_add(&results[i], "%s: missing (listed in %s, %s %zu)", path,
				    l->source, l->is_tree ? "entry" : "line", f->where);
		} else if (f->size >= 0 && st.st_size != f->size) {
			problem_add(&results[i], "%s: %lld bytes, %s says %lld", path,
				    (long long)st.st_size, l->source, (long long)f->size);
		} else {
			jobs[n++] = (sized_job){ i, (int64_t)st.st_size };
			*bytes += (uint64_t)st.st_size;
		}
	}
	qsort(jobs, n, sizeof *jobs, cmp_larger_first);
	return n;
}

static int check_hashes(const char *dir, const file_list *l, thread_pool *pool,
			problem_list *problems, dsv3_error *err)
{
	problem_list *results = calloc(l->n + 1, sizeof *results);
	sized_job *jobs = malloc((l->n + 1) * sizeof *jobs);
	size_t *order = malloc((l->n + 1) * sizeof *order);
	int rc = 0;
	if (!results || !jobs || !order) {
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	} else {
		uint64_t bytes;
		size_t n = plan_hashes(dir, l, jobs, &bytes, results);
		for (size_t k = 0; k < n; k++)
			order[k] = jobs[k].index;
		hash_jobs j = { .dir = dir, .list = l, .order = order, .results = results };
		pthread_mutex_init(&j.bar_lock, NULL);
		progress_start(&j.bar, "hashing", bytes);
		thread_pool_for(pool, n, hash_one, &j);
		progress_end(&j.bar);
		pthread_mutex_destroy(&j.bar_lock);
		for (size_t i = 0; i < l->n; i++) /* in the list's order: deterministic output */
			problem_list_take(problems, &results[i]);
	}
	free(results);
	free(jobs);
	free(order);
	return rc;
}

/* Local files the list does not cover would go unchecked: one line each. */
static int check_unlisted(const char *dir, const file_list *l, problem_list *problems,
			  dsv3_error *err)
{
	local_walk w = { 0 };
	struct stat st;
	if (stat(l->source, &st) == 0)
		w.skip = 1, w.skip_dev = st.st_dev, w.skip_ino = st.st_ino;
	int rc = walk(&w, dir, "", 0, err);
	if (!rc)
		qsort(w.files.v, w.files.n, sizeof *w.files.v, cmp_str_ptr);
	for (size_t i = 0; !rc && i < w.files.n; i++) {
		listed_file key = { .path = w.files.v[i] };
		if (!bsearch(&key, l->files, l->n, sizeof *l->files, cmp_listed_path))
			problem_add(problems, "%s/%s: not listed in %s", dir, w.files.v[i],
				    l->source);
	}
	name_list_free(&w.files);
	return rc;
}

/* ---- the subcommand ---- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " VERIFY_PROG " download [--hf-tree FILE | --sha256sums FILE] [--threads T] DIR\n"
		"\n"
		"Checks a Hugging Face download before anything reads it: every file that\n"
		"DIR/" INDEX_NAME " names is present, every safetensors header is valid and\n"
		"its data fills the file exactly, every tensor of the index is in the file the index\n"
		"names and no tensor is anywhere else. With a list, every file is hashed against it,\n"
		"listed files missing from DIR and files of DIR missing from the list are problems.\n"
		"\n"
		"  --hf-tree FILE     the JSON array the model tree API returns, e.g. saved from\n"
		"                     https://huggingface.co/api/models/REPO/tree/main?recursive=true\n"
		"                     (LFS files by lfs.oid = SHA-256 and lfs.size, the others by\n"
		"                     their git blob id)\n"
		"  --sha256sums FILE  a list in sha256sum's format (\"SHA256  NAME\" per line)\n"
		"  -t, --threads T    hashing threads (default: all cores)\n"
		"  -h, --help         this help\n"
		"\n"
		"Prints \"OK: ...\" or one line per problem naming the file (and tensor). Exit: 0 all\n"
		"is well, 2 a problem was found or the list itself is malformed (its file and line\n"
		"named), 3 an I/O error, 1 a usage error.\n");
}

typedef struct {
	const char *dir;
	const char *tree, *sums;
	int threads;
} download_args;

static int usage_error(const char *msg)
{
	fprintf(stderr, VERIFY_PROG " download: %s\n", msg);
	usage(stderr);
	return DSV3_EUSAGE;
}

static int parse_args(int argc, char **argv, download_args *a, int *done)
{
	static const struct option longopts[] = {
		{ "hf-tree", required_argument, NULL, 'T' },
		{ "sha256sums", required_argument, NULL, 'S' },
		{ "threads", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	*done = 0;
	while ((c = getopt_long(argc, argv, "t:h", longopts, NULL)) != -1) {
		dsv3_error err = { 0 };
		if (c == 'h') {
			usage(stdout);
			*done = 1;
			return 0;
		} else if (c == 'T') {
			a->tree = optarg;
		} else if (c == 'S') {
			a->sums = optarg;
		} else if (c != 't') {
			usage(stderr);
			return DSV3_EUSAGE;
		} else if (cli_parse_int(optarg, "--threads", 1, 4096, &a->threads, &err)) {
			dsv3_report(VERIFY_PROG " download", &err);
			usage(stderr);
			return DSV3_EUSAGE;
		}
	}
	if (a->tree && a->sums)
		return usage_error("--hf-tree and --sha256sums exclude each other");
	if (argc - optind != 1)
		return usage_error("expected one directory");
	a->dir = argv[optind];
	return 0;
}

static int load_list(const download_args *a, file_list *l, dsv3_error *err)
{
	if (a->tree) {
		l->source = a->tree;
		l->is_tree = 1;
		return read_tree(l, err);
	}
	l->source = a->sums;
	return read_sums(l, err);
}

static void print_ok(const download_args *a, const file_list *l, size_t n_files,
		     size_t n_tensors)
{
	printf("OK: %s: %zu safetensors files, %zu tensors", a->dir, n_files, n_tensors);
	if (l->source)
		printf(", %zu files hashed against %s", l->n, l->source);
	printf("\n");
}

static int run_checks(const download_args *a, const file_list *l, thread_pool *pool,
		      problem_list *problems, size_t *n_files, size_t *n_tensors, dsv3_error *err)
{
	int rc = check_structure(a->dir, pool, problems, n_files, n_tensors, err);
	if (!rc && l->source)
		rc = check_unlisted(a->dir, l, problems, err);
	if (!rc && l->source)
		rc = check_hashes(a->dir, l, pool, problems, err);
	return rc;
}

static int check_dir(const char *dir, dsv3_error *err)
{
	struct stat st;
	if (stat(dir, &st) != 0)
		return dsv3_fail_errno(err, "cannot open %s", dir);
	if (!S_ISDIR(st.st_mode))
		return dsv3_fail(err, DSV3_EIO, "%s: not a directory", dir);
	return 0;
}

int verify_download(int argc, char **argv)
{
	download_args a = { 0 };
	int done, rc = parse_args(argc, argv, &a, &done);
	if (rc || done)
		return rc;
	dsv3_error err = { 0 };
	if (check_dir(a.dir, &err))
		return dsv3_report(VERIFY_PROG, &err);
	file_list l = { 0 };
	/* A malformed list is refused before anything is read: it must never pass. */
	if ((a.tree || a.sums) && (rc = load_list(&a, &l, &err))) {
		file_list_free(&l);
		return dsv3_report(VERIFY_PROG, &err);
	}
	thread_pool *pool = thread_pool_create(a.threads);
	if (!pool) {
		file_list_free(&l);
		dsv3_fail(&err, DSV3_EIO, "cannot start threads");
		return dsv3_report(VERIFY_PROG, &err);
	}
	problem_list problems = { 0 };
	size_t n_files = 0, n_tensors = 0;
	if (run_checks(&a, &l, pool, &problems, &n_files, &n_tensors, &err))
		problem_add_error(&problems, &err);
	rc = problem_list_report(&problems, NULL);
	if (rc == DSV3_OK)
		print_ok(&a, &l, n_files, n_tensors);
	else
		fprintf(stderr, VERIFY_PROG " download: %zu problem(s) in %s\n", problems.n, a.dir);
	problem_list_free(&problems);
	thread_pool_destroy(pool);
	file_list_free(&l);
	return rc;
}
