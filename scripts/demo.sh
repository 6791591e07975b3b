#!/usr/bin/env bash
# The main job: SmolLM2-135M, dense vs InfLLM-V2 on a long document with a planted passkey.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/infllmv2 demo "$@"
