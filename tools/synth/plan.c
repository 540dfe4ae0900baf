/* File split of a synthetic checkpoint (see plan.h). */
#include "plan.h"

#include <stdlib.h>

#include "dtype.h"

#define BYTES_PER_FILE 4300000000ull

uint64_t layout_tensor_bytes(const layout_tensor *t)
{
	uint64_t e = (uint64_t)t->shape[0];
	if (t->ndim == 2)
		e *= (uint64_t)t->shape[1];
	return e * dtype_size(t->dtype);
}

int synth_default_files(uint64_t total_bytes, int is_tiny)
{
	if (is_tiny)
		return 1;
	uint64_t k = (total_bytes + BYTES_PER_FILE / 2) / BYTES_PER_FILE;
	return k < 1 ? 1 : k > 99999 ? 99999 : (int)k;
}

/* First tensor of file j (0 < j < k) when files are cut at equal byte targets: a tensor goes to
 * the file its middle byte lies in. */
static size_t natural_boundary(const uint64_t *mid, size_t n, unsigned __int128 total, int k,
			       int j)
{
	size_t i = 0;
	while (i < n && (unsigned __int128)mid[i] * (unsigned)k < total * (unsigned)j)
		i++;
	return i;
}

/* The scale nearest to `at` (itself in [lo, hi]) within [lo, hi], or `at` when there is none. */
static size_t nearest_scale(const layout_tensor *t, size_t at, size_t lo, size_t hi)
{
	for (size_t d = 0; d <= hi - lo; d++) {
		if (at >= lo + d && t[at - d].role == ROLE_SCALE)
			return at - d;
		if (at + d <= hi && t[at + d].role == ROLE_SCALE)
			return at + d;
	}
	return at;
}

int synth_plan_files(const layout_tensor *t, size_t n, int k, int *file_of, dsv3_error *err)
{
	if (k < 1 || k > 99999)
		return dsv3_fail(err, DSV3_EUSAGE, "--files must be between 1 and 99999, not %d", k);
	if ((size_t)k > n)
		return dsv3_fail(err, DSV3_EUSAGE, "--files %d: the model has only %zu tensors", k, n);
	uint64_t *mid = malloc(n * sizeof *mid);
	if (!mid)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	uint64_t cum = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t b = layout_tensor_bytes(&t[i]);
		mid[i] = cum + b / 2;
		cum += b;
	}
	size_t first = 0; /* first tensor of the current file */
	for (int j = 0; j < k; j++) {
		size_t next = n; /* first tensor of file j + 1 */
		if (j + 1 < k) {
			/* every file keeps at least one tensor */
			size_t lo = first + 1, hi = n - (size_t)(k - j - 1);
			next = natural_boundary(mid, n, cum, k, j + 1);
			next = next < lo ? lo : next > hi ? hi : next;
			if (j == 0)
				next = nearest_scale(t, next, lo, hi);
		}
		for (size_t i = first; i < next; i++)
			file_of[i] = j;
		first = next;
	}
	free(mid);
	return 0;
}
