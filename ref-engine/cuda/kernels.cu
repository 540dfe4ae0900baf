/* The CUDA backend's kernels: block-FP8 / BF16 GEMV for 1-16 tokens that reads each weight
 * once, the absorbed MLA decode attention over the compressed cache, the MoE gate and routing
 * on the device, fused norms and RoPE. Activations are fp32 throughout; FP8 is decoded by the
 * hardware conversion (exact: every E4M3 value is an F16 value) and scaled per 128x128 block. */
#include <climits>
#include "device.cuh"
#include "kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- errors ---- */

static thread_local int where_layer = -1;
static thread_local const char *where_tensor = "";
/* A rank of several ends the whole job instead of this process alone (cuda_set_fatal). */
static thread_local void (*fatal_hook)(void *arg, int code);
static thread_local void *fatal_arg;

void cuda_set_fatal(void (*fn)(void *arg, int code), void *arg)
{
	fatal_hook = fn;
	fatal_arg = arg;
}

void cuda_fatal(int code)
{
	if (fatal_hook)
		fatal_hook(fatal_arg, code);
	exit(code);
}

void cuda_where(int layer, const char *tensor)
{
	where_layer = layer;
	where_tensor = tensor ? tensor : "";
}

void cuda_check(cudaError_t e, const char *what)
{
	if (e == cudaSuccess)
		return;
	if (where_layer >= 0)
		fprintf(stderr, "dsv3: CUDA error in %s (layer %d, %s): %s\n", what, where_layer, where_tensor,
			cudaGetErrorString(e));
	else
		fprintf(stderr, "dsv3: CUDA error in %s (%s): %s\n", what, where_tensor, cudaGetErrorString(e));
	cuda_fatal(3);
}

#define LAUNCHED(name) cuda_check(cudaGetLastError(), name)

/* Element access, warp and block reductions: device.cuh. */
__device__ __forceinline__ float silu(float a) { return a / (1.0f + expf(-a)); }

/* ---- GEMV: 1-16 tokens, each weight read once ---- */

struct gemv_kparams {
	dweight w[2];
	float *y[2];
	const float *x, *xb;
	int ldy[2];
	int ldx, n, acc, wk, grouped;
	gemv_groups g;
};

/* Columns one lane takes per step: 16 bytes of weights. */
template <int DT> struct lane_cols { static constexpr int n = DT == DW_F8 ? 16 : DT == DW_BF16 ? 8 : 4; };

/* Loads EPL weights of row `row` from column c0 as fp32 (unscaled). */
template <int DT, bool VEC>
__device__ __forceinline__ void load_w(float *out, const dweight &w, long long base, int c0)
{
	constexpr int EPL = lane_cols<DT>::n;
	if constexpr (VEC) {
		if constexpr (DT == DW_F8) {
			uint4 v = __ldg((const uint4 *)((const uint8_t *)w.data + base + c0));
			const uint32_t u[4] = { v.x, v.y, v.z, v.w };
#pragma unroll
			for (int k = 0; k < 4; k++) {
				__half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[k] & 0xffff), __NV_E4M3);
				__half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[k] >> 16), __NV_E4M3);
				float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
				out[4 * k] = a.x, out[4 * k + 1] = a.y, out[4 * k + 2] = b.x, out[4 * k + 3] = b.y;
			}
		} else if constexpr (DT == DW_BF16) {
			uint4 v = __ldg((const uint4 *)((const uint16_t *)w.data + base + c0));
			const uint32_t u[4] = { v.x, v.y, v.z, v.w };
#pragma unroll
			for (int k = 0; k < 4; k++) {
				out[2 * k] = __uint_as_float(u[k] << 16);
				out[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
			}
		} else {
			float4 v = __ldg((const float4 *)((const float *)w.data + base + c0));
			out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
		}
	} else {
#pragma unroll
	for (int i = 0; i < EPL; i++) {
		float f = 0.0f;
		if (c0 + i < w.cols) {
			long long k = base + c0 + i;
			f = DT == DW_F8 ? dv_e4m3(((const uint8_t *)w.data)[k])
			    : DT == DW_BF16 ? dv_bf16(((const uint16_t *)w.data)[k])
					    : ((const float *)w.data)[k];
		}
		out[i] = f;
	}
	}
}

template <int EPL, bool VEC, bool SILU>
__device__ __forceinline__ void load_x(float *out, const float *x, const float *xb, long long off, int c0, int K)
{
	if constexpr (VEC) {
#pragma unroll
		for (int i = 0; i < EPL; i += 4) {
			float4 v = __ldg((const float4 *)(x + off + c0 + i));
			out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
			if (SILU) {
				float4 b = __ldg((const float4 *)(xb + off + c0 + i));
				out[i] = silu(out[i]) * b.x, out[i + 1] = silu(out[i + 1]) * b.y;
				out[i + 2] = silu(out[i + 2]) * b.z, out[i + 3] = silu(out[i + 3]) * b.w;
			}
		}
	} else {
#pragma unroll
	for (int i = 0; i < EPL; i++) {
		float f = 0.0f;
		if (c0 + i < K) {
			f = x[off + c0 + i];
			if (SILU)
				f = silu(f) * xb[off + c0 + i];
		}
		out[i] = f;
	}
	}
}

