/* Loading a checkpoint into Weights without copying: every weight_view points into the mapped
 * safetensors files. Tensors are looked up by their converted (model.py) names: an HF directory
 * is indexed through convert_name, converted shards model{r}-mp{N} are read rank by rank and a
 * tensor split over ranks becomes a view of N pieces (DESIGN §3.3's split dims). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert_names.h"
#include "hf_ckpt.h"
#include "model.h"
#include "model_load.h"

typedef struct {
	char name[160]; /* converted name */
	const st_tensor *t;
	const char *file;
} named_tensor;

struct model_files {
	const char *dir;
	int mp;            /* 0: HF layout */
	int only;          /* a tensor-parallel rank: only model{only}-mp{N} is opened; -1: all */
	int n_experts;
	hf_ckpt hf;        /* HF layout */
	st_file *ranks;    /* converted: model{r}-mp{N} */
	named_tensor *map; /* HF layout: sorted by converted name */
	size_t n_map;
	weight_piece *pieces; /* every view's pieces, one allocation */
	size_t n_pieces, cap_pieces;
};

static int cmp_named(const void *a, const void *b)
{
	return strcmp(((const named_tensor *)a)->name, ((const named_tensor *)b)->name);
}

static int index_hf(struct model_files *f, dsv3_error *err)
{
	size_t n = 0;
	for (size_t i = 0; i < f->hf.n_files; i++)
		n += f->hf.files[i].n_tensors;
	f->map = calloc(n ? n : 1, sizeof *f->map);
	if (!f->map)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", f->dir);
	for (size_t i = 0; i < f->hf.n_files; i++) {
		for (size_t k = 0; k < f->hf.files[i].n_tensors; k++) {
			const st_tensor *t = &f->hf.files[i].tensors[k];
			converted_name cn;
			if (convert_name(t->name, &cn) != 0)
				continue; /* not a tensor the engine reads */
			named_tensor *e = &f->map[f->n_map++];
			snprintf(e->name, sizeof e->name, "%s", cn.name);
			e->t = t;
			e->file = f->hf.file_names[i];
		}
	}
	qsort(f->map, f->n_map, sizeof *f->map, cmp_named);
	return 0;
}

/* Opens model{r}-mp{N}.safetensors for every r < N, N read from the first name found. */
static int open_ranks(struct model_files *f, char **names, size_t n, dsv3_error *err)
{
	int r0, mp;
	if (sscanf(names[0], "model%d-mp%d.safetensors", &r0, &mp) != 2 || mp < 1 || mp > 4096)
		return dsv3_fail(err, DSV3_EDATA, "%s: %s is not a model{r}-mp{N} name", f->dir,
				 names[0]);
	f->ranks = calloc((size_t)mp, sizeof *f->ranks);
	if (!f->ranks)
		return dsv3_fail(err, DSV3_EIO, "%s: out of memory", f->dir);
	f->mp = mp;
	for (int r = 0; r < mp; r++) {
		char want[64], path[4096];
		int found = 0;
		snprintf(want, sizeof want, "model%d-mp%d.safetensors", r, mp);
		for (size_t i = 0; i < n && !found; i++)
			found = !strcmp(names[i], want);
		if (!found)
			return dsv3_fail(err, DSV3_EDATA, "%s: %s is missing (%zu of %d rank files found)",
					 f->dir, want, n, mp);
		if (f->only >= 0 && r != f->only)
			continue; /* another rank's file: never mapped here */
		snprintf(path, sizeof path, "%s/%s", f->dir, want);
		int rc = st_open(&f->ranks[r], path, err);
		if (rc)
			return rc;
	}
	if (n != (size_t)mp)
		return dsv3_fail(err, DSV3_EDATA, "%s: %zu model*-mp*.safetensors files for mp %d",
				 f->dir, n, mp);
	return 0;
}

static int model_files_open(struct model_files **out, const char *dir, int only,
			    dsv3_error *err)
{
	struct model_files *f = calloc(1, sizeof *f);
	char **names = NULL;
	size_t n = 0;
	int rc;
	if (!f)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	f->dir = dir;
	f->only = only;
	*out = f;
	rc = dir_glob(dir, "model*-mp*.safetensors", &names, &n, err);
	if (rc)
		return rc;
	if (n > 0) {
		rc = open_ranks(f, names, n, err);
		if (!rc && only >= f->mp)
			rc = dsv3_fail(err, DSV3_EUSAGE, "%s: rank %d of a job, but the checkpoint has "
				       "%d rank files", dir, only, f->mp);
	} else if (only >= 0) {
		rc = dsv3_fail(err, DSV3_EUSAGE, "%s: several ranks need the converted shards "
			       "model{r}-mp{N}.safetensors (dsv3-convert --model-parallel N)", dir);
	} else {
		rc = hf_ckpt_open(&f->hf, dir, err);
		if (!rc)
			rc = index_hf(f, err);
	}
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	return rc;
}

