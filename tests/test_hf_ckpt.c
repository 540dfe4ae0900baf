/* A checkpoint directory: tensors found across files, the index checked against the files,
 * ambiguous and missing tensors refused with the file named. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "hf_ckpt.h"
#include "support/test_support.h"

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "hf-ckpt");
}

/* Writes a safetensors file of U8 tensors of shape [2] holding {k, k+1} for the k-th name. */
static void write_st(const char *dir, const char *file, const char *const *names, size_t n)
{
	st_spec specs[8];
	uint8_t bytes[8][2];
	const void *data[8];
	assert_true(n <= 8);
	for (size_t i = 0; i < n; i++) {
		specs[i] = (st_spec){ .name = names[i], .dtype = ST_U8, .ndim = 1, .shape = { 2 } };
		bytes[i][0] = (uint8_t)(10 * i);
		bytes[i][1] = (uint8_t)(10 * i + 1);
		data[i] = bytes[i];
	}
	write_safetensors(path_in(dir, file), specs, data, n);
}

static void write_text(const char *dir, const char *name, const char *text)
{
	write_text_file(path_in(dir, name), text);
}

static const char *const file1_names[] = { "model.embed_tokens.weight", "model.norm.weight" };
static const char *const file2_names[] = { "lm_head.weight", "model.layers.0.mlp.gate.weight" };

/* Index order differs from both name order and file order, to check it is kept. */
static const char index_json[] =
	"{\"metadata\": {\"total_size\": 8}, \"weight_map\": {"
	"\"model.norm.weight\": \"model-00001-of-00002.safetensors\","
	"\"lm_head.weight\": \"model-00002-of-00002.safetensors\","
	"\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
	"\"model.layers.0.mlp.gate.weight\": \"model-00002-of-00002.safetensors\"}}";

static void write_hf_dir(const char *dir)
{
	write_st(dir, "model-00002-of-00002.safetensors", file2_names, 2);
	write_st(dir, "model-00001-of-00002.safetensors", file1_names, 2);
	write_text(dir, "model.safetensors.index.json", index_json);
	write_text(dir, "config.json", "{}");
}

static void test_hf_ckpt_finds_tensors_across_files(void **state)
{
	const char *dir = *state;
	write_hf_dir(dir);
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), 0);
	assert_int_equal(c.n_files, 2);
	assert_string_equal(c.file_names[0], "model-00001-of-00002.safetensors");
	assert_string_equal(c.file_names[1], "model-00002-of-00002.safetensors");
	assert_int_equal(c.has_index, 1);

	size_t fi = 99;
	const st_tensor *t = hf_ckpt_find(&c, "lm_head.weight", &fi);
	assert_non_null(t);
	assert_int_equal(fi, 1);
	assert_int_equal(t->dtype, ST_U8);
	assert_int_equal(t->ndim, 1);
	assert_int_equal(t->shape[0], 2);
	assert_int_equal(t->data[0], 0); /* first name given to write_st */
	assert_int_equal(t->data[1], 1);
	t = hf_ckpt_find(&c, "model.norm.weight", &fi);
	assert_non_null(t);
	assert_int_equal(fi, 0);
	assert_int_equal(t->data[0], 10);
	assert_non_null(hf_ckpt_find(&c, "model.embed_tokens.weight", NULL));
	assert_null(hf_ckpt_find(&c, "model.layers.1.mlp.gate.weight", &fi));
	hf_ckpt_close(&c);
}

static void test_hf_ckpt_keeps_index_order(void **state)
{
	const char *dir = *state;
	write_hf_dir(dir);
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), 0);
	assert_int_equal(c.n_index, 4);
	assert_string_equal(c.index_tensors[0], "model.norm.weight");
	assert_string_equal(c.index_tensors[1], "lm_head.weight");
	assert_string_equal(c.index_tensors[2], "model.embed_tokens.weight");
	assert_string_equal(c.index_tensors[3], "model.layers.0.mlp.gate.weight");
	assert_string_equal(c.index_files[1], "model-00002-of-00002.safetensors");
	hf_ckpt_close(&c);
}

static void test_hf_ckpt_opens_a_directory_without_index(void **state)
{
	const char *dir = *state;
	write_st(dir, "model1-mp2.safetensors", file2_names, 2);
	write_st(dir, "model0-mp2.safetensors", file1_names, 2);
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), 0);
	assert_int_equal(c.has_index, 0);
	assert_int_equal(c.n_index, 0);
	assert_string_equal(c.file_names[0], "model0-mp2.safetensors");
	size_t fi;
	assert_non_null(hf_ckpt_find(&c, "model.layers.0.mlp.gate.weight", &fi));
	assert_int_equal(fi, 1);
	hf_ckpt_close(&c);
}

