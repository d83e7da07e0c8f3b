#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on $PGHOST:$PGPORT (default 127.0.0.1:5432, user
# postgres, trust auth): start the local cluster if it is down, install it if it is missing.
# With a database name as argument, also create that database when it does not exist.
set -euo pipefail
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}

ready() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1 || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  if ! ready 2>/dev/null; then
    echo "ensure-postgres: installing PostgreSQL (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    # Local test server: trust auth over TCP on loopback, as the project expects.
    sed -i 's/^\(host.*127.0.0.1\/32 *\)\(scram-sha-256\|md5\|peer\)$/\1trust/' "/etc/postgresql/$ver/main/pg_hba.conf"
  fi
fi
if ! ready; then
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  echo "ensure-postgres: starting cluster $ver/main" >&2
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 || true
  for _ in $(seq 1 30); do ready && break; sleep 1; done
fi
ready || { echo "ensure-postgres: PostgreSQL is not answering on $PGHOST:$PGPORT" >&2; exit 1; }

if [[ $# -ge 1 ]]; then
  db=$1
  if ! psql -qtA -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    createdb "$db"
    echo "ensure-postgres: created database $db" >&2
  fi
fi
