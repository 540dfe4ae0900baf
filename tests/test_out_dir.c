/* Atomic output: nothing under a final name before out_dir_commit, nothing left after a
 * failed run, and temporaries of a killed run cleaned at the next open. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "out_dir.h"
#include "support/test_support.h"

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "out-dir");
}

static void assert_file_text(const char *path, const char *text)
{
	char buf[256] = { 0 };
	FILE *f = fopen(path, "r");
	assert_non_null(f);
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	assert_int_equal(n, strlen(text));
	assert_string_equal(buf, text);
}

/* Number of entries in dir, hidden ones included (but not . and ..). */
static size_t count_entries(const char *dir)
{
	DIR *d = opendir(dir);
	assert_non_null(d);
	size_t n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			n++;
	closedir(d);
	return n;
}

static void test_out_dir_files_appear_only_after_commit(void **state)
{
	const char *root = *state;
	char *dir = strdup(path_in(root, "a/b/out")); /* parents are created too */
	char *src = strdup(path_in(root, "src.txt"));
	write_text_file(src, "copied bytes\n");
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "small.json", "{}\n", 3, &err), 0);
	assert_int_equal(out_dir_copy_file(&o, src, "copy.txt", &err), 0);
	const char *tmp = out_dir_add(&o, "big.bin", &err);
	assert_non_null(tmp);
	const char *prefix = path_in(dir, OUT_DIR_TMP_PREFIX);
	assert_int_equal(strncmp(tmp, prefix, strlen(prefix)), 0);
	write_text_file(tmp, "big\n");

	assert_false(path_exists(path_in(dir, "small.json")));
	assert_false(path_exists(path_in(dir, "copy.txt")));
	assert_false(path_exists(path_in(dir, "big.bin")));
	assert_int_equal(count_entries(dir), 3); /* three temporaries */

	assert_int_equal(out_dir_commit(&o, &err), 0);
	out_dir_close(&o);
	assert_file_text(path_in(dir, "small.json"), "{}\n");
	assert_file_text(path_in(dir, "copy.txt"), "copied bytes\n");
	assert_file_text(path_in(dir, "big.bin"), "big\n");
	assert_int_equal(count_entries(dir), 3); /* no temporary left */
	free(dir);
	free(src);
}

static void test_out_dir_close_without_commit_leaves_nothing(void **state)
{
	const char *dir = *state;
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "x.safetensors", "abc", 3, &err), 0);
	const char *tmp = out_dir_add(&o, "y.safetensors", &err);
	write_text_file(tmp, "partial");
	out_dir_add(&o, "never-written", &err); /* registered, never created: close must cope */
	out_dir_close(&o);
	assert_int_equal(count_entries(dir), 0);
}

static void test_out_dir_open_removes_stale_temporaries(void **state)
{
	const char *dir = *state;
	write_text_file(path_in(dir, ".dsv3-tmp.model0-mp1.safetensors.12345"), "killed run");
	write_text_file(path_in(dir, ".dsv3-tmp.SHA256SUMS.1"), "killed run");
	write_text_file(path_in(dir, "keep.txt"), "user file");
	write_text_file(path_in(dir, ".hidden"), "user file");
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	out_dir_close(&o);
	assert_false(path_exists(path_in(dir, ".dsv3-tmp.model0-mp1.safetensors.12345")));
	assert_false(path_exists(path_in(dir, ".dsv3-tmp.SHA256SUMS.1")));
	assert_file_text(path_in(dir, "keep.txt"), "user file");
	assert_file_text(path_in(dir, ".hidden"), "user file");
}

static void test_out_dir_commit_replaces_an_older_file(void **state)
{
	const char *dir = *state;
	write_text_file(path_in(dir, "config.json"), "old");
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "config.json", "new", 3, &err), 0);
	assert_file_text(path_in(dir, "config.json"), "old");
	assert_int_equal(out_dir_commit(&o, &err), 0);
	out_dir_close(&o);
	assert_file_text(path_in(dir, "config.json"), "new");
}

static void test_out_dir_refuses_a_name_added_twice(void **state)
{
	const char *dir = *state;
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_non_null(out_dir_add(&o, "model0-mp2.safetensors", &err));
	assert_null(out_dir_add(&o, "model0-mp2.safetensors", &err));
	assert_non_null(strstr(err.msg, "model0-mp2.safetensors"));
	assert_int_not_equal(out_dir_write_file(&o, "model0-mp2.safetensors", "x", 1, &err), 0);
	out_dir_close(&o);
	assert_int_equal(count_entries(dir), 0);
}

static void test_out_dir_refuses_names_with_a_slash(void **state)
{
	const char *dir = *state;
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_null(out_dir_add(&o, "../escape", &err));
	assert_null(out_dir_add(&o, "", &err));
	out_dir_close(&o);
}

static void test_out_dir_errors_name_the_path(void **state)
{
	const char *root = *state;
	char *file = strdup(path_in(root, "plain-file"));
	write_text_file(file, "x");
	out_dir o;
	dsv3_error err = { 0 };
	/* A directory cannot be made under a regular file. */
	int rc = out_dir_open(&o, path_in(file, "sub"), &err);
	assert_int_equal(rc, DSV3_EIO);
	assert_non_null(strstr(err.msg, "plain-file"));
	out_dir_close(&o);

	assert_int_equal(out_dir_open(&o, root, &err), 0);
	rc = out_dir_copy_file(&o, path_in(root, "no-such-source"), "dst", &err);
	assert_int_equal(rc, DSV3_EIO);
	assert_non_null(strstr(err.msg, "no-such-source"));
	out_dir_close(&o);
	free(file);
}

/* A finished file (out_dir_finish) survives a close without commit, under its own name, and a
 * later run can hand it to the commit (out_dir_add_finished) without writing it again. */
static void test_out_dir_finished_files_outlive_a_failed_run(void **state)
{
	const char *dir = *state;
	char *kept = strdup(path_in(dir, ".dsv3-done.a.safetensors"));
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	write_text_file(out_dir_add(&o, "a.safetensors", &err), "finished");
	write_text_file(out_dir_add(&o, "b.safetensors", &err), "partial");
	assert_int_equal(out_dir_finish(&o, "a.safetensors", kept, &err), 0);
	assert_int_not_equal(out_dir_finish(&o, "never-added", kept, &err), 0);
	out_dir_close(&o); /* the run failed */
	assert_int_equal(count_entries(dir), 1);
	assert_file_text(kept, "finished");

	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(out_dir_add_finished(&o, "a.safetensors", kept, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "b.safetensors", "whole", 5, &err), 0);
	assert_int_equal(out_dir_commit(&o, &err), 0);
	out_dir_close(&o);
	assert_int_equal(count_entries(dir), 2);
	assert_file_text(path_in(dir, "a.safetensors"), "finished");
	assert_file_text(path_in(dir, "b.safetensors"), "whole");
	free(kept);
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_out_dir_files_appear_only_after_commit),
		T(test_out_dir_close_without_commit_leaves_nothing),
		T(test_out_dir_finished_files_outlive_a_failed_run),
		T(test_out_dir_open_removes_stale_temporaries),
		T(test_out_dir_commit_replaces_an_older_file),
		T(test_out_dir_refuses_a_name_added_twice),
		T(test_out_dir_refuses_names_with_a_slash),
		T(test_out_dir_errors_name_the_path),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
