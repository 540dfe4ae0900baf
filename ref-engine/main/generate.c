/* dsv3-generate: text generation with the reference engine, with the official demo's flags
 * (generate.py: --ckpt-path --config --interactive --input-file --max-new-tokens --temperature)
 * plus --max-seq-len --seed --device --threads --dump-logits --tokenizer.
 *
 * Under mpirun each rank holds one shard (model_open_parallel); rank 0 alone reads the prompts,
 * samples and prints, and broadcasts what the others need (the prompt text, each chosen token),
 * so every rank makes the same forward calls. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "comm.h"
#include "cuda_model.h"
#include "error.h"
#include "model.h"
#include "safetensors.h"
#include "sampling.h"
#include "tokenizer.h"

#define PROG "dsv3-generate"

typedef struct {
	const char *ckpt, *config, *input_file, *dump_logits, *tokenizer;
	int interactive, max_new, max_seq_len, threads;
	model_device device;
	float temperature;
	uint64_t seed;
} options;

/* One sequence of a run: its tokens (prompt then generated) and its sampler. */
typedef struct {
	int32_t *tokens; /* [max_seq_len] */
	int n_prompt, n_gen, done;
	float *logits;   /* [vocab]: the next token's logits */
	float *dump;     /* [max_new, vocab] when --dump-logits */
	sampler smp;
} sequence;

typedef struct {
	Model m;
	dsv3_tokenizer *tok;
	const options *o;
	int vocab;
	float *probs; /* [vocab] sampling scratch */
	unsigned char *special; /* [tokenizer ids]: 1 for "special" added tokens, not printed */
	double prefill_s, decode_s;
	long prefill_n, decode_n; /* decode_n counts every sequence's tokens of a batched step */
	comm *comm;               /* the ranks of an mpirun job; NULL: one */
	double decode_comm_s;     /* of decode_s, the time inside collectives */
	long decode_steps;        /* forward / forward_batch calls while decoding */
} engine;

/* One decode step of the sequences still generating: forward_batch's arguments. */
typedef struct {
	int *seqs, *tokens, *pos; /* [n_seqs] */
} batch_step;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " PROG " --ckpt-path DIR (--input-file FILE | --interactive) [options]\n"
		"Generates text with the reference engine (CPU or CUDA) from a DeepSeek-V3/V2 checkpoint\n"
		"(an HF directory, FP8 or BF16, or converted model{r}-mp{N} shards), in DeepSeek-V3's\n"
		"chat format.\n"
		"  --ckpt-path DIR       checkpoint directory (with config.json)\n"
		"  --config FILE         accepted for the official demo's command lines; must have the same\n"
		"                        content as DIR/config.json, which is what the engine reads\n"
		"  --input-file FILE     one prompt per line (empty lines skipped), all run as one batch\n"
		"                        (each decode step feeds every unfinished prompt together);\n"
		"                        each is a user turn; prints Prompt:/Completion: per prompt\n"
		"  --interactive         chat on stdin, answers streamed; /clear resets, /exit quits\n"
		"  --max-new-tokens N    tokens to generate per answer (default 200)\n"
		"  --temperature T       0 = greedy; else the demo's sampling (default 0.2, as generate.py)\n"
		"  --max-seq-len N       KV cache length; also switches YaRN (default %d, as the demo)\n"
		"  --seed S              sampling seed, unsigned 64-bit (default 0)\n"
		"  --device D            cpu, cuda or auto (default: cuda when this build has it and a\n"
		"                        GPU is visible, else cpu); the device used is printed on stderr\n"
		"  --threads N           worker threads (default: all cores)\n"
		"  --dump-logits FILE    safetensors with seq{i}.logits F32 [steps, vocab] and seq{i}.tokens\n"
		"                        I64 [steps] of every generated step (batch mode)\n"
		"  --tokenizer DIR       tokenizer.json and tokenizer_config.json (default: --ckpt-path)\n"
		"  --help, --version\n"
		"Prefill and decode tokens/s are printed on stderr; decode counts the tokens of all\n"
		"sequences of a batched step.\n",
		MODEL_DEFAULT_MAX_SEQ_LEN);
}