static void model_files_close(struct model_files *f)
{
	if (!f)
		return;
	if (f->mp) {
		for (int r = 0; r < f->mp; r++)
			if (f->ranks[r].map)
				st_close(&f->ranks[r]);
		free(f->ranks);
	} else if (f->hf.dir) {
		hf_ckpt_close(&f->hf);
	}
	free(f->map);
	free(f->pieces);
	free(f);
}

/* The tensor `name` of rank r (HF layout: r is ignored); NULL when absent. */
static const st_tensor *find(const struct model_files *f, int r, const char *name,
			     const char **file)
{
	if (f->mp) {
		*file = f->ranks[r].path;
		return f->ranks[r].map ? st_find(&f->ranks[r], name) : NULL;
	}
	named_tensor key;
	snprintf(key.name, sizeof key.name, "%s", name);
	named_tensor *e = bsearch(&key, f->map, f->n_map, sizeof *f->map, cmp_named);
	*file = e ? e->file : f->dir;
	return e ? e->t : NULL;
}

static int tensor_rows(const st_tensor *t) { return t->ndim == 2 ? (int)t->shape[0] : 1; }
static int tensor_cols(const st_tensor *t)
{
	return t->ndim == 2 ? (int)t->shape[1] : (int)t->shape[0];
}

/* One piece from rank r: the weight and, for FP8, its scale of the matching grid. */
static int load_piece(struct model_files *f, int r, const char *prefix, weight_piece *p,
		      dsv3_error *err)
{
	char name[200];
	const char *file;
	snprintf(name, sizeof name, "%s.weight", prefix);
	const st_tensor *t = find(f, r, name, &file);
	if (!t)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s is missing", f->mp ? file : f->dir,
				 name);
	if (t->ndim < 1 || t->ndim > 2 ||
	    (t->dtype != ST_F8_E4M3 && t->dtype != ST_BF16 && t->dtype != ST_F32))
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: %s of %d dims, want F8_E4M3, BF16 or F32 of 1 or 2",
				 file, name, dtype_name(t->dtype), t->ndim);
	*p = (weight_piece){ t->dtype, tensor_rows(t), tensor_cols(t), t->data, NULL, 0 };
	if (t->dtype != ST_F8_E4M3)
		return 0;
	snprintf(name, sizeof name, "%s.scale", prefix);
	const st_tensor *s = find(f, r, name, &file);
	int sr = (p->rows + WEIGHT_BLOCK - 1) / WEIGHT_BLOCK, sc = (p->cols + WEIGHT_BLOCK - 1) / WEIGHT_BLOCK;
	if (!s)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s is missing (its weight is FP8)",
				 f->mp ? file : f->dir, name);
	if (s->dtype != ST_F32 || s->ndim != 2 || s->shape[0] != sr || s->shape[1] != sc)
		return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: want F32 [%d, %d]", file, name, sr, sc);
	p->scale = (const float *)s->data;
	p->scale_cols = sc;
	return 0;
}

static weight_piece *new_pieces(struct model_files *f, int n)
{
	if (f->n_pieces + (size_t)n > f->cap_pieces)
		return NULL;
	weight_piece *p = &f->pieces[f->n_pieces];
	f->n_pieces += (size_t)n;
	return p;
}

/* The view of `prefix` as a [rows, cols] matrix (rows 1 for a vector), from one rank or pieced
 * together from all of them. */
