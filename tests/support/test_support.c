#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "dtype.h"
#include "test_support.h"

char *tmp_dir_create(const char *tag)
{
	char *dir = malloc(strlen(tag) + 32);
	if (!dir)
		return NULL;
	sprintf(dir, "/tmp/dsv3-test-%s-XXXXXX", tag);
	if (!mkdtemp(dir)) {
		free(dir);
		return NULL;
	}
	return dir;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

void remove_tree(const char *path)
{
	nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int tmp_dir_setup(void **state, const char *tag)
{
	*state = tmp_dir_create(tag);
	return *state ? 0 : -1;
}

int tmp_dir_teardown(void **state)
{
	remove_tree(*state);
	free(*state);
	return 0;
}

char *path_in(const char *dir, const char *name)
{
	static char buf[8][4096];
	static int k;
	char tmp[4096]; /* dir may be an earlier result */
	snprintf(tmp, sizeof tmp, "%s/%s", dir, name);
	char *b = buf[k++ % 8];
	memcpy(b, tmp, sizeof tmp);
	return b;
}

const char *fresh_path(const char *dir, const char *name)
{
	static char paths[32][4096];
	static int k;
	char *p = paths[k++ % 32];
	snprintf(p, sizeof paths[0], "%s/%s", dir, name);
	remove_tree(p);
	return p;
}

const char *bin_dir(void)
{
	const char *b = getenv("DSV3_BIN");
	return b ? b : "build/bin";
}

/* system() of fmt's text plus `suffix`; the exit code, -1 if the shell did not exit. */
static int run_formatted(int note_failure, const char *suffix, const char *fmt, va_list ap)
{
	char cmd[8192], full[8400];
	vsnprintf(cmd, sizeof cmd, fmt, ap);
	snprintf(full, sizeof full, "%s%s", cmd, suffix);
	int st = system(full);
	if (st != 0 && note_failure)
		fprintf(stderr, "command failed (%d): %s\n", st, full);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int run_shell(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int rc = run_formatted(0, "", fmt, ap);
	va_end(ap);
	return rc;
}

int run_noting_failure(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int rc = run_formatted(1, "", fmt, ap);
	va_end(ap);
	return rc;
}

int run_quiet(const char *err_path, const char *fmt, ...)
{
	char redirect[4200];
	snprintf(redirect, sizeof redirect, " >/dev/null 2>%s", err_path ? err_path : "/dev/null");
	va_list ap;
	va_start(ap, fmt);
	int rc = run_formatted(0, redirect, fmt, ap);
	va_end(ap);
	return rc;
}

int run_synth(const char *preset, int seed, const char *args, const char *out)
{
	return run_shell("%s/dsv3-synth --preset %s --seed %d %s --out %s >/dev/null", bin_dir(),
			 preset, seed, args, out);
}

int path_exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

char *read_whole_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *s = malloc((size_t)n + 1);
	assert_non_null(s);
	assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
	s[n] = '\0';
	fclose(f);
	if (len)
		*len = (size_t)n;
	return s;
}

char *assert_read_file(const char *path, size_t *len)
{
	char *s = read_whole_file(path, len);
	if (!s)
		fail_msg("cannot open %s", path);
	return s;
}

int file_contains(const char *path, const char *needle)
{
	char *s = read_whole_file(path, NULL);
	int found = s && strstr(s, needle);
	free(s);
	return found;
}

void assert_file_contains(const char *path, const char *needle)
{
	char *s = read_whole_file(path, NULL);
	if (!s || !strstr(s, needle)) {
		print_error("%s lacks \"%s\":\n%s\n", path, needle, s ? s : "(none)");
		free(s);
		fail();
	}
	free(s);
}

void write_text_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
	assert_int_equal(fclose(f), 0);
}

void count_dir_entries(const char *dir, int *finals, int *temps)
{
	*finals = *temps = 0;
	DIR *d = opendir(dir);
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (!strncmp(e->d_name, ".dsv3-", 6)) /* temporaries, finished files, journal */
			(*temps)++;
		else
			(*finals)++;
	}
	closedir(d);
}

int count_final_entries(const char *dir)
{
	int finals, temps;
	count_dir_entries(dir, &finals, &temps);
	return finals;
}

static size_t spec_bytes(const st_spec *s)
{
	size_t n = dtype_size(s->dtype);
	for (int d = 0; d < s->ndim; d++)
		n *= (size_t)s->shape[d];
	return n;
}

void write_safetensors(const char *path, const st_spec *specs, const void *const *data, size_t n)
{
	st_writer *w;
	dsv3_error err = { 0 };
	if (st_writer_open(&w, path, specs, n, NULL, &err))
		fail_msg("%s", err.msg);
	for (size_t pos = 0; pos < n; pos++) {
		size_t k = st_writer_order(w, pos);
		if (st_writer_write(w, data[k], spec_bytes(&specs[k]), &err))
			fail_msg("%s", err.msg);
	}
	if (st_writer_finish(w, NULL, &err))
		fail_msg("%s", err.msg);
}
