/* GPU ranks over NCCL (DESIGN §5 "Several ranks", issue 8).
 *
 * Two things live here:
 *  - the comm interface (comm.h) over NCCL, for the ranks that one process runs itself, one
 *    thread per GPU (comm_nccl_run): its ops take HOST buffers (the prompt text and the tokens
 *    that rank 0 broadcasts) and stage them through a device buffer;
 *  - the engine's link to the other ranks (tp.cuh): NCCL collectives on device buffers, on the
 *    engine's stream. Under mpirun the link is bootstrapped over the MPI comm (rank 0's
 *    ncclUniqueId broadcast over MPI, the GPU chosen by the rank's local rank).
 * Every NCCL call is checked; a failure names the rank and the operation and ends every rank
 * (ncclCommAbort, then comm_abort), so a job exits non-zero instead of hanging.
 * Under mpirun, ranks that NCCL cannot link (built without NCCL, more ranks on a host than GPUs,
 * or DSV3_TP_STAGED=1) get a staged link instead: each collective copies the device buffer to
 * host memory, sums or gathers it with the MPI comm and copies it back. It is slow (a stream
 * sync per collective, no decode graphs), and it is what lets several GPU ranks run, and be
 * checked against the goldens, on one GPU. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tp.cuh" /* comm.h, made C++-clean */
#include "parallel.h"
extern "C" {
#include "cuda_model.h"
}

#ifndef DSV3_NCCL
#define DSV3_NCCL 0
#endif
#if DSV3_NCCL
#include <nccl.h>
#endif

/* GPUs this process sees; 0 when CUDA cannot say (its error cleared). */
static int visible_gpus(void)
{
	int gpus = 0;
	if (cudaGetDeviceCount(&gpus) != cudaSuccess) {
		cudaGetLastError();
		return 0;
	}
	return gpus;
}

/* ---- which launch: mp-N shards and N GPUs ---- */

extern "C" int cuda_rank_threads(const char *dir, int *n, dsv3_error *err)
{
	(void)err;
	int mp = 0, gpus = visible_gpus();
	dsv3_error ignored = {};
	*n = 1;
	/* none, or mixed N: not a launch of several ranks (the preflight names a mix) */
	if (parallel_shard_count(dir, &mp, &ignored) || mp < 2)
		return 0;
	/* With fewer GPUs than shards the engine merges the shards on one GPU, as before. */
	if (gpus >= mp)
		*n = mp;
	return 0;
}

/* ---- the link (tp.cuh) ---- */

struct tp_link {
#if DSV3_NCCL
	ncclComm_t nc;
#endif
	int rank, size, device;
	int owned;    /* bootstrapped here over an MPI comm: destroyed by tp_detach */
	int threaded; /* the ranks are threads of this process */
	comm *host;   /* the comm whose abort ends the job */
	int staged;   /* collectives through host memory over `host` (MPI), not NCCL */
	float *h;     /* staged: pinned host buffer of h_cap floats */
	size_t h_cap;
};

int tp_capturable(const tp_link *t) { return !t->staged; }
int tp_device(const tp_link *t) { return t->device; }

/* ---- the staged link: device -> host, the MPI collective, host -> device ---- */

[[noreturn]] static void staged_fail(tp_link *t, cudaError_t e, const char *op)
{
	fprintf(stderr, "dsv3: rank %d of %d (GPU %d): CUDA error in %s: %s\n", t->rank, t->size, t->device, op,
		cudaGetErrorString(e));
	comm_abort(t->host, DSV3_EIO);
}

static void staged_ok(tp_link *t, cudaError_t e, const char *op)
{
	if (e != cudaSuccess)
		staged_fail(t, e, op);
}

static float *staged_buffer(tp_link *t, size_t n)
{
	if (n > t->h_cap) {
		if (t->h)
			staged_ok(t, cudaFreeHost(t->h), "cudaFreeHost (staging)");
		staged_ok(t, cudaMallocHost((void **)&t->h, sizeof(float) * n), "cudaMallocHost (staging)");
		t->h_cap = n;
	}
	return t->h;
}

