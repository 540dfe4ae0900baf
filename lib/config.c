/* Parses a Hugging Face config.json of the DeepSeek-V2/V3 family (DESIGN §4 maps the keys), or
 * the official demo's own config (config_671B.json: "dim", "n_layers", ...). */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A key lookup that treats JSON null like an absent key, as transformers does. */
static json_t *get(json_t *obj, const char *key)
{
	json_t *v = json_object_get(obj, key);
	return json_is_null(v) ? NULL : v;
}

/* Integers may be written as reals with an integral value (e.g. 128.0). */
static int int_value(json_t *v, const char *key, int *out, const char *label, dsv3_error *err)
{
	double x;
	if (json_is_integer(v))
		x = (double)json_integer_value(v);
	else if (json_is_real(v))
		x = json_real_value(v);
	else
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be an integer", label, key);
	if (x != floor(x) || x < -2147483648.0 || x > 2147483647.0)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be an integer (got %g)", label,
				 key, x);
	*out = (int)x;
	return 0;
}

static int read_int(json_t *obj, const char *key, int required, int dflt, int *out,
		    const char *label, dsv3_error *err)
{
	json_t *v = get(obj, key);
	if (!v) {
		if (required)
			return dsv3_fail(err, DSV3_EDATA, "%s: missing key \"%s\"", label, key);
		*out = dflt;
		return 0;
	}
	return int_value(v, key, out, label, err);
}

static int read_double(json_t *obj, const char *key, double dflt, double *out, const char *label,
		       dsv3_error *err)
{
	json_t *v = get(obj, key);
	if (!v) {
		*out = dflt;
		return 0;
	}
	if (!json_is_number(v))
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be a number", label, key);
	*out = json_number_value(v);
	if (!isfinite(*out))
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be finite", label, key);
	return 0;
}

/* *out points into the JSON tree (valid while it lives). */
static int read_string(json_t *obj, const char *key, const char *dflt, const char **out,
		       const char *label, dsv3_error *err)
{
	json_t *v = get(obj, key);
	if (!v) {
		*out = dflt;
		return 0;
	}
	if (!json_is_string(v))
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be a string", label, key);
	*out = json_string_value(v);
	return 0;
}

static int need_min(int value, int min, const char *key, const char *label, dsv3_error *err)
{
	if (value < min)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be at least %d (got %d)", label,
				 key, min, value);
	return 0;
}

static int parse_dims(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	static const struct {
		const char *key;
		size_t off;
	} required[] = {
		{ "vocab_size", offsetof(dsv3_config, vocab_size) },
		{ "hidden_size", offsetof(dsv3_config, dim) },
		{ "intermediate_size", offsetof(dsv3_config, inter_dim) },
		{ "num_hidden_layers", offsetof(dsv3_config, n_layers) },
		{ "num_attention_heads", offsetof(dsv3_config, n_heads) },
		{ "kv_lora_rank", offsetof(dsv3_config, kv_lora_rank) },
		{ "qk_nope_head_dim", offsetof(dsv3_config, qk_nope_head_dim) },
		{ "qk_rope_head_dim", offsetof(dsv3_config, qk_rope_head_dim) },
		{ "v_head_dim", offsetof(dsv3_config, v_head_dim) },
	};
	for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
		int *field = (int *)((char *)c + required[i].off);
		int rc = read_int(root, required[i].key, 1, 0, field, label, err);
		if (!rc)
			rc = need_min(*field, 1, required[i].key, label, err);
		if (rc)
			return rc;
	}
	int rc = read_int(root, "q_lora_rank", 0, 0, &c->q_lora_rank, label, err);
	if (!rc)
		rc = need_min(c->q_lora_rank, 0, "q_lora_rank", label, err);
	if (!rc)
		rc = read_int(root, "num_nextn_predict_layers", 0, 0, &c->n_mtp_layers, label, err);
	if (!rc)
		rc = need_min(c->n_mtp_layers, 0, "num_nextn_predict_layers", label, err);
	return rc;
}

/* A dense model: every layer uses the dense MLP. */
static void set_no_moe(dsv3_config *c)
{
	c->n_routed_experts = 0;
	c->n_shared_experts = 0;
	c->n_activated_experts = 0;
	c->n_expert_groups = 1;
	c->n_limited_groups = 1;
	c->moe_inter_dim = 0;
	c->n_dense_layers = c->n_layers;
	c->route_scale = 1.0;
	c->score_sigmoid = 0;
	c->has_gate_bias = 0;
}

