#!/usr/bin/env bash
# Mail path benchmark: `broadside send` (release) to the local Lob test server with the
# printer's rate limit set to R requests/s. Reports pieces/s against R (the target is >= 95 %),
# the proofing stage's rate per core and the send's peak RSS.
# Usage: benches/mail-rate.sh [RECIPIENTS] [R] [LATENCY_MS]   (defaults 20000, 500, 20)
# Results: docs/benchmarks.md.
set -euo pipefail
N=${1:-20000}
R=${2:-500}
LATENCY=${3:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DIR=${BENCH_DIR:-/tmp/broadside-mail-bench}
PORT=${PORT:-18089}
rm -rf "$DIR" && mkdir -p "$DIR"
(cd "$ROOT" && cargo build --release -q -p broadside --bin broadside -p broadside-printers --example lob_server)

python3 - "$DIR" "$N" <<'PY'
import sys, random
d, n = sys.argv[1], int(sys.argv[2])
random.seed(7)
with open(f"{d}/recipients.csv", "w") as f:
    f.write("Account,First,Last,Street,City,State,Zip,Country,Offer\n")
    for i in range(n):
        f.write(f"A{i:08d},First{i},Last{i},{i} Main St,Springfield,IL,{62700 + i % 100},US,{10 + i % 30}% off\n")
open(f"{d}/front.html", "w").write("<html><body><h1>{{first_name}}, {{offer}} this winter</h1></body></html>")
open(f"{d}/back.html", "w").write("<html><body><p>Dear {{first_name}} {{last_name}}, account {{account_number}}, {{city}} {{state}} {{zip}}.</p></body></html>")
PY

cat > "$DIR/campaign.toml" <<TOML
campaign_id = "mail-rate"
workspace_id = "bench"
channel = "mail"

[source]
type = "csv"
path = "recipients.csv"

[columns]
account_number = "Account"
first_name = "First"
last_name = "Last"
address1 = "Street"
city = "City"
state = "State"
zip = "Zip"
country = "Country"

[columns.merge]
offer = "Offer"

[mail]
countries = ["US"]

[[variants]]
name = "a"
weight = 1
template = "card"

[output]
store = "store"

[printer]
kind = "lob"

[printer.creative]
front = "front.html"
back = "back.html"

[printer.lob]
base_url = "http://127.0.0.1:$PORT"
api_key_env = "BENCH_LOB_KEY"
max_in_flight = 32
requests_per_second = $R

[printer.billing]
customer = true
active_subscription = true
TOML

"$TARGET/release/examples/lob_server" --addr "127.0.0.1:$PORT" --key bench --latency-ms "$LATENCY" > "$DIR/server.out" &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q http "$DIR/server.out" 2>/dev/null && break; sleep 0.1; done

start=$(date +%s.%N)
BENCH_LOB_KEY=bench /usr/bin/time -f "%M" -o "$DIR/rss" "$TARGET/release/broadside" send "$DIR/campaign.toml" --run-id bench > "$DIR/send.out"
end=$(date +%s.%N)
kill -INT $SERVER; wait $SERVER || true; trap - EXIT
cat "$DIR/send.out"
python3 - "$DIR" "$N" "$R" "$start" "$end" <<'PY'
import sys, re
d, n, r, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
out = open(f"{d}/send.out").read()
server = open(f"{d}/server.out").read()
pieces = int(re.search(r"pieces=(\d+)", server).group(1))
proof = re.search(r"stage proof\s+(\d+) rows/s busy", out)
secs = end - start
rss = int(open(f"{d}/rss").read().split()[-1]) / 1024
print(f"figure mail_rate recipients={n} limit={r:.0f}/s pieces={pieces} secs={secs:.1f} "
      f"rate={pieces / secs:.1f}/s share={pieces / secs / r * 100:.1f}% "
      f"proof_rows_per_core_s={proof.group(1) if proof else '?'} peak_rss_mb={rss:.0f}")
PY
