#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the main job: prune the real SmolLM2-135M with
# ms_prune.prune and report parameters, FLOPs, latency, WikiText-2 perplexity and a greedy answer
# before and after, and where the pruned (standard Hugging Face) model was written.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python samples/prune_smollm2.py "$@"
