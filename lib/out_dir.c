/* Atomic output directory (DESIGN §8): files are written as DIR/.dsv3-tmp.NAME.PID and renamed
 * to DIR/NAME only by out_dir_commit, after every one of them is on disk. A file finished before
 * the end may move to a hidden name of its own (out_dir_finish) that a killed run leaves for
 * --resume; it too reaches its final name only at the commit. */
#include "out_dir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define COPY_CHUNK (8u << 20)

static char *path_join(const char *dir, const char *name)
{
	size_t a = strlen(dir), b = strlen(name);
	char *s = malloc(a + b + 2);
	if (!s)
		return NULL;
	memcpy(s, dir, a);
	s[a] = '/';
	memcpy(s + a + 1, name, b + 1);
	return s;
}

/* mkdir -p: creates each missing component; an existing directory is fine. */
static int make_dirs(const char *dir, dsv3_error *err)
{
	char *p = strdup(dir);
	if (!p)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	for (char *s = p + 1;; s++) {
		if (*s != '/' && *s != '\0')
			continue;
		char c = *s;
		*s = '\0';
		if (mkdir(p, 0777) != 0 && errno != EEXIST) {
			int rc = dsv3_fail_errno(err, "cannot create directory %s", p);
			free(p);
			return rc;
		}
		*s = c;
		if (c == '\0')
			break;
	}
	free(p);
	struct stat st;
	if (stat(dir, &st) != 0)
		return dsv3_fail_errno(err, "%s", dir);
	if (!S_ISDIR(st.st_mode))
		return dsv3_fail(err, DSV3_EIO, "%s exists and is not a directory", dir);
	return 0;
}

/* Temporaries whose run was killed cannot be finished by anyone: remove them. */
static int remove_stale_temps(const char *dir, dsv3_error *err)
{
	DIR *d = opendir(dir);
	if (!d)
		return dsv3_fail_errno(err, "cannot open directory %s", dir);
	struct dirent *e;
	size_t plen = strlen(OUT_DIR_TMP_PREFIX);
	while ((e = readdir(d))) {
		if (strncmp(e->d_name, OUT_DIR_TMP_PREFIX, plen) != 0)
			continue;
		if (unlinkat(dirfd(d), e->d_name, 0) != 0 && errno != ENOENT) {
			int rc = dsv3_fail_errno(err, "cannot remove stale temporary %s/%s", dir,
						 e->d_name);
			closedir(d);
			return rc;
		}
	}
	closedir(d);
	return 0;
}

int out_dir_open(out_dir *o, const char *dir, dsv3_error *err)
{
	memset(o, 0, sizeof *o);
	if (!dir || !*dir)
		return dsv3_fail(err, DSV3_EUSAGE, "empty output directory name");
	int rc = make_dirs(dir, err);
	if (!rc)
		rc = remove_stale_temps(dir, err);
	if (rc)
		return rc;
	o->dir = strdup(dir);
	if (!o->dir)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	return 0;
}

static int grow(out_dir *o)
{
	if (o->n < o->cap)
		return 0;
	size_t cap = o->cap ? 2 * o->cap : 16;
	char **f = realloc(o->final_paths, cap * sizeof *f);
	if (!f)
		return -1;
	o->final_paths = f;
	char **t = realloc(o->tmp_paths, cap * sizeof *t);
	if (!t)
		return -1;
	o->tmp_paths = t;
	unsigned char *k = realloc(o->finished, cap);
	if (!k)
		return -1;
	o->finished = k;
	o->cap = cap;
	return 0;
}

static long index_of(const out_dir *o, const char *final_path)
{
	for (size_t i = 0; i < o->n; i++)
		if (strcmp(o->final_paths[i], final_path) == 0)
			return (long)i;
	return -1;
}

const char *out_dir_add(out_dir *o, const char *name, dsv3_error *err)
{
	if (!*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, "..")) {
		dsv3_fail(err, DSV3_EUSAGE, "%s: output file name \"%s\" is not a base name", o->dir,
			  name);
		return NULL;
	}
	char *final_path = path_join(o->dir, name);
	char tmp_name[4096];
	snprintf(tmp_name, sizeof tmp_name, "%s%s.%ld", OUT_DIR_TMP_PREFIX, name, (long)getpid());
	char *tmp_path = path_join(o->dir, tmp_name);
	if (!final_path || !tmp_path || grow(o)) {
		free(final_path);
		free(tmp_path);
		dsv3_fail(err, DSV3_EIO, "%s/%s: out of memory", o->dir, name);
		return NULL;
	}
	if (index_of(o, final_path) >= 0) {
		dsv3_fail(err, DSV3_EUSAGE, "%s: output file written twice", final_path);
		free(final_path);
		free(tmp_path);
		return NULL;
	}
	o->final_paths[o->n] = final_path;
	o->tmp_paths[o->n] = tmp_path;
	o->finished[o->n] = 0;
	o->n++;
	return tmp_path;
}

static long find_name(const out_dir *o, const char *name)
{
	char *final_path = path_join(o->dir, name);
	long i = final_path ? index_of(o, final_path) : -1;
	free(final_path);
	return i;
}

/* Stands `path` in for name's temporary (registered at index i), as a finished file. */
static int set_finished(out_dir *o, size_t i, const char *path, dsv3_error *err)
{
	char *p = strdup(path);
	if (!p)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	free(o->tmp_paths[i]);
	o->tmp_paths[i] = p;
	o->finished[i] = 1;
	return 0;
}

int out_dir_add_finished(out_dir *o, const char *name, const char *path, dsv3_error *err)
{
	if (!out_dir_add(o, name, err))
		return err->code ? err->code : DSV3_EIO;
	return set_finished(o, o->n - 1, path, err);
}

