/* Which tensors the tools that write checkpoints have a rule for (issue 7 §5), in one place:
 * dsv3-convert, dsv3-shard, dsv3-bf16-to-fp8, dsv3-fp8-to-bf16 and dsv3-plan refuse, before
 * anything is written, every tensor these rules find no rule for, all of them listed, rather
 * than copy bytes they cannot vouch for. A 1-byte tensor is always either an F8_E4M3 weight
 * with its F32 scale under the name the tools read, or an error. docs/tools.md, "What the tools
 * refuse", lists the rules. */
#ifndef DSV3_TENSOR_RULES_H
#define DSV3_TENSOR_RULES_H
#include <stddef.h>
#include "hf_ckpt.h"
#include "problems.h"
#include "safetensors.h"

/* The tool handles every module alike, by dtype (dsv3-fp8-to-bf16, as DeepSeek's
 * fp8_cast_bf16.py): module names are not judged, only scales and 1-byte tensors. */
#define TENSOR_RULES_ANY_MODULE 1u
/* The caller itself names each F8_E4M3 weight without its scale (dsv3-fp8-to-bf16 and
 * dsv3-convert --dtype bf16 check the scale's shape too): that check is left out here. */
#define TENSOR_RULES_OWN_SCALE_CHECK 2u

/* Judged by name and dtype alone: 1 with the reason in why (len bytes) when no tool has a rule
 * for the tensor, 0 when one has. `converted`: a name of the model{r}-mp{N} layout, else an HF
 * name. The reasons, in the order tried:
 *	"V3.2-Exp indexer: no rule"  (the variant named by lib/variant.h; not with ANY_MODULE)
 *	"a scale under a name the tools do not know (they read M.weight_scale_inv)"
 *		(M.scale when converted)
 *	"unknown tensor name (...)"  (a module or leaf no rule maps; not with ANY_MODULE)
 *	"1-byte DTYPE tensor: no rule (...)"  (F8_E5M2, I8, U8, BOOL)
 *	"F8_E4M3, but only a NAME.weight tensor has a scale"
 *	"a scale must be F32, not DTYPE" */
int tensor_rule_by_name(const char *name, st_dtype dtype, int converted, unsigned flags,
			char *why, size_t len);

/* HF tensor t of file f in c: adds "PATH: tensor NAME: why" for the name rule it breaks, else
 * for its scale: an F8_E4M3 weight's NAME_scale_inv must be somewhere in c ("F8_E4M3 without its
 * scale S", or "F8_E4M3 with its scale under a name the tools do not know: O (expected S)" when
 * the weight's own file holds a look-alike O), and a scale's weight must be an F8_E4M3 tensor of
 * c ("scale of W, which is DTYPE, not F8_E4M3" / "scale of W, which is not in the checkpoint").
 * Returns how many problems were added (0 or 1). */
size_t tensor_rules_check_hf(const hf_ckpt *c, const st_file *f, const st_tensor *t,
			     unsigned flags, problem_list *pr);
/* tensor_rules_check_hf on every tensor of c; returns how many problems were added. */
size_t tensor_rules_check_hf_ckpt(const hf_ckpt *c, unsigned flags, problem_list *pr);
/* The same for a tensor of a converted rank file, whose weight and NAME.scale share the file. */
size_t tensor_rules_check_converted(const st_file *f, const st_tensor *t, problem_list *pr);

#endif
