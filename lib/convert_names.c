/* HF tensor names -> converted names, following DeepSeek's convert.py step by step (DESIGN §3.3):
 * strip "model.", the four str.replace renames, key = second-to-last component looked up in the
 * mapping table, then str.replace(key, new_key) on the whole name. Python's str.replace replaces
 * every non-overlapping occurrence, left to right, and so does replace_all below. */
#include "convert_names.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
	const char *key;     /* HF module name (after the four renames) */
	const char *new_key; /* converted module name */
	int split_dim;
} name_rule;

/* convert.py's `mapping`, in its order. */
static const name_rule hf_rules[] = {
	{ "embed_tokens", "embed", 0 },
	{ "input_layernorm", "attn_norm", SPLIT_NONE },
	{ "post_attention_layernorm", "ffn_norm", SPLIT_NONE },
	{ "q_proj", "wq", 0 },
	{ "q_a_proj", "wq_a", SPLIT_NONE },
	{ "q_a_layernorm", "q_norm", SPLIT_NONE },
	{ "q_b_proj", "wq_b", 0 },
	{ "kv_a_proj_with_mqa", "wkv_a", SPLIT_NONE },
	{ "kv_a_layernorm", "kv_norm", SPLIT_NONE },
	{ "kv_b_proj", "wkv_b", 0 },
	{ "o_proj", "wo", 1 },
	{ "gate", "gate", SPLIT_NONE },
	{ "gate_proj", "w1", 0 },
	{ "down_proj", "w2", 1 },
	{ "up_proj", "w3", 0 },
	{ "norm", "norm", SPLIT_NONE },
	{ "lm_head", "head", 0 },
	{ "scale", "scale", SPLIT_NONE },
};

/* The MTP layer's own modules. The official convert.py has no mapping for them (it drops
 * layer 61 by name before looking anything up); dsv3-convert --keep-mtp keeps that layer, and
 * these rules are ours: the norms and eh_proj are small and go whole to every rank, the MTP
 * embedding is split by rows like the main one, and shared_head.head (key "head") like lm_head.
 * shared_head.norm needs no rule: its key is "norm". Only valid inside a layer. */
static const name_rule mtp_rules[] = {
	{ "enorm", "enorm", SPLIT_NONE },
	{ "hnorm", "hnorm", SPLIT_NONE },
	{ "eh_proj", "eh_proj", SPLIT_NONE },
	{ "head", "head", 0 },
};

/* Split dims of converted module names: the new keys of hf_rules/mtp_rules, reversed. */
static const name_rule converted_rules[] = {
	{ "wq", "wq", 0 },	   { "wq_b", "wq_b", 0 }, { "wkv_b", "wkv_b", 0 },
	{ "wo", "wo", 1 },	   { "w1", "w1", 0 },	  { "w2", "w2", 1 },
	{ "w3", "w3", 0 },	   { "embed", "embed", 0 }, { "head", "head", 0 },
};

#define N_RULES(a) (sizeof(a) / sizeof((a)[0]))

static const name_rule *find_rule(const name_rule *rules, size_t n, const char *key, size_t len)
{
	for (size_t i = 0; i < n; i++)
		if (strlen(rules[i].key) == len && memcmp(rules[i].key, key, len) == 0)
			return &rules[i];
	return NULL;
}

/* Python's s.replace(from, to) on a NUL-terminated buffer of `cap` bytes; -1 if it overflows. */
static int replace_all(char *s, size_t cap, const char *from, const char *to)
{
	size_t fl = strlen(from), tl = strlen(to);
	char out[sizeof(((converted_name *)0)->name)];
	size_t o = 0;
	const char *p = s;
	if (cap > sizeof out)
		cap = sizeof out;
	for (;;) {
		const char *hit = strstr(p, from);
		size_t seg = hit ? (size_t)(hit - p) : strlen(p);
		if (o + seg + (hit ? tl : 0) + 1 > cap)
			return -1;
		memcpy(out + o, p, seg);
		o += seg;
		if (!hit)
			break;
		memcpy(out + o, to, tl);
		o += tl;
		p = hit + fl;
	}
	out[o] = '\0';
	memcpy(s, out, o + 1);
	return 0;
}

