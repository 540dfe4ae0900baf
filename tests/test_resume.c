/* --resume on dsv3-convert (both dtypes), dsv3-shard and dsv3-fp8-to-bf16: a run killed once K
 * output files are finished (DSV3_RESUME_KILL_AFTER=K makes the tool SIGKILL itself there)
 * leaves no file under a final name; the resumed run keeps those K files untouched (same inode)
 * and ends byte-identical, every file, to an uninterrupted run. A finished file that no longer
 * matches its record is redone, another run's journal is refused, a torn journal line and a
 * commit cut short are survived, and a run without --resume starts over. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "support/test_support.h"

typedef struct {
	char *root;
	char fp8[128];  /* dsv3-synth --preset tiny --seed 1 --files 3 */
	char mp4[128];  /* dsv3-convert of it, --model-parallel 4 */
} fixture;

static int setup(void **state)
{
	fixture *fx = calloc(1, sizeof *fx);
	if (!fx || !(fx->root = tmp_dir_create("resume")))
		return -1;
	snprintf(fx->fp8, sizeof fx->fp8, "%s/fp8", fx->root);
	snprintf(fx->mp4, sizeof fx->mp4, "%s/mp4", fx->root);
	if (run_synth("tiny", 1, "--files 3", fx->fp8) != 0 ||
	    run_quiet(NULL, "%s/dsv3-convert --hf-ckpt-path %s --save-path %s --n-experts 16 "
			    "--model-parallel 4", bin_dir(), fx->fp8, fx->mp4) != 0)
		return -1;
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	fixture *fx = *state;
	remove_tree(fx->root);
	free(fx->root);
	free(fx);
	return 0;
}

/* ---- running a tool ---- */

#define MAX_ARGS 16

/* Runs tool with args (NULL-terminated), DSV3_RESUME_KILL_AFTER=kill_after when > 0, stderr to
 * err_path; returns the wait status. */
static int run_tool(const char *tool, const char *const *args, int kill_after, const char *err_path)
{
	char exe[4096];
	snprintf(exe, sizeof exe, "%s/%s", bin_dir(), tool);
	const char *argv[MAX_ARGS + 2] = { exe };
	for (int i = 0; args[i] && i < MAX_ARGS; i++)
		argv[i + 1] = args[i];
	pid_t pid = fork();
	if (pid == 0) {
		char k[32];
		snprintf(k, sizeof k, "%d", kill_after);
		if (kill_after > 0)
			setenv("DSV3_RESUME_KILL_AFTER", k, 1);
		else
			unsetenv("DSV3_RESUME_KILL_AFTER");
		int fd = open(err_path ? err_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0666);
		dup2(fd, 2);
		int null = open("/dev/null", O_WRONLY);
		dup2(null, 1);
		execv(exe, (char *const *)argv);
		_exit(127);
	}
	assert_true(pid > 0);
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	return st;
}

static void assert_exit(int st, int code)
{
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), code);
}

static void assert_killed(int st)
{
	assert_true(WIFSIGNALED(st));
	assert_int_equal(WTERMSIG(st), SIGKILL);
}

/* ---- comparing directories ---- */

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every entry of dir, hidden ones included, sorted; returns the count. */
static size_t list_dir(const char *dir, char **names, size_t cap)
{
	DIR *d = opendir(dir);
	assert_non_null(d);
	size_t n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
			assert_true(n < cap);
			names[n++] = strdup(e->d_name);
		}
	closedir(d);
	qsort(names, n, sizeof *names, cmp_names);
	return n;
}

/* Same names (no hidden leftovers in got) and the same bytes in every file. */
static void assert_same_dirs(const char *want, const char *got)
{
	char *a[64], *b[64];
	size_t na = list_dir(want, a, 64), nb = list_dir(got, b, 64);
	assert_int_equal(na, nb);
	for (size_t i = 0; i < na; i++) {
		assert_string_equal(a[i], b[i]);
		char pa[4096], pb[4096];
		snprintf(pa, sizeof pa, "%s/%s", want, a[i]);
		snprintf(pb, sizeof pb, "%s/%s", got, b[i]);
		size_t la, lb;
		char *x = assert_read_file(pa, &la), *y = assert_read_file(pb, &lb);
		assert_int_equal(la, lb);
		if (memcmp(x, y, la) != 0)
			fail_msg("%s differs from %s", pb, pa);
		free(x);
		free(y);
		free(a[i]);
		free(b[i]);
	}
}

/* ---- one tool, killed and resumed ---- */

typedef struct {
	const char *tool;
	const char *args[MAX_ARGS]; /* with OUT where the output directory goes */
} tool_run;

/* run's args with OUT replaced by out, then `extra` (may be NULL). */
static void fill_args(const tool_run *run, const char *out, const char *extra, const char **args)
{
	int n = 0;
	for (int i = 0; run->args[i]; i++)
		args[n++] = strcmp(run->args[i], "OUT") ? run->args[i] : out;
	if (extra)
		args[n++] = extra;
	args[n] = NULL;
}

