#!/usr/bin/env bash
# Records real traffic through a recording proxy and rebuilds the seed corpus from it:
#
#   - Tailscale's own client (test/interop's derpinterop: tailscale.com/derp/derphttp, over the
#     DERP upgrade and over WebSocket, and tailscale.com/net/stun) against an in-process derpmesh
#     relay with the fuzz targets' fixed key and mesh key, so its ClientInfo opens in the targets;
#   - the same client against Tailscale's derper (its 101, frames, STUN answers);
#   - the project's own Rust client (plain and fast start) against both.
#
#   native/relay/fuzz/capture/record.sh            # writes native/relay/fuzz/corpus/
#
# Needs Go (derpinterop, derper: test/interop/build.sh and bench/derper.sh build them into the
# cache dir). The recordings stay in native/relay/fuzz/captures/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ="$PWD"
ROOT="$(cd ../../.. && pwd)"
CAP="$FUZZ/captures"
say() { echo "record: $*" >&2; }

DERPINTEROP=$("$ROOT/test/interop/build.sh")
DERPER=$("$ROOT/bench/derper.sh")
cargo build --quiet --release --no-default-features --example capture
CAPTURE="$FUZZ/target/release/examples/capture"
MESH_KEY=$(sed -n 's/^pub const MESH_KEY: &str = "\([0-9a-f]*\)";/\1/p' src/common.rs)
[[ ${#MESH_KEY} == 64 ]] || { echo "record: no MESH_KEY in src/common.rs" >&2; exit 1; }

rm -rf "$CAP"
mkdir -p "$CAP"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start_proxy DIR [upstream args...]: starts a recording proxy, sets TCP_PORT and UDP_PORT.
start_proxy() {
  local dir=$1
  shift
  "$CAPTURE" proxy --out "$CAP/$dir" --secs 300 "$@" >"$CAP/$dir.ports" &
  PIDS+=($!)
  for _ in $(seq 100); do
    [[ $(wc -l <"$CAP/$dir.ports") -ge 2 ]] && break
    sleep 0.1
  done
  TCP_PORT=$(awk '$1 == "tcp" {print $2}' "$CAP/$dir.ports")
  UDP_PORT=$(awk '$1 == "udp" {print $2}' "$CAP/$dir.ports")
  [[ -n $TCP_PORT && -n $UDP_PORT ]] || { echo "record: proxy for $dir did not start" >&2; exit 1; }
}

run_clients() {
  local url="http://127.0.0.1:$TCP_PORT/derp"
  # Check results do not matter here (the proxy changes the addresses some checks compare).
  "$DERPINTEROP" -url "$url" -mesh-key "$MESH_KEY" -timeout 3s -overall-timeout 40s >/dev/null 2>&1 || true
  "$DERPINTEROP" -url "$url" -mesh-key "$MESH_KEY" -websocket -timeout 3s -overall-timeout 40s >/dev/null 2>&1 || true
  "$DERPINTEROP" -stun "127.0.0.1:$UDP_PORT" -timeout 3s -overall-timeout 20s >/dev/null 2>&1 || true
  "$CAPTURE" client --url "$url" 2>/dev/null || true
  "$CAPTURE" client --url "$url" --fast-start 2>/dev/null || true
}

say "Tailscale's client and ours against derpmesh (fixed key)"
start_proxy derpmesh
run_clients

say "Tailscale's client and ours against derper"
DERPER_PORT=$((20000 + RANDOM % 20000))
STUN_PORT=$((DERPER_PORT + 1))
echo "$MESH_KEY" >"$CAP/mesh.key"
"$DERPER" -a "127.0.0.1:$DERPER_PORT" -stun -stun-port "$STUN_PORT" -http-port=-1 \
  -c "$CAP/derper.json" -mesh-psk-file "$CAP/mesh.key" >"$CAP/derper.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$DERPER_PORT") 2>/dev/null && break
  sleep 0.1
done
start_proxy derper --tcp-upstream "127.0.0.1:$DERPER_PORT" --udp-upstream "127.0.0.1:$STUN_PORT"
run_clients
sleep 1
cleanup

say "seeds -> corpus/"
rm -rf "$FUZZ/corpus"
"$CAPTURE" corpus --from "$CAP/derpmesh" --from "$CAP/derper" --to "$FUZZ/corpus"
for d in "$FUZZ"/corpus/*/; do
  say "$(basename "$d"): $(ls "$d" | wc -l) seeds, $(du -sk "$d" | cut -f1) KiB"
done
say "total $(du -sk "$FUZZ/corpus" | cut -f1) KiB"
