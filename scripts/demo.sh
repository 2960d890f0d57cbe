#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup.sh), then runs the vote
# benchmark on this machine (fused fm_vote vs torch vs FAISS). Extra arguments
# go to benchmarks/bench_vote.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python benchmarks/bench_vote.py "$@"
