/* The CPU backend of ops.h: fp32 arithmetic, weights decoded inside the loops (an FP8 weight is
 * never expanded in memory). Every dot product over a weight row is summed in 128-column blocks
 * chained in column order, whichever rank's piece a block lies in, so a matrix split over ranks
 * gives bit-for-bit the numbers of the whole one. */
#include "ops.h"

#include <math.h>
#include <string.h>

#define ROWS_PER_TASK 64

/* E4M3 "fn": sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7F/0xFF are NaN. */
static inline float e4m3_value(uint8_t v)
{
	uint32_t sign = (uint32_t)(v & 0x80) << 24;
	uint32_t e = (v >> 3) & 0xF, m = v & 7;
	float f;
	if ((v & 0x7F) == 0x7F)
		return NAN;
	if (e == 0) {
		f = (float)m * (1.0f / 512.0f);
	} else {
		uint32_t bits = ((e + 120) << 23) | (m << 20);
		memcpy(&f, &bits, 4);
	}
	return sign ? -f : f;
}

static inline float bf16_value(uint16_t v)
{
	uint32_t bits = (uint32_t)v << 16;
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

static inline float piece_at(const weight_piece *p, size_t idx)
{
	switch (p->dtype) {
	case ST_F8_E4M3: return e4m3_value(((const uint8_t *)p->data)[idx]);
	case ST_BF16: return bf16_value(((const uint16_t *)p->data)[idx]);
	default: return ((const float *)p->data)[idx];
	}
}

static inline float piece_scale(const weight_piece *p, int r, int c)
{
	if (!p->scale)
		return 1.0f;
	return p->scale[(size_t)(r / WEIGHT_BLOCK) * p->scale_cols + c / WEIGHT_BLOCK];
}

/* The sum of w[c] * x[c] over one block, in eight interleaved fp32 partial sums (lane k adds
 * the columns c = k mod 8 in column order, a multiply then an add, never fused) added in a fixed
 * order at the end, the same whatever the split and whichever path below computes it: the AVX2
 * one holds the eight lanes in one register, the scalar one (other CPUs, block tails) in an
 * array, so both give the same bits. */
#define LANES 8
#define ROW_GROUP 8 /* rows of one matvec computed together */
static inline float lanes_total(const float *a)
{
	return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* FP8 weights are decoded to their value times 2^-8 (exact: a power of two) and the block's
 * scale is multiplied by 2^8 instead, because that is what the F16 conversion below gives. */
#define FP8_PRESCALE (1.0f / 256.0f)

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SIMD __attribute__((target("avx2,f16c")))

/* Every CPU with AVX2 has F16C (which came first), and not every compiler can ask for F16C. */
static inline int simd_ok(void)
{
	return __builtin_cpu_supports("avx2");
}

/* Eight E4M3 codes as fp32, times 2^-8: sign to bit 15 and the 7 exponent+mantissa bits to bits
 * 13..7 make the F16 number whose value is exactly the E4M3 value / 256 for every code but NaN
 * (normals and subnormals alike, since F16's exponent bias is 8 more than E4M3's). `hi` holds
 * the codes in the high bytes of its 16-bit lanes: an arithmetic shift by one then puts the
 * magnitude in place and a copy of the sign in bit 14, which the mask clears. */
SIMD static inline __m256 fp8_hi8(__m128i hi)
{
	__m128i h = _mm_and_si128(_mm_srai_epi16(hi, 1), _mm_set1_epi16((short)0xBF80));
	return _mm256_cvtph_ps(h);
}

SIMD static inline __m256 fp8x8(const uint8_t *w)
{
	__m128i b = _mm_loadl_epi64((const __m128i *)w);
	return fp8_hi8(_mm_unpacklo_epi8(_mm_setzero_si128(), b));
}

SIMD static inline __m256 bf16x8(const uint16_t *w)
{
	__m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
	return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* The lanes over columns [0, n & ~7), stored to a[]. */
SIMD static void lanes_fp8(float *a, const uint8_t *w, const float *x, int n)
{
	__m256 acc = _mm256_setzero_ps();
	for (int c = 0; c + LANES <= n; c += LANES)
		acc = _mm256_add_ps(acc, _mm256_mul_ps(fp8x8(w + c), _mm256_loadu_ps(x + c)));
	_mm256_storeu_ps(a, acc);
}

SIMD static void lanes_bf16(float *a, const uint16_t *w, const float *x, int n)
{
	__m256 acc = _mm256_setzero_ps();
	for (int c = 0; c + LANES <= n; c += LANES)
		acc = _mm256_add_ps(acc, _mm256_mul_ps(bf16x8(w + c), _mm256_loadu_ps(x + c)));
	_mm256_storeu_ps(a, acc);
}

SIMD static void lanes_f32(float *a, const float *w, const float *x, int n)
{
	__m256 acc = _mm256_setzero_ps();
	for (int c = 0; c + LANES <= n; c += LANES)
		acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c)));
	_mm256_storeu_ps(a, acc);
}