/* This block's tokens: all n of the call, or group blockIdx.y's (its expert, count and rows of x
 * and y); false when the group does not exist this time (fewer groups than the grid). */
__device__ __forceinline__ bool gemv_group(const gemv_kparams &p, int &n, int &e, const int *&rin, const int *&rout)
{
	n = p.n, e = 0, rin = rout = nullptr;
	if (!p.grouped)
		return true;
	int g = blockIdx.y;
	if (g >= *p.g.count)
		return false;
	n = p.g.cnt[g];
	e = p.g.exp[g];
	rin = p.g.in + g * GEMV_MAX_TOKENS;
	rout = p.g.out + g * GEMV_MAX_TOKENS;
	return true;
}

/* A block of 8 warps takes R * (8 / wk) rows; wk warps split each row's columns. */
template <int NT, int R, int DT, bool SILU, bool VEC>
__global__ void __launch_bounds__(256) gemv_kernel(const __grid_constant__ gemv_kparams p)
{
	constexpr int EPL = lane_cols<DT>::n;
	const dweight &w = p.w[blockIdx.z];
	float *y = p.y[blockIdx.z];
	int n, e;
	const int *rin, *rout;
	if (!gemv_group(p, n, e, rin, rout))
		return;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int kw = warp % p.wk, rg = warp / p.wk, rows_pb = R * (8 / p.wk);
	const int r0 = blockIdx.x * rows_pb + rg * R, K = w.cols;
	if (blockIdx.x * rows_pb >= w.rows)
		return;
	long long xoff[NT];
#pragma unroll
	for (int t = 0; t < NT; t++)
		xoff[t] = t < n ? (long long)(rin ? rin[t] : t) * p.ldx : 0;
	float acc[R][NT];
#pragma unroll
	for (int j = 0; j < R; j++)
#pragma unroll
		for (int t = 0; t < NT; t++)
			acc[j][t] = 0.0f;
	const long long ebase = (long long)e * w.estride;
	for (int c0 = (kw * 32 + lane) * EPL; c0 < K; c0 += p.wk * 32 * EPL) {
		float wf[R][EPL], sc[R];
#pragma unroll
		for (int j = 0; j < R; j++) {
			int row = min(r0 + j, w.rows - 1); /* rows past the end compute a copy, unused */
			load_w<DT, VEC>(wf[j], w, ebase + (long long)row * K, c0);
			/* an FP8 block's scale multiplies the lane's 16-term sum, not each weight */
			sc[j] = DT == DW_F8 ? w.scale[(long long)e * w.sstride + (long long)(row >> 7) * w.scale_cols + (c0 >> 7)]
					    : 1.0f;
		}
#pragma unroll
		for (int t = 0; t < NT; t++) {
			if (t >= n)
				break;
			float xv[EPL];
			load_x<EPL, VEC, SILU>(xv, p.x, p.xb, xoff[t], c0, K);
#pragma unroll
			for (int j = 0; j < R; j++) {
				float s = 0.0f;
#pragma unroll
				for (int i = 0; i < EPL; i++)
					s = fmaf(wf[j][i], xv[i], s);
				acc[j][t] = DT == DW_F8 ? fmaf(sc[j], s, acc[j][t]) : acc[j][t] + s;
			}
		}
	}
	__shared__ float red[8][R][NT];
#pragma unroll
	for (int j = 0; j < R; j++)
#pragma unroll
		for (int t = 0; t < NT; t++) {
			float v = dv_warp_sum(acc[j][t]);
			if (!lane)
				red[warp][j][t] = v;
		}
	__syncthreads();
	for (int i = threadIdx.x; i < (8 / p.wk) * R * NT; i += blockDim.x) {
		int t = i % NT, j = (i / NT) % R, g2 = i / (NT * R);
		int row = blockIdx.x * rows_pb + g2 * R + j;
		if (t >= n || row >= w.rows)
			continue;
		float s = 0.0f;
		for (int k = 0; k < p.wk; k++)
			s += red[g2 * p.wk + k][j][t];
		float *dst = y + (long long)(rout ? rout[t] : t) * p.ldy[blockIdx.z] + row;
		*dst = p.acc ? *dst + s : s;
	}
}

template <int NT, int R, int DT, bool SILU>
static void gemv_launch(cudaStream_t s, const gemv_kparams &p, dim3 grid, bool vec)
{
	if (vec)
		gemv_kernel<NT, R, DT, SILU, true><<<grid, 256, 0, s>>>(p);
	else
		gemv_kernel<NT, R, DT, SILU, false><<<grid, 256, 0, s>>>(p);
}

