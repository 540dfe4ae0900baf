/* The model's configuration, read from a Hugging Face config.json (DESIGN §4 maps its keys). */
#ifndef DSV3_CONFIG_H
#define DSV3_CONFIG_H
#include "error.h"

typedef struct {
	int vocab_size;
	int dim;           /* hidden_size */
	int inter_dim;     /* intermediate_size (dense MLP) */
	int moe_inter_dim; /* moe_intermediate_size */
	int n_layers;      /* num_hidden_layers (MTP layers not counted) */
	int n_dense_layers;     /* first_k_dense_replace */
	int n_heads;
	int n_routed_experts;
	int n_shared_experts;
	int n_activated_experts; /* num_experts_per_tok */
	int n_expert_groups;     /* n_group */
	int n_limited_groups;    /* topk_group */
	int score_sigmoid;       /* scoring_func: 1 sigmoid, 0 softmax */
	int has_gate_bias;       /* topk_method == noaux_tc */
	double route_scale;      /* routed_scaling_factor */
	int q_lora_rank;         /* 0: plain q_proj */
	int kv_lora_rank;
	int qk_nope_head_dim;
	int qk_rope_head_dim;
	int v_head_dim;
	double rope_theta;
	double rope_factor;   /* rope_scaling.factor, 1 when absent */
	int original_seq_len; /* rope_scaling.original_max_position_embeddings */
	double beta_fast, beta_slow;
	double mscale;        /* rope_scaling.mscale_all_dim */
	int n_mtp_layers;     /* num_nextn_predict_layers */
	int fp8;              /* quantization_config with fmt e4m3 present */
	int block_rows, block_cols; /* weight_block_size, 128x128 */
	int scale_ue8m0;      /* quantization_config.scale_fmt == "ue8m0" (DeepSeek-V3.1) */
	char model_type[32];  /* "deepseek_v3", "deepseek_v2" */
} dsv3_config;

/* Parses an HF config.json; missing required keys or nonsense values are DSV3_EDATA naming
 * the file and key. */
int config_load(dsv3_config *c, const char *path, dsv3_error *err);
int config_parse(dsv3_config *c, const char *json_text, const char *label, dsv3_error *err);

#endif
