/* Shapes as messages print them. */
#include <stdio.h>

#include "verify.h"

void shape_text(int ndim, const int64_t *shape, char *buf, size_t len)
{
	size_t o = (size_t)snprintf(buf, len, "[");
	for (int d = 0; d < ndim && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)shape[d]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}
