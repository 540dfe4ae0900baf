/* HF tensor names -> the converted (model-parallel) names and their split dims, DESIGN §3.3.
 * The rules of DeepSeek's convert.py, shared by dsv3-convert, dsv3-shard and dsv3-verify. */
#ifndef DSV3_CONVERT_NAMES_H
#define DSV3_CONVERT_NAMES_H
#include <stddef.h>

#define SPLIT_NONE (-1) /* copied whole to every rank */

typedef struct {
	char name[160]; /* converted name, e.g. "layers.0.attn.wq_a.scale" */
	int split_dim;  /* 0, 1 or SPLIT_NONE */
	int expert;     /* routed expert index, or -1 (routed experts go whole to one rank) */
	int layer;      /* layer index, -1 outside layers */
} converted_name;

/* Maps an HF name; returns 0, or -1 when the name is unknown to the mapping (the module name
 * before the last dot is not in DESIGN §3.3's table, nor an MTP module). */
int convert_name(const char *hf_name, converted_name *out);
/* 1 when the HF name is one of the MTP layer's own modules (enorm, hnorm, eh_proj, shared_head.*):
 * convert_name accepts them in any layer, callers refuse them outside MTP layers. */
int hf_name_is_mtp_module(const char *hf_name);
/* For a converted name (as found in model{r}-mp{N} files): its split dim and expert index. */
int converted_name_info(const char *name, converted_name *out);
/* Rank that owns routed expert e of n_experts across mp ranks. */
static inline int expert_rank(int e, int n_experts, int mp) { return e / (n_experts / mp); }

#endif
