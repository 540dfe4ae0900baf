/* Plumbing shared by the CMocka tests: temporary directories, paths, running the tools,
 * reading files back, writing small safetensors files. Helpers named assert_* or write_* fail
 * the current test on error; the others report it in their return value. */
#ifndef DSV3_TEST_SUPPORT_H
#define DSV3_TEST_SUPPORT_H

#include <stddef.h>

#include "safetensors.h"

/* A fresh directory /tmp/dsv3-test-<tag>-XXXXXX; the path is malloc'd. NULL on failure. */
char *tmp_dir_create(const char *tag);
/* Removes `path` and everything below it, not following links; a missing path is fine. */
void remove_tree(const char *path);
/* CMocka setup and teardown: *state becomes a tmp_dir_create(tag) path; then it is removed
 * with everything in it and freed. */
int tmp_dir_setup(void **state, const char *tag);
int tmp_dir_teardown(void **state);

/* "dir/name" in one of 8 rotating buffers, so a few results can be held at once; `dir` may be
 * an earlier result. */
char *path_in(const char *dir, const char *name);
/* path_in(dir, name) with whatever was there removed; from a ring of its own (32 buffers), so
 * it lives while path_in's are reused. */
const char *fresh_path(const char *dir, const char *name);
/* $DSV3_BIN, where make test puts the tools; build/bin when it is unset. */
const char *bin_dir(void);

/* Runs a shell command line built from fmt; returns its exit code, -1 if it did not exit. */
int run_shell(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The same with stdout to /dev/null and stderr to `err_path` (NULL: /dev/null). */
int run_quiet(const char *err_path, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The same as run_shell, printing the command line to stderr when it fails. */
int run_noting_failure(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* dsv3-synth --preset preset --seed seed <args> --out out, stdout to /dev/null; its exit code. */
int run_synth(const char *preset, int seed, const char *args, const char *out);

int path_exists(const char *path);
/* The whole file, malloc'd and NUL-terminated (len, if not NULL, excludes the NUL); NULL when
 * it cannot be opened. A short read fails the test. */
char *read_whole_file(const char *path, size_t *len);
/* read_whole_file of a file that must exist. */
char *assert_read_file(const char *path, size_t *len);
/* Whether the file exists and holds `needle`. */
int file_contains(const char *path, const char *needle);
/* Fails the test, printing the file, unless it holds `needle`. */
void assert_file_contains(const char *path, const char *needle);
void write_text_file(const char *path, const char *text);
/* Entries of dir (not . and ..): final ones and the hidden ones of out_dir and --resume
 * (.dsv3-tmp.*, .dsv3-done.*, .dsv3-resume); 0 and 0 when dir does not exist. */
void count_dir_entries(const char *dir, int *finals, int *temps);
int count_final_entries(const char *dir);

/* Writes a safetensors file with the library's writer (its layout is not under test where
 * this is used): tensor i is specs[i] with the bytes data[i]. */
void write_safetensors(const char *path, const st_spec *specs, const void *const *data, size_t n);

#endif
