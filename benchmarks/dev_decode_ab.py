"""Interleaved A/B (GPU) of this tree's decode chain against another copy of the package: one decode step of
MiniCPM4-8B's attention shape (32 query / 2 KV heads, head dim 128, default config) on a cache of n tokens with its
compressed keys given (as the caches pass them), timed under a CUDA graph (``triton.testing.do_bench_cudagraph``,
as decode steps run), per length and batch, in turn over rounds; outputs compared.

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_decode_ab.py --other OLD_DIR/infllmv2 [--lens 16384 32768 131072]

Writes ``decode_ab.json`` under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dev_package_ab import load_package  # noqa: E402

import infllmv2  # noqa: E402
import infllmv2.ops.triton.decode  # noqa: E402,F401


def inputs(n, batch, config, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    rows1 = (n - config.kernel_size) // config.kernel_stride + 1
    rows2 = (n - config.coarse_kernel_size) // config.coarse_kernel_stride + 1
    return dict(q=rnd(batch, 32, 128), k_cache=rnd(batch, n, 2, 128), v_cache=rnd(batch, n, 2, 128),
                cache_seqlens=torch.full((batch,), n, dtype=torch.int32, device="cuda"),
                k_fine=rnd(batch, rows1, 2, 128), k_coarse=rnd(batch, rows2, 2, 128))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="directory of the other infllmv2 package")
    ap.add_argument("--lens", type=int, nargs="+", default=[16384, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    other = load_package(args.other, "infllmv2_other")
    import importlib
    other_decode = importlib.import_module("infllmv2_other.ops.triton.decode")
    fns = {"this": infllmv2.ops.triton.decode.infllmv2_decode_triton, "other": other_decode.infllmv2_decode_triton}
    configs = {"this": infllmv2.SparseConfig(), "other": other.SparseConfig()}  # each package's own class
    rows = []
    for n in args.lens:
        for batch in args.batches:
            x = inputs(n, batch, configs["this"])
            with torch.no_grad():
                outs = {name: f(config=configs[name], **x) for name, f in fns.items()}
                times = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, f in fns.items():
                        times[name].append(triton.testing.do_bench_cudagraph(
                            lambda f=f, cfg=configs[name]: f(config=cfg, **x)))
            row = {"n": n, "batch": batch, "us": {k: round(min(v) * 1e3, 2) for k, v in times.items()},
                   "all_us": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()},
                   "max_abs_diff": float((outs["this"].float() - outs["other"].float()).abs().max())}
            rows.append(row)
            print(json.dumps(row))
    out = {"command": " ".join(["python3"] + sys.argv), "gpu": torch.cuda.get_device_name(), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_ab.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'n':>7} {'batch':>5} {'this us':>8} {'other us':>8} {'max diff':>9}")
    for r in rows:
        print(f"{r['n']:>7} {r['batch']:>5} {r['us']['this']:>8} {r['us']['other']:>8} {r['max_abs_diff']:>9.2e}")


if __name__ == "__main__":
    main()
