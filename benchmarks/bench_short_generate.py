"""generate() below ``dense_len`` (GPU): the decode steps of a prompt that InfLLM-V2 attends densely, where every step
brings SDPA a key length it has not seen.

    python3 benchmarks/bench_short_generate.py [--lengths 2000 6000] [--new-tokens 32] [--rounds 2]

The MiniCPM4-8B-shaped transformers ``LlamaForCausalLM`` of ``bench_generate.py`` (random bf16), batch 1, default
eager generate loop. Variants, interleaved over ``--rounds``:

* ``dense``: transformers' own SDPA attention and cache;
* ``infllmv2``: ``infllmv2.enable`` with the default config (dense below 8192 tokens): its decode steps call SDPA
  with cuDNN left out (``attention.AVOID_CUDNN_PLANS``), and since the thirty-third session its prefill too;
* ``infllmv2_cudnn_plans``: the same with SDPA's default order, as before the thirty-second session: cuDNN builds
  an execution plan at each new key length.

Each call uses a prompt length no earlier call used (n + a small offset), as real prompts do. Time to first token
and the median decode step, from ``bench_generate.py``'s step clock. Prints a table; JSON to
``$OUT/bench_short_generate.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import infllmv2  # noqa: E402
import infllmv2.attention as attention_mod  # noqa: E402
from bench_e2e import FULL_SHAPE  # noqa: E402
from bench_generate import build_model, generate_clocked, prompt  # noqa: E402

VARIANTS = ("dense", "infllmv2", "infllmv2_cudnn_plans")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2000, 6000])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    config = infllmv2.SparseConfig()
    if any(config.is_sparse(n + 3 * args.rounds * len(VARIANTS)) for n in args.lengths):
        raise SystemExit(f"--lengths must stay below dense_len ({config.dense_len})")
    model = build_model(FULL_SHAPE, "cuda", torch.bfloat16)
    generate_clocked(model, prompt(model, 100, "random", "cuda", FULL_SHAPE), 2, "cuda")  # set-up, outside the rows
    results = {}  # (n, variant) -> [(ttft, step)]
    offset = 0
    for _ in range(args.rounds):
        for n in args.lengths:
            for variant in VARIANTS:
                offset += 3  # a prompt length no call has used: every shape is new, as for a real prompt
                if variant == "dense":
                    infllmv2.disable(model)
                else:
                    infllmv2.enable(model, config, backend="auto")
                attention_mod.AVOID_CUDNN_PLANS = variant != "infllmv2_cudnn_plans"
                try:
                    ttft, step, _ = generate_clocked(model, prompt(model, n + offset, "random", "cuda", FULL_SHAPE),
                                                     args.new_tokens, "cuda", do_sample=False,
                                                     min_new_tokens=args.new_tokens)
                finally:
                    attention_mod.AVOID_CUDNN_PLANS = True
                results.setdefault((n, variant), []).append((ttft, step))
    rows = [dict(n=n, variant=v, ttft_ms=round(statistics.median(t for t, _ in r), 2),
                 decode_step_ms=round(statistics.median(s for _, s in r), 3), calls=len(r))
            for (n, v), r in results.items()]
    out = dict(command="python3 benchmarks/bench_short_generate.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, new_tokens=args.new_tokens,
               sparse_config=config.to_dict(), rows=rows)
    print("| n | variant | time to first token ms | decode step ms (median) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['variant']} | {r['ttft_ms']} | {r['decode_step_ms']} |")
    with open(os.path.join(os.environ.get("OUT", "."), "bench_short_generate.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
