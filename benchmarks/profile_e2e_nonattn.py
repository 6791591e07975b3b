"""Where the e2e model's prefill spends its time outside attention (H200).

    python3 benchmarks/profile_e2e_nonattn.py [--n 131072] [--layers 4]

Runs ``bench_e2e.Llama.prefill`` (MiniCPM4-8B shape, random bf16 weights, ``--layers`` of its 32 layers) with
attention replaced by nothing (each layer's attention output = its query, as ``bench_e2e.py --floor``), profiles
one call and sums the GPU kernel time into matrix products and the rest (norms, RoPE, SiLU x up, residual adds,
copies); the call is timed as ``bench_e2e.py`` times it (best of 3). With ``--compile`` it does the same with those
elementwise pieces compiled by ``torch.compile`` (``Llama(..., compile_pointwise=True)``, what ``bench_e2e.py`` runs
by default on CUDA). Prints the results as JSON
and writes them to ``$OUT/profile_e2e_nonattn.json`` when OUT is set. ``matmul_tflops`` is the model's FLOP count
over the time of the kernels classed as products (by name).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import FULL_SHAPE, Llama, time_once  # noqa: E402


def kernel_split(fn):
    """GPU time of one call by kernel class: matrix products vs everything else (ms), and the top other kernels."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split, others = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        if e.device_type is None or not str(e.device_type).endswith("CUDA"):
            continue
        us = e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
        name = e.key
        gemm = any(s in name.lower() for s in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "matmul"))
        split["matmul" if gemm else "other"] += us / 1e3
        if not gemm:
            others[name[:70]] += us / 1e3
    return {k: round(v, 2) for k, v in split.items()}, [(k, round(v, 2)) for k, v in others.most_common(8)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="also time with torch.compile'd norms, RoPE and SiLU x up")
    args = ap.parse_args()
    shape = dict(FULL_SHAPE, layers=args.layers)
    model = Llama(shape, "cuda", torch.bfloat16)
    x = torch.randn(args.n, shape["hidden"], device="cuda", dtype=torch.bfloat16)
    noattn = lambda q, k, v: q  # noqa: E731
    run = lambda: model.prefill(x, noattn)  # noqa: E731
    res = dict(n=args.n, layers=args.layers,
               command="python3 benchmarks/profile_e2e_nonattn.py " + " ".join(sys.argv[1:]))
    flops = 2 * args.n * args.layers * shape["hidden"] * (
        (shape["hq"] + 2 * shape["hkv"]) * shape["d"] + shape["hq"] * shape["d"] + 3 * shape["inter"])
    res["eager_ms_per_layer"] = round(time_once(run, "cuda", reps=3) / args.layers, 2)
    split, top = kernel_split(run)
    res["eager_split_ms_per_layer"] = {k: round(v / args.layers, 2) for k, v in split.items()}
    res["matmul_tflops"] = round(flops / (split["matmul"] / 1e3) / 1e12, 1)
    res["top_other_kernels_ms"] = top
    if args.compile:
        model_c = Llama(shape, "cuda", torch.bfloat16, compile_pointwise=True)
        run = lambda: model_c.prefill(x, noattn)  # noqa: E731
        run()  # compiles
        res["compiled_ms_per_layer"] = round(time_once(run, "cuda", reps=3) / args.layers, 2)
        split, top = kernel_split(run)
        res["compiled_split_ms_per_layer"] = {k: round(v / args.layers, 2) for k, v in split.items()}
        res["compiled_top_other_kernels_ms"] = top
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_e2e_nonattn.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
