/* sha256 (FIPS 180-2 test vectors), the thread pool, the progress bar off a terminal. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "progress.h"
#include "sha256.h"
#include "threadpool.h"

/* FIPS 180-2 appendix B. */
#define ABC_SHA256 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
#define TWO_BLOCK_MSG "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
#define TWO_BLOCK_SHA256 "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
#define MILLION_A_SHA256 "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
#define EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

static void hex_of_buffer(const char *s, size_t len, char hex[65])
{
	uint8_t d[32];
	sha256_buffer(s, len, d);
	sha256_hex(d, hex);
}

static void test_sha256_matches_fips_vectors(void **state)
{
	(void)state;
	char hex[65];
	hex_of_buffer("abc", 3, hex);
	assert_string_equal(hex, ABC_SHA256);
	hex_of_buffer("", 0, hex);
	assert_string_equal(hex, EMPTY_SHA256);
	hex_of_buffer(TWO_BLOCK_MSG, strlen(TWO_BLOCK_MSG), hex);
	assert_string_equal(hex, TWO_BLOCK_SHA256);
}

static void test_sha256_streams_million_a_in_odd_chunks(void **state)
{
	(void)state;
	static char a[1000];
	memset(a, 'a', sizeof a);
	sha256_ctx *c = sha256_new();
	assert_non_null(c);
	size_t left = 1000000, chunk = 1;
	while (left) {
		size_t n = chunk < left ? chunk : left;
		sha256_update(c, a, n);
		left -= n;
		chunk = (chunk * 7 + 3) % 997 + 1; /* 1..997 bytes, never block-aligned for long */
	}
	uint8_t d[32];
	char hex[65];
	sha256_final(c, d);
	sha256_hex(d, hex);
	assert_string_equal(hex, MILLION_A_SHA256);
	sha256_free(c);
}

static void test_sha256_ctx_is_reusable_after_final(void **state)
{
	(void)state;
	sha256_ctx *c = sha256_new();
	uint8_t d[32];
	char hex[65];
	sha256_update(c, "xyz", 3);
	sha256_final(c, d);
	sha256_update(c, "a", 1);
	sha256_update(c, "bc", 2);
	sha256_final(c, d);
	sha256_hex(d, hex);
	assert_string_equal(hex, ABC_SHA256);
	sha256_final(c, d); /* nothing fed since: the empty message */
	sha256_hex(d, hex);
	assert_string_equal(hex, EMPTY_SHA256);
	sha256_free(c);
}

#define N_INDICES 100000

struct sum_job {
	atomic_uint_fast64_t sum;
	atomic_int *hits;
};

static void add_index(void *arg, size_t i)
{
	struct sum_job *job = arg;
	atomic_fetch_add(&job->sum, (uint_fast64_t)i);
	atomic_fetch_add(&job->hits[i], 1);
}

static void check_pool_sums(int n_threads)
{
	thread_pool *p = thread_pool_create(n_threads);
	assert_non_null(p);
	assert_int_equal(thread_pool_size(p), n_threads);
	struct sum_job job;
	job.hits = calloc(N_INDICES, sizeof *job.hits);
	/* Several loops on one pool: workers must wake for each and never run one twice. */
	for (int round = 0; round < 20; round++) {
		atomic_init(&job.sum, 0);
		for (size_t i = 0; i < N_INDICES; i++)
			atomic_init(&job.hits[i], 0);
		thread_pool_for(p, N_INDICES, add_index, &job);
		/* sum of 0..n-1 = n(n-1)/2 */
		assert_int_equal(atomic_load(&job.sum), (uint64_t)N_INDICES * (N_INDICES - 1) / 2);
		for (size_t i = 0; i < N_INDICES; i++)
			assert_int_equal(atomic_load(&job.hits[i]), 1);
	}
	free(job.hits);
	thread_pool_destroy(p);
}

static void test_thread_pool_for_visits_each_index_once(void **state)
{
	(void)state;
	check_pool_sums(1);
	check_pool_sums(2);
	check_pool_sums(4);
}

static void count_call(void *arg, size_t i)
{
	(void)i;
	atomic_fetch_add((atomic_int *)arg, 1);
}

static void test_thread_pool_handles_empty_and_tiny_loops(void **state)
{
	(void)state;
	thread_pool *p = thread_pool_create(3);
	atomic_int calls;
	atomic_init(&calls, 0);
	thread_pool_for(p, 0, count_call, &calls);
	assert_int_equal(atomic_load(&calls), 0);
	thread_pool_for(p, 1, count_call, &calls);
	thread_pool_for(p, 2, count_call, &calls);
	assert_int_equal(atomic_load(&calls), 3);
	thread_pool_destroy(p);
}

static void test_thread_pool_defaults_to_online_cores(void **state)
{
	(void)state;
	thread_pool *p = thread_pool_create(0);
	assert_non_null(p);
	assert_int_equal(thread_pool_size(p), (int)sysconf(_SC_NPROCESSORS_ONLN));
	thread_pool_destroy(p);
}

static void test_progress_counts_bytes_and_stays_quiet_off_a_tty(void **state)
{
	(void)state;
	progress p;
	progress_start(&p, "copy", 3000);
	assert_int_equal(p.enabled, isatty(2));
	progress_add(&p, 1000);
	progress_add(&p, 2000);
	assert_int_equal(p.done, 3000);
	progress_end(&p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sha256_matches_fips_vectors),
		cmocka_unit_test(test_sha256_streams_million_a_in_odd_chunks),
		cmocka_unit_test(test_sha256_ctx_is_reusable_after_final),
		cmocka_unit_test(test_thread_pool_for_visits_each_index_once),
		cmocka_unit_test(test_thread_pool_handles_empty_and_tiny_loops),
		cmocka_unit_test(test_thread_pool_defaults_to_online_cores),
		cmocka_unit_test(test_progress_counts_bytes_and_stays_quiet_off_a_tty),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
