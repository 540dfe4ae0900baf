/* Token sampling as DeepSeek-V3's official demo (generate.py) does it: temperature 0 is argmax;
 * otherwise probs = softmax(logits / T) and the token is argmax(probs / E) with E ~ Exp(1) drawn
 * per vocabulary entry (the "exponential race", equivalent to sampling from probs). E comes from
 * a seeded splitmix64 stream per sequence, so a --seed reproduces the text. */
#ifndef DSV3_SAMPLING_H
#define DSV3_SAMPLING_H
#include <stdint.h>

typedef struct {
	uint64_t state; /* splitmix64 */
} sampler;

/* Sequence `seq` of a run seeded with `seed` gets its own stream. */
void sampler_init(sampler *s, uint64_t seed, int seq);
/* Next uniform double in (0, 1] (53 bits). */
double sampler_uniform(sampler *s);
/* Index of the largest logit; the lowest index wins ties (as torch.argmax). */
int sample_argmax(const float *logits, int n);
/* The demo's rule; temperature <= 0 is argmax. `probs` is scratch of n floats (no allocation). */
int sample_token(sampler *s, const float *logits, int n, float temperature, float *probs);

#endif
