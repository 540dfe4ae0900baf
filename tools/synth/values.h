/* The deterministic values of a synthetic checkpoint: one counter-based PRNG stream per tensor,
 * keyed by (seed, layout index), so any chunk of any tensor can be generated on its own and in
 * parallel, and the bytes are the same on every machine (integer PRNG, IEEE + - * / only). */
#ifndef DSV3_SYNTH_VALUES_H
#define DSV3_SYNTH_VALUES_H
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "model_layout.h"

/* E4M3 code for every 16-bit random: u uniform in [-448, 448] encoded by e4m3_from_float. */
typedef struct {
	uint8_t code[65536];
} fp8_table;

void fp8_table_init(fp8_table *t);

/* How one tensor's elements are drawn. */
typedef struct {
	uint64_t key;  /* the tensor's PRNG stream */
	st_dtype dtype;
	int fp8_codes; /* F8_E4M3 weight: codes from the table */
	int scale;     /* weight_scale_inv: base * U(0.5, 1.5) per block */
	int ue8m0;     /* scales rounded to a power of two */
	double low, step; /* other tensors: low + x * step, x uniform in [0, 2^24) */
	double base;   /* scales: sqrt(3) / 448 / sqrt(fan_in of the weight) */
	const fp8_table *table;
} value_gen;

/* `weight_fan_in` is the fan-in of the weight a ROLE_SCALE tensor belongs to (ignored otherwise). */
void value_gen_init(value_gen *g, const layout_tensor *t, size_t layout_index, int64_t weight_fan_in,
		    uint64_t seed, const dsv3_config *c, const fp8_table *table);
/* Writes elements [first, first + n) of the tensor, in its dtype's little-endian bytes, to dst. */
void value_gen_fill(const value_gen *g, uint64_t first, size_t n, void *dst);

/* 1/sqrt(x) for x >= 1 by Newton's iteration (no libm: bit-identical everywhere). */
double inv_sqrt(double x);

#endif
