#!/usr/bin/env bash
# Installs what the campaigns crate's tests need on a fresh Debian machine. Idempotent.
#  - postgresql: the store tests start a real PostgreSQL server from its binaries
#    (initdb, pg_ctl in /usr/lib/postgresql/<version>/bin), as the `postgres` user the
#    package creates when they run as root. The package's own cluster is not used.
set -euo pipefail
have_initdb() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1
}
if ! have_initdb || ! id postgres >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends postgresql
fi
initdb=$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1 || true)
echo "campaigns test dependencies ready: $("${initdb:-initdb}" --version)"
