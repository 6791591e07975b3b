"""Steps of the top-k's threshold search, offline (CPU, no GPU): settings of ``selection._TOPK_SEARCH`` compared.

    python benchmarks/topk_search_steps.py [--n 131072] [--tokens 1024] [--patterns local,random]
        [--settings "(4,0.2,6),(2,0.0,1073741824)"] [--seeded 19,20,21,22]

The Triton top-k (``selection._select_kernel``) finds, per (token, KV head) row, a threshold on the fp32 bit patterns
of the candidate block scores by a search whose every step is a reduction over the row (a count; from step
SEARCH_TIGHT on also the nearest keys above and below), so its time follows the number of steps. This script
builds real rows (the reference's pooled stage-1 scores, ``infllmv2.ops.naive``, of the last ``--tokens`` tokens of
an ``--n``-token sequence with the benchmark's inputs: `local` random-walk or `random` queries, standard shape) and
runs ``search`` below, a NumPy transcription of the kernel's loop, for each setting: steps per row (mean, p90, max)
and how many rows have a tie at their threshold. ``search`` also returns the threshold, which
``tests/test_benchmarks.py`` checks against a sort.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import random_walk  # noqa: E402  (the benchmark's `local` queries, here on the CPU)
from infllmv2.config import SparseConfig  # noqa: E402
from infllmv2.ops import naive  # noqa: E402


def search(key: np.ndarray, need: int, bisect: int, clamp: float, tight: int, start=None):
    """The kernel's search on one row. key: int64 bit patterns of the candidates' scores (>= 0), -1 elsewhere.
    Returns (thr, count(key >= thr), count(key > thr), steps): the selection is every key > thr plus the lowest-index
    keys == thr up to `need`. ``start``: a bracket (lo, hi, count(key >= lo), count(key >= hi)) to begin from instead
    of the row's [min, max + 1] (``search_seeded``)."""
    cand = key >= 0
    n_cand = int(cand.sum())
    if start is not None:
        lo, hi, cnt_lo, cnt_hi = start
    else:
        kmax = int(key.max())
        lo = int(key[cand].min()) if need > 0 else kmax + 1
        hi = kmax + 1
        cnt_lo, cnt_hi = (n_cand if need > 0 else 0), 0
    step = 0
    while not (cnt_lo == need or hi - lo <= 1):
        span = hi - lo
        if step % bisect == bisect - 1:
            off = span // 2
        else:
            frac = np.float32(cnt_lo - need) / np.float32(max(cnt_lo - cnt_hi, 1))
            frac = min(max(frac, np.float32(clamp)), np.float32(1.0 - clamp))
            off = int(np.float32(span) * frac)
        mid = lo + min(max(off, 1), span - 1)
        ge = key >= mid
        cnt = int(ge.sum())
        if cnt >= need:
            lo = int(key[ge].min()) if step >= tight else mid
            cnt_lo = cnt
        else:
            hi = int(key[~ge].max()) + 1 if step >= tight else mid
            cnt_hi = cnt
        step += 1
    return lo, cnt_lo, cnt_hi, step


def reductions(steps: int, tight: int) -> int:
    """Row reductions of a search from [min, max + 1]: the min and the max, one count a step, and from step `tight` on
    the two snapping reductions (the nearest keys above and below)."""
    return 2 + steps + 2 * max(0, steps - tight)


