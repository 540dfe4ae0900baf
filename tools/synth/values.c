/* Synthetic weights (see values.h). The PRNG is splitmix64 used as a counter-based generator:
 * word c of a stream is the splitmix64 finaliser of key + (c + 1) * golden ratio, which is what
 * the sequential splitmix64 would return at step c, but reachable without the steps before.
 *
 * Draws per element: an F8_E4M3 weight takes 16 bits (4 per word), BF16/F32 values 32 bits
 * (2 per word), a block scale a whole word. */
#include "values.h"

#include <string.h>

#include "dtype.h"

/* A fused multiply-add rounds once where a * b + c rounds twice: allowing the compiler to fuse
 * would make the bytes depend on the target. (GCC never fuses under -std=c11; clang obeys this.) */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#define GOLDEN 0x9E3779B97F4A7C15ull

static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static inline uint64_t stream_word(uint64_t key, uint64_t counter)
{
	return mix64(key + (counter + 1) * GOLDEN);
}

double inv_sqrt(double x)
{
	/* Start where x*y*y is in (1/4, 1]: Newton's step then rises monotonically to the root. */
	double y = 1.0;
	while (x * y * y > 1.0)
		y *= 0.5;
	for (int i = 0; i < 12; i++)
		y = y * (1.5 - 0.5 * x * y * y);
	return y;
}

static double sqrt3(void)
{
	return 3.0 * inv_sqrt(3.0);
}

void fp8_table_init(fp8_table *t)
{
	for (uint32_t r = 0; r < 65536; r++) {
		/* Centre of the r-th of 65536 equal cells of [-448, 448]. */
		double u = ((double)r + 0.5) * (896.0 / 65536.0) - 448.0;
		t->code[r] = e4m3_from_float((float)u);
	}
}

static void set_uniform(value_gen *g, double center, double half_width)
{
	g->low = center - half_width;
	g->step = 2.0 * half_width * 0x1p-24;
}

void value_gen_init(value_gen *g, const layout_tensor *t, size_t layout_index, int64_t weight_fan_in,
		    uint64_t seed, const dsv3_config *c, const fp8_table *table)
{
	memset(g, 0, sizeof *g);
	g->key = mix64(mix64(seed) ^ mix64((uint64_t)layout_index + 0x5EED0000ull));
	g->dtype = t->dtype;
	g->table = table;
	double s3 = sqrt3();
	switch (t->role) {
	case ROLE_EMBED:
		set_uniform(g, 0.0, 1.0);
		break;
	case ROLE_NORM:
		set_uniform(g, 1.0, 0.1);
		break;
	case ROLE_LINEAR:
		if (t->dtype == ST_F8_E4M3)
			g->fp8_codes = 1;
		else /* std 1/sqrt(fan_in) */
			set_uniform(g, 0.0, s3 * inv_sqrt((double)t->fan_in));
		break;
	case ROLE_SCALE:
		/* The codes' RMS is 448/sqrt(3): this scale makes the weights' std 1/sqrt(fan_in)
		 * (times the block's factor). */
		g->scale = 1;
		g->ue8m0 = c->scale_ue8m0;
		g->base = s3 / 448.0 * inv_sqrt((double)weight_fan_in);
		break;
	case ROLE_GATE:
		set_uniform(g, 0.0, s3 * inv_sqrt((double)c->dim));
		break;
	case ROLE_BIAS:
		set_uniform(g, 0.0, 0.05);
		break;
	case ROLE_HEAD: /* std 4/sqrt(dim): logits far from flat */
		set_uniform(g, 0.0, 4.0 * s3 * inv_sqrt((double)c->dim));
		break;
	}
}

/* Rounds a positive float to the nearest power of two (ue8m0 scales), by its bits. */
static float round_pow2(float f)
{
	uint32_t b;
	memcpy(&b, &f, sizeof b);
	uint32_t exp = b & 0x7F800000u;
	/* mantissa >= sqrt(2) - 1 (in units of 2^-23) rounds up to the next exponent */
	if ((b & 0x7FFFFFu) >= 3474676u)
		exp += 0x800000u;
	memcpy(&f, &exp, sizeof f);
	return f;
}

