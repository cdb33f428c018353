#!/usr/bin/env bash
# Provision and start the services m365sync needs on a development or CI machine:
# RabbitMQ from Debian's packages and FerretDB (SQLite backend) built from the Go module
# proxy. Idempotent: whatever is already installed, built or listening is left alone, so
# a second run takes a second or two.
#
#   scripts/services.sh up      install what is missing, start both, wait until they answer
#   scripts/services.sh down    stop the FerretDB started here (RabbitMQ is left running)
#
# M365SYNC_AMQP_URL / M365SYNC_MONGODB_URL, when set, point at services run elsewhere:
# nothing is installed or started for them.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
run_dir="$root/.run"
mkdir -p "$run_dir"

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {  # host port name seconds
  local i
  for ((i = 0; i < $4 * 10; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.1
  done
  log "$3 did not start listening on $1:$2 within $4 s"
  return 1
}

rabbitmq_up() {
  if [ -n "${M365SYNC_AMQP_URL:-}" ]; then
    log "RabbitMQ: using M365SYNC_AMQP_URL, nothing to start"
    return
  fi
  if port_open 127.0.0.1 5672; then
    if ! port_open 127.0.0.1 15672; then
      rabbitmq-plugins -q enable rabbitmq_management >/dev/null
      wait_port 127.0.0.1 15672 "RabbitMQ management" 60
    fi
    log "RabbitMQ: already listening on 127.0.0.1:5672"
    return
  fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "RabbitMQ: installing Debian's rabbitmq-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  # The management plugin gives the tests a fast HTTP API for private vhosts and
  # consumer counts (its `guest` user works from loopback only); `--offline` edits the
  # enabled-plugins file without a running node.
  rabbitmq-plugins -q enable --offline rabbitmq_management >/dev/null
  # The package may have started it already (on machines with an init system).
  if ! port_open 127.0.0.1 5672; then
    log "RabbitMQ: starting"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
  fi
  wait_port 127.0.0.1 5672 RabbitMQ 90
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  wait_port 127.0.0.1 15672 "RabbitMQ management" 60
  log "RabbitMQ: ready on 127.0.0.1:5672"
}

ferretdb_binary() {
  # The binary is cached outside the work tree, keyed by its sources, so a fresh clone on
  # a machine that built it once (CI after a session) starts in seconds.
  local src="$root/tools/ferretdb" cache key bin
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/m365sync"
  key=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
  bin="$cache/ferretdb-embed-$key"
  ln -sfn "$bin" "$run_dir/ferretdb-embed"
  if [ -x "$bin" ]; then
    return
  fi
  mkdir -p "$cache"
  if ! command -v go >/dev/null 2>&1; then
    log "FerretDB: no Go toolchain on PATH; cannot build"
    exit 1
  fi
  log "FerretDB: building v1.24.2 from the Go module proxy (a few minutes on a fresh machine)"
  local started=$SECONDS
  (cd "$src" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -o "$bin" .)
  log "FerretDB: built in $((SECONDS - started)) s"
}

ferretdb_up() {
  # The fault tests run private FerretDB processes from this binary even when the shared
  # database is someone else's (already listening, or M365SYNC_MONGODB_URL): without it
  # they would be skipped.
  if [ -z "${M365SYNC_MONGODB_URL:-}" ] || command -v go >/dev/null 2>&1; then
    ferretdb_binary
  fi
  if [ -n "${M365SYNC_MONGODB_URL:-}" ]; then
    log "MongoDB: using M365SYNC_MONGODB_URL, nothing to start"
    return
  fi
  if port_open 127.0.0.1 27017; then
    log "FerretDB: already listening on 127.0.0.1:27017"
    return
  fi
  # Development and test data, on disk: on tmpfs the embedded SQLite died with SIGBUS in
  # its WAL reader several times an hour under the test suite, and it was no faster.
  local data="$run_dir/ferretdb-data"
  # Disposable development data: start empty, so a file left half-written by a killed
  # server cannot keep the next one from starting (FerretDB refuses such a file).
  rm -rf "$data"
  mkdir -p "$data"
  log "FerretDB: starting on 127.0.0.1:27017 (SQLite in $data)"
  nohup "$run_dir/ferretdb-embed" -listen-addr 127.0.0.1:27017 -sqlite-dir "$data" \
    >>"$run_dir/ferretdb.log" 2>&1 &
  echo $! >"$run_dir/ferretdb.pid"
  wait_port 127.0.0.1 27017 FerretDB 30
  log "FerretDB: ready on 127.0.0.1:27017"
}

ferretdb_down() {
  if [ -f "$run_dir/ferretdb.pid" ]; then
    kill "$(cat "$run_dir/ferretdb.pid")" 2>/dev/null || true
    rm -f "$run_dir/ferretdb.pid"
  fi
}

case "${1:-up}" in
  up) rabbitmq_up; ferretdb_up ;;
  build) ferretdb_binary ;;
  down) ferretdb_down ;;
  *) echo "usage: $0 up|build|down" >&2; exit 2 ;;
esac
