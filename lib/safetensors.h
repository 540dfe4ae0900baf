/* The safetensors format (DESIGN §3.1): a validating mmap reader and a streaming writer whose
 * bytes equal the reference Python serializer's (`safetensors.torch.save_file`). */
#ifndef DSV3_SAFETENSORS_H
#define DSV3_SAFETENSORS_H
#include <stddef.h>
#include <stdint.h>
#include "dtype.h"
#include "error.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u * 1000u * 1000u) /* 100 MB, as the reference */

typedef struct {
	char *name;
	st_dtype dtype;
	int ndim;
	int64_t shape[ST_MAX_DIMS];
	uint64_t nbytes;     /* end - begin */
	uint64_t begin;      /* offset in the data area */
	const uint8_t *data; /* points into the mapping (NULL when parsed from a buffer only) */
} st_tensor;

typedef struct {
	char *path;
	uint8_t *map; /* whole file, PROT_READ, MAP_SHARED */
	size_t size;
	uint64_t header_len;   /* N */
	st_tensor *tensors;    /* in header order */
	size_t n_tensors;
	char **metadata;       /* key, value, key, value, ... (n_metadata pairs), or NULL */
	size_t n_metadata;
} st_file;

/* Opens and validates a file; every rejection of DESIGN §3.1 is a DSV3_EDATA naming the file
 * (and the tensor when one is at fault). */
int st_open(st_file *f, const char *path, dsv3_error *err);
/* Validates `size` bytes of a whole file held in memory (for fuzzing and tests); f->tensors[].data
 * point into `bytes`. `label` names the input in messages. st_close frees it (not `bytes`). */
int st_parse(st_file *f, const uint8_t *bytes, size_t size, const char *label, dsv3_error *err);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);
uint64_t st_numel(const st_tensor *t);
/* A fault on a file mapping maps the whole page-cache folio around it, up to ST_FOLIO bytes (ext4
 * and xfs make 2 MiB ones; large files are mapped at ST_FOLIO-aligned addresses). */
#define ST_FOLIO ((size_t)2 << 20)
/* Drops the tensor's pages from this process's resident set (madvise DONTNEED; the page cache
 * keeps them), in whole ST_FOLIO blocks of the mapping. Streaming tools call it after each tensor
 * so RSS stays bounded on huge inputs. */
void st_release(const st_file *f, const st_tensor *t);

/* What a writer needs to know of a tensor before any data arrives. */
typedef struct {
	const char *name; /* not copied: must outlive the writer */
	st_dtype dtype;
	int ndim;
	int64_t shape[ST_MAX_DIMS];
} st_spec;

typedef struct st_writer st_writer;

/* A writer holds two buffers of ST_WRITE_BUF bytes, resident as far as writes have filled them:
 * a write that fits is copied into the current one; otherwise that one is flushed and the other
 * taken, and a write of half a buffer or more goes to the file in place. */
#define ST_WRITE_BUF ((size_t)8 << 20)

/* Creates `path` (O_TRUNC) and writes the header. Tensors are then appended in layout order:
 * by dtype rank descending, then name in byte order (st_writer_order gives it). `metadata` is
 * NULL (no "__metadata__", as convert.py/fp8_cast_bf16.py) or key,value,...,NULL. */
int st_writer_open(st_writer **w, const char *path, const st_spec *specs, size_t n,
		   const char *const *metadata, dsv3_error *err);
/* Index into `specs` of the tensor at layout position `pos`. */
size_t st_writer_order(const st_writer *w, size_t pos);
/* Appends bytes of the data area in layout order (any chunking); the file SHA-256 is taken as
 * the bytes pass. Writing more than the tensors' total is an error. */
int st_writer_write(st_writer *w, const void *buf, size_t len, dsv3_error *err);
/* Checks every byte arrived, flushes, fsyncs, closes; sha256 (may be NULL) gets the whole file's. */
int st_writer_finish(st_writer *w, uint8_t sha256[32], dsv3_error *err);
/* Closes and unlinks the file; safe on NULL. */
void st_writer_abort(st_writer *w);

/* Header bytes (JSON padded with spaces to a multiple of 8, without the 8-byte length) the
 * writer would produce; caller frees. For tests and size planning. */
int st_header_json(const st_spec *specs, size_t n, const char *const *metadata, char **json,
		   size_t *len, dsv3_error *err);

#endif
