/* config.json of a Hugging Face checkpoint as the weight tools read and write it: loaded as a
 * JSON object (key order kept), its FP8 block size, and the text they write back (jansson's
 * 2-space indent, the input's key order, one trailing newline, as dsv3-fp8-to-bf16 has always
 * written it). */
#ifndef DSV3_HF_JSON_H
#define DSV3_HF_JSON_H
#include <jansson.h>
#include <stddef.h>
#include "error.h"

/* *cfg: DIR/config.json as an object; NULL (and 0) when the file does not exist. Invalid JSON
 * or not an object: DSV3_EDATA naming the file and line. */
int hf_config_load(const char *dir, json_t **cfg, dsv3_error *err);
/* quantization_config.weight_block_size into *rows, *cols; left as they are when absent. Not two
 * positive integers: DSV3_EDATA naming `label`. */
int hf_config_block_size(const json_t *cfg, int *rows, int *cols, const char *label,
			 dsv3_error *err);
/* The text written for cfg (malloc'd, NUL-terminated; *len excludes the NUL); NULL when out of
 * memory. */
char *hf_config_text(const json_t *cfg, size_t *len);

#endif
