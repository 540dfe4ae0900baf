/* safetensors dtypes and the small float formats of DeepSeek checkpoints.
 *
 * Every conversion works on the bit patterns (memcpy + integer arithmetic) so the results do
 * not depend on the FPU's rounding mode or on libm. */
#include "dtype.h"

#include <string.h>

static const char *const dtype_names[ST_DTYPE_COUNT] = {
	[ST_BOOL] = "BOOL",	  [ST_U8] = "U8",	[ST_I8] = "I8",	  [ST_F8_E5M2] = "F8_E5M2",
	[ST_F8_E4M3] = "F8_E4M3", [ST_I16] = "I16",	[ST_U16] = "U16", [ST_F16] = "F16",
	[ST_BF16] = "BF16",	  [ST_I32] = "I32",	[ST_U32] = "U32", [ST_F32] = "F32",
	[ST_F64] = "F64",	  [ST_I64] = "I64",	[ST_U64] = "U64",
};

static const unsigned char dtype_sizes[ST_DTYPE_COUNT] = {
	[ST_BOOL] = 1, [ST_U8] = 1,  [ST_I8] = 1,  [ST_F8_E5M2] = 1, [ST_F8_E4M3] = 1,
	[ST_I16] = 2,  [ST_U16] = 2, [ST_F16] = 2, [ST_BF16] = 2,    [ST_I32] = 4,
	[ST_U32] = 4,  [ST_F32] = 4, [ST_F64] = 8, [ST_I64] = 8,     [ST_U64] = 8,
};

const char *dtype_name(st_dtype t)
{
	if ((unsigned)t >= ST_DTYPE_COUNT)
		return "?";
	return dtype_names[t];
}

int dtype_from_name(const char *s, st_dtype *t)
{
	for (int i = 0; i < ST_DTYPE_COUNT; i++) {
		if (strcmp(s, dtype_names[i]) == 0) {
			*t = (st_dtype)i;
			return 0;
		}
	}
	return -1;
}

size_t dtype_size(st_dtype t)
{
	if ((unsigned)t >= ST_DTYPE_COUNT)
		return 0;
	return dtype_sizes[t];
}

static float float_from_bits(uint32_t b)
{
	float f;
	memcpy(&f, &b, sizeof f);
	return f;
}

static uint32_t bits_from_float(float f)
{
	uint32_t b;
	memcpy(&b, &f, sizeof b);
	return b;
}

/* Decodes ------------------------------------------------------------------------------- */

float e4m3_to_float(uint8_t v)
{
	uint32_t sign = (uint32_t)(v & 0x80) << 24;
	uint32_t exp = (v >> 3) & 0xF;
	uint32_t man = v & 0x7;

	if (exp == 0xF && man == 0x7)
		return float_from_bits(sign | 0x7FC00000u);
	if (exp == 0) {
		/* Subnormal m * 2^-9: exact in float (a 3-bit integer times a power of two). */
		float mag = (float)man * 0x1p-9f;
		return float_from_bits(sign | bits_from_float(mag));
	}
	return float_from_bits(sign | (exp - 7 + 127) << 23 | man << 20);
}

float f16_to_float(uint16_t v)
{
	uint32_t sign = (uint32_t)(v & 0x8000) << 16;
	uint32_t exp = (v >> 10) & 0x1F;
	uint32_t man = v & 0x3FF;

	if (exp == 0x1F) /* inf, or NaN with its payload kept */
		return float_from_bits(sign | 0x7F800000u | man << 13);
	if (exp == 0) {
		float mag = (float)man * 0x1p-24f;
		return float_from_bits(sign | bits_from_float(mag));
	}
	return float_from_bits(sign | (exp - 15 + 127) << 23 | man << 13);
}

/* E5M2 is the upper byte of an IEEE half: same exponent, two mantissa bits. */
float e5m2_to_float(uint8_t v)
{
	return f16_to_float((uint16_t)(v << 8));
}

