#!/usr/bin/env bash
# ext_authz Check over loopback gRPC, calibrated against a no-op ext_authz server in the same
# run: concurrency 1, 16 and 64, with 1,000 and 1,000,000 distinct users, on a 3-level chain
# (organization -> team -> user) in the embedded store. Also the HTTP check at concurrency 64.
# Sidecar and load generator share the machine's cores (2 tokio workers each).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

start_sidecar() {
  "$LOAD" config --customers 10 --max-users 1000000 > "$work/bench.yaml"
  target/release/tollgate serve --config "$work/bench.yaml" --workers 2 > "$work/out" 2>&1 &
  echo $! > "$work/pid"
  for _ in $(seq 50); do grep -q ready "$work/out" && break; sleep 0.1; done
  grep -o 'ext_authz=[^ ]*' "$work/out" | cut -d= -f2
}
stop_sidecar() { kill "$(cat "$work/pid")"; wait "$(cat "$work/pid")" 2>/dev/null || true; }

for users in 1000 1000000; do
  # A fresh sidecar per user count, so 1M-user runs start from an empty store.
  addr=$(start_sidecar)
  for c in 1 16 64; do
    if [ "$c" = 1 ]; then n=20000; else n=200000; fi
    "$LOAD" --workers 2 run --addr "$addr" --concurrency "$c" --requests "$n" --users "$users" \
      --duration-secs 30 --calibrate
  done
  http=$(grep -o 'http=[^ ]*' "$work/out" | cut -d= -f2)
  "$LOAD" --workers 2 run --target http --addr "$http" --concurrency 64 --requests 100000 \
    --users "$users" --duration-secs 30 --label tollgate-http
  rss=$(awk '/VmRSS/{print $2}' "/proc/$(cat "$work/pid")/status")
  echo "sidecar RSS after the runs: $((rss / 1024)) MiB"
  stop_sidecar
done
