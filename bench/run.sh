#!/bin/bash
# make bench: each weight tool against `cat` of the same bytes, with peak RSS, at two sizes.
#   sizes: v3-width:1 (about 4.3 GB FP8) and ../shared/bench/v3-width-2layer.config.json (about 10 GB).
# Needs ~45 GB free under BENCH_DIR (default bench/data, ignored). Prints a Markdown table.
# Every timed command ends with `sync`, so the tools' fsync and cat's writeback count alike.
set -euo pipefail
bin=${DSV3_BIN:?}
root=${BENCH_DIR:-bench/data}
threads=${THREADS:-$(nproc)}
sizes=${SIZES:-"v3w1 bench2"}
mkdir -p "$root"

# run LABEL CMD...: prints "| LABEL | seconds | peak RSS MiB |"
run() {
	local label=$1; shift
	sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
	local t0 t1
	t0=$(date +%s.%N)
	/usr/bin/time -f '%M' -o "$root/rss" "$@" > /dev/null 2> "$root/stderr" || { cat "$root/stderr"; exit 1; }
	sync
	t1=$(date +%s.%N)
	printf '| %s | %.2f | %d |\n' "$label" "$(echo "$t1 - $t0" | bc)" $(( $(cat "$root/rss") / 1024 ))
}
bytes() { du -cb "$@" | tail -n 1 | cut -f1; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m); threads $threads"
for size in $sizes; do
	in=$root/$size-fp8
	rm -rf "$root"/"$size"-*
	case $size in
	v3w1) "$bin/dsv3-synth" --preset v3-width:1 --seed 1 --out "$in" >/dev/null ;;
	bench2) "$bin/dsv3-synth" --config ../shared/bench/v3-width-2layer.config.json --seed 1 --out "$in" >/dev/null ;;
	esac
	E=$(sed -n 's/.*"n_routed_experts": *\([0-9]*\).*/\1/p' "$in/config.json")
	echo; echo "### $size: $(bytes "$in"/*.safetensors) bytes in, largest tensor $(python3 -c "
import json,struct,glob
m=0
for p in glob.glob('$in/*.safetensors'):
    f=open(p,'rb'); n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n))
    m=max([m]+[v['data_offsets'][1]-v['data_offsets'][0] for k,v in h.items() if k!='__metadata__'])
print(m)") bytes"
	echo "| command | seconds | peak RSS MiB |"; echo "|---|---|---|"
	run "cat input > one file" sh -c "cat $in/*.safetensors > $root/$size-cat"
	rm -f "$root/$size-cat"
	run "dsv3-convert mp 8 (E=$E)" "$bin/dsv3-convert" --hf-ckpt-path "$in" --save-path "$root/$size-mp" --n-experts "$E" --model-parallel 8 --threads "$threads"
	run "cat mp8 output > one file" sh -c "cat $root/$size-mp/*.safetensors > $root/$size-cat"
	rm -f "$root/$size-cat"
	run "dsv3-shard mp8 -> mp4" "$bin/dsv3-shard" --input "$root/$size-mp" --save-path "$root/$size-mp4" --model-parallel 4
	rm -rf "$root/$size-mp" "$root/$size-mp4"
	run "dsv3-fp8-to-bf16" "$bin/dsv3-fp8-to-bf16" --input-fp8-hf-path "$in" --output-bf16-hf-path "$root/$size-bf16" --threads "$threads"
	run "cat bf16 output > one file" sh -c "cat $root/$size-bf16/*.safetensors > $root/$size-cat"
	rm -f "$root/$size-cat"
	run "dsv3-verify checksums (bf16)" "$bin/dsv3-verify" checksums "$root/$size-bf16"
	rm -rf "$root/$size-bf16" "$in"
done
