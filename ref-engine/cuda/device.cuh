/* Device-side helpers shared by the CUDA backend's kernels: weight element access in every
 * stored format, warp and block reductions. */
#ifndef DSV3_CUDA_DEVICE_CUH
#define DSV3_CUDA_DEVICE_CUH
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels.cuh"

__device__ __forceinline__ float dv_bf16(uint16_t v) { return __uint_as_float((uint32_t)v << 16); }

__device__ __forceinline__ float dv_e4m3(uint8_t v)
{
	__half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)v, __NV_E4M3);
	return __half2float(__half(h));
}

/* W[r, c] of expert e as fp32, block scale applied. */
__device__ __forceinline__ float dv_w(const dweight &w, int e, long long r, int c)
{
	long long i = (long long)e * w.estride + r * w.cols + c;
	switch (w.dtype) {
	case DW_F8:
		return dv_e4m3(((const uint8_t *)w.data)[i]) *
		       w.scale[(long long)e * w.sstride + (r >> 7) * w.scale_cols + (c >> 7)];
	case DW_BF16:
		return dv_bf16(((const uint16_t *)w.data)[i]);
	default:
		return ((const float *)w.data)[i];
	}
}

/* W[r, c .. c + 15] (columns past the row's end read as 0), block scale applied: 16 bytes
 * at a time for FP8 when the row and column allow it. */
__device__ __forceinline__ void dv_w16(float *out, const dweight &w, long long r, int c)
{
	const long long i = r * w.cols + c;
	if (w.dtype == DW_F8 && (c & 15) == 0 && c + 16 <= w.cols && (i & 15) == 0 && ((uintptr_t)w.data & 15) == 0) {
		uint4 v = __ldg((const uint4 *)((const uint8_t *)w.data + i));
		const uint32_t u[4] = { v.x, v.y, v.z, v.w };
		float s = w.scale[(r >> 7) * w.scale_cols + (c >> 7)];
#pragma unroll
		for (int k = 0; k < 4; k++) {
			__half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[k] & 0xffff), __NV_E4M3);
			__half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[k] >> 16), __NV_E4M3);
			float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
			out[4 * k] = a.x * s, out[4 * k + 1] = a.y * s, out[4 * k + 2] = b.x * s, out[4 * k + 3] = b.y * s;
		}
		return;
	}
#pragma unroll
	for (int k = 0; k < 16; k++)
		out[k] = c + k < w.cols ? dv_w(w, 0, r, c + k) : 0.0f;
}

__device__ __forceinline__ float dv_warp_sum(float v)
{
	for (int o = 16; o; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

__device__ __forceinline__ float dv_warp_max(float v)
{
	for (int o = 16; o; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

/* Sum (or max) over the block, blockDim.x a multiple of 32 up to 1024; every thread gets it. */
template <bool MAX>
__device__ float dv_block_reduce(float v)
{
	__shared__ float part[32];
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
	v = MAX ? dv_warp_max(v) : dv_warp_sum(v);
	if (!lane)
		part[warp] = v;
	__syncthreads();
	v = part[0];
	for (int w = 1; w < nw; w++)
		v = MAX ? fmaxf(v, part[w]) : v + part[w];
	__syncthreads(); /* part is free again for the next reduction */
	return v;
}

#endif
