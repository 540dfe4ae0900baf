/* Command-line plumbing shared by the tools (each keeps its own getopt_long table and usage):
 * integer flags with their range, --version, the usage errors every tool reports alike. */
#ifndef DSV3_CLI_H
#define DSV3_CLI_H

#include "error.h"

/* s as a decimal int in [min, max] into *out; otherwise DSV3_EUSAGE with a message naming
 * `flag` and s. */
int cli_parse_int(const char *s, const char *flag, int min, int max, int *out, dsv3_error *err);
/* Prints "PROG VERSION" on stdout (--version). */
void cli_print_version(const char *prog);
/* DSV3_EUSAGE for the option getopt_long just refused (argv[optind - 1]). */
int cli_bad_option(char **argv, dsv3_error *err);
/* DSV3_EUSAGE naming the first operand left after the options, or 0 when none is. */
int cli_no_operands(int argc, char **argv, dsv3_error *err);

#endif
