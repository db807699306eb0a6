#!/usr/bin/env bash
# Builds the napi addon (release) when it is missing or older than any Rust source.
set -euo pipefail
cd "$(dirname "$0")/.."
node_file=$(ls native/derpmesh.*.node 2>/dev/null | head -n 1 || true)
if [[ -n "$node_file" && -f native/binding.cjs ]] &&
  [[ -z "$(find native/relay native/node native/Cargo.toml native/Cargo.lock -newer "$node_file" \( -name '*.rs' -o -name 'Cargo.*' \) -print -quit)" ]]; then
  echo "native addon is up to date: $node_file"
  exit 0
fi
command -v cargo >/dev/null 2>&1 || {
  echo "build-native: cargo is not on PATH; install Rust (https://rustup.rs) to build the addon from source" >&2
  exit 1
}
npx napi build --platform --release --manifest-path native/node/Cargo.toml --output-dir native --js binding.cjs --dts binding.d.cts
