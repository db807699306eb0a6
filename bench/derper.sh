#!/usr/bin/env bash
# Install Tailscale's reference DERP server (derper), or its prober (derpprobe),
# into a cache dir, if it is not there yet, and print the path of the binary on
# stdout (nothing else goes to stdout). Idempotent: a second run only checks the
# cached binary.
#
#   DERPER=$(bench/derper.sh) && "$DERPER" -h
#   DERPPROBE=$(bench/derper.sh derpprobe) && "$DERPPROBE" -h
#
# Environment:
#   DERPMESH_CACHE       cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh)
#   DERPMESH_GO_TIMEOUT  seconds allowed for `go install` (default: 1200)
#   GOTOOLCHAIN, GOPROXY, GOFLAGS, ...  passed through to go unchanged
#
# Version pinned in test/interop/README.md (why v1.102.5: newest tailscale.com
# release whose go.mod accepts Go 1.26 and whose derper dependencies are all
# served by the module proxy; v1.104.x needs go >= 1.27 and its setec dep 403s).
set -euo pipefail

TS_MODULE=tailscale.com
TS_VERSION=v1.102.5
GO_MIN=1.26.6 # the `go` line of tailscale.com@v1.102.5's go.mod

die() { echo "derper.sh: error: $*" >&2; exit 1; }

TOOL="${1:-derper}"
[[ "$TOOL" == derper || "$TOOL" == derpprobe ]] || die "builds derper or derpprobe, not '$TOOL'"

CACHE="${DERPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh}"
BIN_DIR="$CACHE/bin"
BIN="$BIN_DIR/$TOOL"

installed_version() {
  # Prints the tailscale.com module version embedded in $BIN (empty if unknown).
  go version -m "$BIN" 2>/dev/null | awk '$1 == "mod" && $2 == "'"$TS_MODULE"'" { print $3 }'
}

if ! command -v go >/dev/null 2>&1; then
  if [[ -x "$BIN" ]]; then
    echo "derper.sh: warning: go not found; using cached $BIN without checking its version" >&2
    echo "$BIN"
    exit 0
  fi
  die "the Go toolchain (go >= $GO_MIN) is required to build $TOOL ($TS_MODULE/cmd/$TOOL@$TS_VERSION) but 'go' is not on PATH; install Go from https://go.dev/dl/ (or your package manager) and re-run"
fi

if [[ -x "$BIN" && "$(installed_version)" == "$TS_VERSION" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN_DIR"

# Serialise concurrent installs (parallel test runs) when flock is available.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.$TOOL.lock"
  flock 9
  if [[ -x "$BIN" && "$(installed_version)" == "$TS_VERSION" ]]; then
    echo "$BIN"
    exit 0
  fi
fi

TIMEOUT_CMD=()
if command -v timeout >/dev/null 2>&1; then
  TIMEOUT_CMD=(timeout "${DERPMESH_GO_TIMEOUT:-1200}")
fi

echo "derper.sh: installing $TS_MODULE/cmd/$TOOL@$TS_VERSION into $BIN_DIR (a cold cache downloads modules and builds: up to ~3 min)" >&2
start=$SECONDS
# `go install pkg@version` ignores any go.mod in the current directory; run it
# from the cache dir anyway so a surrounding module cannot interfere.
if ! (cd "$CACHE" && GOBIN="$BIN_DIR" "${TIMEOUT_CMD[@]}" go install "$TS_MODULE/cmd/$TOOL@$TS_VERSION" >&2); then
  die "go install $TS_MODULE/cmd/$TOOL@$TS_VERSION failed (go version: $(go version 2>/dev/null || echo unknown)).
  It needs go >= $GO_MIN: with GOTOOLCHAIN=local and an older go, upgrade Go or set GOTOOLCHAIN=auto.
  It also needs the module proxy (GOPROXY=$(go env GOPROXY 2>/dev/null)) to serve its dependencies."
fi
[[ -x "$BIN" ]] || die "go install succeeded but $BIN is missing"
got="$(installed_version)"
[[ "$got" == "$TS_VERSION" ]] || die "installed $BIN reports $TS_MODULE version '$got', expected $TS_VERSION"
echo "derper.sh: built in $((SECONDS - start))s" >&2
echo "$BIN"
