/* Tensor parallelism inside the CUDA engine (DESIGN §5 "Several ranks", issue 8): how model.cu
 * reaches the other ranks. A tp_link is this rank's NCCL communicator and GPU; its collectives
 * work on device buffers and are enqueued on the engine's stream (so they are captured into the
 * decode graphs like any kernel). comm_nccl.cu implements them; tp_kernels.cu has the kernels
 * that only a rank of several needs (vocab-parallel embedding, local experts). */
#ifndef DSV3_CUDA_TP_CUH
#define DSV3_CUDA_TP_CUH
#include <cuda_runtime.h>
#include <stddef.h>

#include "comm.h"
extern "C" {
#include "error.h" /* plain C, no extern "C" of its own */
}
#include "kernels.cuh"

struct tp_link; /* opaque: comm_nccl.cu */

/* This rank's link for the ranks of c (comm_size(c) > 1): c's own NCCL communicator when c is
 * an NCCL comm (one process, one thread per GPU), else a new one bootstrapped over c (mpirun:
 * rank 0's ncclUniqueId broadcast through c, the GPU chosen by comm_local_rank()). Makes the
 * rank's GPU current. A failure before any collective is returned (the caller ends the job);
 * an NCCL failure aborts every rank. */
int tp_attach(struct tp_link **out, comm *c, dsv3_error *err);
void tp_detach(struct tp_link *t);
int tp_device(const struct tp_link *t);
/* Whether the link's collectives can be captured into a CUDA graph (NCCL); a staged link (MPI
 * through host memory) cannot, and the engine then runs decode steps without graphs. */
int tp_capturable(const struct tp_link *t);
/* buf[0:n] = the sum over the ranks, in place. */
void tp_allreduce(struct tp_link *t, float *buf, size_t n, cudaStream_t s, const char *what);
/* recv[r * n : (r + 1) * n] = rank r's send[0:n]. */
void tp_allgather(struct tp_link *t, const float *send, float *recv, size_t n, cudaStream_t s, const char *what);
/* Ends every rank of the job with status code (after a CUDA or cuBLAS failure on this rank). */
[[noreturn]] void tp_abort(struct tp_link *t, int code);

/* out[t, :] = row ids[t] - lo of the embedding slice W when this rank holds it, else zeros. */
void k_embed_range(cudaStream_t s, float *out, const dweight *w, const int *ids, int n, int lo);
/* k_moe_combine over this rank's experts only: x[t] += sum over k with topk[t, k] in
 * [lo, lo + count) of weights[t, k] * y[t * K + k]. */
void k_moe_combine_local(cudaStream_t s, float *x, const float *y, const float *weights, const int *topk, int lo,
			 int count, int n, int K, int dim);

#endif
