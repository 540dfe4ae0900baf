/* Collectives between the tensor-parallel ranks of one model (DESIGN §5 "Several ranks"): rank r
 * of N holds model{r}-mp{N}.safetensors and the ranks sum their partial results with these.
 * Behind the interface: MPI for CPU ranks (ref-engine/mpi/, started by mpirun), NCCL for GPU
 * ranks; one rank needs neither and runs with comm NULL.
 *
 * Every call is collective: all ranks make it in the same order. A failure is not returned to
 * be handled by one rank while the others wait: it aborts the whole job (comm_abort), so a run
 * exits non-zero in bounded time instead of hanging. */
#ifndef DSV3_COMM_H
#define DSV3_COMM_H
#include <stddef.h>

/* C11's _Noreturn, spelled as C++ spells it when the CUDA sources include this header. */
#if defined(__cplusplus) && !defined(_Noreturn)
#define _Noreturn [[noreturn]]
#endif

#ifdef __cplusplus
extern "C" {
#endif
#include "error.h"

typedef struct comm comm;

struct comm_ops {
	void (*allreduce_sum)(comm *c, float *buf, size_t n);
	void (*allgather)(comm *c, const float *send, size_t n, float *recv);
	void (*broadcast)(comm *c, void *buf, size_t bytes, int root);
	void (*barrier)(comm *c);
	void (*abort)(comm *c, int code);
	void (*close)(comm *c);
};

struct comm {
	const struct comm_ops *ops;
	int rank, size;
	const char *kind; /* "mpi", "nccl" */
	void *impl;
	double seconds;   /* wall time inside the collectives so far (waiting for others too) */
	long calls;
};

/* NULL (a single rank) answers rank 0 of 1 and every collective is the identity. */
int comm_rank(const comm *c);
int comm_size(const comm *c);
/* buf[0:n] = the sum over ranks of every rank's buf[0:n]. */
void comm_allreduce_sum(comm *c, float *buf, size_t n);
/* recv[r * n : (r + 1) * n] = rank r's send[0:n], on every rank (recv may not overlap send). */
void comm_allgather(comm *c, const float *send, size_t n, float *recv);
/* buf[0:bytes] = rank root's, on every rank. */
void comm_broadcast(comm *c, void *buf, size_t bytes, int root);
void comm_barrier(comm *c);
/* Ends every rank of the job with exit status `code` (a single rank: exit(code)). */
_Noreturn void comm_abort(comm *c, int code);
/* Reports err (rank-prefixed when several) on stderr and ends the whole job with its code. */
_Noreturn void comm_fail(comm *c, const char *prog, const dsv3_error *err);
void comm_close(comm *c);
/* Wall seconds this rank spent in collectives and how many it made (0 for NULL). */
double comm_seconds(const comm *c);
long comm_calls(const comm *c);

/* Whether this process was started by mpirun (OpenMPI's or a PMI launcher's environment). */
int comm_launched_by_mpirun(void);
/* Under mpirun: MPI_Init and a comm over all its ranks in *c.
 * Without mpirun: *c NULL. DSV3_EUSAGE when started by mpirun but built without MPI. A job of
 * one rank gets a comm of size 1 (its collectives are the identity). */
int comm_open_mpi(comm **c, dsv3_error *err);
/* This rank's index among the ranks of its host (to pick a GPU), from the launcher; 0 if none. */
int comm_local_rank(void);

#ifdef __cplusplus
}
#endif
#endif
