/* dsv3-convert --dtype bf16: an FP8 checkpoint read as dsv3-fp8-to-bf16 would write it, so that
 * one pass gives the shards that the cast followed by the conversion gives, byte for byte:
 * every F8_E4M3 weight dequantised by its block scale as it streams, every *_scale_inv tensor
 * dropped, config.json without quantization_config. */
#ifndef CONVERT_TO_BF16_H
#define CONVERT_TO_BF16_H
#include <stddef.h>
#include "error.h"
#include "hf_ckpt.h"
#include "mp_shards.h"
#include "problems.h"

typedef struct {
	int active;	   /* the input has F8_E4M3 weights (else: the normal conversion) */
	int block_rows, block_cols;
	mp_dequant *dq;	   /* one per F8_E4M3 weight, handed out by to_bf16_apply */
	size_t n_dq, cap_dq;
	char *config_text; /* the cast's config.json; NULL when not active */
	size_t config_len;
} to_bf16;

/* Reads in_dir/config.json and checks every F8_E4M3 weight of the checkpoint as the cast does
 * (2-D, an F32 scale of shape [ceil(rows/br), ceil(cols/bc)]), each failure a problem. */
int to_bf16_prepare(to_bf16 *b, const hf_ckpt *c, const char *in_dir, problem_list *pr,
		    dsv3_error *err);
/* 1 when the cast drops this tensor (every *_scale_inv, once active). */
int to_bf16_drops(const to_bf16 *b, const st_tensor *st);
/* Makes t (planned from st) BF16 read through its scale when st is an F8_E4M3 weight. */
void to_bf16_apply(to_bf16 *b, const hf_ckpt *c, const st_tensor *st, mp_tensor *t);
void to_bf16_free(to_bf16 *b);

#endif
