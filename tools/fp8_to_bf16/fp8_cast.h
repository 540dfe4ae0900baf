/* dsv3-fp8-to-bf16's job (DeepSeek's fp8_cast_bf16.py on the CPU): every F8_E4M3 weight of an
 * HF checkpoint dequantised by its 128x128 block scale into BF16, the scales dropped, all
 * other tensors and files copied, the index and config rewritten, manifests added. */
#ifndef FP8_CAST_H
#define FP8_CAST_H
#include <stddef.h>
#include <stdint.h>
#include "error.h"
#include "problems.h"
#include "resume.h"

typedef struct {
	const char *in_dir;
	const char *out_dir;
	int threads; /* <= 0: all cores */
	int resume;  /* keep the verified files of an interrupted run into out_dir (resume.h) */
} fp8_cast_options;

typedef struct {
	size_t files, tensors, dequantised, scales_dropped, other_files;
	uint64_t bytes_out;
	double seconds;
	resume_stats resumed;
} fp8_cast_stats;

/* Runs the whole cast. On a bad input every problem goes to `problems` before anything is
 * written and the return is DSV3_EDATA. */
int fp8_cast_run(const fp8_cast_options *opt, problem_list *problems, fp8_cast_stats *stats,
		 dsv3_error *err);

#endif
