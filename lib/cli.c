#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "version.h"

int cli_parse_int(const char *s, const char *flag, int min, int max, int *out, dsv3_error *err)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < INT_MIN || v > INT_MAX)
		return dsv3_fail(err, DSV3_EUSAGE, "%s: not an integer: \"%s\"", flag, s);
	if (v < min || v > max)
		return dsv3_fail(err, DSV3_EUSAGE, "%s: %ld is out of range (%d to %d)", flag, v, min,
				 max);
	*out = (int)v;
	return 0;
}

void cli_print_version(const char *prog)
{
	printf("%s %s\n", prog, DSV3_VERSION);
}

int cli_bad_option(char **argv, dsv3_error *err)
{
	return dsv3_fail(err, DSV3_EUSAGE, "unknown option or missing value: %s (see --help)",
			 argv[optind - 1]);
}

int cli_no_operands(int argc, char **argv, dsv3_error *err)
{
	if (optind < argc)
		return dsv3_fail(err, DSV3_EUSAGE, "unexpected argument \"%s\"", argv[optind]);
	return 0;
}