static void put_u16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put_f32(uint8_t *p, float f)
{
	uint32_t v;
	memcpy(&v, &f, sizeof v);
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void fill_fp8(const value_gen *g, uint64_t first, size_t n, uint8_t *dst)
{
	const uint8_t *code = g->table->code;
	uint64_t j = first, end = first + n;
	/* whole words, 4 codes each: the bulk of every large tensor; draws first, then lookups */
	enum { BLOCK = 256 };
	uint64_t w[BLOCK];
	while ((j & 3) == 0 && j + 4 <= end) {
		size_t m = (size_t)((end - j) / 4);
		m = m < BLOCK ? m : BLOCK;
		for (size_t i = 0; i < m; i++)
			w[i] = stream_word(g->key, (j >> 2) + i);
		for (size_t i = 0; i < m; i++, dst += 4) {
			dst[0] = code[w[i] & 0xFFFF];
			dst[1] = code[(w[i] >> 16) & 0xFFFF];
			dst[2] = code[(w[i] >> 32) & 0xFFFF];
			dst[3] = code[w[i] >> 48];
		}
		j += 4 * m;
	}
	for (; j < end; j++)
		*dst++ = code[(stream_word(g->key, j >> 2) >> (16 * (j & 3))) & 0xFFFF];
}

static void fill_scales(const value_gen *g, uint64_t first, size_t n, uint8_t *dst)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t w = stream_word(g->key, first + i);
		double f = 0.5 + (double)(w >> 11) * 0x1p-53; /* U[0.5, 1.5) */
		float s = (float)(g->base * f);
		put_f32(dst + 4 * i, g->ue8m0 ? round_pow2(s) : s);
	}
}

/* center + U(-half_width, half_width) from a 32-bit draw, 24 bits of which make the fraction:
 * low + x * step, x in [0, 2^24). */
static inline float uniform_value(const value_gen *g, uint32_t r)
{
	return (float)(g->low + (double)(r >> 8) * g->step);
}

/* bf16_from_float for the finite values drawn here (no NaN case), inlined: round to nearest
 * even by adding 0x7FFF plus the kept LSB to the float's bits. */
static inline uint16_t bf16_finite(float f)
{
	uint32_t b;
	memcpy(&b, &f, sizeof b);
	return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1)) >> 16);
}

static void store(uint8_t *dst, size_t esize, float v)
{
	if (esize == 4)
		put_f32(dst, v);
	else
		put_u16(dst, bf16_from_float(v));
}

/* Whole words of BF16, two values each: the bulk of embeddings and heads. Draws first, then
 * the arithmetic in a separate loop the compiler can vectorise. */
static void fill_bf16_words(const value_gen *g, uint64_t word, size_t n_words, uint8_t *dst)
{
	enum { BLOCK = 256 };
	uint32_t r[2 * BLOCK];
	while (n_words) {
		size_t m = n_words < BLOCK ? n_words : BLOCK;
		for (size_t i = 0; i < m; i++) {
			uint64_t w = stream_word(g->key, word + i);
			r[2 * i] = (uint32_t)w;
			r[2 * i + 1] = (uint32_t)(w >> 32);
		}
		for (size_t i = 0; i < 2 * m; i++) {
			uint16_t v = bf16_finite(uniform_value(g, r[i]));
			dst[2 * i] = (uint8_t)v;
			dst[2 * i + 1] = (uint8_t)(v >> 8);
		}
		word += m;
		n_words -= m;
		dst += 4 * m;
	}
}

static void fill_uniform(const value_gen *g, uint64_t first, size_t n, uint8_t *dst)
{
	size_t esize = dtype_size(g->dtype);
	uint64_t j = first, end = first + n;
	if (esize == 2 && (j & 1) == 0) {
		size_t words = (size_t)((end - j) / 2);
		fill_bf16_words(g, j >> 1, words, dst);
		j += 2 * words;
		dst += 4 * words;
	}
	for (; j < end; j++, dst += esize)
		store(dst, esize, uniform_value(g, (uint32_t)(stream_word(g->key, j >> 1) >> (32 * (j & 1)))));
}

void value_gen_fill(const value_gen *g, uint64_t first, size_t n, void *dst)
{
	if (g->fp8_codes)
		fill_fp8(g, first, n, dst);
	else if (g->scale)
		fill_scales(g, first, n, dst);
	else
		fill_uniform(g, first, n, dst);
}
