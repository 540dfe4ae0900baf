/* The comm interface over MPI (CPU ranks started by mpirun). MPI_COMM_WORLD keeps MPI's default
 * MPI_ERRORS_ARE_FATAL, set again here: an MPI failure on any rank ends the whole job. */
#include "comm.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

/* Counts go to MPI as int: a larger buffer is sent in pieces. */
#define MAX_COUNT ((size_t)1 << 30)

static void mpi_allreduce_sum(comm *c, float *buf, size_t n)
{
	(void)c;
	for (size_t at = 0; at < n; at += MAX_COUNT) {
		size_t k = n - at < MAX_COUNT ? n - at : MAX_COUNT;
		MPI_Allreduce(MPI_IN_PLACE, buf + at, (int)k, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
	}
}

static void mpi_allgather(comm *c, const float *send, size_t n, float *recv)
{
	if (n > (size_t)INT_MAX) {
		fprintf(stderr, "dsv3: all-gather of %zu floats per rank is over MPI's int count\n", n);
		MPI_Abort(MPI_COMM_WORLD, DSV3_EIO);
	}
	(void)c;
	MPI_Allgather(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, MPI_COMM_WORLD);
}

static void mpi_broadcast(comm *c, void *buf, size_t bytes, int root)
{
	(void)c;
	for (size_t at = 0; at < bytes; at += MAX_COUNT) {
		size_t k = bytes - at < MAX_COUNT ? bytes - at : MAX_COUNT;
		MPI_Bcast((char *)buf + at, (int)k, MPI_BYTE, root, MPI_COMM_WORLD);
	}
}

static void mpi_barrier(comm *c)
{
	(void)c;
	MPI_Barrier(MPI_COMM_WORLD);
}

static void mpi_abort(comm *c, int code)
{
	(void)c;
	MPI_Abort(MPI_COMM_WORLD, code);
	exit(code);
}

static void mpi_close(comm *c)
{
	MPI_Finalize();
	free(c);
}

static const struct comm_ops mpi_ops = {
	mpi_allreduce_sum, mpi_allgather, mpi_broadcast, mpi_barrier, mpi_abort, mpi_close,
};

int comm_open_mpi(comm **out, dsv3_error *err)
{
	*out = NULL;
	if (!comm_launched_by_mpirun())
		return 0;
	int provided, rank, size;
	if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
		return dsv3_fail(err, DSV3_EIO, "MPI_Init failed");
	MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	comm *c = calloc(1, sizeof *c);
	if (!c) {
		MPI_Abort(MPI_COMM_WORLD, DSV3_EIO);
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	}
	*c = (comm){ .ops = &mpi_ops, .rank = rank, .size = size, .kind = "mpi" };
	*out = c;
	return 0;
}
