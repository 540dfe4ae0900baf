/* A checkpoint directory: every *.safetensors mmapped, the index (when present) checked
 * against the files, and one name -> tensor table over all of them. */
#include "hf_ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define INDEX_NAME "model.safetensors.index.json"

struct hf_ckpt_entry {
	const char *name; /* points into the st_file */
	size_t file;
	const st_tensor *tensor;
};

static int cmp_str_ptr(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

static char *path_join(const char *dir, const char *name)
{
	size_t len = strlen(dir) + strlen(name) + 2;
	char *s = malloc(len);
	if (s)
		snprintf(s, len, "%s/%s", dir, name);
	return s;
}

int dir_glob(const char *dir, const char *pattern, char ***names, size_t *n, dsv3_error *err)
{
	*names = NULL;
	*n = 0;
	DIR *d = opendir(dir);
	if (!d)
		return dsv3_fail_errno(err, "cannot open directory %s", dir);
	char **list = NULL;
	size_t count = 0, cap = 0;
	int rc = 0;
	struct dirent *e;
	errno = 0;
	while (!rc && (e = readdir(d))) {
		/* Hidden names include our own temporaries (.dsv3-tmp.*). */
		if (e->d_name[0] == '.' || fnmatch(pattern, e->d_name, 0) != 0)
			continue;
		if (count == cap) {
			cap = cap ? 2 * cap : 64;
			char **l = realloc(list, cap * sizeof *l);
			if (!l) {
				rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
				break;
			}
			list = l;
		}
		list[count] = strdup(e->d_name);
		if (!list[count])
			rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
		else
			count++;
	}
	if (!rc && errno)
		rc = dsv3_fail_errno(err, "cannot read directory %s", dir);
	closedir(d);
	if (rc) {
		free_names(list, count);
		return rc;
	}
	if (count)
		qsort(list, count, sizeof *list, cmp_str_ptr);
	*names = list;
	*n = count;
	return 0;
}

void index_free(char **tensors, char **files, size_t n)
{
	free_names(tensors, n);
	free_names(files, n);
}

int index_load(const char *path, char ***tensors, char ***files, size_t *n, dsv3_error *err)
{
	*tensors = *files = NULL;
	*n = 0;
	json_error_t jerr;
	json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		if (access(path, R_OK) != 0)
			return dsv3_fail_errno(err, "cannot open %s", path);
		return dsv3_fail(err, DSV3_EDATA, "%s:%d: invalid JSON: %s", path, jerr.line,
				 jerr.text);
	}
	json_t *map = json_object_get(root, "weight_map");
	if (!json_is_object(map)) {
		json_decref(root);
		return dsv3_fail(err, DSV3_EDATA, "%s: no \"weight_map\" object", path);
	}
	size_t count = json_object_size(map);
	char **t = calloc(count + 1, sizeof *t), **f = calloc(count + 1, sizeof *f);
	int rc = (t && f) ? 0 : dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	size_t i = 0;
	const char *key;
	json_t *value;
	/* jansson iterates objects in insertion order: the file's own order. */
	json_object_foreach(map, key, value) {
		if (rc)
			break;
		if (!json_is_string(value)) {
			rc = dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: file name is not a string",
				       path, key);
			break;
		}
		t[i] = strdup(key);
		f[i] = strdup(json_string_value(value));
		i++;
		if (!t[i - 1] || !f[i - 1])
			rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
	}
	json_decref(root);
	if (rc) {
		index_free(t, f, i);
		return rc;
	}
	*tensors = t;
	*files = f;
	*n = count;
	return 0;
}

static int cmp_entry(const void *a, const void *b)
{
	return strcmp(((const struct hf_ckpt_entry *)a)->name,
		      ((const struct hf_ckpt_entry *)b)->name);
}

/* Sorts every tensor of every file by name; a name in two files is ambiguous. */
static int build_lookup(hf_ckpt *c, dsv3_error *err)
{
	size_t total = 0;
	for (size_t i = 0; i < c->n_files; i++)
		total += c->files[i].n_tensors;
	c->lookup = malloc((total + 1) * sizeof *c->lookup);
	if (!c->lookup)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", c->dir);
	size_t k = 0;
	for (size_t i = 0; i < c->n_files; i++) {
		for (size_t j = 0; j < c->files[i].n_tensors; j++) {
			const st_tensor *t = &c->files[i].tensors[j];
			c->lookup[k++] = (struct hf_ckpt_entry){ t->name, i, t };
		}
	}
	c->n_lookup = total;
	qsort(c->lookup, total, sizeof *c->lookup, cmp_entry);
	for (size_t i = 1; i < total; i++) {
		const struct hf_ckpt_entry *a = &c->lookup[i - 1], *b = &c->lookup[i];
		if (strcmp(a->name, b->name) == 0) {
			size_t fa = a->file < b->file ? a->file : b->file;
			size_t fb = a->file < b->file ? b->file : a->file;
			return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s is in both %s and %s", c->dir,
					 a->name, c->file_names[fa], c->file_names[fb]);
		}
	}
	return 0;
}

