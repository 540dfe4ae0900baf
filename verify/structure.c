/* dsv3-verify ckpt DIR: the tensors of DIR against what DIR/config.json says a checkpoint must
 * hold (lib/model_layout.h): every expected tensor present with its dtype and shape, nothing
 * unexpected, every F8 tensor beside its scale, and (HF layout) the index consistent with the
 * files. A converted directory is checked rank by rank against the layout renamed and split as
 * DESIGN §3.3 says. First the variant (lib/variant.h) is named. */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "convert_names.h"
#include "hf_ckpt.h"
#include "model_layout.h"
#include "variant.h"
#include "verify.h"

#define INDEX_NAME "model.safetensors.index.json"

typedef struct {
	const ckpt_dir *d;
	const dsv3_config *cfg;
	char *matched; /* per ckpt_dir tensor: some expectation accounted for it */
	problem_list *problems;
	size_t checked;
} structure_check;

/* Layer index of a tensor name ("model.layers.N." in HF, "layers.N." converted), or -1. */
static int name_layer(const char *name)
{
	if (strncmp(name, "model.", 6) == 0)
		name += 6;
	if (strncmp(name, "layers.", 7) != 0)
		return -1;
	char *end;
	long v = strtol(name + 7, &end, 10);
	return end != name + 7 && *end == '.' && v >= 0 && v < 1 << 30 ? (int)v : -1;
}

/* The MTP layers are expected when the config has them and the checkpoint kept them
 * (convert.py, and dsv3-convert by default, drop them). */
static int mtp_present(const ckpt_dir *d, const dsv3_config *cfg)
{
	for (size_t i = 0; i < d->n_tensors; i++)
		if (name_layer(d->tensors[i].name) >= cfg->n_layers)
			return 1;
	return 0;
}

/* Compares one found tensor with its expected dtype and shape. */
static void check_found(structure_check *s, const dir_tensor *t, st_dtype dtype, int ndim,
			const int64_t *shape)
{
	char path[4096], got[256], want[256];
	ckpt_dir_file_path(s->d, t->file, path, sizeof path);
	s->matched[t - s->d->tensors] = 1;
	s->checked++;
	int same = t->tensor->ndim == ndim;
	for (int k = 0; same && k < ndim; k++)
		same = t->tensor->shape[k] == shape[k];
	if (t->tensor->dtype != dtype)
		problem_add(s->problems, "%s: tensor %s: dtype %s, expected %s", path, t->name,
			    dtype_name(t->tensor->dtype), dtype_name(dtype));
	if (!same) {
		shape_text(t->tensor->ndim, t->tensor->shape, got, sizeof got);
		shape_text(ndim, shape, want, sizeof want);
		problem_add(s->problems, "%s: tensor %s: shape %s, expected %s", path, t->name, got,
			    want);
	}
}

static void report_missing(structure_check *s, const char *where, const char *name,
			   st_dtype dtype, int ndim, const int64_t *shape)
{
	char want[256];
	shape_text(ndim, shape, want, sizeof want);
	problem_add(s->problems, "%s: tensor %s: missing (expected %s %s)", where, name,
		    dtype_name(dtype), want);
}

/* ---- Hugging Face layout ---- */

static void check_hf_tensor(structure_check *s, const layout_tensor *lt)
{
	size_t n;
	const dir_tensor *t = ckpt_dir_find(s->d, lt->name, &n);
	if (!t) {
		report_missing(s, s->d->dir, lt->name, lt->dtype, lt->ndim, lt->shape);
		return;
	}
	for (size_t k = 1; k < n; k++) {
		char a[4096], b[4096];
		ckpt_dir_file_path(s->d, t[0].file, a, sizeof a);
		ckpt_dir_file_path(s->d, t[k].file, b, sizeof b);
		problem_add(s->problems, "%s: tensor %s: also in %s", a, lt->name, b);
		s->matched[&t[k] - s->d->tensors] = 1;
	}
	check_found(s, t, lt->dtype, lt->ndim, lt->shape);
}

static const dir_tensor *find_in_file(const ckpt_dir *d, const char *name, const char *file)
{
	size_t n;
	const dir_tensor *t = ckpt_dir_find(d, name, &n);
	for (size_t k = 0; k < n; k++)
		if (strcmp(d->file_names[t[k].file], file) == 0)
			return &t[k];
	return NULL;
}

