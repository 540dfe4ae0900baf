/* The exact bytes Python's json.dump(obj, f, indent=2) writes (ensure_ascii on), for the index
 * objects DeepSeek's scripts and Hugging Face write: {"metadata": {}, "weight_map": {name: file,
 * ...}} (fp8_cast_bf16.py) or with "metadata": {"total_size": N}. */
#ifndef DSV3_PY_JSON_H
#define DSV3_PY_JSON_H
#include <stddef.h>
#include <stdint.h>

/* Returns a malloc'd NUL-terminated text (no trailing newline) in *out, or -1 when a string is
 * not valid UTF-8 or memory runs out. total_size NULL: empty metadata. */
int py_json_index(char *const *tensors, char *const *files, size_t n, const uint64_t *total_size,
		  char **out, size_t *len);

#endif
