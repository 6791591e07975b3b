"""Hardware counters of the InfLLM-V2 kernels (GPU, Nsight Compute), for the notes on where time goes.

    ncu --profile-from-start off --kernel-name regex:"_sparse|_score|_select|_lse" --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
        python3 benchmarks/ncu_kernels.py [--n 32768]

Runs selection, the sparse forward and backward once to autotune, then once more between
cudaProfilerStart/Stop, so Nsight Compute sees one launch of each kernel at the standard shape.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import dev_sparse_attention as D  # noqa: E402
from infllmv2.config import SparseConfig  # noqa: E402
from infllmv2.ops.triton.selection import select_blocks_triton  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--rho", type=float, default=0.97, help="0.97: local selections, 0: random")
    args = ap.parse_args()
    n, rho = args.n, args.rho
    hq, hkv, d, B = 32, 2, 128, 64
    torch.manual_seed(0)
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    bi = D.make_selection(n, n, hkv, B, 96, 1, 32, rho)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    cfg = SparseConfig(dense_len=-1)

    def step():
        select_blocks_triton(q.detach(), k.detach(), cfg, cu, cu, n, n)
        o, _ = D.SA.sparse_attention_triton(q, k, v, bi, B, cu, cu, n, n, d ** -0.5)
        o.backward(do)
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