static int parse_moe_ints(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	int rc = read_int(root, "moe_intermediate_size", 1, 0, &c->moe_inter_dim, label, err);
	if (!rc)
		rc = need_min(c->moe_inter_dim, 1, "moe_intermediate_size", label, err);
	if (!rc)
		rc = read_int(root, "n_shared_experts", 0, 0, &c->n_shared_experts, label, err);
	if (!rc)
		rc = need_min(c->n_shared_experts, 0, "n_shared_experts", label, err);
	if (!rc)
		rc = read_int(root, "num_experts_per_tok", 1, 0, &c->n_activated_experts, label, err);
	if (!rc)
		rc = need_min(c->n_activated_experts, 1, "num_experts_per_tok", label, err);
	if (!rc)
		rc = read_int(root, "n_group", 0, 1, &c->n_expert_groups, label, err);
	if (!rc)
		rc = need_min(c->n_expert_groups, 1, "n_group", label, err);
	if (!rc)
		rc = read_int(root, "topk_group", 0, c->n_expert_groups, &c->n_limited_groups, label,
			      err);
	if (!rc)
		rc = need_min(c->n_limited_groups, 1, "topk_group", label, err);
	if (!rc)
		rc = read_int(root, "first_k_dense_replace", 0, 0, &c->n_dense_layers, label, err);
	if (!rc)
		rc = need_min(c->n_dense_layers, 0, "first_k_dense_replace", label, err);
	return rc;
}

/* The keys check_moe names in its messages: the HF config's or the demo's. */
struct moe_keys {
	const char *groups, *limited, *activated, *routed, *dense, *layers;
};
static const struct moe_keys hf_keys = { "n_group", "topk_group", "num_experts_per_tok",
					 "n_routed_experts", "first_k_dense_replace",
					 "num_hidden_layers" };
static const struct moe_keys demo_keys = { "n_expert_groups", "n_limited_groups",
					   "n_activated_experts", "n_routed_experts",
					   "n_dense_layers", "n_layers" };

/* Relations between the MoE keys that the gate (DESIGN §4) relies on. */
static int check_moe(const dsv3_config *c, const struct moe_keys *k, const char *label,
		     dsv3_error *err)
{
	if (c->n_routed_experts % c->n_expert_groups)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" (%d) does not divide %s (%d)",
				 label, k->groups, c->n_expert_groups, k->routed,
				 c->n_routed_experts);
	if (c->n_limited_groups > c->n_expert_groups)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" (%d) is larger than %s (%d)",
				 label, k->limited, c->n_limited_groups, k->groups,
				 c->n_expert_groups);
	if (c->n_activated_experts > c->n_routed_experts)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" (%d) is larger than %s (%d)",
				 label, k->activated, c->n_activated_experts, k->routed,
				 c->n_routed_experts);
	int reachable = c->n_routed_experts / c->n_expert_groups * c->n_limited_groups;
	if (c->n_activated_experts > reachable)
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: key \"%s\" (%d) is larger than the %d experts in %s groups",
				 label, k->activated, c->n_activated_experts, reachable, k->limited);
	if (c->n_dense_layers > c->n_layers)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" (%d) is larger than %s (%d)",
				 label, k->dense, c->n_dense_layers, k->layers, c->n_layers);
	return 0;
}

static int parse_gate(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	const char *scoring, *topk_method;
	int rc = read_double(root, "routed_scaling_factor", 1.0, &c->route_scale, label, err);
	if (!rc)
		rc = read_string(root, "scoring_func", "softmax", &scoring, label, err);
	if (!rc)
		rc = read_string(root, "topk_method", "greedy", &topk_method, label, err);
	if (rc)
		return rc;
	if (strcmp(scoring, "sigmoid") && strcmp(scoring, "softmax"))
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: key \"scoring_func\" must be \"softmax\" or \"sigmoid\" (got "
				 "\"%s\")",
				 label, scoring);
	c->score_sigmoid = strcmp(scoring, "sigmoid") == 0;
	c->has_gate_bias = strcmp(topk_method, "noaux_tc") == 0;
	return 0;
}

static int parse_moe(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	int rc = read_int(root, "n_routed_experts", 0, 0, &c->n_routed_experts, label, err);
	if (!rc)
		rc = need_min(c->n_routed_experts, 0, "n_routed_experts", label, err);
	if (rc)
		return rc;
	if (c->n_routed_experts == 0) {
		set_no_moe(c);
		return 0;
	}
	rc = parse_moe_ints(c, root, label, err);
	if (!rc)
		rc = check_moe(c, &hf_keys, label, err);
	if (!rc)
		rc = parse_gate(c, root, label, err);
	return rc;
}

