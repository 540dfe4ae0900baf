/* The DeepSeek-V3 / V2 model on the CPU (DESIGN §4): weights read in place from an HF directory
 * or from converted model{r}-mp{N} shards, a KV cache of only the compressed latent c and the
 * rope key k_pe per token, and forward() for one token of one sequence. */
#ifndef DSV3_MODEL_H
#define DSV3_MODEL_H
#include "config.h"
#include "error.h"
#include "ops.h"
#include "threadpool.h"

#define MODEL_DEFAULT_MAX_SEQ_LEN 16384 /* as the official demo */

/* The numbers forward() needs, derived once from dsv3_config and max_seq_len. */
typedef struct {
	dsv3_config c;
	int max_seq_len;
	int q_head_dim;      /* qk_nope + qk_rope */
	float softmax_scale; /* with mscale^2 when max_seq_len > original_seq_len */
	float eps;           /* 1e-6 */
	/* Tensor parallelism (DESIGN §5): rank `rank` of `world` holds H / world heads, its slices
	 * of the split weights and experts [rank * E / world, (rank + 1) * E / world). */
	int rank, world;
	int n_local_heads;
	int vocab_lo, vocab_n; /* the embedding and head rows this rank holds */
} Config;

typedef struct {
	weight_view wq, wq_a, q_norm, wq_b; /* wq when q_lora_rank == 0, else wq_a/q_norm/wq_b */
	weight_view wkv_a, kv_norm, wkv_b, wo;
	weight_view attn_norm, ffn_norm;
	/* Dense MLP (layer < n_dense_layers) or the shared experts. */
	weight_view w1, w2, w3;
	weight_view gate, gate_bias; /* gate_bias.rows == 0 when absent */
	weight_view *ew1, *ew2, *ew3; /* routed experts, n_routed_experts each */
} LayerWeights;

struct model_files; /* private: the mapped files */

typedef struct {
	weight_view embed, norm, head;
	LayerWeights *layers;
	int has_gate_bias;
	struct model_files *files;
} Weights;

/* Preallocated buffers for n_seqs sequences; nothing is allocated per token. */
typedef struct {
	int n_seqs;
	float *x, *xn, *tmp;      /* [dim] */
	float *q_a, *q;           /* [q_lora], [H * q_head_dim] */
	float *kv;                /* [lora + rope] */
	float *attn_out;          /* [H * v] */
	float *h1, *h3;           /* [max(inter, shared width, moe_inter)] */
	float *moe_out;           /* [dim] */
	float *scores, *scores0, *bias; /* [n_routed_experts] */
	float *group_score;       /* [n_groups] */
	int *topk;                /* [n_activated] */
	float *att_scratch;       /* [H * (2 * lora + max_seq_len)] */
	float *rope_cos, *rope_sin; /* [rope / 2] of the current position */
	float *inv_freq;          /* [rope / 2], YaRN-corrected */
	float *cache_c;           /* [n_seqs, n_layers, max_seq_len, lora] */
	float *cache_pe;          /* [n_seqs, n_layers, max_seq_len, rope] */
	float *logits;            /* [vocab] */
	float *logits_local;      /* [vocab / world]: this rank's rows of the head, gathered */
	/* forward_prompt's chunk of up to PREFILL_CHUNK tokens: [chunk, width] each. */
	struct {
		float *x, *xn, *tmp, *moe_out, *q_a, *q, *kv, *attn_out, *h1, *h3;
		float *gx, *gout;        /* the tokens routed to one expert, gathered */
		float *cos_a, *sin_a;    /* [chunk, rope / 2] */
		float *weights;          /* [chunk, n_activated] */
		int *topk, *rows;        /* [chunk, n_activated], [chunk] */
	} chunk;
} RunState;

#define PREFILL_CHUNK 32

/* Where the forward pass runs (DESIGN §5): the CPU backend (cpu/ops_cpu.c) or the CUDA one
 * (cuda/, built when nvcc is found). MODEL_DEVICE_AUTO picks CUDA when it is built and a GPU
 * is visible, the CPU otherwise. */
