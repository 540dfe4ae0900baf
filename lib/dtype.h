/* safetensors dtypes and the number formats of DeepSeek checkpoints (E4M3, E5M2, BF16, F16). */
#ifndef DSV3_DTYPE_H
#define DSV3_DTYPE_H
#include <stddef.h>
#include <stdint.h>

/* Ordered by the reference serializer's rank, ascending: the writer lays tensors out by
 * descending value (U64 first, BOOL last), DESIGN §3.1. */
typedef enum {
	ST_BOOL,
	ST_U8,
	ST_I8,
	ST_F8_E5M2,
	ST_F8_E4M3,
	ST_I16,
	ST_U16,
	ST_F16,
	ST_BF16,
	ST_I32,
	ST_U32,
	ST_F32,
	ST_F64,
	ST_I64,
	ST_U64,
	ST_DTYPE_COUNT
} st_dtype;

const char *dtype_name(st_dtype t);           /* "F8_E4M3" */
int dtype_from_name(const char *s, st_dtype *t); /* 0 on success, -1 if unknown */
size_t dtype_size(st_dtype t);                /* bytes per element */

/* Exact decodes (every code maps to its value; NaN codes to NaN). E4M3 is the "fn" variant:
 * no infinities, 0x7F and 0xFF are NaN, max 448, subnormals 2^-9 steps. */
float e4m3_to_float(uint8_t v);
float e5m2_to_float(uint8_t v);
float bf16_to_float(uint16_t v);
float f16_to_float(uint16_t v);

/* Round to nearest, ties to even; NaN stays NaN (quiet, sign kept); overflow follows IEEE
 * (to infinity) for BF16/F16. E4M3 saturates to +-448 (no infinities) and is used by dsv3-synth
 * and the FP8 activation mode. */
uint16_t bf16_from_float(float f);
uint16_t f16_from_float(float f);
uint8_t e4m3_from_float(float f);

/* dst[i] = bf16(float(src[i]) * scale): one row piece of a 128x128 block dequantisation. */
void e4m3_scale_to_bf16(uint16_t *dst, const uint8_t *src, size_t n, float scale);

#endif