static int load_view(struct model_files *f, weight_view *w, const char *prefix, int rows,
		     int cols, dsv3_error *err)
{
	char name[200];
	converted_name cn;
	int rank = f->only >= 0 ? f->only : 0, n = 1, rc;
	snprintf(name, sizeof name, "%s.weight", prefix);
	w->split_dim = SPLIT_NONE;
	if (f->mp > 1 && converted_name_info(name, &cn) == 0) {
		if (cn.split_dim != SPLIT_NONE && cn.expert < 0) {
			w->split_dim = cn.split_dim;
			if (f->only < 0)
				n = f->mp;
			else if (cn.split_dim == 1) /* this rank's slice only */
				cols /= f->mp;
			else
				rows /= f->mp;
		}
		/* Experts live whole on their rank: a tensor-parallel rank holds only its own
		 * (the others stay empty views); merged, each is found where it is. */
		if (cn.expert >= 0 && f->only >= 0 &&
		    expert_rank(cn.expert, f->n_experts, f->mp) != f->only) {
			memset(w, 0, sizeof *w);
			w->split_dim = SPLIT_NONE;
			return 0;
		}
		if (cn.expert >= 0 && f->only < 0)
			rank = -1;
	}
	w->pieces = new_pieces(f, n);
	if (!w->pieces)
		return dsv3_fail(err, DSV3_EIO, "%s: too many weight pieces", f->dir);
	w->n_pieces = n;
	w->rows = rows;
	w->cols = cols;
	if (rank < 0) {
		const char *file;
		for (rank = 0; rank < f->mp && !find(f, rank, name, &file); rank++)
			;
		if (rank == f->mp)
			return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s is in no rank's file", f->dir, name);
	}
	int sum = 0;
	for (int i = 0; i < n; i++) {
		rc = load_piece(f, n > 1 ? i : rank, prefix, &w->pieces[i], err);
		if (rc)
			return rc;
		const weight_piece *p = &w->pieces[i];
		int along = w->split_dim == 1 ? p->cols : p->rows;
		int other = w->split_dim == 1 ? p->rows : p->cols;
		sum += along;
		if (other != (w->split_dim == 1 ? rows : cols))
			goto shape;
	}
	if (sum != (w->split_dim == 1 ? cols : rows))
		goto shape;
	return 0;
shape:;
	const char *file;
	const st_tensor *t = find(f, n > 1 ? 0 : rank, name, &file);
	return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s%s%s%s: shape [%d, %d] expected from the config, found [%d, %d]%s",
			 f->mp ? f->dir : file, name, f->mp ? "" : " (", f->mp ? "" : t->name,
			 f->mp ? "" : ")", rows, cols, n > 1 && w->split_dim == 1 ? rows : sum,
			 n > 1 && w->split_dim == 1 ? sum : w->pieces[0].cols,
			 n > 1 ? " (all ranks' pieces together)" : "");
}

static int load_mlp(struct model_files *f, weight_view *w1, weight_view *w2, weight_view *w3,
		    const char *prefix, int dim, int inter, dsv3_error *err)
{
	char name[160];
	int rc;
	snprintf(name, sizeof name, "%s.w1", prefix);
	if ((rc = load_view(f, w1, name, inter, dim, err)))
		return rc;
	snprintf(name, sizeof name, "%s.w2", prefix);
	if ((rc = load_view(f, w2, name, dim, inter, err)))
		return rc;
	snprintf(name, sizeof name, "%s.w3", prefix);
	return load_view(f, w3, name, inter, dim, err);
}

static int load_attention(struct model_files *f, LayerWeights *lw, int l, const dsv3_config *c,
			  dsv3_error *err)
{
	char p[160];
	int rc, H = c->n_heads, qhd = c->qk_nope_head_dim + c->qk_rope_head_dim;
#define VIEW(field, suffix, r, k)                                     \
	do {                                                          \
		snprintf(p, sizeof p, "layers.%d.%s", l, suffix);     \
		if ((rc = load_view(f, &lw->field, p, r, k, err)))    \
			return rc;                                    \
	} while (0)
	if (c->q_lora_rank > 0) {
		VIEW(wq_a, "attn.wq_a", c->q_lora_rank, c->dim);
		VIEW(q_norm, "attn.q_norm", 1, c->q_lora_rank);
		VIEW(wq_b, "attn.wq_b", H * qhd, c->q_lora_rank);
	} else {
		VIEW(wq, "attn.wq", H * qhd, c->dim);
	}
	VIEW(wkv_a, "attn.wkv_a", c->kv_lora_rank + c->qk_rope_head_dim, c->dim);
	VIEW(kv_norm, "attn.kv_norm", 1, c->kv_lora_rank);
	VIEW(wkv_b, "attn.wkv_b", H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank);
	VIEW(wo, "attn.wo", c->dim, H * c->v_head_dim);
	VIEW(attn_norm, "attn_norm", 1, c->dim);
	VIEW(ffn_norm, "ffn_norm", 1, c->dim);
#undef VIEW
	return 0;
}

