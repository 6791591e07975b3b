"""Launch-configuration sweep of the stage-2 kernels (GPU): warps, pipeline stages and register caps.

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_launch_configs.py [--lens 32768,131072] [--rounds 2]

Nsight Compute reads every stage-2 kernel at 2 programs per SM, limited by registers and shared memory
(`results/ncu_kernels_32k_local_h200.txt`). A register cap (``maxnreg``) with fewer pipeline stages trades
in-program prefetching for a third program per SM. Each configuration replaces the autotuner's list
(one entry, cache cleared), so all variants run in one process, interleaved over ``--rounds``; the
kernel's own GPU time comes from the profiler. Synthetic selections as in ``dev_sparse_attention.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from dev_sparse_attention import SA, kernel_ms, make_selection  # noqa: E402

DEV = "cuda"
CONFIGS = {  # kernel -> {name: (num_warps, num_stages, maxnreg)}; the first entry is today's choice
    "fwd": {"w4s3": (4, 3, None), "w4s2": (4, 2, None), "w4s2r168": (4, 2, 168), "w4s1r168": (4, 1, 168),
            "w4s1r128": (4, 1, 128)},
    "dq": {"w4s2": (4, 2, None), "w4s2r168": (4, 2, 168), "w4s1r168": (4, 1, 168)},
    "dkdv": {"w4s3": (4, 3, None), "w4s2": (4, 2, None), "w4s1": (4, 1, None)},
}
KERNEL_NAMES = {"fwd": "_sparse_fwd_kernel", "dq": "_sparse_bwd_dq_kernel", "dkdv": "_sparse_bwd_dkdv_kernel"}


def launcher(kind):
    return {"fwd": SA._fwd_launch, "dq": SA._dq_launch, "dkdv": SA._dkdv_launch}[kind]


def use(kind, cfg):
    w, s, r = cfg
    tuner = launcher(kind)
    tuner.configs = [triton.Config({}, num_warps=w, num_stages=s, maxnreg=r)]
    tuner.cache.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--patterns", default="local,random")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    defaults = {k: list(launcher(k).configs) for k in CONFIGS}
    hq, hkv, d, B, budget = 32, 2, 128, 64, 96
    rows = []
    for n in [int(x) for x in args.lens.split(",")]:
        for pattern in args.patterns.split(","):
            torch.manual_seed(0)
            q = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16)
            k = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16)
            v = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16)
            do = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16)
            bi = make_selection(n, n, hkv, B, budget, 1, 32, 0.97 if pattern == "local" else 0.0)
            cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
            scale = d ** -0.5
            out, lse, resid = SA._forward(q, k, v, bi, B, cu, cu, n, n, scale, need_resid=True)
            ref = {"fwd": out.clone()}
            ref["dq"], ref["dk"], ref["dv"] = SA._backward(do, q, k, v, out, lse, bi, B, cu, cu, n, n, scale,
                                                           resid=resid)
            fwd = lambda: SA._forward(q, k, v, bi, B, cu, cu, n, n, scale)  # noqa: E731
            bwd = lambda: SA._backward(do, q, k, v, out, lse, bi, B, cu, cu, n, n, scale, resid=resid)  # noqa: E731
            for rnd in range(args.rounds):
                for kind, cfgs in CONFIGS.items():
                    for name, cfg in cfgs.items():
                        row = dict(n=n, pattern=pattern, kernel=kind, config=name, round=rnd)
                        try:
                            use(kind, cfg)
                            fn = fwd if kind == "fwd" else bwd
                            res = fn()
                            if kind == "fwd":
                                row["max_diff"] = float((res[0].float() - ref["fwd"].float()).abs().max())
                            else:
                                row["max_diff"] = max(float((a.float() - ref[x].float()).abs().max())
                                                      for a, x in zip(res, ("dq", "dk", "dv")))
                            row["kernel_ms"] = kernel_ms(fn, reps=5).get(KERNEL_NAMES[kind])
                        except Exception as ex:  # noqa: BLE001
                            row["error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
                        finally:
                            launcher(kind).configs = defaults[kind]
                            launcher(kind).cache.clear()
                        print(json.dumps(row), flush=True)
                        rows.append(row)
            ref = None
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "dev_launch_configs.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), rows=rows), f, indent=1)
    # table: best kernel time of the rounds per (n, pattern, kernel, config)
    best = {}
    for r in rows:
        if r.get("kernel_ms") is not None:
            key = (r["n"], r["pattern"], r["kernel"], r["config"])
            best[key] = min(best.get(key, 1e9), r["kernel_ms"])
    print("n pattern kernel config | kernel ms (best of rounds)")
    for key, ms in best.items():
        print(*key, "|", ms)


if __name__ == "__main__":
    main()
