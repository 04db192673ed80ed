#!/usr/bin/env bash
# A private PostgreSQL cluster for development and tests, under .data/<name>.
# PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user
# (created by Debian's postgresql package); otherwise as the current user.
#
#   scripts/pg.sh up   NAME PORT      init if needed, start, create roles and database `herald`
#   scripts/pg.sh down NAME           stop
#   scripts/pg.sh recreate-db NAME PORT DB   drop and create database DB owned by herald_owner
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cmd=${1:?usage: pg.sh up|down|recreate-db NAME [PORT] [DB]}
name=${2:?cluster name}
port=${3:-54329}
dir="$ROOT/.data/$name"
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bindir" ] || { echo "pg.sh: PostgreSQL server binaries not found; run scripts/install-deps.sh" >&2; exit 1; }
export PGPASSWORD=postgres

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_admin() {
  "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

case "$cmd" in
up)
  mkdir -p "$ROOT/.data"
  if [ ! -s "$dir/PG_VERSION" ]; then
    echo "pg.sh: initialising cluster in .data/$name"
    mkdir -p "$dir"
    pwfile=$(mktemp)
    echo postgres > "$pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir" "$pwfile"; chmod 755 "$ROOT/.data"; fi
    as_owner "$bindir/initdb" -D "$dir" -U postgres --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    cat >> "$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
max_connections = 200
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
CONF
  fi
  # A cluster made with another port (the fixed test ports moved below the ephemeral range)
  # takes the one asked for.
  if ! grep -q "^port = $port\$" "$dir/postgresql.conf"; then
    as_owner sed -i "s/^port = .*/port = $port/" "$dir/postgresql.conf"
    as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1 && as_owner "$bindir/pg_ctl" -D "$dir" -m fast -w restart -l "$dir/server.log" >/dev/null
  fi
  # pg_stat_statements lets the isolation suite see every statement the application sends
  # (one transaction per request; every tenant statement names its organisation).
  if ! grep -q '^shared_preload_libraries' "$dir/postgresql.conf"; then
    echo "shared_preload_libraries = 'pg_stat_statements'" >> "$dir/postgresql.conf"
    echo "pg_stat_statements.track_utility = on" >> "$dir/postgresql.conf"
    as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1 && as_owner "$bindir/pg_ctl" -D "$dir" -m fast -w restart -l "$dir/server.log" >/dev/null
  fi
  # Room for every distinct statement of a whole test run (each SET LOCAL of a new organisation
  # is one): at the default 5000 the least used entries are evicted while a suite reads them.
  if ! grep -q '^pg_stat_statements.max' "$dir/postgresql.conf"; then
    echo "pg_stat_statements.max = 50000" >> "$dir/postgresql.conf"
    as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1 && as_owner "$bindir/pg_ctl" -D "$dir" -m fast -w restart -l "$dir/server.log" >/dev/null
  fi
  if ! as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    echo "pg.sh: starting PostgreSQL on 127.0.0.1:$port (.data/$name)"
    as_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
  fi
  psql_admin -d postgres -v owner_password=herald_owner -v app_password=herald_app -v worker_password=herald_worker -f sql/bootstrap/roles.sql
  # Clusters made before the worker role could log in get its login and password here.
  psql_admin -d postgres -c "ALTER ROLE herald_worker LOGIN PASSWORD 'herald_worker'" >/dev/null
  # The owner may read every role's statement statistics (tests and operators, not the app).
  psql_admin -d postgres -c "GRANT pg_read_all_stats TO herald_owner" >/dev/null
  if [ -z "$(psql_admin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'herald'")" ]; then
    psql_admin -d postgres -c "CREATE DATABASE herald OWNER herald_owner"
    psql_admin -d herald -c "REVOKE CREATE ON SCHEMA public FROM PUBLIC; ALTER SCHEMA public OWNER TO herald_owner"
  fi
  ;;
down)
  if [ -s "$dir/PG_VERSION" ] && as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    echo "pg.sh: stopping PostgreSQL (.data/$name)"
    as_owner "$bindir/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
  fi
  ;;
recreate-db)
  db=${4:?database name}
  psql_admin -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  psql_admin -d postgres -c "CREATE DATABASE $db OWNER herald_owner"
  psql_admin -d "$db" -c "REVOKE CREATE ON SCHEMA public FROM PUBLIC; ALTER SCHEMA public OWNER TO herald_owner"
  psql_admin -d "$db" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
  ;;
*)
  echo "usage: pg.sh up|down|recreate-db NAME [PORT] [DB]" >&2; exit 2 ;;
esac