float bf16_to_float(uint16_t v)
{
	return float_from_bits((uint32_t)v << 16);
}

/* Encodes ------------------------------------------------------------------------------- */

/* Rounds `mant` right by `shift` bits (1..31), nearest with ties to even. */
static uint32_t shift_round_even(uint32_t mant, unsigned shift)
{
	uint32_t q = mant >> shift;
	uint32_t rem = mant & ((1u << shift) - 1);
	uint32_t half = 1u << (shift - 1);
	if (rem > half || (rem == half && (q & 1)))
		q++;
	return q;
}

static int bits_is_nan(uint32_t b)
{
	return (b & 0x7FFFFFFFu) > 0x7F800000u;
}

uint16_t bf16_from_float(float f)
{
	uint32_t b = bits_from_float(f);
	if (bits_is_nan(b))
		return (uint16_t)((b >> 16) | 0x0040);
	/* Adding 0x7FFF plus the kept LSB rounds to nearest even; a carry into the exponent is
	 * the correct result (including the largest finite values rounding to infinity). */
	return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1)) >> 16);
}

uint16_t f16_from_float(float f)
{
	uint32_t b = bits_from_float(f);
	uint16_t sign = (uint16_t)((b >> 16) & 0x8000);
	uint32_t a = b & 0x7FFFFFFFu;
	uint32_t exp = a >> 23;
	uint32_t man = a & 0x7FFFFFu;

	if (a > 0x7F800000u)
		return sign | 0x7E00 | (uint16_t)(man >> 13);
	if (a >= 0x477FF000u) /* >= 65520, the tie above 65504: rounds (to even) to infinity */
		return sign | 0x7C00;
	if (a < 0x38800000u) { /* below 2^-14: a half subnormal, value = round(|f| * 2^24) */
		unsigned shift = 126 - exp; /* |f| * 2^24 = (man | 2^23) * 2^(exp - 126) */
		if (exp == 0 || shift > 24)
			return sign;
		return sign | (uint16_t)shift_round_even(man | 0x800000u, shift);
	}
	/* Normal: a carry out of the mantissa bumps the exponent, which is right. */
	return sign | (uint16_t)shift_round_even((exp - 112) << 23 | man, 13);
}

uint8_t e4m3_from_float(float f)
{
	uint32_t b = bits_from_float(f);
	uint8_t sign = (uint8_t)((b >> 24) & 0x80);
	uint32_t a = b & 0x7FFFFFFFu;
	uint32_t exp = a >> 23;
	uint32_t man = a & 0x7FFFFFu;

	if (a > 0x7F800000u)
		return sign | 0x7F;
	if (a >= 0x43E00000u) /* >= 448 (and infinity): saturate, E4M3-fn has no infinity */
		return sign | 0x7E;
	if (a < 0x3C800000u) { /* below 2^-6: subnormal, value = round(|f| * 2^9) */
		unsigned shift = 141 - exp; /* |f| * 2^9 = (man | 2^23) * 2^(exp - 141) */
		if (exp == 0 || shift > 24)
			return sign;
		return sign | (uint8_t)shift_round_even(man | 0x800000u, shift);
	}
	return sign | (uint8_t)shift_round_even((exp - 120) << 23 | man, 20);
}

/* The hot loop ------------------------------------------------------------------------- */

/* Every E4M3 code's value as a constant expression, so the table is built by the compiler. */
#define E4M3_EXP(v) (((v) >> 3) & 0xF)
#define E4M3_MAN(v) ((v) & 0x7)
#define E4M3_MAG(v)                                                                   \
	(E4M3_EXP(v) == 0 ? E4M3_MAN(v) * 0x1p-9f                                     \
			  : (8 + E4M3_MAN(v)) * (float)(1u << E4M3_EXP(v)) * 0x1p-10f)
#define E4M3_VAL(v)                                                                   \
	((v) == 0x7F ? __builtin_nanf("")                                             \
		     : (v) == 0xFF ? -__builtin_nanf("")                              \
				   : ((v) & 0x80 ? -E4M3_MAG(v) : E4M3_MAG(v))),
