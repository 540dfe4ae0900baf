#!/bin/bash
# The CUDA engine's benchmarks of issue 6, run ON the GPU machine from the repo root:
#   the device's copy bandwidth and BF16 matmul rate (dsv3-gpu-peak), then dsv3-generate on the
#   bench shape (../shared/bench/v3-width-2layer.config.json: DeepSeek-V3's widths, 2 layers),
#   FP8 and its BF16 cast: batch-1 decode, 8 sequences decoding together, prefill of 512 and 4096
#   tokens; each figure against its floor (bytes per token / copy bandwidth for decode, FLOPs per
#   token / measured matmul rate for prefill) and the peer's (llama.cpp b10573, same GPU kind).
#
# usage: DSV3_BIN=DIR OUT=DIR bash bench/gpu.sh [CONFIG]
#   CONFIG      the shape's config.json (default bench/data/v3-width-2layer.config.json; ../shared
#               does not travel to the GPU machine, so copy it there first), or env CONFIG
#   DATA        where the checkpoints are synthesised once and the results kept (/tmp/dsv3-bench)
#   TOKENIZER   tokenizer dir (default: bench/data/tokenizer, else .deps/tokenizer)
#   STEPS       subset of "peak synth fp8 bf16" to run (default all); the report always prints what
#               $DATA/results.txt holds, so a run can be split over several calls (10 min limit each)
#   PAIRS=0     skip the second (short) run of each figure: half the engine runs, one-run figures
#   DEVICE      engine device (cuda); THREADS: --threads of the engine and synth (16)
#   DRY_RUN=1   no GPU: a small synthetic model with the real vocabulary, --device cpu, made-up
#               peak figures; checks the whole pipeline and the parsing
# Everything printed also goes to $OUT/gpu_bench.txt; each step's stdout/stderr to $OUT/NAME.*.
# Exit 1 if any step failed (the others still run).
set -euo pipefail
bin=$(cd "${DSV3_BIN:?set DSV3_BIN to the binaries}" && pwd)
out=${OUT:?set OUT to a results folder}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
dry=${DRY_RUN:-0}
data=${DATA:-/tmp/dsv3-bench}
device=${DEVICE:-cuda}
threads=${THREADS:-16}
steps=" ${STEPS:-peak synth fp8 bf16} "
config=${1:-${CONFIG:-bench/data/v3-width-2layer.config.json}}
prompts=$here/gpu_prompts
failed=0
[ "$dry" = 1 ] && { data=${DATA:-/tmp/dsv3-bench-dry}; device=${DEVICE:-cpu}; threads=${THREADS:-2}; }
mkdir -p "$data"
results=$data/results.txt
touch "$results"
exec > >(tee -a "$out/gpu_bench.txt") 2>&1

tok=${TOKENIZER:-}
for t in "$tok" bench/data/tokenizer .deps/tokenizer; do
	if [ -n "$t" ] && [ -f "$t/tokenizer.json" ]; then
		tok=$t
		break
	fi
done
[ -f "$tok/tokenizer.json" ] || { echo "gpu.sh: no tokenizer (set TOKENIZER=DIR)"; exit 1; }

# The arithmetic, in Python: "bytes CONFIG" (weight bytes one decoded token reads at batch 1),
# "bytes8 CONFIG" (the same with 8 x k distinct experts, 8 sequences that share none), "flops
# CONFIG N" (FLOPs per token of an N-token prefill), "report RESULTS" (the final table).
read -r -d '' PY <<'PYEOF' || true
import json, sys

def shape(path):
    c = json.load(open(path))
    return c, "quantization_config" in c

