#!/bin/bash
# make bench: each weight tool against `cat` of the same bytes, with peak RSS, at two sizes:
#   v3w1   = dsv3-synth --preset v3-width:1                               (about 4.3 GB FP8, 1 file)
#   bench2 = dsv3-synth --config ../shared/bench/v3-width-2layer.config.json (about 10 GB FP8, 3 files)
# Needs ~40 GB free under BENCH_DIR (default bench/data, ignored). Prints Markdown tables.
# Every timed command is followed by sync inside the timing (the tools fsync themselves).
set -euo pipefail
bin=${DSV3_BIN:?}
here=$(cd "$(dirname "$0")" && pwd)
root=${BENCH_DIR:-bench/data}
threads=${THREADS:-$(nproc)}
sizes=${SIZES:-"v3w1 bench2"}
mkdir -p "$root"
m() { python3 "$here/measure.py" "$@"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -m); --threads $threads"
for size in $sizes; do
	in=$root/$size-fp8
	rm -rf "$root/$size"-*
	case $size in
	v3w1) "$bin/dsv3-synth" --preset v3-width:1 --seed 1 --out "$in" 2>/dev/null ;;
	bench2) "$bin/dsv3-synth" --config "${BENCH_CONFIG:-$here/../../shared/bench/v3-width-2layer.config.json}" --seed 1 --out "$in" 2>/dev/null ;;
	esac
	E=$(python3 -c "import json;print(json.load(open('$in/config.json'))['n_routed_experts'])")
	largest=$(python3 -c "
import json,struct,glob
m=0
for p in glob.glob('$in/*.safetensors'):
    f=open(p,'rb'); n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n))
    m=max([m]+[v['data_offsets'][1]-v['data_offsets'][0] for k,v in h.items() if k!='__metadata__'])
print(m)")
	echo
	echo "### $size: $(du -cb "$in"/*.safetensors | tail -n 1 | cut -f1) bytes of safetensors, $(ls "$in"/*.safetensors | wc -l) files, largest tensor $largest bytes"
	echo
	echo "| command | seconds | peak RSS MiB |"
	echo "|---|---|---|"
	drop; m "cat input > one file" sh -c "cat $in/*.safetensors > $root/$size-cat"
	rm -f "$root/$size-cat"
	drop; m "dsv3-convert --model-parallel 8" "$bin/dsv3-convert" --hf-ckpt-path "$in" --save-path "$root/$size-mp8" --n-experts "$E" --model-parallel 8 --threads "$threads"
	drop; m "cat mp8 output > one file" sh -c "cat $root/$size-mp8/*.safetensors > $root/$size-cat"
	rm -f "$root/$size-cat"
	drop; m "dsv3-shard mp8 -> mp4" "$bin/dsv3-shard" --input "$root/$size-mp8" --save-path "$root/$size-mp4" --model-parallel 4 --threads "$threads"
	drop; m "cat mp4 output > one file" sh -c "cat $root/$size-mp4/*.safetensors > $root/$size-cat"
	rm -rf "$root/$size-cat" "$root/$size-mp8" "$root/$size-mp4"
	drop; m "dsv3-fp8-to-bf16" "$bin/dsv3-fp8-to-bf16" --input-fp8-hf-path "$in" --output-bf16-hf-path "$root/$size-bf16" --threads "$threads"
	drop; m "cat bf16 output > one file" sh -c "cat $root/$size-bf16/*.safetensors > $root/$size-cat"
	rm -f "$root/$size-cat"
	drop; m "dsv3-verify checksums (bf16 output)" "$bin/dsv3-verify" checksums --threads "$threads" "$root/$size-bf16"
	rm -rf "$root/$size-bf16" "$in"
done
