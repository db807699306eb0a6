#!/usr/bin/env bash
# Fuzzes the relay core's network parsers (native/relay/fuzz, see its README.md): every target, or
# the ones named, one after the other, each for the given time, one process each.
#
#   npm run fuzz                               every target, 60 s each
#   npm run fuzz -- --time 300 relay_conn stun these two, 5 minutes each
#   npm run fuzz -- --runs 10000000 stun       10 million executions (libFuzzer mode only)
#   scripts/fuzz.sh --ci                       CI's budget: 20 s each, build dir in the cache
#
# Options:
#   --time S     seconds per target (default 60; 20 with --ci)
#   --runs N     executions per target instead (no time limit unless --time is given too)
#   --mode M     auto (default), libfuzzer or stable (see below)
#   --ci         CI settings: 20 s per target unless --time, cargo target dir in the cache dir
#   --list       print the targets and exit
#
# Modes, as --mode auto picks them (the choice and its reason are printed first):
#   libfuzzer  cargo-fuzz (libFuzzer, coverage-guided) with AddressSanitizer on a nightly
#              toolchain; without nightly (and none can be installed), on stable with `-s none`
#              (coverage-guided, no sanitizer). cargo-fuzz is installed from crates.io into the
#              cache dir on first use.
#   stable     when cargo-fuzz cannot be installed or built: `cargo test` of tests/stable.rs, which
#              replays the corpus and runs seeded mutations of it for the same time per target
#              (no coverage feedback). Never a silent skip: if no mode can run, this fails.
#
# New inputs libFuzzer finds go to native/relay/fuzz/work/<target>/ (ignored by git; the committed
# seeds in corpus/<target>/ are only read); crashes to artifacts/<target>/; logs to work/logs/.
# The exit status is non-zero if any target found a crash.
#
# Environment:
#   DERPMESH_CACHE          cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh); cargo-fuzz
#                           goes to its bin/
#   DERPMESH_FUZZ_TOOLCHAIN the nightly toolchain for libFuzzer mode (default: nightly)
#   DERPMESH_FUZZ_SANITIZER address (default on nightly) or none: libFuzzer without ASan runs
#                           3-6x more executions in the same time (safe Rust gains little from it)
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

cd "$(dirname "$0")/.."
ROOT="$PWD"
FUZZ="$ROOT/native/relay/fuzz"
CACHE="${DERPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/derpmesh}"
NIGHTLY="${DERPMESH_FUZZ_TOOLCHAIN:-nightly}"
SANITIZER="${DERPMESH_FUZZ_SANITIZER:-address}"
[[ "$SANITIZER" =~ ^(address|none)$ ]] || { echo "fuzz: DERPMESH_FUZZ_SANITIZER=$SANITIZER: address or none" >&2; exit 2; }
TARGETS_ALL=(frame_reader relay_conn handshake http_front websocket stun client tls_records)

say() { echo "fuzz: $*" >&2; }
die() { echo "fuzz: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" >&2; exit "${1:-2}"; }

