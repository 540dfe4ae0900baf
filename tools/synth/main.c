/* dsv3-synth: deterministic synthetic checkpoints in the Hugging Face layout, bit-identical on
 * every machine for the same arguments (DESIGN §6), for tests, demos, golden files, benchmarks. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "cli.h"
#include "config.h"
#include "error.h"
#include "model_layout.h"
#include "plan.h"
#include "presets.h"

#define PROG "dsv3-synth"

typedef struct {
	const char *preset, *config_path, *out, *dtype, *tokenizer_dir;
	const char *seed_text;
	uint64_t seed;
	int files; /* 0: default */
	int mtp;
	int threads;
} synth_args;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " (--preset NAME | --config FILE) --seed S --out DIR [options]\n"
		"Writes a deterministic synthetic DeepSeek checkpoint in the Hugging Face layout\n"
		"(config.json, model-*-of-*.safetensors, index, SHA256SUMS, tensors.sha256.json).\n"
		"\n"
		"  --preset NAME     a built-in config (below)\n"
		"  --config FILE     an HF config.json instead (written back out)\n"
		"  --seed S          PRNG seed (unsigned 64-bit); same arguments -> same bytes\n"
		"  --out DIR         output directory (created; files appear only when complete)\n"
		"  --files K         number of safetensors files (default 1 for tiny presets,\n"
		"                    else about 4.3 GB per file)\n"
		"  --dtype fp8|bf16  override the config's weight format\n"
		"  --mtp             include the multi-token-prediction layer\n"
		"  --tokenizer DIR   copy tokenizer.json and tokenizer_config.json from DIR\n"
		"  --threads N       worker threads (default: all cores)\n"
		"  --help, --version\n"
		"\n"
		"presets:\n");
	for (int i = 0; synth_preset_help[i]; i++)
		fprintf(f, "  %s\n", synth_preset_help[i]);
}

static int parse_seed(const char *s, uint64_t *out, dsv3_error *err)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-')
		return dsv3_fail(err, DSV3_EUSAGE, "--seed: bad value \"%s\"", s);
	*out = v;
	return 0;
}

/* Returns 0 to go on, -1 after --help/--version (exit 0), or an error code. */
static int parse_args(int argc, char **argv, synth_args *a, dsv3_error *err)
{
	static const struct option opts[] = {
		{ "preset", required_argument, NULL, 'p' }, { "config", required_argument, NULL, 'c' },
		{ "seed", required_argument, NULL, 's' },   { "out", required_argument, NULL, 'o' },
		{ "files", required_argument, NULL, 'f' },  { "dtype", required_argument, NULL, 'd' },
		{ "mtp", no_argument, NULL, 'm' },	    { "tokenizer", required_argument, NULL, 't' },
		{ "threads", required_argument, NULL, 'j' }, { "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },	    { NULL, 0, NULL, 0 },
	};
	memset(a, 0, sizeof *a);
	int c, rc = 0;
	opterr = 0;
	while (!rc && (c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'p': a->preset = optarg; break;
		case 'c': a->config_path = optarg; break;
		case 's': a->seed_text = optarg; rc = parse_seed(optarg, &a->seed, err); break;
		case 'o': a->out = optarg; break;
		case 'f': rc = cli_parse_int(optarg, "--files", 1, 1000000, &a->files, err); break;
		case 'd': a->dtype = optarg; break;
		case 'm': a->mtp = 1; break;
		case 't': a->tokenizer_dir = optarg; break;
		case 'j': rc = cli_parse_int(optarg, "--threads", 1, 1000000, &a->threads, err); break;
		case 'h': usage(stdout); return -1;
		case 'V': cli_print_version(PROG); return -1;
		default: return cli_bad_option(argv, err);
		}
	}
	if (!rc)
		rc = cli_no_operands(argc, argv, err);
	if (rc)
		return rc;
	if (!a->preset == !a->config_path)
		return dsv3_fail(err, DSV3_EUSAGE, "give exactly one of --preset and --config");
	if (!a->seed_text || !a->out)
		return dsv3_fail(err, DSV3_EUSAGE, "--seed and --out are required (see --help)");
	if (a->dtype && strcmp(a->dtype, "fp8") && strcmp(a->dtype, "bf16"))
		return dsv3_fail(err, DSV3_EUSAGE, "--dtype must be fp8 or bf16, not \"%s\"", a->dtype);
	return 0;
}

static int load_config_file(const char *path, json_t **config, dsv3_error *err)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return dsv3_fail_errno(err, "cannot open %s", path);
	json_error_t je;
	*config = json_loadf(f, 0, &je);
	fclose(f);
	if (!*config)
		return dsv3_fail(err, DSV3_EDATA, "%s: invalid JSON at line %d: %s", path, je.line,
				 je.text);
	if (!json_is_object(*config)) {
		json_decref(*config);
		*config = NULL;
		return dsv3_fail(err, DSV3_EDATA, "%s: not a JSON object", path);
	}
	return 0;
}

