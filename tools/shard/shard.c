/* dsv3-shard: converted model{r}-mp{N}.safetensors -> model{r}-mp{M}.safetensors, byte-identical
 * to what dsv3-convert --model-parallel M writes from the original checkpoint. Each logical
 * tensor is put back together from the N ranks (row pieces in rank order, column pieces
 * side by side per row, replicated copies checked equal, experts from their owner) and split
 * again for M; the bytes stream from the mmapped inputs through lib/mp_shards. */
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli.h"
#include "config.h"
#include "convert_names.h"
#include "error.h"
#include "out_dir.h"
#include "hf_ckpt.h"
#include "manifest.h"
#include "mp_shards.h"
#include "tensor_rules.h"

#define PROG "dsv3-shard"

typedef struct {
	const char *in, *out;
	int mp, n_experts, threads;
	int resume;
} shard_args;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " --input IN --save-path OUT --model-parallel M [--n-experts E]\n"
		"                  [--resume] [--threads T]\n"
		"Reshards a converted checkpoint (model{r}-mp{N}.safetensors, any N) into M ranks,\n"
		"byte-identical to dsv3-convert --model-parallel M of the original; M = 1 merges.\n"
		"Copies config.json and the tokenizer files; writes SHA256SUMS and tensors.sha256.json.\n"
		"  --input IN            directory of model{r}-mp{N}.safetensors\n"
		"  --save-path OUT       output directory (nothing appears unless all succeeds)\n"
		"  --model-parallel M    number of output ranks\n"
		"  --n-experts E         routed experts (default: config.json, else counted)\n"
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

