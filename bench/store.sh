#!/usr/bin/env bash
# Decision throughput and latency by store, in one run, with the same load generator: the
# in-memory store (baseline), the durable embedded store in batched and sync mode, Redis on a
# single node (Debian's redis-server, no persistence, on a free loopback port), and the no-op
# ext_authz calibration server. ext_authz Check over loopback gRPC, 3-level chain
# (organization -> team -> user), 10 customers, 1,000 users, concurrency 64. The sidecar and the
# load generator share the machine's cores (2 tokio workers each).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
N=${N:-200000}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); disk: $(df -h "$work" | awk 'NR==2{print $1}')"

run() { # label, storage section (or empty)
  local label=$1 storage=$2
  if [ -n "$storage" ]; then
    "$LOAD" config --customers 10 --max-users 1000000 --storage "$storage" > "$work/bench.yaml"
  else
    "$LOAD" config --customers 10 --max-users 1000000 > "$work/bench.yaml"
  fi
  target/release/tollgate serve --config "$work/bench.yaml" --workers 2 > "$work/out" 2>&1 &
  echo $! > "$work/pid"
  for _ in $(seq 100); do grep -q ready "$work/out" && break; sleep 0.1; done
  addr=$(grep -o 'ext_authz=[^ ]*' "$work/out" | cut -d= -f2)
  "$LOAD" --workers 2 run --addr "$addr" --concurrency 64 --requests "$N" --users 1000 \
    --duration-secs 30 --label "$label" $3
  kill "$(cat "$work/pid")"; wait "$(cat "$work/pid")" 2>/dev/null || true
  rm -rf "$work"/data
}

run memory "" --calibrate
run batched "kind: durable, path: $work/data/t.redb, durability: batched, commitIntervalMs: 100" ""
run sync "kind: durable, path: $work/data/t.redb, durability: sync" ""

redis_port=$(start_redis "$work")
echo "# $(redis-server --version)"
run redis "kind: redis, url: \"redis://127.0.0.1:$redis_port/\", timeoutMs: 1000" ""
