#!/usr/bin/env bash
# Build Headscale (for the client admission test against its own /verify endpoint) into the cache
# dir, if it is not there yet, and print the path of the binary on stdout (nothing else goes to
# stdout). Idempotent: a second run only checks that the cached binary exists.
#
#   HEADSCALE=$(bench/headscale.sh) && "$HEADSCALE" version
#
# Environment:
#   DERPMESH_CACHE       cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh)
#   DERPMESH_GO_TIMEOUT  seconds allowed for the build (default: 1800)
#
# A cold build downloads ~300 modules and compiles for ~10 min on 2 cores. `go install
# pkg@version` does not work for this module here: it looks up the module's version list for
# deprecation notices, which the module proxy refuses (403); a throwaway module that requires the
# pinned version builds the same command without that lookup (Headscale's go.mod has no replace
# directives, so nothing is lost).
set -euo pipefail

HS_MODULE=github.com/juanfont/headscale
HS_VERSION=v0.26.1 # /verify answers tailcfg.DERPAdmitClientResponse since v0.23.0

die() { echo "headscale.sh: error: $*" >&2; exit 1; }

CACHE="${DERPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh}"
BIN_DIR="$CACHE/bin"
BIN="$BIN_DIR/headscale-$HS_VERSION"

if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null 2>&1 || die "the Go toolchain is required to build $HS_MODULE@$HS_VERSION but 'go' is not on PATH"
mkdir -p "$BIN_DIR"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.headscale.lock"
  flock 9
  if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
  fi
fi

TIMEOUT_CMD=()
if command -v timeout >/dev/null 2>&1; then
  TIMEOUT_CMD=(timeout "${DERPMESH_GO_TIMEOUT:-1800}")
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "headscale.sh: building $HS_MODULE/cmd/headscale@$HS_VERSION into $BIN_DIR (cold: ~10 min)" >&2
start=$SECONDS
(
  cd "$work"
  go mod init derpmesh-headscale-build >&2 2>/dev/null
  export GOFLAGS=-mod=mod
  "${TIMEOUT_CMD[@]}" go get "$HS_MODULE@$HS_VERSION" >&2
  "${TIMEOUT_CMD[@]}" go build -o "$BIN.tmp" "$HS_MODULE/cmd/headscale" >&2
) || die "building $HS_MODULE@$HS_VERSION failed (go version: $(go version 2>/dev/null || echo unknown))"
mv "$BIN.tmp" "$BIN"
echo "headscale.sh: built in $((SECONDS - start))s" >&2
echo "$BIN"
