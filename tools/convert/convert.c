/* dsv3-convert: a Hugging Face DeepSeek checkpoint -> model{r}-mp{N}.safetensors, the job of
 * DeepSeek's convert.py with byte-identical output files (DESIGN §3.3). Everything is checked
 * before anything is written; the tensors are then streamed from the mmapped inputs. With
 * --dtype bf16 the input is read as dsv3-fp8-to-bf16 would write it (to_bf16.h), so one pass
 * gives the shards of the cast followed by the conversion. */
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "config.h"
#include "convert_names.h"
#include "error.h"
#include "out_dir.h"
#include "hf_ckpt.h"
#include "mp_shards.h"
#include "tensor_rules.h"
#include "to_bf16.h"

#define PROG "dsv3-convert"

typedef struct {
	const char *in, *out;
	int n_experts, mp, keep_mtp, threads;
	int bf16; /* --dtype bf16 */
	int resume;
} convert_args;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " --hf-ckpt-path IN --save-path OUT --n-experts E --model-parallel N\n"
		"                    [--dtype fp8|bf16] [--keep-mtp] [--resume] [--threads T]\n"
		"Converts a Hugging Face DeepSeek checkpoint into N model-parallel files\n"
		"model{r}-mp{N}.safetensors, byte-identical to DeepSeek's convert.py, plus the\n"
		"tokenizer files, config.json, SHA256SUMS and tensors.sha256.json.\n"
		"  --hf-ckpt-path IN     input directory (config.json, *.safetensors)\n"
		"  --save-path OUT       output directory (created; nothing appears unless all succeeds)\n"
		"  --n-experts E         routed experts (must equal config.json's n_routed_experts)\n"
		"  --model-parallel N    number of ranks (N divides E and every split dimension)\n"
		"  --dtype bf16          FP8 weights dequantised to BF16 as they stream, scales\n"
		"                        dropped, config.json without quantization_config: the\n"
		"                        output of dsv3-fp8-to-bf16 then dsv3-convert, in one pass\n"
		"  --dtype fp8           tensors kept as stored (the default)\n"
		"  --keep-mtp            keep the multi-token-prediction layer (convert.py drops it)\n"
		"  --resume              take up an interrupted run into OUT: rank files it finished\n"
		"                        are checked against their recorded SHA-256 and kept, the\n"
		"                        rest written; same inputs and options required\n"
		"  --threads T           worker threads (default: all cores)\n"
		"  --help, --version\n");
}

/* Any int: the ranges are checked together once every flag is read. */
static int parse_int(const char *s, const char *flag, int *v, dsv3_error *err)
{
	return cli_parse_int(s, flag, INT_MIN, INT_MAX, v, err);
}

static int parse_dtype(const char *s, int *bf16, dsv3_error *err)
{
	if (strcmp(s, "bf16") != 0 && strcmp(s, "fp8") != 0)
		return dsv3_fail(err, DSV3_EUSAGE, "--dtype must be fp8 or bf16, not '%s'", s);
	*bf16 = strcmp(s, "bf16") == 0;
	return 0;
}

