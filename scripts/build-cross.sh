#!/usr/bin/env bash
# Cross-builds the napi addon for the declared non-host targets (package.json `napi.targets`)
# and writes native/derpmesh.<platform>.node for each, ready for `node scripts/pack.mjs`.
#
#   scripts/build-cross.sh                      every declared non-host target this machine can build
#   scripts/build-cross.sh aarch64-apple-darwin linux-arm64-musl    only these (triple or platform name)
#   scripts/build-cross.sh --list               the declared targets and how each would be built
#   scripts/build-cross.sh --check [TARGET...]  only verify the native/derpmesh.<platform>.node present
#
# Linux (gnu, musl) and macOS targets build with `napi build --cross-compile`, i.e. `cargo zigbuild`
# with zig as the C compiler and linker (ring compiles C and assembly, so a real cross C toolchain
# is needed). Pinned zig and cargo-zigbuild are installed once into the cache dir. The host target
# is never built here (scripts/build-native.sh owns it), and neither binding.cjs nor binding.d.cts
# is touched: napi writes into a scratch dir and only the .node file is copied to native/.
#
# A target that cannot be built on this machine is skipped with a one-line reason on stderr. The
# exit status is non-zero only when a target that was attempted failed to build or to verify
# (or on a usage/prerequisite error). The paths written go to stdout, one per line; the logs,
# skips and the summary go to stderr.
#
# Environment:
#   DERPMESH_CACHE        cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh); tools go in cross/
#   DERPMESH_GLIBC        oldest glibc the linux-*-gnu binaries must run on (default: 2.17)
#   DERPMESH_CROSS_JOBS   cargo jobs (default: 2; the build also runs under `nice -n 10`)
#   DERPMESH_CROSS_TARGET_DIR  cargo target dir (default: native/target/cross, apart from the host
#                         build's so the two never wait on each other's cargo lock)
#   MACOSX_DEPLOYMENT_TARGET   minimum macOS (default: 10.15 for darwin-x64, 11.0 for darwin-arm64,
#                         Node 20's own minimums)
set -euo pipefail

ZIG_VERSION=0.16.0            # PyPI `ziglang`; the zig cargo-zigbuild 0.24.1's own image ships
CARGO_ZIGBUILD_VERSION=0.24.1 # crates.io
GLIBC="${DERPMESH_GLIBC:-2.17}"
JOBS="${DERPMESH_CROSS_JOBS:-2}"

cd "$(dirname "$0")/.."
ROOT="$PWD"

say() { echo "build-cross: $*" >&2; }
die() { echo "build-cross: error: $*" >&2; exit 1; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" >&2; exit "${1:-2}"; }

LIST_ONLY=0
CHECK_ONLY=0
REQUESTED=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage 0 ;;
    --list) LIST_ONLY=1 ;;
    --check) CHECK_ONLY=1 ;;
    -*) echo "build-cross: unknown option $arg" >&2; usage 2 ;;
    *) REQUESTED+=("$arg") ;;
  esac
done

[[ "$GLIBC" =~ ^2\.[0-9]+$ ]] || die "DERPMESH_GLIBC=$GLIBC is not a glibc version like 2.17"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "DERPMESH_CROSS_JOBS=$JOBS is not a positive integer"

