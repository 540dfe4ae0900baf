/* The --resume journal (resume.h). One text file in the output directory, appended to and
 * fsynced as each large file is finished:
 *
 *   dsv3-resume 1 KEYHEX
 *   tensor SHAHEX DTYPE NDIM D0 .. Dn-1 NAME     (the tensors of the file that follows)
 *   file SHAHEX SIZE NAME
 *
 * A line cut short by a kill has no newline and is ignored, as are tensor lines with no file
 * line after them. A file is finished (renamed to its hidden name) before its record is written,
 * so a record always names complete bytes; a finished file without a record is redone. */
#include "resume.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hf_ckpt.h"
#include "sha256.h"
#include "threadpool.h"
#include "version.h"

#define JOURNAL_MAGIC "dsv3-resume 1 "

/* ---- the key ---- */

static void key_add(sha256_ctx *sha, const char *text)
{
	sha256_update(sha, text, strlen(text) + 1); /* the NUL keeps "ab","c" from "a","bc" */
}

static void free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* Every regular, not hidden, file directly in dir, in name order: name, size, mtime. */
static int key_add_dir(sha256_ctx *sha, const char *dir, dsv3_error *err)
{
	char **names = NULL;
	size_t n = 0;
	int rc = dir_glob(dir, "*", &names, &n, err);
	for (size_t i = 0; !rc && i < n; i++) {
		char path[4096], text[128];
		struct stat st;
		snprintf(path, sizeof path, "%s/%s", dir, names[i]);
		if (stat(path, &st) != 0) {
			rc = dsv3_fail_errno(err, "cannot stat %s", path);
			break;
		}
		if (!S_ISREG(st.st_mode))
			continue;
		snprintf(text, sizeof text, "%" PRIu64 " %lld.%09ld", (uint64_t)st.st_size,
			 (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
		key_add(sha, names[i]);
		key_add(sha, text);
	}
	free_names(names, n);
	return rc;
}

int resume_key(const char *tool, const char *const *opts, size_t n, const char *in_dir,
	       uint8_t key[32], dsv3_error *err)
{
	sha256_ctx *sha = sha256_new();
	if (!sha)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	key_add(sha, tool);
	key_add(sha, DSV3_VERSION);
	for (size_t i = 0; i < n; i++)
		key_add(sha, opts[i]);
	int rc = key_add_dir(sha, in_dir, err);
	sha256_final(sha, key);
	sha256_free(sha);
	return rc;
}

/* ---- reading a journal ---- */

static int parse_hex32(const char *s, uint8_t out[32])
{
	for (int i = 0; i < 32; i++) {
		unsigned v;
		if (sscanf(s + 2 * i, "%2x", &v) != 1)
			return -1;
		out[i] = (uint8_t)v;
	}
	return s[64] == ' ' || s[64] == '\n' || s[64] == '\0' ? 0 : -1;
}

static void free_file(resume_file *f)
{
	free(f->name);
	free(f->path);
	for (size_t i = 0; i < f->n_tensors; i++)
		free(f->tensors[i].name);
	free(f->tensors);
	memset(f, 0, sizeof *f);
}

typedef struct {
	resume_file *files;
	size_t n, cap;
	manifest_tensor *pending; /* tensor lines waiting for their file line */
	size_t n_pending, cap_pending;
} journal;

static void journal_free(journal *j)
{
	for (size_t i = 0; i < j->n; i++)
		free_file(&j->files[i]);
	free(j->files);
	for (size_t i = 0; i < j->n_pending; i++)
		free(j->pending[i].name);
	free(j->pending);
}

/* "tensor SHA DTYPE NDIM D0 .. NAME"; -1 on a malformed line (which ends the journal). */
static int parse_tensor(journal *j, char *line)
{
	manifest_tensor t = { 0 };
	char dtype[32];
	int used = 0;
	if (parse_hex32(line, t.sha256) || sscanf(line + 65, "%31s %d%n", dtype, &t.ndim, &used) != 2 ||
	    dtype_from_name(dtype, &t.dtype) || t.ndim < 0 || t.ndim > 8)
		return -1;
	char *p = line + 65 + used;
	for (int d = 0; d < t.ndim; d++) {
		int more = 0;
		if (sscanf(p, " %" SCNd64 "%n", &t.shape[d], &more) != 1)
			return -1;
		p += more;
	}
	if (*p++ != ' ' || !*p)
		return -1;
	if (j->n_pending == j->cap_pending) {
		size_t cap = j->cap_pending ? 2 * j->cap_pending : 64;
		manifest_tensor *grown = realloc(j->pending, cap * sizeof *grown);
		if (!grown)
			return -1;
		j->pending = grown;
		j->cap_pending = cap;
	}
	if (!(t.name = strdup(p)))
		return -1;
	j->pending[j->n_pending++] = t;
	return 0;
}

/* "file SHA SIZE NAME": takes the pending tensors. */
static int parse_file(journal *j, char *line)
{
	resume_file f = { 0 };
	int used = 0;
	if (parse_hex32(line, f.sha256) || sscanf(line + 65, "%" SCNu64 " %n", &f.size, &used) != 1 ||
	    !line[65 + used] || strchr(line + 65 + used, '/'))
		return -1;
	if (j->n == j->cap) {
		size_t cap = j->cap ? 2 * j->cap : 16;
		resume_file *grown = realloc(j->files, cap * sizeof *grown);
		if (!grown)
			return -1;
		j->files = grown;
		j->cap = cap;
	}
	if (!(f.name = strdup(line + 65 + used)))
		return -1;
	f.tensors = j->pending;
	f.n_tensors = j->n_pending;
	j->pending = NULL;
	j->n_pending = j->cap_pending = 0;
	/* A name finished twice: the later record stands. */
	for (size_t i = 0; i < j->n; i++)
		if (!strcmp(j->files[i].name, f.name)) {
			free_file(&j->files[i]);
			j->files[i] = f;
			return 0;
		}
	j->files[j->n++] = f;
	return 0;
}

static char *read_text(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	char *buf = NULL;
	size_t cap = 0;
	*len = 0;
	for (;;) {
		if (cap - *len < 65536) {
			cap = cap ? 2 * cap : 65536;
			char *grown = realloc(buf, cap + 1);
			if (!grown) {
				free(buf);
				fclose(f);
				return NULL;
			}
			buf = grown;
		}
		size_t got = fread(buf + *len, 1, cap - *len, f);
		*len += got;
		if (got == 0)
			break;
	}
	fclose(f);
	buf[*len] = '\0';
	return buf;
}

/* Reads the journal at path: *found 0 when there is none; its key into key. Complete lines
 * only; the first malformed line ends it. */
static int journal_read(journal *j, const char *path, int *found, uint8_t key[32], dsv3_error *err)
{
	memset(j, 0, sizeof *j);
	size_t len;
	char *text = read_text(path, &len);
	*found = text != NULL;
	if (!text)
		return errno == ENOENT ? 0 : dsv3_fail_errno(err, "cannot read %s", path);
	int rc = 0;
	char *line = text, *nl = strchr(line, '\n');
	if (!nl || strncmp(line, JOURNAL_MAGIC, strlen(JOURNAL_MAGIC)) != 0 ||
	    parse_hex32(line + strlen(JOURNAL_MAGIC), key) != 0)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: not a dsv3 resume journal; remove the output "
			       "directory's hidden .dsv3-* files or run without --resume", path);
	while (!rc && nl) {
		line = nl + 1;
		if (!(nl = strchr(line, '\n')))
			break; /* cut short by a kill */
		*nl = '\0';
		int bad = !strncmp(line, "tensor ", 7) ? parse_tensor(j, line + 7)
			  : !strncmp(line, "file ", 5) ? parse_file(j, line + 5)
						       : -1;
		if (bad)
			break;
	}
	free(text);
	return rc;
}

/* ---- verifying the finished files ---- */

static char *join(const char *dir, const char *prefix, const char *name)
{
	size_t len = strlen(dir) + strlen(prefix) + strlen(name) + 2;
	char *s = malloc(len);
	if (s)
		snprintf(s, len, "%s/%s%s", dir, prefix, name);
	return s;
}

/* Where the finished file lies: its hidden name, or its final name if a commit was cut short
 * after renaming it; NULL if neither exists with the recorded size. */
static char *locate(const char *dir, const resume_file *f)
{
	const char *prefixes[] = { RESUME_DONE_PREFIX, "" };
	for (int i = 0; i < 2; i++) {
		char *path = join(dir, prefixes[i], f->name);
		struct stat st;
		if (path && stat(path, &st) == 0 && S_ISREG(st.st_mode) &&
		    (uint64_t)st.st_size == f->size)
			return path;
		free(path);
	}
	return NULL;
}

typedef struct {
	const char *dir;
	resume_file *files;
} verify_job;

static void verify_one(void *arg, size_t i)
{
	verify_job *v = arg;
	resume_file *f = &v->files[i];
	f->path = locate(v->dir, f);
	uint8_t sha[32];
	dsv3_error err = { 0 };
	f->verified = f->path && sha256_file(f->path, sha, &err) == 0 &&
		      memcmp(sha, f->sha256, 32) == 0;
}

static int verify_files(resume_log *r, int threads, dsv3_error *err)
{
	if (!r->n_files)
		return 0;
	thread_pool *pool = thread_pool_create(threads);
	if (!pool)
		return dsv3_fail(err, DSV3_EIO, "cannot start threads");
	verify_job v = { r->o->dir, r->files };
	thread_pool_for(pool, r->n_files, verify_one, &v);
	thread_pool_destroy(pool);
	size_t keep = 0;
	for (size_t i = 0; i < r->n_files; i++) {
		resume_file *f = &r->files[i];
		if (f->verified) {
			r->files[keep++] = *f;
			continue;
		}
		/* Changed since it was finished: removed here and counted once (a file of the
		 * wrong size was not located; remove_unkept counts and removes that one). */
		if (f->path && strstr(f->path, "/" RESUME_DONE_PREFIX)) {
			unlink(f->path);
			r->stats.redone++;
		}
		free_file(f);
	}
	r->n_files = keep;
	return 0;
}

/* Removes every hidden finished file no verified record stands for; counts them in *removed. */
static int remove_unkept(resume_log *r, size_t *removed, dsv3_error *err)
{
	DIR *d = opendir(r->o->dir);
	if (!d)
		return dsv3_fail_errno(err, "cannot open directory %s", r->o->dir);
	size_t plen = strlen(RESUME_DONE_PREFIX);
	int rc = 0;
	struct dirent *e;
	while (!rc && (e = readdir(d))) {
		if (strncmp(e->d_name, RESUME_DONE_PREFIX, plen) != 0)
			continue;
		int kept = 0;
		for (size_t i = 0; i < r->n_files && !kept; i++)
			kept = !strcmp(r->files[i].name, e->d_name + plen);
		if (kept)
			continue;
		if (unlinkat(dirfd(d), e->d_name, 0) != 0 && errno != ENOENT)
			rc = dsv3_fail_errno(err, "cannot remove %s/%s", r->o->dir, e->d_name);
		else
			(*removed)++;
	}
	closedir(d);
	return rc;
}

/* ---- writing the journal ---- */

static int write_all(int fd, const char *p, size_t len)
{
	while (len) {
		ssize_t w = write(fd, p, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

/* The journal lines of one finished file (malloc'd). */
static char *record_text(const char *name, const uint8_t sha[32], uint64_t size,
			 const manifest_tensor *t, size_t n, size_t *len)
{
	size_t cap = 256 + strlen(name);
	for (size_t i = 0; i < n; i++)
		cap += 160 + strlen(t[i].name) + 21 * (size_t)t[i].ndim;
	char *s = malloc(cap), hex[65];
	if (!s)
		return NULL;
	size_t at = 0;
	for (size_t i = 0; i < n; i++) {
		sha256_hex(t[i].sha256, hex);
		at += (size_t)snprintf(s + at, cap - at, "tensor %s %s %d", hex, dtype_name(t[i].dtype),
				       t[i].ndim);
		for (int d = 0; d < t[i].ndim; d++)
			at += (size_t)snprintf(s + at, cap - at, " %" PRId64, t[i].shape[d]);
		at += (size_t)snprintf(s + at, cap - at, " %s\n", t[i].name);
	}
	sha256_hex(sha, hex);
	at += (size_t)snprintf(s + at, cap - at, "file %s %" PRIu64 " %s\n", hex, size, name);
	*len = at;
	return s;
}

static int append_durably(resume_log *r, const char *text, size_t len, dsv3_error *err)
{
	if (write_all(r->fd, text, len) != 0 || fdatasync(r->fd) != 0)
		return dsv3_fail_errno(err, "cannot write %s", r->journal_path);
	return 0;
}

/* A fresh journal holding the key and the kept records, put in place atomically. */
static int start_journal(resume_log *r, const uint8_t key[32], dsv3_error *err)
{
	char *tmp = join(r->o->dir, OUT_DIR_TMP_PREFIX, RESUME_JOURNAL + 1);
	if (!tmp)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	int rc = 0;
	r->fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0666);
	if (r->fd < 0)
		rc = dsv3_fail_errno(err, "cannot create %s", tmp);
	char hex[65], head[128];
	sha256_hex(key, hex);
	int len = snprintf(head, sizeof head, JOURNAL_MAGIC "%s\n", hex);
	if (!rc && write_all(r->fd, head, (size_t)len) != 0)
		rc = dsv3_fail_errno(err, "cannot write %s", tmp);
	for (size_t i = 0; !rc && i < r->n_files; i++) {
		const resume_file *f = &r->files[i];
		size_t n;
		char *text = record_text(f->name, f->sha256, f->size, f->tensors, f->n_tensors, &n);
		if (!text || write_all(r->fd, text, n) != 0)
			rc = text ? dsv3_fail_errno(err, "cannot write %s", tmp)
				  : dsv3_fail(err, DSV3_EIO, "out of memory");
		free(text);
	}
	if (!rc && fsync(r->fd) != 0)
		rc = dsv3_fail_errno(err, "cannot sync %s", tmp);
	if (!rc && rename(tmp, r->journal_path) != 0)
		rc = dsv3_fail_errno(err, "cannot rename %s to %s", tmp, r->journal_path);
	if (rc)
		unlink(tmp);
	free(tmp);
	return rc;
}

/* ---- the run ---- */

void resume_describe(const resume_stats *s, char *buf, size_t len)
{
	buf[0] = '\0';
	if (s->discarded)
		snprintf(buf, len, "removed %zu finished file%s of an interrupted run (--resume "
			 "keeps them)", s->discarded, s->discarded == 1 ? "" : "s");
	else if (s->kept || s->redone)
		snprintf(buf, len, "resumed: kept %zu finished file%s, redid %zu that did not match "
			 "the journal", s->kept, s->kept == 1 ? "" : "s", s->redone);
}

static int take_journal(resume_log *r, const uint8_t key[32], int resume, int threads,
			dsv3_error *err)
{
	if (!resume)
		return 0; /* the old journal is replaced, its finished files removed */
	journal j;
	uint8_t old_key[32];
	int found;
	int rc = journal_read(&j, r->journal_path, &found, old_key, err);
	if (!rc && found && memcmp(old_key, key, 32) != 0)
		rc = dsv3_fail(err, DSV3_EUSAGE,
			       "%s: holds an interrupted run of other inputs or options (the tool, "
			       "a flag or an input file's size or time differs); run without "
			       "--resume to start over",
			       r->o->dir);
	if (!rc) {
		r->files = j.files;
		r->n_files = j.n;
		j.files = NULL;
		j.n = 0;
		rc = verify_files(r, threads, err);
	}
	journal_free(&j);
	return rc;
}

int resume_open(resume_log *r, out_dir *o, const uint8_t key[32], int resume, int threads,
		dsv3_error *err)
{
	memset(r, 0, sizeof *r);
	r->o = o;
	r->fd = -1;
	pthread_mutex_init(&r->lock, NULL);
	const char *kill_after = getenv("DSV3_RESUME_KILL_AFTER");
	r->kill_after = kill_after ? strtol(kill_after, NULL, 10) : 0;
	r->journal_path = join(o->dir, "", RESUME_JOURNAL);
	if (!r->journal_path)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	int rc = take_journal(r, key, resume, threads, err);
	if (!rc)
		rc = start_journal(r, key, err);
	size_t removed = 0;
	if (!rc)
		rc = remove_unkept(r, &removed, err);
	if (resume)
		r->stats.redone += removed; /* finished, but killed before its record was written */
	else
		r->stats.discarded = removed;
	return rc;
}

int resume_take(resume_log *r, const char *name, const resume_file **f, dsv3_error *err)
{
	int rc = 0;
	*f = NULL;
	pthread_mutex_lock(&r->lock);
	for (size_t i = 0; i < r->n_files; i++) {
		resume_file *k = &r->files[i];
		if (k->taken || strcmp(k->name, name) != 0)
			continue;
		rc = out_dir_add_finished(r->o, name, k->path, err);
		if (!rc) {
			k->taken = 1;
			r->stats.kept++;
			*f = k;
		}
		break;
	}
	pthread_mutex_unlock(&r->lock);
	return rc;
}

int resume_finish(resume_log *r, const char *name, const uint8_t sha[32], const manifest_tensor *t,
		  size_t n, dsv3_error *err)
{
	char *path = join(r->o->dir, RESUME_DONE_PREFIX, name), *text = NULL;
	int rc = path ? 0 : dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", r->o->dir, name);
	pthread_mutex_lock(&r->lock);
	if (!rc)
		rc = out_dir_finish(r->o, name, path, err);
	struct stat st;
	if (!rc && stat(path, &st) != 0)
		rc = dsv3_fail_errno(err, "cannot stat %s", path);
	size_t len = 0;
	if (!rc && !(text = record_text(name, sha, (uint64_t)st.st_size, t, n, &len)))
		rc = dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", r->o->dir, name);
	if (!rc)
		rc = append_durably(r, text, len, err);
	if (!rc)
		r->n_finished++;
	if (!rc && r->kill_after > 0 && (long)r->n_finished >= r->kill_after)
		raise(SIGKILL);
	pthread_mutex_unlock(&r->lock);
	free(path);
	free(text);
	return rc;
}

int resume_complete(resume_log *r, dsv3_error *err)
{
	if (r->fd >= 0)
		close(r->fd);
	r->fd = -1;
	if (unlink(r->journal_path) != 0 && errno != ENOENT)
		return dsv3_fail_errno(err, "cannot remove %s", r->journal_path);
	return 0;
}

void resume_close(resume_log *r)
{
	if (!r->o)
		return; /* never opened */
	if (r->fd >= 0) {
		close(r->fd);
		if (!r->n_files && !r->n_finished)
			unlink(r->journal_path); /* a failed run that finished nothing: no trace */
	}
	for (size_t i = 0; i < r->n_files; i++)
		free_file(&r->files[i]);
	free(r->files);
	free(r->journal_path);
	pthread_mutex_destroy(&r->lock);
	memset(r, 0, sizeof *r);
	r->fd = -1;
}