/* The lanes of ROW_GROUP rows at once (w, w + stride, ...; n a multiple of 8) to a[8 i + k]:
 * eight independent chains hide the adds' latency and share the loads of x; each row's lanes
 * are exactly lanes_fp8's / lanes_bf16's. */
SIMD static void lanes_rows_fp8(float *a, const uint8_t *w, size_t stride, const float *x, int n)
{
	__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
	for (int c = 0; c < n; c += LANES) {
		__m256 xv = _mm256_loadu_ps(x + c);
		a0 = _mm256_add_ps(a0, _mm256_mul_ps(fp8x8(w + c), xv));
		a1 = _mm256_add_ps(a1, _mm256_mul_ps(fp8x8(w + stride + c), xv));
		a2 = _mm256_add_ps(a2, _mm256_mul_ps(fp8x8(w + 2 * stride + c), xv));
		a3 = _mm256_add_ps(a3, _mm256_mul_ps(fp8x8(w + 3 * stride + c), xv));
		a4 = _mm256_add_ps(a4, _mm256_mul_ps(fp8x8(w + 4 * stride + c), xv));
		a5 = _mm256_add_ps(a5, _mm256_mul_ps(fp8x8(w + 5 * stride + c), xv));
		a6 = _mm256_add_ps(a6, _mm256_mul_ps(fp8x8(w + 6 * stride + c), xv));
		a7 = _mm256_add_ps(a7, _mm256_mul_ps(fp8x8(w + 7 * stride + c), xv));
	}
	_mm256_storeu_ps(a, a0);
	_mm256_storeu_ps(a + LANES, a1);
	_mm256_storeu_ps(a + 2 * LANES, a2);
	_mm256_storeu_ps(a + 3 * LANES, a3);
	_mm256_storeu_ps(a + 4 * LANES, a4);
	_mm256_storeu_ps(a + 5 * LANES, a5);
	_mm256_storeu_ps(a + 6 * LANES, a6);
	_mm256_storeu_ps(a + 7 * LANES, a7);
}

SIMD static void lanes_rows_bf16(float *a, const uint16_t *w, size_t stride, const float *x, int n)
{
	__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
	for (int c = 0; c < n; c += LANES) {
		__m256 xv = _mm256_loadu_ps(x + c);
		a0 = _mm256_add_ps(a0, _mm256_mul_ps(bf16x8(w + c), xv));
		a1 = _mm256_add_ps(a1, _mm256_mul_ps(bf16x8(w + stride + c), xv));
		a2 = _mm256_add_ps(a2, _mm256_mul_ps(bf16x8(w + 2 * stride + c), xv));
		a3 = _mm256_add_ps(a3, _mm256_mul_ps(bf16x8(w + 3 * stride + c), xv));
		a4 = _mm256_add_ps(a4, _mm256_mul_ps(bf16x8(w + 4 * stride + c), xv));
		a5 = _mm256_add_ps(a5, _mm256_mul_ps(bf16x8(w + 5 * stride + c), xv));
		a6 = _mm256_add_ps(a6, _mm256_mul_ps(bf16x8(w + 6 * stride + c), xv));
		a7 = _mm256_add_ps(a7, _mm256_mul_ps(bf16x8(w + 7 * stride + c), xv));
	}
	_mm256_storeu_ps(a, a0);
	_mm256_storeu_ps(a + LANES, a1);
	_mm256_storeu_ps(a + 2 * LANES, a2);
	_mm256_storeu_ps(a + 3 * LANES, a3);
	_mm256_storeu_ps(a + 4 * LANES, a4);
	_mm256_storeu_ps(a + 5 * LANES, a5);
	_mm256_storeu_ps(a + 6 * LANES, a6);
	_mm256_storeu_ps(a + 7 * LANES, a7);
}

