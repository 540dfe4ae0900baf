/* libFuzzer target: config_parse on any text (NUL-terminated copy) without a crash or UB. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = 0;
	dsv3_config c;
	dsv3_error err;
	config_parse(&c, text, "fuzz", &err);
	free(text);
	return 0;
}
