/* dsv3-plan: before anything runs, what a checkpoint needs: the weights each rank holds after
 * dsv3-convert --model-parallel N, the CUDA engine's KV cache and GPU memory per rank, the fewest
 * GPUs of a size that hold it, and the RAM and disk of each conversion tool. */
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "error.h"
#include "plan.h"

#define PROG "dsv3-plan"
#define MAX_GPUS 1024

typedef struct {
	const char *ckpt, *config;
	int mp, max_seq_len, batch, threads, json;
	double gpu_gib; /* 0: not given */
} plan_args;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " (--ckpt-path DIR | --config FILE) [--model-parallel N]\n"
		"                 [--max-seq-len L] [--batch B] [--gpu-memory GIB] [--threads T] [--json]\n"
		"What a DeepSeek checkpoint needs before anything runs: weight bytes per rank after\n"
		"dsv3-convert --model-parallel N (exact from the headers of DIR, from the config\n"
		"otherwise), the engine's KV cache and GPU memory per rank, the fewest GPUs of GIB\n"
		"that hold the model, and the peak RAM and output disk of dsv3-convert,\n"
		"dsv3-fp8-to-bf16 and dsv3-shard.\n"
		"  --ckpt-path DIR       a Hugging Face checkpoint (config.json, *.safetensors)\n"
		"  --config FILE         a config.json alone (tensor sizes from the model's layout)\n"
		"  --model-parallel N    ranks (default 1)\n"
		"  --max-seq-len L       KV cache length (default 16384, as dsv3-generate)\n"
		"  --batch B             sequences at once (default 1)\n"
		"  --gpu-memory GIB      GPU size in GiB: find the fewest GPUs that hold the model\n"
		"  --threads T           the tools' --threads (default: all cores)\n"
		"  --json                one JSON object instead of the table\n"
		"  --help, --version\n");
}

static int parse_gib(const char *s, double *v, dsv3_error *err)
{
	char *end;
	*v = strtod(s, &end);
	if (end == s || *end || !(*v > 0) || *v > 1e9)
		return dsv3_fail(err, DSV3_EUSAGE, "--gpu-memory: '%s' is not a positive number of GiB", s);
	return 0;
}

