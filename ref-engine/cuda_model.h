/* The CUDA backend's entry points (DESIGN §5), called by model.c only. Built from the .cu files of cuda/
 * when nvcc is found; otherwise nocuda/cuda_none.c answers that it is not built. A CUDA
 * failure inside a forward pass is fatal: the message names the kernel, layer and tensor, and
 * the process exits with status 3. */
#ifndef DSV3_CUDA_MODEL_H
#define DSV3_CUDA_MODEL_H
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when this build has the CUDA backend and a GPU is visible; otherwise 0 and, when why is
 * not NULL, a sentence saying why. */
int cuda_model_available(char *why, size_t why_len);
/* Uploads the weights of w in their stored format and allocates the state (KV cache for
 * n_seqs sequences of cf->max_seq_len tokens, scratch, decode graphs). */
int cuda_model_open(struct cuda_model **out, const Config *cf, const Weights *w, int n_seqs,
		    dsv3_error *err);
void cuda_model_close(struct cuda_model *g);
/* Feeds tokens[0:n] of sequence seq at positions pos..pos+n-1; when logits is not NULL writes
 * the next-token logits after the last one there ([vocab], host memory). */
void cuda_forward_prompt(struct cuda_model *g, int seq, const int *tokens, int n, int pos,
			 float *logits);
/* One decode step of n distinct sequences; returns their logits [n, vocab] in host memory,
 * valid until the next call: the backend's own pinned buffer when n fits one step, else
 * `logits` (room for [n, vocab]), filled step by step. */
float *cuda_forward_batch(struct cuda_model *g, int n, const int *seqs, const int *tokens,
			  const int *pos, float *logits);

#ifdef __cplusplus
}
#endif
#endif
