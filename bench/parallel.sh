#!/bin/bash
# Tensor-parallel ranks (issue 8): decode tokens/s at batch 1 and 8 on 1, 2 and 4 ranks over the
# bench shape (../shared/bench: DeepSeek-V3's widths, two layers) and the time rank 0 spends
# inside collectives per decode step (dsv3-generate's "decode collectives" line, waiting for the
# slowest rank included). Greedy, the same prompts on every run; the texts of every rank count are
# compared with one rank's.
#   DEVICE=cpu (default): MPI ranks, the machine's threads shared out (THREADS / ranks each).
#   DEVICE=cuda: one GPU per rank; LAUNCH=threads (default: one process runs the N ranks, NCCL)
#   or LAUNCH=mpirun. One rank runs on GPU 0 alone. The collectives column then counts only the
#   host-side ones (the token broadcasts): NCCL's run inside the step on the GPU stream.
# Env: DSV3_BIN (tools), BENCH_DIR (default bench/data), CONFIG (the shape), TOKENIZER,
# THREADS (default nproc), NEW_TOKENS (default 32), RANKS (default "1 2 4"), DEVICE, LAUNCH.
set -euo pipefail
bin=${DSV3_BIN:?}
root=${BENCH_DIR:-bench/data}
config=${CONFIG:-../shared/bench/v3-width-2layer.config.json}
threads=${THREADS:-$(nproc)}
new=${NEW_TOKENS:-32}
ranks=${RANKS:-1 2 4}
device=${DEVICE:-cpu}
launch=${LAUNCH:-threads}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$root"
ckpt=$root/tp-bench
[ -f "$ckpt/SHA256SUMS" ] || "$bin/dsv3-synth" --config "$config" --seed 1 \
	--tokenizer "${TOKENIZER:-.deps/tokenizer}" --out "$ckpt" >/dev/null
E=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['n_routed_experts'])" "$ckpt/config.json")
for n in $ranks; do
	[ "$n" = 1 ] || [ -f "$ckpt-mp$n/SHA256SUMS" ] || "$bin/dsv3-convert" --hf-ckpt-path "$ckpt" \
		--save-path "$ckpt-mp$n" --n-experts "$E" --model-parallel "$n" 2>/dev/null
done
echo "Write a short story about a robot who learns to paint." >"$root/p1.txt"
for i in 1 2 3 4 5 6 7 8; do echo "Prompt number $i: explain one idea of physics in a few sentences."; done >"$root/p8.txt"
echo "| ranks x threads | batch | decode tok/s | collectives per step (rank 0) | same text as 1 rank |"
echo "|---|---|---|---|---|"
for b in 1 8; do
	for n in $ranks; do
		t=$((threads / n))
		[ "$t" -ge 1 ] || t=1
		if [ "$n" = 1 ]; then
			cmd=(env CUDA_VISIBLE_DEVICES=0 "$bin/dsv3-generate" --ckpt-path "$ckpt")
		elif [ "$device" = cuda ] && [ "$launch" = threads ]; then
			cmd=("$bin/dsv3-generate" --ckpt-path "$ckpt-mp$n")
		else
			cmd=(mpirun --oversubscribe --bind-to none -np "$n" "$bin/dsv3-generate" --ckpt-path "$ckpt-mp$n")
		fi
		"${cmd[@]}" --device "$device" --threads "$t" --temperature 0 --max-new-tokens "$new" \
			--input-file "$root/p$b.txt" >"$root/out.$b.$n" 2>"$root/err.$b.$n"
		dec=$(sed -n 's/.*decode: .*(\([0-9.]*\) tokens\/s).*/\1/p' "$root/err.$b.$n")
		col=$(sed -n 's/^decode collectives (rank 0): .*, \([0-9.]*\) ms per decode step.*/\1 ms/p' "$root/err.$b.$n")
		same=$(cmp -s "$root/out.$b.1" "$root/out.$b.$n" 2>/dev/null && echo yes || echo no)
		echo "| $n x $t | $b | $dec | ${col:--} | $same |"
	done
done
