"""Issue 5's several-GPU check: the same ``infllmv2 train`` command on 1 GPU and under ``torchrun`` on N
GPUs (DDP and FSDP2), with the same global batch, must give the same loss curve.

    python3 scripts/multigpu.py --out results/multigpu            # on a machine with >= 2 GPUs

Each case trains from the same seed on the same rows; the N-GPU run shards each global batch's rows by
rank. In fp32 the curves agree to reduction-order noise; in bf16 autocast to bf16 noise, which grows over
the steps. Writes ``summary.json`` (per run: losses, tokens/s; per case: the largest relative loss
difference against the 1-GPU run) and ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from infllmv2.train import read_loss_log  # noqa: E402

SPARSE = ["--attention", "infllmv2", "--block-size", "64", "--kernel-size", "32", "--kernel-stride", "16",
          "--window", "512", "--topk", "16", "--dense-len", "-1"]
# name -> (arguments common to both runs, global rows per step, allowed largest relative loss difference)
CASES = {
    "dense_fp32": (["--preset", "small", "--seq-len", "2048", "--steps", "10", "--precision", "fp32",
                    "--attention", "dense"], 8, 1e-3),
    "dense_bf16": (["--preset", "small", "--seq-len", "2048", "--steps", "30", "--precision", "bf16",
                    "--attention", "dense"], 8, 2e-2),
    "infllmv2_bf16_8k": (["--preset", "small", "--seq-len", "8192", "--steps", "20", "--precision", "bf16",
                          *SPARSE], 2, 2e-2),
}


def _train(out: str, common: list, nproc: int, micro_batch: int, parallel: str, port: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["--out", out, "--micro-batch", str(micro_batch), "--save-every", "0", "--no-progress", "--lr", "1e-3",
            "--warmup", "5", *common]
    if nproc == 1:
        cmd = [sys.executable, "-m", "infllmv2.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(port), "-m", "infllmv2.train", "--parallel", parallel, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    rows = read_loss_log(os.path.join(out, "loss.jsonl"))
    # tokens/s over the steps after the first (the first holds compilation and warm-up)
    steady = (rows[-1]["tokens"] - rows[0]["tokens"]) / max(rows[-1]["time"] - rows[0]["time"], 1e-9)
    return {"command": " ".join(["python3" if c == sys.executable else c for c in cmd]),
            "losses": [r["loss"] for r in rows], "tokens_per_s": round(steady), "wall_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/multigpu")
    p.add_argument("--nproc", type=int, default=2, help="GPUs of the distributed runs")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--parallel", nargs="+", default=["fsdp", "ddp"], choices=["fsdp", "ddp"])
    a = p.parse_args(argv)
    if a.nproc < 2:
        p.error(f"--nproc must be >= 2, got {a.nproc}")
    import torch
    if torch.cuda.device_count() < a.nproc:
        p.error(f"--nproc {a.nproc} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    os.makedirs(a.out, exist_ok=True)
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "nproc": a.nproc,
               "command": "python3 scripts/multigpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "cases": {}}
    lines = ["| case | run | final loss | max rel. loss diff vs 1 GPU | allowed | tokens/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    port = 29600
    ok = True
    for name in a.cases:
        common, rows, tol = CASES[name]
        if rows % a.nproc:
            p.error(f"case {name}: {rows} rows per step do not split over --nproc {a.nproc}")
        runs = {"1gpu": _train(os.path.join(a.out, name, "1gpu"), common, 1, rows, "ddp", port)}
        for par in a.parallel:
            port += 1
            runs[f"{a.nproc}gpu_{par}"] = _train(os.path.join(a.out, name, f"{a.nproc}gpu_{par}"), common, a.nproc,
                                                 rows // a.nproc, par, port)
        ref = runs["1gpu"]["losses"]
        for key, run in runs.items():
            diff = max(abs(x - y) / abs(y) for x, y in zip(run["losses"], ref))
            run["max_rel_loss_diff"] = diff
            run["match"] = len(run["losses"]) == len(ref) and diff <= tol
            ok &= run["match"]
            lines.append(f"| {name} | {key} | {run['losses'][-1]:.4f} | {diff:.2e} | {tol:.0e} | "
                         f"{run['tokens_per_s']} |")
        summary["cases"][name] = {"args": common, "global_rows": rows, "tolerance": tol, "runs": runs}
        print(lines[-len(runs):], flush=True)
    summary["all_match"] = ok
    with open(os.path.join(a.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(a.out, "summary.md"), "w") as fh:
        fh.write(f"# {a.nproc} GPUs vs 1 ({summary['gpu']}, torch {summary['torch']})\n\n"
                 f"`{summary['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("all match:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
