#!/usr/bin/env bash
# Issue 5's short-to-long adaptation experiment: pretrain dense on short rows, fine-tune long in three
# arms (full attention, InfLLM-V2 sparse, NSA) with the same visible-token budget for both sparse arms,
# evaluate each (InfLLM-V2 both sparse and dense), and write results/adaptation/summary.json.
#
#   SCALE=gpu bash scripts/adaptation.sh        # the experiment (H200: small preset, 2K -> 16K)
#   SCALE=cpu-smoke bash scripts/adaptation.sh  # the same pipeline in miniature, minutes on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
# PY: the interpreter (default: the project's .venv, else python3, e.g. on a GPU box with torch installed).
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
OUT=${OUT_DIR:-results/adaptation}
SCALE=${SCALE:-gpu}
if [ "$SCALE" = gpu ]; then
  PRE="--preset small --seq-len 2048 --steps ${PRE_STEPS:-2000} --micro-batch 8 --lr 1e-3 --warmup 100"
  FT="--seq-len 16384 --steps ${FT_STEPS:-300} --micro-batch 1 --lr 3e-4 --warmup 20 --buckets paper --ruler-ratio 0.1"
  # 3072 visible tokens of 16384 (19%, as the paper's 6K of 32K): 16 local + 32 blocks of 64.
  SPARSE="--block-size 64 --kernel-size 32 --kernel-stride 16 --window 1024 --topk 32 --dense-len -1"
  EVAL="--lengths ${EVAL_LENGTHS:-4096,16384} --samples ${EVAL_SAMPLES:-8}"
else
  PRE="--preset tiny --seq-len 256 --steps 40 --micro-batch 4 --lr 3e-3 --warmup 4 --data-max-chars 400000"
  FT="--seq-len 1024 --steps 12 --micro-batch 1 --lr 1e-3 --warmup 2 --data-max-chars 400000"
  SPARSE="--block-size 16 --kernel-size 16 --kernel-stride 8 --window 64 --topk 8 --dense-len -1"
  EVAL="--lengths 512,1024 --samples 2 --tasks niah_single,passkey,ppl --depths 0.5"
fi
mkdir -p "$OUT"
# Each stage's command goes to commands.txt and its wall time to stage_times.txt.
run() {
  echo "+ infllmv2 $*" | tee -a "$OUT/commands.txt"
  local t0=$SECONDS
  HF_HUB_OFFLINE=1 "$PY" -m infllmv2.cli "$@"
  echo "$(( SECONDS - t0 )) s  infllmv2 $1 ${3:-}" | tee -a "$OUT/stage_times.txt"
}
run train --out "$OUT/pretrain" $PRE --attention dense --no-progress
for arm in dense infllmv2 nsa; do
  run train --out "$OUT/ft_$arm" --init "$OUT/pretrain/final" --attention "$arm" $FT $SPARSE --no-progress
done
run eval --model "$OUT/ft_dense/final" --modes dense $EVAL $SPARSE --out "$OUT/eval_full" --no-progress
run eval --model "$OUT/ft_infllmv2/final" --modes sparse,infllmv2_dense $EVAL $SPARSE --out "$OUT/eval_infllmv2" --no-progress
run eval --model "$OUT/ft_nsa/final" --modes nsa $EVAL $SPARSE --out "$OUT/eval_nsa" --no-progress
HF_HUB_OFFLINE=1 "$PY" - "$OUT" "$SCALE" <<'PYEOF'
import json, os, sys
from infllmv2.train import adaptation_summary
out, scale = sys.argv[1], sys.argv[2]
cmds = open(os.path.join(out, "commands.txt")).read().splitlines()
s = adaptation_summary(os.path.join(out, "summary.json"), cmds, {"scale": scale}, os.path.join(out, "pretrain"),
                       {"full": f"{out}/ft_dense", "infllmv2": f"{out}/ft_infllmv2", "nsa": f"{out}/ft_nsa"},
                       {"full": (f"{out}/eval_full/results.json", "dense"),
                        "infllmv2_sparse": (f"{out}/eval_infllmv2/results.json", "sparse"),
                        "infllmv2_dense": (f"{out}/eval_infllmv2/results.json", "infllmv2_dense"),
                        "nsa": (f"{out}/eval_nsa/results.json", "nsa")},
                       png=os.path.join(out, "loss_switch.png"))
print(json.dumps({k: s[k] for k in ("ruler", "bars") if k in s}, indent=1))
PYEOF
