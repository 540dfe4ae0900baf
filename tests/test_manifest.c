/* Manifests (DESIGN §3.4): exact SHA256SUMS and tensors.sha256.json text, `sha256sum -c`
 * accepting it, reading both back, and refusing malformed input. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "manifest.h"
#include "support/test_support.h"

/* FIPS 180-2 vectors: SHA-256 of "abc" and of the empty message. */
#define ABC_SHA256 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
#define EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

/* What the tiny manifest below must render to: Python's json.dumps(obj, indent=2) + "\n"
 * gives the same bytes. Its hash was taken with coreutils `sha256sum`. */
static const char expected_tensors_json[] =
	"{\n"
	"  \"a.scale\": {\n"
	"    \"dtype\": \"F32\",\n"
	"    \"shape\": [\n"
	"      1\n"
	"    ],\n"
	"    \"sha256\": \"" EMPTY_SHA256 "\"\n"
	"  },\n"
	"  \"embed.weight\": {\n"
	"    \"dtype\": \"BF16\",\n"
	"    \"shape\": [\n"
	"      4,\n"
	"      2\n"
	"    ],\n"
	"    \"sha256\": \"" ABC_SHA256 "\"\n"
	"  },\n"
	"  \"scalar\": {\n"
	"    \"dtype\": \"F8_E4M3\",\n"
	"    \"shape\": [],\n"
	"    \"sha256\": \"" ABC_SHA256 "\"\n"
	"  }\n"
	"}\n";
#define EXPECTED_TENSORS_JSON_SHA256 \
	"bfcc8dcc7d30a4d00ec09bb6e4ea0a6b7d7600d1cf30d14dff4f3bc8c41c3e43"

/* Sorted by byte order: upper case before lower case, whatever the locale. */
static const char expected_sums[] = ABC_SHA256 "  README\n" EMPTY_SHA256 "  config.json\n" ABC_SHA256
					       "  model0-mp1.safetensors\n" EXPECTED_TENSORS_JSON_SHA256
					       "  tensors.sha256.json\n";

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "manifest");
}

static void unhex(const char *hex, uint8_t out[32])
{
	for (int i = 0; i < 32; i++)
		sscanf(hex + 2 * i, "%2hhx", &out[i]);
}

static char *read_whole(const char *dir, const char *name)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	static char buf[8192];
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = '\0';
	return buf;
}

static void write_text(const char *dir, const char *name, const char *text)
{
	write_text_file(path_in(dir, name), text);
}

/* The tiny checkpoint: the files' real bytes go through the out_dir so sha256sum can check. */
static void write_tiny_checkpoint(const char *dir)
{
	manifest m;
	manifest_init(&m);
	uint8_t abc[32], empty[32];
	unhex(ABC_SHA256, abc);
	unhex(EMPTY_SHA256, empty);
	int64_t shape_embed[2] = { 4, 2 }, shape_scale[1] = { 1 };
	assert_int_equal(manifest_add_tensor(&m, "embed.weight", ST_BF16, 2, shape_embed, abc), 0);
	assert_int_equal(manifest_add_tensor(&m, "scalar", ST_F8_E4M3, 0, NULL, abc), 0);
	assert_int_equal(manifest_add_tensor(&m, "a.scale", ST_F32, 1, shape_scale, empty), 0);
	assert_int_equal(manifest_add_file(&m, "model0-mp1.safetensors", abc), 0);
	assert_int_equal(manifest_add_file(&m, "config.json", empty), 0);
	assert_int_equal(manifest_add_file(&m, "README", abc), 0);

	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "model0-mp1.safetensors", "abc", 3, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "config.json", "", 0, &err), 0);
	assert_int_equal(out_dir_write_file(&o, "README", "abc", 3, &err), 0);
	assert_int_equal(manifest_write(&m, &o, &err), 0);
	assert_int_equal(out_dir_commit(&o, &err), 0);
	out_dir_close(&o);
	manifest_free(&m);
}

static void test_manifest_writes_exact_texts(void **state)
{
	const char *dir = *state;
	write_tiny_checkpoint(dir);
	assert_string_equal(read_whole(dir, "tensors.sha256.json"), expected_tensors_json);
	assert_string_equal(read_whole(dir, "SHA256SUMS"), expected_sums);
}

static void test_manifest_passes_sha256sum_check(void **state)
{
	const char *dir = *state;
	write_tiny_checkpoint(dir);
	char cmd[4200];
	snprintf(cmd, sizeof cmd, "cd '%s' && sha256sum --quiet --strict -c SHA256SUMS", dir);
	assert_int_equal(system(cmd), 0);
}

