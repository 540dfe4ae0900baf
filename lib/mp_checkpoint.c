#include "mp_checkpoint.h"

#include "manifest.h"
#include "out_dir.h"

int mp_write_checkpoint(const char *in_dir, const char *out, const mp_tensor *t, size_t n,
			int mp, int n_experts, int threads, mp_stats *stats, size_t *n_small,
			dsv3_error *err)
{
	out_dir o;
	manifest m;
	manifest_init(&m);
	int rc = out_dir_open(&o, out, err);
	if (rc) {
		manifest_free(&m);
		return rc;
	}
	rc = mp_copy_small_files(in_dir, &o, &m, n_small, err);
	if (!rc)
		rc = mp_write(t, n, mp, n_experts, threads, &o, &m, stats, err);
	if (!rc)
		rc = manifest_write(&m, &o, err);
	if (!rc)
		rc = out_dir_commit(&o, err);
	out_dir_close(&o);
	manifest_free(&m);
	return rc;
}
