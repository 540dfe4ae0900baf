/* dsv3-generate and the demo's sampling: batching leaves each prompt's completion unchanged, the
 * dumped logits are those the tokens were chosen from, seeds reproduce, the length limit, the
 * interactive chat, the flags. The checkpoint is tiny with DeepSeek-V3's real vocabulary
 * (tests/fixtures/configs/demo-v3.json) and the real tokenizer (.deps/tokenizer). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "sampling.h"
#include "support/test_support.h"

#define VOCAB 129280 /* DeepSeek-V3's vocab_size, as the fixture config says */

static char *g_dir;  /* temp dir of the group */
static char *g_ckpt; /* the synthetic checkpoint in it */
static dsv3_error st_err;

static const char *prompts[3] = {
	"Hi",
	"What is the capital of France?",
	"Write a short poem about the sea, the moon and the long night, in English please.",
};

static int group_setup(void **state)
{
	(void)state;
	g_dir = tmp_dir_create("generate");
	if (!g_dir)
		return -1;
	g_ckpt = strdup(path_in(g_dir, "ckpt"));
	return run_shell("%s/dsv3-synth --config tests/fixtures/configs/demo-v3.json --seed 1 "
			 "--tokenizer .deps/tokenizer --out %s >/dev/null",
			 bin_dir(), g_ckpt);
}

static int group_teardown(void **state)
{
	(void)state;
	remove_tree(g_dir);
	free(g_dir);
	free(g_ckpt);
	return 0;
}

/* dsv3-generate on g_ckpt with a short cache (fast) and `args`; stdout to out, stderr to err.
 * On the CPU, whose results are bit-exact (batched or not), even where a GPU is visible; a
 * --device in args overrides it (the last one counts). */
static int gen(const char *args, const char *out, const char *err)
{
	return run_shell("%s/dsv3-generate --ckpt-path %s --max-seq-len 256 --threads 2 --device cpu %s >%s 2>%s", bin_dir(),
			 g_ckpt, args, out, err);
}

static void write_prompts(const char *path, const char *const *p, int n)
{
	char buf[1024] = "";
	for (int i = 0; i < n; i++) {
		strcat(buf, p[i]);
		strcat(buf, "\n");
	}
	write_text_file(path, buf);
}

static const st_tensor *find(const st_file *f, const char *fmt, int i)
{
	char name[64];
	snprintf(name, sizeof name, fmt, i);
	const st_tensor *t = st_find(f, name);
	assert_non_null(t);
	return t;
}

static void test_generate_batch_gives_each_prompt_the_completion_it_gets_alone(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "batch.txt");
	write_prompts(in, prompts, 3);
	char args[512], *alone = calloc(1, 1);
	size_t alone_len = 0;
	snprintf(args, sizeof args, "--input-file %s --temperature 0 --max-new-tokens 8 --dump-logits %s", in,
		 path_in(g_dir, "batch.st"));
	assert_int_equal(gen(args, path_in(g_dir, "batch.out"), path_in(g_dir, "batch.err")), 0);
	assert_file_contains(path_in(g_dir, "batch.err"), "tokens/s");
	st_file batch, one;
	assert_int_equal(st_open(&batch, path_in(g_dir, "batch.st"), &st_err), 0);
	for (int i = 0; i < 3; i++) {
		const char *in1 = path_in(g_dir, "one.txt");
		write_prompts(in1, &prompts[i], 1);
		snprintf(args, sizeof args, "--input-file %s --temperature 0 --max-new-tokens 8 --dump-logits %s",
			 in1, path_in(g_dir, "one.st"));
		assert_int_equal(gen(args, path_in(g_dir, "one.out"), "/dev/null"), 0);
		size_t len;
		char *text = assert_read_file(path_in(g_dir, "one.out"), &len);
		alone = realloc(alone, alone_len + len + 1);
		memcpy(alone + alone_len, text, len + 1);
		alone_len += len;
		free(text);
		/* The same tokens from bit-identical logits. */
		assert_int_equal(st_open(&one, path_in(g_dir, "one.st"), &st_err), 0);
		const st_tensor *a = find(&batch, "seq%d.logits", i), *b = find(&one, "seq%d.logits", 0);
		assert_int_equal(a->nbytes, b->nbytes);
		assert_memory_equal(a->data, b->data, a->nbytes);
		a = find(&batch, "seq%d.tokens", i), b = find(&one, "seq%d.tokens", 0);
		assert_int_equal(a->nbytes, b->nbytes);
		assert_memory_equal(a->data, b->data, a->nbytes);
		st_close(&one);
	}
	st_close(&batch);
	size_t len;
	char *text = assert_read_file(path_in(g_dir, "batch.out"), &len);
	assert_string_equal(text, alone);
	assert_non_null(strstr(text, "Prompt: What is the capital of France?\nCompletion: "));
	free(text);
	free(alone);
}