# ---- prerequisites that every target needs --------------------------------------------------
command -v node >/dev/null 2>&1 || die "node is not on PATH (Node >= 20 is needed to run the napi CLI)"
command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH; install Rust with rustup (https://rustup.rs)"
command -v rustup >/dev/null 2>&1 || die "rustup is not on PATH; cross targets are added with \`rustup target add\`, install Rust with rustup (https://rustup.rs)"
NAPI="$ROOT/node_modules/.bin/napi"
[[ -x "$NAPI" ]] || die "node_modules/.bin/napi is missing; run \`npm ci\` first (it installs @napi-rs/cli)"

HOST_TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
[[ -n "$HOST_TRIPLE" ]] || die "could not read the host triple from \`rustc -vV\`"

# platform name (the npm/<platform> dir and native/derpmesh.<platform>.node) of a Rust triple
platform_of() {
  case "$1" in
    x86_64-unknown-linux-gnu) echo linux-x64-gnu ;;
    aarch64-unknown-linux-gnu) echo linux-arm64-gnu ;;
    x86_64-unknown-linux-musl) echo linux-x64-musl ;;
    aarch64-unknown-linux-musl) echo linux-arm64-musl ;;
    x86_64-apple-darwin) echo darwin-x64 ;;
    aarch64-apple-darwin) echo darwin-arm64 ;;
    x86_64-pc-windows-msvc) echo win32-x64-msvc ;;
    *) return 1 ;;
  esac
}

