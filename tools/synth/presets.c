/* Named configs. Key order follows DeepSeek's own config.json, so a preset's file reads like
 * the real one; every preset is a deepseek_v2/v3 config that transformers can load. */
#include "presets.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

const char *const synth_preset_help[] = {
	"tiny        DeepSeek-V3 structure at toy width: 3 layers (1 dense), 16 experts, FP8, ~10 MB",
	"tiny-v2     DeepSeek-V2 style: q_proj (no q_lora), softmax/greedy routing, no bias, BF16, 2 layers",
	"v3-width:L  DeepSeek-V3's real widths with L layers (256 experts, FP8; v3-width:2 is ~15 GB)",
	NULL,
};

/* The numbers that differ between presets. */
typedef struct {
	const char *model_type, *architecture;
	int vocab, hidden, inter, moe_inter, layers, dense_layers, heads;
	int routed, shared, per_token, n_group, topk_group;
	double route_scale;
	int softmax;   /* scoring_func softmax + topk_method greedy, else sigmoid + noaux_tc */
	int norm_topk;
	int q_lora;    /* 0: null */
	int kv_lora, nope, rope, v_head, max_pos;
	int fp8;
} preset_values;

static const preset_values tiny = {
	.model_type = "deepseek_v3", .architecture = "DeepseekV3ForCausalLM",
	.vocab = 1024, .hidden = 256, .inter = 512, .moe_inter = 256, .layers = 3,
	.dense_layers = 1, .heads = 8, .routed = 16, .shared = 2, .per_token = 4, .n_group = 4,
	.topk_group = 2, .route_scale = 2.5, .softmax = 0, .norm_topk = 1, .q_lora = 192,
	.kv_lora = 128, .nope = 64, .rope = 64, .v_head = 64, .max_pos = 16384, .fp8 = 1,
};

static const preset_values v3_width = {
	.model_type = "deepseek_v3", .architecture = "DeepseekV3ForCausalLM",
	.vocab = 129280, .hidden = 7168, .inter = 18432, .moe_inter = 2048, .layers = 61,
	.dense_layers = 3, .heads = 128, .routed = 256, .shared = 1, .per_token = 8, .n_group = 8,
	.topk_group = 4, .route_scale = 2.5, .softmax = 0, .norm_topk = 1, .q_lora = 1536,
	.kv_lora = 512, .nope = 128, .rope = 64, .v_head = 128, .max_pos = 163840, .fp8 = 1,
};

/* A dict under construction; `failed` remembers an allocation failure on the way so the
 * builders need not check each key. */
typedef struct {
	json_t *o;
	int failed;
} dict_builder;

/* Sets a key; jansson steals the value (and fails on a NULL one). */
static void set(dict_builder *b, const char *key, json_t *v)
{
	if (json_object_set_new(b->o, key, v) != 0)
		b->failed = 1;
}

static json_t *yarn_rope_scaling(void)
{
	return json_pack("{s:s, s:i, s:i, s:i, s:i, s:f, s:f}", "type", "yarn", "factor", 40,
			 "original_max_position_embeddings", 4096, "beta_fast", 32, "beta_slow",
			 1, "mscale", 1.0, "mscale_all_dim", 1.0);
}

static json_t *fp8_quantization_config(void)
{
	return json_pack("{s:s, s:s, s:s, s:[i,i]}", "activation_scheme", "dynamic", "fmt", "e4m3",
			 "quant_method", "fp8", "weight_block_size", 128, 128);
}

static void set_moe(dict_builder *o, const preset_values *p)
{
	set(o, "n_routed_experts", json_integer(p->routed));
	set(o, "n_shared_experts", json_integer(p->shared));
	set(o, "num_experts_per_tok", json_integer(p->per_token));
	set(o, "n_group", json_integer(p->n_group));
	set(o, "topk_group", json_integer(p->topk_group));
	set(o, "routed_scaling_factor", json_real(p->route_scale));
	set(o, "scoring_func", json_string(p->softmax ? "softmax" : "sigmoid"));
	set(o, "topk_method", json_string(p->softmax ? "greedy" : "noaux_tc"));
	set(o, "norm_topk_prob", json_boolean(p->norm_topk));
}

static void set_attention(dict_builder *o, const preset_values *p)
{
	set(o, "q_lora_rank", p->q_lora ? json_integer(p->q_lora) : json_null());
	set(o, "kv_lora_rank", json_integer(p->kv_lora));
	set(o, "qk_nope_head_dim", json_integer(p->nope));
	set(o, "qk_rope_head_dim", json_integer(p->rope));
	set(o, "v_head_dim", json_integer(p->v_head));
	set(o, "rope_theta", json_integer(10000));
	set(o, "max_position_embeddings", json_integer(p->max_pos));
	set(o, "rms_norm_eps", json_real(1e-6));
	set(o, "rope_scaling", yarn_rope_scaling());
}

