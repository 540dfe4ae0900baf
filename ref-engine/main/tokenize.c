/* dsv3-tokenize: text on stdin -> DeepSeek-V3 token ids on stdout (or back with --decode). */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "error.h"
#include "tokenizer.h"

#define PROG "dsv3-tokenize"

typedef struct {
	const char *dir;
	int bos;
	int decode;
} options;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " --tokenizer DIR [--bos] [--decode]\n"
		"Reads UTF-8 text on stdin and prints its token ids on one line, space-separated.\n"
		"  --tokenizer DIR  directory with tokenizer.json and tokenizer_config.json\n"
		"  --bos            start with the BOS token of tokenizer_config.json\n"
		"  --decode         read ids (whitespace-separated) and print their text instead\n"
		"                   (invalid UTF-8 in the decoded bytes is printed as U+FFFD)\n"
		"  --help, --version\n"
		"Invalid UTF-8 in the input is replaced by U+FFFD first, as Python's\n"
		"bytes.decode(\"utf-8\", \"replace\") does.\n");
}

/* Returns 0 to run, -1 when --help/--version answered, or an error code. */
static int parse_options(int argc, char **argv, options *o, dsv3_error *err)
{
	static const struct option longopts[] = {
		{ "tokenizer", required_argument, 0, 't' }, { "bos", no_argument, 0, 'b' },
		{ "decode", no_argument, 0, 'd' },	     { "help", no_argument, 0, 'h' },
		{ "version", no_argument, 0, 'V' },	     { 0, 0, 0, 0 },
	};
	int c;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 't': o->dir = optarg; break;
		case 'b': o->bos = 1; break;
		case 'd': o->decode = 1; break;
		case 'h': usage(stdout); return -1;
		case 'V': cli_print_version(PROG); return -1;
		default: return cli_bad_option(argv, err);
		}
	}
	int rc = cli_no_operands(argc, argv, err);
	if (!rc && !o->dir)
		rc = dsv3_fail(err, DSV3_EUSAGE, "--tokenizer DIR is required (try --help)");
	return rc;
}

static int read_stdin(char **out, size_t *len, dsv3_error *err)
{
	size_t cap = 1 << 16, n = 0, r;
	char *buf = malloc(cap + 1);
	while (buf && (r = fread(buf + n, 1, cap - n, stdin)) > 0) {
		n += r;
		if (n == cap) {
			char *b = realloc(buf, 2 * cap + 1);
			if (!b) {
				free(buf);
				buf = NULL;
			}
			buf = b, cap *= 2;
		}
	}
	if (!buf || ferror(stdin)) {
		free(buf);
		return dsv3_fail_errno(err, "stdin: cannot read");
	}
	buf[n] = 0;
	*out = buf, *len = n;
	return DSV3_OK;
}

static int run_encode(const dsv3_tokenizer *tok, const options *o, dsv3_error *err)
{
	char *text;
	size_t len, n = 0;
	int32_t *ids = NULL;
	int rc = read_stdin(&text, &len, err);
	if (!rc)
		rc = tokenizer_encode(tok, text, len, o->bos, &ids, &n, err);
	if (rc)
		return rc;
	for (size_t i = 0; i < n; i++)
		printf(i ? " %d" : "%d", (int)ids[i]);
	printf("\n");
	free(ids);
	free(text);
	return DSV3_OK;
}

/* Ids separated by whitespace; anything else, or an id out of range, is bad data. */
static int parse_ids(const char *text, int32_t n_ids, int32_t **out, size_t *n, dsv3_error *err)
{
	size_t cap = 64;
	int32_t *ids = malloc(cap * sizeof *ids);
	const char *p = text;
	*n = 0;
	while (ids) {
		char *end;
		while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
			p++;
		if (!*p)
			break;
		long v = strtol(p, &end, 10);
		if (end == p || (*end && !strchr(" \t\r\n", *end)) || v < 0 || v >= n_ids) {
			int l = (int)strcspn(p, " \t\r\n");
			free(ids);
			return dsv3_fail(err, DSV3_EDATA, "bad token id \"%.*s\" (ids are 0..%d)", l > 40 ? 40 : l, p,
					 (int)n_ids - 1);
		}
		if (*n == cap) {
			int32_t *b = realloc(ids, 2 * cap * sizeof *ids);
			if (!b)
				free(ids);
			ids = b, cap *= 2;
		}
		if (ids)
			ids[(*n)++] = (int32_t)v;
		p = end;
	}
	if (!ids)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	*out = ids;
	return DSV3_OK;
}

static int run_decode(const dsv3_tokenizer *tok, dsv3_error *err)
{
	char *text, *bytes, *shown;
	size_t len, n, bl, sl;
	int32_t *ids = NULL;
	int rc = read_stdin(&text, &len, err);
	if (!rc) {
		rc = parse_ids(text, tokenizer_n_ids(tok), &ids, &n, err);
		free(text);
	}
	if (rc)
		return rc;
	rc = tokenizer_decode(tok, ids, n, &bytes, &bl, err);
	free(ids);
	if (rc)
		return rc;
	shown = utf8_replace_invalid(bytes, bl, &sl);
	free(bytes);
	if (!shown)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	fwrite(shown, 1, sl, stdout);
	free(shown);
	return DSV3_OK;
}

int main(int argc, char **argv)
{
	options o = { 0 };
	dsv3_error err = { 0 };
	dsv3_tokenizer *tok;
	int rc = parse_options(argc, argv, &o, &err);

	if (rc < 0)
		return 0;
	if (rc)
		return dsv3_report(PROG, &err);
	rc = tokenizer_open(&tok, o.dir, &err);
	if (rc)
		return dsv3_report(PROG, &err);
	rc = o.decode ? run_decode(tok, &err) : run_encode(tok, &o, &err);
	tokenizer_close(tok);
	if (!rc && (fflush(stdout) || ferror(stdout)))
		rc = dsv3_fail_errno(&err, "stdout: cannot write");
	return rc ? dsv3_report(PROG, &err) : 0;
}
