/* config.json parsing: DeepSeek-V3 and V2 configs as released, dense defaults, and every
 * refusal naming the key at fault. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

/* Tests run from the repo root; ../shared holds the benchmark shape (DeepSeek-V3's widths). */
#define V3_CONFIG_PATH "../shared/bench/v3-width-2layer.config.json"

/* DeepSeek-V2-Lite's config.json as published (q_lora_rank null, no quantization_config). */
static const char v2_lite_config[] =
	"{\"architectures\": [\"DeepseekV2ForCausalLM\"], \"aux_loss_alpha\": 0.001,"
	" \"bos_token_id\": 100000, \"eos_token_id\": 100001, \"first_k_dense_replace\": 1,"
	" \"hidden_act\": \"silu\", \"hidden_size\": 2048, \"initializer_range\": 0.02,"
	" \"intermediate_size\": 10944, \"kv_lora_rank\": 512, \"max_position_embeddings\": 163840,"
	" \"model_type\": \"deepseek_v2\", \"moe_intermediate_size\": 1408, \"moe_layer_freq\": 1,"
	" \"n_group\": 1, \"n_routed_experts\": 64, \"n_shared_experts\": 2,"
	" \"norm_topk_prob\": false, \"num_attention_heads\": 16, \"num_experts_per_tok\": 6,"
	" \"num_hidden_layers\": 27, \"num_key_value_heads\": 16, \"pretraining_tp\": 1,"
	" \"q_lora_rank\": null, \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64,"
	" \"rms_norm_eps\": 1e-06, \"rope_scaling\": {\"beta_fast\": 32, \"beta_slow\": 1,"
	" \"factor\": 40, \"mscale\": 0.707, \"mscale_all_dim\": 0.707,"
	" \"original_max_position_embeddings\": 4096, \"type\": \"yarn\"}, \"rope_theta\": 10000,"
	" \"routed_scaling_factor\": 1.0, \"scoring_func\": \"softmax\", \"seq_aux\": true,"
	" \"tie_word_embeddings\": false, \"topk_group\": 1, \"topk_method\": \"greedy\","
	" \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.33.1\", \"use_cache\": true,"
	" \"v_head_dim\": 128, \"vocab_size\": 102400}";

/* A small dense model: no MoE keys, no rope_scaling. */
static const char dense_config[] =
	"{\"vocab_size\": 256, \"hidden_size\": 64.0, \"intermediate_size\": 128,"
	" \"num_hidden_layers\": 3, \"num_attention_heads\": 4, \"kv_lora_rank\": 32,"
	" \"qk_nope_head_dim\": 16, \"qk_rope_head_dim\": 8, \"v_head_dim\": 16,"
	" \"max_position_embeddings\": 2048, \"rope_scaling\": null, \"n_routed_experts\": null}";

static void test_config_reads_deepseek_v3(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(config_load(&c, V3_CONFIG_PATH, &err), 0);
	assert_string_equal(c.model_type, "deepseek_v3");
	assert_int_equal(c.vocab_size, 129280);
	assert_int_equal(c.dim, 7168);
	assert_int_equal(c.inter_dim, 18432);
	assert_int_equal(c.moe_inter_dim, 2048);
	assert_int_equal(c.n_layers, 2);
	assert_int_equal(c.n_dense_layers, 1);
	assert_int_equal(c.n_heads, 128);
	assert_int_equal(c.n_routed_experts, 128);
	assert_int_equal(c.n_shared_experts, 1);
	assert_int_equal(c.n_activated_experts, 8);
	assert_int_equal(c.n_expert_groups, 8);
	assert_int_equal(c.n_limited_groups, 4);
	assert_int_equal(c.score_sigmoid, 1);
	assert_int_equal(c.has_gate_bias, 1);
	assert_true(c.route_scale == 2.5);
	assert_int_equal(c.q_lora_rank, 1536);
	assert_int_equal(c.kv_lora_rank, 512);
	assert_int_equal(c.qk_nope_head_dim, 128);
	assert_int_equal(c.qk_rope_head_dim, 64);
	assert_int_equal(c.v_head_dim, 128);
	assert_true(c.rope_theta == 10000.0);
	assert_true(c.rope_factor == 40.0);
	assert_int_equal(c.original_seq_len, 4096);
	assert_true(c.beta_fast == 32.0);
	assert_true(c.beta_slow == 1.0);
	assert_true(c.mscale == 1.0);
	assert_int_equal(c.n_mtp_layers, 0);
	assert_int_equal(c.fp8, 1);
	assert_int_equal(c.block_rows, 128);
	assert_int_equal(c.block_cols, 128);
	assert_int_equal(c.scale_ue8m0, 0);
}

