/* The exact bytes Python's json.dump(obj, f, indent=2) writes (ensure_ascii on), for the one
 * object fp8_cast_bf16.py writes: {"metadata": {}, "weight_map": {name: file, ...}}. */
#ifndef FP8_PY_JSON_H
#define FP8_PY_JSON_H
#include <stddef.h>

/* Returns a malloc'd NUL-terminated text (no trailing newline) in *out, or -1 when a string is
 * not valid UTF-8 or memory runs out. */
int py_json_index(char *const *tensors, char *const *files, size_t n, char **out, size_t *len);

#endif
