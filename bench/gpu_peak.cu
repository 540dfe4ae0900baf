/* dsv3-gpu-peak: what the current GPU can do, measured, as the yardsticks of the engine's figures
 * (issue 6's benchmarks):
 *   - device-to-device copy bandwidth: cudaMemcpyAsync of large buffers, two buffer pairs used in
 *     turn so that no copy finds its source in L2; bytes read + bytes written per copy, the median
 *     of 20 copies after warm-up, each timed by CUDA events;
 *   - the BF16 matmul rate through cuBLAS (cublasGemmEx, BF16 in and out, FP32 compute) at 8192^3
 *     and at the shapes of a prefill (M tokens x N outputs x K inputs, M = 512 and 4096), the median
 *     of 10 timings after 3 warm-ups.
 *   - the FP8 (E4M3) matmul rate through cuBLASLt at the same shapes, with DeepSeek's scaling:
 *     128x128 block scales on the weight, 1x128 on the activations ("block128"), and with one
 *     scale per tensor ("tensor"); a mode cuBLASLt refuses is reported as unsupported, not fatal.
 * Output lines a script can grep:
 *   device: NAME
 *   copy_bandwidth_GBps: X
 *   bf16_gemm_TFLOPs MxNxK: Y
 *   fp8_gemm_TFLOPs MxNxK block128|tensor: Z
 * Every CUDA and cuBLAS call is checked; a failure names the call and exits 1 (but for the FP8
 * matmul's setup, see above). */
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#define PROG "dsv3-gpu-peak"

static void cuda_check(cudaError_t e, const char *what, int line)
{
	if (e == cudaSuccess)
		return;
	fprintf(stderr, PROG ": line %d: %s: %s\n", line, what, cudaGetErrorString(e));
	exit(1);
}

static void cublas_check(cublasStatus_t s, const char *what, int line)
{
	if (s == CUBLAS_STATUS_SUCCESS)
		return;
	fprintf(stderr, PROG ": line %d: %s: cuBLAS status %d\n", line, what, (int)s);
	exit(1);
}

#define CK(call) cuda_check((call), #call, __LINE__)
#define CB(call) cublas_check((call), #call, __LINE__)
/* After a kernel launch: the launch's own error, then the kernel's. */
#define CK_LAUNCH(name)                                      \
	do {                                                 \
		CK(cudaGetLastError());                      \
		cuda_check(cudaDeviceSynchronize(), name, __LINE__); \
	} while (0)

static double median(std::vector<double> v)
{
	std::sort(v.begin(), v.end());
	size_t n = v.size();
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Uniform-ish values in [-1, -1/64] u [1/64, 1] from a hash of the index: never zero, so that no
 * hardware shortcut on zeros flatters the rate. */
__global__ void fill_bf16(__nv_bfloat16 *p, size_t n, uint32_t seed)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		uint32_t h = (uint32_t)i * 2654435761u ^ seed;
		h ^= h >> 15;
		h *= 2246822519u;
		h ^= h >> 13;
		float mag = 1.0f / 64 + (h >> 9) * (1.0f / (1 << 23)) * (1.0f - 1.0f / 64);
		p[i] = __float2bfloat16(h & 1 ? mag : -mag);
	}
}

static void fill(__nv_bfloat16 *p, size_t n, uint32_t seed)
{
	fill_bf16<<<1024, 256>>>(p, n, seed);
	CK_LAUNCH("fill_bf16");
}

/* Milliseconds of the work fn() enqueues on stream s, by events around it. */
template <typename F> static double time_ms(cudaStream_t s, F fn)
{
	cudaEvent_t a, b;
	CK(cudaEventCreate(&a));
	CK(cudaEventCreate(&b));
	CK(cudaEventRecord(a, s));
	fn();
	CK(cudaEventRecord(b, s));
	CK(cudaEventSynchronize(b));
	float ms = 0;
	CK(cudaEventElapsedTime(&ms, a, b));
	CK(cudaEventDestroy(a));
	CK(cudaEventDestroy(b));
	return ms;
}

/* Copy size: want_gib per buffer, less when four buffers would not fit in 90% of free memory. */
static size_t copy_bytes(double want_gib)
{
	size_t free_b, total_b;
	CK(cudaMemGetInfo(&free_b, &total_b));
	size_t want = (size_t)(want_gib * (1ull << 30));
	size_t fit = (size_t)(free_b * 0.9 / 4);
	size_t n = std::min(want, fit);
	return n & ~(size_t)((1 << 20) - 1); /* whole MiB */
}

