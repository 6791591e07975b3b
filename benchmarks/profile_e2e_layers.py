"""Where the end-to-end prefill's attention time goes, layer by layer (issue 4).

    python3 benchmarks/profile_e2e_layers.py [--length 131072] [--pattern local] [--out DIR]

The MiniCPM4-8B-shaped model of ``bench_e2e.py`` (random bf16 weights) runs one prefill; each layer's
``infllmv2_attention`` call is timed alone (CUDA events, queue drained before and after, so the sum is a little
above the attention's share of the pipelined prefill), and its inputs are kept to measure afterwards, per layer:
the selection alone, the complete forward by ``bench_attention.bench`` (the harness's timing), and the locality of
the selection (next-token overlap, 16-token union over the budget, as the harness reports them). The last row is
the harness's own `local` input at the same length, for comparison. Writes ``profile_e2e_layers.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import bench, make_inputs, overlap_stats  # noqa: E402
from bench_e2e import FULL_SHAPE, Llama, prefill_input  # noqa: E402

from infllmv2 import SparseConfig, infllmv2_attention, select_blocks  # noqa: E402


def measure(q, k, v, config, scale):
    """(complete forward ms, selection ms, locality) of one layer's attention inputs."""
    full = lambda: infllmv2_attention(q, k, v, config, softmax_scale=scale, backend="triton")  # noqa: E731
    sel = lambda: select_blocks(q, k, config, softmax_scale=scale, backend="triton")  # noqa: E731
    idx = sel()  # (Hkv, n, budget)
    return bench(full), bench(sel), overlap_stats(idx, config.budget, config.block_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--pattern", choices=("local", "random"), default="local")
    ap.add_argument("--layers", type=int, default=None, help="measure only the first LAYERS layers' inputs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.length < 1:
        raise SystemExit(f"--length must be positive, got {args.length}")
    if args.layers is not None and args.layers < 1:
        raise SystemExit(f"--layers must be at least 1, got {args.layers}")
    torch.manual_seed(0)
    shape, n = FULL_SHAPE, args.length
    model = Llama(shape, "cuda", torch.bfloat16)
    config, scale = SparseConfig(), shape["d"] ** -0.5
    x = prefill_input(model, n, args.pattern, "cuda", torch.bfloat16)
    kept, in_model = [], []

    def attn(q, k, v):
        if args.layers is None or len(kept) < args.layers:
            kept.append((q.clone(), k.clone(), v.clone()))
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        o = infllmv2_attention(q, k, v, config, softmax_scale=scale, backend="auto")
        b.record()
        torch.cuda.synchronize()
        in_model.append(a.elapsed_time(b))
        return o

    model.prefill(x[:16384], lambda q, k, v: infllmv2_attention(q, k, v, config, softmax_scale=scale))  # warm-up
    in_model.clear()
    model.prefill(x, attn)
    del model, x
    torch.cuda.empty_cache()
    rows = []
    for i, (q, k, v) in enumerate(kept):
        full_ms, sel_ms, ov = measure(q, k, v, config, scale)
        rows.append(dict(layer=i, in_model_ms=round(in_model[i], 3), complete_fwd_ms=round(full_ms, 3),
                         selection_ms=round(sel_ms, 3), **(ov or {})))
        print(json.dumps(rows[-1]), flush=True)
    kept.clear()
    qb, kb, vb = make_inputs(n, shape["hq"], shape["hkv"], shape["d"], "local")
    full_ms, sel_ms, ov = measure(qb, kb, vb, config, scale)
    harness = dict(layer="harness local", complete_fwd_ms=round(full_ms, 3), selection_ms=round(sel_ms, 3),
                   **(ov or {}))
    print(json.dumps(harness), flush=True)
    def mean(key):  # the locality is missing where a sequence is too short for it (overlap_stats)
        vals = [r[key] for r in rows if key in r]
        return round(sum(vals) / len(vals), 3) if vals else None

    summary = dict(in_model_ms_mean=mean("in_model_ms"), complete_fwd_ms_mean=mean("complete_fwd_ms"),
                   selection_ms_mean=mean("selection_ms"), jaccard_mean=mean("next_token_jaccard"),
                   union16_mean=mean("union16_over_budget"))
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, n=n, pattern=args.pattern,
               command="python3 " + " ".join(shlex.quote(a) for a in sys.argv), rows=rows, harness=harness,
               summary=summary)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_e2e_layers.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("| layer | in model ms | complete fwd ms | selection ms | J | U16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows + [harness]:
        print(f"| {r['layer']} | {r.get('in_model_ms', '')} | {r['complete_fwd_ms']} | {r['selection_ms']} | "
              f"{r.get('next_token_jaccard')} | {r.get('union16_over_budget')} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
