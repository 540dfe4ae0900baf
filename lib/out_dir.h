/* Atomic output (DESIGN §8): every file is written under a temporary name in the destination
 * directory and all are renamed into place only by out_dir_commit, so a failed or killed run
 * leaves no file under a final name. */
#ifndef DSV3_OUT_DIR_H
#define DSV3_OUT_DIR_H
#include <stddef.h>
#include "error.h"

#define OUT_DIR_TMP_PREFIX ".dsv3-tmp."

typedef struct {
	char *dir;
	char **final_paths;
	char **tmp_paths;
	unsigned char *finished; /* tmp_paths[i] is a finished file kept for --resume (lib/resume.h) */
	size_t n, cap;
} out_dir;

/* DSV3_EUSAGE when `dir` is the directory `input` (any spelling: same device and inode), so a
 * tool never writes its output, manifests included, over the checkpoint it reads. */
int out_dir_refuse_input(const char *dir, const char *input, dsv3_error *err);
/* Creates `dir` (and parents) if needed and removes temporaries a killed run left there. */
int out_dir_open(out_dir *o, const char *dir, dsv3_error *err);
/* Registers file `name` (a base name) and returns the temporary path to write it to (owned by o). */
const char *out_dir_add(out_dir *o, const char *name, dsv3_error *err);
/* Writes a small file whole (registers it too). */
int out_dir_write_file(out_dir *o, const char *name, const void *data, size_t len, dsv3_error *err);
/* Copies a file into the directory under `name` (registers it too). */
int out_dir_copy_file(out_dir *o, const char *src_path, const char *name, dsv3_error *err);
/* Registers `path`, a finished file already in the directory (kept by a resumed run), as the
 * temporary of `name`: renamed into place by out_dir_commit like the others, but left where it
 * is by out_dir_close. Not thread-safe, like out_dir_add: callers serialise. */
int out_dir_add_finished(out_dir *o, const char *name, const char *path, dsv3_error *err);
/* Makes the temporary of `name` durable (fsync) and renames it to `path` in the directory,
 * which then stands for it as in out_dir_add_finished: a killed run leaves it for --resume. */
int out_dir_finish(out_dir *o, const char *name, const char *path, dsv3_error *err);
/* fsyncs the temporaries, renames all into place, fsyncs the directory. */
int out_dir_commit(out_dir *o, dsv3_error *err);
/* Unlinks every temporary not yet committed, except finished ones, and frees; safe after commit
 * (then only frees). */
void out_dir_close(out_dir *o);

#endif
