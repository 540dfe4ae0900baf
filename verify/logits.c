/* dsv3-verify logits: the engine run teacher-forced over a golden file's token sequences, its
 * logits compared row by row with the reference's (DESIGN §6). Golden format: a safetensors
 * file with, per case, `<case>.tokens` (I64 [P+S]) and `<case>.logits` (F32 [S, V]), and the
 * metadata `<case>.prompt_len` (P) and `max_seq_len`; row s follows tokens[0 : P+s]. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "comm.h"
#include "cuda_model.h"
#include "model.h"
#include "verify.h"

/* DESIGN §6's limits: the CPU's fp32 path must match closely and pick the same top-1 token; the
 * GPU's bf16/FP8 arithmetic (tensor cores, other summation orders) only within rel-L2 and KL,
 * since near-ties of random weights may flip the argmax. */
typedef struct {
	double rel_l2, kl; /* kl < 0: not checked */
	int top1;          /* every row's argmax must agree */
	const char *text;
} limits;

static const limits cpu_limits = { 1e-4, -1, 1, "rel-L2 <= 1e-4 and top-1 100% (CPU fp32)" };
static const limits gpu_limits = { 2e-2, 1e-3, 0, "rel-L2 <= 2e-2 and KL <= 1e-3 (GPU)" };

typedef struct {
	double max_abs, rel_l2, kl; /* worst row */
	int rows, top1_agree;
} case_result;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " VERIFY_PROG " logits --ckpt-path DIR --golden FILE [--max-seq-len N]\n"
		"                          [--device cpu|cuda|auto] [--threads T] [--verbose]\n"
		"Runs the engine teacher-forced over every case of a golden file and compares its\n"
		"logits with the reference's: per case the worst row's max abs error, relative L2\n"
		"error and KL(ref||ours), and top-1 agreement.\n"
		"  --ckpt-path DIR    checkpoint (HF FP8/BF16 or converted model{r}-mp{N} shards)\n"
		"  --golden FILE      golden safetensors file\n"
		"  --max-seq-len N    engine max_seq_len (default: the golden file's max_seq_len)\n"
		"  --device D         cpu (default), cuda, or auto (cuda when built and a GPU is\n"
		"                     visible); the limits follow the device used\n"
		"  --threads T        worker threads (default: all cores)\n"
		"  --verbose          one line per row\n"
		"  --help, --version\n"
		"Limits (DESIGN §6): cpu rel-L2 <= 1e-4 and top-1 100%%; cuda rel-L2 <= 2e-2 and\n"
		"KL <= 1e-3 (top-1 reported, not required).\n"
		"Exit: 0 every case within the limits, 2 otherwise or bad input, 1 usage error,\n"
		"3 I/O error.\n");
}

static const char *metadata(const st_file *f, const char *key)
{
	for (size_t i = 0; i < f->n_metadata; i++)
		if (!strcmp(f->metadata[2 * i], key))
			return f->metadata[2 * i + 1];
	return NULL;
}

/* log-softmax of x[0:n] into out, in double. */
static void log_softmax(const float *x, int n, double *out)
{
	double max = x[0], sum = 0.0;
	for (int i = 1; i < n; i++)
		if (x[i] > max)
			max = x[i];
	for (int i = 0; i < n; i++)
		sum += exp((double)x[i] - max);
	for (int i = 0; i < n; i++)
		out[i] = (double)x[i] - max - log(sum);
}

static int argmax(const float *x, int n)
{
	int best = 0;
	for (int i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}

static void compare_row(const float *ref, const float *ours, int V, double *work,
			case_result *r, int verbose, int s)
{
	double diff2 = 0.0, ref2 = 0.0, max_abs = 0.0, kl = 0.0;
	for (int i = 0; i < V; i++) {
		double d = (double)ours[i] - ref[i];
		diff2 += d * d;
		ref2 += (double)ref[i] * ref[i];
		if (fabs(d) > max_abs || isnan(d))
			max_abs = isnan(d) ? INFINITY : fabs(d);
	}
	double *lr = work, *lo = work + V;
	log_softmax(ref, V, lr);
	log_softmax(ours, V, lo);
	for (int i = 0; i < V; i++)
		kl += exp(lr[i]) * (lr[i] - lo[i]);
	double rel = ref2 > 0 ? sqrt(diff2 / ref2) : sqrt(diff2);
	if (isnan(rel))
		rel = INFINITY;
	int agree = argmax(ref, V) == argmax(ours, V);
	r->max_abs = fmax(r->max_abs, max_abs);
	r->rel_l2 = fmax(r->rel_l2, rel);
	r->kl = fmax(r->kl, kl);
	r->top1_agree += agree;
	r->rows++;
	if (verbose)
		printf("  row %d: max_abs %.3e rel_l2 %.3e kl %.3e top1 %s\n", s, max_abs, rel, kl,
		       agree ? "same" : "DIFFERENT");
}

/* Checks one case's tensors against each other and the model; DSV3_EDATA naming them. */
static int case_shapes(const st_file *g, const char *name, const st_tensor *tok,
		       const st_tensor *lg, int vocab, int *P, int *S, dsv3_error *err)
{
	char key[300];
	snprintf(key, sizeof key, "%.256s.prompt_len", name);
	const char *p = metadata(g, key);
	if (!p)
		return dsv3_fail(err, DSV3_EDATA, "%s: metadata %s is missing", g->path, key);
	*P = atoi(p);
	if (!lg || lg->dtype != ST_F32 || lg->ndim != 2 || lg->shape[1] != vocab)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s.logits: want F32 [S, %d]", g->path,
				 name, vocab);
	*S = (int)lg->shape[0];
	if (tok->dtype != ST_I64 || tok->ndim != 1 || *P < 1 || tok->shape[0] != *P + *S)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s.tokens: want I64 [%d] (prompt_len %d + %d rows)",
				 g->path, name, *P + *S, *P, *S);
	return 0;
}

