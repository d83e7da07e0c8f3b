#!/bin/sh
# Postgres container init (mounted into /docker-entrypoint-initdb.d by docker-compose.yml; runs
# once, on an empty data directory): the runtime role teachd serves as. It may log in, and the
# migrations (run by the owner, POSTGRES_USER) grant it exactly what serving needs: append to
# and read the ledger, never change, delete or truncate it.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v pw="${TEACHD_APP_PASSWORD:-teachd-app}" <<'SQL'
CREATE ROLE teachd_app LOGIN PASSWORD :'pw';
SQL
