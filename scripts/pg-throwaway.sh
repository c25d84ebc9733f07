#!/usr/bin/env bash
# Starts a throwaway Postgres on a random loopback port in a temporary directory and prints
# `PGDIR=... PGPORT=... DATABASE_URL=...`. Stop it with: scripts/pg-throwaway.sh stop PGDIR
# Works as root (Postgres refuses root, so it runs as the `postgres` user) or as a user.
set -euo pipefail
if [ "${1:-}" = stop ]; then
  dir=$2
  runas=(); [ "$(id -u)" = 0 ] && runas=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  bin=$(cat "$dir/bindir")
  "${runas[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi
bin=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bin/initdb" ] || bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "no Postgres server binaries: apt-get install postgresql" >&2; exit 1; }
dir=$(mktemp -d /tmp/m2t-pg.XXXXXX)
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
echo "$bin" > "$dir/bindir"
runas=()
if [ "$(id -u)" = 0 ]; then
  runas=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  chown postgres:postgres "$dir"
fi
"${runas[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1
"${runas[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 start \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1" >/dev/null
echo "PGDIR=$dir PGPORT=$port DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres"
