#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup.sh), then runs the offline
# demo end to end: haystack -> digits, surrogate, LM / FM / Random pruning,
# pretraining on each subset and on the whole source, linear probe, the table
# and plots in runs/demo (8-9 minutes on 2 cores; a rerun reuses finished
# cells). Extra arguments go to `fastvote demo` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/fastvote demo "$@"