/* 0: run; -1: --help/--version printed; DSV3_EUSAGE otherwise. */
static int parse_args(int argc, char **argv, convert_args *a, dsv3_error *err)
{
	static const struct option opts[] = {
		{ "hf-ckpt-path", required_argument, 0, 'i' },
		{ "save-path", required_argument, 0, 'o' },
		{ "n-experts", required_argument, 0, 'e' },
		{ "model-parallel", required_argument, 0, 'n' },
		{ "keep-mtp", no_argument, 0, 'k' },
		{ "resume", no_argument, 0, 'r' },
		{ "dtype", required_argument, 0, 'd' },
		{ "threads", required_argument, 0, 't' },
		{ "help", no_argument, 0, 'h' },
		{ "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	memset(a, 0, sizeof *a);
	a->n_experts = a->mp = -1;
	int c, rc = 0;
	opterr = 0;
	while (!rc && (c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'i': a->in = optarg; break;
		case 'o': a->out = optarg; break;
		case 'e': rc = parse_int(optarg, "--n-experts", &a->n_experts, err); break;
		case 'n': rc = parse_int(optarg, "--model-parallel", &a->mp, err); break;
		case 'k': a->keep_mtp = 1; break;
		case 'r': a->resume = 1; break;
		case 'd': rc = parse_dtype(optarg, &a->bf16, err); break;
		case 't': rc = parse_int(optarg, "--threads", &a->threads, err); break;
		case 'h': usage(stdout); return -1;
		case 'V': cli_print_version(PROG); return -1;
		default: return cli_bad_option(argv, err);
		}
	}
	if (!rc)
		rc = cli_no_operands(argc, argv, err);
	if (rc)
		return rc;
	if (!a->in || !a->out || a->n_experts == -1 || a->mp == -1)
		return dsv3_fail(err, DSV3_EUSAGE, "--hf-ckpt-path, --save-path, --n-experts and "
				 "--model-parallel are required (see --help)");
	if (a->mp < 1 || a->n_experts < 0 || a->threads < 0)
		return dsv3_fail(err, DSV3_EUSAGE, "--model-parallel must be >= 1, --n-experts and "
				 "--threads >= 0");
	return 0;
}

/* "model.layers.N." -> N, as convert.py's test for the MTP layer reads the HF name; else -1. */
static long hf_layer(const char *name)
{
	static const char prefix[] = "model.layers.";
	if (strncmp(name, prefix, sizeof prefix - 1) != 0)
		return -1;
	char *end;
	long v = strtol(name + sizeof prefix - 1, &end, 10);
	return *end == '.' && end != name + sizeof prefix - 1 ? v : -1;
}

typedef struct {
	mp_tensor *t;
	mp_piece *pieces;
	size_t n;
} convert_plan;

static void plan_free(convert_plan *p)
{
	free(p->t);
	free(p->pieces);
}

/* One HF tensor -> one logical tensor of the plan, or a problem. */
static void plan_tensor(convert_plan *p, const st_file *f, const st_tensor *st,
			const dsv3_config *cfg, problem_list *pr, const hf_ckpt *c, to_bf16 *b)
{
	converted_name cn;
	long layer = hf_layer(st->name);
	int mtp_outside_mtp = hf_name_is_mtp_module(st->name) && layer < cfg->n_layers;
	if (convert_name(st->name, &cn) != 0 || mtp_outside_mtp) {
		problem_add(pr, "%s: tensor %s: unknown tensor name (its module is not in the "
			    "mapping of convert.py)", f->path, st->name);
		return;
	}
	mp_tensor *t = &p->t[p->n];
	mp_piece *pc = &p->pieces[p->n];
	memset(t, 0, sizeof *t);
	pc->file = f;
	pc->t = st;
	strcpy(t->name, cn.name);
	t->dtype = st->dtype;
	t->ndim = st->ndim;
	memcpy(t->shape, st->shape, sizeof t->shape);
	t->split_dim = cn.split_dim;
	t->expert = cn.expert;
	t->pieces = pc;
	t->n_pieces = 1;
	to_bf16_apply(b, c, st, t);
	p->n++;
}

static int cmp_by_name(const void *a, const void *b)
{
	const mp_tensor *x = *(mp_tensor *const *)a, *y = *(mp_tensor *const *)b;
	return strcmp(x->name, y->name);
}

/* convert.py would silently keep the last of two tensors with one converted name: refuse. */
static void check_duplicates(const convert_plan *p, problem_list *pr)
{
	mp_tensor **sorted = malloc((p->n ? p->n : 1) * sizeof *sorted);
	if (!sorted) {
		problem_add(pr, "out of memory");
		return;
	}
	for (size_t i = 0; i < p->n; i++)
		sorted[i] = &p->t[i];
	qsort(sorted, p->n, sizeof *sorted, cmp_by_name);
	for (size_t i = 1; i < p->n; i++)
		if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0)
			problem_add(pr, "%s: tensor %s: converts to %s, as does %s in %s",
				    sorted[i]->pieces->file->path, sorted[i]->pieces->t->name,
				    sorted[i]->name, sorted[i - 1]->pieces->t->name,
				    sorted[i - 1]->pieces->file->path);
	free(sorted);
}

/* Every check of convert.py and ours, all problems listed, before anything is created. */
static int plan_convert(const hf_ckpt *c, const dsv3_config *cfg, const convert_args *a,
			convert_plan *p, to_bf16 *b, dsv3_error *err)
{
	size_t total = 0;
	for (size_t i = 0; i < c->n_files; i++)
		total += c->files[i].n_tensors;
	memset(p, 0, sizeof *p);
	p->t = malloc((total ? total : 1) * sizeof *p->t);
	p->pieces = malloc((total ? total : 1) * sizeof *p->pieces);
	if (!p->t || !p->pieces)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	problem_list pr = { 0 };
	int rc = b ? to_bf16_prepare(b, c, a->in, &pr, err) : 0;
	if (rc) {
		problem_list_free(&pr);
		return rc;
	}
	/* With --dtype bf16 on FP8 input, to_bf16_prepare has checked every weight's scale. */
	unsigned rule_flags = b && b->active ? TENSOR_RULES_OWN_SCALE_CHECK : 0;
	if (a->n_experts != cfg->n_routed_experts)
		problem_add(&pr, "--n-experts %d, but %s/config.json has n_routed_experts %d",
			    a->n_experts, a->in, cfg->n_routed_experts);
	for (size_t i = 0; i < c->n_files; i++) {
		const st_file *f = &c->files[i];
		for (size_t k = 0; k < f->n_tensors; k++) {
			if (!a->keep_mtp && hf_layer(f->tensors[k].name) >= cfg->n_layers)
				continue; /* convert.py: if "model.layers.61" in name: continue */
			if (tensor_rules_check_hf(c, f, &f->tensors[k], rule_flags, &pr))
				continue; /* no rule for it: listed, not planned */
			if (to_bf16_drops(b, &f->tensors[k]))
				continue; /* the cast drops every scale */
			plan_tensor(p, f, &f->tensors[k], cfg, &pr, c, b);
		}
	}
	if (p->n == 0)
		problem_add(&pr, "%s: no tensors to convert", a->in);
	check_duplicates(p, &pr);
	mp_check(p->t, p->n, a->mp, a->n_experts, &pr);
	rc = problem_list_to_error(&pr, MP_MAX_PROBLEMS, err);
	problem_list_free(&pr);
	return rc;
}

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int load_config(const char *in, dsv3_config *cfg, dsv3_error *err)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/config.json", in);
	int rc = config_load(cfg, path, err);
	if (rc)
		err->code = DSV3_EDATA; /* a missing or unreadable config is bad input, not I/O */
	return rc ? DSV3_EDATA : 0;
}

