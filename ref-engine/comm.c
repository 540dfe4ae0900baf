/* The comm interface (comm.h): a NULL comm is the single rank; otherwise the backend's ops. */
#include "comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Brackets one collective with the clock. */
#define TIMED(c, call)                          \
	do {                                    \
		double t0_ = now();             \
		call;                           \
		(c)->seconds += now() - t0_;    \
		(c)->calls++;                   \
	} while (0)

int comm_rank(const comm *c)
{
	return c ? c->rank : 0;
}

int comm_size(const comm *c)
{
	return c ? c->size : 1;
}

void comm_allreduce_sum(comm *c, float *buf, size_t n)
{
	if (c && c->size > 1)
		TIMED(c, c->ops->allreduce_sum(c, buf, n));
}

void comm_allgather(comm *c, const float *send, size_t n, float *recv)
{
	if (c && c->size > 1)
		TIMED(c, c->ops->allgather(c, send, n, recv));
	else if (recv != send)
		memmove(recv, send, n * sizeof *recv);
}

void comm_broadcast(comm *c, void *buf, size_t bytes, int root)
{
	if (c && c->size > 1)
		TIMED(c, c->ops->broadcast(c, buf, bytes, root));
}

void comm_barrier(comm *c)
{
	if (c && c->size > 1)
		TIMED(c, c->ops->barrier(c));
}

_Noreturn void comm_abort(comm *c, int code)
{
	fflush(stdout);
	fflush(stderr);
	if (c && c->size > 1)
		c->ops->abort(c, code);
	exit(code); /* a backend's abort does not return; this is the single rank */
}

_Noreturn void comm_fail(comm *c, const char *prog, const dsv3_error *err)
{
	if (comm_size(c) > 1)
		fprintf(stderr, "%s: rank %d of %d: %s\n", prog, comm_rank(c), comm_size(c),
			err->msg);
	else
		fprintf(stderr, "%s: %s\n", prog, err->msg);
	comm_abort(c, err->code ? err->code : DSV3_EIO);
}

void comm_close(comm *c)
{
	if (c)
		c->ops->close(c);
}

int comm_launched_by_mpirun(void)
{
	return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

int comm_local_rank(void)
{
	static const char *vars[] = { "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
				      "SLURM_LOCALID" };
	for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
		const char *v = getenv(vars[i]);
		if (v)
			return atoi(v);
	}
	return 0;
}

double comm_seconds(const comm *c)
{
	return c ? c->seconds : 0.0;
}

long comm_calls(const comm *c)
{
	return c ? c->calls : 0;
}