mapfile -t DECLARED < <(node -e 'for (const t of require("./package.json").napi.targets) console.log(t)')
[[ ${#DECLARED[@]} -gt 0 ]] || die "package.json declares no napi.targets"
for t in "${DECLARED[@]}"; do
  platform_of "$t" >/dev/null || die "package.json declares $t, which this script does not know; add it to platform_of()"
done

# Which targets: the requested ones (by triple or platform name), else every declared one.
TARGETS=()
if [[ ${#REQUESTED[@]} -eq 0 ]]; then
  TARGETS=("${DECLARED[@]}")
else
  for want in "${REQUESTED[@]}"; do
    found=""
    for t in "${DECLARED[@]}"; do
      if [[ "$want" == "$t" || "$want" == "$(platform_of "$t")" ]]; then found="$t"; fi
    done
    [[ -n "$found" ]] || die "$want is not a declared target; declared: ${DECLARED[*]}"
    TARGETS+=("$found")
  done
fi

# How a target is built here: "zig" (napi --cross-compile) or "skip:<reason>".
plan_of() {
  local t="$1"
  if [[ "$t" == "$HOST_TRIPLE" ]]; then
    echo "skip:host target; built by scripts/build-native.sh (npm run build:native), never by this script"
    return
  fi
  case "$t" in
    *-unknown-linux-gnu | *-unknown-linux-musl | *-apple-darwin) echo zig ;;
    *-pc-windows-msvc)
      # cargo-xwin (what napi -x uses for MSVC) downloads the MSVC CRT and Windows SDK at build
      # time: from Microsoft (aka.ms, download.visualstudio.microsoft.com) with its default
      # clang-cl backend, or a sysroot from GitHub releases with its clang backend.
      if ! { command -v curl >/dev/null 2>&1 && curl -fsS -o /dev/null -m 10 https://aka.ms/vs/17/release/channel 2>/dev/null; }; then
        echo "skip:needs the MSVC CRT + Windows SDK, which cargo-xwin downloads from Microsoft (aka.ms) or GitHub at build time, and neither is reachable from this machine; build it on Windows with npm run build:native"
      else
        echo "skip:MSVC cross builds (cargo-xwin) are not set up by this script; build it on Windows with npm run build:native"
      fi
      ;;
    *) echo "skip:no cross-build recipe for $t" ;;
  esac
}

declare -A PLAN
for t in "${TARGETS[@]}"; do
  [[ -n "${PLAN[$t]:-}" ]] || PLAN[$t]="$(plan_of "$t")"
done

if [[ $LIST_ONLY -eq 1 ]]; then
  for t in "${TARGETS[@]}"; do
    plan="${PLAN[$t]}"
    case "$plan" in
      zig)
        how="napi build --cross-compile (cargo-zigbuild $CARGO_ZIGBUILD_VERSION, zig $ZIG_VERSION)"
        if [[ "$t" == *-linux-gnu ]]; then how+=", glibc >= $GLIBC"; fi
        ;;
      *) how="skipped: ${plan#skip:}" ;;
    esac
    printf '%-28s %-18s %s\n' "$t" "$(platform_of "$t")" "$how"
  done
  exit 0
fi

# ---- pinned tools, installed once into the cache dir ----------------------------------------
CACHE="${DERPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh}"
TOOLS="$CACHE/cross"
ZIG_DIR="$TOOLS/zig-$ZIG_VERSION"
ZIG="$ZIG_DIR/ziglang/zig"
ZIGBUILD_ROOT="$TOOLS/cargo-zigbuild-$CARGO_ZIGBUILD_VERSION"
ZIGBUILD="$ZIGBUILD_ROOT/bin/cargo-zigbuild"

NICE=()
command -v nice >/dev/null 2>&1 && NICE=(nice -n 10)

zig_ok() { [[ -x "$ZIG" ]] && [[ "$("$ZIG" version 2>/dev/null)" == "$ZIG_VERSION" ]]; }
zigbuild_ok() { [[ -x "$ZIGBUILD" ]] && "$ZIGBUILD" --version 2>/dev/null | grep -qx "cargo-zigbuild $CARGO_ZIGBUILD_VERSION"; }

install_tools() {
  mkdir -p "$TOOLS"
  if command -v flock >/dev/null 2>&1; then
    exec 8>"$TOOLS/.install.lock"
    flock 8
  fi
  if ! zig_ok; then
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 ||
      die "zig $ZIG_VERSION is not installed in $ZIG_DIR and $py (used to get it from PyPI's ziglang package) is not on PATH; install Python 3 with pip"
    "$py" -m pip --version >/dev/null 2>&1 ||
      die "zig $ZIG_VERSION is not installed in $ZIG_DIR and \`$py -m pip\` does not work; install pip (Debian: apt-get install python3-pip)"
    say "installing zig $ZIG_VERSION (PyPI ziglang) into $ZIG_DIR"
    local tmp
    tmp="$(mktemp -d "$TOOLS/.zig-install.XXXXXX")"
    if ! PIP_ROOT_USER_ACTION=ignore "${NICE[@]}" "$py" -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$tmp" "ziglang==$ZIG_VERSION" >&2; then
      rm -rf "$tmp"
      die "pip could not install ziglang==$ZIG_VERSION (is PyPI reachable?)"
    fi
    rm -rf "$ZIG_DIR"
    mv "$tmp" "$ZIG_DIR"
    zig_ok || die "$ZIG does not report version $ZIG_VERSION after installing"
  fi
  if ! zigbuild_ok; then
    say "installing cargo-zigbuild $CARGO_ZIGBUILD_VERSION (cargo install --locked) into $ZIGBUILD_ROOT; a few minutes"
    local tmp
    tmp="$(mktemp -d "$TOOLS/.zigbuild-install.XXXXXX")"
    if ! CARGO_TARGET_DIR="$tmp/target" "${NICE[@]}" cargo install --quiet --locked -j "$JOBS" \
      --root "$tmp/root" cargo-zigbuild --version "=$CARGO_ZIGBUILD_VERSION" >&2; then
      rm -rf "$tmp"
      die "cargo install cargo-zigbuild@$CARGO_ZIGBUILD_VERSION failed (is crates.io reachable?)"
    fi
    rm -rf "$ZIGBUILD_ROOT"
    mv "$tmp/root" "$ZIGBUILD_ROOT"
    rm -rf "$tmp"
    zigbuild_ok || die "$ZIGBUILD does not report version $CARGO_ZIGBUILD_VERSION after installing"
  fi
  if command -v flock >/dev/null 2>&1; then
    flock -u 8
    exec 8>&-
  fi
}

need_zig=0
[[ $CHECK_ONLY -eq 1 ]] && TARGETS_TO_BUILD=() || TARGETS_TO_BUILD=("${TARGETS[@]}")
for t in "${TARGETS_TO_BUILD[@]}"; do
  if [[ "${PLAN[$t]}" == zig ]]; then need_zig=1; fi
done
if [[ $need_zig -eq 1 ]]; then
  install_tools
  # cargo finds `cargo zigbuild` on PATH (so napi never falls back to an unpinned `cargo install`);
  # cargo-zigbuild finds zig through CARGO_ZIGBUILD_ZIG_PATH.
  export PATH="$ZIGBUILD_ROOT/bin:$PATH"
  export CARGO_ZIGBUILD_ZIG_PATH="$ZIG"
  export CARGO_ZIGBUILD_CACHE_DIR="$TOOLS/cargo-zigbuild-cache"
  export ZIG_GLOBAL_CACHE_DIR="$TOOLS/zig-cache"
  cargo help zigbuild >/dev/null 2>&1 || die "cargo does not find the zigbuild subcommand at $ZIGBUILD"
fi

# ---- verification ---------------------------------------------------------------------------
# llvm-nm/llvm-objdump read ELF of any architecture and Mach-O; the GNU tools are a fallback for ELF.
first_tool() { for t in "$@"; do command -v "$t" >/dev/null 2>&1 && { echo "$t"; return; }; done; echo ""; }
NM="$(first_tool llvm-nm nm)"
OBJDUMP="$(first_tool llvm-objdump objdump)"
READELF="$(first_tool llvm-readelf readelf)"
dynsyms() { [[ -n "$OBJDUMP" ]] && LC_ALL=C "$OBJDUMP" -T "$1" 2>/dev/null; }

# Prints one line describing the binary; returns non-zero when it is not what $platform needs.
verify() {
  local file="$1" platform="$2" desc want_re exports
  if command -v file >/dev/null 2>&1; then
    desc="$(file -b "$file")"
    case "$platform" in
      linux-x64-*) want_re='^ELF 64-bit LSB shared object, x86-64' ;;
      linux-arm64-*) want_re='^ELF 64-bit LSB shared object, ARM aarch64' ;;
      # file(1) versions differ in where they put the architecture.
      darwin-x64) want_re='^Mach-O 64-bit (.*[ ,])?x86_64([ ,]|$)' ;;
      darwin-arm64) want_re='^Mach-O 64-bit (.*[ ,])?arm64([ ,]|$)' ;;
      *) want_re='.' ;;
    esac
    if ! [[ "$desc" =~ $want_re ]] || { [[ "$platform" == darwin-* ]] && ! [[ "$desc" =~ (dynamically\ linked\ shared\ library|bundle) ]]; }; then
      echo "wrong format for $platform: $desc"
      return 1
    fi
    echo "file: ${desc%%, BuildID*}"
  else
    echo "file(1) is not installed: format not checked"
  fi
  # The symbol Node looks up when it loads an addon (Mach-O prefixes C symbols with `_`).
  if [[ -n "$NM" ]] && exports="$("$NM" -D --defined-only "$file" 2>/dev/null || "$NM" -g --defined-only "$file" 2>/dev/null)"; then
    if ! grep -Eq '(^| )_?napi_register_module_v1$' <<<"$exports"; then
      echo "does not export napi_register_module_v1"
      return 1
    fi
    echo "exports: $(grep -E '(^| )_?napi_register_module_v1$' <<<"$exports" | head -n 1) ($NM)"
  elif grep -aq napi_register_module_v1 "$file"; then
    echo "exports: napi_register_module_v1 found as a string (no nm to read the symbol table)"
  else
    echo "does not contain napi_register_module_v1"
    return 1
  fi
  case "$platform" in
    linux-*-gnu)
      # The newest glibc symbol version it references must not exceed the pin.
      local newest
      newest="$(dynsyms "$file" | grep -o 'GLIBC_2\.[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1 || true)"
      if [[ -n "$newest" ]]; then
        if [[ "$(printf '%s\n%s\n' "$newest" "$GLIBC" | sort -V | tail -n 1)" != "$GLIBC" ]]; then
          if [[ "$platform" == "$(platform_of "$HOST_TRIPLE" 2>/dev/null)" ]]; then
            echo "needs glibc $newest, newer than the pinned $GLIBC (the host build links against this machine's glibc)"
          else
            echo "needs glibc $newest, newer than the pinned $GLIBC"
          fi
          return 1
        fi
        echo "glibc: newest symbol version GLIBC_$newest (pin $GLIBC)"
      fi
      ;;
    linux-*-musl)
      local needed=""
      if [[ -n "$READELF" ]]; then
        needed="$(LC_ALL=C "$READELF" -d "$file" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd ' ' || true)"
      fi
      local syms
      syms="$(dynsyms "$file" || true)"
      if grep -q 'GLIBC_' <<<"$syms"; then
        echo "references glibc symbol versions: not a musl binary"
        return 1
      fi
      echo "musl: no GLIBC_ symbol versions; NEEDED: ${needed:-?}"
      ;;
    darwin-*)
      if command -v llvm-objdump >/dev/null 2>&1; then
        local headers minos libs
        headers="$(llvm-objdump --macho --private-headers "$file" 2>/dev/null || true)"
        minos="$(awk '/LC_BUILD_VERSION/ {b=1} b && $1=="minos" {print $2; exit}
          /LC_VERSION_MIN_MACOSX/ {v=1} v && $1=="version" {print $2; exit}' <<<"$headers")"
        libs="$(llvm-objdump --macho --dylibs-used "$file" 2>/dev/null | sed -n 's|^[[:space:]]*/usr/lib/\([^ ]*\) .*|\1|p' | paste -sd ' ')"
        echo "macOS: minimum ${minos:-unknown}; system libraries: ${libs:-?}"
        # Apple silicon does not run arm64 code without a signature (an ad-hoc one will do).
        if [[ "$platform" == darwin-arm64 ]]; then
          if ! grep -q LC_CODE_SIGNATURE <<<"$headers"; then
            echo "no LC_CODE_SIGNATURE: macOS on arm64 would refuse to load it"
            return 1
          fi
          echo "codesign: ad-hoc signature present (LC_CODE_SIGNATURE)"
        fi
      else
        echo "llvm-objdump is not installed: macOS load commands not checked"
      fi
      ;;
  esac
}