static double copy_bandwidth_gbps(double want_gib, cudaStream_t s)
{
	size_t n = copy_bytes(want_gib);
	if (n < (64u << 20)) {
		fprintf(stderr, PROG ": too little free device memory for the copy test\n");
		exit(1);
	}
	void *buf[4];
	for (int i = 0; i < 4; i++) {
		CK(cudaMalloc(&buf[i], n));
		CK(cudaMemsetAsync(buf[i], i + 1, n, s));
	}
	auto copy = [&](int k) { CK(cudaMemcpyAsync(buf[2 * (k % 2) + 1], buf[2 * (k % 2)], n, cudaMemcpyDeviceToDevice, s)); };
	for (int k = 0; k < 4; k++)
		copy(k);
	CK(cudaStreamSynchronize(s));
	std::vector<double> gbps;
	for (int k = 0; k < 20; k++) {
		double ms = time_ms(s, [&] { copy(k); });
		gbps.push_back(2.0 * n / (ms * 1e-3) / 1e9);
	}
	for (int i = 0; i < 4; i++)
		CK(cudaFree(buf[i]));
	printf("copy_bytes_per_buffer: %zu\n", n);
	return median(gbps);
}

/* C[M,N] = X[M,K] W[N,K]^T in row-major terms (a linear layer on M tokens): in cuBLAS's
 * column-major view, C^T (N x M) = op_T(W as K x N) * (X as K x M). */
static void gemm(cublasHandle_t h, int m, int n, int k, const __nv_bfloat16 *w, const __nv_bfloat16 *x,
		 __nv_bfloat16 *c)
{
	const float one = 1.0f, zero = 0.0f;
	CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero,
			c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* TFLOP/s of one M x N x K shape: median of 10 timings after 3 warm-ups; each timing runs the
 * GEMM enough times back to back (at least ~2 TFLOP of work) that launch cost does not dominate. */
static double gemm_tflops(cublasHandle_t h, cudaStream_t s, int m, int n, int k)
{
	__nv_bfloat16 *w, *x, *c;
	CK(cudaMalloc(&w, sizeof(*w) * (size_t)n * k));
	CK(cudaMalloc(&x, sizeof(*x) * (size_t)m * k));
	CK(cudaMalloc(&c, sizeof(*c) * (size_t)m * n));
	fill(w, (size_t)n * k, 0x9e3779b9u);
	fill(x, (size_t)m * k, 0x7f4a7c15u);
	double flop = 2.0 * m * n * k;
	int inner = (int)std::max(1.0, 2e12 / flop);
	for (int r = 0; r < 3; r++)
		gemm(h, m, n, k, w, x, c);
	CK(cudaStreamSynchronize(s));
	std::vector<double> tf;
	for (int r = 0; r < 10; r++) {
		double ms = time_ms(s, [&] {
			for (int i = 0; i < inner; i++)
				gemm(h, m, n, k, w, x, c);
		});
		tf.push_back(flop * inner / (ms * 1e-3) / 1e12);
	}
	CK(cudaFree(w));
	CK(cudaFree(x));
	CK(cudaFree(c));
	return median(tf);
}

/* E4M3 values of magnitude 1/64 .. 1 with random signs, never zero, from a hash of the index. */
__global__ void fill_fp8(__nv_fp8_e4m3 *p, size_t n, uint32_t seed)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		uint32_t h = (uint32_t)i * 2654435761u ^ seed;
		h ^= h >> 15;
		h *= 2246822519u;
		h ^= h >> 13;
		float mag = 1.0f / 64 + (h >> 9) * (1.0f / (1 << 23)) * (1.0f - 1.0f / 64);
		p[i] = __nv_fp8_e4m3(h & 1 ? mag : -mag);
	}
}

__global__ void fill_f32(float *p, size_t n, float v)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		p[i] = v;
}

/* One FP8 matmul setup: weight W [N,K] and activations X [M,K] in E4M3, D [M,N] in BF16, and the
 * scale tensors (all ones: only their sizes matter for the rate, so they are allocated generously,
 * whatever layout cuBLASLt expects). */
struct fp8_gemm {
	cublasLtMatmulDesc_t op = nullptr;
	cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
	cublasLtMatmulHeuristicResult_t algo;
	void *work = nullptr;
	size_t work_size = 64u << 20;
};