template <int NT, int R, bool SILU>
static void gemv_dt(cudaStream_t s, const gemv_kparams &p, dim3 grid, bool vec)
{
	switch (p.w[0].dtype) {
	case DW_F8: gemv_launch<NT, R, DW_F8, SILU>(s, p, grid, vec); break;
	case DW_BF16: gemv_launch<NT, R, DW_BF16, SILU>(s, p, grid, vec); break;
	default: gemv_launch<NT, R, DW_F32, SILU>(s, p, grid, vec); break;
	}
}

template <int NT, int R>
static int gemv_rows_nt(cudaStream_t s, const gemv_kparams &p, int rows, bool vec, int max_groups)
{
	int rows_pb = R * (8 / p.wk);
	dim3 grid((rows + rows_pb - 1) / rows_pb, max_groups, p.w[1].data ? 2 : 1);
	if (p.xb)
		gemv_dt<NT, R, true>(s, p, grid, vec);
	else
		gemv_dt<NT, R, false>(s, p, grid, vec);
	return 0;
}

/* ---- GEMV on the tensor cores: 2-16 tokens ----
 *
 * At several tokens gemv_kernel's fp32 FMAs and x re-reads, not the weight reads, set its
 * speed. Here a warp multiplies a 16-row tile of W by 8 tokens per mma.sync m16n8k16 (two
 * n-tiles for 9-16 tokens). fp32-grade products from 16-bit multiplicands: FP8 weights are
 * exact in f16, and x is split in two f16 parts (hi = f16(x), lo = f16(x - hi): 22 bits) that
 * go through the same accumulator; BF16 weights take x in three bf16 parts (24 bits). f16 has
 * a narrow range, so each token's 64 columns of a step are first scaled by a power of two that
 * puts their largest |x| in [2^14, 2^15): nothing overflows, nothing that matters underflows,
 * and the scale comes off exactly with the block scale when the step's sum joins the total.
 *
 * A dot product does not care in which order its k run, so each lane loads 16 contiguous
 * bytes of its two rows (g = lane / 4 and g + 8, columns from 16 * (lane % 4) bytes on) in
 * one coalesced load and gives them to its own k-slots of consecutive MMAs; its B fragment
 * takes x of token g at the very same columns. PTX's m16n8k16 layout: A regs {a0a1, a2a3,
 * a4a5, a6a7} hold (row g, k 2q..2q+1), (g + 8, 2q..), (g, 2q + 8..), (g + 8, 2q + 8..) with
 * q = lane % 4; B regs {b0b1, b2b3} hold (k 2q.., n g), (k 2q + 8.., n g); C {c0, c1, c2, c3}
 * hold (row g, n 2q, 2q + 1), (row g + 8, n 2q, 2q + 1). So MMA j of a step takes the lane's
 * columns 4j, 4j + 1 as k 2q, 2q + 1 and 4j + 2, 4j + 3 as k 2q + 8, 2q + 9, for A and B. */

#define GEMV_MMA_MT 2 /* 16-row m-tiles per warp: each x fragment serves 32 rows */

template <int DT> struct mma_step {
	static constexpr int cols = DT == DW_F8 ? 64 : 32;   /* columns a warp takes per step */
	static constexpr int lane_cols = DT == DW_F8 ? 16 : 8; /* of them per lane: 16 bytes */
	static constexpr int mmas = DT == DW_F8 ? 4 : 2;      /* k16 MMAs per step and part of x */
};

__device__ __forceinline__ void mma_f16(float *d, const uint32_t *a, uint32_t b0, uint32_t b1)
{
	asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
	    "{%0,%1,%2,%3};"
	    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
	    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_bf16(float *d, const uint32_t *a, uint32_t b0, uint32_t b1)
{
	asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
	    "{%0,%1,%2,%3};"
	    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
	    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Two E4M3 bytes (low 16 bits of v) as an f16 pair, the lower byte in the lower half. */
__device__ __forceinline__ uint32_t e4m3x2_h2(uint32_t v)
{
	__half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xffff), __NV_E4M3);
	return (uint32_t)h.x | (uint32_t)h.y << 16;
}

/* a, b as the hi and lo f16 pairs of a B register: hi + lo is a, b to 22 bits. */
__device__ __forceinline__ void split_h2(float a, float b, uint32_t *hi, uint32_t *lo)
{
	__half2 h = __floats2half2_rn(a, b);
	float2 f = __half22float2(h);
	__half2 l = __floats2half2_rn(a - f.x, b - f.y);
	*hi = *(uint32_t *)&h;
	*lo = *(uint32_t *)&l;
}

/* a, b as three bf16 pairs whose sum is a, b to 24 bits. */
__device__ __forceinline__ void split_bf3(float a, float b, uint32_t *part)
{
#pragma unroll
	for (int i = 0; i < 3; i++) {
		__nv_bfloat162 h = __floats2bfloat162_rn(a, b);
		float2 f = __bfloat1622float2(h);
		part[i] = *(uint32_t *)&h;
		a -= f.x, b -= f.y;
	}
}

/* The power of two that brings the largest |x| of a token's step (m, gathered over the
 * token's four lanes) into [2^14, 2^15), and its inverse; zeros and huge values clamp. */