static int argmax(const float *v, int n)
{
	int b = 0;
	for (int i = 1; i < n; i++)
		if (v[i] > v[b])
			b = i;
	return b;
}

static void test_generate_dumped_logits_argmax_is_each_greedy_token(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "two.txt");
	write_prompts(in, prompts, 2);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --temperature 0 --max-new-tokens 6 --dump-logits %s", in,
		 path_in(g_dir, "two.st"));
	assert_int_equal(gen(args, "/dev/null", "/dev/null"), 0);
	st_file f;
	assert_int_equal(st_open(&f, path_in(g_dir, "two.st"), &st_err), 0);
	for (int i = 0; i < 2; i++) {
		const st_tensor *l = find(&f, "seq%d.logits", i), *t = find(&f, "seq%d.tokens", i);
		assert_int_equal(l->dtype, ST_F32);
		assert_int_equal(t->dtype, ST_I64);
		assert_int_equal(l->ndim, 2);
		assert_int_equal(l->shape[1], VOCAB);
		assert_int_equal(l->shape[0], t->shape[0]);
		assert_true(t->shape[0] >= 1 && t->shape[0] <= 6);
		const float *rows = (const float *)l->data;
		const int64_t *tok = (const int64_t *)t->data;
		for (int64_t s = 0; s < t->shape[0]; s++) {
			assert_true(isfinite(rows[s * VOCAB]));
			assert_int_equal(argmax(rows + s * VOCAB, VOCAB), tok[s]);
		}
	}
	st_close(&f);
}

static void test_generate_same_seed_same_text_other_seed_differs(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "seed.txt");
	write_prompts(in, prompts, 2);
	const char *outs[3] = { "s1a.out", "s1b.out", "s2.out" };
	const int seeds[3] = { 1, 1, 2 };
	char *text[3];
	for (int k = 0; k < 3; k++) {
		char args[512];
		snprintf(args, sizeof args, "--input-file %s --temperature 1 --max-new-tokens 10 --seed %d", in,
			 seeds[k]);
		assert_int_equal(gen(args, path_in(g_dir, outs[k]), "/dev/null"), 0);
		text[k] = assert_read_file(path_in(g_dir, outs[k]), NULL);
	}
	assert_string_equal(text[0], text[1]);
	assert_string_not_equal(text[0], text[2]);
	for (int k = 0; k < 3; k++)
		free(text[k]);
}

/* The demo decodes with skip_special_tokens=True. With these arguments random weights draw
 * ids in [128000, 128800): the "special" added tokens <｜place▁holder▁no▁N｜> of DeepSeek-V3's
 * tokenizer.json; none of them is printed. */
static void test_generate_does_not_print_special_tokens(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "special.txt");
	write_prompts(in, prompts, 3);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --temperature 1 --seed 5 --max-new-tokens 40 --dump-logits %s",
		 in, path_in(g_dir, "special.st"));
	const char *out = path_in(g_dir, "special.out");
	assert_int_equal(gen(args, out, "/dev/null"), 0);
	st_file f;
	assert_int_equal(st_open(&f, path_in(g_dir, "special.st"), &st_err), 0);
	int n_special = 0;
	for (int i = 0; i < 3; i++) {
		const st_tensor *t = find(&f, "seq%d.tokens", i);
		const int64_t *tok = (const int64_t *)t->data;
		for (int64_t s = 0; s < t->shape[0]; s++)
			n_special += tok[s] >= 128000 && tok[s] < 128800;
	}
	st_close(&f);
	assert_true(n_special > 0);
	char *text = assert_read_file(out, NULL);
	assert_null(strstr(text, "place\xe2\x96\x81holder"));
	assert_null(strstr(text, "<\xef\xbd\x9c"));
	free(text);
}

