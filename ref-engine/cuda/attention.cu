/* MLA attention on the GPU, absorbed (DESIGN §4), for n queries each of its own sequence and
 * position over the compressed cache [c | k_pe] of 576 numbers a token:
 *   absorb   qc[t, h] = [q_nope[t, h] . wkv_b[h, :nope] | q_pe[t, h]]
 *   scores   s[t, h, p] = softmax_scale * qc[t, h] . cache[p], p <= pos[t]
 *   softmax  over p, in fp32
 *   pv       o_c[t, h] = sum_p P[t, h, p] cache[p, :lora], in up to ATT_SPLITS slices of p
 *   vproj    out[t, h] = (sum of the slices) . wkv_b[h, nope:]^T
 * Every kernel reads its weights or cache rows once per block with all lanes busy; the grid
 * sizes depend only on (n, ctx_cap), so a decode step can be captured in a graph. */
#include <math.h>

#include "device.cuh"
#include "kernels.cuh"

#define ATT_QT 4       /* queries per block in absorb */
#define ATT_VT 8       /* queries per block in vproj */
#define ATT_TT 32      /* cache rows per block in scores: one per lane */
#define ATT_SH 8       /* heads per block in scores: one per warp */
#define ATT_HG 4       /* heads per block in pv */
#define ATT_SPLITS 16  /* slices of the context in pv */
#define ATT_CB 512     /* columns of wkv_b a warp covers in one pass: 32 lanes x 16 */

#define LAUNCHED(name) cuda_check(cudaGetLastError(), name)

static int att_split(int ctx_cap)
{
	int ss = (ctx_cap + ATT_SPLITS - 1) / ATT_SPLITS;
	ss = (ss + 31) / 32 * 32;
	return ss < 32 ? 32 : ss;
}

size_t mla_scratch_floats(int H, int lora, int rope, int n, int ctx_cap, float **qc, float **scores,
			  float **partial, float *base)
{
	size_t a = (size_t)n * H * (lora + rope), b = (size_t)n * H * ctx_cap;
	size_t c = (size_t)n * ATT_SPLITS * H * lora;
	if (base) {
		*qc = base;
		*scores = base + a;
		*partial = base + a + b;
	}
	return a + b + c;
}

/* Block (h, tile of ATT_QT queries); warp w takes the rows j = w mod 8 of wkv_b[h, :nope], lane
 * l the 16 columns from 16 l of each 512-column pass; the 8 warps' sums meet in shared memory. */
__global__ void __launch_bounds__(256) absorb_kernel(mla_args a, const float *q)
{
	extern __shared__ float sm[];
	float *qn = sm, *red = sm + ATT_QT * a.nope; /* [ATT_QT][nope], [8][ATT_QT][ATT_CB] */
	const int h = blockIdx.x, t0 = blockIdx.y * ATT_QT, qhd = a.nope + a.rope, D = a.lora + a.rope;
	const int nq = min(ATT_QT, a.n - t0), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	for (int i = threadIdx.x; i < ATT_QT * a.nope; i += blockDim.x) {
		int t = i / a.nope, j = i % a.nope;
		qn[i] = t < nq ? q[(long long)(t0 + t) * a.H * qhd + h * qhd + j] : 0.0f;
	}
	__syncthreads();
	for (int cb = 0; cb < a.lora; cb += ATT_CB) {
		const int c = cb + lane * 16;
		float acc[ATT_QT][16] = {};
#pragma unroll 4
		for (int j = warp; j < a.nope; j += 8) {
			float wv[16];
			dv_w16(wv, a.wkv_b, (long long)h * (a.nope + a.v) + j, c);
#pragma unroll
			for (int t = 0; t < ATT_QT; t++) {
				float qv = qn[t * a.nope + j];
#pragma unroll
				for (int k = 0; k < 16; k++)
					acc[t][k] = fmaf(qv, wv[k], acc[t][k]);
			}
		}
		/* column lane * 16 + k at k * 32 + lane: the stores hit 32 different banks */
#pragma unroll
		for (int t = 0; t < ATT_QT; t++)
#pragma unroll
			for (int k = 0; k < 16; k++)
				red[(warp * ATT_QT + t) * ATT_CB + k * 32 + lane] = acc[t][k];
		__syncthreads();
		for (int i = threadIdx.x; i < nq * ATT_CB; i += blockDim.x) {
			int t = i / ATT_CB, at = i % ATT_CB, cc = (at % 32) * 16 + at / 32;
			if (cb + cc >= a.lora)
				continue;
			float s = 0.0f;
#pragma unroll
			for (int w = 0; w < 8; w++)
				s += red[(w * ATT_QT + t) * ATT_CB + at];
			a.qc[((long long)(t0 + t) * a.H + h) * D + cb + cc] = s;
		}
		__syncthreads();
	}
	for (int i = threadIdx.x; i < nq * a.rope; i += blockDim.x) {
		int t = i / a.rope, k = i % a.rope;
		a.qc[((long long)(t0 + t) * a.H + h) * D + a.lora + k] =
			q[(long long)(t0 + t) * a.H * qhd + h * qhd + a.nope + k];
	}
}

