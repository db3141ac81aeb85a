#!/usr/bin/env bash
# Installs what the checks of deploy/ and of the dashboard page need on a fresh Debian
# machine. Idempotent.
#  - chromium (Debian's package): tests/ui.rs loads the dashboard page in headless Chromium.
#  - promtool (Debian's prometheus package): tests/metrics.rs runs `promtool check config`,
#    `promtool check rules` and `promtool test rules` on deploy/prometheus/. Only the command
#    is used; no Prometheus server is started.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${need[@]}"
fi
echo "deploy and dashboard check dependencies ready: $(promtool --version 2>&1 | head -n 1); $(command -v chromium)"