def search_seeded(key: np.ndarray, need: int, guess, delta: int, bisect: int, clamp: float, tight: int):
    """A search a program running over consecutive rows could do: begin from the bracket [guess - delta, guess +
    delta) around the previous row's threshold (two counts), widened to the row's min or max (one reduction more) on
    the side the threshold fell outside. Returns (thr, count >=, count >, reductions). Built into the kernel in commit
    b8bd9f7 (the two counts packed into one reduction, programs over 8 rows in turn) and reverted: no faster on the
    H200 (benchmarks/NOTES_selection.md, "Twentieth session")."""
    cand = key >= 0
    if need <= 0 or guess is None:
        thr, ge, gt, steps = search(key, need, bisect, clamp, tight)
        return thr, ge, gt, reductions(steps, tight)
    lo, hi = guess - delta, guess + delta
    cnt_lo, cnt_hi = int((key >= lo).sum()), int((key >= hi).sum())
    red = 2
    if cnt_lo < need:  # the threshold lies below the bracket
        lo, hi, cnt_lo, cnt_hi, red = int(key[cand].min()), lo, int(cand.sum()), cnt_lo, red + 1
    elif cnt_hi >= need:  # ... above it
        lo, hi, cnt_lo, cnt_hi, red = hi, int(key.max()) + 1, cnt_hi, 0, red + 1
    thr, ge, gt, steps = search(key, need, bisect, clamp, tight, start=(lo, hi, cnt_lo, cnt_hi))
    return thr, ge, gt, red + steps + 2 * max(0, steps - tight)


def benchmark_inputs(n, tokens, pattern, hq=32, hkv=2, d=128, seed=0):
    """The last `tokens` queries and all n keys (bf16-rounded, fp32) of the benchmark's `local` / `random` inputs."""
    g = torch.Generator().manual_seed(seed + 1)
    k = torch.randn(n, hkv, d, generator=g).bfloat16().float()
    q = (torch.randn(tokens, hq, d, generator=g) if pattern == "random"
         else random_walk(n, hq, d, seed=seed, device="cpu")[n - tokens:]).bfloat16().float()
    return q, k


