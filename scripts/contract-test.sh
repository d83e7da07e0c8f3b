#!/usr/bin/env bash
# Contract fuzzing: schemathesis runs every operation of the committed OpenAPI document
# (openapi/openapi.json) against a live teachd with the real default model and a fresh Postgres
# database, with a fixed seed, derandomized generation and a bounded number of examples. Any 5xx
# or any response that the spec does not describe fails the run.
#
#   usage: scripts/contract-test.sh [EXTRA SCHEMATHESIS RUN OPTIONS...]
#          (e.g. --continue-on-failure, --include-operation-id logprobs)
#   env:   CONTRACT_MAX_EXAMPLES (default 100) examples per operation in the fuzzing phase
#          CONTRACT_SEED         (default 20240607)
#          CONTRACT_REPORT_DIR   (default: a temp dir, removed)  keep JUnit reports + server log
#          TEACHD_TOOLS_DIR      (default ~/.cache/teachd/tools)  where the schemathesis venv lives
#          CARGO_TARGET_DIR      (default ~/.cache/teachd/target) where the teachd binary is
#          TEACHD_BIN            (default $CARGO_TARGET_DIR/debug/teachd)
#
# Prints `contract: N passed, M failed` (N, M count API operations over both passes) and exits
# non-zero on any failure, setup failures included.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
st_extra=("$@")

ST_VERSION=4.32.5
MAX_EXAMPLES=${CONTRACT_MAX_EXAMPLES:-100}
SEED=${CONTRACT_SEED:-20240607}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/teachd/target}
tools=${TEACHD_TOOLS_DIR:-$HOME/.cache/teachd/tools}
venv=$tools/schemathesis-$ST_VERSION-venv
bin=${TEACHD_BIN:-$CARGO_TARGET_DIR/debug/teachd}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}

passed=0 failed=0
summary_done=0
summary() {
  [[ $summary_done == 1 ]] && return
  summary_done=1
  echo "contract: $passed passed, $failed failed"
}
die() {
  echo "contract-test: $*" >&2
  failed=$((failed + 1))
  summary
  exit 1
}