def lin_bytes(c, fp8, o, i):  # one linear weight as stored, block scales included
    return o * i + (-(-o // 128)) * (-(-i // 128)) * 4 if fp8 else 2 * o * i

def linears(c):  # (out, in) of the linear weights one token uses: attention, dense MLP, one expert, shared
    d, H = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v, lora = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    qr = c.get("q_lora_rank")
    att = ([(qr, d), (H * (nope + rope), qr)] if qr else [(H * (nope + rope), d)]) + \
          [(lora + rope, d), (H * (nope + v), lora), (d, H * v)]
    mlp = lambda w: [(w, d), (w, d), (d, w)]
    return att, mlp(c["intermediate_size"]), mlp(c["moe_intermediate_size"]), \
        mlp(c["n_shared_experts"] * c["moe_intermediate_size"])

def bytes_per_token(path, experts=None):
    # batch 1 reads the attention, the dense MLP or the k routed + shared experts of each layer,
    # the gate, the norms and the head (the embedding row is negligible)
    c, fp8 = shape(path)
    d, L, dense = c["hidden_size"], c["num_hidden_layers"], c.get("first_k_dense_replace", 0)
    att, mlp, expert, shared = linears(c)
    k = experts or c["num_experts_per_tok"]
    b = lambda ws: sum(lin_bytes(c, fp8, o, i) for o, i in ws)
    moe = k * b(expert) + b(shared) + 2 * c["n_routed_experts"] * d
    norms = 2 * d * (2 * L + 1)
    return L * b(att) + dense * b(mlp) + (L - dense) * moe + 2 * c["vocab_size"] * d + norms

def flops_per_token(path, n):
    # 2 x the active weights of every linear, the causal attention at the mean context (scores
    # over nope+rope, values over v, per head), the head once per prompt
    c, _ = shape(path)
    d, L, H = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    dense = c.get("first_k_dense_replace", 0)
    att, mlp, expert, shared = linears(c)
    p = lambda ws: sum(o * i for o, i in ws)
    moe = c["num_experts_per_tok"] * p(expert) + p(shared) + c["n_routed_experts"] * d
    lin = L * p(att) + dense * p(mlp) + (L - dense) * moe
    attn = L * 2 * H * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]) * (n + 1) / 2
    return 2 * lin + attn + 2 * c["vocab_size"] * d / n

PEER = {
    ("fp8", "decode1"): "llama.cpp Q8_0 1.283 ms; aim <= 1.2 ms",
    ("bf16", "decode1"): "llama.cpp BF16 1.957 ms; aim <= 1.6 ms",
    ("fp8", "decode8"): "llama.cpp Q8_0 2,745 tok/s; aim >= 4,000",
    ("bf16", "decode8"): "llama.cpp BF16 2,105 tok/s",
    ("fp8", "prefill512"): "llama.cpp Q8_0 43,200 tok/s; aim >= 75,000",
    ("bf16", "prefill512"): "llama.cpp BF16 54,100 tok/s; aim >= 75,000",
    ("fp8", "prefill4096"): "-",
    ("bf16", "prefill4096"): "-",
}