static void test_config_reads_deepseek_v2_lite(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(config_parse(&c, v2_lite_config, "v2.json", &err), 0);
	assert_string_equal(c.model_type, "deepseek_v2");
	assert_int_equal(c.q_lora_rank, 0);
	assert_int_equal(c.fp8, 0);
	assert_int_equal(c.scale_ue8m0, 0);
	assert_int_equal(c.score_sigmoid, 0);
	assert_int_equal(c.has_gate_bias, 0);
	assert_int_equal(c.n_routed_experts, 64);
	assert_int_equal(c.n_shared_experts, 2);
	assert_int_equal(c.n_activated_experts, 6);
	assert_int_equal(c.n_expert_groups, 1);
	assert_int_equal(c.n_limited_groups, 1);
	assert_int_equal(c.n_dense_layers, 1);
	assert_int_equal(c.n_layers, 27);
	assert_true(c.route_scale == 1.0);
	assert_true(c.mscale == 0.707);
	assert_true(c.rope_factor == 40.0);
	assert_int_equal(c.original_seq_len, 4096);
}

static void test_config_dense_model_defaults(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(config_parse(&c, dense_config, "dense.json", &err), 0);
	assert_int_equal(c.dim, 64); /* 64.0 is an integer */
	assert_int_equal(c.n_routed_experts, 0);
	assert_int_equal(c.n_dense_layers, 3);
	assert_int_equal(c.q_lora_rank, 0);
	assert_true(c.rope_theta == 10000.0);
	assert_true(c.rope_factor == 1.0);
	assert_int_equal(c.original_seq_len, 2048);
	assert_true(c.beta_fast == 32.0);
	assert_true(c.beta_slow == 1.0);
	assert_true(c.mscale == 1.0);
	assert_int_equal(c.fp8, 0);
	assert_int_equal(c.block_rows, 128);
	assert_int_equal(c.block_cols, 128);
	assert_string_equal(c.model_type, "");
}

/* The V3 config with one key replaced (value JSON text) or removed (value NULL). */
static char *v3_with(const char *key, const char *value_json)
{
	json_error_t jerr;
	json_t *root = json_load_file(V3_CONFIG_PATH, 0, &jerr);
	assert_non_null(root);
	json_t *obj = root;
	const char *dot = strchr(key, '.');
	char head[64];
	if (dot) { /* one level of nesting: "quantization_config.scale_fmt" */
		snprintf(head, sizeof head, "%.*s", (int)(dot - key), key);
		obj = json_object_get(root, head);
		key = dot + 1;
	}
	if (value_json)
		json_object_set_new(obj, key, json_loads(value_json, JSON_DECODE_ANY, &jerr));
	else
		json_object_del(obj, key);
	char *text = json_dumps(root, 0);
	json_decref(root);
	return text;
}

/* Parses the altered config and returns the result; err gets the message. */
static int parse_v3_with(dsv3_config *c, const char *key, const char *value, dsv3_error *err)
{
	char *text = v3_with(key, value);
	int rc = config_parse(c, text, "bad-config.json", err);
	free(text);
	return rc;
}

static void assert_refused(const char *key, const char *value, const char *named)
{
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(parse_v3_with(&c, key, value, &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "bad-config.json"));
	if (!strstr(err.msg, named))
		fail_msg("message \"%s\" does not name %s", err.msg, named);
}

static void test_config_refuses_missing_required_keys(void **state)
{
	(void)state;
	static const char *required[] = { "vocab_size", "hidden_size", "intermediate_size",
					  "num_hidden_layers", "num_attention_heads",
					  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
					  "v_head_dim", "moe_intermediate_size",
					  "num_experts_per_tok" };
	for (size_t i = 0; i < sizeof required / sizeof required[0]; i++)
		assert_refused(required[i], NULL, required[i]);
	assert_refused("hidden_size", "null", "hidden_size");
}

static void test_config_refuses_wrong_types(void **state)
{
	(void)state;
	assert_refused("hidden_size", "\"7168\"", "hidden_size");
	assert_refused("vocab_size", "129280.5", "vocab_size");
	assert_refused("num_attention_heads", "true", "num_attention_heads");
	assert_refused("routed_scaling_factor", "\"2.5\"", "routed_scaling_factor");
	assert_refused("scoring_func", "1", "scoring_func");
	assert_refused("scoring_func", "\"tanh\"", "scoring_func");
	assert_refused("rope_scaling", "[40]", "rope_scaling");
	assert_refused("quantization_config.weight_block_size", "[128]", "weight_block_size");
	assert_refused("hidden_size", "1e12", "hidden_size");
}

static void test_config_refuses_nonsense_values(void **state)
{
	(void)state;
	assert_refused("hidden_size", "0", "hidden_size");
	assert_refused("num_hidden_layers", "-2", "num_hidden_layers");
	assert_refused("q_lora_rank", "-1", "q_lora_rank");
	assert_refused("n_group", "3", "n_group");          /* 128 experts in 3 groups */
	assert_refused("topk_group", "9", "topk_group");    /* more than n_group (8) */
	assert_refused("num_experts_per_tok", "129", "num_experts_per_tok");
	assert_refused("first_k_dense_replace", "3", "first_k_dense_replace");
	assert_refused("quantization_config.weight_block_size", "[128, 0]", "weight_block_size");
}

