#!/usr/bin/env bash
# Installs what the sinks crate's tests need on a fresh Debian machine. Idempotent.
#  - pyarrow and DuckDB (Python): the independent readers tests/readers.rs checks the send's
#    Parquet files with.
set -euo pipefail

PY=python3
if ! "$PY" -c 'import pyarrow, duckdb' >/dev/null 2>&1; then
    # Debian's system Python refuses global pip installs unless told otherwise.
    "$PY" -m pip install --quiet pyarrow duckdb 2>/dev/null \
        || "$PY" -m pip install --quiet --break-system-packages pyarrow duckdb
fi
"$PY" -c 'import pyarrow, duckdb' || { echo "pyarrow or duckdb did not install" >&2; exit 1; }
echo "sinks test dependencies ready: pyarrow $("$PY" -c 'import pyarrow; print(pyarrow.__version__)'), duckdb $("$PY" -c 'import duckdb; print(duckdb.__version__)')"
