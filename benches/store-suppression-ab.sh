#!/usr/bin/env bash
# The cost of suppressing from the store: one release binary, one `broadside generate` data
# set whose store holds a bounce history (EVENTS hard bounces, default 2 000 000: every fifth
# recipient of the data set, plus addresses that are not in it), sent with the spec as
# generated (`store_suppression` on, the default) and with `store_suppression = false`,
# alternating, three rounds.
#   cargo build --release
#   target/release/broadside generate --out DIR --rows 10000000 --suppressions 2000000 --duplicate-share 0.005
#   benches/store-suppression-ab.sh DIR [BINARY] [EVENTS]
# Prints wall time, rows/s, the child's CPU seconds, peak RSS and the suppressed count per run.
set -euo pipefail
D=$(cd "${1:?data set folder (broadside generate --out)}" && pwd)
B=$(realpath "${2:-target/release/broadside}")
N=${3:-2000000}
rows=$(($(wc -l < "$D/recipients.csv") - 1))
if [ ! -f "$D/bounces-$N.ndjson" ]; then
  python3 - "$D/recipients.csv" "$N" > "$D/bounces-$N.ndjson.tmp" <<'PY'
import csv, sys
path, n = sys.argv[1], int(sys.argv[2])
out = sys.stdout
i = 0
with open(path, newline="") as f:
    for k, row in enumerate(csv.DictReader(f)):
        if i == n:
            break
        if k % 5 == 0:
            out.write('{"event_id":"b-%d","workspace_id":"demo","campaign_id":"history","email":"%s",'
                      '"event_type":"bounced","bounce_type":"hard","ts":"2026-11-%02dT10:00:00Z"}\n'
                      % (i, row["email"], 1 + i % 28))
            i += 1
while i < n:
    out.write('{"event_id":"b-%d","workspace_id":"demo","campaign_id":"history","email":"old%d@gone.example.org",'
              '"event_type":"bounced","bounce_type":"hard","ts":"2026-10-%02dT10:00:00Z"}\n' % (i, i, 1 + i % 28))
    i += 1
PY
  mv "$D/bounces-$N.ndjson.tmp" "$D/bounces-$N.ndjson"
fi
if [ ! -d "$D/history-$N" ]; then
  "$B" ingest --store "$D/history-$N.tmp" --from "$D/bounces-$N.ndjson"
  mv "$D/history-$N.tmp" "$D/history-$N"
fi
cp "$D/campaign.toml" "$D/campaign_store_on.toml"
{ echo "store_suppression = false"; cat "$D/campaign.toml"; } > "$D/campaign_store_off.toml"
for round in 1 2 3; do
  for mode in on off; do
    rm -rf "$D/store" "$D/megasys" "$D/out"
    cp -r "$D/history-$N" "$D/store"
    sync
    python3 "$(dirname "$0")/send-once.py" "$B" "$D/campaign_store_$mode.toml" "$rows" "store_suppression=$mode" suppressed
  done
done
