/* The tensors a DeepSeek checkpoint in the Hugging Face layout holds for a config (DESIGN §3.2):
 * shared by dsv3-synth (what to write) and dsv3-verify ckpt (what must be there). */
#ifndef DSV3_MODEL_LAYOUT_H
#define DSV3_MODEL_LAYOUT_H
#include <stddef.h>
#include <stdint.h>
#include "config.h"
#include "dtype.h"

typedef enum {
	ROLE_EMBED,  /* embeddings: BF16 */
	ROLE_NORM,   /* RMSNorm weights: BF16 */
	ROLE_LINEAR, /* linear weight: F8_E4M3 with a scale when fp8, else BF16 */
	ROLE_SCALE,  /* weight_scale_inv: F32 [ceil(out/128), ceil(in/128)] */
	ROLE_GATE,   /* MoE gate weight: BF16 */
	ROLE_BIAS,   /* e_score_correction_bias: F32 */
	ROLE_HEAD,   /* lm_head / shared_head.head: BF16 */
} tensor_role;

typedef struct {
	char name[128];
	st_dtype dtype;
	int ndim;
	int64_t shape[2];
	tensor_role role;
	int layer;    /* -1 outside layers; n_layers.. for MTP layers */
	int64_t fan_in; /* columns of a matrix, 0 for vectors */
} layout_tensor;

/* Fills *out (malloc'd, caller frees) with every tensor, in the order HF checkpoints list them:
 * embed, then per layer (attention, norms, MLP/MoE; each linear followed by its scale when
 * fp8), then norm and lm_head; with_mtp adds the n_mtp_layers MTP layers after the last layer. */
int model_layout(const dsv3_config *c, int with_mtp, layout_tensor **out, size_t *n);

#endif