/* y[c] += xi * (w[c] * s) for c < n & ~7, multiply, multiply, add as the scalar loop does. */
SIMD static void axpy_fp8(float *y, const uint8_t *w, int n, float s, float xi)
{
	__m256 sv = _mm256_set1_ps(s), xv = _mm256_set1_ps(xi);
	for (int c = 0; c + LANES <= n; c += LANES) {
		__m256 wv = _mm256_mul_ps(fp8x8(w + c), sv);
		_mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_loadu_ps(y + c), _mm256_mul_ps(xv, wv)));
	}
}

SIMD static void axpy_bf16(float *y, const uint16_t *w, int n, float xi)
{
	__m256 xv = _mm256_set1_ps(xi);
	for (int c = 0; c + LANES <= n; c += LANES)
		_mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_loadu_ps(y + c),
						       _mm256_mul_ps(xv, bf16x8(w + c))));
}

/* The lanes of one decoded block against four vectors (x, x + stride, ...; n a multiple of 8)
 * to a[8 i + k]: the block's loads shared, each vector's lanes exactly lanes_f32's. */
SIMD static void lanes4_vec(float *a, const float *w, const float *x, size_t stride, int n)
{
	__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
	for (int c = 0; c < n; c += LANES) {
		__m256 wv = _mm256_loadu_ps(w + c);
		a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, _mm256_loadu_ps(x + c)));
		a1 = _mm256_add_ps(a1, _mm256_mul_ps(wv, _mm256_loadu_ps(x + stride + c)));
		a2 = _mm256_add_ps(a2, _mm256_mul_ps(wv, _mm256_loadu_ps(x + 2 * stride + c)));
		a3 = _mm256_add_ps(a3, _mm256_mul_ps(wv, _mm256_loadu_ps(x + 3 * stride + c)));
	}
	_mm256_storeu_ps(a, a0);
	_mm256_storeu_ps(a + LANES, a1);
	_mm256_storeu_ps(a + 2 * LANES, a2);
	_mm256_storeu_ps(a + 3 * LANES, a3);
}

/* wf[c] = weight c of the FP8 block (times 2^-8), for c < n & ~7. */
SIMD static void decode_fp8(float *wf, const uint8_t *w, int n)
{
	for (int c = 0; c + LANES <= n; c += LANES)
		_mm256_storeu_ps(wf + c, fp8x8(w + c));
}
#else
static inline int simd_ok(void) { return 0; }
static void lanes_fp8(float *a, const uint8_t *w, const float *x, int n)
{
	(void)a, (void)w, (void)x, (void)n;
}
static void lanes_bf16(float *a, const uint16_t *w, const float *x, int n)
{
	(void)a, (void)w, (void)x, (void)n;
}
static void lanes_f32(float *a, const float *w, const float *x, int n)
{
	(void)a, (void)w, (void)x, (void)n;
}
static void decode_fp8(float *wf, const uint8_t *w, int n) { (void)wf, (void)w, (void)n; }
static void axpy_fp8(float *y, const uint8_t *w, int n, float s, float xi)
{
	(void)y, (void)w, (void)n, (void)s, (void)xi;
}
static void axpy_bf16(float *y, const uint16_t *w, int n, float xi)
{
	(void)y, (void)w, (void)n, (void)xi;
}
static void lanes_rows_fp8(float *a, const uint8_t *w, size_t stride, const float *x, int n)
{
	(void)a, (void)w, (void)stride, (void)x, (void)n;
}
static void lanes_rows_bf16(float *a, const uint16_t *w, size_t stride, const float *x, int n)
{
	(void)a, (void)w, (void)stride, (void)x, (void)n;
}
static void lanes4_vec(float *a, const float *w, const float *x, size_t stride, int n)
{
	(void)a, (void)w, (void)x, (void)stride, (void)n;
}
#endif

