/* The operations the model is built from (DESIGN §5). model.c calls only these; each backend
 * (cpu/ now, cuda/ later) implements them. Activations are fp32; weights stay in their stored
 * format (FP8 E4M3 with 128x128 block scales, BF16 or F32) and are read where they lie. */
#ifndef DSV3_OPS_H
#define DSV3_OPS_H
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "threadpool.h"

/* One stored piece of a matrix: rows x cols, row-major, `data` in `dtype`; FP8 pieces carry
 * their scale grid [ceil(rows/128), ceil(cols/128)] (F32, the weight_scale_inv of HF). */
typedef struct {
	st_dtype dtype;
	int rows, cols;
	const void *data;
	const float *scale; /* NULL unless dtype is F8_E4M3 */
	int scale_cols;     /* columns of the scale grid */
} weight_piece;

/* A logical matrix [rows, cols] made of one piece, or of the pieces of N model-parallel ranks
 * laid side by side along split_dim (0: rows, 1: columns). Never copied: the pieces point into
 * the mapped files. A vector (norm weight, bias) is a 1 x n matrix. */
typedef struct {
	int rows, cols;
	int split_dim;
	int n_pieces;
	weight_piece *pieces;
} weight_view;

#define WEIGHT_BLOCK 128 /* FP8 scale block; every dot product is summed in blocks this wide */

/* y[r] = W[r,:] . x for every row; rows are shared out over the pool. */
void op_matvec(thread_pool *pool, float *y, const weight_view *w, const float *x);
/* Y[b, r] = W[r,:] . X[b,:] for n vectors (X is [n, cols], Y is [n, rows]): each weight row is
 * read once for all n; every number equals op_matvec's for the same vector, bit for bit. */
void op_matmul(thread_pool *pool, float *y, const weight_view *w, const float *x, int n);
/* y[i] = W[row0 + i,:] . x for i < n, on the calling thread. */
void op_matvec_rows(float *y, const weight_view *w, int row0, int n, const float *x);
/* y[c] = sum_i x[i] * W[row0 + i, c] for every column c (x^T W over n rows), on the calling
 * thread: the absorbed attention's q_nope . wkv_b[h, :nope]. */
void op_matvec_t_rows(float *y, const weight_view *w, int row0, int n, const float *x);
/* out = W[r,:] as fp32 (the embedding lookup). */
void op_weight_row(float *out, const weight_view *w, int r);

/* y = x / sqrt(mean(x^2) + eps) * w, in fp32; y may be x. */
void op_rmsnorm(float *y, const float *x, const weight_view *w, int n, float eps);
/* Rotates adjacent pairs (x[2i], x[2i+1]) by the angle whose cos/sin are given, i < n/2. */
void op_rope(float *x, int n, const float *cos_a, const float *sin_a);
/* In-place softmax of x[0:n] in fp32. */
void op_softmax(float *x, int n);
/* a[i] = silu(a[i]) * b[i]. */
void op_silu_mul(float *a, const float *b, int n);
/* y[i] += s * x[i]. */
void op_add_scaled(float *y, const float *x, float s, int n);

/* MLA decode attention for one query token over t cached tokens, absorbed (DESIGN §4):
 * q [H, nope + rope]; wkv_b [H * (nope + v), lora]; c [t, lora] and k_pe [t, rope] the cache
 * rows of this layer; out [H, v]. scratch holds H * (2 * lora + t) floats. */
typedef struct {
	int n_heads, nope, rope, v, lora;
	float softmax_scale;
} mla_dims;
void op_mla_attention(thread_pool *pool, float *out, const float *q, const weight_view *wkv_b,
		      const float *c, const float *k_pe, int t, const mla_dims *d, float *scratch);

#endif
