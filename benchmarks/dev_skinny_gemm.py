"""The e2e model's decode products at batch 1 and 8 (H200): which way of running them streams the weights fastest.

    python3 benchmarks/dev_skinny_gemm.py [--batches 1 8] [--compile]

At batch 8 the decode step's projections are bound by reading their weights; cuBLAS ran the MLP's (268 and 134 MB)
at 93-95% of the copy ceiling but q/k/v and o (38 and 34 MB) at 2.4-3.1 TB/s, with split-K
(``profile_e2e_decode.py``). This times, for each weight of one layer, ``x @ W.t()`` (the benchmark's layout),
``x @ W_t`` (the weight stored transposed), cuBLASLt, a plain Triton kernel (one program per BLOCK_N output columns,
the whole K loop, several configs) and, with ``--compile``, ``torch.compile(mode="max-autotune-no-cudagraphs")``;
each under a CUDA graph of 20 calls, median of ``do_bench``; TB/s = weight bytes / time. Prints a table; JSON to
``$OUT/dev_skinny_gemm.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import FULL_SHAPE  # noqa: E402


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """y (M, N) = x (M, K) @ w (N, K)^T for small M: a program streams BLOCK_N rows of w over the whole K."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + (k0 + offs_k)[None, :], mask=offs_n[:, None] < N,
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def skinny(x, w, block_n, block_k, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _skinny_kernel[(triton.cdiv(n, block_n),)](x, w, y, m, n, k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                                               num_warps=warps, num_stages=stages)
    return y


def graph_us(fn, calls=20):
    from triton.testing import do_bench
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return 1e3 * do_bench(g.replay, warmup=5, rep=100, return_mode="median") / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--compile", action="store_true", help="also torch.compile max-autotune (minutes)")
    args = ap.parse_args()
    s = FULL_SHAPE
    h, d = s["hidden"], s["d"]
    weights = dict(wqkv=((s["hq"] + 2 * s["hkv"]) * d, h), wo=(h, s["hq"] * d), w13=(2 * s["inter"], h),
                   w2=(h, s["inter"]), head=(s["vocab"], h))
    configs = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256) for w in (4,) for st in (4, 6)]
    rows = []
    for name, (n, k) in weights.items():
        # several copies so that consecutive calls do not find the weight in L2 (50 MB)
        copies = max(1, -(-160_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        gb = n * k * 2 / 1e9
        for b in args.batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ ws[0].float().t())
            it = {"i": 0}

            def nxt():
                it["i"] = (it["i"] + 1) % copies
                return it["i"]
            # each variant as a function of the weight index: checked on copy 0, timed cycling over the copies
            variants = {"x@W.t()": lambda i: x @ ws[i].t(), "x@Wt": lambda i: x @ wts[i]}
            for bn, bk, wp, st in configs:
                if k % bk == 0:
                    variants[f"triton n{bn} k{bk} w{wp} s{st}"] = (
                        lambda i, bn=bn, bk=bk, wp=wp, st=st: skinny(x, ws[i], bn, bk, wp, st))
            res = {}
            for vname, fn in variants.items():
                try:
                    err = float((fn(0).float() - ref).abs().max())
                    us = graph_us(lambda fn=fn: fn(nxt()))
                    res[vname] = dict(us=round(us, 2), tbs=round(gb / us * 1e3, 2), max_err=round(err, 4))
                except Exception as e:  # keep going: one GPU run must report everything
                    res[vname] = dict(error=repr(e)[:200])
            if args.compile:
                try:
                    torch.backends.cuda.preferred_blas_library("cublas")
                    cfn = torch.compile(lambda x, w: x @ w.t(), mode="max-autotune-no-cudagraphs", dynamic=False)
                    us = graph_us(lambda: cfn(x, ws[nxt()]))
                    res["compile max-autotune"] = dict(us=round(us, 2), tbs=round(gb / us * 1e3, 2))
                except Exception as e:
                    res["compile max-autotune"] = dict(error=repr(e)[:200])
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                us = graph_us(lambda: x @ ws[nxt()].t())
                res["cublaslt x@W.t()"] = dict(us=round(us, 2), tbs=round(gb / us * 1e3, 2))
            except Exception as e:
                res["cublaslt x@W.t()"] = dict(error=repr(e)[:200])
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            best = min((v["us"], k_) for k_, v in res.items() if "us" in v)
            rows.append(dict(weight=name, n=n, k=k, batch=b, mb=round(gb * 1e3, 1), variants=res, best=best[1]))
            print(json.dumps(rows[-1]), flush=True)
        del ws, wts
    print("\nweight | batch | MB | x@W.t() us (TB/s) | x@Wt | cublaslt | best triton | best")
    for r in rows:
        v = r["variants"]
        tri = min(((x["us"], k_) for k_, x in v.items() if k_.startswith("triton") and "us" in x), default=(0, "-"))

        def f(key):
            return f"{v[key]['us']} ({v[key]['tbs']})" if "us" in v.get(key, {}) else "-"
        print(r["weight"], "|", r["batch"], "|", r["mb"], "|", f("x@W.t()"), "|", f("x@Wt"), "|",
              f("cublaslt x@W.t()"), "|", tri[1], f(tri[1]) if tri[1] != "-" else "", "|", r["best"])
    out = dict(command="python3 benchmarks/dev_skinny_gemm.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name(), rows=rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "dev_skinny_gemm.json"), "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
