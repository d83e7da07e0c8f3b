#!/usr/bin/env bash
# Fails when a dev-dependency changes the features of a crate that the server build also uses.
# Cargo unifies dev-dependency features into every crate they share with the normal build when
# tests are built, so `cargo build --bin teachd` and `cargo test` would each compile their own
# copy of the engine (mistralrs-core and everything under it, ~20 min on 2 cores). Align such a
# crate's features in Cargo.toml's [dependencies] (see the comment there) when this fails.
set -euo pipefail
cd "$(dirname "$0")/.."
tree() { cargo tree -e "$1" -f '{p} {f}' --prefix none | sed 's/ (\*)$//' | sort -u; }
# One line per crate (name + version): every feature set it is built with (host and target
# builds may differ), joined.
group() { awk '{k=$1" "$2; $1=$2=""; sub(/^ +/, ""); f[k]=f[k] "[" $0 "]"} END {for (k in f) print k "\t" f[k]}' | sort; }
normal=$(tree normal,build | group)
all=$(tree normal,build,dev | group)
# Crates present in both builds whose feature sets differ.
drift=$(join -t $'\t' <(echo "$normal") <(echo "$all") |
  awk -F'\t' '$2 != $3 {print "  " $1 ": server " $2 " vs tests " $3}')
if [[ -n $drift ]]; then
  echo "check-features: dev-dependencies change the features of crates the server uses:" >&2
  echo "$drift" >&2
  exit 1
fi
echo "check-features: the server and the tests share one build of every dependency"
