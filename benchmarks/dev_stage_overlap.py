"""Experiment (GPU): does stage 1 of one query chunk overlap stage 2 of the previous chunk on a second stream?

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_stage_overlap.py [--lens 131072,65536] [--chunks 2,4,8]

The complete forward runs stage 1 (selection) over all queries, then stage 2 (sparse attention). Both stages
keep the tensor pipe about half busy (NOTES_*.md), and one SM can hold one program of each (shared memory), so
running stage 1 of chunk c + 1 beside stage 2 of chunk c might fill each other's gaps. Per length and input
pattern (the harness's `local` / `random` inputs), interleaved over rounds: the one-call complete forward
(``infllmv2_attention``, Triton), the same per query chunk on one stream, and the chunks with stage 1 on a side
stream; outputs must be identical (per-token selection and per-tile attention do not depend on the chunking
when chunks are multiples of the tiles).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_attention import make_inputs  # noqa: E402

import infllmv2  # noqa: E402
from infllmv2 import SparseConfig  # noqa: E402
from infllmv2.ops.triton import sparse_attention_triton  # noqa: E402
from infllmv2.ops.triton.selection import select_blocks_triton  # noqa: E402


def chunked_forward(q, k, v, cfg, n_chunks, side_stream=None):
    """q (n, Hq, d), k, v (n, Hkv, d), one sequence: stage 1 + 2 per query chunk; stage 1 on ``side_stream``."""
    n = q.shape[0]
    bounds = [n * c // n_chunks // 64 * 64 for c in range(n_chunks)] + [n]
    main = torch.cuda.current_stream()
    outs, keep = [], []
    for a, b in zip(bounds, bounds[1:]):
        cu_q = torch.tensor([0, b - a], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, b], dtype=torch.int32, device=q.device)
        if side_stream is None:
            idx = select_blocks_triton(q[a:b], k[:b], cfg, cu_q, cu_k, b - a, b, host_offsets=([0, b - a], [0, b]))
        else:
            side_stream.wait_stream(main)
            with torch.cuda.stream(side_stream):
                idx = select_blocks_triton(q[a:b], k[:b], cfg, cu_q, cu_k, b - a, b,
                                           host_offsets=([0, b - a], [0, b]))
            main.wait_stream(side_stream)
            keep.append(idx)
        o, _ = sparse_attention_triton(q[a:b], k[:b], v[:b], idx, cfg.block_size, cu_q, cu_k, b - a, b,
                                       q.shape[-1] ** -0.5)
        outs.append(o)
    out = torch.cat(outs)
    for t in keep:  # made on the side stream, used on this one
        t.record_stream(main)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="131072,65536")
    ap.add_argument("--patterns", default="local,random")
    ap.add_argument("--chunks", default="2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cfg = SparseConfig(dense_len=-1)
    side = torch.cuda.Stream()
    rows = []
    for n in (int(x) for x in args.lens.split(",")):
        for pattern in args.patterns.split(","):
            q, k, v = make_inputs(n, 32, 2, 128, pattern)
            q0, k0, v0 = q[0], k[0], v[0]
            variants = {"one call": lambda: infllmv2.infllmv2_attention(q, k, v, cfg, backend="triton")[0]}
            for c in (int(x) for x in args.chunks.split(",")):
                variants[f"{c} chunks"] = lambda c=c: chunked_forward(q0, k0, v0, cfg, c)
                variants[f"{c} chunks, stage 1 on a side stream"] = lambda c=c: chunked_forward(q0, k0, v0, cfg, c,
                                                                                                side)
            ref = variants["one call"]()
            row = dict(n=n, pattern=pattern, ms={}, identical={})
            for name, fn in variants.items():
                row["identical"][name] = bool(torch.equal(fn(), ref))
            for _ in range(args.reps):
                for name, fn in variants.items():
                    row["ms"].setdefault(name, []).append(round(triton.testing.do_bench(fn, warmup=3, rep=300), 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v, q0, k0, v0, ref
            torch.cuda.empty_cache()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "dev_stage_overlap.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       command=" ".join(sys.argv), rows=rows), f, indent=1)
    print("n | pattern | variant | ms (rounds) | identical")
    for r in rows:
        for name, ms in r["ms"].items():
            print(r["n"], "|", r["pattern"], "|", name, "|", ms, "|", r["identical"][name])


if __name__ == "__main__":
    main()
