/* --resume (issue 7 §3): a run keeps each large output file it finishes under a hidden name of
 * the output directory (out_dir_finish) and appends its SHA-256 (and its tensors' hashes) to a
 * journal there, so a killed or failed run can be taken up again. The resumed run hashes every
 * finished file against the journal, keeps those that match and writes only the rest; nothing
 * reaches a final name before the whole run succeeds (DESIGN §8), and the result is the same
 * bytes as an uninterrupted run.
 *
 * The journal belongs to one run, identified by a key: the SHA-256 of the tool, its options and
 * each input file's name, size and modification time. A resumed run with another key refuses. */
#ifndef DSV3_RESUME_H
#define DSV3_RESUME_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include "error.h"
#include "manifest.h"
#include "out_dir.h"

#define RESUME_JOURNAL ".dsv3-resume"
#define RESUME_DONE_PREFIX ".dsv3-done."

/* The key of a run: SHA-256 of `tool`, the program's version, the options that shape the output
 * (opts[0..n), as text: "model-parallel=16") and every regular file directly in in_dir (name,
 * size, modification time, in name order). */
int resume_key(const char *tool, const char *const *opts, size_t n, const char *in_dir,
	       uint8_t key[32], dsv3_error *err);

/* ---- the journal ---- */

typedef struct {
	char *name;
	char *path; /* where it lies: its hidden finished name (or its final name, after a commit
		     * that was cut short) */
	uint64_t size;
	uint8_t sha256[32];
	manifest_tensor *tensors; /* as recorded by resume_finish (may be none) */
	size_t n_tensors;
	int verified; /* on disk under its hidden name with the recorded size and SHA-256 */
	int taken;
} resume_file;

typedef struct {
	size_t kept;      /* finished files of the interrupted run, verified and kept */
	size_t redone;    /* finished files that did not match their record: removed, redone */
	size_t discarded; /* finished files removed because the run did not resume */
} resume_stats;

typedef struct {
	out_dir *o;
	char *journal_path;
	int fd;
	resume_file *files;
	size_t n_files;
	resume_stats stats;
	size_t n_finished;
	long kill_after; /* DSV3_RESUME_KILL_AFTER, or 0 */
	pthread_mutex_t lock;
} resume_log;

/* One line on what a run did with an interrupted run's files, for the tool to print; "" when
 * there were none. */
void resume_describe(const resume_stats *s, char *buf, size_t len);

/* On an open out_dir: with `resume`, reads the journal of an interrupted run with this key
 * (another key: DSV3_EUSAGE, nothing touched), hashes its finished files on `threads` threads
 * (<= 0: all cores), removes those that do not match and keeps the rest for resume_take; without,
 * removes every finished file and journal left there. Then starts the journal of this run. */
int resume_open(resume_log *r, out_dir *o, const uint8_t key[32], int resume, int threads,
		dsv3_error *err);
/* *f: the verified finished file `name` of the interrupted run, then registered in the out_dir
 * for the commit (out_dir_add_finished); NULL when it must be written. Thread-safe. */
int resume_take(resume_log *r, const char *name, const resume_file **f, dsv3_error *err);
/* `name` (registered with out_dir_add and now complete, SHA-256 `sha`, tensors t[0..n)) moves
 * to its hidden finished name and goes into the journal. Thread-safe with resume_take; not with
 * out_dir_add (callers serialise those).
 * For tests, DSV3_RESUME_KILL_AFTER=K in the environment makes the process SIGKILL itself once
 * K files are in the journal: a run killed at a known point. */
int resume_finish(resume_log *r, const char *name, const uint8_t sha[32], const manifest_tensor *t,
		  size_t n, dsv3_error *err);
/* After out_dir_commit: the journal is removed (the run is complete). */
int resume_complete(resume_log *r, dsv3_error *err);
/* Frees; the journal and finished files stay for a later --resume unless completed. */
void resume_close(resume_log *r);

#endif
