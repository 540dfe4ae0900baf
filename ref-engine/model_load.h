/* Private to the engine: loading Weights from a checkpoint directory (load.c). */
#ifndef DSV3_MODEL_LOAD_H
#define DSV3_MODEL_LOAD_H
#include "model.h"

int weights_load(Weights *w, const dsv3_config *c, const char *dir, dsv3_error *err);
void weights_free(Weights *w, const dsv3_config *c);

#endif
