#!/bin/bash
# The CPU engine's speed against the memory-bandwidth floor (DESIGN §7):
#   a synthetic FP8 model of DeepSeek-V2-Lite widths (bench/v2-lite-width.config.json: dim 2048,
#   8 layers, 64 experts of 1408 with 6 routed + 2 shared per token, DeepSeek-V3's vocabulary so
#   the real tokenizer applies), one prompt, greedy decode with dsv3-generate;
#   floor = bytes of weights one decoded token reads / read bandwidth measured by bench/membw.c.
set -euo pipefail
bin=${DSV3_BIN:?}
here=$(cd "$(dirname "$0")" && pwd)
root=${BENCH_DIR:-bench/data}
threads=${THREADS:-$(nproc)}
new=${NEW_TOKENS:-64}
mkdir -p "$root"
ckpt=$root/v2-lite-width
[ -f "$ckpt/SHA256SUMS" ] || "$bin/dsv3-synth" --config "$here/v2-lite-width.config.json" --seed 1 \
	--tokenizer "${TOKENIZER:-.deps/tokenizer}" --out "$ckpt" 2>/dev/null
cc -O2 -pthread -o "$root/membw" "$here/membw.c"
bw=$("$root/membw" 512 "$threads" | cut -d' ' -f1)
bytes=$(python3 - "$ckpt/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
d, H, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
fp8 = "quantization_config" in c
def lin(o, i):  # bytes of one linear weight as the checkpoint stores it, scales included
    return o * i + (-(-o // 128)) * (-(-i // 128)) * 4 if fp8 else 2 * o * i
nope, rope, v, lora = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
q = lin(H * (nope + rope), d) if not c.get("q_lora_rank") else \
    lin(c["q_lora_rank"], d) + lin(H * (nope + rope), c["q_lora_rank"])
att = q + lin(lora + rope, d) + lin(H * (nope + v), lora) + lin(d, H * v)
mlp = lambda w: 3 * lin(w, d)
dense = c.get("first_k_dense_replace", 0)
k, shared, E, mi = c["num_experts_per_tok"], c["n_shared_experts"], c["n_routed_experts"], c["moe_intermediate_size"]
moe = k * mlp(mi) + mlp(shared * mi) + 2 * E * d
norms = 2 * d * (2 * L + 1)
total = L * att + dense * mlp(c["intermediate_size"]) + (L - dense) * moe + 2 * c["vocab_size"] * d + 2 * d + norms
print(total)
PY
)
prompt="Write a short story about a robot who learns to paint, in three paragraphs, with a title."
out=$("$bin/dsv3-generate" --ckpt-path "$ckpt" --threads "$threads" --temperature 0 \
	--max-new-tokens "$new" --input-file <(echo "$prompt") 2>&1 >/dev/null | grep '^prefill:')
decode=$(echo "$out" | sed -n 's/.*decode: .*(\([0-9.]*\) tokens\/s).*/\1/p')
prefill=$(echo "$out" | sed -n 's/^prefill: .*(\([0-9.]*\) tokens\/s);.*/\1/p')
python3 - "$bytes" "$bw" "$decode" "$prefill" "$threads" <<'PY'
import sys
b, bw, dec, pre, t = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
floor = bw * 1e9 / b
print(f"| {t} threads | {b/1e6:.0f} MB/token | {bw:.1f} GB/s | floor {floor:.2f} tok/s | decode {dec:.2f} tok/s ({100*dec/floor:.0f}% of floor) | prefill {pre:.1f} tok/s |")
PY
