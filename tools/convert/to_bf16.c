/* See to_bf16.h. The checks and the config rewrite follow dsv3-fp8-to-bf16 (fp8_cast.c), whose
 * output dsv3-convert would otherwise read. */
#include "to_bf16.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_json.h"

#define SCALE_SUFFIX "_scale_inv"

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int is_fp8_weight(const st_tensor *t)
{
	return t->dtype == ST_F8_E4M3 && !ends_with(t->name, SCALE_SUFFIX);
}

static int64_t ceil_div(int64_t a, int64_t b)
{
	return (a + b - 1) / b;
}

static const st_tensor *find_scale(const hf_ckpt *c, const char *name, size_t *file)
{
	char scale_name[1024];
	if ((size_t)snprintf(scale_name, sizeof scale_name, "%s%s", name, SCALE_SUFFIX) >=
	    sizeof scale_name)
		return NULL;
	return hf_ckpt_find(c, scale_name, file);
}

/* Counts the F8_E4M3 weights: the cast has something to do only when there is one. */
static size_t count_fp8_weights(const hf_ckpt *c)
{
	size_t n = 0;
	for (size_t f = 0; f < c->n_files; f++)
		for (size_t i = 0; i < c->files[f].n_tensors; i++)
			n += is_fp8_weight(&c->files[f].tensors[i]);
	return n;
}

/* The block size (quantization_config.weight_block_size, default 128x128) and the config text
 * the cast writes: the same JSON without quantization_config, 2-space indent, a newline. */
static int load_config(to_bf16 *b, const char *in_dir, dsv3_error *err)
{
	json_t *cfg;
	int rc = hf_config_load(in_dir, &cfg, err);
	if (!rc && !cfg)
		rc = dsv3_fail(err, DSV3_EDATA, "%s/config.json is missing", in_dir);
	if (!rc)
		rc = hf_config_block_size(cfg, &b->block_rows, &b->block_cols, in_dir, err);
	if (!rc) {
		json_object_del(cfg, "quantization_config");
		b->config_text = hf_config_text(cfg, &b->config_len);
		if (!b->config_text)
			rc = dsv3_fail(err, DSV3_EIO, "out of memory (config.json)");
	}
	json_decref(cfg);
	return rc;
}

/* One F8_E4M3 weight as the cast checks it. */
static void check_weight(const to_bf16 *b, const hf_ckpt *c, const st_file *f,
			 const st_tensor *t, problem_list *pr)
{
	if (t->ndim != 2) {
		problem_add(pr, "%s: tensor %s: F8_E4M3 weight is not 2-D (%d dims)", f->path,
			    t->name, t->ndim);
		return;
	}
	size_t sf;
	const st_tensor *s = find_scale(c, t->name, &sf);
	int64_t er = ceil_div(t->shape[0], b->block_rows), ec = ceil_div(t->shape[1], b->block_cols);
	if (!s)
		problem_add(pr, "%s: tensor %s: F8_E4M3 weight has no scale %s%s", f->path,
			    t->name, t->name, SCALE_SUFFIX);
	else if (s->dtype != ST_F32)
		problem_add(pr, "%s: tensor %s: scale %s in %s is %s, expected F32", f->path,
			    t->name, s->name, c->files[sf].path, dtype_name(s->dtype));
	else if (s->ndim != 2 || s->shape[0] != er || s->shape[1] != ec)
		problem_add(pr, "%s: tensor %s: scale %s in %s does not have shape [%lld, %lld]",
			    f->path, t->name, s->name, c->files[sf].path, (long long)er,
			    (long long)ec);
}

int to_bf16_prepare(to_bf16 *b, const hf_ckpt *c, const char *in_dir, problem_list *pr,
		    dsv3_error *err)
{
	memset(b, 0, sizeof *b);
	b->block_rows = b->block_cols = 128;
	b->cap_dq = count_fp8_weights(c);
	if (b->cap_dq == 0)
		return 0; /* already BF16: the normal conversion, config.json copied */
	b->active = 1;
	b->dq = calloc(b->cap_dq, sizeof *b->dq);
	if (!b->dq)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	int rc = load_config(b, in_dir, err);
	if (rc)
		return rc;
	for (size_t f = 0; f < c->n_files; f++)
		for (size_t i = 0; i < c->files[f].n_tensors; i++)
			if (is_fp8_weight(&c->files[f].tensors[i]))
				check_weight(b, c, &c->files[f], &c->files[f].tensors[i], pr);
	return 0;
}

int to_bf16_drops(const to_bf16 *b, const st_tensor *st)
{
	return b && b->active && ends_with(st->name, SCALE_SUFFIX);
}

void to_bf16_apply(to_bf16 *b, const hf_ckpt *c, const st_tensor *st, mp_tensor *t)
{
	if (!b || !b->active || !is_fp8_weight(st) || b->n_dq == b->cap_dq)
		return;
	size_t sf;
	const st_tensor *s = find_scale(c, st->name, &sf);
	if (!s)
		return; /* a problem already; nothing is written */
	mp_dequant *q = &b->dq[b->n_dq++];
	q->scale_file = &c->files[sf];
	q->scale = s;
	q->block_rows = b->block_rows;
	q->block_cols = b->block_cols;
	t->dtype = ST_BF16;
	t->dequant = q;
}

void to_bf16_free(to_bf16 *b)
{
	free(b->dq);
	free(b->config_text);
	memset(b, 0, sizeof *b);
}