TIME=""
RUNS=""
MODE=auto
CI_MODE=0
TARGETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --time) TIME="${2:-}"; shift 2 ;;
    --time=*) TIME="${1#--time=}"; shift ;;
    --runs) RUNS="${2:-}"; shift 2 ;;
    --runs=*) RUNS="${1#--runs=}"; shift ;;
    --mode) MODE="${2:-}"; shift 2 ;;
    --mode=*) MODE="${1#--mode=}"; shift ;;
    --ci) CI_MODE=1; shift ;;
    --list) printf '%s\n' "${TARGETS_ALL[@]}"; exit 0 ;;
    -h | --help) usage 0 ;;
    -*) echo "fuzz: unknown option $1" >&2; usage 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[[ -z "$RUNS" || "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs $RUNS is not a whole number of executions"
[[ -n "$TIME" || -n "$RUNS" ]] || TIME=$([[ $CI_MODE == 1 ]] && echo 20 || echo 60)
[[ -z "$TIME" || "$TIME" =~ ^[1-9][0-9]*$ ]] || die "--time $TIME is not a whole number of seconds"
[[ -z "$RUNS" || "$MODE" != stable ]] || die "--runs needs libFuzzer (the stable harness runs for a time)"
# What each target runs for, in libFuzzer's terms and in words.
LIMIT_ARGS=()
[[ -n "$TIME" ]] && LIMIT_ARGS+=(-max_total_time="$TIME")
[[ -n "$RUNS" ]] && LIMIT_ARGS+=(-runs="$RUNS")
BUDGET="${TIME:+$TIME s}${TIME:+${RUNS:+, at most }}${RUNS:+$RUNS executions}"
[[ "$MODE" =~ ^(auto|libfuzzer|stable)$ ]] || die "--mode $MODE: auto, libfuzzer or stable"
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${TARGETS_ALL[@]}")
for t in "${TARGETS[@]}"; do
  [[ " ${TARGETS_ALL[*]} " == *" $t "* ]] || die "no target $t (targets: ${TARGETS_ALL[*]})"
done

if [[ $CI_MODE == 1 ]]; then
  # Kept across CI runs on one machine: a fresh clone then builds in seconds, not minutes.
  TARGET_DIR="$CACHE/fuzz-target"
else
  TARGET_DIR="$FUZZ/target"
fi
mkdir -p "$CACHE/bin" "$FUZZ/work/logs"

# ---- choosing the mode --------------------------------------------------------------------------

cargo_fuzz_ok() {
  [[ -x "$CACHE/bin/cargo-fuzz" ]] && [[ "$("$CACHE/bin/cargo-fuzz" --version 2>/dev/null)" == "cargo-fuzz $CARGO_FUZZ_VERSION" ]]
}

install_cargo_fuzz() {
  cargo_fuzz_ok && return 0
  exec 9>"$CACHE/.cargo-fuzz.lock"
  command -v flock >/dev/null 2>&1 && flock 9
  cargo_fuzz_ok && return 0
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io into $CACHE/bin (about 2.5 min on 2 cores)"
  local tmp
  tmp=$(mktemp -d)
  if ! cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$tmp" >"$FUZZ/work/logs/install-cargo-fuzz.log" 2>&1; then
    rm -rf "$tmp"
    say "cargo install cargo-fuzz failed (log: native/relay/fuzz/work/logs/install-cargo-fuzz.log)"
    return 1
  fi
  mv -f "$tmp/bin/cargo-fuzz" "$CACHE/bin/cargo-fuzz"
  rm -rf "$tmp"
}

have_nightly() {
  command -v rustup >/dev/null 2>&1 && rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1
}

install_nightly() {
  have_nightly && return 0
  command -v rustup >/dev/null 2>&1 || return 1
  say "no $NIGHTLY toolchain: trying rustup toolchain install $NIGHTLY --profile minimal"
  timeout 600 rustup toolchain install "$NIGHTLY" --profile minimal >"$FUZZ/work/logs/install-nightly.log" 2>&1 && have_nightly
}

# cargo-fuzz arguments of the libFuzzer mode; set by pick_libfuzzer.
FUZZ_TOOLCHAIN=""
FUZZ_SANITIZER=()
WHY=""

build_libfuzzer() {
  (cd "$FUZZ" && PATH="$CACHE/bin:$PATH" cargo "+$FUZZ_TOOLCHAIN" fuzz build -O "${FUZZ_SANITIZER[@]}" \
    --target-dir "$TARGET_DIR" "$@")
}

pick_libfuzzer() {
  if ! install_cargo_fuzz; then
    WHY="cargo-fuzz could not be installed from crates.io"
    return 1
  fi
  if install_nightly; then
    FUZZ_TOOLCHAIN="$NIGHTLY"
    FUZZ_SANITIZER=()
    [[ "$SANITIZER" == none ]] && FUZZ_SANITIZER=(-s none)
    say "building the targets: cargo +$NIGHTLY fuzz build -O ${FUZZ_SANITIZER[*]:-(AddressSanitizer)}"
    if build_libfuzzer >"$FUZZ/work/logs/build.log" 2>&1; then
      return 0
    fi
    say "the $NIGHTLY build failed (work/logs/build.log); trying stable without a sanitizer"
  else
    say "no $NIGHTLY toolchain and none could be installed; trying stable without a sanitizer"
  fi
  FUZZ_TOOLCHAIN=stable
  FUZZ_SANITIZER=(-s none)
  if build_libfuzzer >"$FUZZ/work/logs/build.log" 2>&1; then
    return 0
  fi
  WHY="cargo fuzz build failed on $NIGHTLY and on stable (native/relay/fuzz/work/logs/build.log)"
  return 1
}

case "$MODE" in
  libfuzzer)
    pick_libfuzzer || die "libFuzzer mode cannot run: $WHY"
    ;;
  stable) WHY="--mode stable" ;;
  auto)
    if pick_libfuzzer; then MODE=libfuzzer; else MODE=stable; fi
    [[ -z "$RUNS" || "$MODE" == libfuzzer ]] || die "--runs needs libFuzzer, which cannot run: $WHY"
    ;;
