#!/usr/bin/env bash
# Create or refresh .venv with the pinned dependencies. Idempotent: a stamp of
# pyproject.toml + constraints.txt (+ which extras) skips the install when nothing changed.
#   SPUR_PYTHON   interpreter to build the venv from (default: python3.11, else python3)
#   SPUR_TORCH    pip arguments for torch (default: torch==2.13.0); see docs/configuration.md "GPU"
#   SPUR_EXTRAS   pip extras to install beside the package: "test" for the test suite
#                 (scripts/test.sh sets it); empty (the demo) installs only what the pipeline runs on
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

extras="${SPUR_EXTRAS:-}"
target="."
[ -n "$extras" ] && target=".[$extras]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) ${SPUR_TORCH:-default}"
have="$(cat .venv/.spur-stamp 2>/dev/null || true)"
# A venv set up with the test extras serves the demo too; the other way round it needs them added.
if [ "$have" != "$stamp [$extras]" ] && { [ -n "$extras" ] || [ "${have% \[*}" != "$stamp" ]; }; then
  echo "[setup] installing pinned dependencies into .venv${extras:+ (with the $extras extras)} (first time: 1-2 minutes)"
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet --disable-pip-version-check ${SPUR_TORCH:-torch==2.13.0}
  # The rest through uv, pinned by the same constraints: the same versions pip picks, in a
  # fraction of the time (pip took 69 s for the pipeline's set on a 2-core machine, uv 5 s; bench/MEASURED.md).
  # torch is in the venv already, so uv keeps that build. Without uv (offline, say) pip does it.
  if .venv/bin/pip install --quiet --disable-pip-version-check uv==0.13.8 >/dev/null 2>&1 \
    && .venv/bin/uv pip install --quiet --python .venv/bin/python -c constraints.txt -e "$target"; then
    :
  else
    echo "[setup] uv unavailable; installing with pip" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e "$target"
  fi
  echo "$stamp [$extras]" > .venv/.spur-stamp
fi
