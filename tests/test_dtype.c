/* lib/dtype: names, sizes and every conversion, checked against values computed here from the
 * formats' definitions (ldexp on sign/exponent/mantissa fields), never from the code under test. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "dtype.h"

static uint32_t fbits(float f)
{
	uint32_t b;
	memcpy(&b, &f, 4);
	return b;
}

static float bitsf(uint32_t b)
{
	float f;
	memcpy(&f, &b, 4);
	return f;
}

/* E4M3-fn by its definition: bias 7, 3 mantissa bits, subnormal m*2^-9, S.1111.111 is NaN. */
static double e4m3_def(unsigned c)
{
	int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
	double mag;
	if (e == 15 && m == 7)
		return NAN;
	mag = e == 0 ? ldexp(m, -9) : ldexp(1.0 + m / 8.0, e - 7);
	return s ? -mag : mag;
}

/* E5M2 by its definition: bias 15, 2 mantissa bits, exponent 31 is inf (m=0) or NaN. */
static double e5m2_def(unsigned c)
{
	int s = c >> 7, e = (c >> 2) & 31, m = c & 3;
	double mag;
	if (e == 31)
		mag = m ? NAN : INFINITY;
	else
		mag = e == 0 ? ldexp(m, -16) : ldexp(1.0 + m / 4.0, e - 15);
	return s ? -mag : mag;
}

/* IEEE half by its definition. */
static double f16_def(unsigned c)
{
	int s = c >> 15, e = (c >> 10) & 31, m = c & 1023;
	double mag;
	if (e == 31)
		mag = m ? NAN : INFINITY;
	else
		mag = e == 0 ? ldexp(m, -24) : ldexp(1.0 + m / 1024.0, e - 15);
	return s ? -mag : mag;
}

/* Same value, same sign (so -0 and +0 differ), NaN equal to NaN. */
static void assert_same(double expected, float got)
{
	if (isnan(expected)) {
		assert_true(isnan(got));
		return;
	}
	assert_true((double)got == expected);
	assert_int_equal(!!signbit(got), !!signbit(expected));
}

static void test_dtype_names_match_safetensors_spelling(void **state)
{
	(void)state;
	static const struct {
		const char *name;
		st_dtype t;
		size_t size;
	} all[] = {
		{ "BOOL", ST_BOOL, 1 },	      { "U8", ST_U8, 1 },   { "I8", ST_I8, 1 },
		{ "F8_E5M2", ST_F8_E5M2, 1 }, { "F8_E4M3", ST_F8_E4M3, 1 },
		{ "I16", ST_I16, 2 },	      { "U16", ST_U16, 2 }, { "F16", ST_F16, 2 },
		{ "BF16", ST_BF16, 2 },	      { "I32", ST_I32, 4 }, { "U32", ST_U32, 4 },
		{ "F32", ST_F32, 4 },	      { "F64", ST_F64, 8 }, { "I64", ST_I64, 8 },
		{ "U64", ST_U64, 8 },
	};
	assert_int_equal(sizeof all / sizeof all[0], ST_DTYPE_COUNT);
	for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
		st_dtype t = ST_DTYPE_COUNT;
		assert_string_equal(dtype_name(all[i].t), all[i].name);
		assert_int_equal(dtype_from_name(all[i].name, &t), 0);
		assert_int_equal(t, all[i].t);
		assert_int_equal(dtype_size(all[i].t), all[i].size);
	}
}

static void test_dtype_from_name_refuses_unknown(void **state)
{
	(void)state;
	st_dtype t;
	assert_int_equal(dtype_from_name("F8_E4M3FN", &t), -1);
	assert_int_equal(dtype_from_name("f32", &t), -1);
	assert_int_equal(dtype_from_name("", &t), -1);
	assert_int_equal(dtype_from_name("F3", &t), -1);
}

static void test_e4m3_decodes_all_256_codes(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 256; c++)
		assert_same(e4m3_def(c), e4m3_to_float((uint8_t)c));
	assert_true(signbit(e4m3_to_float(0xFF)));
	assert_false(signbit(e4m3_to_float(0x7F)));
	assert_true(e4m3_to_float(0x7E) == 448.0f);
	assert_true(e4m3_to_float(0x01) == 0x1p-9f);
}

