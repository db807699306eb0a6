#!/usr/bin/env bash
# Installs packed derpmesh tarballs (from `npm run pack`) into an application directory, the way a
# user gets derpmesh from the registry: the prebuilt binary, no Rust toolchain, and no install
# scripts (--ignore-scripts: derpmesh needs none, and npm 11+ gates them for dependencies).
# The container image (deploy/Dockerfile) and the install test (test/install.test.ts) both use it.
#
#   scripts/install-packed.sh DIR TARBALL...
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 DIR TARBALL..." >&2
  exit 2
fi
dir=$1
shift
tarballs=()
for t in "$@"; do tarballs+=("$(cd "$(dirname "$t")" && pwd)/$(basename "$t")"); done
mkdir -p "$dir"
cd "$dir"
[[ -f package.json ]] || printf '{ "name": "derpmesh-app", "version": "1.0.0", "private": true, "type": "module" }\n' >package.json
npm install --omit=dev --no-audit --no-fund --ignore-scripts "${tarballs[@]}"