static int fsync_path(const char *path, int flags, dsv3_error *err)
{
	int fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		return dsv3_fail_errno(err, "cannot open %s", path);
	if (fsync(fd) != 0) {
		int rc = dsv3_fail_errno(err, "cannot sync %s", path);
		close(fd);
		return rc;
	}
	close(fd);
	return 0;
}

int out_dir_finish(out_dir *o, const char *name, const char *path, dsv3_error *err)
{
	long i = find_name(o, name);
	if (i < 0)
		return dsv3_fail(err, DSV3_EIO, "%s/%s: finished but never registered", o->dir, name);
	int rc = fsync_path(o->tmp_paths[i], O_RDONLY, err);
	if (rc)
		return rc;
	if (rename(o->tmp_paths[i], path) != 0)
		return dsv3_fail_errno(err, "cannot rename %s to %s", o->tmp_paths[i], path);
	return set_finished(o, (size_t)i, path, err);
}

static int write_all(int fd, const void *data, size_t len)
{
	const char *p = data;
	while (len) {
		ssize_t w = write(fd, p, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

int out_dir_write_file(out_dir *o, const char *name, const void *data, size_t len, dsv3_error *err)
{
	const char *tmp = out_dir_add(o, name, err);
	if (!tmp)
		return err ? err->code : DSV3_EUSAGE;
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (fd < 0)
		return dsv3_fail_errno(err, "cannot create %s", tmp);
	if (write_all(fd, data, len) != 0) {
		int rc = dsv3_fail_errno(err, "cannot write %s", tmp);
		close(fd);
		return rc;
	}
	if (close(fd) != 0)
		return dsv3_fail_errno(err, "cannot write %s", tmp);
	return 0;
}

/* Copies with copy_file_range (in-kernel, reflinks where supported), falling back to
 * read/write where the kernel or file system refuses it. */
static int copy_fd(int in, int out, const char *src, const char *dst, dsv3_error *err)
{
	for (;;) {
		ssize_t n = copy_file_range(in, NULL, out, NULL, COPY_CHUNK, 0);
		if (n == 0)
			return 0;
		if (n > 0)
			continue;
		if (errno == EINTR)
			continue;
		if (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP)
			break;
		return dsv3_fail_errno(err, "cannot copy %s to %s", src, dst);
	}
	char *buf = malloc(COPY_CHUNK);
	if (!buf)
		return dsv3_fail(err, DSV3_EIO, "cannot copy %s: out of memory", src);
	int rc = 0;
	for (;;) {
		ssize_t n = read(in, buf, COPY_CHUNK);
		if (n == 0)
			break;
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = dsv3_fail_errno(err, "cannot read %s", src);
			break;
		}
		if (write_all(out, buf, (size_t)n) != 0) {
			rc = dsv3_fail_errno(err, "cannot write %s", dst);
			break;
		}
	}
	free(buf);
	return rc;
}

int out_dir_copy_file(out_dir *o, const char *src_path, const char *name, dsv3_error *err)
{
	int in = open(src_path, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		return dsv3_fail_errno(err, "cannot open %s", src_path);
	const char *tmp = out_dir_add(o, name, err);
	if (!tmp) {
		close(in);
		return err ? err->code : DSV3_EUSAGE;
	}
	int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (out < 0) {
		int rc = dsv3_fail_errno(err, "cannot create %s", tmp);
		close(in);
		return rc;
	}
	int rc = copy_fd(in, out, src_path, tmp, err);
	if (!rc && fsync(out) != 0)
		rc = dsv3_fail_errno(err, "cannot sync %s", tmp);
	if (close(out) != 0 && !rc)
		rc = dsv3_fail_errno(err, "cannot write %s", tmp);
	close(in);
	return rc;
}


int out_dir_commit(out_dir *o, dsv3_error *err)
{
	/* Everything must be durable before the first rename, so a crash never shows a final
	 * name over incomplete data. */
	for (size_t i = 0; i < o->n; i++) {
		if (!o->tmp_paths[i])
			continue;
		int rc = fsync_path(o->tmp_paths[i], O_RDONLY, err);
		if (rc)
			return rc;
	}
	for (size_t i = 0; i < o->n; i++) {
		if (!o->tmp_paths[i])
			continue;
		if (rename(o->tmp_paths[i], o->final_paths[i]) != 0)
			return dsv3_fail_errno(err, "cannot rename %s to %s", o->tmp_paths[i],
					       o->final_paths[i]);
		free(o->tmp_paths[i]);
		o->tmp_paths[i] = NULL; /* committed: out_dir_close leaves it alone */
	}
	return fsync_path(o->dir, O_RDONLY | O_DIRECTORY, err);
}

void out_dir_close(out_dir *o)
{
	for (size_t i = 0; i < o->n; i++) {
		if (o->tmp_paths[i] && !o->finished[i])
			unlink(o->tmp_paths[i]);
		free(o->tmp_paths[i]);
		free(o->final_paths[i]);
	}
	free(o->tmp_paths);
	free(o->final_paths);
	free(o->finished);
	free(o->dir);
	memset(o, 0, sizeof *o);
}

int out_dir_refuse_input(const char *dir, const char *input, dsv3_error *err)
{
	struct stat a, b;
	if (stat(dir, &a) != 0 || stat(input, &b) != 0)
		return 0; /* an output that does not exist yet cannot be the input */
	if (a.st_dev == b.st_dev && a.st_ino == b.st_ino)
		return dsv3_fail(err, DSV3_EUSAGE,
				 "output directory %s is the input directory %s: choose another",
				 dir, input);
	return 0;
}
