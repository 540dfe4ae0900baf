/* The CUDA backend's kernels (DESIGN §5): weights on the device in their stored format, fp32
 * activations, one launcher per operation. model.cu strings them together like model.c does
 * the CPU ops; tests/cuda/test_cuda_ops.cu checks each against the CPU op. Every launcher is
 * asynchronous on the stream given and checks its launch (cuda_check names the kernel). */
#ifndef DSV3_CUDA_KERNELS_CUH
#define DSV3_CUDA_KERNELS_CUH
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

/* Weight formats on the device. */
enum { DW_F32 = 0, DW_BF16 = 1, DW_F8 = 2 };

/* A weight matrix on the device: [rows, cols] row-major in its stored format; FP8 carries its
 * 128x128 block scales [ceil(rows/128), scale_cols]. The routed experts of a layer are one
 * dweight whose expert e starts e * estride elements (and e * sstride scales) in. */
struct dweight {
	int dtype;
	int rows, cols;
	const void *data;
	const float *scale;
	int scale_cols;
	long long estride, sstride;
};

#define GEMV_MAX_TOKENS 16 /* tokens one GEMV launch takes: decode batches, MoE groups */

/* Grouped inputs of a GEMV: for group g < *count, rows in[g * GEMV_MAX_TOKENS + i] of x times
 * expert exp[g]'s weight go to rows out[g * GEMV_MAX_TOKENS + i] of y, i < cnt[g]. */
struct gemv_groups {
	const int *count, *exp, *cnt, *in, *out;
	int max_groups; /* the grid's size: the most groups there can be */
};

/* y[t, r] (+)= W[r, :] . x[t, :] for t < n <= GEMV_MAX_TOKENS (row t of x at x + t * ldx), two
 * weights at once when w2 is not NULL (y2 = W2 x: the w1/w3 pair of an MLP). With silu_b, the
 * input is silu(x) * silu_b elementwise (the MLP's w2 input, never stored). With groups, n is
 * ignored and the groups say which rows and experts. accumulate adds to y instead of
 * overwriting it (the residual). */
struct gemv_call {
	const dweight *w, *w2;
	const float *x, *silu_b;
	int ldx;
	float *y, *y2;
	int ldy, ldy2; /* ldy2 0: the same as ldy */
	int n;
	const gemv_groups *groups;
	int accumulate;
};
void k_gemv(cudaStream_t s, const gemv_call *c);

/* out[t, :] = row ids[t] of W as fp32, t < n (the embedding). */
void k_embed(cudaStream_t s, float *out, const dweight *w, const int *ids, int n);
/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, rows of width dim (ld apart), t < n; y may be x. */
void k_rmsnorm(cudaStream_t s, float *y, const float *x, int ld, const dweight *w, int dim, int n,
	       float eps);
/* y[i] += x[i], i < n. */
void k_add(cudaStream_t s, float *y, const float *x, size_t n);

/* The cache of a layer: row (seq, pos) at cache + (seq * seq_stride + pos) * (lora + rope). */
struct mla_cache {
	float *base;
	long long seq_stride; /* rows between sequences */
};

/* For each token t < n: rope of the query heads' rope parts in place (q [n, H * (nope + rope)]),
 * and the cache row of (seqs[t], pos[t]): kv_norm(kv[t, :lora]) then rope(kv[t, lora:]). */
void k_rope_kv(cudaStream_t s, float *q, const float *kv, const dweight *kv_norm, mla_cache cache,
	       const int *seqs, const int *pos, int n, int H, int nope, int rope, int lora,
	       const float *inv_freq, float eps);

/* MLA decode attention (absorbed, DESIGN §4) for n queries: query t of sequence seqs[t] at
 * position pos[t] sees cache rows 0..pos[t]. ctx_cap bounds every pos[t] + 1 (grid sizes).
 * q [n, H * (nope + rope)], out [n, H * v]. Scratch from mla_scratch_floats. */
