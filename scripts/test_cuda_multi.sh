#!/bin/sh
# make test-cuda-multi (issue 8), on a machine with 2 or 4 GPUs; standalone:
#   DSV3_BIN=build/bin sh scripts/test_cuda_multi.sh
#   1. dsv3-verify logits --device cuda on every golden case (golden/*.safetensors) over the
#      dsv3-convert shards of its checkpoint for N = 2 and, with 4 GPUs, N = 4 ranks, within
#      DESIGN §6's GPU limits, launched both ways: one process running N ranks itself (a thread
#      per GPU, NCCL) and `mpirun -np N` (one process per GPU, NCCL bootstrapped over MPI; only
#      when mpirun is found, said so otherwise).
#   2. dsv3-generate greedy on mp-2 shards of a tiny checkpoint with DeepSeek-V3's vocabulary:
#      the same text on 2 GPU ranks (both launches) as the unsharded checkpoint on one GPU
#      (CUDA_VISIBLE_DEVICES=0), a batch of prompts of different lengths.
#   3. a rank whose shard is broken makes the whole run exit non-zero in bounded time.
# With one GPU and mpirun, the same checks run as mpirun ranks sharing that GPU, their
# collectives staged through host memory over MPI (NCCL needs a GPU per rank): the GPU ranks'
# arithmetic is checked, NCCL and the one-process launch are skipped (said so). Without a GPU,
# or with one and no mpirun, it prints "test-cuda-multi: skipped: ..." and exits 0, or 1 when
# DSV3_REQUIRE_GPU is set. Env: DSV3_BIN (default build/bin), DSV3_TOKENIZER (default
# .deps/tokenizer), DSV3_REQUIRE_GPU, TEST_CUDA_KEEP=1 keeps the work dir.
# Ends with "N passed, N failed"; exit 1 on any failure.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${DSV3_BIN:-$root/build/bin}" 2>/dev/null && pwd) || { echo "test-cuda-multi: DSV3_BIN: no such directory" >&2; exit 1; }
tokenizer=${DSV3_TOKENIZER:-$root/.deps/tokenizer}
cd "$root" || exit 1
# Every run is bounded: a hang (a rank waiting for a collective that never comes) is a failure.
LIMIT=300

skip_all() {
	echo "test-cuda-multi: skipped: $1"
	if [ -n "${DSV3_REQUIRE_GPU+set}" ]; then
		echo "test-cuda-multi: DSV3_REQUIRE_GPU is set, so this is a failure"
		exit 1
	fi
	exit 0
}

# ---- are there 2 GPUs this build can use? ----
have_mpirun=0
command -v mpirun >/dev/null 2>&1 && have_mpirun=1
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
[ "$gpus" -ge 1 ] 2>/dev/null || skip_all "no GPU (nvidia-smi -L lists ${gpus:-0})"
staged=0
if [ "$gpus" -lt 2 ]; then
	[ $have_mpirun = 1 ] || skip_all "fewer than 2 GPUs (nvidia-smi -L lists $gpus) and no mpirun to share one"
	staged=1
	echo "test-cuda-multi: one GPU: mpirun ranks share it, collectives staged over MPI;" \
		"NCCL and the one-process launch need a GPU per rank and are skipped"
fi
probe=$("$bin/dsv3-generate" --ckpt-path /nonexistent --input-file /nonexistent --device cuda 2>&1)
case $probe in
*"--device cuda:"*) skip_all "$probe" ;;
esac
nvidia-smi -L | sed 's/^/test-cuda-multi: /'
sizes=2
[ "$gpus" -ge 4 ] || [ $staged = 1 ] && sizes="2 4"
# threads: the one-process launch (a GPU per rank, NCCL) is possible
threads_ok=1
[ $staged = 1 ] && threads_ok=0
# As root (the GPU machine), OpenMPI wants these; --oversubscribe for hosts with few slots.
mpirun_np() { # N CMD...
	n=$1
	shift
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout $LIMIT mpirun --oversubscribe -np "$n" "$@"
}

tag=test-cuda-multi
. "$root/scripts/check_lib.sh"

# ---- 1. golden logits on N GPU ranks ----

# The goldens' checkpoints (their synth_args): tiny --seed 1, tiny-v2 --seed 2, tiny-bf16 the cast.
make_ckpts() {
	"$bin/dsv3-synth" --preset tiny --seed 1 --out "$work/tiny" &&
		"$bin/dsv3-synth" --preset tiny-v2 --seed 2 --out "$work/tiny-v2" &&
		"$bin/dsv3-fp8-to-bf16" --input-fp8-hf-path "$work/tiny" --output-bf16-hf-path "$work/tiny-bf16"
}
check "synthesise the golden checkpoints (tiny, tiny-v2, tiny-bf16)" make_ckpts

# verify_ranks HOW N CKPT GOLDEN: HOW is "threads" (one process) or "mpirun".
verify_ranks() {
	how=$1 n=$2 ckpt=$3 golden=$4
	if [ "$how" = threads ]; then
		timeout $LIMIT "$bin/dsv3-verify" logits --device cuda --ckpt-path "$ckpt" --golden "$golden" \
			>"$work/verify.out" 2>&1
	else
		mpirun_np "$n" "$bin/dsv3-verify" logits --device cuda --ckpt-path "$ckpt" --golden "$golden" \
			>"$work/verify.out" 2>&1
	fi
	rc=$?
	cat "$work/verify.out"
	[ $rc -eq 0 ] || { echo "exit status $rc"; return 1; }
	grep -q "^device cuda, $n ranks, limits:" "$work/verify.out" || { echo "not a run of $n GPU ranks"; return 1; }
}

