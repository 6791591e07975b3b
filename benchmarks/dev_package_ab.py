"""Interleaved A/B (GPU) of this tree's ``infllmv2`` against another copy of the package, on the attention call alone.

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_package_ab.py --other OLD_DIR/infllmv2 [--lens 131072,32768] [--rounds 3]

The other copy is imported under another name (the package imports itself only relatively), so both run in one
process on the same inputs (``bench_attention.make_inputs``, MiniCPM4-8B's attention shape, default config): per
length, forward and forward + backward of ``infllmv2_attention`` are timed in turn over rounds (do_bench medians),
and the outputs compared. For changes that touch several kernel files at once (``dev_kernel_ab.py`` swaps one).
Writes ``package_ab.json`` under --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_attention import bench, make_inputs  # noqa: E402

import infllmv2  # noqa: E402


def load_package(path: str, name: str):
    """The package at ``path`` (a directory with __init__.py) imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def time_calls(pkg, q, k, v, grad) -> dict:
    """do_bench medians (ms) of one package's forward and forward + backward."""
    with torch.no_grad():
        forward = bench(lambda: pkg.infllmv2_attention(q, k, v))
    return {"forward": forward,
            "forward_backward": bench(lambda: torch.autograd.grad(pkg.infllmv2_attention(q, k, v), (q, k, v), grad))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="directory of the other infllmv2 package")
    ap.add_argument("--lens", default="131072,32768")
    ap.add_argument("--pattern", default="random", choices=["random", "local"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.other, "__init__.py")):
        raise SystemExit(f"--other: no package at {args.other}")
    packages = {"this": infllmv2, "other": load_package(os.path.abspath(args.other), "infllmv2_other")}
    rows = []
    for n in [int(x) for x in args.lens.split(",")]:
        q, k, v = make_inputs(n, 32, 2, 128, args.pattern)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad = torch.randn_like(q)
        outs, times = {}, {name: {"forward": [], "forward_backward": []} for name in packages}
        for name, pkg in packages.items():
            outs[name] = pkg.infllmv2_attention(q, k, v).detach()
        diff = (outs["this"].float() - outs["other"].float()).abs().max().item()
        for _ in range(args.rounds):
            for name, pkg in packages.items():
                for part, ms in time_calls(pkg, q, k, v, grad).items():
                    times[name][part].append(ms)
        for name in packages:
            row = {"seqlen": n, "pattern": args.pattern, "package": name, "max_abs_diff_vs_other": diff}
            row.update({f"{part}_ms": round(sorted(ts)[len(ts) // 2], 3) for part, ts in times[name].items()})
            rows.append(row)
        del q, k, v, grad
        torch.cuda.empty_cache()
    result = {"command": " ".join(["python3"] + sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "package_ab.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("| seqlen | package | forward ms | fwd+bwd ms | max abs diff |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seqlen']} | {r['package']} | {r['forward_ms']} | {r['forward_backward_ms']} | "
              f"{r['max_abs_diff_vs_other']:.2e} |")


if __name__ == "__main__":
    main()
