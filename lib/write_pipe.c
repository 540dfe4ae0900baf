/* Writer + tensor-hash threads of dsv3-fp8-to-bf16 (see write_pipe.h). Both consumers walk
 * the same ring of pieces in order; the one that finishes a piece last retires it (frees its
 * buffer, drops the input pages), so the producer never overwrites bytes still being read. */
#include "write_pipe.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void release_input_range(const void *p, size_t len)
{
	if (!p || !len)
		return;
	/* Whole pages around the range: dropping a neighbour's page from a shared file mapping
	 * only costs it a minor fault. */
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	uintptr_t a = (uintptr_t)p & ~(page - 1);
	uintptr_t b = ((uintptr_t)p + len + page - 1) & ~(page - 1);
	madvise((void *)a, b - a, MADV_DONTNEED);
}

void prefault_input_range(const void *p, size_t len)
{
#ifdef MADV_POPULATE_READ
	if (!p || !len)
		return;
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	uintptr_t a = (uintptr_t)p & ~(page - 1);
	uintptr_t b = ((uintptr_t)p + len + page - 1) & ~(page - 1);
	madvise((void *)a, b - a, MADV_POPULATE_READ); /* a hint: failure only costs speed */
#else
	(void)p;
	(void)len;
#endif
}

void write_pipe_init(write_pipe *p)
{
	memset(p, 0, sizeof *p);
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
}

void write_pipe_free(write_pipe *p)
{
	for (int b = 0; b < PIPE_BUFFERS; b++)
		free(p->buffers[b]);
	sha256_free(p->tensor_ctx);
	pthread_cond_destroy(&p->cond);
	pthread_mutex_destroy(&p->lock);
}

/* Runs one consumer's job on a piece. Only the writer can fail; after a failure it skips the
 * rest so the producer is never left waiting. */
static void consume(write_pipe *p, int who, const pipe_piece *piece)
{
	if (who == 0) {
		if (p->rc || !piece->len)
			return;
		dsv3_error e = {0};
		int rc = st_writer_write(p->writer, piece->data, piece->len, &e);
		if (rc) {
			pthread_mutex_lock(&p->lock);
			p->err = e;
			p->rc = rc;
			pthread_mutex_unlock(&p->lock);
		}
		return;
	}
	sha256_update(p->tensor_ctx, piece->data, piece->len);
	if (piece->tensor >= 0)
		sha256_final(p->tensor_ctx, p->tensor_sha[piece->tensor]);
}

static size_t min_done(const write_pipe *p)
{
	size_t m = p->done[0];
	for (int c = 1; c < PIPE_CONSUMERS; c++)
		if (p->done[c] < m)
			m = p->done[c];
	return m;
}

/* A retired piece of the input mapping: st_release, which drops whole folios within the
 * file's mapping (pieces without a file: their pages). */
static void release_piece(const pipe_piece *piece)
{
	if (!piece->file) {
		release_input_range(piece->data, piece->len);
		return;
	}
	st_tensor part = { .data = piece->data, .nbytes = piece->len };
	st_release(piece->file, &part);
}

typedef struct {
	write_pipe *pipe;
	int who;
} consumer_arg;

static void *consumer_main(void *vp)
{
	consumer_arg *a = vp;
	write_pipe *p = a->pipe;
	int who = a->who;
	free(a);
	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (p->done[who] == p->head && !p->closed)
			pthread_cond_wait(&p->cond, &p->lock);
		if (p->done[who] == p->head)
			break;
		pipe_piece piece = p->slots[p->done[who] % PIPE_SLOTS];
		pthread_mutex_unlock(&p->lock);
		consume(p, who, &piece);
		pthread_mutex_lock(&p->lock);
		p->done[who]++;
		if (min_done(p) == p->done[who]) {
			/* Last consumer of this piece: retire it. */
			if (piece.buffer >= 0)
				p->buffer_busy[piece.buffer] = 0;
			else
				release_piece(&piece);
		}
		pthread_cond_broadcast(&p->cond);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int write_pipe_start(write_pipe *p, st_writer *w, uint8_t (*tensor_sha)[32], dsv3_error *err)
{
	if (!p->tensor_ctx && !(p->tensor_ctx = sha256_new()))
		return dsv3_fail(err, DSV3_EIO, "out of memory (sha256)");
	p->writer = w;
	p->tensor_sha = tensor_sha;
	p->head = 0;
	memset(p->done, 0, sizeof p->done);
	p->closed = 0;
	p->rc = 0;
	p->started = 0;
	for (int c = 0; c < PIPE_CONSUMERS; c++) {
		consumer_arg *a = malloc(sizeof *a);
		if (!a) {
			write_pipe_stop(p, NULL);
			return dsv3_fail(err, DSV3_EIO, "out of memory (writer thread)");
		}
		a->pipe = p;
		a->who = c;
		if (pthread_create(&p->threads[c], NULL, consumer_main, a) != 0) {
			free(a);
			write_pipe_stop(p, NULL);
			return dsv3_fail(err, DSV3_EIO, "cannot start writer thread");
		}
		p->started++;
	}
	return 0;
}

uint8_t *write_pipe_buffer(write_pipe *p, int b, size_t size)
{
	pthread_mutex_lock(&p->lock);
	while (p->buffer_busy[b])
		pthread_cond_wait(&p->cond, &p->lock);
	pthread_mutex_unlock(&p->lock);
	if (p->buffer_size[b] < size) {
		free(p->buffers[b]);
		p->buffers[b] = malloc(size);
		p->buffer_size[b] = p->buffers[b] ? size : 0;
	}
	return p->buffers[b];
}

void write_pipe_push(write_pipe *p, const pipe_piece *piece)
{
	pthread_mutex_lock(&p->lock);
	while (p->head - min_done(p) >= PIPE_SLOTS)
		pthread_cond_wait(&p->cond, &p->lock);
	p->slots[p->head % PIPE_SLOTS] = *piece;
	if (piece->buffer >= 0)
		p->buffer_busy[piece->buffer] = 1;
	p->head++;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
}

int write_pipe_stop(write_pipe *p, dsv3_error *err)
{
	pthread_mutex_lock(&p->lock);
	p->closed = 1;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
	for (int c = 0; c < p->started; c++)
		pthread_join(p->threads[c], NULL);
	p->started = 0;
	if (p->rc && err)
		*err = p->err;
	return p->rc;
}

int write_pipe_file(write_pipe *p, const char *path, const st_spec *specs, size_t n,
		    write_pipe_producer produce, void *ctx, uint8_t file_sha[32],
		    uint8_t (*tensor_sha)[32], dsv3_error *err)
{
	st_writer *w = NULL;
	int rc = st_writer_open(&w, path, specs, n, NULL, err);
	if (!rc)
		rc = write_pipe_start(p, w, tensor_sha, err);
	if (!rc) {
		rc = produce(ctx, w, err);
		dsv3_error werr = { 0 };
		int wrc = write_pipe_stop(p, &werr);
		if (!rc && wrc) {
			*err = werr;
			rc = wrc;
		}
	}
	if (!rc)
		return st_writer_finish(w, file_sha, err);
	st_writer_abort(w);
	return rc;
}