/* The config dict to write and its parsed form. */
static int make_config(const synth_args *a, char **text, dsv3_config *c, int *is_tiny,
		       dsv3_error *err)
{
	json_t *config = NULL;
	int rc;
	*is_tiny = 0;
	if (a->preset)
		rc = synth_preset(a->preset, &config, is_tiny, err);
	else
		rc = load_config_file(a->config_path, &config, err);
	if (!rc)
		rc = synth_config_override(config, a->dtype, a->mtp, err);
	/* 15 digits print 1e-6 as 1e-06, as Python does, and keep every value a config holds. */
	char *dump = rc ? NULL : json_dumps(config, JSON_INDENT(2) | JSON_REAL_PRECISION(15));
	json_decref(config);
	if (rc)
		return rc;
	size_t len = dump ? strlen(dump) : 0;
	*text = dump ? realloc(dump, len + 2) : NULL;
	if (!*text) {
		free(dump);
		return dsv3_fail(err, DSV3_EIO, "config: out of memory");
	}
	memcpy(*text + len, "\n", 2);
	return config_parse(c, *text, a->preset ? a->preset : a->config_path, err);
}

static int synth(const synth_args *a, dsv3_error *err)
{
	dsv3_config c;
	char *text = NULL;
	layout_tensor *tensors = NULL;
	int *file_of = NULL;
	size_t n = 0;
	int is_tiny;
	const char *label = a->preset ? a->preset : a->config_path;

	int rc = make_config(a, &text, &c, &is_tiny, err);
	if (!rc && model_layout(&c, c.n_mtp_layers > 0, &tensors, &n))
		rc = dsv3_fail(err, DSV3_EDATA, "%s: the config's sizes do not describe a model",
			       label);
	file_of = rc ? NULL : malloc(n * sizeof *file_of);
	if (!rc && !file_of)
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	uint64_t total = 0;
	for (size_t i = 0; !rc && i < n; i++)
		total += layout_tensor_bytes(&tensors[i]);
	int files = a->files ? a->files : synth_default_files(total, is_tiny);
	if (!rc)
		rc = synth_plan_files(tensors, n, files, file_of, err);
	if (!rc) {
		synth_job job = { .config = &c, .config_text = text, .tensors = tensors,
				  .n_tensors = n, .file_of = file_of, .n_files = files,
				  .seed = a->seed, .tokenizer_dir = a->tokenizer_dir,
				  .threads = a->threads };
		rc = synth_write_checkpoint(&job, a->out, err);
	}
	free(file_of);
	free(tensors);
	free(text);
	return rc;
}

int main(int argc, char **argv)
{
	synth_args a;
	dsv3_error err = { 0 };
	int rc = parse_args(argc, argv, &a, &err);
	if (rc < 0)
		return 0;
	if (!rc)
		rc = synth(&a, &err);
	return rc ? dsv3_report(PROG, &err) : 0;
}