__device__ __forceinline__ float2 step_scale(float m)
{
	m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
	m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
	int sh = 141 - (int)((__float_as_uint(m) >> 23) & 0xff);
	sh = max(-100, min(100, sh));
	return make_float2(__uint_as_float((uint32_t)(127 + sh) << 23), __uint_as_float((uint32_t)(127 - sh) << 23));
}

/* A block of 8 warps takes 16 * MT * (8 / wk) rows; wk warps split the steps along K. NTL
 * n-tiles of 8 tokens. Needs 16-byte aligned rows and x (k_gemv's vec) and K % lane_cols. */
template <int NTL, int MT, int DT, bool SILU>
__global__ void __launch_bounds__(256, 2) gemv_mma_kernel(const __grid_constant__ gemv_kparams p)
{
	using S = mma_step<DT>;
	constexpr int REGS = MT * NTL * 4; /* C values a lane holds */
	const dweight &w = p.w[blockIdx.z];
	float *y = p.y[blockIdx.z];
	int n, e;
	const int *rin, *rout;
	if (!gemv_group(p, n, e, rin, rout))
		return;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
	const int kw = warp % p.wk, rg = warp / p.wk, rows_pb = 16 * MT * (8 / p.wk);
	const int r0 = blockIdx.x * rows_pb + rg * 16 * MT, K = w.cols;
	if (blockIdx.x * rows_pb >= w.rows)
		return;
	const long long ebase = (long long)e * w.estride;
	long long wrow[MT][2]; /* rows past the end load the last row, their sums unused */
	const float *wsc[MT];  /* the m-tile's row of block scales (FP8) */
#pragma unroll
	for (int m = 0; m < MT; m++) {
		wrow[m][0] = ebase + (long long)min(r0 + m * 16 + g, w.rows - 1) * K;
		wrow[m][1] = ebase + (long long)min(r0 + m * 16 + g + 8, w.rows - 1) * K;
		wsc[m] = DT == DW_F8 ? w.scale + (long long)e * w.sstride +
					       (long long)(min(r0 + m * 16, w.rows - 1) >> 7) * w.scale_cols
				     : nullptr;
	}
	long long xoff[NTL]; /* B side: token t * 8 + g; -1: no such token, x = 0 */
#pragma unroll
	for (int t = 0; t < NTL; t++) {
		int tok = t * 8 + g;
		xoff[t] = tok < n ? (long long)(rin ? rin[tok] : tok) * p.ldx : -1;
	}
	float acc[MT][NTL][4] = {};
	const int steps = (K + S::cols - 1) / S::cols;
	for (int s = kw; s < steps && r0 < w.rows; s += p.wk) {
		const int c0 = s * S::cols + q * S::lane_cols;
		const bool in = c0 < K; /* the last step may be part empty */
		uint4 wv[MT][2];
#pragma unroll
		for (int m = 0; m < MT; m++)
#pragma unroll
			for (int h = 0; h < 2; h++) {
				wv[m][h] = make_uint4(0, 0, 0, 0);
				if (in)
					wv[m][h] = __ldg((const uint4 *)((const uint8_t *)w.data +
									  (wrow[m][h] + c0) * (DT == DW_F8 ? 1 : 2)));
			}
		float xv[NTL][S::lane_cols];
#pragma unroll
		for (int t = 0; t < NTL; t++) {
			if (in && xoff[t] >= 0)
				load_x<S::lane_cols, true, SILU>(xv[t], p.x, p.xb, xoff[t], c0, K);
			else
#pragma unroll
				for (int i = 0; i < S::lane_cols; i++)
					xv[t][i] = 0.0f;
		}
		if constexpr (DT == DW_F8) {
			uint32_t bh[NTL][S::mmas][2], bl[NTL][S::mmas][2];
			float inv[NTL][2]; /* the x scales to undo, of the lane's C tokens 2q, 2q + 1 */
#pragma unroll
			for (int t = 0; t < NTL; t++) {
				float mx = 0.0f;
#pragma unroll
				for (int i = 0; i < S::lane_cols; i++)
					mx = fmaxf(mx, fabsf(xv[t][i]));
				float2 sc = step_scale(mx);
#pragma unroll
				for (int j = 0; j < S::mmas; j++) {
					split_h2(xv[t][4 * j] * sc.x, xv[t][4 * j + 1] * sc.x, &bh[t][j][0], &bl[t][j][0]);
					split_h2(xv[t][4 * j + 2] * sc.x, xv[t][4 * j + 3] * sc.x, &bh[t][j][1], &bl[t][j][1]);
				}
				inv[t][0] = __shfl_sync(0xffffffffu, sc.y, 8 * q);
				inv[t][1] = __shfl_sync(0xffffffffu, sc.y, 8 * q + 4);
			}
#pragma unroll
			for (int m = 0; m < MT; m++) {
				const uint32_t u0[4] = { wv[m][0].x, wv[m][0].y, wv[m][0].z, wv[m][0].w };
				const uint32_t u1[4] = { wv[m][1].x, wv[m][1].y, wv[m][1].z, wv[m][1].w };
				const float bsc = __ldg(wsc[m] + (s * S::cols >> 7));
				uint32_t a[S::mmas][4];
#pragma unroll
				for (int j = 0; j < S::mmas; j++) {
					a[j][0] = e4m3x2_h2(u0[j]), a[j][1] = e4m3x2_h2(u1[j]);
					a[j][2] = e4m3x2_h2(u0[j] >> 16), a[j][3] = e4m3x2_h2(u1[j] >> 16);
				}
#pragma unroll
				for (int t = 0; t < NTL; t++) {
					float part[4] = {};
#pragma unroll
					for (int j = 0; j < S::mmas; j++) {
						mma_f16(part, a[j], bh[t][j][0], bh[t][j][1]);
						mma_f16(part, a[j], bl[t][j][0], bl[t][j][1]);
					}
#pragma unroll
					for (int i = 0; i < 4; i++)
						acc[m][t][i] = fmaf(part[i], bsc * inv[t][i & 1], acc[m][t][i]);
				}
			}
		} else {
			uint32_t b[NTL][S::mmas][2][3];
#pragma unroll
			for (int t = 0; t < NTL; t++)
#pragma unroll
				for (int j = 0; j < S::mmas; j++) {
					split_bf3(xv[t][4 * j], xv[t][4 * j + 1], b[t][j][0]);
					split_bf3(xv[t][4 * j + 2], xv[t][4 * j + 3], b[t][j][1]);
				}
#pragma unroll
			for (int m = 0; m < MT; m++) {
				const uint32_t u0[4] = { wv[m][0].x, wv[m][0].y, wv[m][0].z, wv[m][0].w };
				const uint32_t u1[4] = { wv[m][1].x, wv[m][1].y, wv[m][1].z, wv[m][1].w };
#pragma unroll
				for (int j = 0; j < S::mmas; j++) {
					const uint32_t a[4] = { u0[2 * j], u1[2 * j], u0[2 * j + 1], u1[2 * j + 1] };
#pragma unroll
					for (int t = 0; t < NTL; t++)
#pragma unroll
						for (int k = 0; k < 3; k++)
							mma_bf16(acc[m][t], a, b[t][j][0][k], b[t][j][1][k]);
				}
			}
		}
	}
	/* the wk partial sums of each C value, then y; lane-minor so a warp's stores hit 32 banks */
	__shared__ float red[8][REGS][32];
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int t = 0; t < NTL; t++)
#pragma unroll
			for (int i = 0; i < 4; i++)
				red[warp][(m * NTL + t) * 4 + i][lane] = acc[m][t][i];
	__syncthreads();
	for (int i = threadIdx.x; i < (8 / p.wk) * REGS * 32; i += blockDim.x) {
		const int l = i & 31, reg = (i >> 5) % REGS, g2 = (i >> 5) / REGS;
		const int m = reg / (NTL * 4), t = (reg >> 2) % NTL, c = reg & 3;
		const int row = blockIdx.x * rows_pb + g2 * 16 * MT + m * 16 + (l >> 2) + (c >> 1) * 8;
		const int tok = t * 8 + 2 * (l & 3) + (c & 1);
		if (tok >= n || row >= w.rows)
			continue;
		float sum = 0.0f;
		for (int k = 0; k < p.wk; k++)
			sum += red[g2 * p.wk + k][reg][l];
		float *dst = y + (long long)(rout ? rout[tok] : tok) * p.ldy[blockIdx.z] + row;
		*dst = p.acc ? *dst + sum : sum;
	}
}

