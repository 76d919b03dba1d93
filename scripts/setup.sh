#!/usr/bin/env bash
# Create or refresh .venv with the pinned dependencies. Idempotent: a stamp of
# pyproject.toml + constraints.txt skips the install when nothing changed.
#   SPUR_PYTHON   interpreter to build the venv from (default: python3.11, else python3)
#   SPUR_TORCH    pip arguments for torch (default: torch==2.13.0); see README "GPU"
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${SPUR_PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "spur-assets needs Python 3.11; '$PY' is $("$PY" --version 2>&1). Set SPUR_PYTHON to a 3.11 interpreter." >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) ${SPUR_TORCH:-default}"
if [ "$(cat .venv/.spur-stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "[setup] installing pinned dependencies into .venv (first time: about 2 minutes)"
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet --disable-pip-version-check ${SPUR_TORCH:-torch==2.13.0}
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
  echo "$stamp" > .venv/.spur-stamp
fi
