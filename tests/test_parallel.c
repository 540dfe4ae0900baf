/* Tensor-parallel CPU ranks over MPI (issue 8, DESIGN §5): `mpirun --oversubscribe -np 2` and
 * `-np 4` of dsv3-verify logits over mp-2 / mp-4 shards of the golden checkpoints, within the CPU
 * limits of DESIGN §6 (verify logits applies them); dsv3-generate's greedy text, batch and
 * interactive, the same on 2 and 4 ranks as on one; and the failures a multi-rank job must end on,
 * in bounded time and naming what differs: a rank that cannot load its shard, shards of another
 * N, mixed N, and ranks holding different checkpoints. Skipped (and said so) without mpirun. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "support/test_support.h"

/* OpenMPI refuses to start as root unless told; CI runs as root. `timeout` bounds a hang. */
#define MPIRUN "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun " \
	       "--oversubscribe -np"
#define HUNG 124 /* timeout's status */

typedef struct {
	char *root;
	char tiny[256], tiny_v2[256], tiny_bf16[256], demo[256];
} fixture;

/* mpirun is there and the tools were built with MPI (an MPI=0 build says so under mpirun). */
static int have_mpirun(void)
{
	if (run_shell("command -v mpirun >/dev/null 2>&1") != 0)
		return 0;
	return run_shell(MPIRUN " 1 %s/dsv3-verify logits --ckpt-path /nonexistent --golden "
			 "/nonexistent 2>&1 | grep -q 'this build has no MPI'", bin_dir()) != 0;
}

static int convert(const char *in, int mp)
{
	return run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s-mp%d "
			 "--n-experts 16 --model-parallel %d", bin_dir(), in, in, mp, mp);
}

static int setup(void **state)
{
	if (!have_mpirun()) {
		fprintf(stderr, "test_parallel: skipped (no mpirun here, or the tools were built with "
			"MPI=0; make deps installs OpenMPI)\n");
		*state = NULL;
		return 0;
	}
	fixture *fx = calloc(1, sizeof *fx);
	if (!fx || !(fx->root = tmp_dir_create("parallel")))
		return -1;
	snprintf(fx->tiny, sizeof fx->tiny, "%s/tiny", fx->root);
	snprintf(fx->tiny_v2, sizeof fx->tiny_v2, "%s/tiny-v2", fx->root);
	snprintf(fx->tiny_bf16, sizeof fx->tiny_bf16, "%s/tiny-bf16", fx->root);
	snprintf(fx->demo, sizeof fx->demo, "%s/demo", fx->root);
	/* The checkpoints the golden files were made from (their synth_args), and a real-vocab
	 * one for the tokenizer. */
	if (run_synth("tiny", 1, "", fx->tiny) || run_synth("tiny-v2", 2, "", fx->tiny_v2) ||
	    run_quiet(NULL, "%s/dsv3-fp8-to-bf16 --input-fp8-hf-path %s --output-bf16-hf-path %s",
		      bin_dir(), fx->tiny, fx->tiny_bf16) ||
	    run_quiet(NULL, "%s/dsv3-synth --config tests/fixtures/configs/demo-v3.json --seed 1 "
		      "--tokenizer .deps/tokenizer --out %s", bin_dir(), fx->demo))
		return -1;
	const char *dirs[] = { fx->tiny, fx->tiny_v2, fx->tiny_bf16, fx->demo };
	for (size_t i = 0; i < 4; i++)
		if (convert(dirs[i], 2) || convert(dirs[i], 4))
			return -1;
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	fixture *fx = *state;
	if (!fx)
		return 0;
	remove_tree(fx->root);
	free(fx->root);
	free(fx);
	return 0;
}

#define NEED_MPI(fx)                                                       \
	do {                                                               \
		if (!(fx)) {                                               \
			fprintf(stderr, "skipped: no mpirun\n");           \
			return;                                            \
		}                                                          \
	} while (0)

