#!/usr/bin/env bash
# A throwaway PostgreSQL for the catalog tests, bound to 127.0.0.1 only; prints its URL as the last line.
#
#   export LORA_STUDIO_TEST_PG_URL="$(.ci/postgres.sh | tail -n 1)"
#   .venv/bin/pytest tests/test_db*.py
#   .ci/postgres.sh stop      # stop the server (data dir kept; the next start reuses it)
#   .ci/postgres.sh purge     # stop and delete the data dir
#
# Installs Debian's postgresql when no server binaries are found (needs root). Run as root, the server runs as
# the `postgres` user (postgres refuses root). Idempotent: a server this script started is reused. If the port
# (LORA_STUDIO_PG_PORT, default 55432) is held by something else, the next free port up to +20 is used.
# Data: ${LORA_STUDIO_PG_DIR:-/tmp/lora-studio-pg}-PORT, fsync off (test data only). The socket lives in the
# data dir with mode 0700; TCP logins need the role's password (scram-sha-256), kept in DATADIR.url.
set -euo pipefail

PORT="${LORA_STUDIO_PG_PORT:-55432}"
BASE="${LORA_STUDIO_PG_DIR:-/tmp/lora-studio-pg}"
DB=lora_studio_test
ROLE=lora_studio
ACTION="${1:-start}"

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }
pg_bindir() { find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ -f "$1/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

BIN="$(pg_bindir)"
if [ -z "$BIN" ]; then
  [ "$ACTION" = start ] || exit 0
  [ "$(id -u)" -eq 0 ] || die "no PostgreSQL server binaries; run as root to install Debian's postgresql"
  log "installing Debian postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
  BIN="$(pg_bindir)"
  [ -n "$BIN" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin found"
fi

exec 9>"/tmp/lora-studio-pg.lock"
flock 9  # one instance of this script at a time: no two initdb on one dir, no two servers on one port

case "$ACTION" in
  stop | purge)
    for data in "$BASE"-*; do
      [ -d "$data" ] || continue
      if running "$data"; then as_pg "$BIN/pg_ctl" -D "$data" -m fast -w stop >&2; fi
      if [ "$ACTION" = purge ]; then rm -rf "$data" "$data.url"; log "removed $data"; fi
    done
    exit 0 ;;
  start) ;;
  *) die "usage: $0 [start|stop|purge]" ;;
esac

data=""
for port in $(seq "$PORT" $((PORT + 20))); do
  candidate="$BASE-$port"
  if running "$candidate" && [ -f "$candidate.url" ]; then data="$candidate"; break; fi
  if port_open "$port"; then log "port $port is taken, trying the next"; continue; fi
  data="$candidate"; break
done
[ -n "$data" ] || die "no free port in $PORT..$((PORT + 20))"

if [ ! -f "$data/PG_VERSION" ]; then
  log "initdb $data (port $port)"
  rm -rf "$data" "$data.url"
  mkdir -p "$data" && chmod 700 "$data"
  [ "$(id -u)" -ne 0 ] || chown postgres: "$data"
  pwfile="$(mktemp)"
  od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$pwfile"
  [ "$(id -u)" -ne 0 ] || chown postgres: "$pwfile"
  as_pg "$BIN/initdb" -D "$data" -U postgres -E UTF8 --no-locale --auth-local=trust \
    --auth-host=scram-sha-256 --pwfile="$pwfile" >&2
  password="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
  rm -f "$pwfile"
  as_pg tee -a "$data/postgresql.conf" >/dev/null <<CONF
# lora-studio test server (.ci/postgres.sh)
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
unix_socket_permissions = 0700
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 50
CONF
  umask 077
  echo "postgresql+psycopg://$ROLE:$password@127.0.0.1:$port/$DB" >"$data.url"
  echo "$password" >"$data.password"
fi

if ! running "$data"; then
  log "starting PostgreSQL on 127.0.0.1:$port ($data)"
  as_pg "$BIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >&2 9>&-  # the server must not hold our lock
fi

psql_su() { as_pg "$BIN/psql" -h "$data" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ -f "$data.password" ]; then  # first start: create the role and the database
  password="$(cat "$data.password")"
  if [ "$(psql_su -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_su -c "CREATE ROLE $ROLE LOGIN PASSWORD '$password'"
  fi
  if [ "$(psql_su -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_su -c "CREATE DATABASE $DB OWNER $ROLE"
  fi
  rm -f "$data.password"
fi

as_pg "$BIN/pg_isready" -h 127.0.0.1 -p "$port" -d "$DB" >&2
cat "$data.url"