template <int NTL, int DT>
static void gemv_mma_dt(cudaStream_t s, const gemv_kparams &p, dim3 grid)
{
	constexpr int MT = GEMV_MMA_MT;
	if (p.xb)
		gemv_mma_kernel<NTL, MT, DT, true><<<grid, 256, 0, s>>>(p);
	else
		gemv_mma_kernel<NTL, MT, DT, false><<<grid, 256, 0, s>>>(p);
}

/* gemv_mma_kernel for 2-16 tokens with its own split of K: wk warps per row tile when every
 * warp still gets two steps or more. */
static void gemv_mma(cudaStream_t s, gemv_kparams p, int rows, int max_groups)
{
	const int dt = p.w[0].dtype, cols = dt == DW_F8 ? 64 : 32;
	int steps = (p.w[0].cols + cols - 1) / cols;
	p.wk = steps >= 16 ? 8 : steps >= 8 ? 4 : steps >= 4 ? 2 : 1;
	int rows_pb = 16 * GEMV_MMA_MT * (8 / p.wk);
	dim3 grid((rows + rows_pb - 1) / rows_pb, max_groups, p.w[1].data ? 2 : 1);
	bool two = p.n > 8; /* a group holds at most n tokens: each picks an expert once */
	if (dt == DW_F8)
		two ? gemv_mma_dt<2, DW_F8>(s, p, grid) : gemv_mma_dt<1, DW_F8>(s, p, grid);
	else
		two ? gemv_mma_dt<2, DW_BF16>(s, p, grid) : gemv_mma_dt<1, DW_BF16>(s, p, grid);
}