/* verify logits of `golden` on `np` ranks over ckpt-mp{np}: exit 0, every case within the CPU
 * limits, and the header says np ranks. */
static void verify_on_ranks(const fixture *fx, const char *ckpt, const char *golden, int np)
{
	const char *out = path_in(fx->root, "verify.txt");
	assert_int_equal(run_noting_failure(MPIRUN " %d %s/dsv3-verify logits --ckpt-path %s-mp%d "
					    "--golden %s --threads 1 > %s", np, bin_dir(), ckpt, np,
					    golden, out), 0);
	char want[64];
	snprintf(want, sizeof want, "device cpu, %d ranks, limits:", np);
	assert_file_contains(out, want);
	assert_file_contains(out, "rel-L2 <= 1e-4 and top-1 100%");
	assert_false(file_contains(out, "FAIL"));
}

static void test_golden_logits_on_2_and_4_cpu_ranks(void **state)
{
	fixture *fx = *state;
	NEED_MPI(fx);
	static const struct {
		int which;
		const char *golden;
	} cases[] = {
		{ 0, "golden/tiny.safetensors" },	{ 0, "golden/tiny-4096.safetensors" },
		{ 1, "golden/tiny-v2.safetensors" },	{ 1, "golden/tiny-v2-4096.safetensors" },
		{ 2, "golden/tiny-bf16.safetensors" },
	};
	const char *dirs[] = { fx->tiny, fx->tiny_v2, fx->tiny_bf16 };
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
		for (int np = 2; np <= 4; np *= 2)
			verify_on_ranks(fx, dirs[cases[i].which], cases[i].golden, np);
}

/* Greedy text of one process over the HF directory, and of 2 and 4 ranks over their shards. */
static void test_generate_same_text_on_1_2_and_4_ranks(void **state)
{
	fixture *fx = *state;
	NEED_MPI(fx);
	const char *prompts = path_in(fx->root, "prompts.txt");
	write_text_file(prompts, "Hello world\nThe quick brown fox jumps over\n");
	const char *one = fresh_path(fx->root, "one.txt");
	assert_int_equal(run_noting_failure("%s/dsv3-generate --ckpt-path %s --input-file %s "
					    "--max-new-tokens 10 --temperature 0 > %s 2>/dev/null",
					    bin_dir(), fx->demo, prompts, one), 0);
	assert_file_contains(one, "Completion:");
	for (int np = 2; np <= 4; np *= 2) {
		const char *many = fresh_path(fx->root, "many.txt");
		assert_int_equal(run_noting_failure(MPIRUN " %d %s/dsv3-generate --ckpt-path %s-mp%d "
						    "--input-file %s --max-new-tokens 10 "
						    "--temperature 0 --threads 1 > %s 2>/dev/null",
						    np, bin_dir(), fx->demo, np, prompts, many), 0);
		assert_int_equal(run_noting_failure("cmp %s %s", one, many), 0);
	}
	/* interactive: rank 0 reads stdin and sends each line to the others */
	const char *in = path_in(fx->root, "chat.txt");
	write_text_file(in, "Hi there\n/clear\nHow are you\n");
	const char *i1 = fresh_path(fx->root, "i1.txt"), *i2 = fresh_path(fx->root, "i2.txt");
	assert_int_equal(run_noting_failure("%s/dsv3-generate --ckpt-path %s --interactive "
					    "--max-new-tokens 6 --temperature 0 < %s > %s 2>/dev/null",
					    bin_dir(), fx->demo, in, i1), 0);
	assert_int_equal(run_noting_failure(MPIRUN " 2 %s/dsv3-generate --ckpt-path %s-mp2 "
					    "--interactive --max-new-tokens 6 --temperature 0 "
					    "--threads 1 < %s > %s 2>/dev/null", bin_dir(), fx->demo,
					    in, i2), 0);
	assert_int_equal(run_noting_failure("cmp %s %s", i1, i2), 0);
}