/* 0: run; -1: --help/--version printed; DSV3_EUSAGE otherwise. */
static int parse_args(int argc, char **argv, plan_args *a, dsv3_error *err)
{
	static const struct option opts[] = {
		{ "ckpt-path", required_argument, 0, 'c' },
		{ "config", required_argument, 0, 'f' },
		{ "model-parallel", required_argument, 0, 'n' },
		{ "max-seq-len", required_argument, 0, 'l' },
		{ "batch", required_argument, 0, 'b' },
		{ "gpu-memory", required_argument, 0, 'g' },
		{ "threads", required_argument, 0, 't' },
		{ "json", no_argument, 0, 'j' },
		{ "help", no_argument, 0, 'h' },
		{ "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	memset(a, 0, sizeof *a);
	a->mp = 1;
	a->max_seq_len = 16384;
	a->batch = 1;
	int c, rc = 0;
	opterr = 0;
	while (!rc && (c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'c': a->ckpt = optarg; break;
		case 'f': a->config = optarg; break;
		case 'n': rc = cli_parse_int(optarg, "--model-parallel", 1, MAX_GPUS, &a->mp, err); break;
		case 'l': rc = cli_parse_int(optarg, "--max-seq-len", 1, INT_MAX, &a->max_seq_len, err); break;
		case 'b': rc = cli_parse_int(optarg, "--batch", 1, INT_MAX, &a->batch, err); break;
		case 'g': rc = parse_gib(optarg, &a->gpu_gib, err); break;
		case 't': rc = cli_parse_int(optarg, "--threads", 1, 4096, &a->threads, err); break;
		case 'j': a->json = 1; break;
		case 'h': usage(stdout); return -1;
		case 'V': cli_print_version(PROG); return -1;
		default: return cli_bad_option(argv, err);
		}
	}
	if (!rc)
		rc = cli_no_operands(argc, argv, err);
	if (rc)
		return rc;
	if (!a->ckpt == !a->config)
		return dsv3_fail(err, DSV3_EUSAGE, "give one of --ckpt-path and --config (see --help)");
	if (!a->threads) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		a->threads = n > 0 ? (int)n : 1;
	}
	return 0;
}

typedef struct {
	uint64_t *w;      /* weight bytes per rank */
	uint64_t kv_token, kv, scratch;
	uint64_t gpu_max; /* the fullest rank's GPU memory */
	int min_gpus;     /* 0: none up to MAX_GPUS (or no --gpu-memory) */
	plan_tools tools;
} plan_result;

static uint64_t gpu_max(const plan_model *m, int mp, uint64_t kv, uint64_t scratch, uint64_t *w)
{
	plan_rank_weights(m, mp, w);
	uint64_t top = 0;
	for (int r = 0; r < mp; r++)
		top = w[r] > top ? w[r] : top;
	return top + kv + scratch;
}

/* The smallest N in 1, 2, 4, ... that convert can split to and whose fullest rank fits. */
static int fewest_gpus(const plan_model *m, const plan_result *res, double gib)
{
	uint64_t cap = (uint64_t)(gib * 1073741824.0);
	uint64_t *w = malloc(MAX_GPUS * sizeof *w);
	int found = 0;
	for (int n = 1; w && n <= MAX_GPUS && !found; n *= 2) {
		dsv3_error e = { 0 };
		if (plan_check_split(m, n, &e) == 0 &&
		    gpu_max(m, n, res->kv, res->scratch, w) <= cap)
			found = n;
	}
	free(w);
	return found;
}

static int compute(const plan_model *m, const plan_args *a, plan_result *res, dsv3_error *err)
{
	int rc = plan_check_split(m, a->mp, err);
	if (rc)
		return rc;
	res->w = malloc((size_t)a->mp * sizeof *res->w);
	if (!res->w)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	res->kv_token = plan_kv_bytes_per_token(&m->cfg);
	res->kv = res->kv_token * (uint64_t)a->max_seq_len * (uint64_t)a->batch;
	res->scratch = plan_gpu_scratch(m, a->max_seq_len);
	res->gpu_max = gpu_max(m, a->mp, res->kv, res->scratch, res->w);
	if (a->gpu_gib > 0)
		res->min_gpus = fewest_gpus(m, res, a->gpu_gib);
	return plan_tool_costs(m, a->mp, a->threads, &res->tools, err);
}

/* peak_ram_is_bound: the figure is an upper bound (threads interleave), not an estimate (only
 * dsv3-fp8-to-bf16 with several files in flight). */
static void print_tool(const char *name, uint64_t ram, int bound, uint64_t disk)
{
	printf("\"%s\": {\"peak_ram_bytes\": %" PRIu64 ", \"peak_ram_is_bound\": %s, "
	       "\"output_disk_bytes\": %" PRIu64 "}", name, ram, bound ? "true" : "false", disk);
}

static void print_json(const plan_model *m, const plan_args *a, const plan_result *r)
{
	uint64_t total = 0;
	printf("{\"source\": \"%s\", \"model_parallel\": %d, \"max_seq_len\": %d, \"batch\": %d, "
	       "\"threads\": %d,\n \"weight_bytes_per_rank\": [", a->ckpt ? "ckpt" : "config",
	       a->mp, a->max_seq_len, a->batch, a->threads);
	for (int i = 0; i < a->mp; i++) {
		printf("%s%" PRIu64, i ? ", " : "", r->w[i]);
		total += r->w[i];
	}
	printf("],\n \"weight_bytes_total\": %" PRIu64 ", \"input_bytes\": %" PRIu64 ",\n",
	       total, m->input_bytes);
	printf(" \"kv_cache_bytes_per_token\": %" PRIu64 ", \"kv_cache_bytes\": %" PRIu64 ",\n",
	       r->kv_token, r->kv);
	printf(" \"gpu_scratch_bytes\": %" PRIu64 ", \"gpu_bytes_per_rank\": [", r->scratch);
	for (int i = 0; i < a->mp; i++)
		printf("%s%" PRIu64, i ? ", " : "", r->w[i] + r->kv + r->scratch);
	printf("],\n \"gpu_bytes_max\": %" PRIu64 ",\n", r->gpu_max);
	if (a->gpu_gib > 0 && r->min_gpus)
		printf(" \"gpu_memory_gib\": %g, \"min_gpus\": %d,\n", a->gpu_gib, r->min_gpus);
	else if (a->gpu_gib > 0)
		printf(" \"gpu_memory_gib\": %g, \"min_gpus\": null,\n", a->gpu_gib);
	const plan_tools *t = &r->tools;
	printf(" \"tools\": {");
	print_tool("dsv3-convert", t->convert_ram, 0, t->convert_disk);
	printf(",\n  ");
	if (t->cast_disk)
		print_tool("dsv3-fp8-to-bf16", t->cast_ram, t->cast_ram_bound, t->cast_disk);
	else
		printf("\"dsv3-fp8-to-bf16\": null");
	printf(",\n  ");
	print_tool("dsv3-shard", t->shard_ram, 0, t->shard_disk);
	printf("}}\n");
}

static void row(const char *what, uint64_t bytes)
{
	printf("  %-36s %18" PRIu64 "  (%.2f GiB)\n", what, bytes, (double)bytes / 1073741824.0);
}

static void print_table(const plan_model *m, const plan_args *a, const plan_result *r)
{
	printf("%s: %s, %d layers, %d routed experts, %s\n", m->source, m->cfg.model_type,
	       m->cfg.n_layers, m->cfg.n_routed_experts, m->cfg.fp8 ? "FP8" : "BF16");
	printf("model-parallel %d, max-seq-len %d, batch %d, threads %d\n", a->mp, a->max_seq_len,
	       a->batch, a->threads);
	row("input tensors", m->input_bytes);
	for (int i = 0; i < a->mp; i++) {
		char label[64];
		snprintf(label, sizeof label, "weights of rank %d", i);
		row(label, r->w[i]);
	}
	row("KV cache per token (fp32)", r->kv_token);
	row("KV cache for L x B", r->kv);
	row("engine scratch per rank", r->scratch);
	row("GPU memory, fullest rank", r->gpu_max);
	if (a->gpu_gib > 0 && r->min_gpus)
		printf("  fewest GPUs of %g GiB: %d\n", a->gpu_gib, r->min_gpus);
	else if (a->gpu_gib > 0)
		printf("  fewest GPUs of %g GiB: none up to %d\n", a->gpu_gib, MAX_GPUS);
	const plan_tools *t = &r->tools;
	row("dsv3-convert peak RAM", t->convert_ram);
	row("dsv3-convert output disk", t->convert_disk);
	if (t->cast_disk) {
		row(t->cast_ram_bound ? "dsv3-fp8-to-bf16 peak RAM, at most"
				      : "dsv3-fp8-to-bf16 peak RAM", t->cast_ram);
		row("dsv3-fp8-to-bf16 output disk", t->cast_disk);
	}
	row("dsv3-shard peak RAM", t->shard_ram);
	row("dsv3-shard output disk", t->shard_disk);
}

int main(int argc, char **argv)
{
	plan_args a;
	dsv3_error err = { 0 };
	int rc = parse_args(argc, argv, &a, &err);
	if (rc < 0)
		return 0;
	if (rc)
		return dsv3_report(PROG, &err);
	plan_model m;
	rc = a.ckpt ? plan_from_ckpt(&m, a.ckpt, &err) : plan_from_config(&m, a.config, &err);
	plan_result res = { 0 };
	if (!rc)
		rc = compute(&m, &a, &res, &err);
	if (!rc && a.json)
		print_json(&m, &a, &res);
	else if (!rc)
		print_table(&m, &a, &res);
	free(res.w);
	plan_free(&m);
	return rc ? dsv3_report(PROG, &err) : 0;
}
