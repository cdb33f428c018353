#!/usr/bin/env bash
# Provision and start the services m365sync needs on a development or CI machine:
# RabbitMQ from Debian's packages, and FerretDB built from the Go module proxy on a
# PostgreSQL cluster of the project's own (Debian's package, under .run/, loopback only),
# whose indexes serve the service's queries (tools/ferretdb/gin-twins.sql). Idempotent:
# whatever is already installed, built or listening is left alone, so a second run takes a
# second or two.
#
#   scripts/services.sh up      install what is missing, start them, wait until they answer
#   scripts/services.sh down    stop the FerretDB and PostgreSQL started here (RabbitMQ is left running)
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
  postgres_up
  # Disposable development data: every start of FerretDB begins with an empty database.
  psql_admin -q -c "DROP DATABASE IF EXISTS ferretdb WITH (FORCE)" -c "CREATE DATABASE ferretdb"
  psql_admin -q -d ferretdb -f "$root/tools/ferretdb/gin-twins.sql"
  log "FerretDB: starting on 127.0.0.1:27017 (PostgreSQL on 127.0.0.1:$pg_port)"
  nohup "$run_dir/ferretdb-embed" -listen-addr 127.0.0.1:27017 \
    -postgresql-url "postgres://postgres@127.0.0.1:$pg_port/ferretdb?pool_max_conns=80" \
    >>"$run_dir/ferretdb.log" 2>&1 &
  echo $! >"$run_dir/ferretdb.pid"
  wait_port 127.0.0.1 27017 FerretDB 30
  log "FerretDB: ready on 127.0.0.1:27017"
}

# PostgreSQL behind FerretDB: a cluster of the project's own, so nothing of the machine's
# own PostgreSQL (if any) is touched. Test data only: durability is traded for speed
# (fsync off), which is safe because every start of FerretDB recreates its database.
pg_port=${M365SYNC_PG_PORT:-55432}

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$dir" ]; then
    log "PostgreSQL: installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
    dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  printf '%s' "$dir"
}

as_pg() {  # PostgreSQL refuses to run as root: run as the package's `postgres` user then
  if [ "$(id -u)" = 0 ]; then
    # From /: the clone may sit in a directory the postgres user cannot enter.
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

pg_data_dir() {
  # Under .run/ when the server's user can reach it; else (a clone below a private home)
  # in a directory of its own named after this clone, linked from .run/.
  local dir="$run_dir/postgres"
  if [ "$(id -u)" != 0 ] || runuser -u postgres -- test -x "$run_dir" 2>/dev/null; then
    printf '%s' "$dir"
    return
  fi
  local elsewhere
  elsewhere="/var/tmp/m365sync-postgres-$(printf '%s' "$root" | sha256sum | cut -c1-12)"
  ln -sfn "$elsewhere" "$dir"
  printf '%s' "$elsewhere"
}

psql_admin() {
  PGOPTIONS='-c client_min_messages=warning' "$(pg_bin)/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres "$@" >/dev/null
}

postgres_up() {
  local bin data
  bin=$(pg_bin)
  data=$(pg_data_dir)
  if port_open 127.0.0.1 "$pg_port"; then
    return
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    log "PostgreSQL: creating a cluster in $data"
    rm -rf "$data"
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres: "$data"
    chmod 700 "$data"
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
    cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = ''
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
# FerretDB passes field names as parameters: only a custom plan matches the serving indexes.
plan_cache_mode = force_custom_plan
CONF
  fi
  log "PostgreSQL: starting on 127.0.0.1:$pg_port"
  as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null
}

postgres_down() {
  local data
  data=$(readlink -f "$run_dir/postgres")  # the server's user may not reach it through .run/
  if [ -f "$data/postmaster.pid" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true
  fi
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
  down) ferretdb_down; postgres_down ;;
  *) echo "usage: $0 up|build|down" >&2; exit 2 ;;
esac