static void test_e5m2_decodes_all_256_codes(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 256; c++)
		assert_same(e5m2_def(c), e5m2_to_float((uint8_t)c));
	assert_true(e5m2_to_float(0x7B) == 57344.0f);
	assert_true(isinf(e5m2_to_float(0xFC)) && e5m2_to_float(0xFC) < 0);
}

static void test_f16_decodes_all_codes_and_round_trips(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 65536; c++) {
		float f = f16_to_float((uint16_t)c);
		assert_same(f16_def(c), f);
		if (isnan(f16_def(c)))
			assert_true(isnan(f16_to_float(f16_from_float(f))));
		else
			assert_int_equal(f16_from_float(f), c);
	}
}

static void test_bf16_decodes_and_round_trips_all_codes(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 65536; c++) {
		float f = bf16_to_float((uint16_t)c);
		assert_int_equal(fbits(f), (uint32_t)c << 16);
		if (!isnan(f))
			assert_int_equal(bf16_from_float(f), c);
	}
}

static void test_bf16_rounds_to_nearest_even(void **state)
{
	(void)state;
	static const struct {
		uint32_t in;
		uint16_t out;
	} cases[] = {
		{ 0x3F800000, 0x3F80 }, /* 1.0 exact */
		{ 0x3F808000, 0x3F80 }, /* tie, even below: down */
		{ 0x3F818000, 0x3F82 }, /* tie, odd below: up */
		{ 0x3F808001, 0x3F81 }, /* just above the tie */
		{ 0x3F807FFF, 0x3F80 }, /* just below the tie */
		{ 0x3F81FFFF, 0x3F82 },
		{ 0xBF818000, 0xBF82 }, /* negative tie, odd: away from zero */
		{ 0xBF808000, 0xBF80 },
		{ 0x3FFF8000, 0x4000 }, /* carry into the exponent */
		{ 0x7F7F7FFF, 0x7F7F }, /* near the top: stays finite */
		{ 0x7F7F8000, 0x7F80 }, /* tie at the top, odd: infinity */
		{ 0x7F7FFFFF, 0x7F80 }, /* FLT_MAX: infinity */
		{ 0xFF7FFFFF, 0xFF80 },
		{ 0x7F800000, 0x7F80 }, /* +inf */
		{ 0xFF800000, 0xFF80 }, /* -inf */
		{ 0x00000000, 0x0000 },
		{ 0x80000000, 0x8000 }, /* -0 keeps its sign */
		{ 0x00000001, 0x0000 }, /* smallest float subnormal */
		{ 0x00008000, 0x0000 }, /* subnormal tie, even: down */
		{ 0x00018000, 0x0002 }, /* subnormal tie, odd: up */
		{ 0x0000FFFF, 0x0001 },
		{ 0x807FFFFF, 0x8080 }, /* largest subnormal rounds to the smallest normal */
		{ 0x007F8000, 0x0080 },
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		assert_int_equal(bf16_from_float(bitsf(cases[i].in)), cases[i].out);
}

static void test_bf16_keeps_nan_quiet_with_sign(void **state)
{
	(void)state;
	static const uint32_t nans[] = { 0x7FC00000, 0x7F800001, 0x7F80FFFF, 0x7FFFFFFF,
					 0xFF800001, 0xFFC00000, 0xFF80FFFF, 0x7F810000 };
	for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
		uint16_t h = bf16_from_float(bitsf(nans[i]));
		assert_true(isnan(bf16_to_float(h)));
		assert_int_equal(h & 0x8000, (nans[i] >> 16) & 0x8000);
		assert_int_equal(h & 0x0040, 0x0040); /* quiet */
	}
}

