/* dsv3-verify download end to end on a tiny synthetic download (dsv3-synth --files 3): a good
 * download passes bare, against a sha256sum list and against a model tree API JSON; each kind of
 * damage (a missing shard, a truncated one, a garbage header, a flipped byte, tensors the index
 * misplaces, a stray file) is exit 2 with a line naming the file; a malformed list is exit 2
 * naming its line; usage errors exit 1. Expected hashes come from sha256sum and git hash-object,
 * never from the code under test. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "support/test_support.h"

#define SHARD3 "model-00003-of-00003.safetensors"
#define SHARD2 "model-00002-of-00003.safetensors"
#define SHARD1 "model-00001-of-00003.safetensors"
#define INDEX "model.safetensors.index.json"

/* ---- helpers ---- */

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "verify-download");
}

static const char *err_path(const char *tmp)
{
	return path_in(tmp, "stderr");
}

/* dsv3-verify download ARGS; stdout and stderr kept in the test's directory. */
static int download(const char *tmp, const char *args)
{
	return run_shell("%s/dsv3-verify download %s >%s 2>%s", bin_dir(), args,
			 path_in(tmp, "stdout"), err_path(tmp));
}

/* The synthetic download, in tmp/dl; the path is malloc'd. */
static char *synth_download(const char *tmp)
{
	char *dir = strdup(path_in(tmp, "dl"));
	assert_int_equal(run_synth("tiny", 1, "--files 3", dir), 0);
	return dir;
}

/* First line of a shell command's stdout, without its newline. */
static void command_line(char *out, size_t len, const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof cmd, fmt, ap);
	va_end(ap);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	assert_non_null(fgets(out, (int)len, p));
	out[strcspn(out, "\n")] = '\0';
	assert_int_equal(pclose(p), 0);
}

/* tmp/sums: sha256sum of every file of dir, made by coreutils itself. */
static char *write_sums(const char *tmp, const char *dir)
{
	char *sums = strdup(path_in(tmp, "sums"));
	assert_int_equal(run_shell("cd %s && sha256sum * >%s", dir, sums), 0);
	return sums;
}

static int has_suffix(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && !strcmp(s + a - b, suffix);
}

/* One entry of the tree API's answer: safetensors as LFS files (SHA-256 and size from
 * sha256sum and stat), the rest by git blob id (git hash-object). */
static json_t *tree_entry(const char *dir, const char *name)
{
	char hash[128], size[64];
	const char *file = path_in(dir, name);
	command_line(size, sizeof size, "stat -c %%s %s", file);
	json_int_t bytes = strtoll(size, NULL, 10);
	json_t *e = json_pack("{s:s, s:s, s:I}", "type", "file", "path", name, "size", bytes);
	if (has_suffix(name, ".safetensors")) {
		command_line(hash, sizeof hash, "sha256sum %s | cut -c1-64", file);
		json_object_set_new(e, "oid", json_string("0123456789abcdef0123456789abcdef01234567"));
		json_object_set_new(e, "lfs", json_pack("{s:s, s:I, s:i}", "oid", hash, "size",
							bytes, "pointerSize", 135));
	} else {
		command_line(hash, sizeof hash, "git hash-object %s", file);
		json_object_set_new(e, "oid", json_string(hash));
	}
	return e;
}

/* tmp/tree.json for every file of dir, plus a directory entry (skipped by the tool). */
static char *write_tree(const char *tmp, const char *dir)
{
	char *tree = strdup(path_in(tmp, "tree.json"));
	json_t *a = json_array();
	json_array_append_new(a, json_pack("{s:s, s:s, s:i, s:s}", "type", "directory", "path",
					   "figures", "size", 0, "oid", "x"));
	DIR *d = opendir(dir);
	assert_non_null(d);
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			json_array_append_new(a, tree_entry(dir, e->d_name));
	closedir(d);
	assert_int_equal(json_dump_file(a, tree, JSON_INDENT(1)), 0);
	json_decref(a);
	return tree;
}

static void assert_stderr_has(const char *tmp, const char *needle)
{
	assert_file_contains(err_path(tmp), needle);
}

/* Overwrites bytes of a file at off. */
static void poke(const char *file, off_t off, const void *bytes, size_t n)
{
	int fd = open(file, O_WRONLY);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, bytes, n, off), (ssize_t)n);
	close(fd);
}

/* Offset of the middle byte of a tensor's data, from the format: 8 + header + begin. */
static off_t data_middle(const char *file, char *name_out, size_t len)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, file, &err), 0);
	const st_tensor *t = &f.tensors[0];
	snprintf(name_out, len, "%s", t->name);
	off_t off = (off_t)(8 + f.header_len + t->begin + t->nbytes / 2);
	st_close(&f);
	return off;
}

