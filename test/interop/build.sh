#!/usr/bin/env bash
# Build the derpinterop checker (test/interop/go) into the derpmesh cache dir
# and print the path of the binary on stdout (nothing else goes to stdout).
# Idempotent: rebuilds only when a file under test/interop/go is newer than
# the binary.
#
#   DERPINTEROP=$(test/interop/build.sh) && "$DERPINTEROP" -url http://127.0.0.1:3340/derp -mesh-key "$KEY"
#
# Built with -tags ts_debug_websockets so that `derpinterop -websocket` works
# (derphttp only compiles its WebSocket dialer in with that tag).
#
# Environment:
#   DERPMESH_CACHE       cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh)
#   DERPMESH_GO_TIMEOUT  seconds allowed for `go build` (default: 1200)
set -euo pipefail

GO_MIN=1.26.6 # go line of go.mod (inherited from tailscale.com@v1.102.5)

die() { echo "build.sh: error: $*" >&2; exit 1; }

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/go" && pwd)"
CACHE="${DERPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh}"
BIN_DIR="$CACHE/bin"
BIN="$BIN_DIR/derpinterop"

up_to_date() {
  [[ -x "$BIN" ]] && [[ -z "$(find "$SRC" -type f -newer "$BIN" -print -quit)" ]]
}

if up_to_date; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null 2>&1 ||
  die "the Go toolchain (go >= $GO_MIN) is required to build derpinterop but 'go' is not on PATH; install Go from https://go.dev/dl/ (or your package manager) and re-run"

mkdir -p "$BIN_DIR"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.derpinterop.lock"
  flock 9
  if up_to_date; then
    echo "$BIN"
    exit 0
  fi
fi

TIMEOUT_CMD=()
if command -v timeout >/dev/null 2>&1; then
  TIMEOUT_CMD=(timeout "${DERPMESH_GO_TIMEOUT:-1200}")
fi

echo "build.sh: building derpinterop from $SRC (a cold cache downloads tailscale.com modules: up to ~1.5 min)" >&2
start=$SECONDS
tmp="$BIN.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# -mod=readonly: use the committed go.mod/go.sum as-is, never rewrite them.
if ! (cd "$SRC" && "${TIMEOUT_CMD[@]}" go build -mod=readonly -tags ts_debug_websockets -o "$tmp" . >&2); then
  die "go build of derpinterop failed (go version: $(go version 2>/dev/null || echo unknown)).
  It needs go >= $GO_MIN: with GOTOOLCHAIN=local and an older go, upgrade Go or set GOTOOLCHAIN=auto.
  It also needs the module proxy (GOPROXY=$(go env GOPROXY 2>/dev/null)) to serve the modules in go.sum."
fi
mv -f "$tmp" "$BIN"
echo "build.sh: built in $((SECONDS - start))s" >&2
echo "$BIN"