static void test_manifest_reads_back_what_it_wrote(void **state)
{
	const char *dir = *state;
	write_tiny_checkpoint(dir);
	manifest m;
	dsv3_error err = { 0 };
	assert_int_equal(manifest_read(&m, dir, &err), 0);

	static const char *names[] = { "README", "config.json", "model0-mp1.safetensors",
				       "tensors.sha256.json" };
	static const char *hashes[] = { ABC_SHA256, EMPTY_SHA256, ABC_SHA256,
					EXPECTED_TENSORS_JSON_SHA256 };
	assert_int_equal(m.n_files, 4);
	for (size_t i = 0; i < 4; i++) {
		uint8_t h[32];
		unhex(hashes[i], h);
		assert_string_equal(m.files[i].name, names[i]);
		assert_memory_equal(m.files[i].sha256, h, 32);
	}

	uint8_t abc[32], empty[32];
	unhex(ABC_SHA256, abc);
	unhex(EMPTY_SHA256, empty);
	assert_int_equal(m.n_tensors, 3);
	assert_string_equal(m.tensors[0].name, "a.scale");
	assert_int_equal(m.tensors[0].dtype, ST_F32);
	assert_int_equal(m.tensors[0].ndim, 1);
	assert_int_equal(m.tensors[0].shape[0], 1);
	assert_memory_equal(m.tensors[0].sha256, empty, 32);
	assert_string_equal(m.tensors[1].name, "embed.weight");
	assert_int_equal(m.tensors[1].dtype, ST_BF16);
	assert_int_equal(m.tensors[1].ndim, 2);
	assert_int_equal(m.tensors[1].shape[0], 4);
	assert_int_equal(m.tensors[1].shape[1], 2);
	assert_memory_equal(m.tensors[1].sha256, abc, 32);
	assert_string_equal(m.tensors[2].name, "scalar");
	assert_int_equal(m.tensors[2].dtype, ST_F8_E4M3);
	assert_int_equal(m.tensors[2].ndim, 0);
	manifest_free(&m);
}

static void test_manifest_read_names_malformed_line(void **state)
{
	const char *dir = *state;
	write_tiny_checkpoint(dir);
	write_text(dir, "SHA256SUMS",
		   ABC_SHA256 "  README\n"
			      "not a checksum line\n");
	manifest m;
	dsv3_error err = { 0 };
	assert_int_equal(manifest_read(&m, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "SHA256SUMS:2"));

	write_text(dir, "SHA256SUMS", ABC_SHA256 " README\n"); /* one space only */
	assert_int_equal(manifest_read(&m, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "SHA256SUMS:1"));
}

static void test_manifest_read_refuses_duplicate_file(void **state)
{
	const char *dir = *state;
	write_tiny_checkpoint(dir);
	write_text(dir, "SHA256SUMS", ABC_SHA256 "  README\n" EMPTY_SHA256 "  README\n");
	manifest m;
	dsv3_error err = { 0 };
	assert_int_equal(manifest_read(&m, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "README"));
}

static void test_manifest_read_refuses_bad_tensor_entry(void **state)
{
	const char *dir = *state;
	write_tiny_checkpoint(dir);
	write_text(dir, "tensors.sha256.json",
		   "{\"w\": {\"dtype\": \"F12\", \"shape\": [1], \"sha256\": \"" ABC_SHA256 "\"}}\n");
	manifest m;
	dsv3_error err = { 0 };
	assert_int_equal(manifest_read(&m, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "tensors.sha256.json"));
	assert_non_null(strstr(err.msg, "F12"));
}

static void test_manifest_read_reports_missing_manifest(void **state)
{
	const char *dir = *state;
	manifest m;
	dsv3_error err = { 0 };
	assert_int_equal(manifest_read(&m, dir, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "SHA256SUMS"));
}

static void test_manifest_write_refuses_duplicate_tensor(void **state)
{
	const char *dir = *state;
	manifest m;
	manifest_init(&m);
	uint8_t h[32] = { 0 };
	int64_t shape[1] = { 2 };
	manifest_add_tensor(&m, "layers.0.attn.wq.weight", ST_BF16, 1, shape, h);
	manifest_add_tensor(&m, "layers.0.attn.wq.weight", ST_BF16, 1, shape, h);
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(manifest_write(&m, &o, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "layers.0.attn.wq.weight"));
	out_dir_close(&o);
	manifest_free(&m);
}

static void test_manifest_write_refuses_duplicate_file(void **state)
{
	const char *dir = *state;
	manifest m;
	manifest_init(&m);
	uint8_t h[32] = { 0 };
	manifest_add_file(&m, "model0-mp1.safetensors", h);
	manifest_add_file(&m, "model0-mp1.safetensors", h);
	out_dir o;
	dsv3_error err = { 0 };
	assert_int_equal(out_dir_open(&o, dir, &err), 0);
	assert_int_equal(manifest_write(&m, &o, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "model0-mp1.safetensors"));
	out_dir_close(&o);
	manifest_free(&m);
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_manifest_writes_exact_texts),
		T(test_manifest_passes_sha256sum_check),
		T(test_manifest_reads_back_what_it_wrote),
		T(test_manifest_read_names_malformed_line),
		T(test_manifest_read_refuses_duplicate_file),
		T(test_manifest_read_refuses_bad_tensor_entry),
		T(test_manifest_read_reports_missing_manifest),
		T(test_manifest_write_refuses_duplicate_tensor),
		T(test_manifest_write_refuses_duplicate_file),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
