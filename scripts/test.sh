#!/usr/bin/env bash
# The whole check, as CI runs it: build (native addon + TypeScript, type-checked), prettier, Rust
# fmt/clippy/tests, all TS tests.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "build: native addon (release) and TypeScript"
rm -rf dist && npm run build
step "prettier --check (TypeScript; npm run format fixes it)"
npm run --silent format:check
step "cargo fmt --check"
(cd native && cargo fmt --all -- --check)
step "cargo clippy -D warnings"
(cd native && cargo clippy --all-targets -- -D warnings)
step "cargo test"
(cd native && cargo test)
step "node tests"
node --test --test-timeout=600000 dist/test/*.test.js