#define E4M3_ROW4(v) E4M3_VAL(v) E4M3_VAL((v) + 1) E4M3_VAL((v) + 2) E4M3_VAL((v) + 3)
#define E4M3_ROW16(v) E4M3_ROW4(v) E4M3_ROW4((v) + 4) E4M3_ROW4((v) + 8) E4M3_ROW4((v) + 12)
#define E4M3_ROW64(v) E4M3_ROW16(v) E4M3_ROW16((v) + 16) E4M3_ROW16((v) + 32) E4M3_ROW16((v) + 48)

static const float e4m3_table[256] = {
	E4M3_ROW64(0) E4M3_ROW64(64) E4M3_ROW64(128) E4M3_ROW64(192)
};

/* Branch-free bf16_from_float, so the compiler can vectorise the loop around it. */
static inline uint16_t bf16_round(float f)
{
	uint32_t b = bits_from_float(f);
	uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1)) >> 16;
	uint32_t quiet = (b >> 16) | 0x0040;
	return (uint16_t)(bits_is_nan(b) ? quiet : rounded);
}

/* Chunks of a fixed 16 give the vectoriser a known trip count even at -O2's cheap cost model:
 * the table lookups stay scalar, the multiply and rounding run as SIMD. */
#define SCALE_CHUNK 16

static void e4m3_scale_to_bf16_generic(uint16_t *dst, const uint8_t *src, size_t n, float scale)
{
	size_t i = 0;
	for (; i + SCALE_CHUNK <= n; i += SCALE_CHUNK) {
		float x[SCALE_CHUNK];
		for (int j = 0; j < SCALE_CHUNK; j++)
			x[j] = e4m3_table[src[i + j]];
		for (int j = 0; j < SCALE_CHUNK; j++)
			dst[i + j] = bf16_round(x[j] * scale);
	}
	for (; i < n; i++)
		dst[i] = bf16_round(e4m3_table[src[i]] * scale);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(DSV3_NO_AVX2)
#define HAVE_AVX2_PATH 1
typedef float v8f32 __attribute__((vector_size(32)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef int32_t v8i32 __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));

/* The same arithmetic as bf16_round, eight lanes at a time; the build targets baseline x86-64,
 * so this is compiled for AVX2 on its own and chosen at run time (about 2.5x the SSE2 loop). */
__attribute__((target("avx2"))) static void
e4m3_scale_to_bf16_avx2(uint16_t *dst, const uint8_t *src, size_t n, float scale)
{
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		const uint8_t *s = src + i;
		v8f32 x = { e4m3_table[s[0]], e4m3_table[s[1]], e4m3_table[s[2]], e4m3_table[s[3]],
			    e4m3_table[s[4]], e4m3_table[s[5]], e4m3_table[s[6]], e4m3_table[s[7]] };
		x *= scale;
		v8u32 b;
		memcpy(&b, &x, sizeof b);
		v8u32 rounded = (b + 0x7FFFu + ((b >> 16) & 1)) >> 16;
		v8u32 quiet = (b >> 16) | 0x0040;
		v8u32 nan = (v8u32)((v8i32)(b & 0x7FFFFFFFu) > 0x7F800000);
		v8u16 h = __builtin_convertvector((rounded & ~nan) | (quiet & nan), v8u16);
		memcpy(dst + i, &h, sizeof h);
	}
	for (; i < n; i++)
		dst[i] = bf16_round(e4m3_table[src[i]] * scale);
}
#endif

void e4m3_scale_to_bf16(uint16_t *dst, const uint8_t *src, size_t n, float scale)
{
#ifdef HAVE_AVX2_PATH
	if (__builtin_cpu_supports("avx2")) {
		e4m3_scale_to_bf16_avx2(dst, src, n, scale);
		return;
	}
#endif
	e4m3_scale_to_bf16_generic(dst, src, n, scale);
}
