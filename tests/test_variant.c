/* Naming the DeepSeek variant (issue 7 §5): each release's config.json (and, for V3.2-Exp, its
 * indexer tensors) named as the rules say: V2-Lite 27 layers / hidden 2048 / 64
 * experts, V2 and V2.5 60 / 5120 / 160 (their configs are alike), V3 and R1 61 / 7168 / 256
 * (alike too), V3.1 by its ue8m0 scales, V3.2-Exp by its model_type or its ".indexer."
 * tensors; anything else "unknown". Then dsv3-verify ckpt printing the name. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "support/test_support.h"
#include "variant.h"

static int make_tmp(void **state)
{
	return tmp_dir_setup(state, "variant");
}

/* The keys each release's config.json carries that the rules could look at (trimmed: the
 * rest do not differ between the releases named together). */
#define V2_LITE_CONFIG                                                                         \
	"{\"architectures\":[\"DeepseekV2ForCausalLM\"],\"model_type\":\"deepseek_v2\","       \
	"\"hidden_size\":2048,\"num_hidden_layers\":27,\"n_routed_experts\":64,"               \
	"\"n_shared_experts\":2,\"num_experts_per_tok\":6,\"q_lora_rank\":null,"               \
	"\"kv_lora_rank\":512,\"topk_method\":\"greedy\",\"vocab_size\":102400}"
#define V2_CONFIG                                                                              \
	"{\"architectures\":[\"DeepseekV2ForCausalLM\"],\"model_type\":\"deepseek_v2\","       \
	"\"hidden_size\":5120,\"num_hidden_layers\":60,\"n_routed_experts\":160,"              \
	"\"n_shared_experts\":2,\"num_experts_per_tok\":6,\"q_lora_rank\":1536,"               \
	"\"kv_lora_rank\":512,\"topk_method\":\"group_limited_greedy\",\"vocab_size\":102400}"
#define V3_QUANT                                                                               \
	"\"quantization_config\":{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\","          \
	"\"quant_method\":\"fp8\",\"weight_block_size\":[128,128]}"
#define V31_QUANT                                                                              \
	"\"quantization_config\":{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\","          \
	"\"quant_method\":\"fp8\",\"scale_fmt\":\"ue8m0\",\"weight_block_size\":[128,128]}"
#define V3_SHAPE                                                                               \
	"\"hidden_size\":7168,\"num_hidden_layers\":61,\"n_routed_experts\":256,"              \
	"\"n_shared_experts\":1,\"num_experts_per_tok\":8,\"q_lora_rank\":1536,"               \
	"\"kv_lora_rank\":512,\"topk_method\":\"noaux_tc\",\"vocab_size\":129280"
#define V3_CONFIG                                                                              \
	"{\"architectures\":[\"DeepseekV3ForCausalLM\"],\"model_type\":\"deepseek_v3\","       \
	V3_SHAPE "," V3_QUANT "}"
#define V31_CONFIG                                                                             \
	"{\"architectures\":[\"DeepseekV3ForCausalLM\"],\"model_type\":\"deepseek_v3\","       \
	V3_SHAPE "," V31_QUANT "}"
#define V32_CONFIG                                                                             \
	"{\"architectures\":[\"DeepseekV32ForCausalLM\"],\"model_type\":\"deepseek_v32\","     \
	V3_SHAPE ",\"index_head_dim\":128,\"index_n_heads\":64,\"index_topk\":2048,"          \
	V31_QUANT "}"

/* The variant named by config.json `text`, written to a file and read back, with `names`
 * (NULL-terminated, may be NULL) noted as the checkpoint's tensors. */
static const char *name_of(const char *tmp, const char *text, const char *const *names)
{
	const char *path = fresh_path(tmp, "config.json");
	write_text_file(path, text);
	variant_facts f;
	dsv3_error err = { 0 };
	assert_int_equal(variant_facts_load(&f, path, &err), 0);
	for (size_t i = 0; names && names[i]; i++)
		variant_facts_note_tensor(&f, names[i]);
	return variant_name(&f);
}

static const char *const v3_names[] = {
	"model.embed_tokens.weight",
	"model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
	"model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
	NULL,
};

static void test_variant_names_v2_lite(void **state)
{
	assert_string_equal(name_of(*state, V2_LITE_CONFIG, NULL), "V2-Lite");
}

static void test_variant_names_v2_and_v25_together(void **state)
{
	assert_string_equal(name_of(*state, V2_CONFIG, NULL), "V2 / V2.5");
}

