#!/bin/sh
# make demo: the weight-tool workflow end to end on a built-in synthetic checkpoint.
#   dsv3-synth (FP8, DeepSeek-V3 architecture, 3 files) -> dsv3-fp8-to-bf16 -> dsv3-convert
#   --model-parallel 4 -> dsv3-shard to 2 -> dsv3-verify checksums and ckpt on every result.
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
printf '\ndemo: all steps passed; outputs in %s\n' "$work"
ls -l "$work"/*