static void test_hf_ckpt_refuses_missing_file_listed_in_index(void **state)
{
	const char *dir = *state;
	write_st(dir, "model-00001-of-00002.safetensors", file1_names, 2);
	write_text(dir, "model.safetensors.index.json", index_json);
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "model-00002-of-00002.safetensors"));
	assert_non_null(strstr(err.msg, "is missing"));
	assert_non_null(strstr(err.msg, "lm_head.weight"));
}

static void test_hf_ckpt_refuses_tensor_absent_from_its_file(void **state)
{
	const char *dir = *state;
	write_st(dir, "model-00001-of-00002.safetensors", file1_names, 2);
	write_st(dir, "model-00002-of-00002.safetensors", file2_names, 1); /* no gate */
	write_text(dir, "model.safetensors.index.json", index_json);
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "model-00002-of-00002.safetensors"));
	assert_non_null(strstr(err.msg, "model.layers.0.mlp.gate.weight"));
}

static void test_hf_ckpt_refuses_tensor_in_two_files(void **state)
{
	const char *dir = *state;
	static const char *const dup[] = { "lm_head.weight", "model.norm.weight" };
	write_st(dir, "model0-mp2.safetensors", file1_names, 2);
	write_st(dir, "model1-mp2.safetensors", dup, 2);
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "model.norm.weight"));
	assert_non_null(strstr(err.msg, "model0-mp2.safetensors"));
	assert_non_null(strstr(err.msg, "model1-mp2.safetensors"));
}

static void test_hf_ckpt_refuses_directory_without_safetensors(void **state)
{
	const char *dir = *state;
	write_text(dir, "config.json", "{}");
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, dir));
}

static void test_hf_ckpt_passes_on_a_corrupt_file_error(void **state)
{
	const char *dir = *state;
	write_st(dir, "model0-mp2.safetensors", file1_names, 2);
	write_text(dir, "model1-mp2.safetensors", "short");
	hf_ckpt c;
	dsv3_error err = { 0 };
	assert_int_equal(hf_ckpt_open(&c, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "model1-mp2.safetensors"));
}

static void test_index_load_refuses_bad_index(void **state)
{
	const char *dir = *state;
	char path[4096];
	snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
	char **t, **f;
	size_t n;
	dsv3_error err = { 0 };
	write_text(dir, "model.safetensors.index.json", "{\"weight_map\": ");
	assert_int_equal(index_load(path, &t, &f, &n, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, path));
	write_text(dir, "model.safetensors.index.json", "{\"metadata\": {}}");
	assert_int_equal(index_load(path, &t, &f, &n, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "weight_map"));
	write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": 3}}");
	assert_int_equal(index_load(path, &t, &f, &n, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "a"));
}

static void test_dir_glob_sorts_and_skips_hidden_names(void **state)
{
	const char *dir = *state;
	write_text(dir, "b.safetensors", "");
	write_text(dir, "B.safetensors", "");
	write_text(dir, "a.safetensors", "");
	write_text(dir, ".dsv3-tmp.c.safetensors.1", "");
	write_text(dir, "config.json", "");
	char **names;
	size_t n;
	dsv3_error err = { 0 };
	assert_int_equal(dir_glob(dir, "*.safetensors", &names, &n, &err), 0);
	assert_int_equal(n, 3);
	assert_string_equal(names[0], "B.safetensors"); /* byte order */
	assert_string_equal(names[1], "a.safetensors");
	assert_string_equal(names[2], "b.safetensors");
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	assert_int_equal(dir_glob("/nonexistent-dsv3", "*", &names, &n, &err), DSV3_EIO);
	assert_non_null(strstr(err.msg, "/nonexistent-dsv3"));
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_hf_ckpt_finds_tensors_across_files),
		T(test_hf_ckpt_keeps_index_order),
		T(test_hf_ckpt_opens_a_directory_without_index),
		T(test_hf_ckpt_refuses_missing_file_listed_in_index),
		T(test_hf_ckpt_refuses_tensor_absent_from_its_file),
		T(test_hf_ckpt_refuses_tensor_in_two_files),
		T(test_hf_ckpt_refuses_directory_without_safetensors),
		T(test_hf_ckpt_passes_on_a_corrupt_file_error),
		T(test_index_load_refuses_bad_index),
		T(test_dir_glob_sorts_and_skips_hidden_names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
