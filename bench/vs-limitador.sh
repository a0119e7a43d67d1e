#!/usr/bin/env bash
# Tollgate beside Limitador, one machine, one run, the same load generator and load: ext_authz
# `Check` (Tollgate) or `ShouldRateLimit` (Limitador, the published `limitador` engine behind
# Envoy's rate-limit API in `bench/limitador/`, in memory, on Redis and `redis_cached`),
# 10 customers, 1,000 users, three levels
# (organization, team, user), concurrency 64 over 8 HTTP/2 connections, one server worker.
# Tollgate's rows hold (never settled, as a route nobody settles), commit (`tollgate.commit`),
# or Check + Settle over its gRPC API; the no-op ext_authz server calibrates the first row.
# Prints every row, then each Tollgate row over Limitador on the like store (memory and durable
# over memory, Redis over Redis, Redis with leases over `redis_cached`).
#
#   bench/vs-limitador.sh          # ROUNDS=2, N=100000 requests a row
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
CARGO_TARGET_DIR=bench/limitador/target cargo build -q --release --locked \
  --manifest-path bench/limitador/Cargo.toml
LIM=bench/limitador/target/release/tollgate-limitador-bench
N=${N:-100000}
ROUNDS=${ROUNDS:-2}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
redis_port=$(start_redis "$work")
echo "# $(redis-server --version)"
redis_url="redis://127.0.0.1:$redis_port/"
redis="kind: redis, url: \"$redis_url\", timeoutMs: 1000"
declare -A sum

record() { # label, result line
  local tput
  tput=$(grep -o 'throughput=[0-9]*' <<< "$2" | cut -d= -f2)
  sum[$1]=$(( ${sum[$1]:-0} + ${tput:-0} ))
  echo "$2"
}

tollgate() { # label, storage, target (check|decide), more load arguments
  local label=$1 storage=$2 target=$3 more=${4:-} addr line
  "$LOAD" config --customers 10 --max-users 1000000 --hold-ttl PT20S --quotas \
    --storage "$storage" > "$work/bench.yaml"
  target/release/tollgate serve --config "$work/bench.yaml" --workers 1 > "$work/out" 2>&1 &
  echo $! > "$work/pid"
  for _ in $(seq 100); do grep -q ready "$work/out" && break; sleep 0.1; done
  case $target in
    decide) addr=$(grep -o 'grpc=[^ ]*' "$work/out" | cut -d= -f2); more="--target decide $more" ;;
    *) addr=$(grep -o 'ext_authz=[^ ]*' "$work/out" | cut -d= -f2) ;;
  esac
  # shellcheck disable=SC2086
  line=$("$LOAD" --workers 1 run --addr "$addr" --concurrency 64 --requests "$N" --users 1000 \
    --duration-secs 30 --label "$label" $more | grep -v WARN)
  kill "$(cat "$work/pid")"; wait "$(cat "$work/pid")" 2>/dev/null || true
  redis-cli -p "$redis_port" flushall > /dev/null
  grep -v "^$label " <<< "$line" || true
  record "$label" "$(grep "^$label " <<< "$line")"
}

limitador() { # label, storage
  local label=$1 addr line
  "$LIM" --storage "$2" --redis-url "$redis_url" --workers 1 > "$work/out" 2>&1 &
  echo $! > "$work/pid"
  for _ in $(seq 100); do grep -q ready "$work/out" && break; sleep 0.1; done
  addr=$(grep -o 'rls=[^ ]*' "$work/out" | cut -d= -f2)
  line=$("$LOAD" --workers 1 run --target rls --addr "$addr" --concurrency 64 --requests "$N" \
    --users 1000 --duration-secs 30 --label "$label" | grep -v WARN | tail -1)
  kill "$(cat "$work/pid")"; wait "$(cat "$work/pid")" 2>/dev/null || true
  redis-cli -p "$redis_port" flushall > /dev/null
  record "$label" "$line"
}

leases="$redis, leases: { enabled: true, ttl: PT60S, skew: PT2S }"
for round in $(seq "$ROUNDS"); do
  limitador limitador-memory memory
  limitador limitador-redis redis
  limitador limitador-redis-cached redis-cached
  tollgate tollgate-memory-hold "kind: memory" check "$( [ "$round" = 1 ] && echo --calibrate)"
  tollgate tollgate-memory-commit "kind: memory" check --commit
  tollgate tollgate-durable-commit "kind: durable, path: \"$work/t.redb\", durability: batched, commitIntervalMs: 100" check --commit
  tollgate tollgate-redis-hold "$redis" check
  tollgate tollgate-redis-commit "$redis" check --commit
  tollgate tollgate-leased-commit "$leases" check --commit
  tollgate tollgate-leased-check-settle "$leases" decide
  rm -f "$work/t.redb"
  echo "# round $round done"
done

ratio() { awk -v a="${sum[$1]}" -v b="${sum[$2]}" -v l="$1 / $2" 'BEGIN { printf "%-52s %.2f\n", l, (b > 0 ? a / b : 0) }'; }
echo "# throughput over Limitador on the same store, summed over $ROUNDS rounds"
for t in tollgate-memory-hold tollgate-memory-commit tollgate-durable-commit; do
  ratio $t limitador-memory
done
for t in tollgate-redis-hold tollgate-redis-commit; do
  ratio $t limitador-redis
done
for t in tollgate-leased-commit tollgate-leased-check-settle; do
  ratio $t limitador-redis-cached
done
