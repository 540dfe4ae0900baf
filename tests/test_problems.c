/* lib/problems: the exit code a list stands for, the dsv3_error message with its line cap and
 * "... and N more", moving one list into another, and printing each line. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "problems.h"

static void test_problem_list_empty_is_ok_and_leaves_error_alone(void **state)
{
	(void)state;
	problem_list p = { 0 };
	dsv3_error err = { DSV3_EIO, "earlier" };
	assert_int_equal(problem_list_exit_code(&p), DSV3_OK);
	assert_int_equal(problem_list_to_error(&p, 20, &err), DSV3_OK);
	assert_int_equal(err.code, DSV3_EIO);
	assert_string_equal(err.msg, "earlier");
	problem_list_free(&p);
}

static void test_problem_list_data_problems_exit_2_io_problems_exit_3(void **state)
{
	(void)state;
	problem_list p = { 0 };
	dsv3_error data = { DSV3_EDATA, "a.safetensors: bad header" };
	dsv3_error io = { DSV3_EIO, "b.safetensors: cannot read: Input/output error" };
	problem_add(&p, "x: tensor %s: missing", "w");
	assert_int_equal(problem_list_exit_code(&p), DSV3_EDATA);
	problem_add_error(&p, &data);
	assert_int_equal(problem_list_exit_code(&p), DSV3_EDATA);
	problem_add_error(&p, &io);
	assert_int_equal(problem_list_exit_code(&p), DSV3_EIO);
	assert_int_equal(p.n, 3);
	assert_string_equal(p.lines[0], "x: tensor w: missing");
	assert_string_equal(p.lines[1], "a.safetensors: bad header");
	assert_string_equal(p.lines[2], "b.safetensors: cannot read: Input/output error");
	problem_list_free(&p);
	assert_int_equal(p.n, 0);
	assert_int_equal(p.io, 0);
}

static void test_problem_list_to_error_names_a_single_problem(void **state)
{
	(void)state;
	problem_list p = { 0 };
	dsv3_error err = { 0 };
	problem_add(&p, "in: no tensors to convert");
	assert_int_equal(problem_list_to_error(&p, 20, &err), DSV3_EDATA);
	assert_int_equal(err.code, DSV3_EDATA);
	assert_string_equal(err.msg, "1 problem found, nothing written:\n  in: no tensors to convert");
	problem_list_free(&p);
}

static void test_problem_list_to_error_caps_lines_and_counts_the_rest(void **state)
{
	(void)state;
	problem_list p = { 0 };
	dsv3_error err = { 0 };
	for (int i = 0; i < 25; i++)
		problem_add(&p, "problem %d", i);
	assert_int_equal(problem_list_to_error(&p, 20, &err), DSV3_EDATA);
	char want[sizeof err.msg] = "25 problems found, nothing written:";
	for (int i = 0; i < 20; i++)
		snprintf(want + strlen(want), sizeof want - strlen(want), "\n  problem %d", i);
	strcat(want, "\n  ... and 5 more");
	assert_string_equal(err.msg, want);
	problem_list_free(&p);
}

static void test_problem_list_to_error_with_an_io_problem_is_exit_3(void **state)
{
	(void)state;
	problem_list p = { 0 };
	dsv3_error err = { 0 };
	dsv3_error io = { DSV3_EIO, "out of memory" };
	problem_add(&p, "first");
	problem_add_error(&p, &io);
	assert_int_equal(problem_list_to_error(&p, 0, &err), DSV3_EIO);
	assert_int_equal(err.code, DSV3_EIO);
	assert_string_equal(err.msg, "2 problems found, nothing written:\n  first\n  out of memory");
	problem_list_free(&p);
}

/* Without a cap the lines stop where err->msg (2048 bytes) would overflow, keeping 96 bytes for
 * the heading and the "... and N more" line: 500-byte lines take 503 each ("\n  " + line), and
 * a fourth would need 3 * 503 + 504 + 96 = 2109 > 2048, so three are listed. */
static void test_problem_list_to_error_without_cap_lists_what_fits(void **state)
{
	(void)state;
	problem_list p = { 0 };
	dsv3_error err = { 0 };
	char line[501];
	memset(line, 'x', 500);
	line[500] = '\0';
	for (int i = 0; i < 10; i++)
		problem_add(&p, "%s", line);
	assert_int_equal(problem_list_to_error(&p, 0, &err), DSV3_EDATA);
	char want[sizeof err.msg] = "10 problems found, nothing written:";
	for (int i = 0; i < 3; i++)
		snprintf(want + strlen(want), sizeof want - strlen(want), "\n  %s", line);
	strcat(want, "\n  ... and 7 more");
	assert_string_equal(err.msg, want);
	problem_list_free(&p);
}

static void test_problem_list_take_appends_in_order_and_carries_io(void **state)
{
	(void)state;
	problem_list all = { 0 }, job = { 0 }, none = { 0 };
	problem_list_take(&all, &none);
	assert_int_equal(problem_list_exit_code(&all), DSV3_OK);
	problem_add(&all, "a");
	problem_add(&job, "b");
	problem_add(&job, "c");
	job.io = 1;
	problem_list_take(&all, &job);
	assert_int_equal(job.n, 0);
	assert_null(job.lines);
	assert_int_equal(all.n, 3);
	assert_string_equal(all.lines[0], "a");
	assert_string_equal(all.lines[1], "b");
	assert_string_equal(all.lines[2], "c");
	assert_int_equal(problem_list_exit_code(&all), DSV3_EIO);
	problem_list_free(&all);
}

/* Runs problem_list_report with stderr sent to a file; returns what it printed. */
static char *report_text(const problem_list *p, const char *prog, int *rc)
{
	char path[] = "/tmp/test_problems_XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	unlink(path);
	fflush(stderr);
	int saved = dup(STDERR_FILENO);
	dup2(fd, STDERR_FILENO);
	*rc = problem_list_report(p, prog);
	fflush(stderr);
	dup2(saved, STDERR_FILENO);
	close(saved);
	static char text[256];
	ssize_t n = pread(fd, text, sizeof text - 1, 0);
	close(fd);
	text[n > 0 ? n : 0] = '\0';
	return text;
}

static void test_problem_list_report_prints_each_line_with_optional_prog(void **state)
{
	(void)state;
	problem_list p = { 0 };
	int rc;
	assert_string_equal(report_text(&p, "dsv3-x", &rc), "");
	assert_int_equal(rc, DSV3_OK);
	problem_add(&p, "one");
	problem_add(&p, "two");
	assert_string_equal(report_text(&p, "dsv3-x", &rc), "dsv3-x: one\ndsv3-x: two\n");
	assert_int_equal(rc, DSV3_EDATA);
	assert_string_equal(report_text(&p, NULL, &rc), "one\ntwo\n");
	assert_int_equal(rc, DSV3_EDATA);
	problem_list_free(&p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_problem_list_empty_is_ok_and_leaves_error_alone),
		cmocka_unit_test(test_problem_list_data_problems_exit_2_io_problems_exit_3),
		cmocka_unit_test(test_problem_list_to_error_names_a_single_problem),
		cmocka_unit_test(test_problem_list_to_error_caps_lines_and_counts_the_rest),
		cmocka_unit_test(test_problem_list_to_error_with_an_io_problem_is_exit_3),
		cmocka_unit_test(test_problem_list_to_error_without_cap_lists_what_fits),
		cmocka_unit_test(test_problem_list_take_appends_in_order_and_carries_io),
		cmocka_unit_test(test_problem_list_report_prints_each_line_with_optional_prog),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
