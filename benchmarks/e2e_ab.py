"""Interleaved A/B of the e2e model's InfLLM-V2 prefill under settings of the library's modules.

The e2e bar (prefill >= 2.2x dense at 128K, `local`) moves by less than the spread between separate runs of
``bench_e2e.py`` (about 1 ms a layer), so a change to the attention is judged here: one model, one input, the variants
timed in turn over several rounds, plus the dense prefill once for the ratio.

    python3 benchmarks/e2e_ab.py --variants '[{"name": "a"}, {"name": "b", "sparse_attention.UNION_BITMAP_MAX_BINS": 0}]'

A variant's keys other than ``name`` are ``module.ATTR`` (a module of ``infllmv2.ops.triton``) set to the value for its
turn. Writes ``e2e_ab.json`` under --out.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import FULL_SHAPE, Llama, _meta, prefill_input, time_once  # noqa: E402

from infllmv2 import SparseConfig, infllmv2_attention  # noqa: E402
from infllmv2.attention import dense_attention_sdpa  # noqa: E402


def _setter():
    """-> use(variant): sets the variant's attributes, restoring the others' defaults first."""
    defaults = {}

    def use(var):
        for (mod, attr), val in defaults.items():
            setattr(mod, attr, val)
        for key, val in var.items():
            if key == "name":
                continue
            mod_name, attr = key.rsplit(".", 1)
            mod = importlib.import_module(f"infllmv2.ops.triton.{mod_name}")
            if not hasattr(mod, attr):
                raise SystemExit(f"--variants: {key} is not an attribute of infllmv2.ops.triton.{mod_name}")
            defaults.setdefault((mod, attr), getattr(mod, attr))
            setattr(mod, attr, val)
    return use


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", required=True, help="JSON list of dicts: name and module.ATTR values")
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--pattern", choices=("local", "random"), default="local")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "name" in v for v in variants):
        raise SystemExit("--variants must be a JSON list of objects, each with a name")
    if args.length < 1 or args.rounds < 1:
        raise SystemExit("--length and --rounds must be positive")
    if not torch.cuda.is_available():
        raise SystemExit("e2e_ab.py needs a CUDA GPU")
    shape, n = FULL_SHAPE, args.length
    model = Llama(shape, "cuda", torch.bfloat16, compile_pointwise=True)
    config, scale = SparseConfig(), shape["d"] ** -0.5
    x = prefill_input(model, n, args.pattern, "cuda", torch.bfloat16)
    sparse = lambda q, k, v: infllmv2_attention(q, k, v, config, softmax_scale=scale, backend="auto")  # noqa: E731

    def dense(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return dense_attention_sdpa(q, k, v, scale)

    use = _setter()
    t0 = time.perf_counter()
    try:
        for var in variants:  # warm-up at the full length: the kernels (and autotuning) of every variant's shapes
            use(var)
            model.prefill(x, sparse)
        ms = {v["name"]: [] for v in variants}
        for _ in range(args.rounds):
            for var in variants:
                use(var)
                ms[var["name"]].append(round(time_once(lambda: model.prefill(x, sparse), "cuda"), 1))
            print(json.dumps(ms), flush=True)
    finally:
        use({})
    dense_ms = round(time_once(lambda: model.prefill(x, dense), "cuda"), 1)
    no_attn_ms = round(time_once(lambda: model.prefill(x, lambda q, k, v: q), "cuda"), 1)
    layers = shape["layers"]
    argv = [a for a, prev in zip(sys.argv[1:], [""] + sys.argv[1:]) if a != "--out" and prev != "--out"]
    result = dict({**_meta(), "command": shlex.join(["python3", "benchmarks/e2e_ab.py", *argv])},
                  n=n, pattern=args.pattern, variants=variants, prefill_ms=ms, dense_prefill_ms=dense_ms,
                  no_attention_prefill_ms=no_attn_ms, seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(args.out, "e2e_ab.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"n {n} {args.pattern}: dense {dense_ms} ms, no attention {no_attn_ms} ms")
    print("variant | prefill ms (best) | speed-up vs dense | attention ms a layer")
    for name, vals in ms.items():
        best = min(vals)
        print(f"{name} | {best} | {dense_ms / best:.3f}x | {(best - no_attn_ms) / layers:.2f}")


if __name__ == "__main__":
    main()