static void run_to(const tool_run *run, const char *out, const char *extra, int kill_after,
		   const char *err, int *status)
{
	const char *args[MAX_ARGS + 2];
	fill_args(run, out, extra, args);
	*status = run_tool(run->tool, args, kill_after, err);
}

static const char *done_path(const char *out, const char *name)
{
	static char buf[4][4096];
	static int k;
	k = (k + 1) % 4;
	snprintf(buf[k], sizeof buf[k], "%s/.dsv3-done.%s", out, name);
	return buf[k];
}

#define MAX_DONE 8

typedef struct {
	char name[MAX_DONE][256]; /* final names of the finished files */
	int n;
	char link[MAX_DONE][4096]; /* a hard link to each, so its inode cannot be reused */
} finished_files;

static void find_finished(const char *out, finished_files *f)
{
	f->n = 0;
	DIR *d = opendir(out);
	assert_non_null(d);
	struct dirent *e;
	size_t plen = strlen(".dsv3-done.");
	while ((e = readdir(d)))
		if (!strncmp(e->d_name, ".dsv3-done.", plen)) {
			assert_true(f->n < MAX_DONE);
			snprintf(f->name[f->n++], sizeof f->name[0], "%s", e->d_name + plen);
		}
	closedir(d);
}

/* A run killed part-way, beside the uninterrupted one. */
typedef struct {
	const char *ref, *out, *err;
	finished_files done;
} killed_run;

/* The uninterrupted run into k->ref; a run killed after `kill_after` files into k->out; checks
 * what the kill left (no final name, `kill_after` finished files, the journal) and hard-links
 * each finished file, so its inode cannot be reused. */
static void kill_part_way(fixture *fx, const tool_run *run, int kill_after, killed_run *k)
{
	k->ref = fresh_path(fx->root, "ref");
	k->out = fresh_path(fx->root, "out");
	k->err = fresh_path(fx->root, "err.txt");
	const char *links = fresh_path(fx->root, "links");
	int st;
	run_to(run, k->ref, NULL, 0, NULL, &st);
	assert_exit(st, 0);
	run_to(run, k->out, NULL, kill_after, NULL, &st);
	assert_killed(st);
	assert_int_equal(count_final_entries(k->out), 0);
	finished_files *f = &k->done;
	find_finished(k->out, f);
	assert_int_equal(f->n, kill_after);
	assert_true(path_exists(path_in(k->out, ".dsv3-resume")));
	mkdir(links, 0777);
	for (int i = 0; i < f->n; i++) {
		snprintf(f->link[i], sizeof f->link[i], "%s/%d", links, i);
		assert_int_equal(link(done_path(k->out, f->name[i]), f->link[i]), 0);
	}
}

/* Runs it again with `extra` (NULL: none): exit 0, stderr holding `says`, the same files as the
 * uninterrupted run. */
static void finish_run(const tool_run *run, const killed_run *k, const char *extra, const char *says)
{
	int st;
	run_to(run, k->out, extra, 0, k->err, &st);
	assert_exit(st, 0);
	assert_file_contains(k->err, says);
	assert_same_dirs(k->ref, k->out);
}

static int same_file(const char *a, const char *b)
{
	struct stat x, y;
	assert_int_equal(stat(a, &x), 0);
	assert_int_equal(stat(b, &y), 0);
	return x.st_dev == y.st_dev && x.st_ino == y.st_ino;
}

static void kill_and_resume(fixture *fx, const tool_run *run, int kill_after)
{
	killed_run k;
	kill_part_way(fx, run, kill_after, &k);
	char says[128];
	snprintf(says, sizeof says, "resumed: kept %d finished file%s, redid 0", kill_after,
		 kill_after == 1 ? "" : "s");
	finish_run(run, &k, "--resume", says);
	for (int i = 0; i < k.done.n; i++) /* kept, not written again */
		assert_true(same_file(path_in(k.out, k.done.name[i]), k.done.link[i]));
}

static tool_run convert_mp4(const fixture *fx)
{
	tool_run r = { "dsv3-convert", { "--hf-ckpt-path", fx->fp8, "--save-path", "OUT",
					  "--n-experts", "16", "--model-parallel", "4", "--threads",
					  "1", NULL } };
	return r;
}

static void test_convert_resumed_after_kill_is_byte_identical(void **state)
{
	fixture *fx = *state;
	tool_run r = convert_mp4(fx);
	kill_and_resume(fx, &r, 2);
}

static void test_convert_bf16_resumed_after_kill_is_byte_identical(void **state)
{
	fixture *fx = *state;
	tool_run r = { "dsv3-convert", { "--hf-ckpt-path", fx->fp8, "--save-path", "OUT",
					  "--n-experts", "16", "--model-parallel", "2", "--dtype",
					  "bf16", "--threads", "1", NULL } };
	kill_and_resume(fx, &r, 1);
}

static void test_shard_resumed_after_kill_is_byte_identical(void **state)
{
	fixture *fx = *state;
	tool_run r = { "dsv3-shard", { "--input", fx->mp4, "--save-path", "OUT",
					"--model-parallel", "2", "--threads", "1", NULL } };
	kill_and_resume(fx, &r, 1);
}

