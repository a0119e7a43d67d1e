#!/usr/bin/env bash
# Two builds of the sidecar side by side in one run, alternated, with the same load generator
# (this checkout's) and the same loads: ext_authz `Check` in memory and on Redis (holds never
# settled, as on the native ext_authz path), and gRPC Check then Settle on Redis without and
# with escrow leases (as the WASM filter decides and settles; every settle is a usage record). 10 customers, 1,000 users, 3 quota levels,
# concurrency 64; every row twice, A then B then A then B. With COMMIT=1, two rows more: the
# ext_authz checks in memory and on Redis with `tollgate.commit: "true"` (a build that does not
# know it ignores it and holds).
#
#   bench/compare.sh BEFORE_BINARY AFTER_BINARY
#
# Build the "before" binary from another checkout, e.g. `git worktree add /tmp/before REV`
# and `CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p tollgate` there.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
[ $# -eq 2 ] || { echo "usage: bench/compare.sh BEFORE_BINARY AFTER_BINARY" >&2; exit 2; }
A=$(realpath "$1")
B=$(realpath "$2")
bench_setup
N=${N:-150000}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
redis_port=$(start_redis "$work")
echo "# $(redis-server --version)"
redis="kind: redis, url: \"redis://127.0.0.1:$redis_port/\", timeoutMs: 1000"

run() { # binary, label, storage, load target arguments, requests, more load arguments
  local bin=$1 label=$2 storage=$3 target=$4 n=$5 more=${6:-}
  "$LOAD" config --customers 10 --max-users 1000000 --hold-ttl PT20S --quotas \
    --storage "$storage" > "$work/bench.yaml"
  "$bin" serve --config "$work/bench.yaml" --workers 1 > "$work/out" 2>&1 &
  echo $! > "$work/pid"
  for _ in $(seq 100); do grep -q ready "$work/out" && break; sleep 0.1; done
  local addr
  case $target in
    decide) addr=$(grep -o 'grpc=[^ ]*' "$work/out" | cut -d= -f2) ;;
    *) addr=$(grep -o 'ext_authz=[^ ]*' "$work/out" | cut -d= -f2) ;;
  esac
  # shellcheck disable=SC2086
  "$LOAD" --workers 1 run $( [ "$target" = decide ] && echo "--target decide" ) --addr "$addr" \
    --concurrency 64 --requests "$n" --users 1000 --hot 10 --hot-percent 80 \
    --duration-secs 30 --label "$label" $more
  kill "$(cat "$work/pid")"; wait "$(cat "$work/pid")" 2>/dev/null || true
  redis-cli -p "$redis_port" flushall > /dev/null
}

for round in 1 2; do
  for side in before after; do
    bin=$A; [ "$side" = after ] && bin=$B
    run "$bin" "$side-memory" "kind: memory" check "$N"
    run "$bin" "$side-redis" "$redis" check "$((N / 3))"
    run "$bin" "$side-redis-decide" "$redis" decide "$((N / 3))"
    run "$bin" "$side-leased" "$redis, leases: { enabled: true, ttl: PT60S, skew: PT2S }" decide "$N"
    if [ "${COMMIT:-0}" = 1 ]; then
      run "$bin" "$side-memory-commit" "kind: memory" check "$N" --commit
      run "$bin" "$side-redis-commit" "$redis" check "$((N / 3))" --commit
    fi
  done
  echo "# round $round done"
done
