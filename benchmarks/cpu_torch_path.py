"""Memory-bounded PyTorch path on the CPU: forward + backward time and peak memory at long lengths.

    python benchmarks/cpu_torch_path.py --n 32768 --hq 8 --hkv 2 --d 64 --pattern random

Peak memory is the process's peak resident set (ru_maxrss) minus the resident set after the inputs
were made, so it counts everything the attention allocates (selection, chunks, autograd buffers).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shlex
import sys
import time

import torch

import infllmv2


def make_inputs(n, hq, hkv, d, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, n, hkv, d, generator=g)
    v = torch.randn(1, n, hkv, d, generator=g)
    if pattern == "random":
        q = torch.randn(1, n, hq, d, generator=g)
    else:  # BENCHMARKS.md `local`: q[t] = 0.97 q[t-1] + sqrt(1 - 0.97^2) e[t]
        e = torch.randn(n, hq, d, generator=g)
        q = torch.empty(n, hq, d)
        q[0] = e[0]
        a, b = 0.97, math.sqrt(1 - 0.97 ** 2)
        for t in range(1, n):
            q[t] = a * q[t - 1] + b * e[t]
        q = q[None]
    return q, k, v


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--hq", type=int, default=8)
    p.add_argument("--hkv", type=int, default=2)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--pattern", choices=["random", "local"], default="random")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    q, k, v = make_inputs(args.n, args.hq, args.hkv, args.d, args.pattern)
    for t in (q, k, v):
        t.requires_grad_(True)
    base = rss_mib()
    cfg = infllmv2.SparseConfig(dense_len=-1)
    t0 = time.perf_counter()
    idx = infllmv2.select_blocks(q, k, cfg, backend="torch")
    t1 = time.perf_counter()
    out = infllmv2.sparse_attention(q, k, v, idx, block_size=cfg.block_size, backend="torch")
    t2 = time.perf_counter()
    out.backward(torch.randn_like(out))
    t3 = time.perf_counter()
    res = {
        "n": args.n, "hq": args.hq, "hkv": args.hkv, "d": args.d, "dtype": "float32", "pattern": args.pattern,
        "visible_blocks": cfg.budget, "selection_s": round(t1 - t0, 2), "sparse_fwd_s": round(t2 - t1, 2),
        "backward_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
        "peak_extra_mib": round(rss_mib() - base, 1), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "grads_finite": bool(all(torch.isfinite(t.grad).all() for t in (q, k, v))),
        "command": "python benchmarks/cpu_torch_path.py " + shlex.join(sys.argv[1:]),
    }
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
