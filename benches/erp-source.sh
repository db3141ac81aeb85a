#!/usr/bin/env bash
# ERP source benchmark: rows/s from a local TDS server (pysqlbridge, TLS on, `encryption =
# "required"`, serving the rows from a CSV file) through the ERP source alone (connect, TDS
# parse, decode into recipient columns) in a release build; then, if a release `broadside`
# binary exists, the whole send from the server and from the CSV file.
# (iridium-server, the other local TDS server, answers `TOP (0)` probes without column names,
# so it cannot stand in for SQL Server here.)
# Usage: benches/erp-source.sh [ROWS] (default 1000000). Needs `bash sources/ci-setup.sh`.
# Results: docs/benchmarks.md.
set -euo pipefail
ROWS=${1:-1000000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BROADSIDE_BIN:-$TARGET/release/broadside}
GEN_BIN=$BIN
[[ -x "$GEN_BIN" ]] || GEN_BIN=$TARGET/debug/broadside
DIR=${BENCH_DIR:-/tmp/broadside-erp-bench}
mkdir -p "$DIR"
(cd "$ROOT" && cargo build --release -q -p broadside-sources --example erp_read)
READ=$TARGET/release/examples/erp_read

if [[ ! -f "$DIR/customers-$ROWS.csv" ]]; then
    "$GEN_BIN" generate --out "$DIR/gen-$ROWS" --rows "$ROWS" --suppressions $((ROWS / 10)) >/dev/null
    awk -F, 'NR==1 {print "customer_id," $0; next} {print NR-1 "," $0}' \
        "$DIR/gen-$ROWS/recipients.csv" > "$DIR/customers-$ROWS.csv"
fi

# Starts a server writing "listening on 127.0.0.1:PORT" to LOG; sets PORT.
wait_port() {
    PORT=
    for _ in $(seq 1 600); do
        PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$1" | head -1)
        [[ -n "$PORT" ]] && return 0
        sleep 0.5
    done
    cat "$1"
    exit 1
}

# Writes an ERP spec from the generated CSV spec: SOURCE_LINES replace the CSV source.
erp_spec() { # OUT PORT EXTRA
    sed -e 's/^\[source\]$/[source]\nSOURCE_BLOCK/' "$DIR/gen-$ROWS/campaign.toml" \
      | grep -v '^type = "csv"$' | grep -v '^path = "recipients.csv"$' \
      | sed -e "s|SOURCE_BLOCK|type = \"erp\"\nhost = \"127.0.0.1\"\nport = $2\ndatabase = \"ERP\"\nuser = \"bench\"\npassword_env = \"BENCH_PW\"\nkey_column = \"customer_id\"\nquery = \"SELECT * FROM customers\"\n$3|" \
      > "$1"
}

cat > "$DIR/bridge.json" <<JSON
{"tables": [{"name": "customers", "csv": "customers-$ROWS.csv"}],
 "logins": [{"user": "bench", "password": "\${BENCH_PW}"}]}
JSON
BENCH_PW=bench-Secret1 pysqlbridge --host 127.0.0.1 --port 0 --config "$DIR/bridge.json" \
    2> "$DIR/bridge.log" &
BRIDGE=$!
trap 'kill $BRIDGE 2>/dev/null || true' EXIT
wait_port "$DIR/bridge.log"; BRIDGE_PORT=$PORT
erp_spec "$DIR/gen-$ROWS/erp.toml" "$BRIDGE_PORT" 'trust_server_certificate = true'
echo "== ERP source alone from pysqlbridge, $ROWS rows (TLS, encryption = required)"
BENCH_PW=bench-Secret1 "$READ" "$DIR/gen-$ROWS/erp.toml"
echo "== the same, second read (the server has loaded its CSV)"
BENCH_PW=bench-Secret1 "$READ" "$DIR/gen-$ROWS/erp.toml"

if [[ -x "$BIN" ]]; then
    rm -rf "$DIR/gen-$ROWS/store" "$DIR/gen-$ROWS/megasys"
    echo "== whole send from pysqlbridge"
    /usr/bin/time -f "wall %e s, peak RSS %M KB" env BENCH_PW=bench-Secret1 "$BIN" send "$DIR/gen-$ROWS/erp.toml" --no-progress
    echo "== the same rows from CSV"
    rm -rf "$DIR/gen-$ROWS/store" "$DIR/gen-$ROWS/megasys"
    /usr/bin/time -f "wall %e s, peak RSS %M KB" "$BIN" send "$DIR/gen-$ROWS/campaign.toml" --no-progress
else
    echo "(no release binary at $BIN: whole-send comparison skipped; cargo build --release)"
fi
