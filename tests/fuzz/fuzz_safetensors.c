/* libFuzzer target: st_parse must reject or accept any bytes without a crash, leak or UB, and
 * every tensor it accepts must lie inside the buffer. */
#include <stdint.h>
#include <stdlib.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	st_file f;
	dsv3_error err;
	if (st_parse(&f, data, size, "fuzz", &err) != 0)
		return 0;
	for (size_t i = 0; i < f.n_tensors; i++) {
		const st_tensor *t = &f.tensors[i];
		if (t->data < data || t->data + t->nbytes > data + size)
			abort();
		if (st_find(&f, t->name) == NULL)
			abort();
	}
	st_close(&f);
	return 0;
}
