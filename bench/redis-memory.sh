#!/usr/bin/env bash
# Redis memory per active counter: a release sidecar on the Redis store creates counters for
# USERS random users over 10 customers (each decision touches a user rate counter, its team's
# rate counter and its organization's quota), holds expire after 1 s and are swept, and the
# growth of Redis's `used_memory` is divided by the counters the store holds.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
USERS=${USERS:-300000}
port=$(start_redis "$work")
mem() { redis-cli -p "$port" info memory | awk -F: '/^used_memory:/{print $2+0}'; }
"$LOAD" config --customers 10 --max-users 10000000 --hold-ttl PT1S \
  --storage "kind: redis, url: \"redis://127.0.0.1:$port/\", timeoutMs: 1000" > "$work/bench.yaml"
target/release/tollgate serve --config "$work/bench.yaml" --workers 2 > "$work/out" 2>&1 &
echo $! > "$work/pid"
for _ in $(seq 100); do grep -q ready "$work/out" && break; sleep 0.1; done
addr=$(grep -o 'ext_authz=[^ ]*' "$work/out" | cut -d= -f2)
http=$(grep -o 'http=[^ ]*' "$work/out" | cut -d= -f2)
before=$(mem)
"$LOAD" --workers 2 run --addr "$addr" --concurrency 64 --requests "$USERS" --users "$USERS" \
  --duration-secs 120 --label redis-fill
sleep 3 # every hold's TTL passes and the sweep commits them
after=$(mem)
counters=$(curl -s "http://$http/metrics" | awk '/^tollgate_counters_active /{print $2}')
holds=$(curl -s "http://$http/metrics" | awk '/^tollgate_holds_open /{print $2}')
keys=$(redis-cli -p "$port" dbsize)
echo "# $(date -u +%F) $(redis-server --version | cut -d' ' -f3)"
echo "counters=$counters holds_open=$holds keys=$keys used_memory_before=$before used_memory_after=$after" \
  "bytes_per_counter=$(( (after - before) / counters ))"