typedef enum { MODEL_DEVICE_AUTO = 0, MODEL_DEVICE_CPU, MODEL_DEVICE_CUDA } model_device;

struct cuda_model; /* cuda_model.h */
struct comm;       /* comm.h */

typedef struct {
	Config config;
	Weights weights;
	RunState state;
	thread_pool *pool;
	model_device device;     /* CPU or CUDA once open, never AUTO */
	struct cuda_model *gpu;  /* the device copy of the weights and state; NULL on the CPU */
	float *batch_logits;     /* [n_seqs, vocab]: forward_batch's result */
	struct comm *comm;       /* the tensor-parallel ranks; NULL: one */
} Model;

/* Opens a checkpoint directory (HF layout, FP8 or BF16, or converted model{r}-mp{N} shards,
 * merged on load) with its config.json; allocates the state for n_seqs sequences.
 * max_seq_len <= 0 means MODEL_DEFAULT_MAX_SEQ_LEN; n_threads <= 0 means all cores.
 * A missing or misshapen tensor is DSV3_EDATA naming it. */
int model_open(Model *m, const char *dir, int max_seq_len, int n_seqs, int n_threads,
	       dsv3_error *err);
/* The same with the config read from config_path (an HF config.json or the official demo's
 * config, e.g. config_671B.json) instead of DIR/config.json; NULL means DIR/config.json. */
int model_open_config(Model *m, const char *dir, const char *config_path, int max_seq_len,
		      int n_seqs, int n_threads, dsv3_error *err);
/* The same on a chosen device ("cpu", "cuda" or "auto" through model_device_parse). */
int model_open_device(Model *m, const char *dir, const char *config_path, int max_seq_len,
		      int n_seqs, int n_threads, model_device device, dsv3_error *err);
/* Rank comm_rank(c) of comm_size(c) tensor-parallel ranks (DESIGN §5): DIR must hold converted
 * shards model{r}-mp{N} with N the number of ranks, and only this rank's file is mapped. Every
 * rank must then make the same forward calls with the same arguments; each returns the whole
 * logits. c NULL (or of size 1): model_open_device. */
int model_open_parallel(Model *m, const char *dir, const char *config_path, int max_seq_len,
			int n_seqs, int n_threads, model_device device, struct comm *c,
			dsv3_error *err);
void model_close(Model *m);
/* "cpu", "cuda" or "auto" -> *out; anything else is DSV3_EUSAGE. */
int model_device_parse(const char *name, model_device *out, dsv3_error *err);
const char *model_device_name(model_device d);

/* Feeds `token` at position `pos` of sequence `seq` (positions 0..pos-1 must have been fed);
 * returns the logits [vocab] for the next token (state.logits on the CPU, the CUDA backend's
 * host buffer on the GPU), valid until the next call. */
float *forward(Model *m, int seq, int token, int pos);
/* The same without the head: for prompt tokens whose next-token logits nobody reads. */
void forward_no_logits(Model *m, int seq, int token, int pos);
/* Feeds tokens[0:n] at positions pos..pos+n-1 of sequence `seq`, PREFILL_CHUNK at a time so
 * each weight is read once per chunk; returns the logits after the last one. Every number
 * equals forward()'s token by token, bit for bit. */
float *forward_prompt(Model *m, int seq, const int *tokens, int n, int pos);
/* One decode step of n sequences together: token tokens[i] at position pos[i] of sequence
 * seqs[i] (distinct sequences, n <= n_seqs). Returns [n, vocab] logits in the order given,
 * valid until the next call; on the CPU each row equals forward()'s, on CUDA the step is one
 * graph replay. */
float *forward_batch(Model *m, int n, const int *seqs, const int *tokens, const int *pos);

/* The derived numbers of DESIGN §4 (exposed for tests). */
float model_softmax_scale(const dsv3_config *c, int max_seq_len);
/* inv_freq[i], i < rope_dim / 2, with YaRN when max_seq_len > original_seq_len. */
void model_rope_freqs(float *inv_freq, const dsv3_config *c, int max_seq_len);

#endif