/* What --resume compares: the options that shape the output and the input files. */
static int run_key(const convert_args *a, uint8_t key[32], dsv3_error *err)
{
	char mp[32], experts[32];
	snprintf(mp, sizeof mp, "model-parallel=%d", a->mp);
	snprintf(experts, sizeof experts, "n-experts=%d", a->n_experts);
	const char *opts[] = { mp, experts, a->bf16 ? "dtype=bf16" : "dtype=fp8",
			       a->keep_mtp ? "keep-mtp" : "drop-mtp" };
	return resume_key(PROG, opts, sizeof opts / sizeof *opts, a->in, key, err);
}

int main(int argc, char **argv)
{
	convert_args a;
	dsv3_error err = { 0 };
	int rc = parse_args(argc, argv, &a, &err);
	if (rc < 0)
		return 0;
	if (rc)
		return dsv3_report(PROG, &err);
	if (out_dir_refuse_input(a.out, a.in, &err))
		return dsv3_report(PROG, &err);
	double start = now_seconds();
	dsv3_config cfg;
	if (load_config(a.in, &cfg, &err))
		return dsv3_report(PROG, &err);
	hf_ckpt c;
	if (hf_ckpt_open(&c, a.in, &err))
		return dsv3_report(PROG, &err);
	convert_plan p;
	to_bf16 b = { 0 };
	mp_stats stats = { 0 };
	size_t n_small = 0;
	rc = plan_convert(&c, &cfg, &a, &p, a.bf16 ? &b : NULL, &err);
	mp_checkpoint mc = { .in_dir = a.in, .out = a.out, .mp = a.mp, .n_experts = a.n_experts,
			     .threads = a.threads, .config_text = b.config_text,
			     .config_len = b.config_len, .resume = a.resume };
	if (!rc)
		rc = run_key(&a, mc.run_key, &err);
	if (!rc)
		rc = mp_write_checkpoint(&mc, p.t, p.n, &stats, &n_small, &err);
	char line[160];
	resume_describe(&stats.resumed, line, sizeof line);
	if (*line)
		fprintf(stderr, PROG ": %s\n", line);
	plan_free(&p);
	to_bf16_free(&b);
	hf_ckpt_close(&c);
	if (rc)
		return dsv3_report(PROG, &err);
	double secs = now_seconds() - start;
	fprintf(stderr,
		PROG ": %zu model files + %zu other files, %.3f GB of tensors in %.2f s (%.0f MB/s)\n",
		stats.n_files, n_small, (double)stats.bytes_written / 1e9, secs,
		secs > 0 ? (double)stats.bytes_written / 1e6 / secs : 0.0);
	return 0;
}