static void test_generate_prompt_longer_than_max_seq_len_exits_2(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "long.txt");
	write_prompts(in, &prompts[2], 1);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --max-seq-len 8", in);
	const char *err = path_in(g_dir, "long.err");
	assert_int_equal(gen(args, "/dev/null", err), 2);
	assert_file_contains(err, "--max-seq-len is 8");
	assert_file_contains(err, "tokens");
}

static void test_generate_interactive_two_turns_then_exit(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "chat.txt");
	write_text_file(in, "Hello\nAnd then?\n/exit\nnever read\n");
	char args[512];
	snprintf(args, sizeof args, "--interactive --max-new-tokens 5 --seed 7 <%s", in);
	const char *out = path_in(g_dir, "chat.out"), *err = path_in(g_dir, "chat.err");
	assert_int_equal(gen(args, out, err), 0);
	size_t len;
	char *text = assert_read_file(out, &len);
	/* Three prompts shown (two turns, then /exit), each answer on its own line. */
	int prompts_shown = 0;
	for (char *p = text; (p = strstr(p, ">>> ")); p += 4)
		prompts_shown++;
	assert_int_equal(prompts_shown, 3);
	assert_true(len > 3 * 4 + 2);
	free(text);
	assert_file_contains(err, "decode:");
}

static void test_generate_interactive_clear_and_eof(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "clear.txt");
	write_text_file(in, "Hello\n/clear\nHello\n");
	char args[512];
	snprintf(args, sizeof args, "--interactive --max-new-tokens 4 --temperature 0 <%s", in);
	const char *out = path_in(g_dir, "clear.out");
	assert_int_equal(gen(args, out, "/dev/null"), 0);
	/* After /clear the same first turn gets the same greedy answer. */
	char *text = assert_read_file(out, NULL);
	char *a = strstr(text, ">>> "), *b = a ? strstr(a + 4, ">>> ") : NULL, *c = b ? strstr(b + 4, ">>> ") : NULL;
	assert_non_null(c);
	char *end = strstr(c + 4, ">>> ");
	assert_non_null(end);
	assert_memory_equal(a + 4, c + 4, (size_t)(b - a - 4));
	assert_int_equal(end - c, b - a);
	free(text);
}

static void test_generate_flags(void **state)
{
	(void)state;
	const char *out = path_in(g_dir, "flags.out"), *err = path_in(g_dir, "flags.err");
	assert_int_equal(run_shell("%s/dsv3-generate --help >%s", bin_dir(), out), 0);
	assert_file_contains(out, "--ckpt-path");
	assert_file_contains(out, "--max-new-tokens");
	assert_int_equal(run_shell("%s/dsv3-generate --version >%s", bin_dir(), out), 0);
	assert_file_contains(out, "dsv3-generate ");
	const char *in = path_in(g_dir, "f.txt");
	write_prompts(in, prompts, 1);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --device tpu", in);
	assert_int_equal(gen(args, "/dev/null", err), 1);
	assert_int_equal(gen("", "/dev/null", err), 1);
	assert_file_contains(err, "--interactive");
	/* --config: the checkpoint's own config is accepted, another one refused. */
	snprintf(args, sizeof args, "--input-file %s --max-new-tokens 1 --config %s/config.json", in, g_ckpt);
	assert_int_equal(gen(args, "/dev/null", err), 0);
	snprintf(args, sizeof args, "--input-file %s --config tests/fixtures/configs/../../test_generate.c", in);
	assert_int_equal(gen(args, "/dev/null", err), 1);
	assert_file_contains(err, "differs");
	assert_int_equal(run_shell("%s/dsv3-generate --ckpt-path %s/none --tokenizer .deps/tokenizer --input-file %s "
				   ">/dev/null 2>%s",
				   bin_dir(), g_dir, in, err),
			 3);
	assert_file_contains(err, "none/config.json");
	/* Prompts are stripped as the demo's line.strip(); empty lines are no prompts. */
	write_text_file(in, "  Hi \t\r\n\n \n");
	snprintf(args, sizeof args, "--input-file %s --max-new-tokens 1", in);
	assert_int_equal(gen(args, out, err), 0);
	char *text = assert_read_file(out, NULL);
	assert_true(!strncmp(text, "Prompt: Hi\nCompletion: ", strlen("Prompt: Hi\nCompletion: ")));
	assert_null(strstr(text + 1, "Prompt:"));
	free(text);
}

