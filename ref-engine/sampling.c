/* Sampling of the official demo (see sampling.h). */
#include "sampling.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void sampler_init(sampler *s, uint64_t seed, int seq)
{
	/* Mix the sequence in through one splitmix step so nearby seeds/sequences do not overlap. */
	uint64_t x = seed ^ (0xd1b54a32d192ed03ull * (uint64_t)(seq + 1));
	s->state = splitmix64(&x);
}

double sampler_uniform(sampler *s)
{
	/* 53 random bits k in [0, 2^53): (k + 1) / 2^53 lies in (0, 1], so -log never sees 0. */
	return (double)((splitmix64(&s->state) >> 11) + 1) * 0x1p-53;
}

int sample_argmax(const float *logits, int n)
{
	int best = 0;
	for (int i = 1; i < n; i++)
		if (logits[i] > logits[best])
			best = i;
	return best;
}

/* probs = softmax(logits / t) in fp32 with the max subtracted first. */
static void softmax_t(float *probs, const float *logits, int n, float t)
{
	float mx = logits[sample_argmax(logits, n)] / t;
	double sum = 0;
	for (int i = 0; i < n; i++) {
		probs[i] = expf(logits[i] / t - mx);
		sum += probs[i];
	}
	float inv = (float)(1.0 / sum);
	for (int i = 0; i < n; i++)
		probs[i] *= inv;
}

int sample_token(sampler *s, const float *logits, int n, float temperature, float *probs)
{
	if (temperature <= 0)
		return sample_argmax(logits, n);
	softmax_t(probs, logits, n, temperature);
	int best = 0;
	double best_v = -1;
	for (int i = 0; i < n; i++) {
		double e = -log(sampler_uniform(s)); /* Exp(1) */
		double v = probs[i] / e;
		if (v > best_v)
			best_v = v, best = i;
	}
	return best;
}
