# Sourced by scripts/test_cuda.sh and scripts/test_cuda_multi.sh: the work directory and the
# check/skip bookkeeping they share. Expects $tag (the script's name in messages); sets $work and
# the counters passed, failed, skipped.
passed=0 failed=0 skipped=0
work=$(mktemp -d "/tmp/dsv3-$tag-XXXXXX") || exit 1
[ -n "${TEST_CUDA_KEEP:-}" ] && echo "$tag: work dir $work" || trap 'rm -rf "$work"' EXIT

# check NAME CMD...: runs CMD (a function or program); its output is shown only when it fails.
check() {
	name=$1
	shift
	if "$@" >"$work/log" 2>&1; then
		passed=$((passed + 1))
		echo "ok   $name"
	else
		failed=$((failed + 1))
		echo "FAIL $name"
		tail -n 60 "$work/log" | sed 's/^/    /'
	fi
}

skip() {
	skipped=$((skipped + 1))
	echo "skip $1"
}
