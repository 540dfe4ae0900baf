/* dsv3-bf16-to-fp8's job, the reverse of dsv3-fp8-to-bf16: every weight DeepSeek ships in FP8
 * (fp8_weight_name) becomes F8_E4M3 with a float32 <name>_scale_inv of 128x128 block scales. */
#ifndef BF16_QUANTISE_H
#define BF16_QUANTISE_H
#include <stddef.h>
#include <stdint.h>
#include "error.h"
#include "problems.h"

#define QUANT_BLOCK 128
#define E4M3_MAX 448.0f
#define SCALE_FLOOR 1e-4f /* amax below this takes this: an all-zero block gets a finite scale */

typedef struct {
	const char *in_dir;
	const char *out_dir;
	int ue8m0;   /* scales rounded up to powers of two (DeepSeek V3.1's scale_fmt) */
	int threads; /* <= 0: all cores */
} quant_options;

typedef struct {
	size_t files, tensors, quantised, other_files;
	uint64_t bytes_out;
	double seconds;
} quant_stats;

/* 1 for the HF names DeepSeek ships in FP8: model.layers.*.<module>_proj.weight (attention,
 * dense MLP, shared and routed experts, MTP layers included) except eh_proj. Embeddings,
 * lm_head, mlp.gate, norms, biases and eh_proj stay as they are. */
int fp8_weight_name(const char *hf_name);
/* The block scale of DESIGN §4 / issue 7: max(amax, 1e-4) / 448 in float32, with ue8m0 the
 * smallest power of two >= that. */
float quant_block_scale(float amax, int ue8m0);

/* Runs the whole conversion; problems with the input are listed before anything is written,
 * and nothing appears under a final name unless all succeeds. */
int quant_run(const quant_options *opt, problem_list *problems, quant_stats *stats,
	      dsv3_error *err);

#endif
