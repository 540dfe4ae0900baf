/* The configs dsv3-synth knows by name, as the HF config.json dicts it writes. */
#ifndef DSV3_SYNTH_PRESETS_H
#define DSV3_SYNTH_PRESETS_H
#include <jansson.h>

#include "error.h"

/* One line per preset for --help. */
extern const char *const synth_preset_help[];

/* The HF config dict of preset `name` ("tiny", "tiny-v2", "v3-width:L"); DSV3_EUSAGE if unknown.
 * *is_tiny is set for the small presets (one file by default). */
int synth_preset(const char *name, json_t **config, int *is_tiny, dsv3_error *err);

/* Applies --dtype ("fp8", "bf16" or NULL) and --mtp to an HF config dict. */
int synth_config_override(json_t *config, const char *dtype, int mtp, dsv3_error *err);

#endif
