#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The installed package must work from anywhere, without this checkout on the path.
(cd /tmp && "$OLDPWD/.venv/bin/python" -c "import ms_prune.models.bert, ms_prune.models.gpt2, ms_prune.models.llama; print('ms_prune installs and imports')")
# `pytest` (not `python -m pytest`) keeps the checkout off sys.path, so the installed package is tested.
# Two processes (MS_PRUNE_TEST_WORKERS), a test file each at a time: most of the time is graph
# compilation, one core each; more workers than cores, or than memory for their models, is slower.
# Whole files (not single tests) per process: graphs a file's tests share compile once (measured:
# sharing single tests was slower).
.venv/bin/pytest tests -q -p no:cacheprovider -n "${MS_PRUNE_TEST_WORKERS:-2}" --dist loadfile "$@"
