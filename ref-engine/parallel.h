/* Before a tensor-parallel job reads any weight (DESIGN §5, issue 8): the checks users of the
 * official demo otherwise meet as hangs. Collective: every rank calls it. */
#ifndef DSV3_PARALLEL_H
#define DSV3_PARALLEL_H
#include "comm.h"

#ifdef __cplusplus
extern "C" { /* comm_nccl.cu reads shard counts with it */
#endif
#include "config.h"
#include "error.h"

/* On each rank: DIR holds model{r}-mp{N}.safetensors of one N only (mixed N are listed), N is
 * the number of ranks, this rank's file is there, the heads, the vocabulary and the routed
 * experts divide among the ranks; then every rank's config.json and tensors.sha256.json equal
 * rank 0's (shards of one checkpoint, also across hosts). A failure is a one-line error naming
 * what differs (the caller ends the job with it). */
int parallel_preflight(comm *c, const char *dir, const dsv3_config *cfg, dsv3_error *err);
/* The N of every model{r}-mp{N}.safetensors in dir: one N, or the problem named (none, mixed). */
int parallel_shard_count(const char *dir, int *mp, dsv3_error *err);

#ifdef __cplusplus
}
#endif
#endif