tmp=$(mktemp -d)
chmod 700 "$tmp"
report_dir=${CONTRACT_REPORT_DIR:-$tmp/reports}
mkdir -p "$report_dir"
db=teachd_contract_$$
server_pid=
db_created=0
cleanup() {
  local rc=$?
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [[ $db_created == 1 ]]; then
    dropdb --if-exists --force "$db" 2>/dev/null || true
  fi
  if [[ -n ${CONTRACT_REPORT_DIR:-} && -f $tmp/server.log ]]; then
    cp "$tmp/server.log" "$report_dir/server.log" || true
  fi
  rm -rf "$tmp"
  if [[ $rc != 0 && $summary_done == 0 ]]; then
    failed=$((failed + 1))
    summary
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. schemathesis, pinned, in a cached venv ---------------------------------------------
st=$venv/bin/st
if [[ ! -f $venv/.installed-$ST_VERSION ]]; then
  echo "contract-test: installing schemathesis==$ST_VERSION into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv" >&2 || die "python3 -m venv failed (is python3-venv installed?)"
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "schemathesis==$ST_VERSION" >&2; then
    rm -rf "$venv"
    die "cannot install schemathesis==$ST_VERSION from PyPI (offline?) and it is not cached at $venv"
  fi
  touch "$venv/.installed-$ST_VERSION"
fi
"$st" --version >/dev/null 2>&1 || die "schemathesis does not run from $venv; remove that folder to reinstall"
echo "contract-test: $("$st" --version)" >&2

# --- 2. the server: fresh database, default model, free port -------------------------------
if [[ ! -x $bin && -z ${TEACHD_BIN:-} ]]; then
  echo "contract-test: $bin missing; building it" >&2
  cargo build --quiet --bin teachd >&2 || die "cargo build failed"
fi
[[ -x $bin ]] || die "no teachd binary at $bin"
model=$(scripts/fetch-model.sh) || die "cannot fetch the default model"
scripts/ensure-postgres.sh >&2 || die "PostgreSQL is not available"
# Databases of earlier runs that were killed (the name holds the script's pid).
for old in $(psql -qtA -d postgres -c "SELECT datname FROM pg_database WHERE datname ~ '^teachd_contract_[0-9]+$'"); do
  kill -0 "${old##*_}" 2>/dev/null || dropdb --if-exists --force "$old" || true
done
createdb "$db" || die "cannot create database $db"
db_created=1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
cfg=$tmp/teachd.toml
cat >"$cfg" <<EOF
[server]
bind = "127.0.0.1:$port"

[database]
url = "postgres://$PGUSER@$PGHOST:$PGPORT/$db"

[tlog]
key_file = "$tmp/ledger-signing.key"

[engine]
# Random generations stay short on the CPU model.
max_new_tokens = 32

[[models]]
id = "smollm2-135m-instruct"
source = { kind = "gguf", path = "$model" }
device = "cpu"
licence = { id = "apache-2.0", distillation = "allowed" }
max_top_k = 256
EOF

start=$SECONDS
RUST_LOG=${RUST_LOG:-warn} "$bin" --config "$cfg" serve >"$tmp/server.log" 2>&1 &
server_pid=$!
ready=0
for _ in $(seq 1 600); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    tail -30 "$tmp/server.log" >&2
    die "teachd exited before it was ready"
  fi
  if curl -fsS -o /dev/null "$base/readyz" 2>/dev/null; then ready=1 && break; fi
  sleep 0.5
done
[[ $ready == 1 ]] || { tail -30 "$tmp/server.log" >&2; die "teachd not ready after 300 s"; }
echo "contract-test: teachd ready on $base after $((SECONDS - start)) s" >&2

# --- 3. credentials -------------------------------------------------------------------------
admin_key=$("$bin" --config "$cfg" admin bootstrap 2>>"$tmp/server.log" | tail -1) ||
  die "admin bootstrap failed"
[[ $admin_key == tk_* ]] || die "admin bootstrap printed no key on the last line of stdout"
api() { # METHOD PATH KEY [BODY] -> body on stdout, fails on a non-2xx
  local args=(-sS --fail-with-body -X "$1" "$base$2" -H "Authorization: Bearer $3")
  [[ $# -ge 4 ]] && args+=(-H 'Content-Type: application/json' --data "$4")
  local out
  out=$(curl "${args[@]}") || { echo "contract-test: $1 $2: $out" >&2; return 1; }
  printf '%s\n' "$out"
}
client_id=$(api POST /admin/clients "$admin_key" \
  '{"name":"contract-test","limits":{"rpm":1000000,"tpm":1000000000,"max_concurrent":64,"daily_tokens":100000000000}}' |
  jq -er .id) || die "cannot create the test client"
teacher_key=$(api POST "/admin/clients/$client_id/keys" "$admin_key" '{"scopes":["teacher"]}' |
  jq -er .key) || die "cannot issue the teacher key"
# The ToS gate (when the server has one): teacher endpoints answer 403 `tos_not_accepted`
# until the client accepted the current version. GET /v1/tos is 404 both on a server without
# ToS and while none is published (a fresh database): then publish one if POST /admin/tos
# exists, and accept the current version for the test client.
tos_status=$(curl -sS -o "$tmp/tos.json" -w '%{http_code}' "$base/v1/tos" -H "Authorization: Bearer $teacher_key")
if [[ $tos_status == 404 ]]; then
  publish=$(curl -sS -o "$tmp/publish.json" -w '%{http_code}' -X POST "$base/admin/tos" \
    -H "Authorization: Bearer $admin_key" -H 'Content-Type: application/json' \
    --data '{"version":"contract-test","text":"Terms of Service for the contract test."}')
  case $publish in
    201) tos_status=$(curl -sS -o "$tmp/tos.json" -w '%{http_code}' "$base/v1/tos" \
      -H "Authorization: Bearer $teacher_key") ;;
    404 | 405) echo "contract-test: no ToS on this server" >&2 ;;
    *) die "POST /admin/tos answered $publish: $(cat "$tmp/publish.json")" ;;
  esac
fi
if [[ $tos_status == 200 ]]; then
  tos_version=$(jq -er .version "$tmp/tos.json") || die "GET /v1/tos answered 200 without a version"
  api POST /v1/tos/accept "$teacher_key" "$(jq -cn --arg v "$tos_version" \
    '{version:$v, purpose:"contract test", student_model:"none", commercial:false}')" >/dev/null ||
    die "cannot accept ToS version $tos_version"
  echo "contract-test: accepted ToS version $tos_version" >&2
elif [[ $tos_status != 404 ]]; then
  die "GET /v1/tos answered $tos_status"
fi

