#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the main job: load the real all-MiniLM-L6-v2, prune half
# of its attention heads, and report parameters, FLOPs, latency and quality before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python samples/prune_minilm.py "$@"