void k_gemv(cudaStream_t s, const gemv_call *c)
{
	gemv_kparams p = {};
	p.w[0] = *c->w;
	p.y[0] = c->y;
	if (c->w2) {
		p.w[1] = *c->w2;
		p.y[1] = c->y2;
	}
	p.x = c->x;
	p.xb = c->silu_b;
	p.ldx = c->ldx;
	p.ldy[0] = c->ldy;
	p.ldy[1] = c->ldy2 ? c->ldy2 : c->ldy;
	p.n = c->n;
	p.acc = c->accumulate;
	int max_groups = 1, nt = c->n;
	if (c->groups) {
		p.grouped = 1;
		p.g = *c->groups;
		max_groups = c->groups->max_groups;
	}
	const int dt = p.w[0].dtype, K = p.w[0].cols;
	const int epl = dt == DW_F8 ? 16 : dt == DW_BF16 ? 8 : 4;
	int iters = (K + 32 * epl - 1) / (32 * epl);
	p.wk = iters >= 8 ? 8 : iters >= 4 ? 4 : iters >= 2 ? 2 : 1;
	static thread_local int max_wk = -1; /* DSV3_GEMV_MAX_WK: a cap for experiments */
	if (max_wk < 0) {
		const char *e = getenv("DSV3_GEMV_MAX_WK");
		max_wk = e ? atoi(e) : 8;
	}
	while (p.wk > max_wk && p.wk > 1)
		p.wk /= 2;
	bool vec = K % epl == 0 && c->ldx % 4 == 0 && ((uintptr_t)c->x & 15) == 0 &&
		   (!c->silu_b || ((uintptr_t)c->silu_b & 15) == 0) && ((uintptr_t)p.w[0].data & 15) == 0 &&
		   (!c->w2 || ((uintptr_t)p.w[1].data & 15) == 0) && (p.w[0].estride % 16) == 0;
	int rows = p.w[0].rows > p.w[1].rows ? p.w[0].rows : p.w[1].rows;
	if (nt >= 2 && vec && dt != DW_F32 && (!c->w2 || p.w[1].dtype == dt)) {
		gemv_mma(s, p, rows, max_groups);
		LAUNCHED("gemv_mma_kernel");
		return;
	}
	if (nt <= 1) /* four rows a warp: eight measured slower on H100 (705 vs 749 tokens/s) */
		gemv_rows_nt<1, 4>(s, p, rows, vec, max_groups);
	else if (nt <= 2)
		gemv_rows_nt<2, 4>(s, p, rows, vec, max_groups);
	else if (nt <= 4)
		gemv_rows_nt<4, 4>(s, p, rows, vec, max_groups);
	else if (nt <= 8)
		gemv_rows_nt<8, 2>(s, p, rows, vec, max_groups);
	else
		gemv_rows_nt<16, 2>(s, p, rows, vec, max_groups);
	LAUNCHED("gemv_kernel");
}

/* ---- small fused ops ---- */

__global__ void embed_kernel(float *out, dweight w, const int *ids)
{
	int t = blockIdx.x, id = ids[t];
#pragma unroll 4
	for (int c = threadIdx.x; c < w.cols; c += blockDim.x)
		out[(long long)t * w.cols + c] = dv_w(w, 0, id, c);
}

void k_embed(cudaStream_t s, float *out, const dweight *w, const int *ids, int n)
{
	embed_kernel<<<n, 1024, 0, s>>>(out, *w, ids);
	LAUNCHED("embed_kernel");
}

__global__ void rmsnorm_kernel(float *y, const float *x, int ld, dweight w, int dim, float eps)
{
	const float *xr = x + (long long)blockIdx.x * ld;
	float *yr = y + (long long)blockIdx.x * ld;
	float ss = 0.0f;
#pragma unroll 4
	for (int i = threadIdx.x; i < dim; i += blockDim.x)
		ss += xr[i] * xr[i];
	ss = dv_block_reduce<false>(ss);
	float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma unroll 4
	for (int i = threadIdx.x; i < dim; i += blockDim.x)
		yr[i] = xr[i] * inv * dv_w(w, 0, 0, i);
}

void k_rmsnorm(cudaStream_t s, float *y, const float *x, int ld, const dweight *w, int dim, int n, float eps)
{
	rmsnorm_kernel<<<n, dim >= 2048 ? 1024 : 256, 0, s>>>(y, x, ld, *w, dim, eps);
	LAUNCHED("rmsnorm_kernel");
}

__global__ void add_kernel(float *y, const float *x, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		y[i] += x[i];
}

void k_add(cudaStream_t s, float *y, const float *x, size_t n)
{
	int blocks = (int)((n + 255) / 256);
	add_kernel<<<blocks < 4096 ? blocks : 4096, 256, 0, s>>>(y, x, n);
	LAUNCHED("add_kernel");
}

