/* Which DeepSeek release a checkpoint is, from its config.json and its tensor names. The rule
 * table lives in variant.c alone (docs/tools.md, "Which DeepSeek variant") so every tool names
 * a checkpoint the same way. */
#ifndef DSV3_VARIANT_H
#define DSV3_VARIANT_H
#include "error.h"

/* What the rules look at. Fill it with variant_facts_parse (or _load), then hand it every
 * tensor name with variant_facts_note_tensor. */
typedef struct {
	char model_type[32];   /* "" when absent */
	char architecture[64]; /* architectures[0], "" when absent */
	int n_layers;          /* num_hidden_layers, 0 when absent */
	int dim;               /* hidden_size */
	int n_routed_experts;
	int scale_ue8m0;       /* quantization_config.scale_fmt == "ue8m0" */
	int indexer_config;    /* an "index_*" key (index_topk, index_n_heads, index_head_dim) */
	int indexer_tensors;   /* a tensor name holds ".indexer." (V3.2-Exp's lightning indexer) */
} variant_facts;

/* Reads the facts from config.json text; only invalid JSON or a non-object is an error
 * (DSV3_EDATA naming `label`): keys of the wrong type count as absent, so an odd config is
 * named "unknown" rather than refused here. */
int variant_facts_parse(variant_facts *f, const char *json_text, const char *label,
			dsv3_error *err);
int variant_facts_load(variant_facts *f, const char *config_path, dsv3_error *err);
/* Notes one tensor name, HF ("model.layers.0.self_attn.indexer.wk.weight") or converted
 * ("layers.0.attn.indexer.wk.weight"). */
void variant_facts_note_tensor(variant_facts *f, const char *tensor_name);

/* One of "V2-Lite", "V2 / V2.5", "V3 / R1", "V3.1", "V3.2-Exp", "unknown" (a static string). */
const char *variant_name(const variant_facts *f);

#endif