/* 0: run; -1: --help/--version printed; DSV3_EUSAGE otherwise. */
static int parse_args(int argc, char **argv, shard_args *a, dsv3_error *err)
{
	static const struct option opts[] = {
		{ "input", required_argument, 0, 'i' },
		{ "save-path", required_argument, 0, 'o' },
		{ "model-parallel", required_argument, 0, 'n' },
		{ "n-experts", required_argument, 0, 'e' },
		{ "threads", required_argument, 0, 't' },
		{ "resume", no_argument, 0, 'r' },
		{ "help", no_argument, 0, 'h' },
		{ "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	memset(a, 0, sizeof *a);
	a->mp = a->n_experts = -1;
	int c, rc = 0;
	opterr = 0;
	while (!rc && (c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'i': a->in = optarg; break;
		case 'o': a->out = optarg; break;
		case 'n': rc = parse_int(optarg, "--model-parallel", &a->mp, err); break;
		case 'e':
			rc = parse_int(optarg, "--n-experts", &a->n_experts, err);
			if (!rc && a->n_experts < 0)
				rc = dsv3_fail(err, DSV3_EUSAGE, "--n-experts must be >= 0");
			break;
		case 't': rc = parse_int(optarg, "--threads", &a->threads, err); break;
		case 'r': a->resume = 1; break;
		case 'h': usage(stdout); return -1;
		case 'V': cli_print_version(PROG); return -1;
		default: return cli_bad_option(argv, err);
		}
	}
	if (!rc)
		rc = cli_no_operands(argc, argv, err);
	if (rc)
		return rc;
	if (!a->in || !a->out || a->mp == -1)
		return dsv3_fail(err, DSV3_EUSAGE,
				 "--input, --save-path and --model-parallel are required (see --help)");
	if (a->mp < 1 || a->threads < 0)
		return dsv3_fail(err, DSV3_EUSAGE, "--model-parallel must be >= 1, --threads >= 0");
	return 0;
}

/* ---- the input ranks ---------------------------------------------------------------------- */

typedef struct {
	st_file *files; /* by rank */
	int n;		/* N of the input */
} rank_files;

static void rank_files_close(rank_files *rf)
{
	for (int r = 0; r < rf->n && rf->files; r++)
		st_close(&rf->files[r]);
	free(rf->files);
	rf->files = NULL;
}

/* "model{r}-mp{N}.safetensors" exactly; -1 otherwise. */
static int parse_rank_name(const char *name, int *r, int *n)
{
	int used = -1;
	if (sscanf(name, "model%d-mp%d.safetensors%n", r, n, &used) != 2 || used < 0 ||
	    name[used] != '\0' || *r < 0 || *n < 1 || *r >= *n)
		return -1;
	char canon[64];
	snprintf(canon, sizeof canon, "model%d-mp%d.safetensors", *r, *n);
	return strcmp(canon, name) == 0 ? 0 : -1; /* no "model01" or "+1" spellings */
}

/* N from the names; every rank 0..N-1 must be there. */
static int find_ranks(const char *in, char **names, size_t n_names, int *n, dsv3_error *err)
{
	*n = 0;
	const char *first = NULL;
	for (size_t i = 0; i < n_names; i++) {
		int r, k;
		if (parse_rank_name(names[i], &r, &k))
			return dsv3_fail(err, DSV3_EDATA, "%s/%s: not a model{rank}-mp{N}.safetensors name",
					 in, names[i]);
		if (*n && k != *n)
			return dsv3_fail(err, DSV3_EDATA, "%s: %s and %s belong to different splits", in,
					 first, names[i]);
		*n = k;
		first = names[i];
	}
	if (*n == 0)
		return dsv3_fail(err, DSV3_EDATA, "%s: no model{rank}-mp{N}.safetensors files", in);
	return 0;
}

static int open_ranks(const char *in, rank_files *rf, dsv3_error *err)
{
	char **names = NULL;
	size_t n_names = 0;
	memset(rf, 0, sizeof *rf);
	int rc = dir_glob(in, "model*-mp*.safetensors", &names, &n_names, err);
	int n = 0;
	if (!rc)
		rc = find_ranks(in, names, n_names, &n, err);
	if (!rc && !(rf->files = calloc((size_t)n, sizeof *rf->files)))
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	for (int r = 0; r < n && !rc; r++) {
		char path[4096];
		struct stat st;
		snprintf(path, sizeof path, "%s/model%d-mp%d.safetensors", in, r, n);
		if (stat(path, &st) != 0)
			rc = dsv3_fail(err, DSV3_EDATA, "%s: missing (rank %d of the %d ranks of %s)", path,
				       r, n, in);
		else if (!(rc = st_open(&rf->files[r], path, err)))
			rf->n = r + 1;
	}
	for (size_t i = 0; i < n_names; i++)
		free(names[i]);
	free(names);
	if (rc)
		rank_files_close(rf);
	return rc;
}

/* ---- planning ----------------------------------------------------------------------------- */

typedef struct {
	const char *name;
	int rank;
	const st_tensor *t;
} rank_entry;

typedef struct {
	mp_tensor *t;
	size_t n;
	mp_piece *pieces; /* pieces and copies of every tensor */
	rank_entry *entries;
	size_t n_entries;
	manifest expect; /* the input's tensors.sha256.json, when present */
	int has_expect;
} shard_plan;

static void plan_free(shard_plan *p)
{
	free(p->t);
	free(p->pieces);
	free(p->entries);
	if (p->has_expect)
		manifest_free(&p->expect);
}

static int cmp_entry(const void *a, const void *b)
{
	const rank_entry *x = a, *y = b;
	int c = strcmp(x->name, y->name);
	return c ? c : x->rank - y->rank;
}

static int collect_entries(const rank_files *rf, shard_plan *p)
{
	size_t total = 0;
	for (int r = 0; r < rf->n; r++)
		total += rf->files[r].n_tensors;
	p->entries = malloc((total ? total : 1) * sizeof *p->entries);
	p->pieces = malloc((total ? total : 1) * sizeof *p->pieces);
	p->t = malloc((total ? total : 1) * sizeof *p->t);
	if (!p->entries || !p->pieces || !p->t)
		return -1;
	for (int r = 0; r < rf->n; r++)
		for (size_t k = 0; k < rf->files[r].n_tensors; k++) {
			const st_tensor *t = &rf->files[r].tensors[k];
			p->entries[p->n_entries++] = (rank_entry){ t->name, r, t };
		}
	qsort(p->entries, p->n_entries, sizeof *p->entries, cmp_entry);
	return 0;
}

static int same_layout(const st_tensor *a, const st_tensor *b)
{
	return a->dtype == b->dtype && a->ndim == b->ndim &&
	       memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof a->shape[0]) == 0;
}

/* Group e[0..k) (one name, sorted by rank) must hold one entry per rank, all alike. */
static int check_on_every_rank(const rank_entry *e, size_t k, const rank_files *rf,
			       problem_list *pr)
{
	for (size_t i = 0; i < k; i++) {
		if (e[i].rank != (int)i) {
			problem_add(pr, "%s: tensor %s: missing (the other ranks have it)",
				    rf->files[i].path, e[0].name);
			return -1;
		}
		if (i > 0 && !same_layout(e[0].t, e[i].t)) {
			problem_add(pr, "%s: tensor %s: dtype or shape differs from rank 0's",
				    rf->files[i].path, e[0].name);
			return -1;
		}
	}
	if ((int)k != rf->n) {
		problem_add(pr, "%s: tensor %s: present on %zu of the %d ranks", rf->files[0].path,
			    e[0].name, k, rf->n);
		return -1;
	}
	return 0;
}

static void plan_expert(shard_plan *p, mp_tensor *t, const rank_entry *e, size_t k,
			const rank_files *rf, int n_experts, problem_list *pr)
{
	if (k != 1) {
		problem_add(pr, "%s: tensor %s: a routed expert, found on %zu ranks",
			    rf->files[e[0].rank].path, e[0].name, k);
		return;
	}
	int owner = n_experts > 0 && n_experts % rf->n == 0 && t->expert < n_experts
			    ? expert_rank(t->expert, n_experts, rf->n)
			    : e[0].rank; /* the count itself is reported by mp_check */
	if (owner != e[0].rank) {
		problem_add(pr, "%s: tensor %s: expert %d belongs on rank %d "
			    "(%d experts, %d ranks)", rf->files[e[0].rank].path,
			    e[0].name, t->expert, owner, n_experts, rf->n);
		return;
	}
	mp_piece *pc = &p->pieces[e - p->entries];
	*pc = (mp_piece){ &rf->files[e[0].rank], e[0].t };
	t->pieces = pc;
	t->n_pieces = 1;
	p->n++;
}

/* Split tensors: N pieces in rank order. Replicated ones: rank 0's bytes, the others copies. */
static void plan_spread(shard_plan *p, mp_tensor *t, const rank_entry *e, size_t k,
			const rank_files *rf, problem_list *pr)
{
	if (check_on_every_rank(e, k, rf, pr))
		return;
	mp_piece *pc = &p->pieces[e - p->entries];
	for (size_t i = 0; i < k; i++)
		pc[i] = (mp_piece){ &rf->files[i], e[i].t };
	t->pieces = pc;
	if (t->split_dim == SPLIT_NONE) {
		t->n_pieces = 1;
		t->copies = pc + 1;
		t->n_copies = (int)k - 1;
	} else if (t->split_dim >= t->ndim) {
		problem_add(pr, "%s: tensor %s: has %d dims, cannot be split along dim %d",
			    rf->files[0].path, e[0].name, t->ndim, t->split_dim);
		return;
	} else {
		t->n_pieces = (int)k;
		t->shape[t->split_dim] *= (int64_t)k;
	}
	p->n++;
}

static void plan_group(shard_plan *p, const rank_entry *e, size_t k, const rank_files *rf,
		       int n_experts, problem_list *pr)
{
	converted_name cn;
	if (converted_name_info(e[0].name, &cn) != 0) {
		problem_add(pr, "%s: tensor %s: not a converted tensor name",
			    rf->files[e[0].rank].path, e[0].name);
		return;
	}
	mp_tensor *t = &p->t[p->n];
	memset(t, 0, sizeof *t);
	strcpy(t->name, cn.name);
	t->dtype = e[0].t->dtype;
	t->ndim = e[0].t->ndim;
	memcpy(t->shape, e[0].t->shape, sizeof t->shape);
	t->split_dim = cn.split_dim;
	t->expert = cn.expert;
	if (t->expert >= 0)
		plan_expert(p, t, e, k, rf, n_experts, pr);
	else
		plan_spread(p, t, e, k, rf, pr);
}

/* E: --n-experts, else config.json's n_routed_experts, else the largest expert index + 1. */
static int experts_of(const shard_args *a, const shard_plan *p, int *n_experts, dsv3_error *err)
{
	char path[4096];
	struct stat st;
	snprintf(path, sizeof path, "%s/config.json", a->in);
	*n_experts = a->n_experts;
	if (*n_experts >= 0)
		return 0;
	if (stat(path, &st) == 0) {
		dsv3_config cfg;
		if (config_load(&cfg, path, err))
			return err->code = DSV3_EDATA;
		*n_experts = cfg.n_routed_experts;
		return 0;
	}
	*n_experts = 0;
	for (size_t i = 0; i < p->n_entries; i++) {
		converted_name cn;
		if (converted_name_info(p->entries[i].name, &cn) == 0 && cn.expert >= *n_experts)
			*n_experts = cn.expert + 1;
	}
	return 0;
}

static int cmp_manifest_name(const void *key, const void *m)
{
	return strcmp(key, ((const manifest_tensor *)m)->name);
}

static int cmp_manifest_tensor(const void *a, const void *b)
{
	return strcmp(((const manifest_tensor *)a)->name, ((const manifest_tensor *)b)->name);
}

/* The input's tensors.sha256.json, when there is one, must describe exactly these tensors; their
 * hashes are then checked as the bytes pass. */
static void match_input_manifest(shard_plan *p, const char *in, problem_list *pr)
{
	char path[4096];
	struct stat st;
	dsv3_error merr = { 0 };
	snprintf(path, sizeof path, "%s/tensors.sha256.json", in);
	if (stat(path, &st) != 0)
		return;
	if (manifest_read(&p->expect, in, &merr)) {
		problem_add(pr, "%s", merr.msg);
		return;
	}
	p->has_expect = 1;
	manifest *m = &p->expect;
	qsort(m->tensors, m->n_tensors, sizeof *m->tensors, cmp_manifest_tensor);
	for (size_t i = 0; i < p->n; i++) {
		mp_tensor *t = &p->t[i];
		const manifest_tensor *e = bsearch(t->name, m->tensors, m->n_tensors,
						   sizeof *m->tensors, cmp_manifest_name);
		if (!e)
			problem_add(pr, "%s: tensor %s: not listed in tensors.sha256.json", in,
				    t->name);
		else if (e->dtype != t->dtype || e->ndim != t->ndim ||
			 memcmp(e->shape, t->shape, (size_t)t->ndim * sizeof t->shape[0]) != 0)
			problem_add(pr, "%s: tensor %s: dtype or shape differs from "
				    "tensors.sha256.json", in, t->name);
		else
			t->expect_sha256 = e->sha256;
	}
	if (m->n_tensors > p->n)
		problem_add(pr, "%s: tensors.sha256.json lists %zu tensors, "
			    "the rank files hold %zu", in, m->n_tensors, p->n);
}

/* Every copy of a tensor against the rules of tensor_rules.h, in its own rank file (a weight's
 * scale shares the file); the number of problems added. */
static size_t check_rules(const rank_entry *e, size_t k, const rank_files *rf, problem_list *pr)
{
	size_t n = 0;
	for (size_t i = 0; i < k; i++)
		n += tensor_rules_check_converted(&rf->files[e[i].rank], e[i].t, pr);
	return n;
}

static int plan_shard(const shard_args *a, const rank_files *rf, shard_plan *p, int *n_experts,
		      dsv3_error *err)
{
	memset(p, 0, sizeof *p);
	if (collect_entries(rf, p))
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	int rc = experts_of(a, p, n_experts, err);
	if (rc)
		return rc;
	problem_list pr = { 0 };
	if (*n_experts % rf->n != 0)
		problem_add(&pr, "%s: %d experts cannot have been split among its %d ranks", a->in,
			    *n_experts, rf->n);
	for (size_t i = 0; i < p->n_entries;) {
		size_t k = 1;
		while (i + k < p->n_entries && !strcmp(p->entries[i].name, p->entries[i + k].name))
			k++;
		if (!check_rules(&p->entries[i], k, rf, &pr))
			plan_group(p, &p->entries[i], k, rf, *n_experts, &pr);
		i += k;
	}
	match_input_manifest(p, a->in, &pr);
	mp_check(p->t, p->n, a->mp, *n_experts, &pr);
	rc = problem_list_to_error(&pr, MP_MAX_PROBLEMS, err);
	problem_list_free(&pr);
	return rc;
}

/* ---- writing ------------------------------------------------------------------------------ */

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* What --resume compares: the options that shape the output and the input files. */
static int run_key(int mp, int n_experts, const char *in, uint8_t key[32], dsv3_error *err)
{
	char m[32], e[32];
	snprintf(m, sizeof m, "model-parallel=%d", mp);
	snprintf(e, sizeof e, "n-experts=%d", n_experts);
	const char *opts[] = { m, e };
	return resume_key(PROG, opts, 2, in, key, err);
}

int main(int argc, char **argv)
{
	shard_args a;
	dsv3_error err = { 0 };
	int rc = parse_args(argc, argv, &a, &err);
	if (rc < 0)
		return 0;
	if (rc)
		return dsv3_report(PROG, &err);
	if (out_dir_refuse_input(a.out, a.in, &err))
		return dsv3_report(PROG, &err);
	double start = now_seconds();
	rank_files rf;
	if (open_ranks(a.in, &rf, &err))
		return dsv3_report(PROG, &err);
	shard_plan p;
	int n_experts = 0;
	mp_stats stats = { 0 };
	size_t n_small = 0;
	rc = plan_shard(&a, &rf, &p, &n_experts, &err);
	mp_checkpoint mc = { .in_dir = a.in, .out = a.out, .mp = a.mp, .n_experts = n_experts,
			     .threads = a.threads, .resume = a.resume };
	if (!rc)
		rc = run_key(a.mp, n_experts, a.in, mc.run_key, &err);
	if (!rc)
		rc = mp_write_checkpoint(&mc, p.t, p.n, &stats, &n_small, &err);
	char line[160];
	resume_describe(&stats.resumed, line, sizeof line);
	if (*line)
		fprintf(stderr, PROG ": %s\n", line);
	plan_free(&p);
	rank_files_close(&rf);
	if (rc)
		return dsv3_report(PROG, &err);
	double secs = now_seconds() - start;
	fprintf(stderr, PROG ": mp%d -> mp%d: %zu model files + %zu other files, %.3f GB of tensors in "
		"%.2f s (%.0f MB/s)\n", rf.n, a.mp, stats.n_files, n_small,
		(double)stats.bytes_written / 1e9, secs,
		secs > 0 ? (double)stats.bytes_written / 1e6 / secs : 0.0);
	return 0;
}
