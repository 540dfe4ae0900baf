/* The kernels only a rank of several needs (tp.cuh): the vocab-parallel embedding and the MoE
 * over this rank's experts [lo, lo + count). One rank never calls them: its path stays that of
 * kernels.cu. */
#include "device.cuh"
#include "tp.cuh"

#define LAUNCHED(name) cuda_check(cudaGetLastError(), name)

/* Rows of the vocabulary outside this rank's slice are zeros: the all-reduce that follows
 * gives every rank the full row (model.py's ParallelEmbedding). */
__global__ void embed_range_kernel(float *out, dweight w, const int *ids, int lo)
{
	const int t = blockIdx.x, id = ids[t] - lo;
	const bool mine = id >= 0 && id < w.rows;
#pragma unroll 4
	for (int c = threadIdx.x; c < w.cols; c += blockDim.x)
		out[(long long)t * w.cols + c] = mine ? dv_w(w, 0, id, c) : 0.0f;
}

void k_embed_range(cudaStream_t s, float *out, const dweight *w, const int *ids, int n, int lo)
{
	embed_range_kernel<<<n, 1024, 0, s>>>(out, *w, ids, lo);
	LAUNCHED("embed_range_kernel");
}

/* moe_combine_kernel with the other ranks' pairs left out (their rows of y were never written). */
__global__ void moe_combine_local_kernel(float *x, const float *y, const float *w, const int *topk, int lo, int count,
					 int K, int dim)
{
	const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
	if (c >= dim)
		return;
	float s = 0.0f;
	for (int k = 0; k < K; k++) {
		int e = topk[t * K + k];
		if (e >= lo && e < lo + count)
			s = fmaf(w[t * K + k], y[((long long)t * K + k) * dim + c], s);
	}
	x[(long long)t * dim + c] += s;
}

void k_moe_combine_local(cudaStream_t s, float *x, const float *y, const float *weights, const int *topk, int lo,
			 int count, int n, int K, int dim)
{
	moe_combine_local_kernel<<<dim3((dim + 255) / 256, n), 256, 0, s>>>(x, y, weights, topk, lo, count, K, dim);
	LAUNCHED("moe_combine_local_kernel");
}