__global__ void rope_kv_kernel(float *q, const float *kv, dweight kv_norm, mla_cache cache, const int *seqs,
			       const int *pos, int H, int nope, int rope, int lora, const float *inv_freq, float eps)
{
	const int t = blockIdx.x, half = rope / 2, qhd = nope + rope;
	const float p = (float)pos[t];
	float *qt = q + (long long)t * H * qhd;
#pragma unroll 4
	for (int i = threadIdx.x; i < H * half; i += blockDim.x) {
		int h = i / half, k = i % half;
		float a = p * inv_freq[k], cs = cosf(a), sn = sinf(a);
		float *x = qt + h * qhd + nope + 2 * k;
		float x0 = x[0], x1 = x[1];
		x[0] = x0 * cs - x1 * sn;
		x[1] = x0 * sn + x1 * cs;
	}
	const float *kvt = kv + (long long)t * (lora + rope);
	float *row = cache.base + ((long long)seqs[t] * cache.seq_stride + pos[t]) * (lora + rope);
	float ss = 0.0f;
	for (int i = threadIdx.x; i < lora; i += blockDim.x)
		ss += kvt[i] * kvt[i];
	ss = dv_block_reduce<false>(ss);
	float inv = 1.0f / sqrtf(ss / (float)lora + eps);
	for (int i = threadIdx.x; i < lora; i += blockDim.x)
		row[i] = kvt[i] * inv * dv_w(kv_norm, 0, 0, i);
	for (int k = threadIdx.x; k < half; k += blockDim.x) {
		float a = p * inv_freq[k], cs = cosf(a), sn = sinf(a);
		float x0 = kvt[lora + 2 * k], x1 = kvt[lora + 2 * k + 1];
		row[lora + 2 * k] = x0 * cs - x1 * sn;
		row[lora + 2 * k + 1] = x0 * sn + x1 * cs;
	}
}

void k_rope_kv(cudaStream_t s, float *q, const float *kv, const dweight *kv_norm, mla_cache cache,
	       const int *seqs, const int *pos, int n, int H, int nope, int rope, int lora,
	       const float *inv_freq, float eps)
{
	rope_kv_kernel<<<n, 256, 0, s>>>(q, kv, *kv_norm, cache, seqs, pos, H, nope, rope, lora, inv_freq, eps);
	LAUNCHED("rope_kv_kernel");
}

/* MLA attention: attention.cu. */

/* ---- MoE routing ---- */

/* (value, index) argmax over the warp, ties to the lower index. */
__device__ __forceinline__ void warp_argmax(float &v, int &i)
{
	for (int o = 16; o; o >>= 1) {
		float ov = __shfl_xor_sync(0xffffffffu, v, o);
		int oi = __shfl_xor_sync(0xffffffffu, i, o);
		if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i)))
			v = ov, i = oi;
	}
}

/* One warp per token. smem: sc[E], s0[E], taken[E] (as int), gs[32]. */
__global__ void route_kernel(route_args a, dweight bias, int has_bias, const float *scores, int *topk, float *weights)
{
	extern __shared__ float sm[];
	float *sc = sm, *s0 = sm + a.E;
	int *taken = (int *)(s0 + a.E);
	__shared__ float gs[32];
	__shared__ int keep[32];
	const int t = blockIdx.x, lane = threadIdx.x, E = a.E;
	const float *in = scores + (long long)t * E;
	float m = -INFINITY;
	if (!a.sigmoid) {
		for (int e = lane; e < E; e += 32)
			m = fmaxf(m, in[e]);
		m = dv_warp_max(m);
	}
	float sum = 0.0f;
	for (int e = lane; e < E; e += 32) {
		float v = a.sigmoid ? 1.0f / (1.0f + expf(-in[e])) : expf(in[e] - m);
		s0[e] = v;
		sum += v;
	}
	sum = dv_warp_sum(sum);
	for (int e = lane; e < E; e += 32) {
		if (!a.sigmoid)
			s0[e] /= sum;
		sc[e] = s0[e] + (has_bias ? dv_w(bias, 0, 0, e) : 0.0f);
		taken[e] = 0;
	}
	__syncwarp();
	if (a.groups > 1) {
		const int per = E / a.groups;
		if (lane < a.groups) {
			const float *g = sc + lane * per;
			int b1 = 0;
			for (int i = 1; i < per; i++)
				if (g[i] > g[b1])
					b1 = i;
			float v = g[b1];
			if (has_bias && per > 1) {
				int b2 = -1;
				for (int i = 0; i < per; i++)
					if (i != b1 && (b2 < 0 || g[i] > g[b2]))
						b2 = i;
				v += g[b2];
			}
			gs[lane] = v;
			keep[lane] = 0;
		}
		__syncwarp();
		if (!lane)
			for (int k = 0; k < a.limited_groups; k++) {
				int best = -1;
				for (int g = 0; g < a.groups; g++)
					if (!keep[g] && (best < 0 || gs[g] > gs[best]))
						best = g;
				keep[best] = 1;
			}
		__syncwarp();
		for (int e = lane; e < E; e += 32)
			if (!keep[e / per])
				sc[e] = -INFINITY;
		__syncwarp();
	}
	for (int k = 0; k < a.K; k++) {
		float v = 0.0f;
		int i = -1;
		for (int e = lane; e < E; e += 32)
			if (!taken[e] && (i < 0 || sc[e] > v))
				v = sc[e], i = e;
		warp_argmax(v, i);
		if (!lane)
			taken[i] = 1;
		__syncwarp();
	}
	int k0 = 0;
	for (int base = 0; base < E; base += 32) {
		int e = base + lane, is = e < E && taken[e];
		unsigned b = __ballot_sync(0xffffffffu, is);
		if (is) {
			int k = k0 + __popc(b & ((1u << lane) - 1));
			topk[t * a.K + k] = e;
			weights[t * a.K + k] = s0[e];
		}
		k0 += __popc(b);
	}
	__syncwarp();
	if (!lane) {
		float tot = 0.0f;
		for (int k = 0; k < a.K; k++)
			tot += weights[t * a.K + k];
		for (int k = 0; k < a.K; k++) {
			float wv = weights[t * a.K + k];
			weights[t * a.K + k] = (a.sigmoid ? wv / tot : wv) * a.route_scale;
		}
	}
}

