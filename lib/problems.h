/* Every problem a check found, one line each, so that a user sees them all at once and fixes
 * them in one go rather than one per run. Then either printed line by line (dsv3-verify,
 * dsv3-fp8-to-bf16) or folded into one dsv3_error message (dsv3-convert, dsv3-shard). */
#ifndef DSV3_PROBLEMS_H
#define DSV3_PROBLEMS_H
#include <stddef.h>
#include "error.h"

/* Starts as { 0 }. `io` is set when one of the problems was an I/O or system failure (or one
 * could not even be recorded for lack of memory): the exit code is then 3 rather than 2. */
typedef struct {
	char **lines;
	size_t n, cap;
	int io;
} problem_list;

void problem_add(problem_list *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Adds err's message as a problem, an I/O one when err->code is DSV3_EIO. */
void problem_add_error(problem_list *p, const dsv3_error *err);
/* Moves every line of src to the end of dst, and its I/O mark; src is left empty. */
void problem_list_take(problem_list *dst, problem_list *src);
void problem_list_free(problem_list *p);

/* DSV3_OK when the list is empty, DSV3_EIO when a problem was an I/O one, else DSV3_EDATA. */
int problem_list_exit_code(const problem_list *p);
/* Prints each problem on stderr as "prog: line" (just the line when prog is NULL); returns
 * problem_list_exit_code. */
int problem_list_report(const problem_list *p, const char *prog);
/* For tools that report through dsv3_report: when there are problems, err becomes
 *	N problem(s) found, nothing written:
 *	  line
 *	  ... and K more
 * listing at most max_lines of them (0: as many as fit in err->msg), and the return is
 * problem_list_exit_code. An empty list returns DSV3_OK and leaves err alone. */
int problem_list_to_error(const problem_list *p, size_t max_lines, dsv3_error *err);

#endif
