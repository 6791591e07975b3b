#!/usr/bin/env bash
# Sets up .venv and runs the test suite (Triton kernels through the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Without a GPU the tests spread over the cores (pytest-xdist; -n 0 in the arguments runs them in one process);
# with one they run in one process, so that the GPU tests do not share the GPU
WORKERS=$(.venv/bin/python -c "import torch; print(0 if torch.cuda.is_available() else 'auto')")
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n "$WORKERS" "$@"
# The whole suite, no arguments: also the transformers-facing tests on the oldest transformers pyproject allows
# (4.x passes the mask function other arguments and builds cache layers differently). OLDEST_TRANSFORMERS=0 skips.
if [ $# -eq 0 ] && [ "${OLDEST_TRANSFORMERS:-1}" = 1 ]; then
  VENV=.venv-transformers4 TRANSFORMERS_SPEC="transformers==4.56.2" bash scripts/setup_env.sh
  HF_HUB_OFFLINE=1 .venv-transformers4/bin/python -m pytest -q -n "$WORKERS" tests/test_transformers.py tests/test_cache.py
fi