static json_t *preset_json(const preset_values *p)
{
	dict_builder b = { .o = json_object() }, *o = &b;
	if (!b.o)
		return NULL;
	set(o, "architectures", json_pack("[s]", p->architecture));
	set(o, "model_type", json_string(p->model_type));
	set(o, "vocab_size", json_integer(p->vocab));
	set(o, "hidden_size", json_integer(p->hidden));
	set(o, "intermediate_size", json_integer(p->inter));
	set(o, "moe_intermediate_size", json_integer(p->moe_inter));
	set(o, "num_hidden_layers", json_integer(p->layers));
	set(o, "first_k_dense_replace", json_integer(p->dense_layers));
	set(o, "num_attention_heads", json_integer(p->heads));
	set(o, "num_key_value_heads", json_integer(p->heads));
	set_moe(o, p);
	set_attention(o, p);
	set(o, "num_nextn_predict_layers", json_integer(0));
	set(o, "tie_word_embeddings", json_false());
	set(o, "torch_dtype", json_string("bfloat16"));
	set(o, "bos_token_id", json_integer(0));
	set(o, "eos_token_id", json_integer(1));
	set(o, "hidden_act", json_string("silu"));
	set(o, "attention_bias", json_false());
	if (p->fp8)
		set(o, "quantization_config", fp8_quantization_config());
	if (b.failed) {
		json_decref(b.o);
		return NULL;
	}
	return b.o;
}

/* "v3-width:L" -> L in [1, 100000); -1 when `name` is not of that form. */
static int v3_width_layers(const char *name)
{
	static const char prefix[] = "v3-width:";
	if (strncmp(name, prefix, sizeof prefix - 1) != 0)
		return -1;
	const char *s = name + sizeof prefix - 1;
	if (*s < '0' || *s > '9')
		return -1;
	char *end;
	errno = 0;
	long l = strtol(s, &end, 10);
	if (errno || *end || l < 1 || l >= 100000)
		return -1;
	return (int)l;
}

int synth_preset(const char *name, json_t **config, int *is_tiny, dsv3_error *err)
{
	preset_values p;
	int layers = v3_width_layers(name);
	*config = NULL;
	*is_tiny = 0;
	if (strcmp(name, "tiny") == 0) {
		p = tiny;
		*is_tiny = 1;
	} else if (strcmp(name, "tiny-v2") == 0) {
		p = tiny;
		p.model_type = "deepseek_v2";
		p.architecture = "DeepseekV2ForCausalLM";
		p.q_lora = 0;
		p.softmax = 1;
		p.n_group = 1;
		p.topk_group = 1;
		p.norm_topk = 0;
		p.route_scale = 1.0;
		p.fp8 = 0;
		p.layers = 2;
		*is_tiny = 1;
	} else if (layers > 0) {
		p = v3_width;
		p.layers = layers;
		/* DeepSeek-V3's 3 dense layers, but keep at least one MoE layer when L >= 2 */
		p.dense_layers = layers == 1 ? 1 : (layers - 1 < 3 ? layers - 1 : 3);
	} else {
		return dsv3_fail(err, DSV3_EUSAGE,
				 "unknown preset \"%s\" (known: tiny, tiny-v2, v3-width:L)", name);
	}
	*config = preset_json(&p);
	if (!*config)
		return dsv3_fail(err, DSV3_EIO, "preset %s: out of memory", name);
	return 0;
}

int synth_config_override(json_t *config, const char *dtype, int mtp, dsv3_error *err)
{
	int rc = 0;
	if (dtype && strcmp(dtype, "bf16") == 0) {
		json_object_del(config, "quantization_config");
	} else if (dtype && strcmp(dtype, "fp8") == 0) {
		/* An existing FP8 config (e.g. a V3.1 ue8m0 one) is kept as it is. */
		json_t *q = json_object_get(config, "quantization_config");
		if (!json_is_object(q))
			rc = json_object_set_new(config, "quantization_config",
						 fp8_quantization_config());
	} else if (dtype) {
		return dsv3_fail(err, DSV3_EUSAGE, "--dtype must be fp8 or bf16, not \"%s\"", dtype);
	}
	if (!rc && mtp) {
		json_int_t n = json_integer_value(json_object_get(config, "num_nextn_predict_layers"));
		if (n < 1)
			rc = json_object_set_new(config, "num_nextn_predict_layers", json_integer(1));
	}
	if (rc)
		return dsv3_fail(err, DSV3_EIO, "config: out of memory");
	return 0;
}
