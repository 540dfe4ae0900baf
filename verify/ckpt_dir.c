/* A directory of safetensors files opened for checking: which layout it is, every file that
 * can be opened, and one sorted name table over all of them (a converted checkpoint holds
 * the same name once per rank). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "hf_ckpt.h"
#include "verify.h"

/* rank and N of "model{r}-mp{N}.safetensors"; -1 for any other name. */
static int parse_rank_name(const char *name, int *rank, int *mp)
{
	int len = 0;
	if (sscanf(name, "model%d-mp%d.safetensors%n", rank, mp, &len) != 2 ||
	    (size_t)len != strlen(name) || *rank < 0 || *mp < 1)
		return -1;
	char canon[64]; /* no leading zeros or signs: the exact name convert.py writes */
	snprintf(canon, sizeof canon, "model%d-mp%d.safetensors", *rank, *mp);
	return strcmp(canon, name) == 0 ? 0 : -1;
}

/* Converted when every file is named model{r}-mp{N}; files are then placed by rank. */
static int place_converted(ckpt_dir *d, char **names, size_t n, problem_list *problems)
{
	int mp = 0;
	for (size_t i = 0; i < n; i++) {
		int r, m;
		if (parse_rank_name(names[i], &r, &m))
			return 0;
		if (m > mp)
			mp = m;
	}
	if (!n || mp > 1 << 16)
		return 0;
	d->converted = 1;
	d->mp = mp;
	d->n_files = (size_t)mp;
	d->file_names = calloc((size_t)mp, sizeof *d->file_names);
	if (!d->file_names)
		return -1;
	for (size_t i = 0; i < n; i++) {
		int r, m;
		parse_rank_name(names[i], &r, &m);
		if (m != mp || r >= mp) {
			problem_add(problems, "%s/%s: does not belong to the %d-rank checkpoint %s",
				    d->dir, names[i], mp, d->dir);
			free(names[i]);
			continue;
		}
		d->file_names[r] = names[i];
	}
	for (int r = 0; r < mp; r++)
		if (!d->file_names[r])
			problem_add(problems, "%s/model%d-mp%d.safetensors: missing (rank %d of %d)",
				    d->dir, r, mp, r, mp);
	return 0;
}

static int open_files(ckpt_dir *d, problem_list *problems)
{
	d->files = calloc(d->n_files + 1, sizeof *d->files);
	d->opened = calloc(d->n_files + 1, sizeof *d->opened);
	if (!d->files || !d->opened)
		return -1;
	for (size_t i = 0; i < d->n_files; i++) {
		if (!d->file_names[i])
			continue;
		char path[4096];
		snprintf(path, sizeof path, "%s/%s", d->dir, d->file_names[i]);
		dsv3_error err = { 0 };
		if (st_open(&d->files[i], path, &err))
			problem_add_error(problems, &err);
		else
			d->opened[i] = 1;
	}
	return 0;
}

static int cmp_dir_tensor(const void *a, const void *b)
{
	const dir_tensor *x = a, *y = b;
	int c = strcmp(x->name, y->name);
	if (c)
		return c;
	return x->file < y->file ? -1 : x->file > y->file;
}

static int build_table(ckpt_dir *d)
{
	size_t n = 0;
	for (size_t i = 0; i < d->n_files; i++)
		if (d->opened[i])
			n += d->files[i].n_tensors;
	d->tensors = calloc(n + 1, sizeof *d->tensors);
	if (!d->tensors)
		return -1;
	for (size_t i = 0; i < d->n_files; i++) {
		for (size_t k = 0; d->opened[i] && k < d->files[i].n_tensors; k++) {
			const st_tensor *t = &d->files[i].tensors[k];
			d->tensors[d->n_tensors++] = (dir_tensor){ t->name, i, t };
		}
	}
	qsort(d->tensors, d->n_tensors, sizeof *d->tensors, cmp_dir_tensor);
	return 0;
}

int ckpt_dir_open(ckpt_dir *d, const char *dir, problem_list *problems, dsv3_error *err)
{
	memset(d, 0, sizeof *d);
	char **names;
	size_t n;
	int rc = dir_glob(dir, "*.safetensors", &names, &n, err);
	if (rc)
		return rc;
	d->dir = strdup(dir);
	if (!d->dir || place_converted(d, names, n, problems)) {
		rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	} else if (!d->converted) {
		d->file_names = names;
		d->n_files = n;
		names = NULL;
	}
	free(names); /* the converted layout took the strings */
	if (!rc && (open_files(d, problems) || build_table(d)))
		rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	if (!rc && !n)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: no *.safetensors files", dir);
	if (rc)
		ckpt_dir_close(d);
	return rc;
}

void ckpt_dir_close(ckpt_dir *d)
{
	for (size_t i = 0; i < d->n_files; i++) {
		if (d->opened && d->opened[i])
			st_close(&d->files[i]);
		if (d->file_names)
			free(d->file_names[i]);
	}
	free(d->file_names);
	free(d->files);
	free(d->opened);
	free(d->tensors);
	free(d->dir);
	memset(d, 0, sizeof *d);
}

const dir_tensor *ckpt_dir_find(const ckpt_dir *d, const char *name, size_t *count)
{
	size_t lo = 0, hi = d->n_tensors;
	while (lo < hi) { /* first entry >= name */
		size_t mid = lo + (hi - lo) / 2;
		if (strcmp(d->tensors[mid].name, name) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	size_t k = lo;
	while (k < d->n_tensors && strcmp(d->tensors[k].name, name) == 0)
		k++;
	*count = k - lo;
	return k > lo ? &d->tensors[lo] : NULL;
}

void ckpt_dir_file_path(const ckpt_dir *d, size_t file, char *buf, size_t len)
{
	snprintf(buf, len, "%s/%s", d->dir, d->file_names[file] ? d->file_names[file] : "?");
}

void drop_mapped_pages(const void *p, size_t len)
{
	if (!p || !len)
		return;
	/* Whole pages around the range: a neighbour's page dropped from a shared file mapping only
	 * costs it a minor fault. */
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	uintptr_t a = (uintptr_t)p & ~(page - 1);
	uintptr_t b = ((uintptr_t)p + len + page - 1) & ~(page - 1);
	madvise((void *)a, b - a, MADV_DONTNEED);
}
