#!/usr/bin/env bash
# Times the console's 30-day overview and /admin/usage over a seeded ledger (issue 15):
#   scripts/bench-console.sh [ROWS]      (default 1000000; rows are spread over 30 days,
#                                          50 clients, 4 endpoints, 3 teachers, 10% refusals)
#   env: SEED_ORDER=append (default) rows in time order, as the ledger writes them (a row's
#        ts is its commit time, ids grow with it); SEED_ORDER=random scatters ts over the heap
#        (the worst case for the queries that read raw rows, e.g. the latency percentiles)
# Creates and drops the database teachd_bench_console; serves it on 127.0.0.1:18080.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/teachd/target}
scripts/build >/dev/null
BIN="$CARGO_TARGET_DIR/debug/teachd"
PSQL=(psql -h 127.0.0.1 -U postgres -q)
DB=teachd_bench_console
# Seeded rows are vacuumed and analyzed, as autovacuum does to a live ledger.
# KEEP=1 keeps the seeded database for the next run (which then skips seeding when it holds
# ROWS rows) instead of dropping it.
seeded=0
if [ "${KEEP:-0}" = 1 ] && [ "$("${PSQL[@]}" -tA -d "$DB" -c "SELECT count(*) >= $ROWS FROM usage_events" 2>/dev/null)" = t ]; then
  seeded=1
else
  "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
fi
work=$(mktemp -d)
drop='"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)";'
[ "${KEEP:-0}" = 1 ] && drop=
trap '[ -n "${server:-}" ] && kill "$server" 2>/dev/null; '"$drop"' rm -rf "$work"' EXIT
printf 'models = []\n[server]\nbind = "127.0.0.1:18080"\n[database]\nurl = "postgres://postgres@127.0.0.1:5432/%s"\n' "$DB" >"$work/teachd.toml"
"$BIN" --config "$work/teachd.toml" migrate >/dev/null 2>&1
if [ "${SEED_ORDER:-append}" = random ]; then
  ts_expr="now() - interval '30 days' * random()"
else
  ts_expr="now() - interval '30 days' * (1 - g::float8 / $ROWS) - interval '1 second' * random()"
fi
# Seeded in batches of at most a million rows (one statement each, as the writer's batches are).
done_rows=0
[ "$seeded" = 1 ] && done_rows=$ROWS
while [ "$done_rows" -lt "$ROWS" ]; do
  n=$(( ROWS - done_rows < 1000000 ? ROWS - done_rows : 1000000 ))
  "${PSQL[@]}" -d "$DB" -c "
    INSERT INTO usage_events (id, request_id, ts, client_id, key_id, method, endpoint, model,
      status, error_code, prompt_tokens, scored_tokens, generated_tokens, judgments, top_k,
      latency_ms, request_sha256, response_sha256, prev_hash, row_hash, refusals)
    SELECT g, 'b-' || g, $ts_expr,
      ('00000000-0000-4000-8000-' || lpad((g % 50)::text, 12, '0'))::uuid, gen_random_uuid(),
      'POST', (ARRAY['/v1/logprobs','/v1/chat/completions','/v1/completions','/v1/judgments'])[1 + g % 4],
      (ARRAY['m-a','m-b','m-c'])[1 + g % 3], CASE WHEN g % 10 = 0 THEN 429 ELSE 200 END,
      CASE WHEN g % 10 = 0 THEN 'rate_limit_exceeded' END, 100, 99, g % 50, g % 2, 5, 12.5,
      decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'),
      decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'), 0
    FROM generate_series($((done_rows + 1)), $((done_rows + n))) g"
  done_rows=$(( done_rows + n ))
done
[ "$seeded" = 1 ] || "${PSQL[@]}" -d "$DB" -c "VACUUM ANALYZE"
key=$("$BIN" --config "$work/teachd.toml" admin bootstrap 2>/dev/null | tail -1)
"$BIN" --config "$work/teachd.toml" serve >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 50); do curl -fsS -o /dev/null http://127.0.0.1:18080/healthz 2>/dev/null && break; sleep 0.2; done
cookie=$(curl -s -o /dev/null -D - -X POST --data-urlencode "key=$key" http://127.0.0.1:18080/console/login \
  | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\);.*/\1/p')
echo "rows: $ROWS"
for range in 30d 30d 30d day hour; do
  curl -s -o /dev/null -w "console overview range=$range: %{http_code} %{time_total}s\n" \
    -H "cookie: $cookie" "http://127.0.0.1:18080/console?range=$range"
done
for group in day day client; do
  curl -s -o /dev/null -w "/admin/usage?group_by=$group: %{http_code} %{time_total}s\n" \
    -H "authorization: Bearer $key" "http://127.0.0.1:18080/admin/usage?group_by=$group"
done
