#!/usr/bin/env bash
# The whole check, as CI runs it: native build, Rust fmt/clippy/tests, TypeScript types, all TS tests.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "native addon"
scripts/build-native.sh
step "cargo fmt --check"
(cd native && cargo fmt --all -- --check)
step "cargo clippy -D warnings"
(cd native && cargo clippy --all-targets -- -D warnings)
step "cargo test"
(cd native && cargo test)
step "tsc --noEmit"
npx tsc --noEmit -p .
step "build TypeScript"
rm -rf dist && npx tsc -p .
step "node tests"
node --test --test-timeout=600000 dist/test/*.test.js