/* Block (32 cache rows, query t, ATT_SH heads): the rows and the heads' qc in shared memory,
 * one cache row per lane, four partial sums to keep the FMAs independent. With one_seq (a
 * prefill chunk: every query of one sequence) the block takes all the queries in turn, so the
 * rows are read once for all of them. */
__global__ void __launch_bounds__(256) scores_kernel(mla_args a)
{
	extern __shared__ float sm[];
	const int p0 = blockIdx.x * ATT_TT, hg = blockIdx.z * ATT_SH, D = a.lora + a.rope;
	const int t0 = a.one_seq ? 0 : blockIdx.y, t1 = a.one_seq ? a.n : blockIdx.y + 1;
	int last = -1;
	for (int t = t0; t < t1; t++)
		last = max(last, a.pos[t]);
	if (p0 > last)
		return;
	/* rows D + 4 apart when D % 4 == 0 (16-byte reads, each quarter warp on 32 banks), else D + 1 */
	const int pitch = D % 4 ? D + 1 : D + 4;
	float *tile = sm, *qs = sm + ATT_TT * pitch; /* [ATT_TT][pitch], [ATT_SH][D] */
	const float *rows = a.cache.base + ((long long)a.seqs[t0] * a.cache.seq_stride + p0) * D;
	const int np = min(ATT_TT, last + 1 - p0), nh = min(ATT_SH, a.H - hg), D4 = D / 4;
	if (D % 4 == 0) { /* 16-byte loads, several in flight */
#pragma unroll 4
		for (int i = threadIdx.x; i < np * D4; i += blockDim.x) {
			float4 v = __ldg((const float4 *)rows + i);
			*(float4 *)(tile + (i / D4) * pitch + (i % D4) * 4) = v;
		}
	} else {
		for (int i = threadIdx.x; i < np * D; i += blockDim.x)
			tile[(i / D) * pitch + i % D] = rows[i];
	}
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	for (int t = t0; t < t1; t++) {
		if (p0 > a.pos[t]) /* the same for the whole block */
			continue;
		__syncthreads(); /* the tile is in; the last query's qs is read */
		if (D % 4 == 0) {
			const float4 *qsrc = (const float4 *)(a.qc + ((long long)t * a.H + hg) * D);
#pragma unroll 4
			for (int i = threadIdx.x; i < nh * D4; i += blockDim.x)
				((float4 *)qs)[i] = qsrc[i];
		} else {
			for (int i = threadIdx.x; i < nh * D; i += blockDim.x)
				qs[i] = a.qc[((long long)t * a.H + hg) * D + i];
		}
		__syncthreads();
		if (lane >= min(ATT_TT, a.pos[t] + 1 - p0))
			continue;
		const float *tr = tile + lane * pitch;
		for (int hh = warp; hh < nh; hh += blockDim.x >> 5) {
			const float *qv = qs + hh * D;
			float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
			int d = 0;
			if (D % 4 == 0) {
#pragma unroll 4
				for (; d < D; d += 4) {
					float4 x = *(const float4 *)(qv + d), y = *(const float4 *)(tr + d);
					s0 = fmaf(x.x, y.x, s0);
					s1 = fmaf(x.y, y.y, s1);
					s2 = fmaf(x.z, y.z, s2);
					s3 = fmaf(x.w, y.w, s3);
				}
			}
			for (; d < D; d++)
				s0 = fmaf(qv[d], tr[d], s0);
			a.scores[((long long)t * a.H + hg + hh) * a.ctx_cap + p0 + lane] =
				((s0 + s1) + (s2 + s3)) * a.softmax_scale;
		}
	}
}

__global__ void __launch_bounds__(256) softmax_kernel(mla_args a)
{
	const int h = blockIdx.x, t = blockIdx.y, n = a.pos[t] + 1;
	float *s = a.scores + ((long long)t * a.H + h) * a.ctx_cap;
	float m = -INFINITY;
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		m = fmaxf(m, s[i]);
	m = dv_block_reduce<true>(m);
	float sum = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float e = expf(s[i] - m);
		s[i] = e;
		sum += e;
	}
	sum = dv_block_reduce<false>(sum);
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		s[i] /= sum;
	for (int i = n + threadIdx.x; i < a.zero_to; i += blockDim.x) /* for a GEMM over all the rows */
		s[i] = 0.0f;
}

