#!/usr/bin/env bash
# The kernel tests on an older Triton, without a GPU (how the floor in pyproject.toml was found):
#   bash scripts/triton_floor/run.sh 3.4.0 [interpret|compile] [numpy spec]
# interpret (default): the five kernel test files through Triton's interpreter. Triton <= 3.6's interpreter needs
#   numpy <= 2.3 (it converts 1-element arrays to ints, which numpy 2.4 refuses): pass "numpy==2.3.5" there.
# compile: no interpreter; compile_only.py (a pytest plugin) reports an sm_90 GPU to Triton and turns every launch
#   into a full compile to a cubin with Triton's own ptxas, launching nothing: the outputs are garbage, so only
#   compile errors count (one line a kernel in $VENV/compile_log.jsonl); COMPILE_ALL_BRANCHES=1 also reaches the
#   sparse attention's union / TMA kernels (run it twice, with and without).
# Each version gets its own venv, $TRITON_FLOOR_DIR/venv-<version> (default /tmp/triton_floor), ~1.5 GB.
set -euo pipefail
v=${1:?usage: run.sh <triton version> [interpret|compile] [numpy spec]}
mode=${2:-interpret}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${TRITON_FLOOR_DIR:-/tmp/triton_floor}
venv=$dir/venv-$v
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q --no-deps "triton==$v"
  "$venv/bin/pip" install -q torch==2.13.0 "transformers==5.24.0" pytest hypothesis numpy safetensors tqdm \
    matplotlib accelerate peft "gguf>=0.10"
fi
[ -z "${3:-}" ] || "$venv/bin/pip" install -q "$3"
files=(test_triton_selection.py test_triton_sparse_attention.py test_triton_decode.py test_with_kvcache.py
       test_gluon_support.py)
cd "$repo/tests"
export PYTHONPATH=$repo PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_STORAGE_DIRECTORY=$dir/hypothesis
export TRITON_CACHE_DIR=$dir/cache-$v-$mode
if [ "$mode" = compile ]; then
  export TRITON_INTERPRET=0 PYTHONPATH=$repo:$here COMPILE_LOG=$venv/compile_log.jsonl
  rm -f "$COMPILE_LOG"
  "$venv/bin/python" -m pytest -p compile_only -p no:cacheprovider -q "${files[@]}" || true
  cat "$COMPILE_LOG"
else
  export TRITON_INTERPRET=1
  "$venv/bin/python" -m pytest -p no:cacheprovider -q "${files[@]}"
fi
