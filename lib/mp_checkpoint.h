/* A whole converted checkpoint, written the way dsv3-convert and dsv3-shard both end: the rank
 * files, the input's small files, SHA256SUMS and tensors.sha256.json, all under temporary names
 * and renamed into place only when everything succeeded. (Its home is next to mp_write in
 * lib/mp_shards.c; it lives apart while that file is being reworked.) */
#ifndef DSV3_MP_CHECKPOINT_H
#define DSV3_MP_CHECKPOINT_H

#include <stddef.h>

#include "error.h"
#include "mp_shards.h"

/* Writes t[0..n) split `mp` ways into out (created), copying in_dir's config and tokenizer
 * files; stats and *n_small (files copied) say what was written. */
int mp_write_checkpoint(const char *in_dir, const char *out, const mp_tensor *t, size_t n,
			int mp, int n_experts, int threads, mp_stats *stats, size_t *n_small,
			dsv3_error *err);

#endif