/* The index with tensor -> file set (added when absent). */
static void index_set(const char *dir, const char *tensor, const char *file)
{
	json_error_t jerr;
	const char *path = path_in(dir, INDEX);
	json_t *root = json_load_file(path, 0, &jerr);
	assert_non_null(root);
	json_object_set_new(json_object_get(root, "weight_map"), tensor, json_string(file));
	assert_int_equal(json_dump_file(root, path, JSON_INDENT(2)), 0);
	json_decref(root);
}

/* Some tensor the synthetic writer put in `file`. */
static char *tensor_in(const char *file)
{
	st_file f;
	dsv3_error err = { 0 };
	assert_int_equal(st_open(&f, file, &err), 0);
	char *name = strdup(f.tensors[f.n_tensors / 2].name);
	st_close(&f);
	return name;
}

/* ---- a good download ---- */

static void test_download_good_passes_bare_and_with_sha256sums(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *sums = write_sums(tmp, dir), args[8192];
	assert_int_equal(download(tmp, dir), 0);
	assert_file_contains(path_in(tmp, "stdout"), "OK: ");
	assert_file_contains(path_in(tmp, "stdout"), "3 safetensors files");
	snprintf(args, sizeof args, "--sha256sums %s --threads 2 %s", sums, dir);
	assert_int_equal(download(tmp, args), 0);
	assert_file_contains(path_in(tmp, "stdout"), "files hashed against");
	/* the list may lie in DIR itself, in sha256sum's binary and BSD forms */
	assert_int_equal(run_shell("cd %s && sha256sum -b [cm]* >LIST && sha256sum --tag [tS]* >>LIST",
				   dir), 0);
	snprintf(args, sizeof args, "%s --sha256sums %s/LIST", dir, dir);
	assert_int_equal(download(tmp, args), 0);
	free(sums);
	free(dir);
}

static void test_download_good_passes_with_hf_tree(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *tree = write_tree(tmp, dir), args[8192];
	snprintf(args, sizeof args, "--hf-tree=%s %s", tree, dir);
	assert_int_equal(download(tmp, args), 0);
	assert_file_contains(path_in(tmp, "stdout"), "OK: ");
	free(tree);
	free(dir);
}

/* ---- each kind of damage ---- */

static void test_download_names_missing_last_shard(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *sums = write_sums(tmp, dir), args[8192];
	assert_int_equal(unlink(path_in(dir, SHARD3)), 0);
	assert_int_equal(download(tmp, dir), 2);
	assert_stderr_has(tmp, SHARD3 ": missing (" INDEX " puts");
	snprintf(args, sizeof args, "--sha256sums %s %s", sums, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, SHARD3 ": missing (listed in");
	free(sums);
	free(dir);
}

static void test_download_names_truncated_shard(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *tree = write_tree(tmp, dir), args[8192];
	assert_int_equal(truncate(path_in(dir, SHARD2), 3000000), 0);
	assert_int_equal(download(tmp, dir), 2);
	assert_stderr_has(tmp, SHARD2 ": tensor ");
	assert_stderr_has(tmp, "runs past the end of the data area");
	snprintf(args, sizeof args, "--hf-tree %s %s", tree, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, SHARD2 ": 3000000 bytes, ");
	free(tree);
	free(dir);
}

static void test_download_names_garbage_header(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp);
	/* an HTML error page saved under the shard's name: "<!DOCTYP" read as a length */
	poke(path_in(dir, SHARD1), 0, "<!DOCTYPE html>", 15);
	assert_int_equal(download(tmp, dir), 2);
	assert_stderr_has(tmp, SHARD1 ": header length ");
	assert_stderr_has(tmp, "exceeds the limit");
	free(dir);
}

static void test_download_names_flipped_byte(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *sums = write_sums(tmp, dir);
	char *tree = write_tree(tmp, dir), args[8192], name[512];
	const char *shard = path_in(dir, SHARD2);
	off_t off = data_middle(shard, name, sizeof name);
	uint8_t b;
	int fd = open(shard, O_RDONLY);
	assert_int_equal(pread(fd, &b, 1, off), 1);
	close(fd);
	b ^= 0x01;
	poke(shard, off, &b, 1);
	poke(path_in(dir, "config.json"), 0, "[", 1); /* "{" -> "[": same size, other blob */
	assert_int_equal(download(tmp, dir), 0); /* the structure is intact */
	snprintf(args, sizeof args, "--sha256sums %s %s", sums, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, SHARD2 ": SHA-256 differs from ");
	assert_stderr_has(tmp, "config.json: SHA-256 differs from ");
	snprintf(args, sizeof args, "--hf-tree %s %s", tree, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, SHARD2 ": SHA-256 differs from ");
	assert_stderr_has(tmp, "config.json: git blob id (SHA-1) differs from ");
	free(tree);
	free(sums);
	free(dir);
}