/* A GPU the CUDA backend could use; the no-GPU checks below only hold without one. */
static int gpu_visible(void)
{
	return run_shell("nvidia-smi -L >/dev/null 2>&1") == 0;
}

static void test_generate_unknown_device_exits_1_naming_it(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "dev.txt"), *err = path_in(g_dir, "dev.err");
	write_prompts(in, prompts, 1);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --device bogus", in);
	assert_int_equal(gen(args, "/dev/null", err), 1);
	assert_file_contains(err, "'bogus'");
}

/* Without a GPU (or without the CUDA backend) --device cuda is a usage error that says why;
 * nothing is generated. */
static void test_generate_device_cuda_without_gpu_exits_1_saying_why(void **state)
{
	(void)state;
	if (gpu_visible())
		skip();
	const char *in = path_in(g_dir, "dev.txt"), *out = path_in(g_dir, "dev.out"), *err = path_in(g_dir, "dev.err");
	write_prompts(in, prompts, 1);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --max-new-tokens 1 --device cuda", in);
	assert_int_equal(gen(args, out, err), 1);
	assert_file_contains(err, "--device cuda: ");
	assert_false(file_contains(out, "Completion:"));
}

/* The device used is said on stderr; auto, the default, falls back to the CPU without a GPU. */
static void test_generate_says_the_device_used(void **state)
{
	(void)state;
	const char *in = path_in(g_dir, "dev.txt"), *err = path_in(g_dir, "dev.err");
	write_prompts(in, prompts, 1);
	char args[512];
	snprintf(args, sizeof args, "--input-file %s --max-new-tokens 1 --device cpu", in);
	assert_int_equal(gen(args, "/dev/null", err), 0);
	assert_file_contains(err, "device: cpu\n");
	if (gpu_visible())
		return;
	/* No --device: auto. */
	assert_int_equal(run_shell("%s/dsv3-generate --ckpt-path %s --max-seq-len 256 --threads 2 --input-file %s "
				   "--max-new-tokens 1 >/dev/null 2>%s", bin_dir(), g_ckpt, in, err), 0);
	assert_file_contains(err, "device: cpu\n");
}

/* How many tokens sequence i generated, from the dump at path. */
static int64_t dumped_steps(const char *path, int i)
{
	st_file f;
	assert_int_equal(st_open(&f, path, &st_err), 0);
	int64_t n = find(&f, "seq%d.tokens", i)->shape[0];
	st_close(&f);
	return n;
}

/* Batched decode (one forward_batch per step over the sequences still going) with prompts that
 * stop at different steps: with --max-seq-len 26 the 22-token poem prompt, put first, has room
 * for 4 tokens, the others for all 8, so after 4 steps the batch is the second and third
 * sequence only (rows 0 and 1 of the step's logits belong to sequences 1 and 2). Each prompt's
 * tokens, logits and text are those it gets alone, and decode counts every sequence's fed-back
 * tokens: (4 - 1) + (8 - 1) + (8 - 1) = 17. */