static int parse_float(const char *s, const char *flag, float *out, dsv3_error *err)
{
	char *end;
	errno = 0;
	float v = strtof(s, &end);
	if (errno || end == s || *end || !(v >= 0) || isinf(v))
		return dsv3_fail(err, DSV3_EUSAGE, "%s: '%s' is not a number >= 0", flag, s);
	*out = v;
	return DSV3_OK;
}

static int parse_u64(const char *s, const char *flag, uint64_t *out, dsv3_error *err)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-')
		return dsv3_fail(err, DSV3_EUSAGE, "%s: '%s' is not an unsigned 64-bit integer", flag, s);
	*out = v;
	return DSV3_OK;
}

static int check_options(options *o, const char *device, dsv3_error *err)
{
	if (!o->ckpt)
		return dsv3_fail(err, DSV3_EUSAGE, "--ckpt-path DIR is required (try --help)");
	if (!o->input_file == !o->interactive)
		return dsv3_fail(err, DSV3_EUSAGE, "give exactly one of --input-file FILE and --interactive");
	int rc = model_device_parse(device, &o->device, err);
	if (rc)
		return rc;
	/* Asked for by name, a missing GPU is a usage error before anything is loaded. */
	char why[256];
	if (o->device == MODEL_DEVICE_CUDA && !cuda_model_available(why, sizeof why))
		return dsv3_fail(err, DSV3_EUSAGE, "--device cuda: %s", why);
	if (o->dump_logits && o->interactive)
		return dsv3_fail(err, DSV3_EUSAGE, "--dump-logits works with --input-file only");
	if (!o->tokenizer)
		o->tokenizer = o->ckpt;
	return DSV3_OK;
}

/* Returns 0 to run, -1 when --help/--version answered, or an error code. */
static int parse_options(int argc, char **argv, options *o, dsv3_error *err)
{
	static const struct option longopts[] = {
		{ "ckpt-path", required_argument, 0, 'c' },	 { "config", required_argument, 0, 'C' },
		{ "interactive", no_argument, 0, 'i' },		 { "input-file", required_argument, 0, 'f' },
		{ "max-new-tokens", required_argument, 0, 'n' }, { "temperature", required_argument, 0, 'T' },
		{ "max-seq-len", required_argument, 0, 'L' },	 { "seed", required_argument, 0, 's' },
		{ "device", required_argument, 0, 'D' },	 { "threads", required_argument, 0, 't' },
		{ "dump-logits", required_argument, 0, 'd' },	 { "tokenizer", required_argument, 0, 'k' },
		{ "help", no_argument, 0, 'h' },		 { "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	const char *device = "auto";
	int c, rc = 0;
	while (!rc && (c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'c': o->ckpt = optarg; break;
		case 'C': o->config = optarg; break;
		case 'i': o->interactive = 1; break;
		case 'f': o->input_file = optarg; break;
		case 'n': rc = cli_parse_int(optarg, "--max-new-tokens", 1, 1 << 30, &o->max_new, err); break;
		case 'T': rc = parse_float(optarg, "--temperature", &o->temperature, err); break;
		case 'L': rc = cli_parse_int(optarg, "--max-seq-len", 1, 1 << 30, &o->max_seq_len, err); break;
		case 's': rc = parse_u64(optarg, "--seed", &o->seed, err); break;
		case 'D': device = optarg; break;
		case 't': rc = cli_parse_int(optarg, "--threads", 1, 4096, &o->threads, err); break;
		case 'd': o->dump_logits = optarg; break;
		case 'k': o->tokenizer = optarg; break;
		case 'h': usage(stdout); return -1;
		case 'V': cli_print_version(PROG); return -1;
		default: return cli_bad_option(argv, err);
		}
	}
	if (!rc)
		rc = cli_no_operands(argc, argv, err);
	return rc ? rc : check_options(o, device, err);
}

/* Whole file into a malloc'ed NUL-terminated buffer. */
static int read_file(const char *path, char **out, size_t *len, dsv3_error *err)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return dsv3_fail_errno(err, "%s: cannot open", path);
	size_t cap = 4096, n = 0, r;
	char *buf = malloc(cap + 1);
	while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
		n += r;
		if (n == cap) {
			char *b = realloc(buf, 2 * cap + 1);
			if (!b)
				free(buf);
			buf = b, cap *= 2;
		}
	}
	int bad = !buf || ferror(f);
	fclose(f);
	if (bad) {
		free(buf);
		return dsv3_fail_errno(err, "%s: cannot read", path);
	}
	buf[n] = 0;
	*out = buf, *len = n;
	return DSV3_OK;
}

