/* The list of problems a check found (see problems.h). */
#include "problems.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Room kept in err->msg for the heading and the "... and K more" line. */
#define MESSAGE_RESERVE 96

static int grow(problem_list *p, size_t need)
{
	if (need <= p->cap)
		return 0;
	size_t cap = p->cap ? 2 * p->cap : 32;
	while (cap < need)
		cap *= 2;
	char **l = realloc(p->lines, cap * sizeof *l);
	if (!l)
		return -1;
	p->lines = l;
	p->cap = cap;
	return 0;
}

void problem_add(problem_list *p, const char *fmt, ...)
{
	char buf[sizeof ((dsv3_error *)0)->msg];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (grow(p, p->n + 1) || !(p->lines[p->n] = strdup(buf))) {
		p->io = 1; /* cannot even record it: count it as a failure all the same */
		return;
	}
	p->n++;
}

void problem_add_error(problem_list *p, const dsv3_error *err)
{
	problem_add(p, "%s", err->msg);
	if (err->code == DSV3_EIO)
		p->io = 1;
}

void problem_list_take(problem_list *dst, problem_list *src)
{
	if (src->io)
		dst->io = 1;
	/* An empty src may have no lines array at all, which memcpy must not be given. */
	if (src->n && grow(dst, dst->n + src->n) != 0) {
		dst->io = 1; /* the lines are lost: count it as a failure all the same */
	} else if (src->n) {
		memcpy(dst->lines + dst->n, src->lines, src->n * sizeof *src->lines);
		dst->n += src->n;
		src->n = 0;
	}
	problem_list_free(src);
}

void problem_list_free(problem_list *p)
{
	for (size_t i = 0; i < p->n; i++)
		free(p->lines[i]);
	free(p->lines);
	memset(p, 0, sizeof *p);
}

int problem_list_exit_code(const problem_list *p)
{
	if (p->io)
		return DSV3_EIO;
	return p->n ? DSV3_EDATA : DSV3_OK;
}

int problem_list_report(const problem_list *p, const char *prog)
{
	for (size_t i = 0; i < p->n; i++) {
		if (prog)
			fprintf(stderr, "%s: %s\n", prog, p->lines[i]);
		else
			fprintf(stderr, "%s\n", p->lines[i]);
	}
	return problem_list_exit_code(p);
}

/* Appends "\n  line" for each line that fits, up to max_lines; a line too long to fit is left
 * out but a shorter one after it may still be listed. Returns how many were listed. */
static size_t list_lines(const problem_list *p, size_t max_lines, char *msg, size_t size)
{
	size_t shown = 0, used = strlen(msg), head = used;
	for (size_t i = 0; i < p->n; i++) {
		size_t len = strlen(p->lines[i]);
		if ((max_lines && shown >= max_lines) ||
		    (used - head) + len + 4 + MESSAGE_RESERVE > size)
			continue;
		used += (size_t)snprintf(msg + used, size - used, "\n  %s", p->lines[i]);
		shown++;
	}
	return shown;
}

int problem_list_to_error(const problem_list *p, size_t max_lines, dsv3_error *err)
{
	int code = problem_list_exit_code(p);
	if (code == DSV3_OK)
		return DSV3_OK;
	snprintf(err->msg, sizeof err->msg, "%zu problem%s found, nothing written:", p->n,
		 p->n == 1 ? "" : "s");
	size_t shown = list_lines(p, max_lines, err->msg, sizeof err->msg);
	if (p->n > shown) {
		size_t used = strlen(err->msg);
		snprintf(err->msg + used, sizeof err->msg - used, "\n  ... and %zu more",
			 p->n - shown);
	}
	err->code = code;
	return code;
}