static void test_f16_rounding_edges(void **state)
{
	(void)state;
	static const struct {
		float in;
		uint16_t out;
	} cases[] = {
		{ 1.0f, 0x3C00 },
		{ -2.0f, 0xC000 },
		{ 65504.0f, 0x7BFF },
		{ 65519.0f, 0x7BFF },
		{ 65520.0f, 0x7C00 }, /* tie above the largest finite: even is infinity */
		{ 1e10f, 0x7C00 },
		{ -1e10f, 0xFC00 },
		{ INFINITY, 0x7C00 },
		{ -INFINITY, 0xFC00 },
		{ 0x1p-24f, 0x0001 },
		{ 0x1p-25f, 0x0000 },		    /* tie to even (zero) */
		{ 0x1.000002p-25f, 0x0001 },	    /* just above that tie */
		{ 0x3p-25f, 0x0002 },		    /* tie between 1 and 2 subnormal steps */
		{ 0x5p-25f, 0x0002 },		    /* tie between 2 and 3 */
		{ 0x3FFp-24f, 0x03FF },		    /* largest subnormal */
		{ 0x7FFp-25f, 0x0400 },		    /* tie above it: even is the smallest normal */
		{ 0x1p-14f, 0x0400 },
		{ 1.0f + 0x1p-11f, 0x3C00 },	    /* normal tie, even: down */
		{ 1.0f + 0x3p-11f, 0x3C02 },	    /* normal tie, odd: up */
		{ 1.0f + 0x1p-11f + 0x1p-20f, 0x3C01 },
		{ 0x1p-30f, 0x0000 },
		{ -0x1p-30f, 0x8000 },
		{ -0.0f, 0x8000 },
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		assert_int_equal(f16_from_float(cases[i].in), cases[i].out);
	uint16_t n = f16_from_float(-NAN);
	assert_true(isnan(f16_to_float(n)));
	assert_int_equal(n & 0x8000, 0x8000);
	assert_int_equal(n & 0x0200, 0x0200);
	assert_true(isnan(f16_to_float(f16_from_float(bitsf(0x7F800001)))));
}

static void test_e4m3_encode_maps_every_value_to_its_code(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 256; c++) {
		if (c == 0x7F || c == 0xFF)
			continue;
		assert_int_equal(e4m3_from_float((float)e4m3_def(c)), c);
	}
}

static unsigned even_of(unsigned a, unsigned b)
{
	return (a & 1) ? b : a;
}

static void test_e4m3_encode_rounds_midpoints_to_even(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 0x7E; c++) {
		/* Values have at most 4 significant bits, so midpoints are exact in float. */
		float mid = (float)((e4m3_def(c) + e4m3_def(c + 1)) / 2);
		assert_true((double)mid == (e4m3_def(c) + e4m3_def(c + 1)) / 2);
		assert_int_equal(e4m3_from_float(mid), even_of(c, c + 1));
		assert_int_equal(e4m3_from_float(-mid), 0x80 | even_of(c, c + 1));
		assert_int_equal(e4m3_from_float(nextafterf(mid, INFINITY)), c + 1);
		assert_int_equal(e4m3_from_float(nextafterf(mid, 0)), c);
	}
}

static void test_e4m3_encode_saturates_and_keeps_nan(void **state)
{
	(void)state;
	static const float big[] = { 448.0f, 449.0f, 464.0f, 480.0f, 1e6f, 3.4e38f, INFINITY };
	for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
		assert_int_equal(e4m3_from_float(big[i]), 0x7E);
		assert_int_equal(e4m3_from_float(-big[i]), 0xFE);
	}
	assert_int_equal(e4m3_from_float(NAN), 0x7F);
	assert_int_equal(e4m3_from_float(-NAN), 0xFF);
	assert_int_equal(e4m3_from_float(0.0f), 0x00);
	assert_int_equal(e4m3_from_float(-0.0f), 0x80);
	assert_int_equal(e4m3_from_float(0x1p-10f), 0x00); /* half the smallest step: even */
	assert_int_equal(e4m3_from_float(0x1.000002p-10f), 0x01);
	assert_int_equal(e4m3_from_float(1e-30f), 0x00);
	assert_int_equal(e4m3_from_float(-1e-30f), 0x80);
	assert_int_equal(e4m3_from_float(bitsf(1)), 0x00); /* float subnormal */
}