def report(path):
    r = {}
    for line in open(path):
        k, _, v = line.strip().partition(" ")
        if k:
            r[k] = v
    def num(k):
        try:
            return float(r[k])
        except (KeyError, ValueError):
            return None
    def warm(key, what):
        # (tokens/s of the work the long run did beyond the short one, tokens of that work,
        # tokens/s of the long run alone); the first two are None without both runs
        nl, tl = num(f"{key}.{what}_n"), num(f"{key}.{what}_tps")
        ns, ts = num(f"{key}.short.{what}_n"), num(f"{key}.short.{what}_tps")
        if nl and tl and ns and ts and nl > ns and nl / tl > ns / ts:
            return (nl - ns) / (nl / tl - ns / ts), int(nl - ns), tl
        return None, None, tl
    def rate(m, p="tflops_"):  # the mean measured matmul rate at M = m rows, else the 8192^3 one
        v = [num(k) for k in r if k.startswith(f"{p}{m}x")] or [num(k) for k in r if k == f"{p}8192x8192x8192"]
        v = [x for x in v if x]
        return sum(v) / len(v) * 1e12 if v else None
    rows = [("measure", "value", "floor", "fraction of floor", "peer / aim")]
    bw = num("copy_GBps")
    rows.append(("device", r.get("device", "?").replace("_", " "), "", "", ""))
    rows.append(("copy bandwidth (read + write)", f"{bw:,.0f} GB/s" if bw else "(not run)", "", "",
                 "2,990 GB/s on the peer's H100"))
    for k in sorted(k for k in r if k.startswith("tflops_")):
        rows.append((f"bf16 matmul {k[7:]} (cuBLAS)", f"{num(k):.1f} TFLOP/s", "", "", ""))
    for k in sorted(k for k in r if k.startswith("fp8tflops_")):
        mode, _, sh = k[10:].partition("_")
        rows.append((f"fp8 matmul {sh} {mode} scales (cuBLASLt)", f"{num(k):.1f} TFLOP/s", "", "", ""))
    for fmt in ("fp8", "bf16"):
        F = fmt.upper()
        b1, b8 = num(f"bytes_{fmt}"), num(f"bytes8_{fmt}")
        t, n, one = warm(f"{fmt}.decode1", "decode")
        what = f"{F} decode, batch 1 ({n} warm steps)" if t else f"{F} decode, batch 1 (one run)"
        t = t or one
        if t and bw and b1:
            ms, floor_ms = 1e3 / t, b1 / (bw * 1e9) * 1e3
            rows.append((what, f"{ms:.3f} ms/token ({t:,.0f} tok/s; one run {1e3/one:.3f} ms)",
                         f"{floor_ms:.3f} ms ({b1/1e9:.2f} GB / copy bw)", f"{floor_ms/ms:.0%}", PEER[fmt, "decode1"]))
        else:
            rows.append((what, f"{1e3/t:.3f} ms/token" if t else "(not run)", "", "", PEER[fmt, "decode1"]))
        t, n, one = warm(f"{fmt}.decode8", "decode")
        what = f"{F} decode, 8 sequences ({n} warm tokens)" if t else f"{F} decode, 8 sequences (one run)"
        t = t or one
        if t and bw and b1:
            hi = 8 * bw * 1e9 / b1
            lo = f"; {8 * bw * 1e9 / b8:,.0f} if no expert is shared" if b8 else ""
            rows.append((what, f"{t:,.0f} tok/s (one run {one:,.0f})",
                         f"{hi:,.0f} tok/s (experts shared{lo})", f"{t/hi:.0%}", PEER[fmt, "decode8"]))
        else:
            rows.append((what, f"{t:,.0f} tok/s" if t else "(not run)", "", "", PEER[fmt, "decode8"]))
        for m in (512, 4096):
            key = f"{fmt}.prefill{m}"
            t, n, _ = warm(key, "prefill")
            one = num(f"{key}.short.prefill_tps")
            what = f"{F} prefill, {m} tokens ({n} warm tokens)" if t else f"{F} prefill, {m} tokens (one batch)"
            t = t or num(f"{key}.prefill_tps")
            alone = f"; one prompt alone {one:,.0f} tok/s" if one else ""
            fl, R = num(f"flops_{fmt}.{m}"), rate(m)
            if t and fl and R:
                floor = R / fl
                R8 = rate(m, "fp8tflops_block128_") if fmt == "fp8" else None
                f8 = f"; {R8 / fl:,.0f} at {R8/1e12:.0f} TFLOP/s fp8 block128" if R8 else ""
                rows.append((what, f"{t:,.0f} tok/s ({t*fl/1e12:.1f} TFLOP/s{alone})",
                             f"{floor:,.0f} tok/s ({fl/1e9:.2f} GFLOP/token at {R/1e12:.0f} TFLOP/s bf16{f8})",
                             f"{t/floor:.0%}", PEER[fmt, f"prefill{m}"]))
            else:
                rows.append((what, f"{t:,.0f} tok/s" if t else "(not run)", "", "", PEER[fmt, f"prefill{m}"]))
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(row)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (x + 2) for x in w) + "|")

mode = sys.argv[1]
if mode == "bytes":
    print(bytes_per_token(sys.argv[2]))
elif mode == "bytes8":
    c, _ = shape(sys.argv[2])
    print(bytes_per_token(sys.argv[2], min(c["n_routed_experts"], 8 * c["num_experts_per_tok"])))
elif mode == "flops":
    print(round(flops_per_token(sys.argv[2], int(sys.argv[3]))))
else:
    report(sys.argv[2])
PYEOF

# record KEY VALUE: keeps the latest value of KEY in $results.
record() {
	grep -v "^$1 " "$results" > "$results.tmp" || true
	echo "$1 $2" >> "$results.tmp"
	mv "$results.tmp" "$results"
}

# step NAME CMD...: runs CMD with its stdout and stderr in $out/NAME.{stdout,stderr}, echoing the
# command; a failure is reported and counted, not fatal.
step() {
	local name=$1
	shift
	echo "+ $*"
	local t0=$SECONDS
	if "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"; then
		echo "  ($name: $((SECONDS - t0)) s)"
		return 0
	fi
	echo "FAILED: $name (see $out/$name.stderr):"
	tail -n 5 "$out/$name.stderr" | sed 's/^/  /'
	failed=$((failed + 1))
	return 1
}

