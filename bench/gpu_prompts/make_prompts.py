#!/usr/bin/env python3
# usage: DSV3_BIN=build/bin python3 bench/gpu_prompts/make_prompts.py TOKENIZER_DIR bench/gpu_prompts
# Builds bench/gpu_prompts/prefill{512,4096}.txt: one line each whose DeepSeek-V3 chat encoding
# (BOS, <|User|>, text, <|Assistant|>) is exactly that many tokens, checked with dsv3-tokenize.
import os, subprocess, sys
tok, out = sys.argv[1], sys.argv[2]
B, U, A = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
sent = ["The engine reads every weight once per decoded token, so memory bandwidth sets the pace.",
        "Prefill multiplies many tokens at once and is limited by the matmul units instead.",
        "Each expert is a small feed-forward network chosen by the router for this token.",
        "Summarise the following notes about caches, kernels, graphs and streams in plain words.",
        "A river winds past old mills and quiet fields before it reaches the grey harbour town.",
        "Numbers such as 7168, 18432 and 129280 describe the widths of the layers and the vocabulary."]
words = " ".join(sent[i % len(sent)] for i in range(2000)).split(" ")
def count(ws):
    r = subprocess.run([os.environ.get("DSV3_BIN", "build/bin") + "/dsv3-tokenize", "--tokenizer", tok], input=(B + U + " ".join(ws) + A).encode(),
                       capture_output=True, check=True)
    return len(r.stdout.split())
for target in (512, 4096):
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose encoding is <= target
        mid = (lo + hi + 1) // 2
        if count(words[:mid]) <= target: lo = mid
        else: hi = mid - 1
    ws = words[:lo]
    fill = ["a", "the", "and", "of"]
    while count(ws) < target:
        for f in fill:
            if count(ws + [f]) <= target:
                ws = ws + [f]; break
        else:
            sys.exit("cannot reach %d" % target)
    assert count(ws) == target
    open(f"{out}/prefill{target}.txt", "w").write(" ".join(ws) + "\n")
    print(target, len(ws), "words")