static void staged_allreduce(tp_link *t, float *buf, size_t n, cudaStream_t s)
{
	float *h = staged_buffer(t, n);
	staged_ok(t, cudaMemcpyAsync(h, buf, sizeof(float) * n, cudaMemcpyDeviceToHost, s), "staging copy");
	staged_ok(t, cudaStreamSynchronize(s), "staging sync");
	comm_allreduce_sum(t->host, h, n);
	staged_ok(t, cudaMemcpyAsync(buf, h, sizeof(float) * n, cudaMemcpyHostToDevice, s), "staging copy");
	staged_ok(t, cudaStreamSynchronize(s), "staging sync");
}

static void staged_allgather(tp_link *t, const float *send, float *recv, size_t n, cudaStream_t s)
{
	float *h = staged_buffer(t, n * (size_t)(t->size + 1));
	staged_ok(t, cudaMemcpyAsync(h, send, sizeof(float) * n, cudaMemcpyDeviceToHost, s), "staging copy");
	staged_ok(t, cudaStreamSynchronize(s), "staging sync");
	comm_allgather(t->host, h, n, h + n);
	staged_ok(t, cudaMemcpyAsync(recv, h + n, sizeof(float) * n * (size_t)t->size, cudaMemcpyHostToDevice, s),
		  "staging copy");
	staged_ok(t, cudaStreamSynchronize(s), "staging sync");
}

/* Ranks of an MPI job that share GPUs, or have no NCCL: GPU local_rank % GPUs, staged collectives. */
static int attach_staged(tp_link *t, comm *c, int gpus, dsv3_error *err)
{
	*t = tp_link{};
	t->rank = comm_rank(c), t->size = comm_size(c), t->host = c, t->staged = 1;
	if (gpus < 1)
		return dsv3_fail(err, DSV3_EUSAGE, "rank %d of %d: --device cuda, but no GPU is visible", t->rank,
				 t->size);
	t->device = comm_local_rank() % gpus;
	staged_ok(t, cudaSetDevice(t->device), "cudaSetDevice");
	if (t->rank == 0)
		fprintf(stderr, "dsv3: %d GPU ranks: collectives staged through host memory over MPI (%s); "
			"slow, for checking on fewer GPUs than ranks\n", t->size,
			DSV3_NCCL ? "more ranks than GPUs on a host, or DSV3_TP_STAGED=1" : "built without NCCL");
	return 0;
}

#if DSV3_NCCL

/* Whether the MPI ranks of c take the staged link: decided together (collective), since one
 * rank on NCCL and another staged would wait for each other forever. */
static int wants_staged(comm *c, int gpus)
{
	const char *e = getenv("DSV3_TP_STAGED");
	float want = !DSV3_NCCL || comm_local_rank() >= gpus || (e && *e == '1');
	comm_allreduce_sum(c, &want, 1);
	return want > 0.0f;
}


[[noreturn]] static void fail_exit(const tp_link *t, int code)
{
	fflush(stdout);
	fflush(stderr);
	/* One process holding every rank: ending it ends them all, and exiting without atexit
	 * handlers cannot wait on another rank's thread blocked in a collective. */
	if (t->threaded)
		_exit(code);
	comm_abort(t->host, code);
}

[[noreturn]] void tp_abort(tp_link *t, int code)
{
	if (t->staged)
		comm_abort(t->host, code);
	if (!t->threaded)
		ncclCommAbort(t->nc); /* this rank's kernels stop waiting for peers */
	fail_exit(t, code);
}

static void nccl_check(tp_link *t, ncclResult_t r, const char *op, const char *what)
{
	if (r == ncclSuccess || r == ncclInProgress)
		return;
	fprintf(stderr, "dsv3: rank %d of %d (GPU %d): NCCL error in %s%s%s: %s%s%s\n", t->rank, t->size, t->device,
		op, what ? " of " : "", what ? what : "", ncclGetErrorString(r), ncclGetLastError(t->nc) ? ": " : "",
		ncclGetLastError(t->nc) ? ncclGetLastError(t->nc) : "");
	tp_abort(t, DSV3_EIO);
}

