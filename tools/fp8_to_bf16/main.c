/* dsv3-fp8-to-bf16: DeepSeek's fp8_cast_bf16.py on the CPU, with bit-identical output. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "error.h"
#include "fp8_cast.h"

#define PROG "dsv3-fp8-to-bf16"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " --input-fp8-hf-path IN --output-bf16-hf-path OUT [--resume]\n"
		"                        [--threads T]\n"
		"\n"
		"Dequantises every F8_E4M3 weight of the Hugging Face checkpoint IN by its block scale\n"
		"(bf16(float(fp8) * weight_scale_inv[r/128][c/128]), as DeepSeek's fp8_cast_bf16.py)\n"
		"into OUT. Scales are dropped, other tensors and files copied, the index rewritten\n"
		"without the scales, config.json without quantization_config; SHA256SUMS and\n"
		"tensors.sha256.json are added. Nothing appears under a final name unless the whole\n"
		"run succeeds. A weight without its scale is refused (every one is listed).\n"
		"\n"
		"  -i, --input-fp8-hf-path IN     FP8 checkpoint (model.safetensors.index.json + files)\n"
		"  -o, --output-bf16-hf-path OUT  output directory (created if needed)\n"
		"      --resume                   take up an interrupted run into OUT: files it\n"
		"                                 finished are checked against their recorded\n"
		"                                 SHA-256 and kept, the rest written (same input)\n"
		"  -t, --threads T                worker threads (default: all cores)\n"
		"  -h, --help                     this help\n"
		"  -V, --version                  print the version\n"
		"\n"
		"Exit: 0 done, 1 usage error, 2 bad input data, 3 I/O failure.\n");
}

static int parse_args(int argc, char **argv, fp8_cast_options *opt, int *done)
{
	static const struct option longopts[] = {
		{ "input-fp8-hf-path", required_argument, NULL, 'i' },
		{ "output-bf16-hf-path", required_argument, NULL, 'o' },
		{ "threads", required_argument, NULL, 't' },
		{ "resume", no_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	dsv3_error err = { 0 };
	int c;
	*done = 0;
	while ((c = getopt_long(argc, argv, "i:o:t:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 'i': opt->in_dir = optarg; break;
		case 'o': opt->out_dir = optarg; break;
		case 'r': opt->resume = 1; break;
		case 't':
			if (cli_parse_int(optarg, "--threads", 1, 4096, &opt->threads, &err))
				return dsv3_report(PROG, &err);
			break;
		case 'h': usage(stdout); *done = 1; return 0;
		case 'V': cli_print_version(PROG); *done = 1; return 0;
		default: usage(stderr); return DSV3_EUSAGE;
		}
	}
	if (cli_no_operands(argc, argv, &err))
		return dsv3_report(PROG, &err);
	if (!opt->in_dir || !opt->out_dir) {
		fprintf(stderr, PROG ": --input-fp8-hf-path and --output-bf16-hf-path are required\n");
		usage(stderr);
		return DSV3_EUSAGE;
	}
	return 0;
}

static void print_summary(const fp8_cast_options *opt, const fp8_cast_stats *s)
{
	double gb = (double)s->bytes_out / 1e9;
	fprintf(stderr,
		PROG ": %zu files, %zu tensors (%zu dequantised to BF16, %zu scales dropped), "
		"%zu other files; %.3f GB written to %s in %.2f s (%.2f GB/s)\n",
		s->files, s->tensors, s->dequantised, s->scales_dropped, s->other_files, gb,
		opt->out_dir, s->seconds, s->seconds > 0 ? gb / s->seconds : 0.0);
}

int main(int argc, char **argv)
{
	fp8_cast_options opt = { 0 };
	int done;
	int rc = parse_args(argc, argv, &opt, &done);
	if (rc || done)
		return rc;
	problem_list problems = { 0 };
	fp8_cast_stats stats;
	dsv3_error err = { 0 };
	rc = fp8_cast_run(&opt, &problems, &stats, &err);
	char line[160];
	resume_describe(&stats.resumed, line, sizeof line);
	if (*line)
		fprintf(stderr, PROG ": %s\n", line);
	problem_list_report(&problems, PROG);
	problem_list_free(&problems);
	if (rc)
		return dsv3_report(PROG, &err);
	print_summary(&opt, &stats);
	return 0;
}
