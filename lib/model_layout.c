/* The tensor list of a DeepSeek checkpoint in the Hugging Face layout (DESIGN §3.2), built from
 * the config alone so that a writer (dsv3-synth) and a checker (dsv3-verify ckpt) agree on it. */
#include "model_layout.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

/* A growing list plus the sticky error of the first failure, so the builders below can add
 * tensors without checking after each one. */
typedef struct {
	const dsv3_config *c;
	layout_tensor *t;
	size_t n, cap;
	int rc;
} layout_list;

static layout_tensor *list_next(layout_list *l)
{
	if (l->rc)
		return NULL;
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 256;
		layout_tensor *t = realloc(l->t, cap * sizeof *t);
		if (!t) {
			l->rc = DSV3_EIO;
			return NULL;
		}
		l->t = t;
		l->cap = cap;
	}
	layout_tensor *t = &l->t[l->n];
	memset(t, 0, sizeof *t);
	return t;
}

/* Formats the name into t; a name that does not fit the fixed buffer is a config we cannot
 * describe (absurd layer or expert counts), hence DSV3_EDATA. */
static int set_name(layout_list *l, layout_tensor *t, const char *fmt, va_list ap)
{
	int len = vsnprintf(t->name, sizeof t->name, fmt, ap);
	if (len < 0 || (size_t)len >= sizeof t->name) {
		l->rc = DSV3_EDATA;
		return -1;
	}
	return 0;
}

__attribute__((format(printf, 7, 8))) static void add(layout_list *l, tensor_role role,
							 st_dtype dtype, int layer, int64_t rows,
							 int64_t cols, const char *fmt, ...)
{
	layout_tensor *t = list_next(l);
	if (!t)
		return;
	va_list ap;
	va_start(ap, fmt);
	int bad = set_name(l, t, fmt, ap);
	va_end(ap);
	if (bad)
		return;
	t->role = role;
	t->dtype = dtype;
	t->layer = layer;
	t->ndim = cols > 0 ? 2 : 1;
	t->shape[0] = rows;
	t->shape[1] = cols > 0 ? cols : 0;
	t->fan_in = cols > 0 ? cols : 0;
	l->n++;
}

static int64_t ceil_div(int64_t a, int64_t b)
{
	return (a + b - 1) / b;
}

/* A linear weight "<prefix>.weight" [out, in]; FP8 checkpoints follow it immediately with its
 * block scale "<prefix>.weight_scale_inv". */
static void add_linear(layout_list *l, int layer, int64_t out, int64_t in, const char *prefix)
{
	const dsv3_config *c = l->c;
	st_dtype dt = c->fp8 ? ST_F8_E4M3 : ST_BF16;
	add(l, ROLE_LINEAR, dt, layer, out, in, "%s.weight", prefix);
	if (c->fp8)
		add(l, ROLE_SCALE, ST_F32, layer, ceil_div(out, c->block_rows),
		    ceil_div(in, c->block_cols), "%s.weight_scale_inv", prefix);
}

/* Builds "model.layers.<i>.<suffix>" into buf; returns buf or NULL (sticky error) on overflow. */
static const char *layer_prefix(layout_list *l, char *buf, size_t size, int i, const char *suffix)
{
	int len = snprintf(buf, size, "model.layers.%d.%s", i, suffix);
	if (len < 0 || (size_t)len >= size) {
		l->rc = DSV3_EDATA;
		return NULL;
	}
	return buf;
}

static void add_layer_linear(layout_list *l, int i, const char *suffix, int64_t out, int64_t in)
{
	char p[sizeof ((layout_tensor *)0)->name];
	if (layer_prefix(l, p, sizeof p, i, suffix))
		add_linear(l, i, out, in, p);
}

static void add_layer_norm(layout_list *l, int i, const char *suffix, int64_t dim)
{
	add(l, ROLE_NORM, ST_BF16, i, dim, 0, "model.layers.%d.%s.weight", i, suffix);
}