/* A cuBLASLt status in the FP8 setup: on failure, says which call and returns false. */
static bool lt_ok(cublasStatus_t st, const char *what, const char *shape, const char *mode)
{
	if (st == CUBLAS_STATUS_SUCCESS)
		return true;
	printf("fp8_gemm %s %s: unsupported (%s: cuBLAS status %d)\n", shape, mode, what, (int)st);
	return false;
}
#define LT(call) lt_ok((call), #call, shape, mode)

static bool fp8_setup(cublasLtHandle_t lt, fp8_gemm *g, int m, int n, int k, bool block, float *sw, float *sx,
		      const char *shape, const char *mode)
{
	cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
	if (!LT(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F)) ||
	    !LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t)) ||
	    !LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt)) ||
	    !LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, sizeof sw)) ||
	    !LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, sizeof sx)))
		return false;
	if (block) {
		int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
		if (!LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma)) ||
		    !LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb)))
			return false;
	}
	/* column-major view as in gemm(): D^T (N x M) = op_T(W as K x N) * (X as K x M) */
	if (!LT(cublasLtMatrixLayoutCreate(&g->la, CUDA_R_8F_E4M3, k, n, k)) ||
	    !LT(cublasLtMatrixLayoutCreate(&g->lb, CUDA_R_8F_E4M3, k, m, k)) ||
	    !LT(cublasLtMatrixLayoutCreate(&g->ld, CUDA_R_16BF, n, m, n)))
		return false;
	cublasLtMatmulPreference_t pref;
	if (!LT(cublasLtMatmulPreferenceCreate(&pref)))
		return false;
	int found = 0;
	bool ok = LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &g->work_size,
							  sizeof g->work_size)) &&
		  LT(cublasLtMatmulAlgoGetHeuristic(lt, g->op, g->la, g->lb, g->ld, g->ld, pref, 1, &g->algo, &found));
	CB(cublasLtMatmulPreferenceDestroy(pref));
	if (ok && !found) {
		printf("fp8_gemm %s %s: unsupported (no algorithm)\n", shape, mode);
		ok = false;
	}
	if (ok)
		CK(cudaMalloc(&g->work, g->work_size));
	return ok;
}

static void fp8_free(fp8_gemm *g)
{
	if (g->work)
		CK(cudaFree(g->work));
	if (g->la)
		CB(cublasLtMatrixLayoutDestroy(g->la));
	if (g->lb)
		CB(cublasLtMatrixLayoutDestroy(g->lb));
	if (g->ld)
		CB(cublasLtMatrixLayoutDestroy(g->ld));
	if (g->op)
		CB(cublasLtMatmulDescDestroy(g->op));
}

/* TFLOP/s of the FP8 matmul M x N x K (block: DeepSeek's block scales, else one scale per tensor),
 * timed as gemm_tflops; -1 when cuBLASLt refuses it. */
static double fp8_tflops(cublasLtHandle_t lt, cudaStream_t s, int m, int n, int k, bool block)
{
	char shape[64];
	const char *mode = block ? "block128" : "tensor";
	snprintf(shape, sizeof shape, "%dx%dx%d", m, n, k);
	__nv_fp8_e4m3 *w, *x;
	__nv_bfloat16 *d;
	float *sw, *sx;
	size_t nsw = 2 * ((size_t)(n + 127) / 128 + 4) * ((k + 127) / 128 + 4);
	size_t nsx = 2 * ((size_t)m + 128) * ((k + 127) / 128 + 4);
	CK(cudaMalloc(&w, (size_t)n * k));
	CK(cudaMalloc(&x, (size_t)m * k));
	CK(cudaMalloc(&d, sizeof(*d) * (size_t)m * n));
	CK(cudaMalloc(&sw, sizeof(float) * nsw));
	CK(cudaMalloc(&sx, sizeof(float) * nsx));
	fill_fp8<<<1024, 256>>>(w, (size_t)n * k, 0x9e3779b9u);
	CK_LAUNCH("fill_fp8");
	fill_fp8<<<1024, 256>>>(x, (size_t)m * k, 0x7f4a7c15u);
	CK_LAUNCH("fill_fp8");
	fill_f32<<<256, 256>>>(sw, nsw, 1.0f);
	CK_LAUNCH("fill_f32");
	fill_f32<<<256, 256>>>(sx, nsx, 1.0f);
	CK_LAUNCH("fill_f32");
	fp8_gemm g;
	double rate = -1;
	if (fp8_setup(lt, &g, m, n, k, block, sw, sx, shape, mode)) {
		const float one = 1.0f, zero = 0.0f;
		auto run = [&]() {
			return cublasLtMatmul(lt, g.op, &one, w, g.la, x, g.lb, &zero, d, g.ld, d, g.ld, &g.algo.algo, g.work,
					      g.work_size, s);
		};
		if (LT(run())) {
			double flop = 2.0 * m * n * k;
			int inner = (int)std::max(1.0, 4e12 / flop);
			for (int r = 0; r < 2; r++)
				CB(run());
			CK(cudaStreamSynchronize(s));
			std::vector<double> tf;
			for (int r = 0; r < 10; r++) {
				double ms = time_ms(s, [&] {
					for (int i = 0; i < inner; i++)
						CB(run());
				});
				tf.push_back(flop * inner / (ms * 1e-3) / 1e12);
			}
			rate = median(tf);
		}
	}
	CK(cudaStreamSynchronize(s));
	fp8_free(&g);
	CK(cudaFree(w));
	CK(cudaFree(x));
	CK(cudaFree(d));
	CK(cudaFree(sw));
	CK(cudaFree(sx));
	return rate;
}

