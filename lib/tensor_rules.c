/* The rules of tensor_rules.h. A tensor's name is MODULE.LEAF: the module must be one the
 * mapping knows (convert_names.c for HF names, converted_modules below for converted ones) and
 * the leaf one of the layout's leaves; the only 1-byte tensors are F8_E4M3 weights, each with
 * its F32 scale under the one name the tools read. */
#include "tensor_rules.h"

#include <stdio.h>
#include <string.h>

#include "convert_names.h"
#include "dtype.h"
#include "variant.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* What differs between the two layouts. */
typedef struct {
	const char *scale_leaf; /* the scale of MODULE.weight is MODULE.<scale_leaf> */
	const char *const *leaves;
	size_t n_leaves;
} layout;

static const char *const hf_leaves[] = { "weight", "bias", "weight_scale_inv",
					 "e_score_correction_bias" };
static const char *const converted_leaves[] = { "weight", "bias", "scale" };
static const layout hf_layout = { "weight_scale_inv", hf_leaves, N_OF(hf_leaves) };
static const layout converted_layout = { "scale", converted_leaves, N_OF(converted_leaves) };

/* The module names dsv3-convert writes: the new keys of convert_names.c's tables (the HF
 * "norm" of model.norm and shared_head.norm stays "norm"; shared_head.head's key is "head"). */
static const char *const converted_modules[] = {
	"embed", "attn_norm", "ffn_norm", "wq",	  "wq_a",  "q_norm", "wq_b",
	"wkv_a", "kv_norm",   "wkv_b",	  "wo",	  "gate",  "w1",     "w2",
	"w3",	 "norm",      "head",	  "enorm", "hnorm", "eh_proj",
};

static int in_list(const char *const *list, size_t n, const char *s, size_t len)
{
	for (size_t i = 0; i < n; i++)
		if (strlen(list[i]) == len && memcmp(list[i], s, len) == 0)
			return 1;
	return 0;
}

/* The leaf: what follows the last dot (the whole name when there is none). */
static const char *leaf_of(const char *name)
{
	const char *dot = strrchr(name, '.');
	return dot ? dot + 1 : name;
}

/* Length of MODULE. (the name up to and including its last dot). */
static size_t prefix_len(const char *name)
{
	return (size_t)(leaf_of(name) - name);
}

static int is_one_byte(st_dtype d)
{
	return d == ST_F8_E4M3 || d == ST_F8_E5M2 || d == ST_I8 || d == ST_U8 || d == ST_BOOL;
}

/* The release a tensor belongs to, when its name marks one no tool has a rule for: V3.2-Exp's
 * lightning indexer, named as lib/variant.h names a checkpoint holding it. */
static int variant_refusal(const char *name, char *why, size_t len)
{
	variant_facts facts;
	memset(&facts, 0, sizeof facts);
	snprintf(facts.model_type, sizeof facts.model_type, "deepseek_v3");
	variant_facts_note_tensor(&facts, name);
	if (!facts.indexer_tensors)
		return 0;
	snprintf(why, len, "%s indexer: no rule", variant_name(&facts));
	return 1;
}

/* A module the mapping knows, and a leaf of the layout. */
static int name_refusal(const char *name, int converted, const layout *l, char *why, size_t len)
{
	const char *leaf = leaf_of(name);
	if (leaf == name || !in_list(l->leaves, l->n_leaves, leaf, strlen(leaf))) {
		snprintf(why, len, "unknown tensor name (no rule for a tensor named %s)", leaf);
		return 1;
	}
	if (!converted) {
		converted_name cn;
		if (convert_name(name, &cn) == 0)
			return 0;
		snprintf(why, len, "unknown tensor name (its module is not in the mapping of "
			 "convert.py)");
		return 1;
	}
	size_t end = prefix_len(name) - 1, start = end;
	while (start > 0 && name[start - 1] != '.')
		start--;
	if (in_list(converted_modules, N_OF(converted_modules), name + start, end - start))
		return 0;
	snprintf(why, len, "unknown tensor name (its module is not one dsv3-convert writes)");
	return 1;
}

static int dtype_refusal(const char *name, st_dtype dtype, const layout *l, char *why,
			 size_t len)
{
	const char *leaf = leaf_of(name);
	int is_scale = strcmp(leaf, l->scale_leaf) == 0;
	if (is_one_byte(dtype) && dtype != ST_F8_E4M3) {
		snprintf(why, len, "1-byte %s tensor: no rule (FP8 weights are F8_E4M3 with an F32 "
			 "scale)", dtype_name(dtype));
		return 1;
	}
	if (is_scale && dtype != ST_F32) {
		snprintf(why, len, "a scale must be F32, not %s", dtype_name(dtype));
		return 1;
	}
	if (dtype == ST_F8_E4M3 && strcmp(leaf, "weight") != 0) {
		snprintf(why, len, "F8_E4M3, but only a NAME.weight tensor has a scale");
		return 1;
	}
	return 0;
}

