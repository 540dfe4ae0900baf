/* dsv3-bf16-to-fp8: a BF16 (e.g. fine-tuned) DeepSeek checkpoint back to DeepSeek's FP8 layout,
 * the reverse of dsv3-fp8-to-bf16. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "error.h"
#include "quantise.h"

#define PROG "dsv3-bf16-to-fp8"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " --input-bf16-hf-path IN --output-fp8-hf-path OUT [--scale-fmt ue8m0]\n"
		"       [--threads T]\n"
		"\n"
		"Quantises the weights DeepSeek ships in FP8 (model.layers.*.*_proj.weight of attention,\n"
		"dense MLPs, shared and routed experts; not eh_proj, embeddings, lm_head, mlp.gate,\n"
		"norms or biases) of the BF16 Hugging Face checkpoint IN to F8_E4M3, each with a float32\n"
		"<name>_scale_inv of shape [ceil(rows/128), ceil(cols/128)] in the same file. Per\n"
		"128x128 block: s = max(max|x|, 1e-4) / 448 (float32), q = e4m3(x / s) rounded to\n"
		"nearest even. Other tensors and files are copied, the index gets the scales (each after\n"
		"its weight) and total_size, config.json gets quantization_config back; SHA256SUMS and\n"
		"tensors.sha256.json are added. An input already in FP8 is refused. Nothing appears\n"
		"under a final name unless the whole run succeeds.\n"
		"\n"
		"  -i, --input-bf16-hf-path IN    BF16 checkpoint (model.safetensors.index.json + files)\n"
		"  -o, --output-fp8-hf-path OUT   output directory (created if needed)\n"
		"  -s, --scale-fmt ue8m0          scales rounded up to powers of two (DeepSeek V3.1)\n"
		"  -t, --threads T                worker threads (default: all cores)\n"
		"  -h, --help                     this help\n"
		"  -V, --version                  print the version\n"
		"\n"
		"Exit: 0 done, 1 usage error, 2 bad input data, 3 I/O failure.\n");
}

static int parse_args(int argc, char **argv, quant_options *opt, int *done)
{
	static const struct option longopts[] = {
		{ "input-bf16-hf-path", required_argument, NULL, 'i' },
		{ "output-fp8-hf-path", required_argument, NULL, 'o' },
		{ "scale-fmt", required_argument, NULL, 's' },
		{ "threads", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	dsv3_error err = { 0 };
	int c;
	*done = 0;
	while ((c = getopt_long(argc, argv, "i:o:s:t:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 'i': opt->in_dir = optarg; break;
		case 'o': opt->out_dir = optarg; break;
		case 's':
			if (strcmp(optarg, "ue8m0") != 0) {
				dsv3_fail(&err, DSV3_EUSAGE,
					  "--scale-fmt %s: the only scale format is ue8m0", optarg);
				return dsv3_report(PROG, &err);
			}
			opt->ue8m0 = 1;
			break;
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
		fprintf(stderr, PROG ": --input-bf16-hf-path and --output-fp8-hf-path are required\n");
		usage(stderr);
		return DSV3_EUSAGE;
	}
	return 0;
}

int main(int argc, char **argv)
{
	quant_options opt = { 0 };
	int done;
	int rc = parse_args(argc, argv, &opt, &done);
	if (rc || done)
		return rc;
	problem_list problems = { 0 };
	quant_stats s;
	dsv3_error err = { 0 };
	rc = quant_run(&opt, &problems, &s, &err);
	problem_list_report(&problems, PROG);
	problem_list_free(&problems);
	if (rc)
		return dsv3_report(PROG, &err);
	double gb = (double)s.bytes_out / 1e9;
	fprintf(stderr,
		PROG ": %zu files, %zu tensors (%zu quantised to F8_E4M3 with scales%s), %zu other "
		"files; %.3f GB written to %s in %.2f s\n",
		s.files, s.tensors, s.quantised, opt.ue8m0 ? ", ue8m0" : "", s.other_files, gb,
		opt.out_dir, s.seconds);
	return 0;
}
