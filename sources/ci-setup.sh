#!/usr/bin/env bash
# Installs what the ERP source's end-to-end tests (tests/erp.rs) need on a fresh Debian machine.
# Idempotent.
#  - pysqlbridge: a SQL Server wire-protocol (TDS, with TLS) server that serves CSV files as
#    read-only tables; the tests start it on a free loopback port. Pinned: the tests rely on its
#    type inference and T-SQL subset.
#  - iridium-server (cargo install iridium_server): an in-memory T-SQL engine over TDS, for the
#    typed columns pysqlbridge cannot send.
set -euo pipefail

PY=python3
command -v "$PY" >/dev/null 2>&1 || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-pip
}

want=2.1.3
have=$("$PY" -c 'import importlib.metadata as m; print(m.version("pysqlbridge"))' 2>/dev/null || true)
if [[ "$have" != "$want" ]] || ! command -v pysqlbridge >/dev/null 2>&1; then
    # Debian's system Python refuses global pip installs unless told otherwise.
    "$PY" -m pip install --quiet "pysqlbridge==$want" 2>/dev/null \
        || "$PY" -m pip install --quiet --break-system-packages "pysqlbridge==$want"
fi
command -v pysqlbridge >/dev/null || { echo "pysqlbridge installed but not on PATH" >&2; exit 1; }

# iridium-server: an in-memory T-SQL engine speaking TDS 7.4 (no TLS in the tests), for the
# column types pysqlbridge cannot send (decimal, money, GUID, char, date/time). Built once into
# ~/.cargo/bin with its own target directory, so it never touches the project's.
iridium_want=0.1.12
export PATH="$HOME/.cargo/bin:$PATH"
if ! iridium-server --help 2>/dev/null | grep -q "TDS 7.4"; then
    cargo install --quiet --locked iridium_server --version "$iridium_want" \
        --target-dir "$HOME/.cache/broadside/iridium-build"
fi
command -v iridium-server >/dev/null || { echo "iridium-server installed but not on PATH" >&2; exit 1; }
echo "ERP test dependencies ready: pysqlbridge $("$PY" -c 'import importlib.metadata as m; print(m.version("pysqlbridge"))'), iridium_server $iridium_want"
