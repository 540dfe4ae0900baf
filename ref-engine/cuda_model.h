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
/* The same for rank cf->rank of cf->world > 1 tensor-parallel ranks (DESIGN §5, issue 8): w
 * holds this rank's slices (weights_load_rank), and the ranks of `ranks` sum their partial
 * results through NCCL on the device. `ranks` is an NCCL comm (comm_nccl_run) or an MPI comm,
 * over which NCCL is bootstrapped (one GPU per rank of a host, by comm_local_rank()). Checks
 * that the rank's weights, KV cache and scratch fit its GPU before uploading. ranks NULL with
 * cf->world 1: cuda_model_open. */
struct comm;
int cuda_model_open_parallel(struct cuda_model **out, const Config *cf, const Weights *w, int n_seqs,
			     struct comm *ranks, dsv3_error *err);
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

/* One process, one thread per GPU (issue 8's launch on one host). *n = N when DIR holds
 * converted shards model{r}-mp{N} with N >= 2 and at least N GPUs are visible: the caller then
 * runs its ranks through comm_nccl_run; else *n = 1 (fewer GPUs: the shards are merged on one). */
int cuda_rank_threads(const char *dir, int *n, dsv3_error *err);
/* Runs rank_main(c, arg) on n threads, thread r on GPU r with c rank r of an NCCL comm of n
 * (ncclCommInitAll), whose collectives take host buffers. Returns when every rank has returned,
 * with rank 0's return value in *rank0_rc. A rank that fails ends the process through
 * comm_fail/comm_abort (every rank with it). Nonzero only when the ranks cannot be started. */
int comm_nccl_run(int n, int (*rank_main)(struct comm *c, void *arg), void *arg, int *rank0_rc,
		  dsv3_error *err);

#ifdef __cplusplus
}
#endif
#endif