static int within(const case_result *r, const limits *lim)
{
	return r->rel_l2 <= lim->rel_l2 && (lim->kl < 0 || r->kl <= lim->kl) &&
	       (!lim->top1 || r->top1_agree == r->rows);
}

static int run_case(Model *m, const st_file *g, const st_tensor *tok, double *work,
		    int verbose, const limits *lim, case_result *r, dsv3_error *err)
{
	char name[256];
	int P = 0, S = 0, V = m->config.c.vocab_size;
	size_t len = strlen(tok->name) - strlen(".tokens");
	snprintf(name, sizeof name, "%.*s", (int)len, tok->name);
	char lname[300];
	snprintf(lname, sizeof lname, "%.256s.logits", name);
	int rc = case_shapes(g, name, tok, st_find(g, lname), V, &P, &S, err);
	if (rc)
		return rc;
	if (P + S - 1 > m->config.max_seq_len)
		return dsv3_fail(err, DSV3_EDATA, "%s: case %s needs %d positions, max_seq_len is %d",
				 g->path, name, P + S - 1, m->config.max_seq_len);
	const float *ref = (const float *)st_find(g, lname)->data;
	memset(r, 0, sizeof *r);
	for (int pos = 0; pos < P + S - 1; pos++) {
		int64_t t;
		memcpy(&t, tok->data + 8 * (size_t)pos, 8);
		if (t < 0 || t >= V)
			return dsv3_fail(err, DSV3_EDATA, "%s: %s[%d] = %lld is outside the vocabulary",
					 g->path, tok->name, pos, (long long)t);
		float *logits = forward(m, 0, (int)t, pos);
		int s = pos - (P - 1);
		if (s >= 0)
			compare_row(ref + (size_t)s * V, logits, V, work, r, verbose && comm_rank(m->comm) == 0, s);
	}
	int pass = within(r, lim);
	if (comm_rank(m->comm) == 0) /* GPU ranks as threads share stdout */
		printf("%s %s: rows %d max_abs %.3e rel_l2 %.3e kl %.3e top1 %d/%d\n",
		       pass ? "OK  " : "FAIL", name, r->rows, r->max_abs, r->rel_l2, r->kl,
		       r->top1_agree, r->rows);
	return 0;
}

/* A named GPU that is not there is a usage error, before anything is opened. */
static int parse_device(const char *name, model_device *device, dsv3_error *err)
{
	char why[256];
	int rc = model_device_parse(name, device, err);
	if (!rc && *device == MODEL_DEVICE_CUDA && !cuda_model_available(why, sizeof why))
		rc = dsv3_fail(err, DSV3_EUSAGE, "--device cuda: %s", why);
	return rc;
}

