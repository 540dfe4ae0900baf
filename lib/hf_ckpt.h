/* A checkpoint directory: its safetensors files mmapped and every tensor found by name.
 * Works for the HF layout (model.safetensors.index.json) and, with no index, for any
 * directory of *.safetensors files (e.g. converted model{r}-mp{N} shards). */
#ifndef DSV3_HF_CKPT_H
#define DSV3_HF_CKPT_H
#include <stddef.h>
#include "error.h"
#include "safetensors.h"

typedef struct {
	char *dir;
	st_file *files;  /* sorted by file name (byte order) */
	char **file_names; /* base names, same order */
	size_t n_files;
	/* The index's weight_map in its own order (NULL/0 when the directory has no index). */
	char **index_tensors;
	char **index_files;
	size_t n_index;
	int has_index;
	struct hf_ckpt_entry *lookup; /* private: every tensor sorted by name, for hf_ckpt_find */
	size_t n_lookup;
} hf_ckpt;

/* Opens every *.safetensors in dir. With an index: every file it names must exist (DSV3_EDATA
 * naming the file and one tensor mapped to it), and every tensor it maps must be in that file. */
int hf_ckpt_open(hf_ckpt *c, const char *dir, dsv3_error *err);
void hf_ckpt_close(hf_ckpt *c);
/* Finds a tensor anywhere in the checkpoint; *file_index (may be NULL) gets its file. */
const st_tensor *hf_ckpt_find(const hf_ckpt *c, const char *name, size_t *file_index);
/* Reads the weight_map of an index file in order; for tools that only need the map. */
int index_load(const char *path, char ***tensors, char ***files, size_t *n, dsv3_error *err);
void index_free(char **tensors, char **files, size_t n);
/* Lists base names in `dir` that match the shell glob `pattern`, sorted (caller frees each and
 * the array). */
int dir_glob(const char *dir, const char *pattern, char ***names, size_t *n, dsv3_error *err);

#endif
