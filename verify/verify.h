/* dsv3-verify: shared pieces of its subcommands (checksums, ckpt; logits comes later). */
#ifndef DSV3_VERIFY_H
#define DSV3_VERIFY_H
#include <stddef.h>
#include <stdio.h>
#include "error.h"
#include "problems.h"
#include "safetensors.h"

#define VERIFY_PROG "dsv3-verify"

/* One tensor of a directory, found by name. */
typedef struct {
	const char *name;
	size_t file; /* index into ckpt_dir.files */
	const st_tensor *tensor;
} dir_tensor;

/* A checkpoint directory's safetensors files, either the Hugging Face layout or the converted
 * one (every file named model{r}-mp{N}.safetensors; then files[r] is rank r). */
typedef struct {
	char *dir;
	int converted;
	int mp;             /* N of a converted directory */
	size_t n_files;
	char **file_names;  /* NULL for a rank whose file is missing */
	st_file *files;
	int *opened;        /* files[i] is valid */
	dir_tensor *tensors; /* sorted by name, then file */
	size_t n_tensors;
} ckpt_dir;

/* Opens every *.safetensors of dir. Missing ranks and files that fail to open are problems;
 * the rest stays usable. Returns non-zero only when nothing can be checked at all. */
int ckpt_dir_open(ckpt_dir *d, const char *dir, problem_list *problems, dsv3_error *err);
void ckpt_dir_close(ckpt_dir *d);
/* First of the tensors named `name` (sorted by file) and how many there are. */
const dir_tensor *ckpt_dir_find(const ckpt_dir *d, const char *name, size_t *count);
/* Drops mapped pages of [p, p+len) from our resident set once read (the page cache keeps them),
 * so hashing a huge tensor never holds it whole in RSS. */
void drop_mapped_pages(const void *p, size_t len);
/* "DIR/FILE" for messages. */
void ckpt_dir_file_path(const ckpt_dir *d, size_t file, char *buf, size_t len);
/* "[a, b]" */
void shape_text(int ndim, const int64_t *shape, char *buf, size_t len);

/* Subcommands: argv[0] is the subcommand's name. Return the exit code. */
int verify_checksums(int argc, char **argv);
int verify_ckpt(int argc, char **argv);
int verify_logits(int argc, char **argv);

#endif
