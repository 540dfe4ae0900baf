/* dsv3-verify: checks of checkpoints and of the engine's numbers. Each subcommand is one row
 * of the table below and one source file; adding one (e.g. `logits`) means adding a row. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "error.h"
#include "download.h"
#include "verify.h"

typedef struct {
	const char *name;
	const char *summary;
	int (*run)(int argc, char **argv); /* argv[0] is the subcommand's name */
} verify_command;

static const verify_command commands[] = {
	{ "checksums", "SHA256SUMS against the files and every logical tensor hash",
	  verify_checksums },
	{ "ckpt", "structure against config.json: tensors, dtypes, shapes, scale shapes, index",
	  verify_ckpt },
	{ "download", "a Hugging Face download: files, headers, index, hashes (tree or sums)",
	  verify_download },
	{ "logits", "the engine's logits against a golden file, teacher-forced (CPU or CUDA)",
	  verify_logits },
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void usage(FILE *f)
{
	fprintf(f, "usage: " VERIFY_PROG " COMMAND [OPTIONS] ARGS   (" VERIFY_PROG
		   " COMMAND --help for each)\n\ncommands:\n");
	for (size_t i = 0; i < N_COMMANDS; i++)
		fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
	fprintf(f, "\n  -h, --help     this help\n  -V, --version  print the version\n"
		   "\nExit: 0 all checks passed, 1 usage error, 2 a problem was found, 3 I/O error.\n");
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return DSV3_EUSAGE;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
		cli_print_version(VERIFY_PROG);
		return 0;
	}
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (!strcmp(cmd, commands[i].name))
			return commands[i].run(argc - 1, argv + 1);
	fprintf(stderr, VERIFY_PROG ": unknown command '%s'\n", cmd);
	usage(stderr);
	return DSV3_EUSAGE;
}