peak() {
	if [ "$dry" = 1 ]; then
		echo "DRY_RUN: made-up peak figures (100 GB/s, 1 TFLOP/s)"
		record copy_GBps 100
		for s in 8192x8192x8192 512x7168x7168 4096x7168x7168; do record "tflops_$s" 1; done
		record fp8tflops_block128_512x7168x7168 2
		return
	fi
	step nvidia-smi nvidia-smi -L && cat "$out/nvidia-smi.stdout"
	local peak_bin=$bin/dsv3-gpu-peak
	if ! "$peak_bin" --help > /dev/null 2>&1; then
		# not built (CUDA=0) or not runnable on this image: build it here
		peak_bin=$data/dsv3-gpu-peak
		step nvcc-gpu-peak nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
			-gencode=arch=compute_80,code=compute_80 -o "$peak_bin" "$here/gpu_peak.cu" -lcublasLt -lcublas || return 0
	fi
	step gpu-peak "$peak_bin" || true
	cat "$out/gpu-peak.stdout"
	local v
	v=$(sed -n 's/^device: //p' "$out/gpu-peak.stdout" | tr ' ' '_')
	[ -z "$v" ] || record device "$v"
	v=$(sed -n 's/^copy_bandwidth_GBps: //p' "$out/gpu-peak.stdout")
	[ -z "$v" ] || record copy_GBps "$v"
	sed -n 's/^bf16_gemm_TFLOPs \([0-9x]*\): \(.*\)/\1 \2/p' "$out/gpu-peak.stdout" |
		while read -r shape rate; do record "tflops_$shape" "$rate"; done
	sed -n 's/^fp8_gemm_TFLOPs \([0-9x]*\) \([a-z0-9]*\): \(.*\)/\2_\1 \3/p' "$out/gpu-peak.stdout" |
		while read -r shape rate; do record "fp8tflops_$shape" "$rate"; done
}

# A config of the bench shape's structure at small width with the real vocabulary (so the
# tokenizer applies), for DRY_RUN.
dry_config() {
	python3 - "$config" "$data/dry.config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
         num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
         q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
	config=$data/dry.config.json
}

synth() {
	[ "$dry" = 1 ] && dry_config
	[ -f "$config" ] || { echo "gpu.sh: no config $config (copy ../shared/bench/v3-width-2layer.config.json there)"; failed=$((failed + 1)); return 0; }
	if [ ! -f "$data/fp8/SHA256SUMS" ]; then
		rm -rf "$data/fp8"
		step synth "$bin/dsv3-synth" --config "$config" --seed 1 --out "$data/fp8" --threads "$threads" \
			--tokenizer "$tok" || return 0
	fi
	if [ ! -f "$data/bf16/SHA256SUMS" ]; then
		rm -rf "$data/bf16"
		step fp8-to-bf16 "$bin/dsv3-fp8-to-bf16" --input-fp8-hf-path "$data/fp8" \
			--output-bf16-hf-path "$data/bf16" --threads "$threads" || return 0
	fi
	du -sh "$data/fp8" "$data/bf16"
}

# Prints the real chat-format token count of each prompt of FILE (what prefill sees).
prompt_tokens() {
	local line
	while IFS= read -r line; do
		[ -n "$line" ] || continue
		printf '<｜begin▁of▁sentence｜><｜User｜>%s<｜Assistant｜>' "$line" |
			"$bin/dsv3-tokenize" --tokenizer "$tok" | wc -w
	done < "$1"
}