static int file_exists(const ckpt_dir *d, const char *file)
{
	for (size_t i = 0; i < d->n_files; i++)
		if (d->file_names[i] && strcmp(d->file_names[i], file) == 0)
			return 1;
	return 0;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Every index entry names an existing file that holds the tensor; every tensor is indexed. */
static void check_index(structure_check *s)
{
	const ckpt_dir *d = s->d;
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", d->dir, INDEX_NAME);
	char **tensors, **files;
	size_t n;
	dsv3_error err = { 0 };
	if (index_load(path, &tensors, &files, &n, &err)) {
		if (err.code == DSV3_EIO && access(path, F_OK) != 0)
			return; /* no index: a directory of files is fine */
		problem_add_error(s->problems, &err);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		if (!file_exists(d, files[i]))
			problem_add(s->problems, "%s: tensor %s: mapped to %s, which is missing",
				    path, tensors[i], files[i]);
		else if (!find_in_file(d, tensors[i], files[i]))
			problem_add(s->problems, "%s: tensor %s: mapped to %s, which does not hold it",
				    path, tensors[i], files[i]);
	}
	char **sorted = malloc((n + 1) * sizeof *sorted);
	if (!sorted) {
		s->problems->io = 1;
		index_free(tensors, files, n);
		return;
	}
	memcpy(sorted, tensors, n * sizeof *sorted);
	qsort(sorted, n, sizeof *sorted, cmp_str);
	for (size_t i = 0; i < d->n_tensors; i++) {
		const char *name = d->tensors[i].name;
		if (!bsearch(&name, sorted, n, sizeof *sorted, cmp_str)) {
			char fp[4096];
			ckpt_dir_file_path(d, d->tensors[i].file, fp, sizeof fp);
			problem_add(s->problems, "%s: tensor %s: not in %s", fp, name, INDEX_NAME);
		}
	}
	free(sorted);
	index_free(tensors, files, n);
}

/* ---- converted layout ---- */

/* The shape rank r holds of a tensor split along `dim` (or whole). */
static int rank_shape(const layout_tensor *lt, int dim, int mp, int64_t *shape)
{
	shape[0] = lt->shape[0];
	shape[1] = lt->shape[1];
	if (dim == SPLIT_NONE)
		return 0;
	if (dim >= lt->ndim || shape[dim] % mp != 0)
		return -1;
	shape[dim] /= mp;
	return 0;
}

static void check_converted_tensor(structure_check *s, const layout_tensor *lt)
{
	const ckpt_dir *d = s->d;
	converted_name cn;
	if (convert_name(lt->name, &cn)) {
		problem_add(s->problems, "%s: tensor %s of the layout has no converted name", d->dir,
			    lt->name);
		return;
	}
	int dim = cn.expert >= 0 ? SPLIT_NONE : cn.split_dim;
	int64_t shape[2];
	if (rank_shape(lt, dim, d->mp, shape)) {
		problem_add(s->problems, "%s: tensor %s: dim %d of size %lld does not split into %d",
			    d->dir, cn.name, dim, (long long)lt->shape[dim], d->mp);
		return;
	}
	int owner = -1;
	if (cn.expert >= 0 && s->cfg->n_routed_experts % d->mp == 0)
		owner = expert_rank(cn.expert, s->cfg->n_routed_experts, d->mp);
	size_t n;
	const dir_tensor *t = ckpt_dir_find(d, cn.name, &n);
	for (int r = 0; r < d->mp; r++) {
		if ((cn.expert >= 0 && r != owner) || !d->opened[r])
			continue; /* an expert lives on its rank only; a missing file is reported */
		size_t k = 0;
		while (k < n && t[k].file != (size_t)r)
			k++;
		if (k < n) {
			check_found(s, &t[k], lt->dtype, lt->ndim, shape);
		} else {
			char where[4096];
			ckpt_dir_file_path(d, (size_t)r, where, sizeof where);
			report_missing(s, where, cn.name, lt->dtype, lt->ndim, shape);
		}
	}
}

/* ---- 1-byte tensors and their scales ---- */

/* Index of the first tensor whose name is >= key. */
static size_t lower_bound(const ckpt_dir *d, const char *key)
{
	size_t lo = 0, hi = d->n_tensors;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (strcmp(d->tensors[mid].name, key) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* A tensor beside `prefix`.weight (same module, and for a converted directory the same rank)
 * whose name mentions a scale but is not the one the tools read: what a scale saved under
 * another name looks like. */
static const dir_tensor *unknown_scale(const ckpt_dir *d, const dir_tensor *w, const char *prefix,
				       const char *scale_name)
{
	size_t plen = strlen(prefix);
	for (size_t i = lower_bound(d, prefix); i < d->n_tensors; i++) {
		const dir_tensor *t = &d->tensors[i];
		if (strncmp(t->name, prefix, plen) != 0)
			break;
		if (t != w && strstr(t->name + plen, "scale") && strcmp(t->name, scale_name) != 0 &&
		    (!d->converted || t->file == w->file))
			return t;
	}
	return NULL;
}

/* Whether `scale_name` is there for w: anywhere in an HF directory (a scale may sit in another
 * file than its weight), in w's own rank file in a converted one. */
static int scale_present(const ckpt_dir *d, const dir_tensor *w, const char *scale_name)
{
	size_t n;
	const dir_tensor *t = ckpt_dir_find(d, scale_name, &n);
	for (size_t k = 0; k < n; k++)
		if (!d->converted || t[k].file == w->file)
			return 1;
	return 0;
}

/* An FP8 tensor is only meaningful with its block scale; without it the bytes would pass
 * through as if they were the weight. Named whatever config.json says, so a BF16 checkpoint
 * with FP8 weights left in it is caught as such too. */
static void check_one_byte_tensor(const ckpt_dir *d, const dir_tensor *w, problem_list *problems)
{
	char path[4096], prefix[512], scale_name[512 + 32];
	ckpt_dir_file_path(d, w->file, path, sizeof path);
	const char *dtype = dtype_name(w->tensor->dtype);
	size_t len = strlen(w->name);
	if (len < 7 || strcmp(w->name + len - 7, ".weight") != 0 || len - 6 >= sizeof prefix) {
		problem_add(problems, "%s: tensor %s: %s, but only a NAME.weight tensor has a scale",
			    path, w->name, dtype);
		return;
	}
	snprintf(prefix, sizeof prefix, "%.*s", (int)(len - 6), w->name); /* keeps the dot */
	snprintf(scale_name, sizeof scale_name, "%s%s", prefix,
		 d->converted ? "scale" : "weight_scale_inv");
	if (scale_present(d, w, scale_name))
		return;
	const dir_tensor *other = unknown_scale(d, w, prefix, scale_name);
	if (other)
		problem_add(problems,
			    "%s: tensor %s: %s with its scale under a name the tools do not know: "
			    "%s (expected %s)",
			    path, w->name, dtype, other->name, scale_name);
	else
		problem_add(problems, "%s: tensor %s: %s without its scale %s", path, w->name,
			    dtype, scale_name);
}

static void check_one_byte_tensors(const ckpt_dir *d, problem_list *problems)
{
	for (size_t i = 0; i < d->n_tensors; i++) {
		st_dtype t = d->tensors[i].tensor->dtype;
		if (t == ST_F8_E4M3 || t == ST_F8_E5M2)
			check_one_byte_tensor(d, &d->tensors[i], problems);
	}
}

/* ---- both ---- */

static void report_unexpected(structure_check *s)
{
	char path[4096];
	for (size_t i = 0; i < s->d->n_tensors; i++) {
		if (s->matched[i])
			continue;
		ckpt_dir_file_path(s->d, s->d->tensors[i].file, path, sizeof path);
		problem_add(s->problems, "%s: tensor %s: unexpected (not in the layout of config.json%s)",
			    path, s->d->tensors[i].name, s->d->converted ? " for this rank" : "");
	}
}

static int check_structure(const ckpt_dir *d, const dsv3_config *cfg, problem_list *problems,
			   size_t *checked, int *with_mtp, dsv3_error *err)
{
	*with_mtp = cfg->n_mtp_layers > 0 && mtp_present(d, cfg);
	layout_tensor *lt;
	size_t n;
	if (model_layout(cfg, *with_mtp, &lt, &n))
		return dsv3_fail(err, DSV3_EDATA, "%s/config.json: describes no valid model layout",
				 d->dir);
	if (d->converted && cfg->n_routed_experts % d->mp != 0)
		problem_add(problems, "%s: %d routed experts do not split into %d ranks", d->dir,
			    cfg->n_routed_experts, d->mp);
	structure_check s = { d, cfg, calloc(d->n_tensors + 1, 1), problems, 0 };
	if (!s.matched) {
		free(lt);
		return dsv3_fail(err, DSV3_EIO, "out of memory");
	}
	for (size_t i = 0; i < n; i++) {
		if (d->converted)
			check_converted_tensor(&s, &lt[i]);
		else
			check_hf_tensor(&s, &lt[i]);
	}
	report_unexpected(&s);
	check_one_byte_tensors(d, problems);
	if (!d->converted)
		check_index(&s);
	*checked = s.checked;
	free(s.matched);
	free(lt);
	return 0;
}

/* "variant: NAME" on stdout (lib/variant.h's rules), before any problem, so that a user sees
 * which release the checker took the directory for even when it fails. */
static void print_variant(const ckpt_dir *d, const char *config_path)
{
	variant_facts f;
	dsv3_error err = { 0 };
	if (variant_facts_load(&f, config_path, &err))
		return; /* config_load has read this file already; it cannot fail here but by a race */
	for (size_t i = 0; i < d->n_tensors; i++)
		variant_facts_note_tensor(&f, d->tensors[i].name);
	printf("variant: %s\n", variant_name(&f));
	fflush(stdout);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: " VERIFY_PROG " ckpt DIR\n"
		"\n"
		"Checks the structure of checkpoint DIR against DIR/config.json: every tensor the\n"
		"config implies is present with its dtype and shape (FP8 scales F32\n"
		"[ceil(out/128), ceil(in/128)]), nothing unexpected is there, and the index (if any)\n"
		"matches the files. Every F8 tensor NAME.weight must have its scale\n"
		"NAME.weight_scale_inv (NAME.scale converted), whatever the config says. The MTP\n"
		"layers are expected when the config has them and any of their tensors is\n"
		"present. A converted directory (model{r}-mp{N}.safetensors) is\n"
		"checked rank by rank: names as convert.py writes them, split tensors divided by N\n"
		"along their split dimension, routed experts on their rank only.\n"
		"\n"
		"First prints \"variant: NAME\", the DeepSeek release the config and tensor names\n"
		"match: V2-Lite, V2 / V2.5, V3 / R1, V3.1, V3.2-Exp or unknown (docs/tools.md).\n"
		"\n"
		"  -h, --help  this help\n"
		"\n"
		"Lists every problem (file and tensor); exit 0 ok, 2 a problem, 3 an I/O error,\n"
		"1 a usage error.\n");
}

int verify_ckpt(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		if (c == 'h') {
			usage(stdout);
			return 0;
		}
		usage(stderr);
		return DSV3_EUSAGE;
	}
	if (argc - optind != 1) {
		fprintf(stderr, VERIFY_PROG " ckpt: expected one directory\n");
		usage(stderr);
		return DSV3_EUSAGE;
	}
	const char *dir = argv[optind];
	char path[4096];
	snprintf(path, sizeof path, "%s/config.json", dir);
	dsv3_error err = { 0 };
	dsv3_config cfg;
	if (config_load(&cfg, path, &err))
		return dsv3_report(VERIFY_PROG, &err);
	problem_list problems = { 0 };
	ckpt_dir d;
	if (ckpt_dir_open(&d, dir, &problems, &err)) {
		problem_list_report(&problems, NULL);
		problem_list_free(&problems);
		return dsv3_report(VERIFY_PROG, &err);
	}
	print_variant(&d, path);
	size_t checked = 0;
	int with_mtp = 0;
	if (check_structure(&d, &cfg, &problems, &checked, &with_mtp, &err))
		problem_add_error(&problems, &err);
	int rc = problem_list_report(&problems, NULL);
	if (rc == DSV3_OK)
		printf("OK: %zu tensors in %zu files match %s (%s layout%s%s)\n", checked,
		       d.n_files, path, d.converted ? "converted" : "Hugging Face",
		       with_mtp ? ", with MTP" : "", cfg.fp8 ? ", FP8" : "");
	else
		fprintf(stderr, VERIFY_PROG " ckpt: %zu problem(s) in %s\n", problems.n, dir);
	problem_list_free(&problems);
	ckpt_dir_close(&d);
	return rc;
}
