/* The list of problems a check found: every one is reported, not just the first. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "verify.h"

void problem_add(problem_list *p, const char *fmt, ...)
{
	char buf[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (p->n == p->cap) {
		size_t cap = p->cap ? 2 * p->cap : 32;
		char **l = realloc(p->lines, cap * sizeof *l);
		if (!l) {
			p->io = 1; /* cannot even record it: count as a failure */
			return;
		}
		p->lines = l;
		p->cap = cap;
	}
	if ((p->lines[p->n] = strdup(buf)))
		p->n++;
	else
		p->io = 1;
}

void problem_add_error(problem_list *p, const dsv3_error *err)
{
	problem_add(p, "%s", err->msg);
	if (err->code == DSV3_EIO)
		p->io = 1;
}

void problem_list_free(problem_list *p)
{
	for (size_t i = 0; i < p->n; i++)
		free(p->lines[i]);
	free(p->lines);
	memset(p, 0, sizeof *p);
}

int problem_list_report(const problem_list *p)
{
	for (size_t i = 0; i < p->n; i++)
		fprintf(stderr, "%s\n", p->lines[i]);
	if (p->io)
		return DSV3_EIO;
	return p->n ? DSV3_EDATA : DSV3_OK;
}

void shape_text(int ndim, const int64_t *shape, char *buf, size_t len)
{
	size_t o = (size_t)snprintf(buf, len, "[");
	for (int d = 0; d < ndim && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)shape[d]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}
