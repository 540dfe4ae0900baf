/* Writing a synthetic checkpoint in the Hugging Face layout: safetensors files, index,
 * config, tokenizer files and manifests, atomically (lib/out_dir.h). */
#ifndef DSV3_SYNTH_CHECKPOINT_H
#define DSV3_SYNTH_CHECKPOINT_H
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "error.h"
#include "model_layout.h"

typedef struct {
	const dsv3_config *config;
	const char *config_text;        /* written as config.json */
	const layout_tensor *tensors;   /* model_layout of config */
	size_t n_tensors;
	const int *file_of;             /* synth_plan_files */
	int n_files;
	uint64_t seed;
	const char *tokenizer_dir;      /* NULL: no tokenizer files */
	int threads;                    /* <= 0: all cores */
} synth_job;

int synth_write_checkpoint(const synth_job *job, const char *out, dsv3_error *err);

#endif