# gen KEY CKPT PROMPTS NEW SEQLEN: one dsv3-generate run; records KEY.prefill_n, KEY.prefill_tps,
# KEY.decode_n, KEY.decode_tps from its "prefill: ...; decode: ..." line.
gen() {
	local key=$1 ckpt=$2 file=$3 new=$4 len=$5
	# a failed run must not leave an older run's figures behind
	grep -Ev "^${key//./\\.}\.(prefill|decode)_(n|tps) " "$results" > "$results.tmp" || true
	mv "$results.tmp" "$results"
	step "$key" "$bin/dsv3-generate" --ckpt-path "$ckpt" --tokenizer "$tok" --device "$device" \
		--threads "$threads" --temperature 0 --max-new-tokens "$new" --max-seq-len "$len" \
		--input-file "$file" || return 0
	local line
	line=$(grep '^prefill: ' "$out/$key.stderr" | tail -n 1) || true
	echo "  $line"
	local v
	v=$(echo "$line" | sed -n 's/^prefill: \([0-9]*\) tokens in [0-9.]* s (\([0-9.]*\) tokens\/s); decode: \([0-9]*\) tokens in [0-9.]* s (\([0-9.]*\) tokens\/s)$/\1 \2 \3 \4/p')
	if [ -z "$v" ]; then
		echo "FAILED: $key: no speed line in $out/$key.stderr"
		failed=$((failed + 1))
		return 0
	fi
	set -- $v
	record "$key.prefill_n" "$1"
	record "$key.prefill_tps" "$2"
	record "$key.decode_n" "$3"
	record "$key.decode_tps" "$4"
}

# copies FILE N: FILE's lines N times over, as a file under $data (N prompts run as one batch).
copies() {
	local f=$data/$(basename "$1" .txt).x$2.txt
	for _ in $(seq "$2"); do cat "$1"; done > "$f"
	echo "$f"
}

# Each figure comes from two runs that differ only in the amount of work (decode steps, or
# prompts prefilled one after the other): the difference of their times is the work done warm,
# free of what the first step pays once (lazy loading, cuBLAS heuristics, graph capture).
engine() {
	local fmt=$1 ckpt=$data/$1 short=${DECODE_SHORT:-32} long=${DECODE_LONG:-160} pairs=${PAIRS:-1}
	[ -f "$ckpt/SHA256SUMS" ] || { echo "gpu.sh: no checkpoint $ckpt (STEPS=synth first)"; failed=$((failed + 1)); return 0; }
	if [ "$pairs" = 0 ]; then
		grep -v "^$fmt\.[a-z0-9]*\.short\." "$results" > "$results.tmp" || true
		mv "$results.tmp" "$results"
	fi
	record "bytes_$fmt" "$(python3 -c "$PY" bytes "$ckpt/config.json")"
	record "bytes8_$fmt" "$(python3 -c "$PY" bytes8 "$ckpt/config.json")"
	record "flops_$fmt.512" "$(python3 -c "$PY" flops "$ckpt/config.json" 512)"
	record "flops_$fmt.4096" "$(python3 -c "$PY" flops "$ckpt/config.json" 4096)"
	gen "$fmt.decode1" "$ckpt" "$prompts/decode1.txt" "$long" 1024
	[ "$pairs" = 0 ] || gen "$fmt.decode1.short" "$ckpt" "$prompts/decode1.txt" "$short" 1024
	gen "$fmt.decode8" "$ckpt" "$prompts/decode8.txt" "$long" 1024
	[ "$pairs" = 0 ] || gen "$fmt.decode8.short" "$ckpt" "$prompts/decode8.txt" "$short" 1024
	gen "$fmt.prefill512" "$ckpt" "$(copies "$prompts/prefill512.txt" 9)" 1 1024
	[ "$pairs" = 0 ] || gen "$fmt.prefill512.short" "$ckpt" "$prompts/prefill512.txt" 1 1024
	gen "$fmt.prefill4096" "$ckpt" "$(copies "$prompts/prefill4096.txt" 3)" 1 8192
	[ "$pairs" = 0 ] || gen "$fmt.prefill4096.short" "$ckpt" "$prompts/prefill4096.txt" 1 8192
}

echo "== gpu.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), device $device, steps:$steps"
echo "prompt tokens (chat format): decode1 $(prompt_tokens "$prompts/decode1.txt"), decode8 $(prompt_tokens "$prompts/decode8.txt" | tr '\n' ' ')," \
	"prefill512 $(prompt_tokens "$prompts/prefill512.txt"), prefill4096 $(prompt_tokens "$prompts/prefill4096.txt")"
case $steps in *" peak "*) peak ;; esac
case $steps in *" synth "*) synth ;; esac
case $steps in *" fp8 "*) engine fp8 ;; esac
case $steps in *" bf16 "*) engine bf16 ;; esac
echo
python3 -c "$PY" report "$results"
[ "$failed" = 0 ] || { echo "gpu.sh: $failed step(s) failed"; exit 1; }
