/* membw: read bandwidth of this machine's memory, the denominator of the engine's decode floor
 * (DESIGN §7). Each thread sums its slice of a buffer far larger than the caches, the way a
 * matvec streams weights; prints the best of several passes in GB/s (bytes read / seconds).
 * usage: membw [MiB per thread, default 512] [threads, default all cores] */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
	const uint64_t *p;
	size_t n;
	uint64_t sum;
	pthread_barrier_t *start;
} slice;

static void *read_slice(void *arg)
{
	slice *s = arg;
	uint64_t a = 0, b = 0, c = 0, d = 0;
	pthread_barrier_wait(s->start);
	for (size_t i = 0; i + 4 <= s->n; i += 4) {
		a += s->p[i];
		b += s->p[i + 1];
		c += s->p[i + 2];
		d += s->p[i + 3];
	}
	s->sum = a + b + c + d;
	return NULL;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
	int threads = argc > 2 ? atoi(argv[2]) : (int)sysconf(_SC_NPROCESSORS_ONLN);
	size_t per = mib << 20, words = per / 8;
	uint64_t *buf = malloc(per * (size_t)threads);
	if (!buf || threads < 1) {
		fprintf(stderr, "membw: cannot allocate %zu MiB x %d\n", mib, threads);
		return 1;
	}
	memset(buf, 1, per * (size_t)threads);
	double best = 0;
	uint64_t check = 0;
	for (int pass = 0; pass < 5; pass++) {
		pthread_t tid[256];
		slice s[256];
		pthread_barrier_t start;
		pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
		for (int t = 0; t < threads && t < 256; t++) {
			s[t] = (slice){ buf + (size_t)t * words, words, 0, &start };
			pthread_create(&tid[t], NULL, read_slice, &s[t]);
		}
		double t0 = now();
		pthread_barrier_wait(&start);
		for (int t = 0; t < threads && t < 256; t++) {
			pthread_join(tid[t], NULL);
			check += s[t].sum;
		}
		double gbs = (double)per * threads / (now() - t0) / 1e9;
		if (gbs > best)
			best = gbs;
		pthread_barrier_destroy(&start);
	}
	printf("%.2f GB/s read (%d threads x %zu MiB, best of 5; checksum %llu)\n", best, threads, mib,
	       (unsigned long long)(check & 0xff));
	free(buf);
	return 0;
}
