#!/usr/bin/env bash
# Set up .venv, then run the main job on built-in synthetic data (no downloads, no GPU).
# Usage: bash scripts/demo.sh [demo options, see: .venv/bin/python -m hpa_scc demo --help]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m hpa_scc demo "$@"
