#!/usr/bin/env bash
# Sets up .venv and runs the test suite (Triton kernels through the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
