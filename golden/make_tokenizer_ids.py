#!/usr/bin/env python3
"""Token ids of the tokenizer corpus by Hugging Face `tokenizers` (the second reference for
tests/wip_tokenizer_hf.c; the first is tests/tokenizer_ref.mjs in JS).

Loads tokenizer.json with tokenizers.Tokenizer.from_file and encodes every case of
tests/fixtures/tokenizer/corpus.txt with add_special_tokens=False (added tokens inside the text are
still matched, as always in `tokenizers`), then the file invalid_utf8.bin decoded with
bytes.decode("utf-8", "replace") (tokenizers takes only valid strings; dsv3 replaces the same way),
then the cases of hf_only.txt (whitespace that the JS reference reads differently).
Corpus format, as the C and JS readers: one case per line, "#" lines are comments, empty lines are
skipped, escapes \\n \\r \\t \\\\ and \\u{HEX}.

Output: "#" header lines (tokenizers version, SHA-256 of tokenizer.json, corpus.txt,
invalid_utf8.bin and hf_only.txt), then one line of space-separated ids per case, in corpus order.

usage: make_tokenizer_ids.py [--tokenizer DIR] [--fixtures DIR] [--out FILE]
  defaults: .deps/tokenizer, tests/fixtures/tokenizer, golden/tokenizer_ids.txt (run from the repo root)
"""
import argparse
import hashlib
import os
import re

import tokenizers
from tokenizers import Tokenizer

ESCAPE = re.compile(r"\\(u\{([0-9A-Fa-f]+)\}|.)")
SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def unescape(line):
    def one(m):
        if m.group(2):
            return chr(int(m.group(2), 16))
        return SIMPLE.get(m.group(1), m.group(0))
    return ESCAPE.sub(one, line)


def read_lines(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    return [unescape(l) for l in text.split("\n") if l != "" and not l.startswith("#")]


def read_cases(fixtures):
    cases = read_lines(os.path.join(fixtures, "corpus.txt"))
    with open(os.path.join(fixtures, "invalid_utf8.bin"), "rb") as f:
        cases.append(f.read().decode("utf-8", "replace"))
    hf_only = os.path.join(fixtures, "hf_only.txt")
    if os.path.exists(hf_only):
        cases += read_lines(hf_only)
    return cases


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=".deps/tokenizer")
    ap.add_argument("--fixtures", default="tests/fixtures/tokenizer")
    ap.add_argument("--out", default="golden/tokenizer_ids.txt")
    a = ap.parse_args()
    tok_json = os.path.join(a.tokenizer, "tokenizer.json")
    tok = Tokenizer.from_file(tok_json)
    lines = [
        f"# tokenizers {tokenizers.__version__}, Tokenizer.from_file + encode(add_special_tokens=False)",
        f"# tokenizer.json sha256 {sha256(tok_json)}",
        f"# corpus.txt sha256 {sha256(os.path.join(a.fixtures, 'corpus.txt'))}",
        f"# invalid_utf8.bin sha256 {sha256(os.path.join(a.fixtures, 'invalid_utf8.bin'))}",
    ]
    if os.path.exists(os.path.join(a.fixtures, "hf_only.txt")):
        lines.append(f"# hf_only.txt sha256 {sha256(os.path.join(a.fixtures, 'hf_only.txt'))}")
    for case in read_cases(a.fixtures):
        lines.append(" ".join(str(i) for i in tok.encode(case, add_special_tokens=False).ids))
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, a.out)
    print(f"{a.out}: {sum(not l.startswith('#') for l in lines)} cases")


if __name__ == "__main__":
    main()
