/* Writing model-parallel checkpoints, model{r}-mp{N}.safetensors (DESIGN §3.3), from logical
 * tensors whose bytes stay in mmapped input files. Shared by dsv3-convert (each logical tensor
 * is one HF tensor) and dsv3-shard (each is put back together from the ranks of another split). */
#ifndef DSV3_MP_SHARDS_H
#define DSV3_MP_SHARDS_H
#include <stddef.h>
#include <stdint.h>
#include "error.h"
#include "manifest.h"
#include "out_dir.h"
#include "problems.h"
#include "resume.h"
#include "safetensors.h"

/* Problems found while checking inputs are all listed before a tool refuses, at most this many
 * lines of them in the message (problem_list_to_error). */
#define MP_MAX_PROBLEMS 20

/* An F8_E4M3 weight read as BF16 (dsv3-convert --dtype bf16): element (i, j) is
 * bf16(float(fp8[i][j]) * scale[i / block_rows][j / block_cols]), as dsv3-fp8-to-bf16 computes it. */
typedef struct {
	const st_file *scale_file;
	const st_tensor *scale; /* F32 [ceil(rows / block_rows), ceil(cols / block_cols)] */
	int block_rows, block_cols;
} mp_dequant;

/* One input tensor holding some or all of a logical tensor's bytes. */
typedef struct {
	const st_file *file;
	const st_tensor *t;
} mp_piece;

typedef struct {
	char name[160];   /* converted name */
	st_dtype dtype;
	int ndim;
	int64_t shape[ST_MAX_DIMS]; /* whole, unsplit */
	int split_dim;    /* 0, 1 or SPLIT_NONE */
	int expert;       /* routed expert index (whole on one rank), or -1 */
	/* The bytes: n_pieces equal parts along split_dim, in order (1: the whole tensor; always 1
	 * for routed experts and SPLIT_NONE tensors). */
	mp_piece *pieces;
	int n_pieces;
	/* Copies that must hold exactly the bytes of pieces[0] (replicated tensors of every rank). */
	mp_piece *copies;
	int n_copies;
	/* Logical SHA-256 the input's manifest promises, checked as the bytes pass; NULL if none. */
	const uint8_t *expect_sha256;
	/* Non-NULL: the logical tensor is BF16 [rows, cols] dequantised on the fly from the single
	 * 2-D F8_E4M3 piece pieces[0] (n_pieces 1, no copies). */
	const mp_dequant *dequant;
} mp_tensor;

/* "model{rank}-mp{mp}.safetensors" */
void mp_file_name(char *buf, size_t len, int rank, int mp);
/* Adds to p every reason the tensors cannot be split `mp` ways with `n_experts` routed experts
 * (E % mp, an expert index >= E, a split dimension or scale block count not divisible by mp). */
void mp_check(const mp_tensor *t, size_t n, int mp, int n_experts, problem_list *p);

typedef struct {
	uint64_t bytes_written; /* data of the model files (kept ones of a resumed run included) */
	size_t n_files;
	resume_stats resumed;
} mp_stats;

/* Bytes per write or hash call, at most. */
#define MP_CHUNK ((size_t)2 << 20)

/* Writes model{r}-mp{mp}.safetensors for r < mp into o (each file laid out as save_file lays it
 * out, no metadata) and adds to m each file's SHA-256 and each logical tensor (dtype, whole shape,
 * SHA-256 of its whole row-major bytes). At most `threads` rank files (<= 0: all cores) are
 * written at once, beside as many logical hashing threads; input pages are dropped as the walks
 * leave each ST_FOLIO block, so the resident set stays near the buffers, not the model. With `res`, a rank file a resumed run
 * kept is not written again (the logical hashes still read every input) and each written one
 * is finished into the journal as soon as it is complete. Call mp_check first. */
int mp_write(const mp_tensor *t, size_t n, int mp, int n_experts, int threads, out_dir *o,
	     resume_log *res, manifest *m, mp_stats *stats, dsv3_error *err);

/* Copies what convert.py copies (every regular file whose name contains "token") and config.json
 * (which it does not) from in_dir into o, adding each to m. A missing config.json is skipped. */
int mp_copy_small_files(const char *in_dir, out_dir *o, manifest *m, size_t *n_copied,
			dsv3_error *err);

/* A whole converted checkpoint, as dsv3-convert and dsv3-shard both end. */
typedef struct {
	const char *in_dir, *out;
	int mp, n_experts, threads;
	/* config.json is written from this text (dsv3-convert --dtype bf16 writes the config
	 * dsv3-fp8-to-bf16 would); NULL: copied */
	const char *config_text;
	size_t config_len;
	int resume;          /* --resume: keep the verified rank files of an interrupted run */
	uint8_t run_key[32]; /* resume_key of the tool, its options and in_dir */
} mp_checkpoint;

/* The rank files, the input's small files, SHA256SUMS and tensors.sha256.json, renamed into
 * place only when all succeeded; t[0..n) is split c->mp ways into c->out (created). stats and
 * *n_small (files copied) say what was written. */
int mp_write_checkpoint(const mp_checkpoint *c, const mp_tensor *t, size_t n, mp_stats *stats,
			size_t *n_small, dsv3_error *err);

#endif
