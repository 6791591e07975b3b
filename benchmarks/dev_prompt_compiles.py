"""Triton compilations that prompts of new lengths bring (GPU): one sparse prefill (no gradients) of the MiniCPM4-8B
attention shape at a first length, then at each further length, counting compilations with Triton's jit_cache_hook.

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_prompt_compiles.py [--lengths 40000 40037 45001 50000 60013]

Lengths within one power of two of key blocks share the constexpr tile widths, so any compilation after the first
length comes from integer specialisation. Prints JSON; writes ``$OUT/prompt_compiles.json`` when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

import infllmv2

COMPILED: list = []


def _count(*args, **kwargs):
    COMPILED.append(getattr(kwargs.get("fn"), "name", "?"))
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[40000, 40037, 45001, 50000, 60013])
    args = ap.parse_args()
    triton.knobs.runtime.jit_cache_hook = _count
    rows = []
    for n in args.lengths:
        q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, n, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        before = len(COMPILED)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            infllmv2.infllmv2_attention(q, k, v)
        torch.cuda.synchronize()
        rows.append({"n": n, "seconds": round(time.perf_counter() - t0, 3), "compiled": COMPILED[before:]})
        print(rows[-1])
    out = {"command": " ".join(["python3"] + sys.argv), "package": os.path.dirname(infllmv2.__file__),
           "gpu": torch.cuda.get_device_name(), "rows": rows}
    print(json.dumps(out))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prompt_compiles.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