/* The engine reads DIR/config.json; --config is only accepted when it says the same. */
static int check_config_flag(const options *o, dsv3_error *err)
{
	if (!o->config)
		return DSV3_OK;
	char path[4096], *a = NULL, *b = NULL;
	size_t na, nb;
	snprintf(path, sizeof path, "%s/config.json", o->ckpt);
	int rc = read_file(o->config, &a, &na, err);
	if (!rc)
		rc = read_file(path, &b, &nb, err);
	if (!rc && (na != nb || memcmp(a, b, na)))
		rc = dsv3_fail(err, DSV3_EUSAGE, "--config %s differs from %s, which is the config the engine uses",
			       o->config, path);
	free(a);
	free(b);
	return rc;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Whether this rank writes to stdout: rank 0 alone (GPU ranks that are threads of one process
 * share its stdout; under mpirun the others' stdout is /dev/null as well). */
static int prints(const engine *e)
{
	return comm_rank(e->comm) == 0;
}

static void print_speed(const engine *e)
{
	if (comm_rank(e->comm) > 0)
		return;
	fprintf(stderr, "prefill: %ld tokens in %.3f s (%.1f tokens/s); decode: %ld tokens in %.3f s (%.1f tokens/s)\n",
		e->prefill_n, e->prefill_s, e->prefill_s > 0 ? e->prefill_n / e->prefill_s : 0.0, e->decode_n,
		e->decode_s, e->decode_s > 0 ? e->decode_n / e->decode_s : 0.0);
	if (comm_size(e->comm) > 1 && e->decode_steps > 0)
		fprintf(stderr, "decode collectives (rank 0): %.3f s, %.3f ms per decode step\n",
			e->decode_comm_s, 1e3 * e->decode_comm_s / (double)e->decode_steps);
}

/* Feeds tokens[from .. n_prompt) of sequence i (from < n_prompt) in chunks; keeps the last
 * logits. */
static void prefill(engine *e, int i, sequence *s, int from)
{
	double t0 = now_s();
	float *logits = forward_prompt(&e->m, i, s->tokens + from, s->n_prompt - from, from);
	memcpy(s->logits, logits, sizeof(float) * (size_t)e->vocab);
	e->prefill_s += now_s() - t0;
	e->prefill_n += s->n_prompt - from;
}

/* Samples the next token of s from its logits and appends it; s is done when the token is EOS
 * or no more may follow. Returns the token. */
static int32_t choose(engine *e, sequence *s)
{
	const options *o = e->o;
	int32_t t = 0;
	if (comm_rank(e->comm) == 0)
		t = sample_token(&s->smp, s->logits, e->vocab, o->temperature, e->probs);
	comm_broadcast(e->comm, &t, sizeof t, 0); /* rank 0's choice, whatever the others' logits */
	if (s->dump)
		memcpy(s->dump + (size_t)s->n_gen * e->vocab, s->logits, sizeof(float) * (size_t)e->vocab);
	int pos = s->n_prompt + s->n_gen;
	s->tokens[pos] = t;
	s->n_gen++;
	if (t == tokenizer_eos_id(e->tok) || s->n_gen == o->max_new || pos + 1 == e->m.config.max_seq_len)
		s->done = 1;
	return t;
}

/* Chooses the next token of sequence i and, unless it ends the sequence, feeds it. */
static int32_t step(engine *e, int i, sequence *s)
{
	int32_t t = choose(e, s);
	if (s->done)
		return t;
	double t0 = now_s(), c0 = comm_seconds(e->comm);
	memcpy(s->logits, forward(&e->m, i, t, s->n_prompt + s->n_gen - 1), sizeof(float) * (size_t)e->vocab);
	e->decode_s += now_s() - t0;
	e->decode_comm_s += comm_seconds(e->comm) - c0;
	e->decode_n++;
	e->decode_steps++;
	return t;
}

/* Appends to (*buf, *len, *cap) the text of id: nothing for a special token (EOS included), and
 * U+FFFD for ids the tokenizer lacks (vocab padding that random weights can pick). */
static int push_text(engine *e, tokenizer_stream *st, int32_t id, char **buf, size_t *len, size_t *cap,
		     dsv3_error *err)
{
	if (id >= 0 && id < tokenizer_n_ids(e->tok) && e->special[id])
		return DSV3_OK;
	if (id >= 0 && id < tokenizer_n_ids(e->tok))
		return tokenizer_stream_push(e->tok, st, id, buf, len, cap, err);
	int rc = tokenizer_stream_finish(st, buf, len, cap, err);
	if (rc)
		return rc;
	if (*len + 4 > *cap) {
		size_t c = 2 * *cap + 8;
		char *b = realloc(*buf, c);
		if (!b)
			return dsv3_fail(err, DSV3_EIO, "out of memory");
		*buf = b, *cap = c;
	}
	memcpy(*buf + *len, "\xef\xbf\xbd", 4);
	*len += 3;
	return DSV3_OK;
}

/* The text of the generated tokens of s, special tokens (EOS) excluded. */
static int completion_text(engine *e, const sequence *s, char **out, dsv3_error *err)
{
	tokenizer_stream st = { 0 };
	size_t len = 0, cap = 0;
	*out = NULL;
	int rc = 0;
	for (int k = 0; !rc && k < s->n_gen; k++) {
		rc = push_text(e, &st, s->tokens[s->n_prompt + k], out, &len, &cap, err);
	}
	if (!rc)
		rc = tokenizer_stream_finish(&st, out, &len, &cap, err);
	if (!rc && !*out)
		*out = calloc(1, 1);
	return rc;
}

static int encode_chat(engine *e, const chat_turn *turns, size_t n, int32_t **ids, size_t *n_ids, dsv3_error *err)
{
	char *text = chat_format_prompt(turns, n);
	if (!text)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	int rc = tokenizer_encode(e->tok, text, strlen(text), 0, ids, n_ids, err);
	free(text);
	return rc;
}

static int check_prompt_len(engine *e, size_t n, int which, dsv3_error *err)
{
	if (n < (size_t)e->m.config.max_seq_len)
		return DSV3_OK;
	return dsv3_fail(err, DSV3_EDATA,
			 "prompt %d is %zu tokens in the chat format, but --max-seq-len is %d (it must be longer than the prompt)",
			 which, n, e->m.config.max_seq_len);
}

/* Marks the added tokens of DIR/tokenizer.json that say "special": true; the demo decodes with
 * skip_special_tokens=True, so they are not printed. */
static int load_special(engine *e, const char *dir, dsv3_error *err)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/tokenizer.json", dir);
	json_error_t jerr;
	json_t *root = json_load_file(path, 0, &jerr);
	if (!root)
		return dsv3_fail(err, DSV3_EDATA, "%s: %s", path, jerr.text);
	int n = tokenizer_n_ids(e->tok);
	e->special = calloc((size_t)n, 1);
	json_t *added = json_object_get(root, "added_tokens"), *t;
	size_t i;
	json_array_foreach(added, i, t) {
		json_int_t id = json_integer_value(json_object_get(t, "id"));
		if (e->special && id >= 0 && id < n && json_is_true(json_object_get(t, "special")))
			e->special[id] = 1;
	}
	json_decref(root);
	return e->special ? DSV3_OK : dsv3_fail(err, DSV3_EIO, "out of memory");
}

static void engine_close(engine *e)
{
	free(e->probs);
	free(e->special);
	model_close(&e->m);
	tokenizer_close(e->tok);
}

static int engine_open(engine *e, const options *o, int n_seqs, comm *c, dsv3_error *err)
{
	memset(e, 0, sizeof *e);
	e->o = o;
	e->comm = c;
	int rc = tokenizer_open(&e->tok, o->tokenizer, err);
	if (rc)
		return rc;
	rc = load_special(e, o->tokenizer, err);
	if (rc) {
		tokenizer_close(e->tok);
		return rc;
	}
	rc = model_open_parallel(&e->m, o->ckpt, NULL, o->max_seq_len, n_seqs, o->threads,
				 o->device, c, err);
	if (rc) {
		free(e->special);
		tokenizer_close(e->tok);
		return rc;
	}
	if (comm_size(c) > 1 && comm_rank(c) == 0)
		fprintf(stderr, "device: %s, %d ranks\n", model_device_name(e->m.device),
			comm_size(c));
	else if (comm_size(c) == 1)
		fprintf(stderr, "device: %s\n", model_device_name(e->m.device));
	e->vocab = e->m.config.c.vocab_size;
	e->probs = malloc(sizeof(float) * (size_t)e->vocab);
	if (!e->probs)
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	else if (tokenizer_n_ids(e->tok) > e->vocab)
		rc = dsv3_fail(err, DSV3_EDATA, "%s: the tokenizer has %d ids but the checkpoint's vocab_size is %d",
			       o->tokenizer, (int)tokenizer_n_ids(e->tok), e->vocab);
	if (rc)
		engine_close(e);
	return rc;
}

static int seq_alloc(sequence *s, const engine *e, int dump)
{
	s->tokens = malloc(sizeof(int32_t) * (size_t)e->m.config.max_seq_len);
	s->logits = malloc(sizeof(float) * (size_t)e->vocab);
	s->dump = dump ? malloc(sizeof(float) * (size_t)e->o->max_new * e->vocab) : NULL;
	return s->tokens && s->logits && (!dump || s->dump);
}

static void seq_free(sequence *s)
{
	free(s->tokens);
	free(s->logits);
	free(s->dump);
}

/* ---- batch mode ---- */

/* Rank 0's text (*buf, *len, NUL-terminated) onto every rank (the others' *buf is malloc'ed). */
static int share_text(comm *c, char **buf, size_t *len, dsv3_error *err)
{
	uint64_t n = comm_rank(c) == 0 ? *len : 0;
	comm_broadcast(c, &n, sizeof n, 0);
	if (comm_rank(c) > 0) {
		*buf = malloc(n + 1);
		if (!*buf)
			return dsv3_fail(err, DSV3_EIO, "out of memory");
		(*buf)[n] = 0;
		*len = n;
	}
	comm_broadcast(c, *buf, n, 0);
	return 0;
}

/* Splits the file into its lines, stripped of surrounding whitespace, in place; empty lines are
 * skipped. */
static int read_prompts(comm *c, const char *path, char **buf, char ***lines, int *n,
			dsv3_error *err)
{
	size_t len;
	int rc = comm_rank(c) == 0 ? read_file(path, buf, &len, err) : 0;
	if (rc)
		return rc;
	if ((rc = share_text(c, buf, &len, err)))
		return rc;
	*n = 0;
	*lines = malloc(sizeof(char *) * (len + 1));
	if (!*lines)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	for (char *p = *buf, *nl; p && *p; p = nl ? nl + 1 : NULL) {
		nl = strchr(p, '\n');
		if (nl)
			*nl = 0;
		/* As the demo's line.strip() (ASCII whitespace). */
		while (*p && strchr(" \t\r\v\f", *p))
			p++;
		size_t l = strlen(p);
		while (l && strchr(" \t\r\v\f", p[l - 1]))
			p[--l] = 0;
		if (l)
			(*lines)[(*n)++] = p;
	}
	if (!*n)
		return dsv3_fail(err, DSV3_EDATA, "%s: no prompts (one per line)", path);
	return DSV3_OK;
}

static int write_dump(engine *e, sequence *seqs, int n, dsv3_error *err)
{
	st_spec *specs = calloc(2 * (size_t)n, sizeof *specs);
	char (*names)[32] = calloc(2 * (size_t)n, sizeof *names);
	int64_t *tok64 = malloc(sizeof(int64_t) * (size_t)e->o->max_new);
	st_writer *w = NULL;
	int rc = specs && names && tok64 ? 0 : dsv3_fail(err, DSV3_EIO, "out of memory");
	for (int i = 0; !rc && i < n; i++) {
		snprintf(names[2 * i], 32, "seq%d.logits", i);
		snprintf(names[2 * i + 1], 32, "seq%d.tokens", i);
		specs[2 * i] = (st_spec){ names[2 * i], ST_F32, 2, { seqs[i].n_gen, e->vocab } };
		specs[2 * i + 1] = (st_spec){ names[2 * i + 1], ST_I64, 1, { seqs[i].n_gen } };
	}
	if (!rc)
		rc = st_writer_open(&w, e->o->dump_logits, specs, 2 * (size_t)n, NULL, err);
	for (size_t pos = 0; !rc && pos < 2 * (size_t)n; pos++) {
		size_t k = st_writer_order(w, pos);
		sequence *s = &seqs[k / 2];
		if (k % 2 == 0) {
			rc = st_writer_write(w, s->dump, sizeof(float) * (size_t)s->n_gen * e->vocab, err);
			continue;
		}
		for (int j = 0; j < s->n_gen; j++)
			tok64[j] = s->tokens[s->n_prompt + j];
		rc = st_writer_write(w, tok64, sizeof(int64_t) * (size_t)s->n_gen, err);
	}
	if (!rc)
		rc = st_writer_finish(w, NULL, err);
	else
		st_writer_abort(w);
	free(specs);
	free(names);
	free(tok64);
	return rc;
}

/* Encodes each prompt as one user turn into its sequence. */
static int batch_setup(engine *e, char **lines, sequence *seqs, int n, dsv3_error *err)
{
	for (int i = 0; i < n; i++) {
		sequence *s = &seqs[i];
		if (!seq_alloc(s, e, e->o->dump_logits != NULL))
			return dsv3_fail(err, DSV3_EIO, "out of memory");
		sampler_init(&s->smp, e->o->seed, i);
		chat_turn turn = { CHAT_USER, lines[i] };
		int32_t *ids;
		size_t n_ids;
		int rc = encode_chat(e, &turn, 1, &ids, &n_ids, err);
		if (!rc)
			rc = check_prompt_len(e, n_ids, i + 1, err);
		if (!rc) {
			memcpy(s->tokens, ids, sizeof(int32_t) * n_ids);
			s->n_prompt = (int)n_ids;
		}
		free(ids);
		if (rc)
			return rc;
	}
	return DSV3_OK;
}

/* Chooses the next token of every unfinished sequence; those that go on are listed in b.
 * Returns how many. */
static int batch_choose(engine *e, sequence *seqs, int n, batch_step *b)
{
	int k = 0;
	for (int i = 0; i < n; i++) {
		if (seqs[i].done)
			continue;
		int32_t t = choose(e, &seqs[i]);
		if (seqs[i].done)
			continue;
		b->seqs[k] = i, b->tokens[k] = t, b->pos[k] = seqs[i].n_prompt + seqs[i].n_gen - 1;
		k++;
	}
	return k;
}

/* All sequences step together, one token each per round, until each has ended: one
 * forward_batch per round over those still generating, so each weight is read once a step. */
static void batch_generate(engine *e, sequence *seqs, int n, batch_step *b)
{
	size_t row = sizeof(float) * (size_t)e->vocab;
	for (int i = 0; i < n; i++)
		prefill(e, i, &seqs[i], 0);
	for (int k; (k = batch_choose(e, seqs, n, b)) > 0;) {
		double t0 = now_s(), c0 = comm_seconds(e->comm);
		float *logits = forward_batch(&e->m, k, b->seqs, b->tokens, b->pos);
		for (int j = 0; j < k; j++)
			memcpy(seqs[b->seqs[j]].logits, logits + (size_t)j * e->vocab, row);
		e->decode_s += now_s() - t0;
		e->decode_comm_s += comm_seconds(e->comm) - c0;
		e->decode_n += k;
		e->decode_steps++;
	}
}

static int batch_step_alloc(batch_step *b, int n)
{
	b->seqs = malloc(sizeof(int) * (size_t)n);
	b->tokens = malloc(sizeof(int) * (size_t)n);
	b->pos = malloc(sizeof(int) * (size_t)n);
	return b->seqs && b->tokens && b->pos;
}

static void batch_step_free(batch_step *b)
{
	free(b->seqs);
	free(b->tokens);
	free(b->pos);
}

static int batch_print(engine *e, char **lines, sequence *seqs, int n, dsv3_error *err)
{
	for (int i = 0; i < n; i++) {
		char *text;
		int rc = completion_text(e, &seqs[i], &text, err);
		if (rc)
			return rc;
		if (prints(e))
			printf("Prompt: %s\nCompletion: %s\n\n", lines[i], text);
		free(text);
	}
	return fflush(stdout) ? dsv3_fail_errno(err, "stdout: cannot write") : DSV3_OK;
}

static int run_batch(const options *o, comm *c, dsv3_error *err)
{
	char *buf = NULL, **lines = NULL;
	int n = 0;
	engine e;
	sequence *seqs = NULL;
	batch_step b = { 0 };
	int rc = read_prompts(c, o->input_file, &buf, &lines, &n, err);
	if (rc || (rc = engine_open(&e, o, n, c, err)))
		goto out_prompts;
	seqs = calloc((size_t)n, sizeof *seqs);
	if (!seqs || !batch_step_alloc(&b, n))
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	if (!rc)
		rc = batch_setup(&e, lines, seqs, n, err);
	if (!rc) {
		batch_generate(&e, seqs, n, &b);
		rc = batch_print(&e, lines, seqs, n, err);
		print_speed(&e);
	}
	if (!rc && o->dump_logits && comm_rank(c) == 0)
		rc = write_dump(&e, seqs, n, err);
	for (int i = 0; seqs && i < n; i++)
		seq_free(&seqs[i]);
	free(seqs);
	batch_step_free(&b);
	engine_close(&e);
out_prompts:
	free(lines);
	free(buf);
	return rc;
}

/* ---- interactive mode ---- */

typedef struct {
	chat_turn *turns;
	char **owned; /* the contents, malloc'ed */
	size_t n, cap;
} conversation;

static int conv_add(conversation *c, enum chat_role role, char *content)
{
	if (c->n == c->cap) {
		size_t cap = 2 * c->cap + 8;
		chat_turn *t = realloc(c->turns, cap * sizeof *t);
		if (t)
			c->turns = t;
		char **o = realloc(c->owned, cap * sizeof *o);
		if (o)
			c->owned = o;
		if (!t || !o)
			return -1;
		c->cap = cap;
	}
	c->owned[c->n] = content;
	c->turns[c->n++] = (chat_turn){ role, content };
	return 0;
}

static void conv_clear(conversation *c)
{
	for (size_t i = 0; i < c->n; i++)
		free(c->owned[i]);
	c->n = 0;
}

/* Streams the answer to the conversation so far; s->tokens[0 .. n_cached) is what the cache of
 * sequence 0 already holds, so only the new part of the prompt is fed. */
static int answer(engine *e, sequence *s, int *n_cached, const int32_t *ids, size_t n_ids, char **text,
		  dsv3_error *err)
{
	int same = 0;
	while (same < *n_cached && (size_t)same < n_ids && s->tokens[same] == ids[same])
		same++;
	/* The last prompt token is always fed, for its logits. */
	if ((size_t)same == n_ids)
		same--;
	memcpy(s->tokens, ids, sizeof(int32_t) * n_ids);
	s->n_prompt = (int)n_ids, s->n_gen = 0, s->done = 0;
	prefill(e, 0, s, same);
	tokenizer_stream st = { 0 };
	size_t len = 0, cap = 0, shown = 0;
	*text = NULL;
	int rc = 0;
	while (!rc && !s->done) {
		rc = push_text(e, &st, step(e, 0, s), text, &len, &cap, err);
		if (s->done && !rc)
			rc = tokenizer_stream_finish(&st, text, &len, &cap, err);
		if (!rc && len > shown) {
			if (prints(e)) {
				fwrite(*text + shown, 1, len - shown, stdout);
				fflush(stdout);
			}
			shown = len;
		}
	}
	/* The cache holds every fed token: the prompt and the generated ones but the last. */
	*n_cached = s->n_prompt + s->n_gen - 1;
	if (!rc && !*text)
		*text = calloc(1, 1);
	return rc;
}

static int chat_turn_run(engine *e, conversation *c, sequence *s, int *n_cached, dsv3_error *err)
{
	int32_t *ids;
	size_t n_ids;
	char *text = NULL;
	int rc = encode_chat(e, c->turns, c->n, &ids, &n_ids, err);
	if (!rc)
		rc = check_prompt_len(e, n_ids, (int)(c->n + 1) / 2, err);
	if (!rc)
		rc = answer(e, s, n_cached, ids, n_ids, &text, err);
	free(ids);
	if (prints(e)) {
		printf("\n");
		fflush(stdout);
	}
	print_speed(e);
	if (!rc && conv_add(c, CHAT_ASSISTANT, text)) {
		free(text);
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	}
	if (rc)
		free(text);
	return rc;
}

/* A line of stdin read by rank 0 and sent to every rank; -1 at the end of input. */
static ssize_t read_line(comm *c, char **line, size_t *cap)
{
	int64_t n = comm_rank(c) == 0 ? (int64_t)getline(line, cap, stdin) : 0;
	comm_broadcast(c, &n, sizeof n, 0);
	if (n < 0 || comm_size(c) == 1)
		return (ssize_t)n;
	if (comm_rank(c) > 0 && *cap < (size_t)n + 1) {
		char *grown = realloc(*line, (size_t)n + 1);
		if (!grown)
			comm_abort(c, DSV3_EIO);
		*line = grown;
		*cap = (size_t)n + 1;
	}
	comm_broadcast(c, *line, (size_t)n + 1, 0);
	return (ssize_t)n;
}

static int interact(engine *e, sequence *s, dsv3_error *err)
{
	conversation c = { 0 };
	char *line = NULL;
	size_t cap = 0;
	ssize_t n = 0;
	int n_cached = 0, rc = 0;
	while (!rc) {
		if (prints(e)) {
			printf(">>> ");
			fflush(stdout);
		}
		if ((n = read_line(e->comm, &line, &cap)) < 0)
			break;
		while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
			line[--n] = 0;
		if (!strcmp(line, "/exit"))
			break;
		if (!strcmp(line, "/clear")) {
			conv_clear(&c);
			continue;
		}
		if (!n)
			continue;
		char *content = strdup(line);
		if (!content || conv_add(&c, CHAT_USER, content)) {
			free(content);
			rc = dsv3_fail(err, DSV3_EIO, "out of memory");
			break;
		}
		e->prefill_s = e->decode_s = e->decode_comm_s = 0, e->prefill_n = e->decode_n = e->decode_steps = 0;
		rc = chat_turn_run(e, &c, s, &n_cached, err);
	}
	if (n < 0 && prints(e))
		printf("\n");
	free(line);
	conv_clear(&c);
	free(c.turns);
	free(c.owned);
	return rc;
}

static int run_interactive(const options *o, comm *c, dsv3_error *err)
{
	engine e;
	sequence s = { 0 };
	int rc = engine_open(&e, o, 1, c, err);
	if (rc)
		return rc;
	if (!seq_alloc(&s, &e, 0))
		rc = dsv3_fail(err, DSV3_EIO, "out of memory");
	sampler_init(&s.smp, o->seed, 0);
	if (!rc)
		rc = interact(&e, &s, err);
	seq_free(&s);
	engine_close(&e);
	return rc;
}

/* One GPU rank of this process (comm_nccl_run): the run of an mpirun rank; a failing rank
 * reports and ends every rank. */
static int run_rank(comm *c, void *arg)
{
	const options *o = arg;
	dsv3_error err = { 0 };
	int rc = o->interactive ? run_interactive(o, c, &err) : run_batch(o, c, &err);
	if (rc)
		comm_fail(c, PROG, &err);
	return 0;
}

int main(int argc, char **argv)
{
	options o = {
		.max_new = 200, .temperature = 0.2f, .max_seq_len = MODEL_DEFAULT_MAX_SEQ_LEN,
	};
	dsv3_error err = { 0 };
	int rc = parse_options(argc, argv, &o, &err);
	if (rc < 0)
		return 0;
	if (!rc)
		rc = check_config_flag(&o, &err);
	comm *c = NULL;
	if (!rc)
		rc = comm_open_mpi(&c, &err);
	/* mp-N shards, --device cuda and N GPUs, no mpirun: this process runs the N ranks, one
	 * thread per GPU, each through the same flow as a rank of an mpirun job. */
	int gpu_ranks = 1;
	if (!rc && !c && o.device == MODEL_DEVICE_CUDA)
		rc = cuda_rank_threads(o.ckpt, &gpu_ranks, &err);
	if (!rc && gpu_ranks > 1) {
		int rank0_rc = 0;
		rc = comm_nccl_run(gpu_ranks, run_rank, &o, &rank0_rc, &err);
		return rc ? dsv3_report(PROG, &err) : rank0_rc;
	}
	if (!rc)
		rc = o.interactive ? run_interactive(&o, c, &err) : run_batch(&o, c, &err);
	if (rc && comm_size(c) > 1)
		comm_fail(c, PROG, &err); /* every rank ends, not only this one */
	comm_close(c);
	return rc ? dsv3_report(PROG, &err) : 0;
}