def pooled_scores(q, k, cfg):
    """The reference's pooled block scores (Hkv, tokens, nb) of queries q, the last of the keys k, computed without
    the reference's (tokens, nb, n1) pooling mask, which does not fit in memory at 128K."""
    n, tokens, d = k.shape[0], q.shape[0], q.shape[-1]
    hkv, hq = k.shape[1], q.shape[1]
    pos = torch.arange(n - tokens, n)
    scale = d ** -0.5
    k1 = naive.compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    qg = q.view(tokens, hkv, hq // hkv, d)
    l1 = scale * torch.einsum("nhgd,jhd->hgnj", qg, k1)
    v1 = naive._visible(pos, k1.shape[0], cfg.kernel_size, cfg.kernel_stride)
    lse = naive._masked_lse(l1, v1)
    if cfg.lse_approx:  # as naive.stage1_probabilities
        k2 = naive.compress_keys(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
        l2 = scale * torch.einsum("nhgd,jhd->hgnj", qg, k2)
        v2 = naive._visible(pos, k2.shape[0], cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
        lse = torch.where(v2.any(-1)[None, None, :], naive._masked_lse(l2, v2), lse)
    s = torch.exp(l1 - lse[..., None]).masked_fill(~v1, 0.0).sum(1)  # (Hkv, tokens, n1)
    del l1
    # max pooling onto blocks: block b takes windows j with j * stride < (b + 1) * B and j * stride + kernel > b * B
    B, lc, sc = cfg.block_size, cfg.kernel_size, cfg.kernel_stride
    nb, n1 = -(-n // B), s.shape[-1]
    b = torch.arange(nb)
    j0 = torch.clamp(-((lc - 1 - b * B) // sc), min=0)  # ceil((b * B - lc + 1) / sc)
    j1 = torch.clamp(((b + 1) * B - 1) // sc, max=n1 - 1)
    w = int((j1 - j0).max()) + 1
    idx = j0[:, None] + torch.arange(w)
    ok = idx <= j1[:, None]
    return s[..., idx.clamp(max=n1 - 1)].masked_fill(~ok, 0.0).amax(-1)


def search_rows(pooled, n, cfg):
    """(keys, needs): the search's rows, as the top-k kernel sees them, from pooled scores (Hkv, tokens, nb) of the
    last tokens of an n-key sequence."""
    hkv, tokens, nb = pooled.shape
    B = cfg.block_size
    keys, needs = [], []
    for h in range(hkv):
        for r in range(tokens):
            bq = (n - tokens + r) // B
            cand = np.zeros(nb, bool)
            cand[cfg.init_blocks:max(cfg.init_blocks, bq - cfg.local_blocks)] = True
            keys.append(np.where(cand, pooled[h, r].numpy().astype(np.float32).view(np.int32), -1).astype(np.int64))
            n_forced = min(cfg.init_blocks, bq + 1) + max(0, bq - max(bq - cfg.local_blocks, cfg.init_blocks) + 1)
            needs.append(min(cfg.budget - n_forced, int(cand.sum())))
    return keys, needs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=131072, help="sequence length (keys)")
    ap.add_argument("--tokens", type=int, default=1024, help="rows: the last TOKENS queries x the KV heads")
    ap.add_argument("--patterns", default="local,random")
    ap.add_argument("--settings", default="(4,0.2,6),(4,0.2,4),(2,0.0,1073741824)",
                    help="(SEARCH_BISECT, SEARCH_CLAMP, SEARCH_TIGHT) tuples; (2,0.0,1073741824) is the old search")
    ap.add_argument("--seeded", default="", help="also the search seeded by the previous row's threshold, with "
                    "brackets of +- 2^D bit patterns for these D, e.g. 19,20,21,22 (under the first setting)")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    if not 0 < args.tokens <= args.n:
        raise SystemExit(f"--tokens must be in 1..--n (got {args.tokens}, --n {args.n})")
    settings = list(ast.literal_eval(f"[{args.settings}]"))
    out = dict(command="python benchmarks/topk_search_steps.py " + " ".join(sys.argv[1:]), rows=[])
    print("| pattern | setting | steps mean | p90 | max | row reductions mean | rows | tied at the threshold |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for pattern in args.patterns.split(","):
        t0 = time.time()
        cfg = SparseConfig(dense_len=-1)
        q, k = benchmark_inputs(args.n, args.tokens, pattern)
        keys, needs = search_rows(pooled_scores(q, k, cfg), args.n, cfg)
        ties = 0  # rows whose need-th and (need + 1)-th largest candidate keys are equal
        for k, nd in zip(keys, needs):
            v = np.sort(k[k >= 0])[::-1]
            ties += int(0 < nd < len(v) and v[nd - 1] == v[nd])
        for st in settings:
            steps = np.array([search(k, nd, *st)[3] for k, nd in zip(keys, needs)])
            red = np.array([reductions(x, st[2]) for x in steps])
            row = dict(pattern=pattern, setting=list(st), mean=round(float(steps.mean()), 2),
                       p90=float(np.percentile(steps, 90)), max=int(steps.max()),
                       reductions=round(float(red.mean()), 2), rows=len(steps), tied=ties)
            out["rows"].append(row)
            print(f"| {pattern} | {st} | {row['mean']} | {row['p90']:.0f} | {row['max']} | {row['reductions']} | "
                  f"{len(steps)} | {ties} |", flush=True)
        for d in (int(x) for x in args.seeded.split(",") if x):
            red, prev = [], None
            for i, (k, nd) in enumerate(zip(keys, needs)):
                if i % args.tokens == 0:  # a new KV head: no previous row
                    prev = None
                thr, _, _, r = search_seeded(k, nd, prev, 1 << d, *settings[0])
                red.append(r)
                prev = thr
            row = dict(pattern=pattern, setting=list(settings[0]), seeded_delta_log2=d,
                       reductions=round(float(np.mean(red)), 2), rows=len(red), tied=ties)
            out["rows"].append(row)
            print(f"| {pattern} | {settings[0]} seeded +- 2^{d} | | | | {row['reductions']} | {len(red)} | {ties} |",
                  flush=True)
        print(f"<!-- {pattern}: {time.time() - t0:.0f} s -->")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
