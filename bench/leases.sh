#!/usr/bin/env bash
# Escrow leases on Redis, in one run with one load: Tollgate's own gRPC Check then Settle (as
# the WASM filter decides and settles), a 3-level chain of calendar quotas (organization ->
# team -> user), 10 customers, 1,000 users of which 10 hot ones get 80 % of the calls,
# concurrency 64. Rows: the no-op calibration server, the in-memory store, Redis on one node
# without leases, Redis with leases. For each: throughput and latency, the sidecar's and
# Redis's CPU per decision (from /proc and INFO cpu), and with leases the share of decisions
# made locally. The sidecar runs one tokio worker, the load generator one: with Redis they
# share the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
N=${N:-300000}
SECS=${SECS:-30}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
redis_port=$(start_redis "$work")
echo "# $(redis-server --version)"
tick=$(getconf CLK_TCK)
proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_cpu() { redis-cli -p "$redis_port" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/{s += $2} END {printf "%.3f", s}'; }

run() { # label, storage section, extra load arguments, extra config arguments
  local label=$1 storage=$2
  "$LOAD" config --customers 10 --max-users 1000000 --hold-ttl PT20S --quotas \
    --storage "$storage" ${4:-} > "$work/bench.yaml"
  target/release/tollgate serve --config "$work/bench.yaml" --workers 1 > "$work/out" 2>&1 &
  echo $! > "$work/pid"
  for _ in $(seq 100); do grep -q ready "$work/out" && break; sleep 0.1; done
  local grpc http pid c0 r0 c1 r1 done
  grpc=$(grep -o 'grpc=[^ ]*' "$work/out" | cut -d= -f2)
  http=$(grep -o 'http=[^ ]*' "$work/out" | cut -d= -f2)
  pid=$(cat "$work/pid")
  c0=$(proc_cpu "$pid"); r0=$(redis_cpu)
  "$LOAD" --workers 1 run --target decide --addr "$grpc" --concurrency 64 --requests "$N" \
    --users 1000 --hot 10 --hot-percent 80 --duration-secs "$SECS" --label "$label" $3 \
    | tee "$work/result"
  c1=$(proc_cpu "$pid"); r1=$(redis_cpu)
  done=$(grep "^$label " "$work/result" | grep -o 'requests=[0-9]*' | cut -d= -f2)
  local local_share=""
  if curl -sf "http://$http/metrics" > "$work/metrics"; then
    local l p s
    l=$(awk '/^tollgate_lease_local_decisions_total /{print $2}' "$work/metrics")
    p=$(awk '/^tollgate_lease_partial_decisions_total /{print $2}' "$work/metrics")
    s=$(awk '/^tollgate_lease_store_decisions_total /{print $2}' "$work/metrics")
    if [ -n "$l" ] && [ "$((l + p + s))" -gt 0 ]; then
      local_share=$(awk -v l="$l" -v p="$p" -v s="$s" 'BEGIN{printf " local=%.1f%% partial=%.1f%% store=%.1f%%", 100*l/(l+p+s), 100*p/(l+p+s), 100*s/(l+p+s)}')
    fi
  fi
  awk -v c0="$c0" -v c1="$c1" -v r0="$r0" -v r1="$r1" -v n="$done" -v t="$tick" -v label="$label" -v ls="$local_share" \
    'BEGIN{printf "%-10s cpu/decision: sidecar=%.1fus redis=%.1fus total=%.1fus%s\n", label, 1e6*(c1-c0)/t/n, 1e6*(r1-r0)/n, 1e6*((c1-c0)/t+(r1-r0))/n, ls}'
  kill "$pid"; wait "$pid" 2>/dev/null || true
  redis-cli -p "$redis_port" flushall > /dev/null
}

# The harness's ceiling: the same load generator against a no-op ext_authz server (the
# decide target has no no-op twin; one ext_authz call stands for the check and the settle).
"$LOAD" noop > "$work/noop" 2>&1 &
echo $! > "$work/pid"
for _ in $(seq 100); do grep -q ready "$work/noop" && break; sleep 0.1; done
"$LOAD" --workers 1 run --addr "$(grep -o 'ext_authz=[^ ]*' "$work/noop" | cut -d= -f2)" \
  --concurrency 64 --requests "$N" --users 1000 --hot 10 --duration-secs "$SECS" --label noop
kill "$(cat "$work/pid")"; wait "$(cat "$work/pid")" 2>/dev/null || true

run memory "kind: memory" ""
run redis "kind: redis, url: \"redis://127.0.0.1:$redis_port/\", timeoutMs: 1000" ""
leases="leases: { enabled: true, ttl: PT60S, skew: PT2S }"
run leased "kind: redis, url: \"redis://127.0.0.1:$redis_port/\", timeoutMs: 1000, $leases" ""
# Where the rest goes: the same without usage records (no batches to write).
run leased-norec "kind: redis, url: \"redis://127.0.0.1:$redis_port/\", timeoutMs: 1000, $leases" "" --no-records
