"""Where the e2e model's decode step spends its time, by kernel, a layer (H200).

    python3 benchmarks/profile_e2e_decode.py [--n 131072] [--batches 1 8] [--layers 8]

Builds ``bench_e2e.Llama`` (MiniCPM4-8B shape, random bf16 weights, ``--layers`` of its 32 layers; its pointwise
ops compiled unless ``--eager-pointwise``) and the static decode cache of ``bench_e2e.DecodeState`` at ``--n``
tokens, then for InfLLM-V2 (``infllmv2_with_kvcache``, as ``bench_e2e.py --fused-append``), dense SDPA and no
attention (``--floor``'s step; both write the cache in one launch too) times one decode step under a CUDA graph
(median of ``do_bench``) and profiles one eager step: the GPU time of each kernel, summed over the step and divided
by the layer count. The difference between the InfLLM-V2 and no-attention steps is what attention costs in the model
(the harness's ``decode_step`` row times the decode kernels alone, with the compressed keys warm in L2).
Prints JSON and writes it to ``$OUT/profile_e2e_decode.json`` when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import graphed  # noqa: E402
from bench_e2e import FULL_SHAPE, DecodeState, Llama, decode_step  # noqa: E402
from dev_selection import _kernel_us  # noqa: E402
from infllmv2.config import SparseConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072, help="tokens in the cache")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--eager-pointwise", action="store_true", help="norms, RoPE and SiLU x up in eager PyTorch "
                    "(default: torch.compile, as bench_e2e.py runs them)")
    args = ap.parse_args()
    if args.n <= 0 or args.layers <= 0 or min(args.batches) <= 0:
        raise SystemExit("--n, --layers and --batches must be positive")
    from triton.testing import do_bench
    shape = dict(FULL_SHAPE, layers=args.layers)
    model = Llama(shape, "cuda", torch.bfloat16, compile_pointwise=not args.eager_pointwise)
    config = SparseConfig()
    full = DecodeState(model, max(args.batches), args.n + 1, config)
    out = dict(command="python3 benchmarks/profile_e2e_decode.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name(), n=args.n, layers=args.layers, rows=[])
    for b in args.batches:
        st = full.narrow(b)
        tokens = torch.randint(0, shape["vocab"], (b,), device="cuda")
        pos = torch.full((b,), args.n, dtype=torch.long, device="cuda")
        for name, sparse in (("infllmv2", True), ("dense", False), ("no_attention", None)):
            def fn(st=st, tokens=tokens, pos=pos, sparse=sparse):
                return decode_step(model, st, tokens, pos, args.n + 1, config, sparse, fused_append=True)
            g = graphed(fn)
            ms = do_bench(g, warmup=5, rep=100, return_mode="median")
            del g
            per_kernel = sorted(_kernel_us(fn, reps=1).items(), key=lambda kv: -kv[1])  # us a step, by name
            row = dict(path=name, batch=b, graph_us_per_layer=round(1e3 * ms / args.layers, 1),
                       kernels_us_per_layer={k: round(us / args.layers, 2) for k, us in per_kernel})
            out["rows"].append(row)
            print(json.dumps(row)[:600], flush=True)
    print("batch | path | graph us a layer | top kernels (us a layer)")
    for r in out["rows"]:
        top = list(r["kernels_us_per_layer"].items())[:6]
        print(r["batch"], "|", r["path"], "|", r["graph_us_per_layer"], "|", top)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_e2e_decode.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