static void add_attention(layout_list *l, int i)
{
	const dsv3_config *c = l->c;
	int64_t qk_head = (int64_t)c->qk_nope_head_dim + c->qk_rope_head_dim;
	int64_t h = c->n_heads;

	if (c->q_lora_rank > 0) {
		add_layer_linear(l, i, "self_attn.q_a_proj", c->q_lora_rank, c->dim);
		add_layer_norm(l, i, "self_attn.q_a_layernorm", c->q_lora_rank);
		add_layer_linear(l, i, "self_attn.q_b_proj", h * qk_head, c->q_lora_rank);
	} else {
		add_layer_linear(l, i, "self_attn.q_proj", h * qk_head, c->dim);
	}
	add_layer_linear(l, i, "self_attn.kv_a_proj_with_mqa",
			 (int64_t)c->kv_lora_rank + c->qk_rope_head_dim, c->dim);
	add_layer_norm(l, i, "self_attn.kv_a_layernorm", c->kv_lora_rank);
	add_layer_linear(l, i, "self_attn.kv_b_proj",
			 h * ((int64_t)c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank);
	add_layer_linear(l, i, "self_attn.o_proj", c->dim, h * c->v_head_dim);
}

/* gate_proj, up_proj, down_proj of one MLP of width `inter` under "<suffix>.". */
static void add_mlp(layout_list *l, int i, const char *suffix, int64_t inter)
{
	static const char *const names[3] = { "gate_proj", "up_proj", "down_proj" };
	const dsv3_config *c = l->c;
	char s[sizeof ((layout_tensor *)0)->name];
	for (int k = 0; k < 3; k++) {
		int len = snprintf(s, sizeof s, "%s.%s", suffix, names[k]);
		if (len < 0 || (size_t)len >= sizeof s) {
			l->rc = DSV3_EDATA;
			return;
		}
		if (k < 2)
			add_layer_linear(l, i, s, inter, c->dim);
		else
			add_layer_linear(l, i, s, c->dim, inter);
	}
}

static void add_moe(layout_list *l, int i)
{
	const dsv3_config *c = l->c;
	add(l, ROLE_GATE, ST_BF16, i, c->n_routed_experts, c->dim, "model.layers.%d.mlp.gate.weight",
	    i);
	if (c->has_gate_bias)
		add(l, ROLE_BIAS, ST_F32, i, c->n_routed_experts, 0,
		    "model.layers.%d.mlp.gate.e_score_correction_bias", i);
	for (int j = 0; j < c->n_routed_experts && !l->rc; j++) {
		char s[64];
		snprintf(s, sizeof s, "mlp.experts.%d", j);
		add_mlp(l, i, s, c->moe_inter_dim);
	}
	if (c->n_shared_experts > 0)
		add_mlp(l, i, "mlp.shared_experts", (int64_t)c->n_shared_experts * c->moe_inter_dim);
}

/* One transformer block; `moe` picks the routed MLP over the dense one. */
static void add_decoder_layer(layout_list *l, int i, int moe)
{
	add_layer_norm(l, i, "input_layernorm", l->c->dim);
	add_attention(l, i);
	add_layer_norm(l, i, "post_attention_layernorm", l->c->dim);
	if (moe)
		add_moe(l, i);
	else
		add_mlp(l, i, "mlp", l->c->inter_dim);
}

/* The MTP module (DeepSeek-V3's layer 61): its own embedding and the two norms whose outputs
 * eh_proj combines, a full block, then its own head. Listed in the order the module runs.
 * eh_proj is a linear (ROLE_LINEAR) whose dtype is BF16 even in FP8 checkpoints. */
static void add_mtp_layer(layout_list *l, int i)
{
	const dsv3_config *c = l->c;
	add(l, ROLE_EMBED, ST_BF16, i, c->vocab_size, c->dim, "model.layers.%d.embed_tokens.weight",
	    i);
	add_layer_norm(l, i, "enorm", c->dim);
	add_layer_norm(l, i, "hnorm", c->dim);
	/* DeepSeek's FP8 releases (V3, R1: 91991 tensors) keep eh_proj in BF16, without a scale */
	add(l, ROLE_LINEAR, ST_BF16, i, c->dim, 2 * (int64_t)c->dim, "model.layers.%d.eh_proj.weight",
	    i);
	add_decoder_layer(l, i, c->n_routed_experts > 0);
	add_layer_norm(l, i, "shared_head.norm", c->dim);
	add(l, ROLE_HEAD, ST_BF16, i, c->vocab_size, c->dim, "model.layers.%d.shared_head.head.weight",
	    i);
}

/* The sizes every tensor shape is built from must be positive (or zero where a part may be
 * absent), else the shapes would be nonsense. */
static int config_describable(const dsv3_config *c)
{
	if (c->vocab_size <= 0 || c->dim <= 0 || c->n_layers < 0 || c->n_heads <= 0 ||
	    c->kv_lora_rank <= 0 || c->qk_nope_head_dim < 0 || c->qk_rope_head_dim < 0 ||
	    c->v_head_dim <= 0 || c->q_lora_rank < 0 || c->n_mtp_layers < 0 ||
	    c->n_dense_layers < 0 || c->n_routed_experts < 0 || c->n_shared_experts < 0)
		return 0;
	if (c->n_dense_layers < c->n_layers && c->n_routed_experts > 0 && c->moe_inter_dim <= 0)
		return 0;
	if (c->n_dense_layers > 0 && c->inter_dim <= 0)
		return 0;
	if (c->fp8 && (c->block_rows <= 0 || c->block_cols <= 0))
		return 0;
	return 1;
}

int model_layout(const dsv3_config *c, int with_mtp, layout_tensor **out, size_t *n)
{
	*out = NULL;
	*n = 0;
	if (!config_describable(c))
		return DSV3_EDATA;
	layout_list l = { .c = c };

	add(&l, ROLE_EMBED, ST_BF16, -1, c->vocab_size, c->dim, "model.embed_tokens.weight");
	for (int i = 0; i < c->n_layers && !l.rc; i++)
		add_decoder_layer(&l, i, i >= c->n_dense_layers && c->n_routed_experts > 0);
	for (int k = 0; with_mtp && k < c->n_mtp_layers && !l.rc; k++)
		add_mtp_layer(&l, c->n_layers + k);
	add(&l, ROLE_NORM, ST_BF16, -1, c->dim, 0, "model.norm.weight");
	add(&l, ROLE_HEAD, ST_BF16, -1, c->vocab_size, c->dim, "lm_head.weight");

	if (l.rc) {
		free(l.t);
		return l.rc;
	}
	*out = l.t;
	*n = l.n;
	return 0;
}