/* partial[t, slice, h, c] = sum over the slice's rows p of P[t, h, p] * cache[p, c], c < lora. */
__global__ void __launch_bounds__(256) pv_kernel(mla_args a, int split)
{
	const int hg = blockIdx.x * ATT_HG, sp = blockIdx.y, t = blockIdx.z, D = a.lora + a.rope;
	const int p0 = sp * split, last = a.pos[t];
	if (p0 > last)
		return;
	const int p1 = min(last + 1, p0 + split), nh = min(ATT_HG, a.H - hg);
	const float *rows = a.cache.base + (long long)a.seqs[t] * a.cache.seq_stride * D;
	const float *P = a.scores + ((long long)t * a.H + hg) * a.ctx_cap;
	for (int c = threadIdx.x; c < a.lora; c += blockDim.x) {
		float acc[ATT_HG] = {};
#pragma unroll 4
		for (int p = p0; p < p1; p++) {
			float cv = rows[(long long)p * D + c];
#pragma unroll
			for (int h = 0; h < ATT_HG; h++)
				if (h < nh)
					acc[h] = fmaf(__ldg(P + (long long)h * a.ctx_cap + p), cv, acc[h]);
		}
		for (int h = 0; h < nh; h++)
			a.partial[(((long long)t * ATT_SPLITS + sp) * a.H + hg + h) * a.lora + c] = acc[h];
	}
}

/* Block (h, tile of ATT_VT queries): oc[t * H + h] into shared memory, then warps over the v rows
 * of wkv_b[h, nope:], 16 columns a lane (the shapes the grouped GEMV cannot take). */
__global__ void __launch_bounds__(256) vproj_kernel(mla_args a, const float *ocg, float *out)
{
	extern __shared__ float oc[]; /* [ATT_VT][lora] */
	const int h = blockIdx.x, t0 = blockIdx.y * ATT_VT, nq = min(ATT_VT, a.n - t0);
	for (int i = threadIdx.x; i < ATT_VT * a.lora; i += blockDim.x) {
		int t = i / a.lora, c = i % a.lora;
		oc[i] = t < nq ? ocg[((long long)(t0 + t) * a.H + h) * a.lora + c] : 0.0f;
	}
	__syncthreads();
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	for (int j = warp; j < a.v; j += blockDim.x >> 5) {
		const long long row = (long long)h * (a.nope + a.v) + a.nope + j;
		float acc[ATT_VT] = {};
		for (int c = lane * 16; c < a.lora; c += ATT_CB) {
			float wv[16];
			dv_w16(wv, a.wkv_b, row, c);
#pragma unroll
			for (int t = 0; t < ATT_VT; t++)
#pragma unroll
				for (int k = 0; k < 16; k++)
					if (c + k < a.lora)
						acc[t] = fmaf(oc[t * a.lora + c + k], wv[k], acc[t]);
		}
#pragma unroll
		for (int t = 0; t < ATT_VT; t++) {
			float v = dv_warp_sum(acc[t]);
			if (!lane && t < nq)
				out[((long long)(t0 + t) * a.H + h) * a.v + j] = v;
		}
	}
}

/* oc[t * H + h, c] = sum over the slices of partial[t, slice, h, c]: the GEMV's input rows. */
__global__ void oc_sum_kernel(mla_args a, int split, float *oc)
{
	const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (long long)a.n * a.H * a.lora)
		return;
	const int c = (int)(i % a.lora), h = (int)(i / a.lora % a.H), t = (int)(i / ((long long)a.lora * a.H));
	const int ns = a.pos[t] / split + 1;
	float s = 0.0f;
#pragma unroll 4
	for (int sp = 0; sp < ns; sp++)
		s += a.partial[(((long long)t * ATT_SPLITS + sp) * a.H + h) * a.lora + c];
	oc[i] = s;
}

int *mla_vproj_table(int H)
{
	const int T = GEMV_MAX_TOKENS, n = 1 + H + T * H + H * T;
	int *h = (int *)malloc(sizeof(int) * n), *d = NULL;
	h[0] = H;
	for (int g = 0; g < H; g++) {
		h[1 + g] = g;
		for (int k = 0; k < T; k++)
			h[1 + H + k * H + g] = k + 1;
		for (int t = 0; t < T; t++)
			h[1 + H + T * H + g * T + t] = t * H + g;
	}
	CK(cudaMalloc(&d, sizeof(int) * n));
	CK(cudaMemcpy(d, h, sizeof(int) * n, cudaMemcpyHostToDevice));
	free(h);
	return d;
}