static int parse_rope(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	int max_pos;
	int rc = read_double(root, "rope_theta", 10000.0, &c->rope_theta, label, err);
	if (!rc && c->rope_theta <= 0)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: key \"rope_theta\" must be positive", label);
	if (!rc)
		rc = read_int(root, "max_position_embeddings", 0, 4096, &max_pos, label, err);
	if (!rc)
		rc = need_min(max_pos, 1, "max_position_embeddings", label, err);
	if (rc)
		return rc;
	json_t *rs = get(root, "rope_scaling");
	if (rs && !json_is_object(rs))
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"rope_scaling\" must be an object", label);
	double mscale;
	rc = read_double(rs, "factor", 1.0, &c->rope_factor, label, err);
	if (!rc && c->rope_factor <= 0)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: key \"rope_scaling.factor\" must be positive",
			       label);
	if (!rc)
		rc = read_int(rs, "original_max_position_embeddings", 0, max_pos, &c->original_seq_len,
			      label, err);
	if (!rc)
		rc = need_min(c->original_seq_len, 1, "original_max_position_embeddings", label, err);
	if (!rc)
		rc = read_double(rs, "beta_fast", 32.0, &c->beta_fast, label, err);
	if (!rc)
		rc = read_double(rs, "beta_slow", 1.0, &c->beta_slow, label, err);
	/* model.py uses mscale_all_dim; every release sets mscale to the same value. */
	if (!rc)
		rc = read_double(rs, "mscale", 1.0, &mscale, label, err);
	if (!rc)
		rc = read_double(rs, "mscale_all_dim", mscale, &c->mscale, label, err);
	return rc;
}

static int parse_quant(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	c->block_rows = c->block_cols = 128;
	json_t *q = get(root, "quantization_config");
	if (!q)
		return 0;
	if (!json_is_object(q))
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"quantization_config\" must be an object",
				 label);
	const char *fmt, *method, *scale_fmt;
	int rc = read_string(q, "fmt", "", &fmt, label, err);
	if (!rc)
		rc = read_string(q, "quant_method", "", &method, label, err);
	if (!rc)
		rc = read_string(q, "scale_fmt", "", &scale_fmt, label, err);
	if (rc)
		return rc;
	c->fp8 = strcmp(fmt, "e4m3") == 0 || strcmp(method, "fp8") == 0;
	c->scale_ue8m0 = strcmp(scale_fmt, "ue8m0") == 0;
	json_t *bs = get(q, "weight_block_size");
	if (!bs)
		return 0;
	if (!json_is_array(bs) || json_array_size(bs) != 2)
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: key \"weight_block_size\" must be an array of two integers",
				 label);
	rc = int_value(json_array_get(bs, 0), "weight_block_size", &c->block_rows, label, err);
	if (!rc)
		rc = int_value(json_array_get(bs, 1), "weight_block_size", &c->block_cols, label, err);
	if (!rc && (c->block_rows < 1 || c->block_cols < 1))
		rc = dsv3_fail(err, DSV3_EDATA,
			       "%s: key \"weight_block_size\" must hold positive integers", label);
	return rc;
}

/* The official demo's config (inference/configs/config_671B.json: "dim", "n_layers", ...).
 * Absent keys take model.py's ModelArgs defaults, as the demo does. */