void k_route(cudaStream_t s, const route_args *a, const float *scores, int n, int *topk, float *weights)
{
	dweight none = {};
	route_kernel<<<n, 32, sizeof(float) * 3 * a->E, s>>>(*a, a->bias ? *a->bias : none, a->bias != nullptr,
							      scores, topk, weights);
	LAUNCHED("route_kernel");
}

/* One group per distinct expert of the pairs (topk[p], p < P) whose expert is in [lo, lo + count),
 * its pairs in order; a group's expert is expert - lo (its slot in this rank's stack). One rank
 * of one: lo 0, every expert. */
__global__ void moe_groups_kernel(const int *topk, int P, int K, int lo, int count, int *g_count, int *exp,
					int *cnt, int *tok, int *pair)
{
	__shared__ int gid[256];
	const int p = threadIdx.x, e = p < P ? topk[p] : -1;
	const bool mine = e >= lo && e < lo + count;
	int first = p, slot = 0, total = 0;
	if (mine) {
		for (int q = 0; q < P; q++)
			if (topk[q] == e) {
				if (q < first)
					first = q;
				if (q < p)
					slot++;
				total++;
			}
	}
	__syncthreads();
	if (!p) {
		int G = 0;
		for (int q = 0; q < P; q++) {
			int eq = topk[q], leader = eq >= lo && eq < lo + count;
			for (int r = 0; r < q && leader; r++)
				leader = topk[r] != eq;
			gid[q] = leader ? G++ : -1;
		}
		*g_count = G;
	}
	__syncthreads();
	if (mine) {
		int g = gid[first];
		if (first == p) {
			exp[g] = e - lo;
			cnt[g] = total;
		}
		tok[g * GEMV_MAX_TOKENS + slot] = p / K;
		pair[g * GEMV_MAX_TOKENS + slot] = p;
	}
}

void k_moe_groups_local(cudaStream_t s, const int *topk, int n, int K, int lo, int count, int *g_count, int *exp,
			int *cnt, int *tok, int *pair)
{
	moe_groups_kernel<<<1, 256, 0, s>>>(topk, n * K, K, lo, count, g_count, exp, cnt, tok, pair);
	LAUNCHED("moe_groups_kernel");
}

void k_moe_groups(cudaStream_t s, const int *topk, int n, int K, int *count, int *exp, int *cnt, int *tok, int *pair)
{
	k_moe_groups_local(s, topk, n, K, 0, INT_MAX, count, exp, cnt, tok, pair);
}

__global__ void moe_combine_kernel(float *x, const float *y, const float *w, int K, int dim)
{
	const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
	if (c >= dim)
		return;
	float s = 0.0f;
#pragma unroll 8
	for (int k = 0; k < K; k++)
		s = fmaf(w[t * K + k], y[((long long)t * K + k) * dim + c], s);
	x[(long long)t * dim + c] += s;
}

void k_moe_combine(cudaStream_t s, float *x, const float *y, const float *weights, int n, int K, int dim)
{
	moe_combine_kernel<<<dim3((dim + 255) / 256, n), 256, 0, s>>>(x, y, weights, K, dim);
	LAUNCHED("moe_combine_kernel");
}

/* ---- prefill helpers ---- */

__global__ void to_bf16_kernel(__nv_bfloat16 *out, const float *x, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		out[i] = __float2bfloat16_rn(x[i]);
}

void k_to_bf16(cudaStream_t s, void *out, const float *x, size_t n)
{
	size_t blocks = (n + 255) / 256;
	to_bf16_kernel<<<blocks < 8192 ? (int)blocks : 8192, 256, 0, s>>>((__nv_bfloat16 *)out, x, n);
	LAUNCHED("to_bf16_kernel");
}