static void test_variant_names_v3_and_r1_together(void **state)
{
	assert_string_equal(name_of(*state, V3_CONFIG, v3_names), "V3 / R1");
}

/* A BF16 V3 (dsv3-fp8-to-bf16's output has no quantization_config) is still V3 / R1. */
static void test_variant_names_bf16_v3(void **state)
{
	const char *bf16 = "{\"architectures\":[\"DeepseekV3ForCausalLM\"],"
			   "\"model_type\":\"deepseek_v3\"," V3_SHAPE "}";
	assert_string_equal(name_of(*state, bf16, NULL), "V3 / R1");
}

static void test_variant_names_v31_by_ue8m0_scales(void **state)
{
	assert_string_equal(name_of(*state, V31_CONFIG, v3_names), "V3.1");
}

static void test_variant_names_v32_exp_by_its_config(void **state)
{
	assert_string_equal(name_of(*state, V32_CONFIG, NULL), "V3.2-Exp");
}

/* A V3 config beside V3.2-Exp's indexer tensors, in HF or converted names: the tensors say
 * V3.2-Exp, ue8m0 or not. */
static void test_variant_names_v32_exp_by_indexer_tensors(void **state)
{
	static const char *const hf[] = {
		"model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
		"model.layers.0.self_attn.indexer.wq_b.weight",
		"model.layers.0.self_attn.indexer.wq_b.weight_scale_inv",
		"model.layers.0.self_attn.indexer.wk.weight",
		"model.layers.0.self_attn.indexer.k_norm.weight",
		"model.layers.0.self_attn.indexer.k_norm.bias",
		"model.layers.0.self_attn.indexer.weights_proj.weight",
		NULL,
	};
	static const char *const converted[] = {
		"layers.0.attn.wkv_a.weight",
		"layers.0.attn.indexer.weights_proj.weight",
		NULL,
	};
	assert_string_equal(name_of(*state, V3_CONFIG, hf), "V3.2-Exp");
	assert_string_equal(name_of(*state, V31_CONFIG, hf), "V3.2-Exp");
	assert_string_equal(name_of(*state, V3_CONFIG, converted), "V3.2-Exp");
}

/* Without model_type, architectures[0] says the family. */
static void test_variant_uses_architecture_without_model_type(void **state)
{
	const char *text = "{\"architectures\":[\"DeepseekV3ForCausalLM\"]," V3_SHAPE "}";
	assert_string_equal(name_of(*state, text, NULL), "V3 / R1");
}

static void test_variant_unknown_model_type_is_unknown(void **state)
{
	/* V3's shape and class under another model_type is another model. */
	const char *other = "{\"architectures\":[\"DeepseekV3ForCausalLM\"],"
			    "\"model_type\":\"llama\"," V3_SHAPE "," V31_QUANT "}";
	assert_string_equal(name_of(*state, other, NULL), "unknown");
	/* A later DeepSeek (V4) carries index_* keys too, but is none of the known variants. */
	const char *v4 = "{\"architectures\":[\"DeepseekV4ForCausalLM\"],"
			 "\"model_type\":\"deepseek_v4\",\"hidden_size\":7168,"
			 "\"num_hidden_layers\":61,\"n_routed_experts\":384,\"index_topk\":1024}";
	assert_string_equal(name_of(*state, v4, NULL), "unknown");
	assert_string_equal(name_of(*state, "{}", NULL), "unknown");
}

/* The family alone is not a release: other shapes are "unknown". */
static void test_variant_unreleased_shapes_are_unknown(void **state)
{
	const char *v3_small = "{\"model_type\":\"deepseek_v3\",\"hidden_size\":7168,"
			       "\"num_hidden_layers\":4,\"n_routed_experts\":256}";
	assert_string_equal(name_of(*state, v3_small, NULL), "unknown");
	/* V2-Lite's layer count with V2's widths */
	const char *mixed = "{\"model_type\":\"deepseek_v2\",\"hidden_size\":5120,"
			    "\"num_hidden_layers\":27,\"n_routed_experts\":160}";
	assert_string_equal(name_of(*state, mixed, NULL), "unknown");
	/* V3's shape under V2's model_type */
	const char *v2_v3shape = "{\"model_type\":\"deepseek_v2\"," V3_SHAPE "}";
	assert_string_equal(name_of(*state, v2_v3shape, NULL), "unknown");
}