static void test_download_names_index_tensor_missing_from_its_file(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp);
	index_set(dir, "model.layers.0.mlp.made_up.weight", SHARD1);
	assert_int_equal(download(tmp, dir), 2);
	assert_stderr_has(tmp, SHARD1 ": tensor model.layers.0.mlp.made_up.weight: not in this "
			       "file");
	free(dir);
}

static void test_download_names_tensor_outside_its_index_file(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), line[1024];
	char *name = tensor_in(path_in(dir, SHARD1));
	index_set(dir, name, SHARD2); /* the index now puts it in shard 2 */
	assert_int_equal(download(tmp, dir), 2);
	snprintf(line, sizeof line, SHARD1 ": tensor %s: " INDEX " puts it in " SHARD2, name);
	assert_stderr_has(tmp, line);
	snprintf(line, sizeof line, SHARD2 ": tensor %s: not in this file", name);
	assert_stderr_has(tmp, line);
	free(name);
	free(dir);
}

static void test_download_names_stray_and_unlisted_files(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *sums = write_sums(tmp, dir), args[8192];
	assert_int_equal(run_shell("cp %s/" SHARD3 " %s/extra.safetensors && echo hi >%s/notes.txt",
				   dir, dir, dir), 0);
	snprintf(args, sizeof args, "--sha256sums %s %s", sums, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "extra.safetensors: not named by " INDEX);
	assert_stderr_has(tmp, "notes.txt: not listed in ");
	assert_stderr_has(tmp, "extra.safetensors: not listed in ");
	free(sums);
	free(dir);
}

/* ---- malformed lists: never a pass ---- */

/* Bad JSON in --hf-tree is bad input data: exit 2, naming the file and line. */
static void test_download_bad_hf_tree_json_exits_2_naming_line(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), args[8192];
	const char *tree = path_in(tmp, "bad.json");
	write_text_file(tree, "[\n{\"type\": \"file\", \"path\": \"config.json\",\n\"size\": 12,,\n");
	snprintf(args, sizeof args, "--hf-tree %s %s", tree, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "bad.json:3: invalid JSON");
	/* valid JSON that is not the tree API's array (an error answer saved by mistake) */
	write_text_file(tree, "{\"error\": \"Repository not found\"}\n");
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "bad.json: not a JSON array");
	/* an LFS entry without its SHA-256 */
	write_text_file(tree, "[{\"type\":\"file\",\"path\":\"a\",\"size\":1,\"oid\":\"x\","
			      "\"lfs\":{\"size\":1}}]\n");
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "bad.json: entry 1 (a): lfs.oid is not a SHA-256");
	free(dir);
}

static void test_download_malformed_sums_line_exits_2_naming_line(void **state)
{
	const char *tmp = *state;
	char *dir = synth_download(tmp), *sums = write_sums(tmp, dir), args[8192];
	assert_int_equal(run_shell("sed -i '2s/^\\(.\\{10\\}\\)./\\1g/' %s", sums), 0);
	snprintf(args, sizeof args, "--sha256sums %s %s", sums, dir);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "sums:2: malformed line");
	/* a path leaving DIR is malformed too */
	write_text_file(sums, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  "
			      "../etc/passwd\n");
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "sums:1: malformed line");
	/* a file listed twice would pass whichever hash matched */
	assert_int_equal(run_shell("cd %s && sha256sum config.json config.json >%s", dir, sums), 0);
	assert_int_equal(download(tmp, args), 2);
	assert_stderr_has(tmp, "sums:2: config.json listed twice (line 1 too)");
	free(sums);
	free(dir);
}

/* ---- usage ---- */

static void test_download_usage_errors_exit_1(void **state)
{
	const char *tmp = *state;
	assert_int_equal(download(tmp, ""), 1);
	assert_int_equal(download(tmp, "--hf-tree a --sha256sums b /tmp"), 1);
	assert_stderr_has(tmp, "exclude each other");
	assert_int_equal(download(tmp, "--threads 0 /tmp"), 1);
	assert_int_equal(download(tmp, "--no-such-option /tmp"), 1);
	assert_int_equal(download(tmp, "/tmp /tmp"), 1);
	assert_int_equal(download(tmp, "--help"), 0);
	assert_file_contains(path_in(tmp, "stdout"), "usage: dsv3-verify download");
	assert_int_equal(download(tmp, "/nonexistent-dsv3-dir"), 3);
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_download_good_passes_bare_and_with_sha256sums),
		T(test_download_good_passes_with_hf_tree),
		T(test_download_names_missing_last_shard),
		T(test_download_names_truncated_shard),
		T(test_download_names_garbage_header),
		T(test_download_names_flipped_byte),
		T(test_download_names_index_tensor_missing_from_its_file),
		T(test_download_names_tensor_outside_its_index_file),
		T(test_download_names_stray_and_unlisted_files),
		T(test_download_bad_hf_tree_json_exits_2_naming_line),
		T(test_download_malformed_sums_line_exits_2_naming_line),
		T(test_download_usage_errors_exit_1),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