static void cuda_ok(tp_link *t, cudaError_t e, const char *op)
{
	if (e == cudaSuccess)
		return;
	fprintf(stderr, "dsv3: rank %d of %d (GPU %d): CUDA error in %s: %s\n", t->rank, t->size, t->device, op,
		cudaGetErrorString(e));
	tp_abort(t, DSV3_EIO);
}

void tp_allreduce(tp_link *t, float *buf, size_t n, cudaStream_t s, const char *what)
{
	if (t->staged)
		return staged_allreduce(t, buf, n, s);
	nccl_check(t, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, t->nc, s), "ncclAllReduce", what);
}

void tp_allgather(tp_link *t, const float *send, float *recv, size_t n, cudaStream_t s, const char *what)
{
	if (t->staged)
		return staged_allgather(t, send, recv, n, s);
	nccl_check(t, ncclAllGather(send, recv, n, ncclFloat, t->nc, s), "ncclAllGather", what);
}

/* ---- the comm over NCCL (comm.h): host buffers staged through the device ---- */

struct nccl_comm {
	tp_link link;
	cudaStream_t stream;
	void *stage; /* device buffer for the host-buffer collectives */
	size_t stage_bytes;
};

static nccl_comm *impl(comm *c) { return (nccl_comm *)c->impl; }

/* The staging buffer grown to at least `bytes` (collective calls: every rank grows alike). */
static char *stage(nccl_comm *x, size_t bytes)
{
	if (bytes > x->stage_bytes) {
		if (x->stage)
			cuda_ok(&x->link, cudaFree(x->stage), "cudaFree (staging buffer)");
		cuda_ok(&x->link, cudaMalloc(&x->stage, bytes), "cudaMalloc (staging buffer)");
		x->stage_bytes = bytes;
	}
	return (char *)x->stage;
}

static void copy(nccl_comm *x, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
	cuda_ok(&x->link, cudaMemcpyAsync(dst, src, bytes, kind, x->stream), "cudaMemcpyAsync (staging)");
}

static void finish(nccl_comm *x)
{
	cuda_ok(&x->link, cudaStreamSynchronize(x->stream), "cudaStreamSynchronize (host collective)");
}

/* Host collectives go in pieces of at most this many bytes of staging. */
#define STAGE_PIECE ((size_t)64 << 20)

static void nc_allreduce_sum(comm *c, float *buf, size_t n)
{
	nccl_comm *x = impl(c);
	size_t piece = STAGE_PIECE / sizeof(float);
	float *d = (float *)stage(x, sizeof(float) * (n < piece ? n : piece));
	for (size_t at = 0; at < n; at += piece) {
		size_t k = n - at < piece ? n - at : piece;
		copy(x, d, buf + at, sizeof(float) * k, cudaMemcpyHostToDevice);
		nccl_check(&x->link, ncclAllReduce(d, d, k, ncclFloat, ncclSum, x->link.nc, x->stream),
			   "ncclAllReduce", "a host buffer");
		copy(x, buf + at, d, sizeof(float) * k, cudaMemcpyDeviceToHost);
		finish(x);
	}
}

static void nc_allgather(comm *c, const float *send, size_t n, float *recv)
{
	nccl_comm *x = impl(c);
	size_t bytes = sizeof(float) * n;
	char *d = stage(x, bytes * (size_t)(c->size + 1));
	copy(x, d, send, bytes, cudaMemcpyHostToDevice);
	nccl_check(&x->link, ncclAllGather(d, d + bytes, n, ncclFloat, x->link.nc, x->stream), "ncclAllGather",
		   "a host buffer");
	copy(x, recv, d + bytes, bytes * (size_t)c->size, cudaMemcpyDeviceToHost);
	finish(x);
}

