#!/usr/bin/env bash
# Makes sure a Chromium for the status page's browser test (test/status-page.test.ts) is installed:
# Debian's `chromium` package, installed with apt-get when missing (CI runs as root on Debian).
# Prints the browser's path. Honours CHROMIUM_PATH when it names an executable.
set -euo pipefail
if [[ -n "${CHROMIUM_PATH:-}" && -x "${CHROMIUM_PATH}" ]]; then
  echo "${CHROMIUM_PATH}"
  exit 0
fi
for candidate in chromium chromium-browser; do
  if path=$(command -v "$candidate" 2>/dev/null); then
    echo "$path"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: chromium is not installed and apt-get is not available; install Chromium and set CHROMIUM_PATH to it" >&2
  exit 1
fi
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "ensure-chromium: chromium is not installed; run as root (or with sudo): apt-get install -y chromium" >&2
    exit 1
  fi
fi
echo "ensure-chromium: installing Debian's chromium with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >&2
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium >&2
command -v chromium
