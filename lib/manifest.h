/* The manifests of DESIGN §3.4: SHA256SUMS (sha256sum -c format) and tensors.sha256.json
 * (per logical tensor: dtype, shape, SHA-256 of its whole row-major bytes). */
#ifndef DSV3_MANIFEST_H
#define DSV3_MANIFEST_H
#include <stddef.h>
#include <stdint.h>
#include "dtype.h"
#include "error.h"
#include "out_dir.h"

typedef struct {
	char *name;
	uint8_t sha256[32];
} manifest_file;

typedef struct {
	char *name; /* logical name: HF name, or converted name for converted checkpoints */
	st_dtype dtype;
	int ndim;
	int64_t shape[8];
	uint8_t sha256[32];
} manifest_tensor;

typedef struct {
	manifest_file *files;
	size_t n_files, cap_files;
	manifest_tensor *tensors;
	size_t n_tensors, cap_tensors;
} manifest;

void manifest_init(manifest *m);
void manifest_free(manifest *m);
int manifest_add_file(manifest *m, const char *name, const uint8_t sha256[32]);
int manifest_add_tensor(manifest *m, const char *name, st_dtype dtype, int ndim,
			const int64_t *shape, const uint8_t sha256[32]);
/* Writes SHA256SUMS (files sorted by name, "hex  name\n") and tensors.sha256.json (tensors
 * sorted by name) into o. Files written through o itself (small files) must be added by the
 * caller before this. */
int manifest_write(const manifest *m, out_dir *o, dsv3_error *err);
/* Writes a small file (an index, a config) whole into o and adds it to m with its SHA-256. */
int manifest_write_small(manifest *m, out_dir *o, const char *name, const void *data, size_t len,
			 dsv3_error *err);
/* Copies every regular file of in_dir that a checkpoint tool does not write itself (not hidden,
 * not *.safetensors, not the index, config.json or the manifests: tokenizer files,
 * generation_config.json, README, ...) into o in name order, each added to m with its SHA-256;
 * *copied counts them. */
int manifest_copy_side_files(manifest *m, out_dir *o, const char *in_dir, size_t *copied, dsv3_error *err);
/* Reads both back from a directory. */
int manifest_read(manifest *m, const char *dir, dsv3_error *err);

#endif