/* lut holds every E4M3 value times 2^-8. */
static float block_dot_fp8(const uint8_t *w, const float *x, int n, const float *lut)
{
	float a[LANES] = { 0 };
	int c = 0;
	if (simd_ok()) {
		lanes_fp8(a, w, x, n);
		c = n & ~(LANES - 1);
	}
	for (; c + LANES <= n; c += LANES)
		for (int k = 0; k < LANES; k++)
			a[k] += lut[w[c + k]] * x[c + k];
	for (; c < n; c++)
		a[c % LANES] += lut[w[c]] * x[c];
	return lanes_total(a);
}

static float block_dot_bf16(const uint16_t *w, const float *x, int n)
{
	float a[LANES] = { 0 };
	int c = 0;
	if (simd_ok()) {
		lanes_bf16(a, w, x, n);
		c = n & ~(LANES - 1);
	}
	for (; c + LANES <= n; c += LANES)
		for (int k = 0; k < LANES; k++)
			a[k] += bf16_value(w[c + k]) * x[c + k];
	for (; c < n; c++)
		a[c % LANES] += bf16_value(w[c]) * x[c];
	return lanes_total(a);
}

static float block_dot_f32(const float *w, const float *x, int n)
{
	float a[LANES] = { 0 };
	int c = 0;
	if (simd_ok()) {
		lanes_f32(a, w, x, n);
		c = n & ~(LANES - 1);
	}
	for (; c + LANES <= n; c += LANES)
		for (int k = 0; k < LANES; k++)
			a[k] += w[c + k] * x[c + k];
	for (; c < n; c++)
		a[c % LANES] += w[c] * x[c];
	return lanes_total(a);
}

/* Every E4M3 code's value times 2^-8, for the scalar path. */
static void fp8_table(float *lut)
{
	for (int v = 0; v < 256; v++)
		lut[v] = e4m3_value((uint8_t)v) * FP8_PRESCALE;
}

/* The scale of an FP8 block, times 2^8 to undo the decoding's 2^-8. */
static inline float fp8_scale(const weight_piece *p, int r, int c)
{
	return piece_scale(p, r, c) * (1.0f / FP8_PRESCALE);
}

/* Row r of the piece . x over the block at column c0 (n columns), times the block's scale. */
static float block_row_dot(const weight_piece *p, int r, int c0, int n, const float *x,
			   const float *lut)
{
	size_t at = (size_t)r * p->cols + c0;
	if (p->dtype == ST_F8_E4M3)
		return block_dot_fp8((const uint8_t *)p->data + at, x + c0, n, lut) *
		       fp8_scale(p, r, c0);
	if (p->dtype == ST_BF16)
		return block_dot_bf16((const uint16_t *)p->data + at, x + c0, n);
	return block_dot_f32((const float *)p->data + at, x + c0, n);
}

static inline int block_width(const weight_piece *p, int c0)
{
	return p->cols - c0 < WEIGHT_BLOCK ? p->cols - c0 : WEIGHT_BLOCK;
}

/* acc + row r of the piece . x, block by block; each block's sum times its scale. */
static float piece_row_dot(const weight_piece *p, int r, const float *x, float acc,
			   const float *lut)
{
	for (int c0 = 0; c0 < p->cols; c0 += WEIGHT_BLOCK)
		acc += block_row_dot(p, r, c0, block_width(p, c0), x, lut);
	return acc;
}

/* acc[i] + row r + i of the piece . x for i < ROW_GROUP: piece_row_dot's sums, ROW_GROUP
 * rows at a time where the SIMD kernels apply. */
