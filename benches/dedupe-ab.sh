#!/usr/bin/env bash
# The cost of deduplication: one release binary, one `broadside bench` data set, sent with the
# spec as generated (dedupe on) and with `dedupe = false`, alternating, three rounds.
#   cargo build --release
#   target/release/broadside generate --out DIR --rows 10000000 --suppressions 2000000 --duplicate-share 0.005
#   benches/dedupe-ab.sh DIR [BINARY]
# Prints wall time, rows/s, the child's CPU seconds and peak RSS per run.
set -euo pipefail
D=${1:?data set folder (broadside generate --out)}
B=${2:-target/release/broadside}
rows=$(($(wc -l < "$D/recipients.csv") - 1))
cp "$D/campaign.toml" "$D/campaign_on.toml"
{ echo "dedupe = false"; cat "$D/campaign.toml"; } > "$D/campaign_off.toml"
for round in 1 2 3; do
  for mode in on off; do
    rm -rf "$D/store" "$D/megasys" "$D/out"
    sync
    python3 - "$B" "$D/campaign_$mode.toml" "$mode" "$rows" <<'PY'
import resource, subprocess, sys, time
b, spec, mode, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.time()
p = subprocess.run([b, "send", spec, "--run-id", "ab", "--no-progress"], capture_output=True, text=True)
wall = time.time() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
if p.returncode != 0:
    sys.exit(p.stderr)
dups = [l.split()[-1] for l in p.stdout.splitlines() if l.strip().startswith("duplicate")]
print(f"dedupe={mode} wall_s={wall:.2f} mrows_per_s={rows / wall / 1e6:.2f} "
      f"cpu_s={ru.ru_utime + ru.ru_stime:.2f} peak_rss_mb={ru.ru_maxrss / 1024:.0f} "
      f"duplicates={dups[0] if dups else 0}")
PY
  done
done
