#!/usr/bin/env bash
# Set up .venv (pinned) and materialize the whole asset graph on the built-in
# data (or on $SPUR_DATASET), then print where the results are.
# Extra arguments go to `spur run` (e.g. --dataset path/to/dataset.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/spur run "$@"
