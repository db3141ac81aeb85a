#!/usr/bin/env bash
# Installs what the analytics crate's tests need on a fresh Debian machine. Idempotent.
#  - a C toolchain for the vendored librdkafka (built by rdkafka-sys with its own
#    configure script: no cmake, no TLS/compression libraries needed);
#  - noida-db: a Kafka-protocol broker the end-to-end tests start on a free port;
#  - pyarrow: the independent reader the tests check the Parquet files with.
set -euo pipefail

need_apt=()
for cmd in gcc g++ make perl python3 pkg-config; do
    command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$cmd")
done
if ((${#need_apt[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    pkgs=(build-essential perl pkg-config)
    command -v python3 >/dev/null 2>&1 || pkgs+=(python3 python3-pip)
    apt-get install -y --no-install-recommends "${pkgs[@]}"
fi

PY=python3
if ! "$PY" -c 'import pyarrow' >/dev/null 2>&1 || ! command -v noida-db >/dev/null 2>&1; then
    # Debian's system Python refuses global pip installs unless told otherwise.
    "$PY" -m pip install --quiet noida-db pyarrow 2>/dev/null \
        || "$PY" -m pip install --quiet --break-system-packages noida-db pyarrow
fi

command -v noida-db >/dev/null || { echo "noida-db installed but not on PATH" >&2; exit 1; }
"$PY" -c 'import pyarrow' || { echo "pyarrow did not install" >&2; exit 1; }
echo "analytics test dependencies ready: $(noida-db version 2>/dev/null | tail -1), pyarrow $("$PY" -c 'import pyarrow; print(pyarrow.__version__)')"