if [[ $CHECK_ONLY -eq 1 ]]; then
  bad=0
  for t in "${TARGETS[@]}"; do
    platform="$(platform_of "$t")"
    f="native/derpmesh.$platform.node"
    [[ -f "$f" ]] || { say "$platform: no $f"; continue; }
    if report="$(verify "$f" "$platform")"; then
      while IFS= read -r line; do say "$platform ok: $line"; done <<<"$report"
    else
      say "$platform BAD: $(tail -n 1 <<<"$report")"
      bad=1
    fi
  done
  exit $bad
fi

# ---- build ----------------------------------------------------------------------------------
# Release binaries should come from a commit: say so when the Rust sources have local changes.
if command -v git >/dev/null 2>&1 && git rev-parse --git-dir >/dev/null 2>&1; then
  dirty="$(git status --porcelain -- native/relay native/node native/Cargo.toml native/Cargo.lock 2>/dev/null || true)"
  if [[ -n "$dirty" ]]; then
    say "warning: uncommitted changes in the Rust sources; these binaries will not match any commit:"
    while IFS= read -r line; do say "  $line"; done <<<"$dirty"
  fi
fi

TARGET_DIR="${DERPMESH_CROSS_TARGET_DIR:-$ROOT/native/target/cross}"
mkdir -p "$TARGET_DIR"
SCRATCH="$(mktemp -d "$TARGET_DIR/.out.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

