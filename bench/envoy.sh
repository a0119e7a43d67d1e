#!/usr/bin/env bash
# Added latency through Envoy, in one run: no filter, the WASM filter + sidecar, Envoy's native
# ext_authz + sidecar, each in front of the mock OpenAI upstream, at concurrency 1 and 16.
# Everything (Envoy with 2 workers, the sidecar with 2, the mock, the load generator) shares
# the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s release >&2
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
exec target/release/tollgate-load --workers 2 envoy-bench "$@"
