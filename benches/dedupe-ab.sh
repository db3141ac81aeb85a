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
    python3 "$(dirname "$0")/send-once.py" "$B" "$D/campaign_$mode.toml" "$rows" "dedupe=$mode" duplicate
  done
done
