"""Where the complete forward's time goes (GPU): kernels, and the gaps between them.

    python3 benchmarks/profile_forward.py [--lengths 32768 131072] [--pattern local] [--selection]

One call of ``infllmv2_attention(..., backend="triton")`` (compression + selection + sparse attention) on
the harness's inputs (``bench_attention.make_inputs``, standard shape), timed as the harness times it
(``bench_attention.bench``: the median of at least ten calls; the fourteenth session's results used
``do_bench(rep=50)``, a single call at 128K, which read 1-3 ms below the harness) and profiled: per-kernel GPU
time, the sum of all kernels, and the GPU idle time between the first kernel's start and the last one's end (host
work the GPU waits for: launches, synchronisations, small torch ops), and the host time a call takes to queue its
work. ``--selection``: the same for the selection alone, with the host functions it spends that time in.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import bench, make_inputs  # noqa: E402  (puts the repository on sys.path)

import infllmv2  # noqa: E402
from infllmv2.config import SparseConfig  # noqa: E402


def timeline(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    gpu.sort(key=lambda e: e.time_range.start)
    per = {}
    for e in gpu:
        per[e.name[:40]] = per.get(e.name[:40], 0.0) + e.time_range.elapsed_us() / 1e3
    end, gaps = None, []
    for e in gpu:  # idle stretches: a kernel starting after every earlier one has ended
        s, t = e.time_range.start, e.time_range.end
        if end is not None and s > end:
            gaps.append((round((s - end) / 1e3, 3), e.name[:40]))
        end = t if end is None else max(end, t)
    span = (end - gpu[0].time_range.start) / 1e3 if gpu else 0.0
    gaps.sort(key=lambda x: -x[0])
    syncs = [(e.name, round(e.time_range.elapsed_us() / 1e3, 3)) for e in prof.events()
             if "Synchronize" in e.name or "local_scalar_dense" in e.name]
    return dict(span_ms=round(span, 3), host_syncs=syncs, kernels_ms=round(sum(per.values()), 3),
                idle_ms=round(sum(g for g, _ in gaps), 3), largest_gaps_ms_before=gaps[:12],
                per_kernel_ms={k: round(v, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])})


def host_ms(fn, calls=20):
    """Host time a call takes to queue its work (no synchronisation inside the timed calls): where it exceeds the GPU
    time, the GPU waits for the host, and a benchmark's time is the host's. An upper bound: once the GPU falls
    behind, CUDA's launch queue fills and the host waits for it inside the launches (so does ``host_profile``)."""
    import time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round((t1 - t0) * 1e3 / calls, 3)


def host_profile(fn, calls=10, top=15):
    """The host functions a call spends its time in (cProfile, by own time)."""
    import cProfile
    import pstats
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [(f"{os.path.basename(f)}:{line}:{name}", round(tt * 1e3 / calls, 3)) for (f, line, name), (_, _, tt, _, _)
            in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--pattern", default="local")
    ap.add_argument("--stage2", action="store_true",
                    help="also stage 2 alone as the harness's sparse_fwd row times it (inputs needing grad: the "
                         "forward stores its rounding residual) and without grad")
    ap.add_argument("--grad", action="store_true",
                    help="inputs that need grad, as the harness's infllmv2_fwd row has them (a training forward)")
    ap.add_argument("--selection", action="store_true",
                    help="also the selection alone (as the harness's selection row times it), with its host profile")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    cfg = SparseConfig(dense_len=-1)
    res = {"command": "python3 benchmarks/profile_forward.py " + shlex.join(sys.argv[1:])}
    for n in args.lengths:
        q, k, v = make_inputs(n, 32, 2, 128, args.pattern)
        if args.grad:
            q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        full = lambda: infllmv2.infllmv2_attention(q, k, v, cfg, backend="triton")  # noqa: E731
        row = dict(ms=bench(full), host_ms_per_call=host_ms(full), **timeline(full))
        print(n, json.dumps(row), flush=True)
        res[n] = row
        if args.selection:
            sel = lambda: infllmv2.select_blocks(q, k, cfg, backend="triton")  # noqa: E731
            r1 = dict(ms=bench(sel), host_ms_per_call=host_ms(sel), **timeline(sel), host_profile=host_profile(sel))
            print(n, "selection", json.dumps(r1), flush=True)
            res[f"{n}_selection"] = r1
        if args.stage2:
            from infllmv2.ops.triton import sparse_attention_triton
            idx = infllmv2.select_blocks(q, k, cfg, backend="triton")
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            qp, kp, vp = (t[0].detach().clone().requires_grad_(True) for t in (q, k, v))
            sp = lambda: sparse_attention_triton(qp, kp, vp, idx, 64, cu, cu, n, n, 128 ** -0.5)[0]  # noqa: E731
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    r2 = dict(ms=bench(sp), **timeline(sp))
                print(n, f"stage2 grad={grad}", json.dumps(r2), flush=True)
                res[f"{n}_stage2_grad{int(grad)}"] = r2
    with open(os.path.join(args.out, "profile_forward.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
