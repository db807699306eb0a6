#!/usr/bin/env bash
# Print the path of a `helm` binary on stdout (nothing else goes to stdout).
# Uses the `helm` on PATH when there is one; otherwise builds Helm from the Go
# module proxy into the derpmesh cache dir once and reuses it afterwards.
#
#   HELM=$(scripts/helm.sh) && "$HELM" lint deploy/helm/derpmesh --set accessURL=https://derp.example.com
#
# Environment:
#   DERPMESH_CACHE       cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh)
#   DERPMESH_GO_TIMEOUT  seconds allowed for the Helm build (default: 1800)
#   DERPMESH_HELM        use this helm binary instead (skips PATH lookup and build)
set -euo pipefail

HELM_VERSION=v3.22.0
GO_MIN=1.26.0 # go line of helm.sh/helm/v3@$HELM_VERSION's go.mod

die() { echo "helm.sh: error: $*" >&2; exit 1; }

if [[ -n "${DERPMESH_HELM:-}" ]]; then
  [[ -x "$DERPMESH_HELM" ]] || die "DERPMESH_HELM=$DERPMESH_HELM is not an executable file"
  echo "$DERPMESH_HELM"
  exit 0
fi

if onpath="$(command -v helm 2>/dev/null)" && [[ -n "$onpath" ]]; then
  echo "$onpath"
  exit 0
fi

CACHE="${DERPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh}"
BIN_DIR="$CACHE/bin"
BIN="$BIN_DIR/helm"
# The cached binary is reused only if it was built from $HELM_VERSION (a bump
# of HELM_VERSION above rebuilds it).
STAMP="$BIN_DIR/.helm.version"

up_to_date() {
  [[ -x "$BIN" ]] && [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$HELM_VERSION" ]]
}

if up_to_date; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null 2>&1 ||
  die "'helm' is not on PATH and the Go toolchain (go >= $GO_MIN), needed to build Helm $HELM_VERSION, is not either; install Helm (https://helm.sh/docs/intro/install/) or Go (https://go.dev/dl/) and re-run"

mkdir -p "$BIN_DIR"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.helm.lock"
  flock 9
  if up_to_date; then
    echo "$BIN"
    exit 0
  fi
fi

WRAP=()
if command -v timeout >/dev/null 2>&1; then
  WRAP+=(timeout "${DERPMESH_GO_TIMEOUT:-1800}")
fi
# A build of Helm compiles much of Kubernetes' client libraries: be gentle with
# a shared machine.
if command -v nice >/dev/null 2>&1; then
  WRAP+=(nice -n 10)
fi

echo "helm.sh: 'helm' is not on PATH; building Helm $HELM_VERSION with $(go version 2>/dev/null || echo go)" >&2
echo "helm.sh: a cold build downloads the Kubernetes client modules and compiles them: several minutes" >&2
start=$SECONDS
tmp="$(mktemp -d "$BIN_DIR/.helm-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# `go install pkg@version` builds with Helm's own go.mod/go.sum (checked against
# the checksum database), independent of any module in the current directory.
# The -X sets what `helm version` reports, as Helm's release builds do.
if ! (cd "$tmp" && GOTOOLCHAIN=local GOBIN="$tmp" "${WRAP[@]}" \
  go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2); then
  die "building Helm $HELM_VERSION failed (go version: $(go version 2>/dev/null || echo unknown)).
  It needs go >= $GO_MIN (GOTOOLCHAIN=local is used: with an older go, upgrade Go or install helm on PATH),
  and the module proxy (GOPROXY=$(go env GOPROXY 2>/dev/null)) must serve helm.sh/helm/v3@$HELM_VERSION and its dependencies.
  If it timed out, raise DERPMESH_GO_TIMEOUT (seconds)."
fi
mv -f "$tmp/helm" "$BIN"
echo "$HELM_VERSION" >"$STAMP"
echo "helm.sh: built $BIN in $((SECONDS - start))s" >&2
echo "$BIN"
