#!/usr/bin/env bash
# Times the console's 30-day overview and /admin/usage over a seeded ledger (issue 15):
#   scripts/bench-console.sh [ROWS]      (default 1000000; rows are spread over 30 days,
#                                          50 clients, 4 endpoints, 3 teachers, 10% refusals)
# Creates and drops the database teachd_bench_console; serves it on 127.0.0.1:18080.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/teachd/target}
scripts/build >/dev/null
BIN="$CARGO_TARGET_DIR/debug/teachd"
PSQL=(psql -h 127.0.0.1 -U postgres -q)
DB=teachd_bench_console
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
work=$(mktemp -d)
trap '[ -n "${server:-}" ] && kill "$server" 2>/dev/null; "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"; rm -rf "$work"' EXIT
printf 'models = []\n[server]\nbind = "127.0.0.1:18080"\n[database]\nurl = "postgres://postgres@127.0.0.1:5432/%s"\n' "$DB" >"$work/teachd.toml"
"$BIN" --config "$work/teachd.toml" migrate >/dev/null 2>&1
# Seeded in batches of at most a million rows (one statement each, as the writer's batches are).
done_rows=0
while [ "$done_rows" -lt "$ROWS" ]; do
  n=$(( ROWS - done_rows < 1000000 ? ROWS - done_rows : 1000000 ))
  "${PSQL[@]}" -d "$DB" -c "
    INSERT INTO usage_events (id, request_id, ts, client_id, key_id, method, endpoint, model,
      status, error_code, prompt_tokens, scored_tokens, generated_tokens, judgments, top_k,
      latency_ms, request_sha256, response_sha256, prev_hash, row_hash, refusals)
    SELECT g, 'b-' || g, now() - interval '30 days' * random(),
      ('00000000-0000-4000-8000-' || lpad((g % 50)::text, 12, '0'))::uuid, gen_random_uuid(),
      'POST', (ARRAY['/v1/logprobs','/v1/chat/completions','/v1/completions','/v1/judgments'])[1 + g % 4],
      (ARRAY['m-a','m-b','m-c'])[1 + g % 3], CASE WHEN g % 10 = 0 THEN 429 ELSE 200 END,
      CASE WHEN g % 10 = 0 THEN 'rate_limit_exceeded' END, 100, 99, g % 50, g % 2, 5, 12.5,
      decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'),
      decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'), 0
    FROM generate_series($((done_rows + 1)), $((done_rows + n))) g"
  done_rows=$(( done_rows + n ))
done
"${PSQL[@]}" -d "$DB" -c ANALYZE
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
