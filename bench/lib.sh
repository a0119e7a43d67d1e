# Shared by the bench scripts (sourced): the release build and a scratch folder, a free
# loopback port, and a Redis server on one.

# bench_setup: builds the release binaries, makes the scratch folder `$work` (removed on exit,
# with the processes whose pids are in `$work/pid` and `$work/redis.pid` stopped), sets `$LOAD`.
bench_setup() {
  make -s release >&2
  work=$(mktemp -d)
  trap 'kill $(cat "$work/pid" "$work/redis.pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
  LOAD=target/release/tollgate-load
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_redis DIR: Debian's redis-server on a free loopback port, no persistence, its pid in
# DIR/redis.pid; prints the port once it answers PING.
start_redis() {
  local dir=$1 port
  port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$dir" \
    > "$dir/redis.log" 2>&1 &
  echo $! > "$dir/redis.pid"
  for _ in $(seq 100); do
    redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
  done
  echo "$port"
}