static int load_moe(struct model_files *f, LayerWeights *lw, int l, const dsv3_config *c,
		    int *has_bias, dsv3_error *err)
{
	char p[160];
	const char *file;
	int rc, E = c->n_routed_experts;
	snprintf(p, sizeof p, "layers.%d.ffn.gate", l);
	if ((rc = load_view(f, &lw->gate, p, E, c->dim, err)))
		return rc;
	snprintf(p, sizeof p, "layers.%d.ffn.gate.bias", l);
	int r = f->only >= 0 ? f->only : 0;
	*has_bias = find(f, r, p, &file) != NULL;
	if (*has_bias) {
		/* The bias is a bare tensor (no .weight): view it directly. */
		const st_tensor *t = find(f, r, p, &file);
		lw->gate_bias.pieces = new_pieces(f, 1);
		if (!lw->gate_bias.pieces)
			return dsv3_fail(err, DSV3_EIO, "%s: too many weight pieces", f->dir);
		if (t->ndim != 1 || t->shape[0] != E || (t->dtype != ST_F32 && t->dtype != ST_BF16))
			return dsv3_fail(err, DSV3_EDATA, "%s: tensor %s: want F32 [%d]", file, p, E);
		lw->gate_bias.pieces[0] = (weight_piece){ t->dtype, 1, E, t->data, NULL, 0 };
		lw->gate_bias.n_pieces = 1;
		lw->gate_bias.rows = 1;
		lw->gate_bias.cols = E;
		lw->gate_bias.split_dim = SPLIT_NONE;
	}
	lw->ew1 = calloc((size_t)E * 3, sizeof(weight_view));
	if (!lw->ew1)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	lw->ew2 = lw->ew1 + E;
	lw->ew3 = lw->ew2 + E;
	for (int e = 0; e < E; e++) {
		snprintf(p, sizeof p, "layers.%d.ffn.experts.%d", l, e);
		if ((rc = load_mlp(f, &lw->ew1[e], &lw->ew2[e], &lw->ew3[e], p, c->dim,
				   c->moe_inter_dim, err)))
			return rc;
	}
	snprintf(p, sizeof p, "layers.%d.ffn.shared_experts", l);
	return load_mlp(f, &lw->w1, &lw->w2, &lw->w3, p, c->dim,
			c->n_shared_experts * c->moe_inter_dim, err);
}

int weights_load(Weights *w, const dsv3_config *c, const char *dir, dsv3_error *err)
{
	return weights_load_rank(w, c, dir, -1, err);
}

int weights_load_rank(Weights *w, const dsv3_config *c, const char *dir, int rank,
		      dsv3_error *err)
{
	int rc;
	memset(w, 0, sizeof *w);
	if ((rc = model_files_open(&w->files, dir, rank, err)))
		return rc;
	struct model_files *f = w->files;
	f->n_experts = c->n_routed_experts;
	/* Upper bound on views: per layer ~16 + 3 per expert, times the pieces each may have. */
	f->cap_pieces = ((size_t)c->n_layers * (20 + 3 * (size_t)c->n_routed_experts) + 8) *
			(size_t)(f->mp > 1 ? f->mp : 1);
	f->pieces = calloc(f->cap_pieces, sizeof *f->pieces);
	w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
	if (!f->pieces || !w->layers)
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	if ((rc = load_view(f, &w->embed, "embed", c->vocab_size, c->dim, err)) ||
	    (rc = load_view(f, &w->norm, "norm", 1, c->dim, err)) ||
	    (rc = load_view(f, &w->head, "head", c->vocab_size, c->dim, err)))
		return rc;
	for (int l = 0; l < c->n_layers; l++) {
		LayerWeights *lw = &w->layers[l];
		char p[64];
		int bias = 0;
		if ((rc = load_attention(f, lw, l, c, err)))
			return rc;
		snprintf(p, sizeof p, "layers.%d.ffn", l);
		if (l < c->n_dense_layers)
			rc = load_mlp(f, &lw->w1, &lw->w2, &lw->w3, p, c->dim, c->inter_dim, err);
		else
			rc = load_moe(f, lw, l, c, &bias, err);
		if (rc)
			return rc;
		if (l >= c->n_dense_layers)
			w->has_gate_bias = bias;
	}
	return 0;
}

void weights_free(Weights *w, const dsv3_config *c)
{
	if (w->layers)
		for (int l = 0; l < c->n_layers; l++)
			free(w->layers[l].ew1);
	free(w->layers);
	model_files_close(w->files);
	memset(w, 0, sizeof *w);
}

int weights_mp(const Weights *w)
{
	return w->files ? w->files->mp : 0;
}
