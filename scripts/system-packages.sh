#!/usr/bin/env bash
# Debian packages the tests use and pip cannot provide: chromium (the UI tests drive it
# through Playwright, no browser download) and graphviz (`spur lineage ancestry --png`).
# Installs what is missing with apt-get (as root, or through sudo); elsewhere it says what to install.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v dot >/dev/null 2>&1 || need+=(graphviz)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] missing: ${need[*]}. Install them with your package manager (UI tests need chromium, lineage PNGs need graphviz)." >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "[setup] missing: ${need[*]}; run as root or install them: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "[setup] installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet: update once if the first try fails.
if ! $SUDO apt-get install -y -qq "${need[@]}" >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