static void test_generate_batch_shrinking_as_prompts_end_matches_each_alone(void **state)
{
	(void)state;
	const char *order[3] = { prompts[2], prompts[0], prompts[1] };
	const char *in = path_in(g_dir, "shrink.txt");
	write_prompts(in, order, 3);
	const char *st = fresh_path(g_dir, "shrink.st"), *err = fresh_path(g_dir, "shrink.err");
	const char *out = fresh_path(g_dir, "shrink.out");
	char args[512], *alone = calloc(1, 1);
	size_t alone_len = 0;
	snprintf(args, sizeof args, "--input-file %s --temperature 0 --max-new-tokens 8 --max-seq-len 26 "
		 "--dump-logits %s", in, st);
	assert_int_equal(gen(args, out, err), 0);
	assert_int_equal(dumped_steps(st, 0), 4);
	assert_int_equal(dumped_steps(st, 1), 8);
	assert_int_equal(dumped_steps(st, 2), 8);
	assert_file_contains(err, "decode: 17 tokens");
	st_file batch, one;
	assert_int_equal(st_open(&batch, st, &st_err), 0);
	for (int i = 0; i < 3; i++) {
		const char *in1 = path_in(g_dir, "shrink1.txt"), *st1 = fresh_path(g_dir, "shrink1.st");
		const char *out1 = fresh_path(g_dir, "shrink1.out");
		write_prompts(in1, &order[i], 1);
		snprintf(args, sizeof args, "--input-file %s --temperature 0 --max-new-tokens 8 --max-seq-len 26 "
			 "--dump-logits %s", in1, st1);
		assert_int_equal(gen(args, out1, "/dev/null"), 0);
		size_t len;
		char *text = assert_read_file(out1, &len);
		alone = realloc(alone, alone_len + len + 1);
		memcpy(alone + alone_len, text, len + 1);
		alone_len += len;
		free(text);
		assert_int_equal(st_open(&one, st1, &st_err), 0);
		const char *names[2] = { "seq%d.logits", "seq%d.tokens" };
		for (int k = 0; k < 2; k++) {
			const st_tensor *a = find(&batch, names[k], i), *b = find(&one, names[k], 0);
			assert_int_equal(a->nbytes, b->nbytes);
			assert_memory_equal(a->data, b->data, a->nbytes);
		}
		st_close(&one);
	}
	st_close(&batch);
	char *text = assert_read_file(out, NULL);
	assert_string_equal(text, alone);
	free(text);
	free(alone);
}

/* The demo's rule draws token i with probability softmax(logits / T)_i: frequencies of 40000
 * draws are within 0.01 (> 4 sigma) of probabilities computed here from the definition. */
static void test_sampling_follows_softmax_of_logits_over_t(void **state)
{
	(void)state;
	const float logits[4] = { 2.0f, 1.0f, 0.0f, -1.0f };
	const float t = 0.7f;
	double p[4], sum = 0;
	for (int i = 0; i < 4; i++)
		sum += p[i] = exp(logits[i] / t);
	int count[4] = { 0 };
	float probs[4];
	sampler s;
	sampler_init(&s, 42, 0);
	for (int k = 0; k < 40000; k++)
		count[sample_token(&s, logits, 4, t, probs)]++;
	for (int i = 0; i < 4; i++)
		assert_true(fabs(count[i] / 40000.0 - p[i] / sum) < 0.01);
	assert_int_equal(sample_token(&s, logits, 4, 0, probs), 0);
}

static void test_sampling_uniform_in_half_open_unit_interval_and_per_sequence(void **state)
{
	(void)state;
	sampler a, b, c;
	sampler_init(&a, 5, 0);
	sampler_init(&b, 5, 0);
	sampler_init(&c, 5, 1);
	int differ = 0;
	for (int k = 0; k < 1000; k++) {
		double u = sampler_uniform(&a), v = sampler_uniform(&b), w = sampler_uniform(&c);
		assert_true(u > 0 && u <= 1);
		assert_true(u == v);
		differ += u != w;
	}
	assert_true(differ > 990);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sampling_follows_softmax_of_logits_over_t),
		cmocka_unit_test(test_sampling_uniform_in_half_open_unit_interval_and_per_sequence),
		cmocka_unit_test(test_generate_batch_gives_each_prompt_the_completion_it_gets_alone),
		cmocka_unit_test(test_generate_dumped_logits_argmax_is_each_greedy_token),
		cmocka_unit_test(test_generate_same_seed_same_text_other_seed_differs),
		cmocka_unit_test(test_generate_does_not_print_special_tokens),
		cmocka_unit_test(test_generate_prompt_longer_than_max_seq_len_exits_2),
		cmocka_unit_test(test_generate_interactive_two_turns_then_exit),
		cmocka_unit_test(test_generate_interactive_clear_and_eof),
		cmocka_unit_test(test_generate_flags),
		cmocka_unit_test(test_generate_unknown_device_exits_1_naming_it),
		cmocka_unit_test(test_generate_device_cuda_without_gpu_exits_1_saying_why),
		cmocka_unit_test(test_generate_says_the_device_used),
		cmocka_unit_test(test_generate_batch_shrinking_as_prompts_end_matches_each_alone),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
