/* A fixed pool of pthreads running parallel-for loops. Workers sleep on a condition variable
 * between loops; within a loop every thread (the caller included) takes the next index from
 * an atomic counter, so uneven work balances itself. */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

struct thread_pool {
	int n_threads; /* including the caller */
	pthread_t *workers;
	pthread_mutex_t lock;
	pthread_cond_t wake;  /* a new loop or shutdown */
	pthread_cond_t idle;  /* a worker finished its share */
	unsigned long generation; /* bumped per loop so workers tell new work from old */
	int busy;             /* workers still inside the current loop */
	int shutdown;
	/* The current loop. */
	void (*fn)(void *arg, size_t i);
	void *arg;
	size_t n;
	atomic_size_t next;
};

static void run_indices(thread_pool *p)
{
	for (;;) {
		size_t i = atomic_fetch_add(&p->next, 1);
		if (i >= p->n)
			break;
		p->fn(p->arg, i);
	}
}

static void *worker_main(void *vp)
{
	thread_pool *p = vp;
	unsigned long seen = 0;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->shutdown && p->generation == seen)
			pthread_cond_wait(&p->wake, &p->lock);
		if (p->shutdown)
			break;
		seen = p->generation;
		pthread_mutex_unlock(&p->lock);
		run_indices(p);
		pthread_mutex_lock(&p->lock);
		if (--p->busy == 0)
			pthread_cond_signal(&p->idle);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

thread_pool *thread_pool_create(int n_threads)
{
	if (n_threads <= 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		n_threads = n > 0 ? (int)n : 1;
	}
	thread_pool *p = calloc(1, sizeof *p);
	if (!p)
		return NULL;
	p->n_threads = n_threads;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->wake, NULL);
	pthread_cond_init(&p->idle, NULL);
	atomic_init(&p->next, 0);
	p->workers = calloc((size_t)n_threads, sizeof *p->workers);
	if (!p->workers) {
		thread_pool_destroy(p);
		return NULL;
	}
	for (int i = 0; i < n_threads - 1; i++) {
		if (pthread_create(&p->workers[i], NULL, worker_main, p) != 0) {
			p->n_threads = i + 1; /* destroy joins only the ones started */
			thread_pool_destroy(p);
			return NULL;
		}
	}
	return p;
}

int thread_pool_size(const thread_pool *p)
{
	return p->n_threads;
}

void thread_pool_for(thread_pool *p, size_t n, void (*fn)(void *arg, size_t i), void *arg)
{
	if (n == 0)
		return;
	if (p->n_threads == 1 || n == 1) {
		for (size_t i = 0; i < n; i++)
			fn(arg, i);
		return;
	}
	pthread_mutex_lock(&p->lock);
	p->fn = fn;
	p->arg = arg;
	p->n = n;
	atomic_store(&p->next, 0);
	p->busy = p->n_threads - 1;
	p->generation++;
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->lock);

	run_indices(p);

	pthread_mutex_lock(&p->lock);
	while (p->busy > 0)
		pthread_cond_wait(&p->idle, &p->lock);
	pthread_mutex_unlock(&p->lock);
}

void thread_pool_destroy(thread_pool *p)
{
	if (!p)
		return;
	if (p->workers) {
		pthread_mutex_lock(&p->lock);
		p->shutdown = 1;
		pthread_cond_broadcast(&p->wake);
		pthread_mutex_unlock(&p->lock);
		for (int i = 0; i < p->n_threads - 1; i++)
			pthread_join(p->workers[i], NULL);
		free(p->workers);
	}
	pthread_cond_destroy(&p->idle);
	pthread_cond_destroy(&p->wake);
	pthread_mutex_destroy(&p->lock);
	free(p);
}