static int parse_demo(dsv3_config *c, json_t *root, const char *label, dsv3_error *err)
{
	static const struct {
		const char *key;
		size_t off;
		int dflt, min;
	} ints[] = {
		{ "vocab_size", offsetof(dsv3_config, vocab_size), 102400, 1 },
		{ "dim", offsetof(dsv3_config, dim), 2048, 1 },
		{ "inter_dim", offsetof(dsv3_config, inter_dim), 10944, 1 },
		{ "moe_inter_dim", offsetof(dsv3_config, moe_inter_dim), 1408, 1 },
		{ "n_layers", offsetof(dsv3_config, n_layers), 27, 1 },
		{ "n_dense_layers", offsetof(dsv3_config, n_dense_layers), 1, 0 },
		{ "n_heads", offsetof(dsv3_config, n_heads), 16, 1 },
		{ "n_routed_experts", offsetof(dsv3_config, n_routed_experts), 64, 1 },
		{ "n_shared_experts", offsetof(dsv3_config, n_shared_experts), 2, 0 },
		{ "n_activated_experts", offsetof(dsv3_config, n_activated_experts), 6, 1 },
		{ "n_expert_groups", offsetof(dsv3_config, n_expert_groups), 1, 1 },
		{ "n_limited_groups", offsetof(dsv3_config, n_limited_groups), 1, 1 },
		{ "q_lora_rank", offsetof(dsv3_config, q_lora_rank), 0, 0 },
		{ "kv_lora_rank", offsetof(dsv3_config, kv_lora_rank), 512, 1 },
		{ "qk_nope_head_dim", offsetof(dsv3_config, qk_nope_head_dim), 128, 1 },
		{ "qk_rope_head_dim", offsetof(dsv3_config, qk_rope_head_dim), 64, 1 },
		{ "v_head_dim", offsetof(dsv3_config, v_head_dim), 128, 1 },
		{ "original_seq_len", offsetof(dsv3_config, original_seq_len), 4096, 1 },
	};
	for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
		int *field = (int *)((char *)c + ints[i].off);
		int rc = read_int(root, ints[i].key, 0, ints[i].dflt, field, label, err);
		if (!rc)
			rc = need_min(*field, ints[i].min, ints[i].key, label, err);
		if (rc)
			return rc;
	}
	const char *score, *dtype, *scale_fmt;
	int rc = read_double(root, "route_scale", 1.0, &c->route_scale, label, err);
	if (!rc)
		rc = read_double(root, "rope_theta", 10000.0, &c->rope_theta, label, err);
	if (!rc)
		rc = read_double(root, "rope_factor", 40.0, &c->rope_factor, label, err);
	if (!rc)
		rc = read_double(root, "beta_fast", 32.0, &c->beta_fast, label, err);
	if (!rc)
		rc = read_double(root, "beta_slow", 1.0, &c->beta_slow, label, err);
	if (!rc)
		rc = read_double(root, "mscale", 1.0, &c->mscale, label, err);
	if (!rc)
		rc = read_string(root, "score_func", "softmax", &score, label, err);
	if (!rc)
		rc = read_string(root, "dtype", "bf16", &dtype, label, err);
	if (!rc)
		rc = read_string(root, "scale_fmt", "", &scale_fmt, label, err);
	if (!rc)
		rc = check_moe(c, &demo_keys, label, err);
	if (rc)
		return rc;
	if (c->rope_theta <= 0 || c->rope_factor <= 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: key \"%s\" must be positive", label,
				 c->rope_theta <= 0 ? "rope_theta" : "rope_factor");
	if (strcmp(score, "sigmoid") && strcmp(score, "softmax"))
		return dsv3_fail(err, DSV3_EDATA,
				 "%s: key \"score_func\" must be \"softmax\" or \"sigmoid\"", label);
	c->score_sigmoid = strcmp(score, "sigmoid") == 0;
	/* model.py gives the gate a bias exactly when dim == 7168 (DeepSeek-V3). */
	c->has_gate_bias = c->dim == 7168;
	c->fp8 = strcmp(dtype, "fp8") == 0;
	c->scale_ue8m0 = strcmp(scale_fmt, "ue8m0") == 0;
	c->block_rows = c->block_cols = 128;
	return 0;
}

int config_parse(dsv3_config *c, const char *json_text, const char *label, dsv3_error *err)
{
	memset(c, 0, sizeof *c);
	json_error_t jerr;
	json_t *root = json_loads(json_text, 0, &jerr);
	if (!root)
		return dsv3_fail(err, DSV3_EDATA, "%s:%d: invalid JSON: %s", label, jerr.line,
				 jerr.text);
	int rc = 0;
	if (!json_is_object(root))
		rc = dsv3_fail(err, DSV3_EDATA, "%s: not a JSON object", label);
	const char *model_type = "";
	if (!rc)
		rc = read_string(root, "model_type", "", &model_type, label, err);
	if (!rc)
		snprintf(c->model_type, sizeof c->model_type, "%s", model_type);
	/* The demo's format is told apart by its own name for the width. */
	if (!rc && json_object_get(root, "dim") && !json_object_get(root, "hidden_size")) {
		rc = parse_demo(c, root, label, err);
		json_decref(root);
		return rc;
	}
	if (!rc)
		rc = parse_dims(c, root, label, err);
	if (!rc)
		rc = parse_moe(c, root, label, err);
	if (!rc)
		rc = parse_rope(c, root, label, err);
	if (!rc)
		rc = parse_quant(c, root, label, err);
	json_decref(root);
	return rc;
}

int config_load(dsv3_config *c, const char *path, dsv3_error *err)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return dsv3_fail_errno(err, "cannot open %s", path);
	char *text = NULL;
	size_t cap = 0, n = 0;
	for (;;) {
		if (n + 4096 + 1 > cap) {
			cap = cap ? cap * 2 : 65536;
			char *t = realloc(text, cap);
			if (!t) {
				free(text);
				fclose(f);
				return dsv3_fail(err, DSV3_EIO, "%s: out of memory", path);
			}
			text = t;
		}
		size_t r = fread(text + n, 1, cap - n - 1, f);
		n += r;
		if (r == 0)
			break;
	}
	int bad = ferror(f);
	fclose(f);
	if (bad) {
		free(text);
		return dsv3_fail(err, DSV3_EIO, "cannot read %s", path);
	}
	text[n] = '\0';
	int rc = config_parse(c, text, path, err);
	free(text);
	return rc;
}
