#!/usr/bin/env bash
# ERP source benchmark: rows/s from a local TDS server (pysqlbridge, TLS) through the whole send
# pipeline. Usage: benches/erp-source.sh [ROWS] (default 1000000). Needs a release build
# (`cargo build --release`) and `bash sources/ci-setup.sh`. Results: docs/benchmarks.md.
set -euo pipefail
ROWS=${1:-1000000}
BIN=${BROADSIDE_BIN:-${CARGO_TARGET_DIR:-target}/release/broadside}
DIR=${BENCH_DIR:-/tmp/broadside-erp-bench}
mkdir -p "$DIR"
if [[ ! -f "$DIR/customers-$ROWS.csv" ]]; then
    "$BIN" generate --out "$DIR/gen-$ROWS" --rows "$ROWS" --suppressions $((ROWS / 10)) >/dev/null
    awk -F, 'NR==1 {print "customer_id," $0; next} {print NR-1 "," $0}' \
        "$DIR/gen-$ROWS/recipients.csv" > "$DIR/customers-$ROWS.csv"
fi
cat > "$DIR/bridge.json" <<JSON
{"tables": [{"name": "customers", "csv": "customers-$ROWS.csv"}],
 "logins": [{"user": "bench", "password": "\${BENCH_PW}"}]}
JSON
BENCH_PW=bench-Secret1 pysqlbridge --host 127.0.0.1 --port 0 --config "$DIR/bridge.json" \
    2> "$DIR/bridge.log" &
BRIDGE=$!
trap 'kill $BRIDGE 2>/dev/null || true' EXIT
PORT=
for _ in $(seq 1 600); do
    PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$DIR/bridge.log" | head -1)
    [[ -n "$PORT" ]] && break
    sleep 0.5
done
[[ -n "$PORT" ]] || { cat "$DIR/bridge.log"; exit 1; }
sed -e 's/^\[source\]$/[source]\nSOURCE_BLOCK/' "$DIR/gen-$ROWS/campaign.toml" \
  | grep -v '^type = "csv"$' | grep -v '^path = "recipients.csv"$' \
  | sed -e "s|SOURCE_BLOCK|type = \"erp\"\nhost = \"127.0.0.1\"\nport = $PORT\ndatabase = \"ERP\"\nuser = \"bench\"\npassword_env = \"BENCH_PW\"\ntrust_server_certificate = true\nkey_column = \"customer_id\"\nquery = \"SELECT * FROM customers\"|" \
  > "$DIR/gen-$ROWS/erp.toml"
rm -rf "$DIR/gen-$ROWS/store" "$DIR/gen-$ROWS/megasys"
echo "== ERP source, $ROWS rows (encryption = required)"
/usr/bin/time -f "wall %e s, peak RSS %M KB" env BENCH_PW=bench-Secret1 "$BIN" send "$DIR/gen-$ROWS/erp.toml" --no-progress
echo "== the same rows from CSV"
rm -rf "$DIR/gen-$ROWS/store" "$DIR/gen-$ROWS/megasys"
/usr/bin/time -f "wall %e s, peak RSS %M KB" "$BIN" send "$DIR/gen-$ROWS/campaign.toml" --no-progress
