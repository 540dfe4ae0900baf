/* dsv3-plan's arithmetic: the tensors of a checkpoint (from its headers) or of a config (from
 * model_layout), split as dsv3-convert splits them, and the memory and disk each step needs. */
#ifndef DSV3_PLAN_H
#define DSV3_PLAN_H
#include <stddef.h>
#include <stdint.h>
#include "config.h"
#include "convert_names.h"
#include "error.h"
#include "safetensors.h"

typedef struct {
	char hf[160];   /* name in the input */
	converted_name cn;
	st_dtype dtype;
	int ndim;
	int64_t shape[ST_MAX_DIMS];
	uint64_t nbytes;
	int fp8_weight; /* F8_E4M3 2-D weight: dsv3-fp8-to-bf16 makes it BF16 */
	int is_scale;   /* a weight_scale_inv: dsv3-fp8-to-bf16 drops it */
	int file;       /* input file (index in name order) */
} plan_tensor;

typedef struct {
	dsv3_config cfg;
	char source[4096];    /* checkpoint directory or config file, for messages */
	plan_tensor *t;       /* the tensors dsv3-convert writes (MTP layers dropped) */
	size_t n;
	plan_tensor *all;     /* every tensor of the input, MTP included */
	size_t n_all;
	uint64_t input_bytes;        /* every tensor of the input, MTP included */
	uint64_t input_header_bytes; /* 8 + header of every input file (estimated for a config) */
	uint64_t *file_header_bytes; /* per input file: 8 + its header */
	uint64_t largest_tensor;     /* bytes of the largest input tensor */
	size_t n_input_files;
} plan_model;

int plan_from_ckpt(plan_model *m, const char *dir, dsv3_error *err);
int plan_from_config(plan_model *m, const char *path, dsv3_error *err);
void plan_free(plan_model *m);

/* DSV3_EDATA listing why convert would refuse to split m `mp` ways; 0 when it would not. */
int plan_check_split(const plan_model *m, int mp, dsv3_error *err);
/* w[r], r < mp: tensor data bytes of model{r}-mp{mp}.safetensors. */
void plan_rank_weights(const plan_model *m, int mp, uint64_t *w);
/* Bytes of rank r's file as dsv3-convert writes it: 8 + header + data. */
int plan_rank_file_bytes(const plan_model *m, int mp, int r, uint64_t *bytes, dsv3_error *err);

/* The CUDA engine's KV cache, per token of one sequence: n_layers*(kv_lora+rope)*4. */
uint64_t plan_kv_bytes_per_token(const dsv3_config *c);
/* Everything else the CUDA engine allocates on the GPU (state_alloc of ref-engine/cuda/model.cu)
 * for batch seqs of max_seq_len, besides weights and KV cache. */
uint64_t plan_gpu_scratch(const plan_model *m, int max_seq_len);

/* Peak RAM is the tool's peak RSS: an estimate (within 10% of the measured peak in the tests),
 * except dsv3-fp8-to-bf16 with several files in flight, whose memory depends on how its workers
 * happen to interleave: there an upper bound (cast_ram_bound set; see plan.c). */
typedef struct {
	uint64_t convert_ram, convert_disk;
	uint64_t cast_ram, cast_disk;   /* dsv3-fp8-to-bf16 (0 when the input has no FP8) */
	uint64_t shard_ram, shard_disk; /* dsv3-shard of the converted mp checkpoint */
	int cast_ram_bound;
} plan_tools;

int plan_tool_costs(const plan_model *m, int mp, int threads, plan_tools *out, dsv3_error *err);

#endif
