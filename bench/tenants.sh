#!/usr/bin/env bash
# Tenant isolation: one customer's ext_authz decision latency alone, then while a hostile
# customer on the same sidecar drives checks through its alert rules at the per-tenant budget
# (50 rules of 10 thresholds on its org quota, none ever crossed, so every one of its
# decisions evaluates all 500). Printed as p50/p99 and the ratio, alternated `ROUNDS` times
# (`make bench-tenants`).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup
ROUNDS=${ROUNDS:-2}
N=${N:-60000}
echo "# $(date -u +%F) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

# c0 is the quiet tenant; c1 the hostile one, whose rules sit at its budget; c2 the same load
# without rules, the control.
"$LOAD" config --customers 3 --max-users 1000000 > "$work/base.yaml"
rules=$(python3 - <<'PY'
out = ["    alerts:"]
for r in range(50):
    pct = ", ".join(str(10 * r + t + 1) for t in range(10))
    out.append(f"      - {{ id: r{r}, entity: c1, limit: org-monthly, percent: [{pct}] }}")
print("\n".join(out))
PY
)
python3 - "$work/base.yaml" "$work/tenants.yaml" "$rules" <<'PY'
import sys
text = open(sys.argv[1]).read()
marker = "  - id: c2\n"  # the rules end c1's entry
i = text.index(marker)
open(sys.argv[2], "w").write(text[:i] + sys.argv[3] + "\n" + text[i:])
PY
target/release/tollgate validate "$work/tenants.yaml" >&2
target/release/tollgate serve --config "$work/tenants.yaml" --workers 2 > "$work/out" 2>&1 &
echo $! > "$work/pid"
for _ in $(seq 50); do grep -q ready "$work/out" && break; sleep 0.1; done
addr=$(grep -o 'ext_authz=[^ ]*' "$work/out" | cut -d= -f2)

quiet() { # label
  "$LOAD" --workers 1 run --addr "$addr" --concurrency 16 --requests "$N" --customers 1 \
    --first-customer 0 --users 1000 --duration-secs 30 --label "$1"
}
beside() { # customer number, label: the quiet tenant's run while that customer is loaded too
  "$LOAD" --workers 1 run --addr "$addr" --concurrency 16 --requests 10000000 --customers 1 \
    --first-customer "$1" --users 1000 --duration-secs 12 --label "$2-load" &
  local other=$!
  sleep 1
  quiet "$2"
  wait "$other"
}
for round in $(seq "$ROUNDS"); do
  quiet "quiet-alone#$round"
  beside 2 "quiet-beside-plain#$round"
  beside 1 "quiet-beside-500-thresholds#$round"
done
