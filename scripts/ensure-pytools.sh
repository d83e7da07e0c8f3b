#!/usr/bin/env bash
# The Python client libraries of tests/py (the openai SDK, pyarrow), pinned in
# tests/py/requirements.txt, in a cached venv. Prints the venv's python.
#
#   env: TEACHD_TOOLS_DIR (default ~/.cache/teachd/tools) where the venv lives
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${TEACHD_TOOLS_DIR:-$HOME/.cache/teachd/tools}
req=tests/py/requirements.txt
stamp=$(sha256sum "$req" | cut -c1-16)
venv=$tools/py-clients-venv
if [[ ! -f $venv/.installed-$stamp ]]; then
  echo "ensure-pytools: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv" >&2
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2; then
    rm -rf "$venv"
    echo "ensure-pytools: cannot install $req from PyPI (offline?)" >&2
    exit 1
  fi
  touch "$venv/.installed-$stamp"
fi
echo "$venv/bin/python"