struct mla_args {
	int H, nope, rope, v, lora;
	float softmax_scale;
	dweight wkv_b;
	mla_cache cache;
	const int *seqs, *pos;
	int n, ctx_cap;
	float *qc, *scores, *partial; /* scratch */
	const int *vp_tab; /* mla_vproj_table(H), or NULL: the projection by wkv_b's v rows as a GEMV */
	int one_seq;       /* every query is of sequence seqs[0] (a prefill chunk) */
	int zero_to;       /* softmax writes 0 to scores[pos + 1, zero_to) (for a GEMM over them) */
};
/* The group tables that run the v projection through k_gemv (one group per head); device
 * memory, cudaFree when done. */
int *mla_vproj_table(int H);
size_t mla_scratch_floats(int H, int lora, int rope, int n, int ctx_cap, float **qc, float **scores,
			  float **partial, float *base);
void k_mla_attention(cudaStream_t s, const mla_args *a, const float *q, float *out);
/* Its stages, for a prefill chunk that does scores and P.C as GEMMs (model.cu): qc from q;
 * the softmax of a->scores in place; out from oc [n * H, lora] (the P.C of each head). */
void k_mla_absorb(cudaStream_t s, const mla_args *a, const float *q);
void k_mla_softmax(cudaStream_t s, const mla_args *a);
void k_mla_vproj(cudaStream_t s, const mla_args *a, const float *oc, float *out);

/* The MoE gate after its scores (x . G^T, [n, E]): sigmoid or softmax, the bias, group limit,
 * top-k in expert order with their weights (DESIGN §4). topk/weights [n, K]. */
struct route_args {
	int E, K, groups, limited_groups, sigmoid;
	float route_scale;
	const dweight *bias; /* NULL when the checkpoint has none */
};
void k_route(cudaStream_t s, const route_args *a, const float *scores, int n, int *topk, float *weights);
/* From topk [n, K] (n * K <= 256), the groups of a decode MoE: one per distinct expert, with
 * its tokens (in[] = t) and pairs (out[] = t * K + k); g->count etc. are written. */
/* k_moe_groups over the pairs whose expert is in [lo, lo + count): group experts are local
 * slots (expert - lo); the other ranks' experts are left out. */
void k_moe_groups_local(cudaStream_t s, const int *topk, int n, int K, int lo, int count, int *g_count, int *exp,
			int *cnt, int *tok, int *pair);
void k_moe_groups(cudaStream_t s, const int *topk, int n, int K, int *count, int *exp, int *cnt,
		  int *tok, int *pair);
/* x[t, :] += sum_k weights[t, k] * y[(t * K + k), :], k in order, t < n. */
void k_moe_combine(cudaStream_t s, float *x, const float *y, const float *weights, int n, int K, int dim);

/* Prefill helpers: bf16 copies for cuBLAS; a[i] = silu(a[i]) * b[i] (prefill.cu). */
void k_silu_mul(cudaStream_t s, float *a, const float *b, size_t n);
/* out = expert `expert` of W as bf16 [rows, cols]; with split, then bf16(W - that) as a second
 * [rows, cols] (prefill.cu). */
void k_weight_bf16(cudaStream_t s, void *out, const dweight *w, int expert, int split);
/* out[0, n) = bf16(x), out[n, 2n) = bf16(x - bf16(x)): x to 16 bits as two bf16 halves. */
void k_split_bf16(cudaStream_t s, void *out, const float *x, size_t n);
/* y[t, r] (+)= sum of part[t + a n, b rows + r] over a < xs, b < ws (part is [xs n, ws rows]). */
void k_join_parts(cudaStream_t s, float *y, int ldy, const float *part, int rows, int n, int xs, int ws, int acc);

void k_to_bf16(cudaStream_t s, void *out, const float *x, size_t n);


/* Every CUDA call and launch goes through this: on failure it prints what, the kernel and the
 * current layer/tensor (cuda_where) and exits with status 3. */
void cuda_check(cudaError_t e, const char *what);
void cuda_where(int layer, const char *tensor);
/* Ends the process after a fatal CUDA or cuBLAS error: exit(code), or, when this thread set a
 * hook (a tensor-parallel rank), the hook, which ends every rank of the job. */
[[noreturn]] void cuda_fatal(int code);
void cuda_set_fatal(void (*fn)(void *arg, int code), void *arg);
#define CK(call) cuda_check((call), #call)

#endif
