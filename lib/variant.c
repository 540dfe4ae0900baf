/* The DeepSeek variant rules, in one table. The configs of releases that share an architecture
 * and a shape are identical apart from names we do not read (V2 and V2.5; V3, V3-0324 and R1),
 * so those are named together rather than guessed. */
#include "variant.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

enum family { FAMILY_OTHER, FAMILY_V2, FAMILY_V3, FAMILY_V32 };

/* model_type and the architectures[0] class each family ships with. */
static const struct {
	enum family family;
	const char *model_type, *architecture;
} families[] = {
	{ FAMILY_V2, "deepseek_v2", "DeepseekV2ForCausalLM" },
	{ FAMILY_V3, "deepseek_v3", "DeepseekV3ForCausalLM" },
	{ FAMILY_V32, "deepseek_v32", "DeepseekV32ForCausalLM" },
};

/* The released shapes: num_hidden_layers, hidden_size, n_routed_experts. */
static const struct {
	enum family family;
	int n_layers, dim, n_routed_experts;
	const char *name;
} shapes[] = {
	{ FAMILY_V2, 27, 2048, 64, "V2-Lite" },
	{ FAMILY_V2, 60, 5120, 160, "V2 / V2.5" },
	{ FAMILY_V3, 61, 7168, 256, "V3 / R1" },
};

/* model_type decides when present (it is what transformers dispatches on); architectures[0]
 * only when model_type is absent. Another model_type is another model, whatever its class. */
static enum family family_of(const variant_facts *f)
{
	for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
		if (f->model_type[0] ? strcmp(f->model_type, families[i].model_type) == 0
				     : strcmp(f->architecture, families[i].architecture) == 0)
			return families[i].family;
	}
	return FAMILY_OTHER;
}

const char *variant_name(const variant_facts *f)
{
	enum family fam = family_of(f);
	/* The markers come first: V3.1 and V3.2-Exp keep V3's shape and model_type (V3.2-Exp has
	 * its own model_type, and also ue8m0 scales). */
	if (fam == FAMILY_V32 ||
	    (fam == FAMILY_V3 && (f->indexer_tensors || f->indexer_config)))
		return "V3.2-Exp";
	if (fam == FAMILY_V3 && f->scale_ue8m0)
		return "V3.1";
	for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
		if (shapes[i].family == fam && shapes[i].n_layers == f->n_layers &&
		    shapes[i].dim == f->dim && shapes[i].n_routed_experts == f->n_routed_experts)
			return shapes[i].name;
	return "unknown";
}

/* ---- reading the facts ---- */

static void copy_string(json_t *v, char *dst, size_t len)
{
	if (json_is_string(v))
		snprintf(dst, len, "%s", json_string_value(v));
}

static int int_or_zero(json_t *v)
{
	return json_is_integer(v) && json_integer_value(v) > 0 && json_integer_value(v) < 1 << 30
		       ? (int)json_integer_value(v)
		       : 0;
}

static void read_facts(variant_facts *f, json_t *root)
{
	copy_string(json_object_get(root, "model_type"), f->model_type, sizeof f->model_type);
	json_t *arch = json_object_get(root, "architectures");
	if (json_is_array(arch))
		copy_string(json_array_get(arch, 0), f->architecture, sizeof f->architecture);
	f->n_layers = int_or_zero(json_object_get(root, "num_hidden_layers"));
	f->dim = int_or_zero(json_object_get(root, "hidden_size"));
	f->n_routed_experts = int_or_zero(json_object_get(root, "n_routed_experts"));
	json_t *q = json_object_get(root, "quantization_config");
	json_t *scale_fmt = json_is_object(q) ? json_object_get(q, "scale_fmt") : NULL;
	f->scale_ue8m0 = json_is_string(scale_fmt) &&
			 strcmp(json_string_value(scale_fmt), "ue8m0") == 0;
	const char *key;
	json_t *value;
	json_object_foreach(root, key, value) {
		if (strncmp(key, "index_", 6) == 0)
			f->indexer_config = 1;
	}
}

int variant_facts_parse(variant_facts *f, const char *json_text, const char *label,
			dsv3_error *err)
{
	memset(f, 0, sizeof *f);
	json_error_t jerr;
	json_t *root = json_loads(json_text, 0, &jerr);
	if (!root)
		return dsv3_fail(err, DSV3_EDATA, "%s:%d: invalid JSON: %s", label, jerr.line,
				 jerr.text);
	int rc = 0;
	if (json_is_object(root))
		read_facts(f, root);
	else
		rc = dsv3_fail(err, DSV3_EDATA, "%s: not a JSON object", label);
	json_decref(root);
	return rc;
}

int variant_facts_load(variant_facts *f, const char *config_path, dsv3_error *err)
{
	memset(f, 0, sizeof *f);
	json_error_t jerr;
	json_t *root = json_load_file(config_path, 0, &jerr);
	if (!root) {
		FILE *probe = fopen(config_path, "rb");
		if (!probe)
			return dsv3_fail_errno(err, "cannot open %s", config_path);
		fclose(probe);
		return dsv3_fail(err, DSV3_EDATA, "%s:%d: invalid JSON: %s", config_path,
				 jerr.line, jerr.text);
	}
	int rc = 0;
	if (json_is_object(root))
		read_facts(f, root);
	else
		rc = dsv3_fail(err, DSV3_EDATA, "%s: not a JSON object", config_path);
	json_decref(root);
	return rc;
}

void variant_facts_note_tensor(variant_facts *f, const char *tensor_name)
{
	if (strstr(tensor_name, ".indexer."))
		f->indexer_tensors = 1;
}
