/* A fixed pool of worker threads running parallel-for loops. */
#ifndef DSV3_THREADPOOL_H
#define DSV3_THREADPOOL_H
#include <stddef.h>

typedef struct thread_pool thread_pool;

/* n_threads <= 0 means all online cores. NULL on failure. */
thread_pool *thread_pool_create(int n_threads);
int thread_pool_size(const thread_pool *p);
/* Calls fn(arg, i) for i in [0, n) across the workers (the caller works too) and returns when
 * all are done. Indices are handed out dynamically, one at a time. */
void thread_pool_for(thread_pool *p, size_t n, void (*fn)(void *arg, size_t i), void *arg);
void thread_pool_destroy(thread_pool *p);

#endif