/* wkv_b's v rows of head h as expert h of a stack, when the FP8 blocks allow it. */
static bool vproj_as_gemv(const mla_args *a, dweight *vw)
{
	const dweight &w = a->wkv_b;
	if (!a->vp_tab || a->n > GEMV_MAX_TOKENS || w.dtype == DW_F32)
		return false;
	if (w.dtype == DW_F8 && (a->nope % 128 || (a->nope + a->v) % 128))
		return false;
	size_t es = w.dtype == DW_F8 ? 1 : 2;
	*vw = w;
	vw->rows = a->v;
	vw->data = (const char *)w.data + (size_t)a->nope * a->lora * es;
	vw->estride = (long long)(a->nope + a->v) * a->lora;
	if (w.dtype == DW_F8) {
		vw->scale = w.scale + (size_t)(a->nope / 128) * w.scale_cols;
		vw->sstride = (long long)((a->nope + a->v) / 128) * w.scale_cols;
	}
	return true;
}

static void raise_smem(void)
{
	static thread_local bool raised; /* per GPU: one thread drives each GPU rank */
	if (raised) /* past the 48 KB default; the kernels' sizes are checked against this */
		return;
	CK(cudaFuncSetAttribute(absorb_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
	CK(cudaFuncSetAttribute(scores_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
	CK(cudaFuncSetAttribute(vproj_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
	raised = true;
}

static void check_smem(size_t bytes)
{
	if (bytes > 200 * 1024)
		cuda_check(cudaErrorInvalidValue, "mla attention: kv_lora_rank + rope too large for shared memory");
}

void k_mla_absorb(cudaStream_t s, const mla_args *a, const float *q)
{
	size_t sm = sizeof(float) * (ATT_QT * a->nope + 8 * ATT_QT * ATT_CB);
	raise_smem();
	check_smem(sm);
	absorb_kernel<<<dim3(a->H, (a->n + ATT_QT - 1) / ATT_QT), 256, sm, s>>>(*a, q);
	LAUNCHED("absorb_kernel");
}

void k_mla_softmax(cudaStream_t s, const mla_args *a)
{
	softmax_kernel<<<dim3(a->H, a->n), 256, 0, s>>>(*a);
	LAUNCHED("softmax_kernel");
}

void k_mla_vproj(cudaStream_t s, const mla_args *a, const float *oc, float *out)
{
	dweight vw;
	if (vproj_as_gemv(a, &vw)) {
		const int H = a->H, T = GEMV_MAX_TOKENS;
		gemv_groups gr = { a->vp_tab, a->vp_tab + 1, a->vp_tab + 1 + H + (a->n - 1) * H, a->vp_tab + 1 + H + T * H,
				   a->vp_tab + 1 + H + T * H, H };
		gemv_call c = {};
		c.w = &vw, c.x = oc, c.ldx = a->lora, c.y = out, c.ldy = a->v, c.n = a->n, c.groups = &gr;
		k_gemv(s, &c);
		return;
	}
	size_t sm = sizeof(float) * ATT_VT * a->lora;
	raise_smem();
	check_smem(sm);
	vproj_kernel<<<dim3(a->H, (a->n + ATT_VT - 1) / ATT_VT), 256, sm, s>>>(*a, oc, out);
	LAUNCHED("vproj_kernel");
}

void k_mla_attention(cudaStream_t s, const mla_args *a, const float *q, float *out)
{
	const int D = a->lora + a->rope, split = att_split(a->ctx_cap);
	size_t scores_sm = sizeof(float) * (ATT_TT * (D % 4 ? D + 1 : D + 4) + ATT_SH * D);
	k_mla_absorb(s, a, q);
	raise_smem();
	check_smem(scores_sm);
	scores_kernel<<<dim3((a->ctx_cap + ATT_TT - 1) / ATT_TT, a->one_seq ? 1 : a->n, (a->H + ATT_SH - 1) / ATT_SH),
			256, scores_sm, s>>>(*a);
	LAUNCHED("scores_kernel");
	k_mla_softmax(s, a);
	pv_kernel<<<dim3((a->H + ATT_HG - 1) / ATT_HG, (a->ctx_cap + split - 1) / split, a->n), 256, 0, s>>>(*a, split);
	LAUNCHED("pv_kernel");
	float *oc = a->qc; /* qc is read by now; [n * H, lora] fits in its [n, H, lora + rope] */
	long long total = (long long)a->n * a->H * a->lora;
	oc_sum_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(*a, split, oc);
	LAUNCHED("oc_sum_kernel");
	k_mla_vproj(s, a, oc, out);
}
