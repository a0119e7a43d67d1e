#!/usr/bin/env bash
# Usage reads on Redis at size (`make bench-usage-redis`): 10,000 series (1,000 teams x 10
# models), one call per series every hour for 30 days (7.2 million calls), then
# 1. the history queries and top spenders (benches/usage.rs): the first two runs of each scan
#    and seal, the timed ones read as the buckets then stand (the history after the first two
#    rounds is written as a leased replica's batches of local records, which is far sooner);
# 2. decision latency of a sidecar on the same Redis at `timeoutMs: 100` (Tollgate's gRPC
#    Check + Settle, concurrency 16, its own customers under another key prefix): alone, then
#    while a loop of those queries runs two at once under the default read budget (refusals
#    counted), and, as the control, while the same loop reads a copy of the history on a
#    second Redis (the same work for this machine's two cores, none for the decisions' Redis),
#    alternated `ROUNDS` times. Beside-same over beside-other is what the reads cost the
#    decisions through Redis; alone over beside-other is what sharing two cores costs.
#    Decisions come at a fixed `RATE` a second (open loop, each timed from when it was due),
#    as a sidecar under a steady load sees them; `RATE=0` sends them as fast as the answers
#    come back (closed loop), which fills both cores, so that anything else running on the
#    machine lengthens every decision.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
cargo build --release --locked -p tollgate --bench usage >&2
ROUNDS=${ROUNDS:-2}
N=${N:-150000}
LOOP_SECS=${LOOP_SECS:-25}
RATE=${RATE:-2000}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(redis-server --version | cut -d' ' -f3)"
redis_port=$(start_redis "$work")
url="redis://127.0.0.1:$redis_port/"
usage_bench=$(ls -t target/release/deps/usage-* | grep -v '\.d$' | head -1)

echo "## fill, then the queries (a read budget far above them: it is not what is timed)"
STORE=redis REDIS_URL="$url" FILL=local READ_BUDGET=100000000 "$usage_bench" --bench | grep -v '^$'
echo "Redis: $(redis-cli -p "$redis_port" info memory | grep -m1 '^used_memory_human' | tr -d '\r')"

echo "## a copy of the history on a second Redis, for the control"
mkdir -p "$work/other"
other_port=$(start_redis "$work/other")
cat "$work/other/redis.pid" >> "$work/pid"
redis-cli -p "$other_port" replicaof 127.0.0.1 "$redis_port" > /dev/null
for _ in $(seq 600); do
  redis-cli -p "$other_port" info replication | grep -q 'master_link_status:up' && break
  sleep 0.5
done
sleep 2
redis-cli -p "$other_port" replicaof no one > /dev/null
echo "copy: $(redis-cli -p "$other_port" dbsize) keys"

echo "## decisions alone and beside a loop of those queries (timeoutMs: 100, rate ${RATE}/s, 0: closed loop)"
"$LOAD" config --customers 10 --max-users 1000000 \
  --storage "kind: redis, url: \"$url\", timeoutMs: 100, prefix: decide" > "$work/decide.yaml"
target/release/tollgate serve --config "$work/decide.yaml" --workers 1 > "$work/side.out" 2>&1 &
echo $! >> "$work/pid"
for _ in $(seq 100); do grep -q ready "$work/side.out" && break; sleep 0.1; done
addr=$(grep -o 'grpc=[^ ]*' "$work/side.out" | cut -d= -f2)
decide() { # label
  "$LOAD" --workers 1 run --target decide --addr "$addr" --concurrency 16 --rate "$RATE" --requests "$N" \
    --users 1000 --duration-secs "$((LOOP_SECS - 5))" --label "$1"
}
beside() { # redis url of the queries, label
  FILLED=1 QUERIES=0 LOOP_SECS="$LOOP_SECS" STORE=redis REDIS_URL="$1" "$usage_bench" --bench \
    > "$work/loop.out" 2>&1 &
  local loop=$!
  for _ in $(seq 600); do grep -q 'loop: start' "$work/loop.out" && break; sleep 0.1; done
  decide "$2"
  wait "$loop"
  grep '^query loop' "$work/loop.out"
}
for round in $(seq "$ROUNDS"); do
  decide "alone-$round"
  beside "$url" "beside-queries-same-redis-$round"
  beside "redis://127.0.0.1:$other_port/" "beside-queries-other-redis-$round"
done
echo "sidecar: $(curl -s "http://$(grep -o 'http=[^ ]*' "$work/side.out" | cut -d= -f2)/metrics" | grep -E '^tollgate_store_(failures|breaker)' | tr '\n' ' ')"