static void nc_broadcast(comm *c, void *buf, size_t bytes, int root)
{
	nccl_comm *x = impl(c);
	char *d = stage(x, bytes < STAGE_PIECE ? bytes : STAGE_PIECE), *h = (char *)buf;
	for (size_t at = 0; at < bytes; at += STAGE_PIECE) {
		size_t k = bytes - at < STAGE_PIECE ? bytes - at : STAGE_PIECE;
		if (c->rank == root)
			copy(x, d, h + at, k, cudaMemcpyHostToDevice);
		nccl_check(&x->link, ncclBroadcast(d, d, k, ncclChar, root, x->link.nc, x->stream), "ncclBroadcast",
			   "a host buffer");
		copy(x, h + at, d, k, cudaMemcpyDeviceToHost);
		finish(x);
	}
}

static void nc_barrier(comm *c)
{
	float one = 1.0f;
	nc_allreduce_sum(c, &one, 1);
}

static void nc_abort(comm *c, int code)
{
	fail_exit(&impl(c)->link, code);
}

/* The launcher's comm is closed by the launcher (comm_nccl_run), after the rank's work. */
static void nc_close(comm *c)
{
	(void)c;
}

static const struct comm_ops nccl_ops = {
	nc_allreduce_sum, nc_allgather, nc_broadcast, nc_barrier, nc_abort, nc_close,
};

/* ---- the engine's link ---- */

/* A new communicator over the ranks of c (an MPI job): one GPU per rank of a host. */
static int bootstrap(tp_link *t, comm *c, dsv3_error *err)
{
	int gpus = visible_gpus(), local = comm_local_rank();
	*t = tp_link{};
	t->rank = comm_rank(c), t->size = comm_size(c), t->owned = 1, t->host = c, t->device = local;
	if (local >= gpus)
		return dsv3_fail(err, DSV3_EUSAGE, "rank %d of %d is local rank %d of its host, which has %d GPU(s) "
				 "visible: start at most one rank per GPU", t->rank, t->size, local, gpus);
	cuda_ok(t, cudaSetDevice(local), "cudaSetDevice");
	ncclUniqueId id;
	memset(&id, 0, sizeof id);
	if (t->rank == 0)
		nccl_check(t, ncclGetUniqueId(&id), "ncclGetUniqueId", NULL);
	comm_broadcast(c, &id, sizeof id, 0); /* over MPI: NCCL's bootstrap, no transport of ours */
	nccl_check(t, ncclCommInitRank(&t->nc, t->size, id, t->rank), "ncclCommInitRank", NULL);
	return 0;
}

int tp_attach(tp_link **out, comm *c, dsv3_error *err)
{
	*out = NULL;
	tp_link *t = (tp_link *)calloc(1, sizeof *t);
	if (!t)
		return dsv3_fail(err, DSV3_EIO, "out of host memory");
	int gpus = visible_gpus();
	if (c->kind && !strcmp(c->kind, "nccl")) {
		*t = impl(c)->link;
		t->owned = 0;
		cuda_ok(t, cudaSetDevice(t->device), "cudaSetDevice");
	} else {
		int rc = wants_staged(c, gpus) ? attach_staged(t, c, gpus, err) : bootstrap(t, c, err);
		if (rc) {
			free(t);
			return rc;
		}
	}
	*out = t;
	return 0;
}

void tp_detach(tp_link *t)
{
	if (t && t->h)
		cudaFreeHost(t->h);
	if (t && t->owned && !t->staged)
		ncclCommDestroy(t->nc);
	free(t);
}

/* ---- one process, one thread per GPU ---- */

struct rank_thread {
	pthread_t tid;
	comm c;
	nccl_comm x;
	int (*rank_main)(comm *c, void *arg);
	void *arg;
	int rc;
};

static void *rank_thread_main(void *p)
{
	rank_thread *r = (rank_thread *)p;
	cuda_ok(&r->x.link, cudaSetDevice(r->x.link.device), "cudaSetDevice");
	cuda_ok(&r->x.link, cudaStreamCreateWithFlags(&r->x.stream, cudaStreamNonBlocking), "cudaStreamCreate");
	r->rc = r->rank_main(&r->c, r->arg);
	/* Every rank is done with the communicator once its main returns. */
	if (r->x.stage)
		cudaFree(r->x.stage);
	cudaStreamDestroy(r->x.stream);
	ncclCommDestroy(r->x.link.nc);
	return NULL;
}