# --- 4. schemathesis -------------------------------------------------------------------------
# Checks: all that schemathesis offers, except
#   - positive_data_acceptance: it wants a 2xx for every schema-valid input, but many of our
#     rules are not expressible in JSON Schema and answer a documented 4xx: unknown model ids
#     (404), token ids outside the vocabulary, "exactly one of token_ids/prompt/messages",
#     score_from >= len, top_k over the model's max_top_k, sequences over the context (413),
#     judgment fields both at the top level and in `items`, unknown client ids (404).
# negative_data_rejection stays: our OpenAI-compatible endpoints ignore unknown fields, but
# their schemas do not close them (no additionalProperties: false), so extra fields are not
# "negative" data there.
EXCLUDED_CHECKS=positive_data_acceptance
# Keys go through the environment into the config file, so they appear in no argv.
export CONTRACT_TEACHER_KEY=$teacher_key CONTRACT_ADMIN_KEY=$admin_key
stcfg=$tmp/schemathesis.toml
cat >"$stcfg" <<EOF
headers = { Authorization = "Bearer \${CONTRACT_KEY}" }
# Points most generated requests at the served model (see the file).
hooks = "$repo/scripts/contract-hooks.py"

[generation]
# Reproducible across runs: no example database carried between runs.
database = "none"

[output.sanitization]
# Only the key header is secret (and only for this throwaway database); the default markers
# ("token", "key") would hide max_tokens, token_ids, prompt_tokens... in failure reports.
keys-to-sanitize = ["authorization"]
sensitive-markers = ["authorization"]
EOF

st_pass() { # NAME KEYVAR FILTER... : one schemathesis run; records per-operation results
  local name=$1 keyvar=$2
  shift 2
  local junit=$report_dir/junit-$name.xml
  echo "contract-test: pass '$name'" >&2
  local rc=0
  # From the temp dir: schemathesis leaves a cache (.schemathesis/) in its working directory.
  # --generation-deterministic is Hypothesis' derandomize (the same cases every run; the
  # coverage phase is deterministic anyway); --seed fixes whatever randomness remains.
  # One worker: the CPU teacher serializes generations anyway.
  (cd "$tmp" && CONTRACT_KEY=${!keyvar} exec timeout --kill-after=10 480 "$st" --config-file "$stcfg" run "$repo/openapi/openapi.json" \
    --url "$base" \
    --checks all --exclude-checks "$EXCLUDED_CHECKS" \
    --max-examples "$MAX_EXAMPLES" --seed "$SEED" --generation-deterministic \
    --workers 1 --request-timeout 120 --no-color \
    --report junit --report-dir "$report_dir" --report-junit-path "$junit" \
    "$@" "${st_extra[@]}") || rc=$?
  if [[ ! -f $junit ]]; then
    echo "contract-test: pass '$name' produced no report (exit $rc)" >&2
    failed=$((failed + 1))
    return
  fi
  local counts
  counts=$(python3 - "$junit" <<'PY'
import sys, xml.etree.ElementTree as ET
ok = bad = 0
for tc in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    if tc.find("failure") is not None or tc.find("error") is not None:
        bad += 1
    elif tc.find("skipped") is None:
        ok += 1
print(ok, bad)
PY
  )
  passed=$((passed + ${counts% *}))
  failed=$((failed + ${counts#* }))
  if [[ $rc != 0 && ${counts#* } == 0 ]]; then
    echo "contract-test: pass '$name' exited $rc" >&2
    failed=$((failed + 1))
  fi
}

t0=$SECONDS
# Teacher operations first, then admin ones: the admin pass may patch, suspend or publish
# things (a new ToS, a suspended client) that would change what the teacher key may do.
st_pass teacher CONTRACT_TEACHER_KEY --exclude-path-regex '^/admin/'
st_pass admin CONTRACT_ADMIN_KEY --include-path-regex '^/admin/'
echo "contract-test: schemathesis took $((SECONDS - t0)) s" >&2

# --- 5. the server must have survived without a panic ---------------------------------------
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "contract-test: teachd died during the run" >&2
  failed=$((failed + 1))
fi
if grep -q 'panicked' "$tmp/server.log"; then
  grep -m5 -A3 'panicked' "$tmp/server.log" >&2
  echo "contract-test: teachd panicked during the run" >&2
  failed=$((failed + 1))
fi
if [[ $failed != 0 ]]; then
  echo "contract-test: server log (last 40 lines):" >&2
  tail -40 "$tmp/server.log" >&2
fi
summary
[[ $failed == 0 ]]