static void piece_rows_dot(const weight_piece *p, int r, const float *x, float *acc,
			    const float *lut)
{
	int simd = simd_ok() && p->dtype != ST_F32;
	for (int c0 = 0; c0 < p->cols; c0 += WEIGHT_BLOCK) {
		int n = block_width(p, c0);
		if (!simd || n % LANES) {
			for (int i = 0; i < ROW_GROUP; i++)
				acc[i] += block_row_dot(p, r + i, c0, n, x, lut);
			continue;
		}
		float a[ROW_GROUP * LANES];
		size_t at = (size_t)r * p->cols + c0;
		if (p->dtype == ST_F8_E4M3)
			lanes_rows_fp8(a, (const uint8_t *)p->data + at, (size_t)p->cols, x + c0, n);
		else
			lanes_rows_bf16(a, (const uint16_t *)p->data + at, (size_t)p->cols, x + c0, n);
		for (int i = 0; i < ROW_GROUP; i++) {
			float d = lanes_total(a + i * LANES);
			acc[i] += p->dtype == ST_F8_E4M3 ? d * fp8_scale(p, r + i, c0) : d;
		}
	}
}

/* The piece holding logical row r of a row-split view, and r within it. */
static const weight_piece *row_piece(const weight_view *w, int r, int *local)
{
	int i = 0;
	while (i + 1 < w->n_pieces && r >= w->pieces[i].rows)
		r -= w->pieces[i++].rows;
	*local = r;
	return &w->pieces[i];
}

static float view_row_dot(const weight_view *w, int r, const float *x, const float *lut)
{
	if (w->split_dim != 1) {
		int lr;
		const weight_piece *p = row_piece(w, r, &lr);
		return piece_row_dot(p, lr, x, 0.0f, lut);
	}
	float acc = 0.0f;
	for (int i = 0; i < w->n_pieces; i++) {
		acc = piece_row_dot(&w->pieces[i], r, x, acc, lut);
		x += w->pieces[i].cols;
	}
	return acc;
}

/* Rows r .. r + ROW_GROUP - 1 of the view . x into y, if they lie in one piece (or the view
 * is split by columns); 0 if not, computing nothing. */
static int view_rows_dot(float *y, const weight_view *w, int r, const float *x,
			  const float *lut)
{
	float acc[ROW_GROUP] = { 0 };
	if (w->split_dim != 1) {
		int lr, lr3;
		const weight_piece *p = row_piece(w, r, &lr);
		if (row_piece(w, r + ROW_GROUP - 1, &lr3) != p)
			return 0;
		piece_rows_dot(p, lr, x, acc, lut);
	} else {
		for (int i = 0; i < w->n_pieces; i++) {
			piece_rows_dot(&w->pieces[i], r, x, acc, lut);
			x += w->pieces[i].cols;
		}
	}
	memcpy(y, acc, sizeof(acc));
	return 1;
}

static void matvec_rows_lut(float *y, const weight_view *w, int row0, int n, const float *x,
			    const float *lut)
{
	for (int i = 0; i < n;) {
		if (i + ROW_GROUP <= n && view_rows_dot(y + i, w, row0 + i, x, lut)) {
			i += ROW_GROUP;
		} else {
			y[i] = view_row_dot(w, row0 + i, x, lut);
			i++;
		}
	}
}

void op_matvec_rows(float *y, const weight_view *w, int row0, int n, const float *x)
{
	float lut[256];
	fp8_table(lut);
	matvec_rows_lut(y, w, row0, n, x, lut);
}

typedef struct {
	float *y;
	const weight_view *w;
	const float *x;
	float lut[256];
} matvec_job;

static void matvec_task(void *arg, size_t t)
{
	const matvec_job *j = arg;
	int r0 = (int)t * ROWS_PER_TASK;
	int n = j->w->rows - r0 < ROWS_PER_TASK ? j->w->rows - r0 : ROWS_PER_TASK;
	matvec_rows_lut(j->y + r0, j->w, r0, n, j->x, j->lut);
}