static const int gemm_shapes[][3] = {
	{ 8192, 8192, 8192 },	{ 512, 7168, 7168 },	{ 4096, 7168, 7168 }, { 512, 18432, 7168 },
	{ 4096, 18432, 7168 }, { 512, 7168, 18432 }, { 4096, 7168, 18432 },
};

static void usage(FILE *f)
{
	fprintf(f, "usage: " PROG " [--copy-gib G] [--no-gemm] [--no-fp8] [--no-copy]\n"
		   "Measures the current GPU's device copy bandwidth (read + write bytes, GB/s) and cuBLAS\n"
		   "BF16 matmul rate (TFLOP/s) at 8192^3 and at prefill shapes (M tokens x N x K).\n"
		   "  --copy-gib G   bytes per copy buffer in GiB (default 4; four buffers are allocated)\n"
		   "FP8 (E4M3) rates through cuBLASLt: DeepSeek's block scales (block128) and per tensor.\n"
		   "  --no-gemm      skip the BF16 matmul rates\n"
		   "  --no-fp8       skip the FP8 matmul rates\n"
		   "  --no-copy      skip the copy bandwidth\n");
}

int main(int argc, char **argv)
{
	double gib = 4;
	int do_copy = 1, do_gemm = 1, do_fp8 = 1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else if (!strcmp(argv[i], "--copy-gib") && i + 1 < argc && atof(argv[i + 1]) > 0) {
			gib = atof(argv[++i]);
		} else if (!strcmp(argv[i], "--no-gemm")) {
			do_gemm = 0;
		} else if (!strcmp(argv[i], "--no-fp8")) {
			do_fp8 = 0;
		} else if (!strcmp(argv[i], "--no-copy")) {
			do_copy = 0;
		} else {
			usage(stderr);
			return 1;
		}
	}
	int dev;
	cudaDeviceProp prop;
	CK(cudaGetDevice(&dev));
	CK(cudaGetDeviceProperties(&prop, dev));
	printf("device: %s (sm_%d%d, %.1f GiB)\n", prop.name, prop.major, prop.minor,
	       prop.totalGlobalMem / (double)(1ull << 30));
	cudaStream_t s;
	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	if (do_copy)
		printf("copy_bandwidth_GBps: %.1f\n", copy_bandwidth_gbps(gib, s));
	if (do_gemm) {
		cublasHandle_t h;
		CB(cublasCreate(&h));
		CB(cublasSetStream(h, s));
		for (const auto &sh : gemm_shapes) {
			double t = gemm_tflops(h, s, sh[0], sh[1], sh[2]);
			printf("bf16_gemm_TFLOPs %dx%dx%d: %.1f\n", sh[0], sh[1], sh[2], t);
			fflush(stdout);
		}
		CB(cublasDestroy(h));
	}
	if (do_fp8) {
		cublasLtHandle_t lt;
		CB(cublasLtCreate(&lt));
		for (int block = 1; block >= 0; block--) {
			for (const auto &sh : gemm_shapes) {
				double t = fp8_tflops(lt, s, sh[0], sh[1], sh[2], block);
				if (t > 0)
					printf("fp8_gemm_TFLOPs %dx%dx%d %s: %.1f\n", sh[0], sh[1], sh[2],
					       block ? "block128" : "tensor", t);
				fflush(stdout);
			}
		}
		CB(cublasLtDestroy(lt));
	}
	CK(cudaStreamDestroy(s));
	return 0;
}