int tensor_rule_by_name(const char *name, st_dtype dtype, int converted, unsigned flags,
			char *why, size_t len)
{
	const layout *l = converted ? &converted_layout : &hf_layout;
	int any_module = (flags & TENSOR_RULES_ANY_MODULE) != 0;
	if (!any_module && variant_refusal(name, why, len))
		return 1;
	const char *leaf = leaf_of(name);
	if (strstr(leaf, "scale") && strcmp(leaf, l->scale_leaf) != 0) {
		snprintf(why, len, "a scale under a name the tools do not know (they read %.*s%s)",
			 (int)prefix_len(name), name, l->scale_leaf);
		return 1;
	}
	if (!any_module && name_refusal(name, converted, l, why, len))
		return 1;
	return dtype_refusal(name, dtype, l, why, len);
}

/* ---- a weight and its scale ---- */

/* Finds a tensor by name where the layout keeps a weight's scale: anywhere in an HF
 * checkpoint (a scale may sit in another file), in the same rank file when converted. */
typedef struct {
	const hf_ckpt *c; /* NULL: converted */
	const st_file *f;
	const layout *l;
} scope;

static const st_tensor *scope_find(const scope *s, const char *name)
{
	return s->c ? hf_ckpt_find(s->c, name, NULL) : st_find(s->f, name);
}

/* A tensor of the weight's own file beside MODULE.weight whose leaf mentions a scale but is not
 * the one the tools read: what a scale saved under another name looks like. */
static const st_tensor *look_alike(const scope *s, const st_tensor *w)
{
	size_t plen = prefix_len(w->name);
	for (size_t i = 0; i < s->f->n_tensors; i++) {
		const st_tensor *t = &s->f->tensors[i];
		const char *leaf = t->name + plen;
		if (t != w && strncmp(t->name, w->name, plen) == 0 && !strchr(leaf, '.') &&
		    strstr(leaf, "scale") && strcmp(leaf, s->l->scale_leaf) != 0)
			return t;
	}
	return NULL;
}

static size_t check_weight_scale(const scope *s, const st_tensor *w, problem_list *pr)
{
	char scale[1024];
	snprintf(scale, sizeof scale, "%.*s%s", (int)prefix_len(w->name), w->name,
		 s->l->scale_leaf);
	if (scope_find(s, scale))
		return 0;
	const st_tensor *other = look_alike(s, w);
	if (other)
		problem_add(pr, "%s: tensor %s: F8_E4M3 with its scale under a name the tools "
			    "do not know: %s (expected %s)", s->f->path, w->name, other->name,
			    scale);
	else
		problem_add(pr, "%s: tensor %s: F8_E4M3 without its scale %s", s->f->path, w->name,
			    scale);
	return 1;
}

static size_t check_scale_weight(const scope *s, const st_tensor *scale, problem_list *pr)
{
	char weight[1024];
	snprintf(weight, sizeof weight, "%.*sweight", (int)prefix_len(scale->name), scale->name);
	const st_tensor *w = scope_find(s, weight);
	if (w && w->dtype == ST_F8_E4M3)
		return 0;
	if (w)
		problem_add(pr, "%s: tensor %s: scale of %s, which is %s, not F8_E4M3", s->f->path,
			    scale->name, weight, dtype_name(w->dtype));
	else
		problem_add(pr, "%s: tensor %s: scale of %s, which is not in the %s", s->f->path,
			    scale->name, weight, s->c ? "checkpoint" : "file");
	return 1;
}

static size_t check_tensor(const scope *s, const st_tensor *t, unsigned flags, problem_list *pr)
{
	char why[512];
	if (tensor_rule_by_name(t->name, t->dtype, s->c == NULL, flags, why, sizeof why)) {
		problem_add(pr, "%s: tensor %s: %s", s->f->path, t->name, why);
		return 1;
	}
	if (t->dtype == ST_F8_E4M3)
		return flags & TENSOR_RULES_OWN_SCALE_CHECK ? 0 : check_weight_scale(s, t, pr);
	if (strcmp(leaf_of(t->name), s->l->scale_leaf) == 0)
		return check_scale_weight(s, t, pr);
	return 0;
}

size_t tensor_rules_check_hf(const hf_ckpt *c, const st_file *f, const st_tensor *t,
			     unsigned flags, problem_list *pr)
{
	scope s = { c, f, &hf_layout };
	return check_tensor(&s, t, flags, pr);
}

size_t tensor_rules_check_hf_ckpt(const hf_ckpt *c, unsigned flags, problem_list *pr)
{
	size_t n = 0;
	for (size_t i = 0; i < c->n_files; i++)
		for (size_t k = 0; k < c->files[i].n_tensors; k++)
			n += tensor_rules_check_hf(c, &c->files[i], &c->files[i].tensors[k], flags,
						   pr);
	return n;
}

size_t tensor_rules_check_converted(const st_file *f, const st_tensor *t, problem_list *pr)
{
	scope s = { NULL, f, &converted_layout };
	return check_tensor(&s, t, 0, pr);
}
