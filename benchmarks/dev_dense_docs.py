"""Dense attention of short documents of new lengths (GPU): what a packed fine-tuning batch's dense documents cost.

    python3 benchmarks/dev_dense_docs.py [--docs 24] [--max-len 4096] [--mode train|prefill|decode]

Each packed row of `infllmv2 train --buckets paper` brings documents of lengths never seen before, and the documents
below ``dense_len`` run dense. This times forward + backward of one document at a time through SDPA, for lengths not
seen before in the process and then for the same lengths again, under SDPA's default backend order and with each
backend forced: a backend that builds a plan per shape (cuDNN) pays it at every new length. Shapes: SmolLM2-135M's
(9 / 3 heads, d 64) and MiniCPM4-8B's (32 / 2, d 128), bf16. ``--mode prefill``: forward only (a prompt of a new
length below ``dense_len``); ``--mode decode``: one query against keys of a new length, forward only (a decode step
below ``dense_len``: every step's key length is new). Prints a table; JSON to ``$OUT/dev_dense_docs.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"smollm2": (9, 3, 64), "minicpm4": (32, 2, 128)}
BACKENDS = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION]}


def one_doc(n, hq, hkv, d, backends, mode="train"):
    grad, decode = mode == "train", mode == "decode"
    q = torch.randn(1, hq, 1 if decode else n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=not decode, enable_gqa=True)
    if grad:
        out.sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=24, help="new lengths a variant")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--mode", choices=["train", "prefill", "decode"], default="train", help="see the module doc")
    args = p.parse_args()
    rng = random.Random(0)
    used = set()
    rows = []
    for shape, (hq, hkv, d) in SHAPES.items():
        one_doc(1000, hq, hkv, d, None)  # the first call's set-up, outside every row
        for name, backends in BACKENDS.items():
            lengths = []
            while len(lengths) < args.docs:  # lengths no variant has used: new shapes for every backend
                n = rng.randrange(64, args.max_len)
                if n not in used:
                    used.add(n)
                    lengths.append(n)
            try:
                new = [one_doc(n, hq, hkv, d, backends, args.mode) for n in lengths]
                again = [one_doc(n, hq, hkv, d, backends, args.mode) for n in lengths]
            except RuntimeError as e:  # a forced backend that does not take the shape
                rows.append(dict(shape=shape, backend=name, error=str(e).splitlines()[0][:200]))
                continue
            rows.append(dict(shape=shape, backend=name, docs=len(lengths),
                             new_ms_median=round(1e3 * statistics.median(new), 3),
                             new_ms_sum=round(1e3 * sum(new), 1),
                             again_ms_median=round(1e3 * statistics.median(again), 3),
                             again_ms_sum=round(1e3 * sum(again), 1)))
    out = dict(command="python3 benchmarks/dev_dense_docs.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    what = {"train": "fwd+bwd", "prefill": "fwd", "decode": "fwd, one query,"}[args.mode]
    print(f"| shape | backend | docs | {what} a new length, median ms (sum) | same lengths again, median ms (sum) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['backend']} | - | {r['error']} | |")
        else:
            print(f"| {r['shape']} | {r['backend']} | {r['docs']} | {r['new_ms_median']} ({r['new_ms_sum']}) | "
                  f"{r['again_ms_median']} ({r['again_ms_sum']}) |")
    with open(os.path.join(os.environ.get("OUT", "."), "dev_dense_docs.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