void op_matvec(thread_pool *pool, float *y, const weight_view *w, const float *x)
{
	matvec_job j = { y, w, x, { 0 } };
	fp8_table(j.lut);
	size_t tasks = ((size_t)w->rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
	if (pool)
		thread_pool_for(pool, tasks, matvec_task, &j);
	else
		for (size_t t = 0; t < tasks; t++)
			matvec_task(&j, t);
}

typedef struct {
	float *y;
	const weight_view *w;
	const float *x;
	int n;
	float lut[256];
} matmul_job;

/* Block `c0` of row r of piece p, decoded once: wf[c] = the weight (FP8: times 2^-8; scale not
 * applied). */
static int decode_block(const weight_piece *p, int r, int c0, float *wf, const float *lut)
{
	int n = p->cols - c0 < WEIGHT_BLOCK ? p->cols - c0 : WEIGHT_BLOCK;
	size_t base = (size_t)r * p->cols + c0;
	int c = 0;
	if (p->dtype == ST_F8_E4M3 && simd_ok()) {
		decode_fp8(wf, (const uint8_t *)p->data + base, n);
		c = n & ~(LANES - 1);
	}
	for (; c < n; c++)
		wf[c] = p->dtype == ST_F8_E4M3 ? lut[((const uint8_t *)p->data)[base + c]]
		      : p->dtype == ST_BF16	 ? bf16_value(((const uint16_t *)p->data)[base + c])
					 : ((const float *)p->data)[base + c];
	return n;
}

/* acc[b] + row r of the piece . x_b for b < n: the blocks of piece_row_dot, each decoded once
 * and used for all n vectors (the same products in the same lanes, so the same sums). */
static void piece_row_dot_many(const weight_piece *p, int r, const float *x, size_t x_stride,
			       int n, float *acc, const float *lut)
{
	float wf[WEIGHT_BLOCK];
	int simd = simd_ok();
	for (int c0 = 0; c0 < p->cols; c0 += WEIGHT_BLOCK) {
		int len = decode_block(p, r, c0, wf, lut);
		float scale = p->dtype == ST_F8_E4M3 ? fp8_scale(p, r, c0) : 1.0f;
		int b = 0;
		if (simd && len % LANES == 0)
			for (; b + 4 <= n; b += 4) {
				float a[4 * LANES];
				lanes4_vec(a, wf, x + (size_t)b * x_stride + c0, x_stride, len);
				for (int i = 0; i < 4; i++) {
					float d = lanes_total(a + i * LANES);
					acc[b + i] += p->dtype == ST_F8_E4M3 ? d * scale : d;
				}
			}
		for (; b < n; b++) {
			float d = block_dot_f32(wf, x + (size_t)b * x_stride + c0, len);
			acc[b] += p->dtype == ST_F8_E4M3 ? d * scale : d;
		}
	}
}

#define MATMUL_GROUP 64 /* vectors per pass over a weight row */

/* Rows [r0, r1) for each of a few vectors, through op_matvec's own row kernels: the rows of a
 * group (a few KB) stay in cache from one vector to the next, and each FP8 code is decoded in
 * registers rather than into a buffer, which pays only from about four vectors on. */
static void matmul_rows_few(const matmul_job *j, int r0, int r1)
{
	int rows = j->w->rows, cols = j->w->cols;
	float yg[ROW_GROUP];
	for (int r = r0; r < r1;) {
		int g = r + ROW_GROUP <= r1 ? ROW_GROUP : 1;
		for (int b = 0; b < j->n; b++) {
			const float *x = j->x + (size_t)b * cols;
			if (g == ROW_GROUP && !view_rows_dot(yg, j->w, r, x, j->lut))
				g = 1;
			if (g == ROW_GROUP)
				for (int i = 0; i < ROW_GROUP; i++)
					j->y[(size_t)b * rows + r + i] = yg[i];
			else
				j->y[(size_t)b * rows + r] = view_row_dot(j->w, r, x, j->lut);
		}
		r += g;
	}
}

#define FEW_VECTORS 4 /* below this many vectors, matmul_rows_few */

static void matmul_task(void *arg, size_t t)
{
	const matmul_job *j = arg;
	int r0 = (int)t * ROWS_PER_TASK, rows = j->w->rows, cols = j->w->cols;
	int r1 = rows - r0 < ROWS_PER_TASK ? rows : r0 + ROWS_PER_TASK;
	float acc[MATMUL_GROUP];
	if (j->n < FEW_VECTORS) {
		matmul_rows_few(j, r0, r1);
		return;
	}
	for (int r = r0; r < r1; r++) {
		for (int b0 = 0; b0 < j->n; b0 += MATMUL_GROUP) {
			int n = j->n - b0 < MATMUL_GROUP ? j->n - b0 : MATMUL_GROUP;
			const float *x = j->x + (size_t)b0 * cols;
			memset(acc, 0, sizeof(float) * n);
			if (j->w->split_dim != 1) {
				int lr;
				const weight_piece *p = row_piece(j->w, r, &lr);
				piece_row_dot_many(p, lr, x, (size_t)cols, n, acc, j->lut);
			} else {
				for (int i = 0; i < j->w->n_pieces; i++) {
					piece_row_dot_many(&j->w->pieces[i], r, x, (size_t)cols, n, acc,
							   j->lut);
					x += j->w->pieces[i].cols;
				}
			}
			for (int b = 0; b < n; b++)
				j->y[(size_t)(b0 + b) * rows + r] = acc[b];
		}
	}
}

void op_matmul(thread_pool *pool, float *y, const weight_view *w, const float *x, int n)
{
	matmul_job j = { y, w, x, n, { 0 } };
	size_t tasks = ((size_t)w->rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
	fp8_table(j.lut);
	if (pool)
		thread_pool_for(pool, tasks, matmul_task, &j);
	else
		for (size_t t = 0; t < tasks; t++)
			matmul_task(&j, t);
}

/* Row r of a view into out[cols], decoded and scaled. */
void op_weight_row(float *out, const weight_view *w, int r)
{
	int pieces = w->split_dim == 1 ? w->n_pieces : 1;
	int lr = r;
	const weight_piece *p = w->split_dim == 1 ? w->pieces : row_piece(w, r, &lr);
	for (int i = 0; i < pieces; i++, p++) {
		for (int c = 0; c < p->cols; c++)
			out[c] = piece_at(p, (size_t)lr * p->cols + c) * piece_scale(p, lr, c);
		out += p->cols;
	}
}

/* y[c] += xi * W[r, c] (the weight decoded and scaled, then times xi) over one piece's row. */
static void piece_row_axpy(float *y, const weight_piece *p, int r, float xi, const float *lut)
{
	int simd = simd_ok();
	for (int c0 = 0; c0 < p->cols; c0 += WEIGHT_BLOCK) {
		int n = block_width(p, c0), c = 0;
		size_t at = (size_t)r * p->cols + c0;
		float *yb = y + c0;
		if (p->dtype == ST_F8_E4M3) {
			const uint8_t *w = (const uint8_t *)p->data + at;
			float s = fp8_scale(p, r, c0);
			if (simd) {
				axpy_fp8(yb, w, n, s, xi);
				c = n & ~(LANES - 1);
			}
			for (; c < n; c++)
				yb[c] += xi * (lut[w[c]] * s);
		} else if (p->dtype == ST_BF16) {
			const uint16_t *w = (const uint16_t *)p->data + at;
			if (simd) {
				axpy_bf16(yb, w, n, xi);
				c = n & ~(LANES - 1);
			}
			for (; c < n; c++)
				yb[c] += xi * bf16_value(w[c]);
		} else {
			for (; c < n; c++)
				yb[c] += xi * ((const float *)p->data)[at + c];
		}
	}
}

void op_matvec_t_rows(float *y, const weight_view *w, int row0, int n, const float *x)
{
	float lut[256];
	fp8_table(lut);
	memset(y, 0, sizeof(float) * w->cols);
	for (int i = 0; i < n; i++) {
		if (w->split_dim != 1) {
			int lr;
			const weight_piece *p = row_piece(w, row0 + i, &lr);
			piece_row_axpy(y, p, lr, x[i], lut);
			continue;
		}
		/* Column-split: walk the pieces along the row. */
		float *yc = y;
		for (int k = 0; k < w->n_pieces; k++) {
			piece_row_axpy(yc, &w->pieces[k], row0 + i, x[i], lut);
			yc += w->pieces[k].cols;
		}
	}
}

void op_rmsnorm(float *y, const float *x, const weight_view *w, int n, float eps)
{
	float ss = 0.0f;
	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	float inv = 1.0f / sqrtf(ss / (float)n + eps);
	const weight_piece *p = &w->pieces[0];
	for (int i = 0; i < n; i++)
		y[i] = x[i] * inv * piece_at(p, (size_t)i);
}

void op_rope(float *x, int n, const float *cos_a, const float *sin_a)
{
	for (int i = 0; i < n / 2; i++) {
		float a = x[2 * i], b = x[2 * i + 1];
		x[2 * i] = a * cos_a[i] - b * sin_a[i];
		x[2 * i + 1] = a * sin_a[i] + b * cos_a[i];
	}
}

void op_softmax(float *x, int n)
{
	float max = x[0];
	for (int i = 1; i < n; i++)
		if (x[i] > max)
			max = x[i];
	float sum = 0.0f;
	for (int i = 0; i < n; i++) {
		x[i] = expf(x[i] - max);
		sum += x[i];
	}
	for (int i = 0; i < n; i++)
		x[i] /= sum;
}

void op_silu_mul(float *a, const float *b, int n)
{
	for (int i = 0; i < n; i++)
		a[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

void op_add_scaled(float *y, const float *x, float s, int n)
{
	for (int i = 0; i < n; i++)
		y[i] += s * x[i];
}

typedef struct {
	float *out;
	const float *q;
	const weight_view *wkv_b;
	const float *c, *k_pe;
	int t;
	const mla_dims *d;
	float *scratch;
} mla_job;

static float dot(const float *a, const float *b, int n)
{
	float s = 0.0f;
	for (int i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

/* One head: q_c = q_nope . wkv_b[h,:nope]; scores against c and k_pe; o_c = sum p c;
 * out_h = o_c . wkv_b[h,nope:]^T. */
static void mla_head(void *arg, size_t h)
{
	const mla_job *j = arg;
	const mla_dims *d = j->d;
	const float *qn = j->q + h * (size_t)(d->nope + d->rope);
	const float *qpe = qn + d->nope;
	float *q_c = j->scratch + h * (size_t)(2 * d->lora + j->t);
	float *o_c = q_c + d->lora;
	float *p = o_c + d->lora;
	int row0 = (int)h * (d->nope + d->v);

	op_matvec_t_rows(q_c, j->wkv_b, row0, d->nope, qn);
	for (int s = 0; s < j->t; s++)
		p[s] = (dot(q_c, j->c + (size_t)s * d->lora, d->lora) +
			dot(qpe, j->k_pe + (size_t)s * d->rope, d->rope)) * d->softmax_scale;
	op_softmax(p, j->t);
	memset(o_c, 0, sizeof(float) * d->lora);
	for (int s = 0; s < j->t; s++)
		op_add_scaled(o_c, j->c + (size_t)s * d->lora, p[s], d->lora);
	op_matvec_rows(j->out + h * (size_t)d->v, j->wkv_b, row0 + d->nope, d->v, o_c);
}

void op_mla_attention(thread_pool *pool, float *out, const float *q, const weight_view *wkv_b,
		      const float *c, const float *k_pe, int t, const mla_dims *d, float *scratch)
{
	mla_job j = { out, q, wkv_b, c, k_pe, t, d, scratch };
	if (pool)
		thread_pool_for(pool, (size_t)d->n_heads, mla_head, &j);
	else
		for (int h = 0; h < d->n_heads; h++)
			mla_head(&j, (size_t)h);
}