extern "C" int comm_nccl_run(int n, int (*rank_main)(comm *c, void *arg), void *arg, int *rank0_rc,
			     dsv3_error *err)
{
	int gpus = visible_gpus();
	if (gpus < n)
		return dsv3_fail(err, DSV3_EUSAGE, "%d GPU ranks need %d GPUs, %d visible", n, n, gpus);
	ncclComm_t *ncs = (ncclComm_t *)calloc((size_t)n, sizeof *ncs);
	int *devs = (int *)calloc((size_t)n, sizeof *devs);
	rank_thread *rt = (rank_thread *)calloc((size_t)n, sizeof *rt);
	if (!ncs || !devs || !rt) {
		free(ncs), free(devs), free(rt);
		return dsv3_fail(err, DSV3_EIO, "out of host memory");
	}
	for (int i = 0; i < n; i++)
		devs[i] = i;
	/* ncclCommInitAll: the n communicators of one process, rank i on GPU i. */
	ncclResult_t r = ncclCommInitAll(ncs, n, devs);
	if (r != ncclSuccess) {
		int rc = dsv3_fail(err, DSV3_EIO, "NCCL error in ncclCommInitAll over %d GPUs: %s", n,
				   ncclGetErrorString(r));
		free(ncs), free(devs), free(rt);
		return rc;
	}
	int started = 0, rc = 0;
	for (int i = 0; i < n; i++) {
		rank_thread *t = &rt[i];
		t->x.link = tp_link{ ncs[i], i, n, i, 0, 1, &t->c, 0, NULL, 0 };
		t->c = comm{ &nccl_ops, i, n, "nccl", &t->x, 0.0, 0 };
		t->rank_main = rank_main, t->arg = arg;
		if (pthread_create(&t->tid, NULL, rank_thread_main, t)) {
			/* the started ranks would wait for this one forever */
			fprintf(stderr, "dsv3: cannot start the thread of GPU rank %d of %d\n", i, n);
			fail_exit(&t->x.link, DSV3_EIO);
		}
		started++;
	}
	for (int i = 0; i < started; i++)
		pthread_join(rt[i].tid, NULL);
	*rank0_rc = rt[0].rc;
	free(ncs), free(devs), free(rt);
	return rc;
}

#else /* !DSV3_NCCL */

/* Without NCCL only the staged link (MPI ranks) exists. */
int tp_attach(tp_link **out, comm *c, dsv3_error *err)
{
	*out = NULL;
	if (c->kind && !strcmp(c->kind, "nccl"))
		return dsv3_fail(err, DSV3_EUSAGE, "several GPU ranks in one process need NCCL, and this "
				 "build has none (nccl.h and libnccl were not found under CUDA_HOME)");
	int gpus = visible_gpus();
	tp_link *t = (tp_link *)calloc(1, sizeof *t);
	if (!t)
		return dsv3_fail(err, DSV3_EIO, "out of host memory");
	int rc = attach_staged(t, c, gpus, err);
	if (rc) {
		free(t);
		return rc;
	}
	*out = t;
	return 0;
}

void tp_detach(tp_link *t)
{
	if (t && t->h)
		cudaFreeHost(t->h);
	free(t);
}

void tp_allreduce(tp_link *t, float *buf, size_t n, cudaStream_t s, const char *)
{
	staged_allreduce(t, buf, n, s);
}

void tp_allgather(tp_link *t, const float *send, float *recv, size_t n, cudaStream_t s, const char *)
{
	staged_allgather(t, send, recv, n, s);
}

[[noreturn]] void tp_abort(tp_link *t, int code) { comm_abort(t->host, code); }

extern "C" int comm_nccl_run(int n, int (*rank_main)(comm *c, void *arg), void *arg, int *rank0_rc,
			     dsv3_error *err)
{
	(void)n, (void)rank_main, (void)arg, (void)rank0_rc;
	return dsv3_fail(err, DSV3_EUSAGE, "several GPU ranks in one process need NCCL, and this build "
			 "has none (nccl.h and libnccl were not found under CUDA_HOME); under mpirun they "
			 "run with collectives staged over MPI");
}

#endif