esac

# ---- running ------------------------------------------------------------------------------------

SUMMARY=()
FAILED=()
if [[ "$MODE" == libfuzzer ]]; then
  SAN=$([[ ${#FUZZ_SANITIZER[@]} == 0 ]] && echo "AddressSanitizer" || echo "no sanitizer")
  say "MODE: libFuzzer (coverage-guided) — cargo-fuzz $CARGO_FUZZ_VERSION, toolchain $FUZZ_TOOLCHAIN, $SAN; $BUDGET per target: ${TARGETS[*]}"
  for t in "${TARGETS[@]}"; do
    mkdir -p "$FUZZ/work/$t" "$FUZZ/artifacts/$t"
    dirs=("work/$t" "corpus/$t")
    [[ -d "$FUZZ/regressions/$t" ]] && dirs+=("regressions/$t")
    log="$FUZZ/work/logs/$t.log"
    say "$t: $BUDGET"
    # One process (no -jobs/-workers); a 10 s input is a hang; 1 GiB is an unbounded allocation.
    started=$SECONDS
    set +e
    (cd "$FUZZ" && PATH="$CACHE/bin:$PATH" cargo "+$FUZZ_TOOLCHAIN" fuzz run -O "${FUZZ_SANITIZER[@]}" \
      --target-dir "$TARGET_DIR" "$t" "${dirs[@]}" -- \
      "${LIMIT_ARGS[@]}" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=8192 \
      -print_final_stats=1) >"$log" 2>&1
    rc=$?
    set -e
    took=$((SECONDS - started))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corpus=$(find "$FUZZ/work/$t" -type f | wc -l)
    if [[ $rc == 0 ]]; then
      SUMMARY+=("$t: ${runs:-?} executions in $took s, coverage ${cov:-?} edges, $corpus new inputs in work/$t")
    else
      FAILED+=("$t")
      SUMMARY+=("$t: FAILED (exit $rc) after ${runs:-?} executions; artifacts/$t/, log work/logs/$t.log")
      grep -E -A3 "^(==[0-9]+==|thread '|SUMMARY|artifact_prefix|Test unit written)" "$log" | head -40 >&2 || true
      # The input itself, so that a crash on a machine whose files are gone can be replayed:
      # `base64 -d > crash && cargo fuzz run <target> crash`.
      crash=$(ls -t "$FUZZ/artifacts/$t"/* 2>/dev/null | head -1 || true)
      if [[ -n "$crash" ]]; then
        echo "fuzz: $t: the input, base64 ($(wc -c <"$crash") bytes):" >&2
        base64 -w 0 "$crash" | head -c 16384 >&2
        echo >&2
      fi
    fi
  done
else
  say "MODE: stable replay + mutation (no libFuzzer: $WHY) — tests/stable.rs, ${TIME} s per target: ${TARGETS[*]}"
  log="$FUZZ/work/logs/stable.log"
  set +e
  (cd "$FUZZ" && DERPMESH_FUZZ_SECONDS="$TIME" cargo test --release --no-default-features \
    --target-dir "$TARGET_DIR" --test stable -- --exact --test-threads=1 --nocapture "${TARGETS[@]}") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  while IFS= read -r line; do SUMMARY+=("${line#stable fuzz }"); done < <(grep -o 'stable fuzz .*' "$log")
  [[ $rc == 0 ]] || FAILED+=("stable harness (exit $rc)")
  [[ ${#SUMMARY[@]} == ${#TARGETS[@]} || $rc != 0 ]] || { FAILED+=("stable harness ran ${#SUMMARY[@]} of ${#TARGETS[@]} targets"); }
fi

echo
echo "fuzz summary ($MODE):"
printf '  %s\n' "${SUMMARY[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "fuzz: FAILED: ${FAILED[*]}" >&2
  exit 1
fi
