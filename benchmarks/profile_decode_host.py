"""Host time of one eager decode call, against its GPU time and against dense SDPA's (H200).

    python3 benchmarks/profile_decode_host.py [--lengths 32768 131072] [--calls 100]

An eager decode step (transformers' default generate loop) is bound by the host: the GPU works a few milliseconds
of a step that takes tens (``profile_generate_eager.py``). This times, for one MiniCPM4-8B-shaped layer (32 query /
2 KV heads, head dim 128, batch 1, a bf16 cache of n tokens with its compressed keys given, the default config):

* ``decode``: ``infllmv2_decode_triton`` as an eager caller runs it;
* ``decode_custom_op``: the same through its ``torch.library`` custom op (what every eager call paid before the
  op was kept for torch.compile only); ``decode_custom_op_triton_cdiv`` also with ``triton.cdiv`` on the host, as
  the code was before;
* ``dense_sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` in SDPA's default order;
* ``one_launch``: the decode chain's smallest kernel (the combine) launched alone: one Triton launch's host cost.

Method: a long ``torch.cuda._sleep`` first, so that the host issues ``--calls`` calls while the GPU is busy: the
host time a call is the issuing time over the calls; the GPU time a call is the CUDA-event time from the end of the
sleep to the end of the last call, over the calls (the GPU runs them back to back, the host being ahead). Prints a
table and JSON, and writes ``$OUT/profile_decode_host.json`` when OUT is set.

``--mock-launches`` runs on the CPU with every Triton launch replaced by a no-op: the host time of our own Python
alone (the decode variants only; no GPU time, no outputs to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infllmv2.ops.triton.decode as decode_mod  # noqa: E402
import infllmv2.ops.triton.selection as selection_mod  # noqa: E402
from infllmv2 import SparseConfig  # noqa: E402
from infllmv2.ops.triton import infllmv2_decode_triton  # noqa: E402


def timed(fn, calls: int) -> dict:
    """Host and GPU microseconds a call, the host kept ahead of the GPU by a sleep kernel."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # --mock-launches: the host's time alone
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return dict(host_us=round((time.perf_counter() - t0) / calls * 1e6, 2), gpu_us=None)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e9))  # ~1 s at the H200's clock: longer than the host needs to issue the calls
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) * 1e3 / calls
    return dict(host_us=round(host, 2), gpu_us=round(gpu, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--calls", type=int, default=100, help="calls a measurement (host ahead of the GPU)")
    ap.add_argument("--mock-launches", action="store_true", help="CPU: Triton launches as no-ops (our Python alone)")
    args = ap.parse_args()
    if args.calls < 1 or min(args.lengths) < 1:
        raise SystemExit("--calls and --lengths must be positive")
    import triton
    import torch.nn.functional as F

    if args.mock_launches:
        if torch.cuda.is_available():
            raise SystemExit("--mock-launches is for a machine without a GPU")
        if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels would run, interpreted, instead of the no-op
            raise SystemExit("--mock-launches needs TRITON_INTERPRET unset")
        import triton.runtime.jit
        triton.runtime.jit.JITFunction.run = lambda self, *a, **k: None
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --mock-launches)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SparseConfig()
    hq, hkv, d = 32, 2, 128
    rows = []
    for n in args.lengths:
        g = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
        lens = torch.full((1,), n, dtype=torch.int32, device=dev)
        kf = torch.randn(1, (n - cfg.kernel_size) // cfg.kernel_stride + 1, hkv, d, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(1, (n - cfg.coarse_kernel_size) // cfg.coarse_kernel_stride + 1, hkv, d, device=dev,
                         dtype=torch.bfloat16)
        scale = d ** -0.5

        def decode():
            return infllmv2_decode_triton(q, k, v, lens, cfg, scale, k_fine=kf, k_coarse=kc)

        def decode_custom_op():
            return decode_mod._decode_op(q, k, v, lens, None, kf, kc, scale, *selection_mod.config_args(cfg))

        qd, kd, vd = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)  # (b, H, s, d) as transformers passes

        def dense_sdpa():
            return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

        n_split = 8
        o_part = torch.zeros((1, hq, n_split, d), dtype=torch.float32, device=dev)
        lse_part = torch.zeros((1, hq, n_split), dtype=torch.float32, device=dev)
        out = torch.empty_like(q)

        def one_launch():
            decode_mod._decode_combine_kernel[(1, hq)](
                o_part, lse_part, out, n_split, d, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), SPLIT_P=n_split, BLOCK_D=d,
                num_warps=decode_mod._DECODE_COMBINE_WARPS)

        variants = dict(decode=decode) if args.mock_launches else dict(decode=decode, dense_sdpa=dense_sdpa,
                                                                        one_launch=one_launch)
        for name, fn in variants.items():
            rows.append(dict(n=n, variant=name, **timed(fn, args.calls)))
        # the code as it was: the custom op on every call, triton.cdiv on the host
        saved = selection_mod.cdiv, decode_mod.cdiv
        selection_mod.cdiv = decode_mod.cdiv = triton.cdiv
        try:
            rows.append(dict(n=n, variant="decode_custom_op_triton_cdiv", **timed(decode_custom_op, args.calls)))
        finally:
            selection_mod.cdiv, decode_mod.cdiv = saved
        rows.append(dict(n=n, variant="decode_custom_op", **timed(decode_custom_op, args.calls)))
        if not args.mock_launches:
            torch.testing.assert_close(decode(), decode_custom_op(), rtol=0, atol=0)  # the same computation
    res = dict(command="python3 benchmarks/profile_decode_host.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, cpu=platform.processor()
               or platform.machine(), torch=torch.__version__, triton=triton.__version__, rows=rows)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_decode_host.json"), "w") as f:
            json.dump(res, f, indent=1)
    print("\n| n | variant | host us | GPU us |\n| --- | --- | --- | --- |")
    for r in rows:
        gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
        print(f"| {r['n']} | {r['variant']} | {r['host_us']:.1f} | {gpu} |")


if __name__ == "__main__":
    main()