for label in tiny tiny-v2 tiny-bf16; do
	goldens=$(ls golden/$label.safetensors golden/$label-[0-9]*.safetensors 2>/dev/null)
	[ -n "$goldens" ] || { check "golden/$label*.safetensors present" false; continue; }
	for n in $sizes; do
		out=$work/$label-mp$n
		check "dsv3-convert $label --model-parallel $n" "$bin/dsv3-convert" --hf-ckpt-path "$work/$label" \
			--save-path "$out" --n-experts 16 --model-parallel $n
		for g in $goldens; do
			[ $threads_ok = 1 ] && check "verify logits --device cuda, $n GPU ranks in one process: $label-mp$n $g" \
				verify_ranks threads $n "$out" "$g"
			if [ $have_mpirun = 1 ]; then
				check "verify logits --device cuda, mpirun -np $n: $label-mp$n $g" \
					verify_ranks mpirun $n "$out" "$g"
			fi
		done
	done
done
[ $have_mpirun = 1 ] || skip "the mpirun launch (no mpirun on this machine: OpenMPI's runtime is not installed here)"
[ $threads_ok = 1 ] || skip "the one-process launch and NCCL (one GPU: they need a GPU per rank)"

# ---- 2. greedy text: N GPU ranks write what one GPU writes ----

cat >"$work/prompts.txt" <<'EOF'
Hi
What is the capital of France?
Write a short poem about the sea, the moon and the long night, in English please.
Explain, step by step and with one example for each step, how a mixture-of-experts transformer routes every token to a few experts, why the router's bias only changes which experts are chosen and not their weights, and what happens to experts that are never picked.
EOF

generate() { # OUT-LABEL how ARGS...: how is one (the unsharded checkpoint on one GPU), threads or mpirun
	label=$1 how=$2
	shift 2
	ckpt=$work/v3-mp2
	[ "$how" = one ] && ckpt=$work/v3
	set -- --ckpt-path "$ckpt" --tokenizer "$tokenizer" --input-file "$work/prompts.txt" \
		--temperature 0 --max-new-tokens 24 --device cuda "$@"
	case $how in
	one) CUDA_VISIBLE_DEVICES=0 timeout $LIMIT "$bin/dsv3-generate" "$@" ;;
	threads) timeout $LIMIT "$bin/dsv3-generate" "$@" ;;
	mpirun) mpirun_np 2 "$bin/dsv3-generate" "$@" ;;
	esac >"$work/$label.out" 2>"$work/$label.err"
}

same_text() { # HOW
	generate one-gpu one || { cat "$work/one-gpu.err"; return 1; }
	generate "ranks-$1" "$1" || { cat "$work/ranks-$1.err"; return 1; }
	cat "$work/ranks-$1.err"
	grep -q "^device: cuda, 2 ranks$" "$work/ranks-$1.err" || { echo "not a run of 2 GPU ranks"; return 1; }
	cmp -s "$work/one-gpu.out" "$work/ranks-$1.out" && return 0
	echo "different text; diff one-gpu $1 (greedy near-ties may flip under other summation orders):"
	diff "$work/one-gpu.out" "$work/ranks-$1.out"
	return 1
}

make_v3() {
	"$bin/dsv3-synth" --config tests/fixtures/configs/demo-v3.json --seed 1 --tokenizer "$tokenizer" \
		--out "$work/v3" &&
		"$bin/dsv3-convert" --hf-ckpt-path "$work/v3" --save-path "$work/v3-mp2" --n-experts 16 \
			--model-parallel 2
}

if [ ! -f "$tokenizer/tokenizer.json" ]; then
	check "tokenizer for dsv3-generate at $tokenizer (carry .deps/tokenizer or set DSV3_TOKENIZER)" false
else
	check "synthesise demo-v3 (real vocab) and its mp2 shards" make_v3
	[ $threads_ok = 1 ] && check "generate greedy: 2 GPU ranks in one process == one GPU, 4 prompts batched" same_text threads
	if [ $have_mpirun = 1 ]; then
		check "generate greedy: mpirun -np 2 GPU ranks == one GPU" same_text mpirun
	fi
fi

# ---- 3. a broken rank ends the whole run, non-zero, in bounded time ----

broken_rank_fails() { # HOW
	rm -rf "$work/broken" && cp -r "$work/tiny-mp2" "$work/broken" || return 1
	f=$work/broken/model1-mp2.safetensors
	head -c $(($(wc -c <"$f") / 2)) "$f" >"$f.cut" && mv "$f.cut" "$f"
	start=$(date +%s)
	if [ "$1" = threads ]; then
		timeout 120 "$bin/dsv3-verify" logits --device cuda --ckpt-path "$work/broken" \
			--golden golden/tiny.safetensors
	else
		OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun --oversubscribe -np 2 \
			"$bin/dsv3-verify" logits --device cuda --ckpt-path "$work/broken" --golden golden/tiny.safetensors
	fi
	rc=$?
	echo "exit status $rc after $(($(date +%s) - start)) s"
	[ $rc -ne 0 ] && [ $rc -ne 124 ]
}
[ $threads_ok = 1 ] && check "a broken rank file: the one-process run exits non-zero, no hang" broken_rank_fails threads
if [ $have_mpirun = 1 ]; then
	check "a broken rank file: the mpirun run exits non-zero, no hang" broken_rank_fails mpirun
fi

[ $skipped -gt 0 ] && echo "test-cuda-multi: $skipped check(s) skipped (see skip lines above)"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
