/* Kernels of the cuBLAS prefill path (model.cu, chunks of PREFILL_BLAS tokens). */
#include "kernels.cuh"

__global__ void silu_mul_kernel(float *a, const float *b, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		float x = a[i];
		a[i] = x / (1.0f + expf(-x)) * b[i];
	}
}

void k_silu_mul(cudaStream_t s, float *a, const float *b, size_t n)
{
	size_t blocks = (n + 255) / 256;
	silu_mul_kernel<<<blocks < 8192 ? (int)blocks : 8192, 256, 0, s>>>(a, b, n);
	cuda_check(cudaGetLastError(), "silu_mul_kernel");
}

#include <cuda_bf16.h>

#include "device.cuh"

/* out = W as bf16, 16 columns of one row a thread; w is one matrix (an expert already picked).
 * With lo, also lo = bf16(W - bf16(W)): an FP8 value times its fp32 block scale needs more
 * bits than bf16 holds, the pair holds 16 of them. */
__global__ void weight_bf16_kernel(__nv_bfloat16 *out, __nv_bfloat16 *lo, dweight w, int chunks_per_row)
{
	const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (long long)w.rows * chunks_per_row)
		return;
	const int r = (int)(i / chunks_per_row), c = (int)(i % chunks_per_row) * 16;
	float v[16];
	dv_w16(v, w, r, c);
	for (int half = 0; half < (lo ? 2 : 1); half++) {
		__nv_bfloat16 *dst = (half ? lo : out) + (long long)r * w.cols + c;
		__nv_bfloat162 h[8];
#pragma unroll
		for (int k = 0; k < 8; k++) {
			h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
			v[2 * k] -= __low2float(h[k]), v[2 * k + 1] -= __high2float(h[k]); /* what is left: lo */
		}
		if (c + 16 <= w.cols && ((uintptr_t)dst & 15) == 0) {
			((uint4 *)dst)[0] = *(const uint4 *)&h[0];
			((uint4 *)dst)[1] = *(const uint4 *)&h[4];
		} else {
			for (int k = 0; k < 16 && c + k < w.cols; k++)
				dst[k] = k & 1 ? __high2bfloat16(h[k / 2]) : __low2bfloat16(h[k / 2]);
		}
	}
}

void k_weight_bf16(cudaStream_t s, void *out, const dweight *w, int expert, int split)
{
	dweight one = *w;
	size_t es = w->dtype == DW_F8 ? 1 : w->dtype == DW_BF16 ? 2 : 4;
	one.data = (const char *)w->data + (size_t)expert * w->estride * es;
	if (w->scale)
		one.scale = w->scale + (size_t)expert * w->sstride;
	one.estride = one.sstride = 0;
	int cpr = (w->cols + 15) / 16;
	long long n = (long long)w->rows * cpr;
	__nv_bfloat16 *o = (__nv_bfloat16 *)out;
	weight_bf16_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(o, split ? o + (size_t)w->rows * w->cols : NULL,
									 one, cpr);
	cuda_check(cudaGetLastError(), "weight_bf16_kernel");
}

/* x = hi + lo in bf16 (hi = bf16(x), lo = bf16(x - hi)): |x - hi - lo| <= 2^-16 |x|, so two
 * bf16 GEMMs against bf16 (or FP8) weights, whose products are exact in fp32, give fp32-grade
 * results. hi goes to out[0, n), lo to out[n, 2n). */
__global__ void split_bf16_kernel(__nv_bfloat16 *out, const float *x, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		__nv_bfloat16 hi = __float2bfloat16_rn(x[i]);
		out[i] = hi;
		out[n + i] = __float2bfloat16_rn(x[i] - __bfloat162float(hi));
	}
}

void k_split_bf16(cudaStream_t s, void *out, const float *x, size_t n)
{
	size_t blocks = (n + 255) / 256;
	split_bf16_kernel<<<blocks < 8192 ? (int)blocks : 8192, 256, 0, s>>>((__nv_bfloat16 *)out, x, n);
	cuda_check(cudaGetLastError(), "split_bf16_kernel");
}

/* y[t, r] (+)= the sum of a split GEMM's parts: part is [n * xs, rows * ws] (xs, ws = 2 when
 * the activations, the weights were split into hi and lo halves, else 1). */
__global__ void join_parts_kernel(float *y, int ldy, const float *part, int rows, int n, int xs, int ws, int acc)
{
	const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (long long)n * rows)
		return;
	const int t = (int)(i / rows), r = (int)(i % rows), ld = rows * ws;
	float v = 0.0f;
	for (int a = 0; a < xs; a++)
		for (int b = 0; b < ws; b++)
			v += part[(long long)(t + a * n) * ld + b * rows + r];
	float *dst = y + (long long)t * ldy + r;
	*dst = acc ? *dst + v : v;
}

void k_join_parts(cudaStream_t s, float *y, int ldy, const float *part, int rows, int n, int xs, int ws, int acc)
{
	long long total = (long long)n * rows;
	join_parts_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(y, ldy, part, rows, n, xs, ws, acc);
	cuda_check(cudaGetLastError(), "join_parts_kernel");
}
