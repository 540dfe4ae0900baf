/* The preflight of a tensor-parallel job (parallel.h). */
#include "parallel.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_ckpt.h"
#include "sha256.h"

int parallel_shard_count(const char *dir, int *mp, dsv3_error *err)
{
	char **names = NULL;
	size_t n = 0;
	int rc = dir_glob(dir, "model*-mp*.safetensors", &names, &n, err);
	*mp = 0;
	for (size_t i = 0; !rc && i < n; i++) {
		int r, m;
		if (sscanf(names[i], "model%d-mp%d.safetensors", &r, &m) != 2 || m < 1) {
			rc = dsv3_fail(err, DSV3_EDATA, "%s: %s is not a model{r}-mp{N} name", dir,
				       names[i]);
		} else if (*mp && m != *mp) {
			rc = dsv3_fail(err, DSV3_EDATA, "%s holds shards of mp %d and of mp %d "
				       "(e.g. %s): one conversion per directory", dir, *mp, m,
				       names[i]);
		} else {
			*mp = m;
		}
	}
	if (!rc && n == 0)
		rc = dsv3_fail(err, DSV3_EUSAGE, "%s has no model{r}-mp{N}.safetensors: several "
			       "ranks run the shards of dsv3-convert --model-parallel N", dir);
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	return rc;
}

static int check_split(const dsv3_config *cfg, int world, const char *dir, dsv3_error *err)
{
	const struct {
		const char *what;
		int n;
	} parts[] = { { "attention heads", cfg->n_heads },
		      { "vocabulary rows", cfg->vocab_size },
		      { "routed experts", cfg->n_routed_experts } };
	for (size_t i = 0; i < sizeof parts / sizeof *parts; i++)
		if (parts[i].n % world)
			return dsv3_fail(err, DSV3_EUSAGE, "%s/config.json: %d %s cannot be split "
					 "among %d ranks", dir, parts[i].n, parts[i].what, world);
	return 0;
}

/* SHA-256 of DIR/name, or of nothing when it is absent. */
static int digest_of(const char *dir, const char *name, uint8_t out[32], dsv3_error *err)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	FILE *f = fopen(path, "rb");
	if (!f) {
		if (errno != ENOENT)
			return dsv3_fail_errno(err, "cannot open %s", path);
		sha256_buffer("", 0, out);
		return 0;
	}
	fclose(f);
	return sha256_file(path, out, err);
}

/* This rank's manifests against rank 0's. */
static int same_checkpoint(comm *c, const char *dir, dsv3_error *err)
{
	static const char *const names[] = { "config.json", "tensors.sha256.json" };
	for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
		uint8_t mine[32], root[32];
		int rc = digest_of(dir, names[i], mine, err);
		if (rc)
			return rc;
		memcpy(root, mine, 32);
		comm_broadcast(c, root, sizeof root, 0);
		if (memcmp(mine, root, 32) != 0)
			return dsv3_fail(err, DSV3_EDATA, "%s/%s differs from rank 0's: the ranks "
					 "hold shards of different checkpoints or conversions",
					 dir, names[i]);
	}
	return 0;
}

int parallel_preflight(comm *c, const char *dir, const dsv3_config *cfg, dsv3_error *err)
{
	int world = comm_size(c), mp;
	int rc = parallel_shard_count(dir, &mp, err);
	if (!rc && mp != world)
		rc = dsv3_fail(err, DSV3_EUSAGE, "%s holds shards for %d ranks (model*-mp%d), the "
			       "job has %d: run mpirun -np %d, or dsv3-shard --model-parallel %d",
			       dir, mp, mp, world, mp, world);
	if (!rc)
		rc = check_split(cfg, world, dir, err);
	char path[4096];
	snprintf(path, sizeof path, "%s/model%d-mp%d.safetensors", dir, comm_rank(c), world);
	FILE *f = rc ? NULL : fopen(path, "rb");
	if (!rc && !f)
		rc = dsv3_fail_errno(err, "rank %d needs %s", comm_rank(c), path);
	if (f)
		fclose(f);
	/* A rank that failed above ends the job before this collective can wait for it. */
	if (!rc)
		rc = same_checkpoint(c, dir, err);
	return rc;
}
