/* Private to the engine: loading Weights from a checkpoint directory (load.c). */
#ifndef DSV3_MODEL_LOAD_H
#define DSV3_MODEL_LOAD_H
#include "model.h"

int weights_load(Weights *w, const dsv3_config *c, const char *dir, dsv3_error *err);
/* Rank `rank` of a tensor-parallel job over converted shards: only model{rank}-mp{N} is mapped;
 * split tensors are this rank's slices (views of their local shape), routed experts of other
 * ranks are empty views (rows 0). rank -1: weights_load. */
int weights_load_rank(Weights *w, const dsv3_config *c, const char *dir, int rank,
		      dsv3_error *err);
/* N of the converted shards the weights came from (0: an HF directory). */
int weights_mp(const Weights *w);
void weights_free(Weights *w, const dsv3_config *c);

#endif