static void test_variant_refuses_invalid_json_naming_it(void **state)
{
	variant_facts f;
	dsv3_error err = { 0 };
	assert_int_equal(variant_facts_parse(&f, "{\"model_type\":", "cfg.json", &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "cfg.json"));
	assert_int_equal(variant_facts_parse(&f, "[1]", "cfg.json", &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "cfg.json"));
	const char *missing = path_in(*state, "nothing.json");
	assert_int_equal(variant_facts_load(&f, missing, &err), DSV3_EIO);
	assert_non_null(strstr(err.msg, missing));
}

/* ---- dsv3-verify ckpt ---- */

static int verify_ckpt(const char *tmp, const char *dir)
{
	return run_shell("%s/dsv3-verify ckpt %s >%s 2>%s", bin_dir(), dir,
			 path_in(tmp, "stdout"), path_in(tmp, "stderr"));
}

/* Sets quantization_config.scale_fmt = "ue8m0" in dir/config.json, as V3.1 ships it. */
static void make_ue8m0(const char *dir)
{
	const char *path = path_in(dir, "config.json");
	json_error_t jerr;
	json_t *cfg = json_load_file(path, 0, &jerr);
	assert_non_null(cfg);
	json_t *q = json_object_get(cfg, "quantization_config");
	assert_non_null(q);
	assert_int_equal(json_object_set_new(q, "scale_fmt", json_string("ue8m0")), 0);
	assert_int_equal(json_dump_file(cfg, path, JSON_INDENT(2)), 0);
	json_decref(cfg);
}

/* The synthetic presets are V2/V3 structures at toy widths: no release, so "unknown". */
static void test_verify_ckpt_prints_unknown_for_toy_shapes(void **state)
{
	const char *tmp = *state;
	static const char *presets[] = { "tiny", "tiny-v2" };
	for (int i = 0; i < 2; i++) {
		const char *dir = fresh_path(tmp, presets[i]);
		assert_int_equal(run_synth(presets[i], 1, "--files 1", dir), 0);
		assert_int_equal(verify_ckpt(tmp, dir), 0);
		assert_file_contains(path_in(tmp, "stdout"), "variant: unknown\n");
	}
}

static void test_verify_ckpt_prints_v31_for_ue8m0_scales(void **state)
{
	const char *tmp = *state;
	const char *dir = fresh_path(tmp, "v31");
	assert_int_equal(run_synth("tiny", 1, "--files 1", dir), 0);
	make_ue8m0(dir);
	assert_int_equal(verify_ckpt(tmp, dir), 0);
	assert_file_contains(path_in(tmp, "stdout"), "variant: V3.1\n");
}

/* V3.2-Exp's indexer tensors beside a V3 config: named V3.2-Exp, and the name is printed even
 * though the structure check (which has no rule for them) fails. */
static void test_verify_ckpt_prints_v32_exp_for_indexer_tensors(void **state)
{
	const char *tmp = *state;
	const char *dir = fresh_path(tmp, "v32");
	assert_int_equal(run_synth("tiny", 1, "--files 1", dir), 0);
	static const uint16_t zeros[16];
	const st_spec specs[] = {
		{ .name = "model.layers.0.self_attn.indexer.wk.weight", .dtype = ST_BF16,
		  .ndim = 2, .shape = { 4, 4 } },
		{ .name = "model.layers.0.self_attn.indexer.k_norm.weight", .dtype = ST_BF16,
		  .ndim = 1, .shape = { 4 } },
	};
	const void *const data[] = { zeros, zeros };
	write_safetensors(path_in(dir, "indexer.safetensors"), specs, data, 2);
	assert_int_equal(verify_ckpt(tmp, dir), 2);
	assert_file_contains(path_in(tmp, "stdout"), "variant: V3.2-Exp\n");
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_tmp, tmp_dir_teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_variant_names_v2_lite),
		T(test_variant_names_v2_and_v25_together),
		T(test_variant_names_v3_and_r1_together),
		T(test_variant_names_bf16_v3),
		T(test_variant_names_v31_by_ue8m0_scales),
		T(test_variant_names_v32_exp_by_its_config),
		T(test_variant_names_v32_exp_by_indexer_tensors),
		T(test_variant_uses_architecture_without_model_type),
		T(test_variant_unknown_model_type_is_unknown),
		T(test_variant_unreleased_shapes_are_unknown),
		T(test_variant_refuses_invalid_json_naming_it),
		T(test_verify_ckpt_prints_unknown_for_toy_shapes),
		T(test_verify_ckpt_prints_v31_for_ue8m0_scales),
		T(test_verify_ckpt_prints_v32_exp_for_indexer_tensors),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