static int parse_args(int argc, char **argv, const char **ckpt, const char **golden,
		      int *max_seq, int *threads, model_device *device, int *verbose, int *done)
{
	static const struct option longopts[] = {
		{ "ckpt-path", required_argument, NULL, 'c' },
		{ "golden", required_argument, NULL, 'g' },
		{ "max-seq-len", required_argument, NULL, 'm' },
		{ "threads", required_argument, NULL, 't' },
		{ "device", required_argument, NULL, 'd' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	dsv3_error err = { 0 };
	int c, rc = 0;
	*done = 0;
	while (!rc && (c = getopt_long(argc, argv, "c:g:m:t:d:vhV", longopts, NULL)) != -1) {
		switch (c) {
		case 'c': *ckpt = optarg; break;
		case 'g': *golden = optarg; break;
		case 'm': rc = cli_parse_int(optarg, "--max-seq-len", 1, 1 << 24, max_seq, &err); break;
		case 't': rc = cli_parse_int(optarg, "--threads", 1, 4096, threads, &err); break;
		case 'v': *verbose = 1; break;
		case 'd': rc = parse_device(optarg, device, &err); break;
		case 'h': usage(stdout); *done = 1; return 0;
		case 'V': cli_print_version(VERIFY_PROG); *done = 1; return 0;
		default: rc = cli_bad_option(argv, &err);
		}
	}
	if (!rc)
		rc = cli_no_operands(argc, argv, &err);
	if (!rc && (!*ckpt || !*golden))
		rc = dsv3_fail(&err, DSV3_EUSAGE, "logits: --ckpt-path and --golden are required");
	if (rc) {
		dsv3_report(VERIFY_PROG, &err);
		usage(stderr);
	}
	return rc;
}

static int verify_cases(Model *m, const st_file *g, int verbose, const limits *lim, int *failed,
			dsv3_error *err)
{
	double *work = malloc(sizeof(double) * 2 * (size_t)m->config.c.vocab_size);
	int rc = 0, n = 0;
	if (!work)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	for (size_t i = 0; i < g->n_tensors && !rc; i++) {
		const st_tensor *t = &g->tensors[i];
		size_t len = strlen(t->name);
		if (len <= 7 || strcmp(t->name + len - 7, ".tokens"))
			continue;
		case_result r;
		rc = run_case(m, g, t, work, verbose, lim, &r, err);
		if (!rc && !within(&r, lim))
			(*failed)++;
		n++;
	}
	free(work);
	if (!rc && n == 0)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: no <case>.tokens tensor", g->path);
	return rc;
}

/* What every rank of a run needs. */
typedef struct {
	const char *ckpt;
	const st_file *g;
	int max_seq, threads, verbose;
	model_device device;
} logits_job;

/* One rank's run (the only one, or one of an mpirun job or of GPU threads): the model over its
 * shard, every case; rank 0 prints. */
static int run_rank(const logits_job *j, comm *c, int *failed, const limits **lim, dsv3_error *err)
{
	Model m;
	int rc = model_open_parallel(&m, j->ckpt, NULL, j->max_seq, 1, j->threads, j->device, c, err);
	if (rc)
		return rc;
	*lim = m.device == MODEL_DEVICE_CUDA ? &gpu_limits : &cpu_limits;
	if (comm_size(c) > 1 && comm_rank(c) == 0)
		printf("device %s, %d ranks, limits: %s\n", model_device_name(m.device), comm_size(c),
		       (*lim)->text);
	else if (comm_size(c) == 1)
		printf("device %s, limits: %s\n", model_device_name(m.device), (*lim)->text);
	rc = verify_cases(&m, j->g, j->verbose, *lim, failed, err);
	model_close(&m);
	return rc;
}

/* A GPU rank of this process (comm_nccl_run): rank 0's result is the exit status. */
static int gpu_rank(comm *c, void *arg)
{
	dsv3_error err = { 0 };
	const limits *lim = &gpu_limits;
	int failed = 0;
	if (run_rank(arg, c, &failed, &lim, &err))
		comm_fail(c, VERIFY_PROG, &err);
	if (failed && comm_rank(c) == 0)
		fprintf(stderr, VERIFY_PROG " logits: %d case(s) outside %s\n", failed, lim->text);
	return failed ? DSV3_EDATA : DSV3_OK;
}

int verify_logits(int argc, char **argv)
{
	const char *ckpt = NULL, *golden = NULL;
	int max_seq = 0, threads = 0, verbose = 0, done, failed = 0;
	model_device device = MODEL_DEVICE_CPU;
	int rc = parse_args(argc, argv, &ckpt, &golden, &max_seq, &threads, &device, &verbose, &done);
	if (rc || done)
		return rc;
	dsv3_error err = { 0 };
	st_file g;
	if ((rc = st_open(&g, golden, &err)))
		return dsv3_report(VERIFY_PROG, &err);
	const char *ms = metadata(&g, "max_seq_len");
	if (!max_seq && ms)
		max_seq = atoi(ms);
	/* Under mpirun every rank runs the same cases over its own shard (each reads the golden
	 * file) and gets the whole logits; rank 0 alone prints (every printf checks the rank, as
	 * GPU ranks that are threads share stdout). A failing rank ends them all. */
	comm *c = NULL;
	if ((rc = comm_open_mpi(&c, &err)))
		return dsv3_report(VERIFY_PROG, &err);
	logits_job job = { ckpt, &g, max_seq, threads, verbose, device };
	/* mp-N shards, --device cuda and N GPUs, no mpirun: N GPU ranks as threads of this
	 * process, each running what an mpirun rank runs. */
	int gpu_ranks = 1;
	if (!c && device == MODEL_DEVICE_CUDA && (rc = cuda_rank_threads(ckpt, &gpu_ranks, &err)))
		return dsv3_report(VERIFY_PROG, &err);
	if (gpu_ranks > 1) {
		int rank0_rc = 0;
		rc = comm_nccl_run(gpu_ranks, gpu_rank, &job, &rank0_rc, &err);
		st_close(&g);
		return rc ? dsv3_report(VERIFY_PROG, &err) : rank0_rc;
	}
	const limits *lim = &cpu_limits;
	rc = run_rank(&job, c, &failed, &lim, &err);
	st_close(&g);
	if (rc && comm_size(c) > 1)
		comm_fail(c, VERIFY_PROG, &err);
	comm_close(c);
	if (rc)
		return dsv3_report(VERIFY_PROG, &err);
	if (failed)
		fprintf(stderr, VERIFY_PROG " logits: %d case(s) outside %s\n", failed, lim->text);
	return failed ? DSV3_EDATA : DSV3_OK;
}