SUMMARY=()
failed=0
for t in "${TARGETS[@]}"; do
  platform="$(platform_of "$t")"
  plan="${PLAN[$t]}"
  if [[ "$plan" == skip:* ]]; then
    say "skip $platform ($t): ${plan#skip:}"
    SUMMARY+=("$(printf '%-18s %-8s %6s  %s' "$platform" skipped - "${plan#skip:}")")
    continue
  fi

  # cargo-zigbuild reads a glibc pin from a `.2.17` suffix; napi -x strips it again for the
  # cargo target dir and for the output name (derpmesh.linux-arm64-gnu.node).
  napi_target="$t"
  if [[ "$t" == *-linux-gnu ]]; then napi_target="$t.$GLIBC"; fi
  env_extra=()
  case "$t" in
    x86_64-apple-darwin) env_extra+=("MACOSX_DEPLOYMENT_TARGET=${MACOSX_DEPLOYMENT_TARGET:-10.15}") ;;
    aarch64-apple-darwin) env_extra+=("MACOSX_DEPLOYMENT_TARGET=${MACOSX_DEPLOYMENT_TARGET:-11.0}") ;;
  esac

  say "=== $platform: napi build --cross-compile --target $napi_target ${env_extra[*]}"
  if [[ "$t" == *-apple-darwin ]]; then
    say "(rustc warns that xcrun/MacOSX.sdk is missing: expected here, zig links against its own macOS SDK stubs)"
  fi
  start=$SECONDS
  status=ok
  detail=""
  installed="$(rustup target list --installed 2>/dev/null || true)"
  if ! grep -qx "$t" <<<"$installed"; then
    say "adding the Rust standard library for $t (rustup target add $t)"
    if ! rustup target add "$t" >&2; then
      status=FAILED
      detail="rustup target add $t failed"
    fi
  fi
  out="$SCRATCH/$platform"
  if [[ $status == ok ]]; then
    mkdir -p "$out"
    # --output-dir is a scratch dir and --no-js: napi writes its .node, and the .d.ts it always
    # generates, there; only the .node is copied into native/. --locked: never rewrite Cargo.lock.
    if ! env CARGO_BUILD_JOBS="$JOBS" "${env_extra[@]}" "${NICE[@]}" "$NAPI" build --platform --release \
      --cross-compile --target "$napi_target" --manifest-path native/node/Cargo.toml \
      --target-dir "$TARGET_DIR" --output-dir "$out" --no-js --dts index.d.ts -- --locked >&2; then
      status=FAILED
      detail="napi build failed (log above)"
    elif [[ ! -f "$out/derpmesh.$platform.node" ]]; then
      status=FAILED
      detail="napi did not produce derpmesh.$platform.node (got: $(cd "$out" && echo *))"
    fi
  fi
  if [[ $status == ok ]]; then
    if report="$(verify "$out/derpmesh.$platform.node" "$platform")"; then
      dest="native/derpmesh.$platform.node"
      cp "$out/derpmesh.$platform.node" "native/.derpmesh.$platform.node.partial"
      mv -f "native/.derpmesh.$platform.node.partial" "$dest"
      while IFS= read -r line; do say "  $platform $line"; done <<<"$report"
      detail="$(grep '^file: ' <<<"$report" | sed 's/^file: //; s/, flags:.*//; s/, version 1 (SYSV)//')"
      echo "$dest"
    else
      status=FAILED
      detail="verification: $(tail -n 1 <<<"$report")"
    fi
  fi
  elapsed=$((SECONDS - start))
  if [[ $status != ok ]]; then
    failed=1
    say "$platform FAILED: $detail"
    # An older binary left in native/ would be packed by `npm run pack` as if it were current.
    if [[ -f "native/derpmesh.$platform.node" ]]; then
      rm -f "native/derpmesh.$platform.node"
      say "removed the previous native/derpmesh.$platform.node so it cannot be packed by mistake"
    fi
  fi
  SUMMARY+=("$(printf '%-18s %-8s %5ss  %s' "$platform" "$status" "$elapsed" "$detail")")
done

say "summary:"
for line in "${SUMMARY[@]}"; do echo "  $line" >&2; done
exit $failed
