"""Peer baseline (GPU): fla-core's NSA selected attention against our stage 2, on the same selections.

    pip install --no-deps einops-*.whl fla_core-0.6.0-*.whl   # carried wheels (BENCHMARKS.md: "where it installs")
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_nsa.py [--lengths 32768 65536 131072] [--out-dir DIR]

Per length and input pattern (the harness's `local` / `random` inputs, standard shape): our stage 1 selects 96
blocks per token and KV head; fla's ``parallel_nsa`` (per-token selection shared by the 16 heads of a group, like
ours; block indices given, so no NSA compression branch) and our ``sparse_attention_triton`` attend to exactly
those blocks (NSA's backward takes them padded with -1 to 128 entries: it compiles only for powers of two). Times (do_bench median, at least 10 calls) of the forward and forward + backward, the output
difference, and the ratio; writes ``nsa_h200.json`` and ``nsa_h200.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_attention import bench, make_inputs  # noqa: E402

import infllmv2  # noqa: E402
from infllmv2 import SparseConfig  # noqa: E402
from infllmv2.ops import triton as tri  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--patterns", nargs="+", default=["local", "random"])
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    import fla
    from fla.ops.nsa import parallel_nsa
    cfg = SparseConfig(dense_len=-1)
    hq, hkv, d = 32, 2, 128
    rows, errors = [], []
    for n in args.lengths:
        for pattern in args.patterns:
            q, k, v = make_inputs(n, hq, hkv, d, pattern)
            idx = infllmv2.select_blocks(q, k, cfg, backend="triton")  # (Hkv, n, 96), sorted, -1 padded
            bi = idx.permute(1, 0, 2)[None].long().contiguous()  # fla: (B, T, H, S)
            row = dict(n=n, pattern=pattern, visible_blocks=cfg.budget)
            qp, kp, vp = (t[0].detach().clone().requires_grad_(True) for t in (q, k, v))
            cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
            ours = lambda: tri.sparse_attention_triton(qp, kp, vp, idx, 64, cu, cu, n, n, d ** -0.5)[0]  # noqa: E731
            qf, kf, vf = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            theirs = lambda: parallel_nsa(qf, kf, vf, block_indices=bi, block_counts=cfg.budget,  # noqa: E731
                                          block_size=64)
            # its backward compiles only for a power-of-two number of entries (tl.arange over S): the same blocks
            # padded with -1 (skipped) to 128 entries there
            bi128 = torch.nn.functional.pad(bi, (0, 128 - bi.shape[-1]), value=-1)
            theirs128 = lambda: parallel_nsa(qf, kf, vf, block_indices=bi128, block_counts=128,  # noqa: E731
                                             block_size=64)
            gr = torch.randn_like(qp)
            for name, f, fb, g in (("ours", ours, ours, gr), ("nsa", theirs, theirs128, gr[None])):
                try:
                    row[f"{name}_fwd_ms"] = round(bench(f), 3)
                    row[f"{name}_fwd_bwd_ms"] = round(bench(lambda fb=fb, g=g: fb().backward(g)), 3)
                except Exception as e:  # noqa: BLE001  (record and go on)
                    errors.append(f"{name} n={n} {pattern}: {type(e).__name__}: {str(e)[-400:]}")
                    print("ERROR", errors[-1], flush=True)
            try:
                with torch.no_grad():
                    row["max_out_diff"] = float((ours().float() - theirs()[0].float()).abs().max())
            except Exception as e:  # noqa: BLE001
                errors.append(f"compare n={n} {pattern}: {type(e).__name__}: {str(e)[:300]}")
            for kind in ("fwd", "fwd_bwd"):
                if f"nsa_{kind}_ms" in row and f"ours_{kind}_ms" in row:
                    row[f"speedup_{kind}"] = round(row[f"nsa_{kind}_ms"] / row[f"ours_{kind}_ms"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v, idx, bi, qp, kp, vp, qf, kf, vf
            torch.cuda.empty_cache()
    os.makedirs(args.out_dir, exist_ok=True)
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  fla=getattr(fla, "__version__", "?"), date=datetime.date.today().isoformat(),
                  command="python3 " + " ".join(sys.argv), rows=rows, errors=errors)
    with open(os.path.join(args.out_dir, "nsa_h200.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# fla-core NSA vs InfLLM-V2 stage 2, same selections ({report['gpu']}, torch {report['torch']}, "
             f"triton {report['triton']}, fla-core {report['fla']}, {report['date']})", "",
             f"Command: `{report['command']}`", "",
             "| n | pattern | ours fwd ms | NSA fwd ms | ours fwd+bwd ms | NSA fwd+bwd ms | NSA / ours fwd | fwd+bwd "
             "| max out diff |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(" | ".join(["", str(r["n"]), r["pattern"], *(str(r.get(k, "-")) for k in (
            "ours_fwd_ms", "nsa_fwd_ms", "ours_fwd_bwd_ms", "nsa_fwd_bwd_ms", "speedup_fwd", "speedup_fwd_bwd",
            "max_out_diff")), ""]).strip())
    lines += [""] + [f"Error: {e}" for e in errors]
    with open(os.path.join(args.out_dir, "nsa_h200.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
