#!/usr/bin/env bash
# Usage attribution's costs, in one run (`make bench-usage`):
# 1. bytes per active series and history-query latency (benches/usage.rs): in process memory
#    over 30 days of hourly records for 1,000 teams x 10 models; the durable file's and Redis's
#    bytes per series; the same queries on Redis over daily records;
# 2. decision throughput with attribution on and off, same load, alternated: Tollgate's gRPC
#    Check + Settle (every call leaves a record) at concurrency 64, in memory;
# 3. the delay from a settle to its event on the resumable usage stream: one sidecar, and two
#    replicas sharing Redis (settled on one, streamed from the other).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
cargo build --release --locked -p tollgate --bench usage >&2
N=${N:-200000}
ROUNDS=${ROUNDS:-2}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(redis-server --version | cut -d' ' -f3)"

echo "## series and queries"
cargo bench -q -p tollgate --bench usage 2>/dev/null | grep -v '^$'
STORE=durable PHASES=series cargo bench -q -p tollgate --bench usage 2>/dev/null | grep -v '^$'
redis_port=$(start_redis "$work")
STORE=redis REDIS_URL="redis://127.0.0.1:$redis_port/" STEP_MIN=1440 \
  cargo bench -q -p tollgate --bench usage 2>/dev/null | grep -v '^$'
redis-cli -p "$redis_port" flushall > /dev/null

start_sidecar() { # name, config file; prints the out file once ready
  local name=$1 conf=$2
  target/release/tollgate serve --config "$conf" --workers 1 > "$work/$name.out" 2>&1 &
  echo $! >> "$work/pid"
  for _ in $(seq 100); do grep -q ready "$work/$name.out" && break; sleep 0.1; done
}
addr_of() { grep -o "$2=[^ ]*" "$work/$1.out" | cut -d= -f2; }
stop_sidecars() {
  kill $(cat "$work/pid") 2>/dev/null || true
  wait 2>/dev/null || true
  : > "$work/pid"
}

echo "## throughput, attribution on and off (gRPC Check + Settle, concurrency 64, in memory, 1 sidecar worker)"
"$LOAD" config --customers 10 --max-users 1000000 > "$work/on.yaml"
"$LOAD" config --customers 10 --max-users 1000000 --no-records > "$work/off.yaml"
for round in $(seq "$ROUNDS"); do
  for mode in on off; do
    start_sidecar "$mode" "$work/$mode.yaml"
    "$LOAD" --workers 1 run --target decide --addr "$(addr_of "$mode" grpc)" --concurrency 64 \
      --requests "$N" --users 1000 --duration-secs 60 --label "records-$mode"
    stop_sidecars
  done
done

echo "## stream delay, settle to event"
start_sidecar one "$work/on.yaml"
"$LOAD" stream-delay --settle-addr "$(addr_of one grpc)" --watch-addr "$(addr_of one grpc)" --label one-sidecar
stop_sidecars
"$LOAD" config --customers 10 --max-users 1000000 \
  --storage "kind: redis, url: \"redis://127.0.0.1:$redis_port/\", timeoutMs: 1000" > "$work/redis.yaml"
start_sidecar a "$work/redis.yaml"
start_sidecar b "$work/redis.yaml"
"$LOAD" stream-delay --settle-addr "$(addr_of a grpc)" --watch-addr "$(addr_of b grpc)" \
  --calls 200 --interval-ms 250 --label redis-2rep
stop_sidecars
