#!/usr/bin/env bash
# Set up .venv, then run the whole test suite, the tests marked slow included.
# Usage: bash scripts/test.sh [pytest options]
# -m "" (no marker filter) replaces the -m "not slow" of pyproject's addopts, which a plain
# `pytest` keeps for a quick check while editing. A -m given here replaces -m "" in turn (pytest
# keeps the last -m): .ci/run's -m "not slurm" and -m slurm still run every slow test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "" "$@"