/* Start and length of dot-separated component `from_end` counted from the end (1 = last). */
static int component_from_end(const char *s, int from_end, const char **start, size_t *len)
{
	const char *end = s + strlen(s);
	for (int k = 1;; k++) {
		const char *p = end;
		while (p > s && p[-1] != '.')
			p--;
		if (k == from_end) {
			*start = p;
			*len = (size_t)(end - p);
			return 0;
		}
		if (p == s)
			return -1;
		end = p - 1;
	}
}

/* A non-negative decimal integer spanning exactly [s, s+len); -1 otherwise. */
static long parse_index(const char *s, size_t len)
{
	long v = 0;
	if (len == 0 || len > 9)
		return -1;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	return v;
}

/* "layers.N...." -> N; -1 for names outside layers. */
static int layer_of(const char *converted)
{
	static const char prefix[] = "layers.";
	if (strncmp(converted, prefix, sizeof prefix - 1) != 0)
		return -1;
	const char *p = converted + sizeof prefix - 1;
	const char *dot = strchr(p, '.');
	if (!dot)
		return -1;
	return (int)parse_index(p, (size_t)(dot - p));
}

/* convert.py's test: "experts" in name and "shared_experts" not in name; the index is [-3]. */
static int routed_expert_of(const char *converted, int *expert)
{
	*expert = -1;
	if (!strstr(converted, "experts") || strstr(converted, "shared_experts"))
		return 0;
	const char *c;
	size_t len;
	if (component_from_end(converted, 3, &c, &len))
		return -1;
	long e = parse_index(c, len);
	if (e < 0)
		return -1;
	*expert = (int)e;
	return 0;
}

static const name_rule *lookup_hf_key(const char *name, const char *key, size_t len, int layer)
{
	const name_rule *r = find_rule(hf_rules, N_RULES(hf_rules), key, len);
	if (r || layer < 0)
		return r;
	r = find_rule(mtp_rules, N_RULES(mtp_rules), key, len);
	/* "head" only as shared_head.head: a bare layers.N.head.weight is no MTP module. */
	if (r && strcmp(r->key, "head") == 0 &&
	    (key - name < 12 || strncmp(key - 12, "shared_head.", 12) != 0))
		return NULL;
	return r;
}

int convert_name(const char *hf_name, converted_name *out)
{
	static const char model_prefix[] = "model.";
	memset(out, 0, sizeof *out);
	if (strncmp(hf_name, model_prefix, sizeof model_prefix - 1) == 0)
		hf_name += sizeof model_prefix - 1;
	if (strlen(hf_name) >= sizeof out->name)
		return -1;
	strcpy(out->name, hf_name);
	static const char *const renames[][2] = {
		{ "self_attn", "attn" },
		{ "mlp", "ffn" },
		{ "weight_scale_inv", "scale" },
		{ "e_score_correction_bias", "bias" },
	};
	for (size_t i = 0; i < N_RULES(renames); i++)
		if (replace_all(out->name, sizeof out->name, renames[i][0], renames[i][1]))
			return -1;
	const char *key;
	size_t len;
	if (component_from_end(out->name, 2, &key, &len))
		return -1;
	out->layer = layer_of(out->name);
	const name_rule *r = lookup_hf_key(out->name, key, len, out->layer);
	if (!r)
		return -1;
	out->split_dim = r->split_dim;
	if (replace_all(out->name, sizeof out->name, r->key, r->new_key))
		return -1;
	return routed_expert_of(out->name, &out->expert);
}

int hf_name_is_mtp_module(const char *hf_name)
{
	static const char *const modules[] = { ".enorm.", ".hnorm.", ".eh_proj.", ".shared_head." };
	for (size_t i = 0; i < N_RULES(modules); i++)
		if (strstr(hf_name, modules[i]))
			return 1;
	return 0;
}

int converted_name_info(const char *name, converted_name *out)
{
	memset(out, 0, sizeof *out);
	if (strlen(name) >= sizeof out->name)
		return -1;
	strcpy(out->name, name);
	const char *key;
	size_t len;
	if (component_from_end(name, 2, &key, &len))
		return -1;
	const name_rule *r = find_rule(converted_rules, N_RULES(converted_rules), key, len);
	out->split_dim = r ? r->split_dim : SPLIT_NONE;
	out->layer = layer_of(name);
	return routed_expert_of(name, &out->expert);
}
