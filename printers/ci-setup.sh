#!/usr/bin/env bash
# Installs what the printers crate's tests need on a fresh Debian machine. Idempotent.
#  - openssl: printers/tests/https.rs makes its private CA and localhost certificate with it.
set -euo pipefail
if ! command -v openssl >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends openssl
fi
echo "printers test dependencies ready: $(openssl version)"
