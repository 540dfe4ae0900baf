/* How dsv3-synth splits a checkpoint's tensors over its files. */
#ifndef DSV3_SYNTH_PLAN_H
#define DSV3_SYNTH_PLAN_H
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "model_layout.h"

/* Bytes of a layout tensor's data. */
uint64_t layout_tensor_bytes(const layout_tensor *t);

/* Default file count: one for the tiny presets, else about 4.3 GB per file as DeepSeek's. */
int synth_default_files(uint64_t total_bytes, int is_tiny);

/* Assigns tensors, in layout order, to `k` runs of about equal bytes: file_of[i] in [0, k),
 * non-decreasing, no file empty. When k >= 2 and the checkpoint has block scales, the first
 * boundary falls between a linear weight and its weight_scale_inv, so readers meet a scale in
 * another file than its weight. DSV3_EUSAGE when k < 1 or there are fewer tensors than files. */
int synth_plan_files(const layout_tensor *t, size_t n, int k, int *file_of, dsv3_error *err);

#endif
