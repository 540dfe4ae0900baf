/* config.json as the weight tools read and write it (hf_json.h). */
#include "hf_json.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int hf_config_load(const char *dir, json_t **cfg, dsv3_error *err)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/config.json", dir);
	*cfg = NULL;
	FILE *f = fopen(path, "rb");
	if (!f)
		return errno == ENOENT ? 0 : dsv3_fail_errno(err, "cannot open %s", path);
	json_error_t jerr;
	json_t *j = json_loadf(f, 0, &jerr);
	fclose(f);
	if (!j || !json_is_object(j)) {
		int rc = dsv3_fail(err, DSV3_EDATA, "%s:%d: invalid JSON: %s", path,
				   j ? 1 : jerr.line, j ? "not an object" : jerr.text);
		json_decref(j);
		return rc;
	}
	*cfg = j;
	return 0;
}

int hf_config_block_size(const json_t *cfg, int *rows, int *cols, const char *label,
			 dsv3_error *err)
{
	json_t *bs = json_object_get(json_object_get(cfg, "quantization_config"),
				     "weight_block_size");
	if (!bs)
		return 0;
	json_int_t r = json_integer_value(json_array_get(bs, 0));
	json_int_t c = json_integer_value(json_array_get(bs, 1));
	if (!json_is_array(bs) || json_array_size(bs) != 2 || r < 1 || c < 1 || r > INT_MAX ||
	    c > INT_MAX)
		return dsv3_fail(err, DSV3_EDATA, "%s: quantization_config.weight_block_size must "
				 "be two positive integers", label);
	*rows = (int)r;
	*cols = (int)c;
	return 0;
}

char *hf_config_text(const json_t *cfg, size_t *len)
{
	char *body = json_dumps(cfg, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	if (!body)
		return NULL;
	size_t n = strlen(body);
	char *text = malloc(n + 2);
	if (text) {
		memcpy(text, body, n);
		memcpy(text + n, "\n", 2);
		*len = n + 1;
	}
	free(body);
	return text;
}
