#!/usr/bin/env python3
"""One `broadside send SPEC --run-id ab --no-progress` in a child process, measured: wall
time, rows/s, the child's CPU seconds and peak RSS (getrusage), and the count the send's
summary gives for one decision or reason line.

    benches/send-once.py BINARY SPEC ROWS LABEL COUNTED [EXTRA ARGUMENTS OF send...]
"""
import resource
import subprocess
import sys
import time

binary, spec, rows, label, counted = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
extra = sys.argv[6:]
start = time.time()
p = subprocess.run([binary, "send", spec, "--run-id", "ab", "--no-progress", *extra], capture_output=True, text=True)
wall = time.time() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
if p.returncode != 0:
    sys.exit(p.stderr)
found = [l.split()[-1] for l in p.stdout.splitlines() if l.strip().startswith(counted)]
print(f"{label} wall_s={wall:.2f} mrows_per_s={rows / wall / 1e6:.2f} "
      f"cpu_s={ru.ru_utime + ru.ru_stime:.2f} peak_rss_mb={ru.ru_maxrss / 1024:.0f} "
      f"{counted}={found[0] if found else 0}", flush=True)