static void test_config_reads_v3_1_ue8m0_scales(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(parse_v3_with(&c, "quantization_config.scale_fmt", "\"ue8m0\"", &err), 0);
	assert_int_equal(c.scale_ue8m0, 1);
	assert_int_equal(c.fp8, 1);
}

static void test_config_mscale_falls_back_to_rope_scaling_mscale(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	char *text = v3_with("rope_scaling.mscale_all_dim", NULL);
	json_error_t jerr;
	json_t *root = json_loads(text, 0, &jerr);
	json_object_set_new(json_object_get(root, "rope_scaling"), "mscale", json_real(0.5));
	free(text);
	text = json_dumps(root, 0);
	json_decref(root);
	assert_int_equal(config_parse(&c, text, "c.json", &err), 0);
	free(text);
	assert_true(c.mscale == 0.5);
}

/* The official demo's inference/configs/config_671B.json, as published. */
static const char demo_671b_config[] =
	"{\"vocab_size\": 129280, \"dim\": 7168, \"inter_dim\": 18432, \"moe_inter_dim\": 2048,"
	" \"n_layers\": 61, \"n_dense_layers\": 3, \"n_heads\": 128, \"n_routed_experts\": 256,"
	" \"n_shared_experts\": 1, \"n_activated_experts\": 8, \"n_expert_groups\": 8,"
	" \"n_limited_groups\": 4, \"route_scale\": 2.5, \"score_func\": \"sigmoid\","
	" \"q_lora_rank\": 1536, \"kv_lora_rank\": 512, \"qk_nope_head_dim\": 128,"
	" \"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"dtype\": \"fp8\"}";

static void test_config_reads_official_demo_format(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(config_parse(&c, demo_671b_config, "config_671B.json", &err), 0);
	assert_int_equal(c.vocab_size, 129280);
	assert_int_equal(c.dim, 7168);
	assert_int_equal(c.inter_dim, 18432);
	assert_int_equal(c.moe_inter_dim, 2048);
	assert_int_equal(c.n_layers, 61);
	assert_int_equal(c.n_dense_layers, 3);
	assert_int_equal(c.n_heads, 128);
	assert_int_equal(c.n_routed_experts, 256);
	assert_int_equal(c.n_shared_experts, 1);
	assert_int_equal(c.n_activated_experts, 8);
	assert_int_equal(c.n_expert_groups, 8);
	assert_int_equal(c.n_limited_groups, 4);
	assert_true(c.route_scale == 2.5);
	assert_int_equal(c.score_sigmoid, 1);
	assert_int_equal(c.has_gate_bias, 1); /* model.py: bias when dim == 7168 */
	assert_int_equal(c.q_lora_rank, 1536);
	assert_int_equal(c.kv_lora_rank, 512);
	assert_int_equal(c.fp8, 1);
	/* ModelArgs defaults for what the file leaves out */
	assert_true(c.rope_theta == 10000.0);
	assert_true(c.rope_factor == 40.0);
	assert_int_equal(c.original_seq_len, 4096);
	assert_true(c.beta_fast == 32.0);
	assert_true(c.beta_slow == 1.0);
	assert_true(c.mscale == 1.0);
	assert_int_equal(c.scale_ue8m0, 0);

	assert_int_equal(config_parse(&c, "{\"dim\": 64, \"n_expert_groups\": 5}", "d.json", &err),
			 DSV3_EDATA);
	assert_non_null(strstr(err.msg, "d.json"));
	assert_non_null(strstr(err.msg, "n_expert_groups")); /* the demo's own key name */
}

static void test_config_load_reports_missing_file(void **state)
{
	(void)state;
	dsv3_config c;
	dsv3_error err = { 0 };
	assert_int_equal(config_load(&c, "/nonexistent/config.json", &err), DSV3_EIO);
	assert_non_null(strstr(err.msg, "/nonexistent/config.json"));
	assert_int_equal(config_parse(&c, "{\"vocab_size\": 1,", "trunc.json", &err), DSV3_EDATA);
	assert_non_null(strstr(err.msg, "trunc.json"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_config_reads_deepseek_v3),
		cmocka_unit_test(test_config_reads_deepseek_v2_lite),
		cmocka_unit_test(test_config_dense_model_defaults),
		cmocka_unit_test(test_config_refuses_missing_required_keys),
		cmocka_unit_test(test_config_refuses_wrong_types),
		cmocka_unit_test(test_config_refuses_nonsense_values),
		cmocka_unit_test(test_config_reads_v3_1_ue8m0_scales),
		cmocka_unit_test(test_config_mscale_falls_back_to_rope_scaling_mscale),
		cmocka_unit_test(test_config_reads_official_demo_format),
		cmocka_unit_test(test_config_load_reports_missing_file),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
