#!/usr/bin/env python3
"""measure.py LABEL CMD...: runs CMD then `sync`, prints a Markdown row: label, wall seconds,
peak RSS of the command in MiB (getrusage of the child: the figure `/usr/bin/time -v` reports as
"Maximum resident set size"). Exits with the command's status."""
import os
import resource
import subprocess
import sys
import time

label, cmd = sys.argv[1], sys.argv[2:]
t0 = time.monotonic()
rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
os.sync()
wall = time.monotonic() - t0
rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"| {label} | {wall:.2f} | {rss_mib:.0f} |", flush=True)
sys.exit(rc)
