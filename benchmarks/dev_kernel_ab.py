"""A/B (GPU) of two versions of the stage-2 kernel file on the harness's own inputs and stage-1 selections.

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_kernel_ab.py --old OLD/sparse_attention.py [--lens 131072,65536]

Each version of ``infllmv2/ops/triton/sparse_attention.py`` is loaded on its own (it imports only torch and
triton); the selections come from this tree's stage 1 on ``bench_attention.make_inputs``. The forward
(``_forward``) of both is timed interleaved over rounds (do_bench median, at least 10 calls a round), and the
outputs compared: a whole-harness rerun differs by 2-3% between machines, this does not.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_attention import bench, make_inputs  # noqa: E402

from infllmv2 import SparseConfig  # noqa: E402
from infllmv2.ops.triton.selection import select_blocks_triton  # noqa: E402


def load(path, name):
    """A version of sparse_attention.py as a module of the package (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location(f"infllmv2.ops.triton.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="the other version of sparse_attention.py")
    ap.add_argument("--lens", default="131072,65536")
    ap.add_argument("--patterns", default="local,random")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    here = os.path.join(os.path.dirname(__file__), "..", "infllmv2", "ops", "triton", "sparse_attention.py")
    mods = {"old": load(args.old, "sa_old"), "new": load(here, "sa_new")}
    cfg = SparseConfig(dense_len=-1)
    rows = []
    for n in (int(x) for x in args.lens.split(",")):
        for pattern in args.patterns.split(","):
            q, k, v = (x[0] for x in make_inputs(n, 32, 2, 128, pattern))
            cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
            idx = select_blocks_triton(q, k, cfg, cu, cu, n, n, host_offsets=([0, n], [0, n]))
            fns = {name: (lambda m=m: m._forward(q, k, v, idx, cfg.block_size, cu, cu, n, n, 128 ** -0.5))
                   for name, m in mods.items()}
            outs = {name: fn()[0] for name, fn in fns.items()}
            row = dict(n=n, pattern=pattern, max_out_diff=float((outs["old"].float() - outs["new"].float()).abs().max()),
                       ms={name: [] for name in fns})
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    row["ms"][name].append(round(bench(fn, rep=300), 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v, idx, outs
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "dev_kernel_ab.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), command=" ".join(sys.argv), rows=rows), f, indent=1)
    print("n | pattern | old ms (rounds) | new ms (rounds) | max out diff")
    for r in rows:
        print(r["n"], "|", r["pattern"], "|", r["ms"]["old"], "|", r["ms"]["new"], "|", r["max_out_diff"])


if __name__ == "__main__":
    main()
