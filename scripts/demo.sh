#!/bin/sh
# make demo: the weight-tool workflow end to end on a built-in synthetic checkpoint.
#   dsv3-synth (FP8, DeepSeek-V3 architecture, 3 files) -> dsv3-fp8-to-bf16 -> dsv3-convert
#   --model-parallel 4 -> dsv3-shard to 2 -> dsv3-verify checksums and ckpt on every result;
# then the reference engine: dsv3-generate on a synthetic checkpoint with DeepSeek-V3's real
#   vocabulary (129280) and tokenizer, in batch and interactive (streamed) chat mode.
set -eu
bin=${DSV3_BIN:?}
work=${DEMO_DIR:-build/demo}
rm -rf "$work"
mkdir -p "$work"
step() { printf '\n== %s\n$ %s\n' "$1" "$2"; }
run() { step "$1" "$2"; sh -c "$2"; }

run "1. a synthetic DeepSeek-V3-architecture checkpoint (FP8 blocks, 3 files, real tokenizer)" \
    "$bin/dsv3-synth --preset tiny --seed 1 --files 3 --tokenizer .deps/tokenizer --out $work/fp8"
run "2. dequantise to BF16 on the CPU (the fp8_cast_bf16.py job)" \
    "$bin/dsv3-fp8-to-bf16 --input-fp8-hf-path $work/fp8 --output-bf16-hf-path $work/bf16"
run "3. split for 4-way model parallelism (the convert.py job)" \
    "$bin/dsv3-convert --hf-ckpt-path $work/bf16 --save-path $work/mp4 --n-experts 16 --model-parallel 4"
run "4. reshard the 4-way checkpoint to 2-way" \
    "$bin/dsv3-shard --input $work/mp4 --save-path $work/mp2 --model-parallel 2"
for d in fp8 bf16 mp4 mp2; do
	run "5. verify $d: file checksums, logical tensor hashes, structure" \
	    "$bin/dsv3-verify checksums $work/$d && $bin/dsv3-verify ckpt $work/$d"
done
step "6. the logical tensors of mp4 and mp2 are identical" "cmp $work/mp4/tensors.sha256.json $work/mp2/tensors.sha256.json"
cmp "$work/mp4/tensors.sha256.json" "$work/mp2/tensors.sha256.json"
printf '\nweight tools: all steps passed; outputs in %s\n' "$work"
ls -l "$work"/*

run "7. a tiny checkpoint with DeepSeek-V3's real vocabulary (129280) and tokenizer, for the engine" \
    "$bin/dsv3-synth --config tests/fixtures/configs/demo-v3.json --seed 1 --tokenizer .deps/tokenizer --out $work/v3vocab"
printf 'Hello! Who are you?\nWrite a haiku about the sea.\n' > "$work/prompts.txt"
run "8. dsv3-generate, two prompts as one batch in the chat format (random weights: the text is random tokens)" \
    "$bin/dsv3-generate --ckpt-path $work/v3vocab --input-file $work/prompts.txt --max-new-tokens 24 --temperature 0"
step "9. dsv3-generate --interactive, two turns then /exit, streamed (random weights: random tokens)" \
    "$bin/dsv3-generate --ckpt-path $work/v3vocab --interactive --max-new-tokens 24 --seed 1 <<EOF ..."
"$bin/dsv3-generate" --ckpt-path "$work/v3vocab" --interactive --max-new-tokens 24 --seed 1 <<EOF
Hello! Who are you?
Tell me more about yourself.
/exit
EOF
printf '\ndemo: all steps passed\n'
