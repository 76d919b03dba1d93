#!/usr/bin/env bash
# Set up .venv (pinned) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast ones only).
set -euo pipefail
cd "$(dirname "$0")/.."
SPUR_EXTRAS=test bash scripts/setup.sh
bash scripts/system-packages.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