static long file_position(const hf_ckpt *c, const char *name)
{
	char **hit = bsearch(&name, c->file_names, c->n_files, sizeof *c->file_names, cmp_str_ptr);
	return hit ? (long)(hit - c->file_names) : -1;
}

/* Every file the index names must be here and hold the tensors mapped to it. */
static int check_index(const hf_ckpt *c, dsv3_error *err)
{
	for (size_t i = 0; i < c->n_index; i++) {
		const char *t = c->index_tensors[i], *f = c->index_files[i];
		long pos = file_position(c, f);
		if (pos < 0)
			return dsv3_fail(err, DSV3_EDATA,
					 "%s/%s listed in " INDEX_NAME " for tensor %s is missing",
					 c->dir, f, t);
		if (!st_find(&c->files[pos], t))
			return dsv3_fail(err, DSV3_EDATA,
					 "%s/%s: tensor %s, mapped to this file by " INDEX_NAME
					 ", is not in it",
					 c->dir, f, t);
	}
	return 0;
}

static int open_files(hf_ckpt *c, dsv3_error *err)
{
	size_t n;
	int rc = dir_glob(c->dir, "*.safetensors", &c->file_names, &n, err);
	if (rc)
		return rc;
	if (n == 0) {
		free(c->file_names);
		c->file_names = NULL;
		return dsv3_fail(err, DSV3_EDATA, "%s: no *.safetensors files", c->dir);
	}
	c->files = calloc(n, sizeof *c->files);
	if (!c->files) {
		free_names(c->file_names, n);
		c->file_names = NULL;
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", c->dir);
	}
	/* n_files counts the opened ones, so hf_ckpt_close frees exactly what exists. */
	for (size_t i = 0; i < n; i++) {
		char *path = path_join(c->dir, c->file_names[i]);
		rc = path ? st_open(&c->files[i], path, err)
			  : dsv3_fail(err, DSV3_EIO, "%s: out of memory", c->dir);
		free(path);
		if (rc) {
			for (size_t j = i; j < n; j++)
				free(c->file_names[j]);
			return rc;
		}
		c->n_files = i + 1;
	}
	return 0;
}

int hf_ckpt_open(hf_ckpt *c, const char *dir, dsv3_error *err)
{
	memset(c, 0, sizeof *c);
	c->dir = strdup(dir);
	if (!c->dir)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	int rc = open_files(c, err);
	char *index_path = rc ? NULL : path_join(dir, INDEX_NAME);
	if (!rc && !index_path)
		rc = dsv3_fail(err, DSV3_EIO, "%s: out of memory", dir);
	if (!rc && access(index_path, F_OK) == 0) {
		c->has_index = 1;
		rc = index_load(index_path, &c->index_tensors, &c->index_files, &c->n_index, err);
		if (!rc)
			rc = check_index(c, err);
	}
	free(index_path);
	if (!rc)
		rc = build_lookup(c, err);
	if (rc)
		hf_ckpt_close(c);
	return rc;
}

void hf_ckpt_close(hf_ckpt *c)
{
	for (size_t i = 0; i < c->n_files; i++) {
		st_close(&c->files[i]);
		free(c->file_names[i]);
	}
	free(c->files);
	free(c->file_names);
	index_free(c->index_tensors, c->index_files, c->n_index);
	free(c->lookup);
	free(c->dir);
	memset(c, 0, sizeof *c);
}

const st_tensor *hf_ckpt_find(const hf_ckpt *c, const char *name, size_t *file_index)
{
	if (!c->n_lookup)
		return NULL;
	struct hf_ckpt_entry key = { .name = name };
	const struct hf_ckpt_entry *e =
		bsearch(&key, c->lookup, c->n_lookup, sizeof *c->lookup, cmp_entry);
	if (!e)
		return NULL;
	if (file_index)
		*file_index = e->file;
	return e->tensor;
}