/* The job's exit status (not timeout's) and stderr, which must hold `says`. */
static void assert_job_fails(const fixture *fx, const char *ckpt, int np, const char *says)
{
	const char *err = path_in(fx->root, "err.txt");
	int rc = run_quiet(err, MPIRUN " %d %s/dsv3-verify logits --ckpt-path %s --golden "
			   "golden/tiny.safetensors --threads 1", np, bin_dir(), ckpt);
	assert_int_not_equal(rc, 0);
	assert_int_not_equal(rc, HUNG);
	assert_file_contains(err, says);
}

static void test_a_failing_rank_ends_the_job(void **state)
{
	fixture *fx = *state;
	NEED_MPI(fx);
	/* rank 1's shard has a broken header: rank 1 fails to load while rank 0 has loaded */
	char bad[300];
	snprintf(bad, sizeof bad, "%s/bad", fx->root);
	assert_int_equal(run_shell("cp -r %s-mp2 %s && printf '[[' | dd of=%s/model1-mp2.safetensors "
				   "bs=1 seek=8 conv=notrunc 2>/dev/null", fx->tiny, bad, bad), 0);
	assert_job_fails(fx, bad, 2, "rank 1 of 2: ");
	assert_job_fails(fx, bad, 2, "model1-mp2.safetensors");
}

static void test_preflight_names_what_differs(void **state)
{
	fixture *fx = *state;
	NEED_MPI(fx);
	char dir[300];
	snprintf(dir, sizeof dir, "%s-mp4", fx->tiny);
	assert_job_fails(fx, dir, 2, "holds shards for 4 ranks (model*-mp4), the job has 2");
	snprintf(dir, sizeof dir, "%s/mixed", fx->root);
	assert_int_equal(run_shell("cp -r %s-mp2 %s && cp %s-mp4/model0-mp4.safetensors %s", fx->tiny,
				   dir, fx->tiny, dir), 0);
	assert_job_fails(fx, dir, 2, "holds shards of mp 2 and of mp 4");
	snprintf(dir, sizeof dir, "%s", fx->tiny);
	assert_job_fails(fx, dir, 2, "has no model{r}-mp{N}.safetensors");
	/* Two "hosts": each rank runs in its own directory, where ckpt is a copy of the shards;
	 * rank 1's tensors.sha256.json is another checkpoint's. */
	const char *hosts = path_in(fx->root, "hosts");
	assert_int_equal(run_shell("mkdir -p %s/rank0 %s/rank1 && cp -r %s-mp2 %s/rank0/ckpt && "
				   "cp -r %s-mp2 %s/rank1/ckpt && cp %s-mp2/tensors.sha256.json "
				   "%s/rank1/ckpt/", hosts, hosts, fx->tiny, hosts, fx->tiny, hosts,
				   fx->tiny_v2, hosts), 0);
	const char *err = path_in(fx->root, "err.txt");
	char cwd[4096];
	assert_non_null(getcwd(cwd, sizeof cwd));
	int rc = run_quiet(err, MPIRUN " 2 sh -c 'cd %s/rank$OMPI_COMM_WORLD_RANK && exec "
			   "%s/dsv3-verify logits --ckpt-path ckpt --golden %s/golden/tiny.safetensors "
			   "--threads 1'", hosts, bin_dir(), cwd);
	assert_int_not_equal(rc, 0);
	assert_int_not_equal(rc, HUNG);
	assert_file_contains(err, "rank 1 of 2: ckpt/tensors.sha256.json differs from rank 0's");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_golden_logits_on_2_and_4_cpu_ranks),
		cmocka_unit_test(test_generate_same_text_on_1_2_and_4_ranks),
		cmocka_unit_test(test_a_failing_rank_ends_the_job),
		cmocka_unit_test(test_preflight_names_what_differs),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
