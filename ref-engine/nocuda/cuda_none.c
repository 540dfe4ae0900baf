/* The CUDA entry points of a build without nvcc (or `make CUDA=0`): nothing is available. */
#include <stdio.h>
#include <stdlib.h>

#include "cuda_model.h"

int cuda_model_available(char *why, size_t why_len)
{
	if (why && why_len)
		snprintf(why, why_len, "this build has no CUDA backend (built without nvcc or with CUDA=0)");
	return 0;
}

int cuda_model_open(struct cuda_model **out, const Config *cf, const Weights *w, int n_seqs,
		    dsv3_error *err)
{
	(void)cf, (void)w, (void)n_seqs;
	*out = NULL;
	return dsv3_fail(err, DSV3_EUSAGE, "--device cuda: this build has no CUDA backend "
			 "(built without nvcc or with CUDA=0)");
}

int cuda_model_open_parallel(struct cuda_model **out, const Config *cf, const Weights *w, int n_seqs,
			     struct comm *ranks, dsv3_error *err)
{
	(void)ranks;
	return cuda_model_open(out, cf, w, n_seqs, err);
}

void cuda_model_close(struct cuda_model *g) { (void)g; }

int cuda_rank_threads(const char *dir, int *n, dsv3_error *err)
{
	(void)dir, (void)err;
	*n = 1;
	return 0;
}

int comm_nccl_run(int n, int (*rank_main)(struct comm *c, void *arg), void *arg, int *rank0_rc,
		  dsv3_error *err)
{
	(void)n, (void)rank_main, (void)arg, (void)rank0_rc;
	return dsv3_fail(err, DSV3_EUSAGE, "GPU ranks: this build has no CUDA backend "
			 "(built without nvcc or with CUDA=0)");
}

void cuda_forward_prompt(struct cuda_model *g, int seq, const int *tokens, int n, int pos, float *logits)
{
	(void)g, (void)seq, (void)tokens, (void)n, (void)pos, (void)logits;
	abort(); /* unreachable: cuda_model_open never succeeds */
}

float *cuda_forward_batch(struct cuda_model *g, int n, const int *seqs, const int *tokens, const int *pos,
			  float *logits)
{
	(void)g, (void)n, (void)seqs, (void)tokens, (void)pos, (void)logits;
	abort();
}
