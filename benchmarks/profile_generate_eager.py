"""Where an eager decode step of transformers' Llama goes (the default ``generate()`` loop, no compilation): dense
against ``infllmv2.enable``, MiniCPM4-8B shape, batch 1, one prompt length.

    python3 benchmarks/profile_generate_eager.py [--n 32768] [--steps 6]

Prefills the prompt into generate's default cache (``DynamicCache`` / ``InfLLMv2Cache``), then runs decode steps as
generate does (``model(next_token, cache=...)``), each waited for: wall time a step, and under the profiler the host
time of the top operators and the GPU kernel time a step. Prints a table; JSON to ``$OUT/profile_generate_eager.json``
(or ``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infllmv2  # noqa: E402
from bench_e2e import FULL_SHAPE  # noqa: E402
from bench_generate import TINY_CONFIG, TINY_SHAPE, build_model, cache_kwarg, prompt, sdpa_priority  # noqa: E402


def python_profile(step, steps: int, dev: str) -> dict:
    """cProfile of ``steps`` steps (top 30 functions by own time, per step) and the warnings of torch's sync debug
    mode over one step (each synchronising call, with where it came from)."""
    import cProfile
    import io
    import pstats
    import warnings
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = sorted(((tt, ct, nc, f"{os.path.basename(f)}:{ln}:{name}") for (f, ln, name), (_, nc, tt, ct, _) in
                   st.stats.items()), reverse=True)[:30]
    top = [dict(function=fn, own_ms=round(tt / steps * 1e3, 3), cum_ms=round(ct / steps * 1e3, 3),
                calls=round(nc / steps, 2)) for tt, ct, nc, fn in rows]
    syncs = []
    if dev == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            syncs.append(f"{w.filename}:{w.lineno}: {str(w.message)[:120]}")
    return {"python_top_per_step": top, "syncs_in_one_step": syncs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke test)")
    p.add_argument("--cudnn-first", action="store_true", help="decode steps under cuDNN-first SDPA priority too (as "
                   "the twenty-fourth session ran them: cuDNN builds a plan for each new key length)")
    p.add_argument("--cprofile", action="store_true", help="also a Python profile of the steps (top functions by own "
                   "time a step) and the host synchronisations of one step (torch's sync debug mode)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_generate_eager.json"))
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache
    dev, shape = ("cpu", TINY_SHAPE) if args.tiny else ("cuda", FULL_SHAPE)
    model = build_model(shape, dev, torch.float32 if args.tiny else torch.bfloat16)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    ck = cache_kwarg(model)
    res = {"command": "python3 benchmarks/profile_generate_eager.py " + " ".join(sys.argv[1:]), "n": args.n,
           "sdpa_order_in_decode": "cuDNN first" if args.cudnn_first else "default", "rows": []}
    with torch.no_grad():
        for mode in ("dense", "infllmv2"):
            if mode == "dense":
                infllmv2.disable(model)
                cache = DynamicCache()
            else:
                infllmv2.enable(model, TINY_CONFIG if args.tiny else None)
                cache = infllmv2.InfLLMv2Cache()
            ids = prompt(model, args.n, "random", dev, shape)["input_ids"]
            with sdpa_priority(dev):  # the fastest dense prefill; the decode steps in SDPA's default order
                out = model(input_ids=ids, logits_to_keep=1, **{ck: cache})
            tok = out.logits[:, -1:].argmax(-1)
            decode_priority = (lambda: sdpa_priority(dev)) if args.cudnn_first else contextlib.nullcontext

            def step():
                nonlocal tok
                with decode_priority():
                    o = model(input_ids=tok, logits_to_keep=1, **{ck: cache})
                tok = o.logits[:, -1:].argmax(-1)
                sync()
            for _ in range(3):  # warm: kernels of the new lengths compiled
                step()
            walls = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                walls.append((time.perf_counter() - t0) * 1e3)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
            if args.cprofile:
                row_extra = python_profile(step, args.steps, dev)
            ev = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA") / args.steps
            top = sorted((e for e in ev if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)[:15]
            row = {"mode": mode, "wall_ms_median": sorted(walls)[len(walls) // 2], "walls_ms": walls,
                   "gpu_kernel_ms_per_step": gpu_us / 1e3,
                   "top_host_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / args.steps, 3)
                                                for e in top},
                   "host_calls_per_step": {e.key: e.count // args.steps for e in top}}
            if args.cprofile:
                row.update(row_extra)
            res["rows"].append(row)
            print(json.dumps(row, indent=1), flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("| mode | step ms (wall) | GPU kernels ms | top host op |")
    print("| --- | --- | --- | --- |")
    for r in res["rows"]:
        k, v = next(iter(r["top_host_ops_ms_per_step"].items()))
        print(f"| {r['mode']} | {r['wall_ms_median']:.2f} | {r['gpu_kernel_ms_per_step']:.2f} | {k} {v:.2f} ms |")


if __name__ == "__main__":
    main()