static void test_fp8_to_bf16_resumed_after_kill_is_byte_identical(void **state)
{
	fixture *fx = *state;
	tool_run r = { "dsv3-fp8-to-bf16", { "--input-fp8-hf-path", fx->fp8,
					      "--output-bf16-hf-path", "OUT", "--threads", "1",
					      NULL } };
	kill_and_resume(fx, &r, 2);
}

/* A finished file changed after the kill (same size) is found by its hash and written again. */
static void test_resume_redoes_a_finished_file_that_changed(void **state)
{
	fixture *fx = *state;
	tool_run r = convert_mp4(fx);
	killed_run k;
	kill_part_way(fx, &r, 2, &k);
	FILE *f = fopen(done_path(k.out, k.done.name[1]), "r+b");
	assert_non_null(f);
	fseek(f, -1, SEEK_END);
	int c = fgetc(f);
	fseek(f, -1, SEEK_END);
	fputc(c ^ 0x01, f);
	fclose(f);
	finish_run(&r, &k, "--resume", "resumed: kept 1 finished file, redid 1");
}

/* Resuming with r: refused, the interrupted run's finished file left as it was. */
static void assert_resume_refused(const tool_run *r, const killed_run *k)
{
	int st;
	run_to(r, k->out, "--resume", 0, k->err, &st);
	assert_exit(st, 1);
	assert_file_contains(k->err, "holds an interrupted run of other inputs or options");
	assert_true(same_file(done_path(k->out, k->done.name[0]), k->done.link[0]));
}

/* Other options or a changed input: refused; with the input as it was, resumed. */
static void test_resume_refuses_another_runs_journal(void **state)
{
	fixture *fx = *state;
	tool_run r = convert_mp4(fx);
	killed_run k;
	kill_part_way(fx, &r, 1, &k);
	tool_run other = r;
	other.args[7] = "2"; /* --model-parallel 2 */
	assert_resume_refused(&other, &k);
	const char *input = path_in(fx->fp8, "config.json");
	struct timespec times[2] = { { 0, UTIME_OMIT }, { 1000000000, 0 } };
	struct stat before;
	assert_int_equal(stat(input, &before), 0);
	assert_int_equal(utimensat(AT_FDCWD, input, times, 0), 0);
	assert_resume_refused(&r, &k);
	struct timespec back[2] = { { 0, UTIME_OMIT }, before.st_mtim };
	assert_int_equal(utimensat(AT_FDCWD, input, back, 0), 0);
	finish_run(&r, &k, "--resume", "resumed: kept 1 finished file, redid 0");
}

/* Without --resume the finished files are removed and everything is written again. */
static void test_run_without_resume_starts_over(void **state)
{
	fixture *fx = *state;
	tool_run r = convert_mp4(fx);
	killed_run k;
	kill_part_way(fx, &r, 2, &k);
	finish_run(&r, &k, NULL, "removed 2 finished files of an interrupted run");
	for (int i = 0; i < k.done.n; i++) /* written again */
		assert_false(same_file(path_in(k.out, k.done.name[i]), k.done.link[i]));
}

/* A kill inside the commit leaves some files under their final names: they are kept too. A
 * record cut short by the kill (no newline) is ignored. */
static void test_resume_survives_a_cut_commit_and_a_torn_record(void **state)
{
	fixture *fx = *state;
	tool_run r = convert_mp4(fx);
	killed_run k;
	kill_part_way(fx, &r, 2, &k);
	assert_int_equal(rename(done_path(k.out, k.done.name[0]), path_in(k.out, k.done.name[0])), 0);
	FILE *j = fopen(path_in(k.out, ".dsv3-resume"), "a");
	assert_non_null(j);
	fputs("file 0123", j);
	fclose(j);
	finish_run(&r, &k, "--resume", "resumed: kept 2 finished files, redid 0");
}

/* --resume with nothing to resume is a normal run. */
static void test_resume_into_an_empty_directory_runs_whole(void **state)
{
	fixture *fx = *state;
	tool_run r = convert_mp4(fx);
	const char *ref = fresh_path(fx->root, "ref"), *out = fresh_path(fx->root, "out");
	int st;
	run_to(&r, ref, NULL, 0, NULL, &st);
	assert_exit(st, 0);
	run_to(&r, out, "--resume", 0, NULL, &st);
	assert_exit(st, 0);
	assert_same_dirs(ref, out);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_convert_resumed_after_kill_is_byte_identical),
		cmocka_unit_test(test_convert_bf16_resumed_after_kill_is_byte_identical),
		cmocka_unit_test(test_shard_resumed_after_kill_is_byte_identical),
		cmocka_unit_test(test_fp8_to_bf16_resumed_after_kill_is_byte_identical),
		cmocka_unit_test(test_resume_redoes_a_finished_file_that_changed),
		cmocka_unit_test(test_resume_refuses_another_runs_journal),
		cmocka_unit_test(test_run_without_resume_starts_over),
		cmocka_unit_test(test_resume_survives_a_cut_commit_and_a_torn_record),
		cmocka_unit_test(test_resume_into_an_empty_directory_runs_whole),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
