#!/usr/bin/env bash
# Set everything up, then run the demo (the main job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bench.demo "$@"