/* BF16 nearest-even chosen by comparing distances in double: independent of bit tricks. */
static uint16_t bf16_by_distance(float x)
{
	uint32_t b = fbits(x);
	uint16_t lo = (uint16_t)(b >> 16), hi = (uint16_t)(lo + 1);
	double dl = fabs((double)x - (double)bitsf((uint32_t)lo << 16));
	if ((b & 0xFFFF) == 0)
		return lo;
	if ((hi & 0x7FFF) == 0x7F80) /* rounding up to infinity: the tie rule decides */
		return (b & 0xFFFF) >= 0x8000 ? hi : lo;
	double dh = fabs((double)x - (double)bitsf((uint32_t)hi << 16));
	if (dl != dh)
		return dl < dh ? lo : hi;
	return (lo & 1) ? hi : lo;
}

static void test_e4m3_scale_to_bf16_matches_scalar_math(void **state)
{
	(void)state;
	static const float scales[] = { 1.0f, 0.5f, 0x1p-7f, 0x1p10f, 0x1p-20f,
					3.0e-3f, 1.7f, 1.2345e-4f, 0.0f, -2.5f,
					/* exact BF16 ties on powers of two, below even and odd */
					0x1.01p0f, 0x1.03p0f, -0x1.01p-3f };
	enum { N = 256 * 3 + 13 }; /* every code, several chunks, a ragged tail */
	uint8_t src[N];
	uint16_t dst[N + 1];
	for (size_t i = 0; i < N; i++)
		src[i] = (uint8_t)(i * 37 + (i >> 8));
	for (size_t s = 0; s < sizeof scales / sizeof scales[0]; s++) {
		for (size_t off = 0; off < 2; off++) {
			dst[N] = 0xBEEF;
			e4m3_scale_to_bf16(dst + off, src, N - off, scales[s]);
			for (size_t i = 0; i < N - off; i++) {
				float x = (float)e4m3_def(src[i]) * scales[s];
				if (isnan(x)) {
					assert_true(isnan(bf16_to_float(dst[off + i])));
					continue;
				}
				assert_int_equal(dst[off + i], bf16_by_distance(x));
			}
			assert_int_equal(dst[N], 0xBEEF); /* nothing written past n */
		}
	}
}

static void test_e4m3_scale_to_bf16_short_and_empty(void **state)
{
	(void)state;
	uint8_t src[3] = { 0x38, 0xB8, 0x7E }; /* 1, -1, 448 */
	uint16_t dst[4] = { 0x1111, 0x1111, 0x1111, 0x1111 };
	e4m3_scale_to_bf16(dst, src, 0, 2.0f);
	assert_int_equal(dst[0], 0x1111);
	e4m3_scale_to_bf16(dst, src, 3, 2.0f);
	assert_int_equal(dst[0], 0x4000); /* 2 */
	assert_int_equal(dst[1], 0xC000); /* -2 */
	assert_int_equal(dst[2], 0x4460); /* 896 = 1.75 * 2^9 */
	assert_int_equal(dst[3], 0x1111);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_dtype_names_match_safetensors_spelling),
		cmocka_unit_test(test_dtype_from_name_refuses_unknown),
		cmocka_unit_test(test_e4m3_decodes_all_256_codes),
		cmocka_unit_test(test_e5m2_decodes_all_256_codes),
		cmocka_unit_test(test_f16_decodes_all_codes_and_round_trips),
		cmocka_unit_test(test_bf16_decodes_and_round_trips_all_codes),
		cmocka_unit_test(test_bf16_rounds_to_nearest_even),
		cmocka_unit_test(test_bf16_keeps_nan_quiet_with_sign),
		cmocka_unit_test(test_f16_rounding_edges),
		cmocka_unit_test(test_e4m3_encode_maps_every_value_to_its_code),
		cmocka_unit_test(test_e4m3_encode_rounds_midpoints_to_even),
		cmocka_unit_test(test_e4m3_encode_saturates_and_keeps_nan),
		cmocka_unit_test(test_e4m3_scale_to_bf16_matches_scalar_math),
		cmocka_unit_test(test_e4m3_scale_to_bf16_short_and_empty),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
