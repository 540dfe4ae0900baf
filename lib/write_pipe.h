/* The output side of dsv3-fp8-to-bf16 and dsv3-bf16-to-fp8: a writer thread (st_writer_write,
 * which also hashes the file) and a tensor-hash thread consume the same queue of byte pieces in
 * order, while the producer converts the next chunk. Pieces either point into the input mapping (copied
 * tensors) or into one of the producer's buffers, which become reusable once both consumers
 * are done with them. */
#ifndef DSV3_WRITE_PIPE_H
#define DSV3_WRITE_PIPE_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include "error.h"
#include "safetensors.h"
#include "sha256.h"

#define PIPE_SLOTS 8 /* bounds how far the hasher and the writer drift apart */
#define PIPE_BUFFERS 3
#define PIPE_CONSUMERS 2 /* writer, tensor hasher */

typedef struct {
	const uint8_t *data;
	size_t len;
	int buffer;        /* producer buffer holding data, or -1 (input mapping) */
	long tensor;       /* >= 0: last piece of output tensor #tensor (finish its hash) */
	const st_file *file; /* the input file whose mapping data points into (buffer < 0) */
} pipe_piece;

typedef struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pipe_piece slots[PIPE_SLOTS];
	size_t head;                     /* pieces pushed */
	size_t done[PIPE_CONSUMERS];     /* pieces each consumer finished */
	int closed;
	int buffer_busy[PIPE_BUFFERS];
	uint8_t *buffers[PIPE_BUFFERS];
	size_t buffer_size[PIPE_BUFFERS];
	st_writer *writer;
	sha256_ctx *tensor_ctx;
	uint8_t (*tensor_sha)[32];       /* one per output tensor of the file */
	int rc;                          /* first writer failure */
	dsv3_error err;
	pthread_t threads[PIPE_CONSUMERS];
	int started;
} write_pipe;

/* Drops the pages of [p, p+len) of an input mapping from our resident set (the page cache keeps
 * them): st_release per piece rather than per tensor, so a huge tensor never sits whole in RSS. */
void release_input_range(const void *p, size_t len);
/* Faults the pages of [p, p+len) of an input mapping in (MADV_POPULATE_READ, where the kernel
 * has it), so the consumers find them mapped. */
void prefault_input_range(const void *p, size_t len);

/* Buffers survive across files; call once, and write_pipe_free at the end. */
void write_pipe_init(write_pipe *p);
void write_pipe_free(write_pipe *p);
/* Starts the consumers for one output file; tensor_sha receives each tensor's hash. */
int write_pipe_start(write_pipe *p, st_writer *w, uint8_t (*tensor_sha)[32], dsv3_error *err);
/* Waits until buffer b is free and at least `size` bytes large; returns it (NULL: no memory). */
uint8_t *write_pipe_buffer(write_pipe *p, int b, size_t size);
void write_pipe_push(write_pipe *p, const pipe_piece *piece);
/* Drains and joins the consumers; returns the writer's first error (copied into err). */
int write_pipe_stop(write_pipe *p, dsv3_error *err);

/* Produces the pieces of one file: pushes every tensor of w in w's layout order
 * (st_writer_order), each tensor's last piece marked. */
typedef int (*write_pipe_producer)(void *ctx, st_writer *w, dsv3_error *err);

/* Writes one safetensors file at `path` holding specs[0..n) (laid out as st_writer lays it
 * out): the consumers run while `produce` pushes the bytes. On success file_sha is the file's
 * SHA-256 and tensor_sha[i] that of specs[i]'s bytes. On failure the file may be left partial
 * (it is a temporary of an out_dir). */
int write_pipe_file(write_pipe *p, const char *path, const st_spec *specs, size_t n,
		    write_pipe_producer produce, void *ctx, uint8_t file_sha[32],
		    uint8_t (*tensor_sha)[32], dsv3_error *err);

#endif
