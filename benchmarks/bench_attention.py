"""Attention benchmark on the GPU: InfLLM-V2 (Triton) against dense SDPA (cuDNN, flash) and FlexAttention.

    python3 benchmarks/bench_attention.py                 # standard shape, 32K-128K, both patterns
    python3 benchmarks/bench_attention.py --quick         # 32K only, fewer paths

Shapes, patterns and bars: ../shared/BENCHMARKS.md. Times are medians of triton.testing.do_bench in one
process on the same inputs; every sparse row names its input pattern; `peak_extra_mib` is the
torch.cuda.max_memory_allocated delta of one call. Writes attention_h200.json, attention_h200.md and
attention_h200.png to --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infllmv2  # noqa: E402
from infllmv2 import SparseConfig  # noqa: E402

DEV = "cuda"


def bench(fn, rep=100, min_runs=10):
    """do_bench median over ``rep`` ms, and over at least ``min_runs`` calls: do_bench fits its number of calls
    to ``rep``, which left a 55 ms call at 128K one or two timed runs (runs then differed by 3%)."""
    from triton.testing import do_bench
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=max(rep, min_runs * start.elapsed_time(end)), return_mode="median")


def peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def random_walk(n, h, d, rho=0.97, chunk=256, seed=0, device=DEV):
    """BENCHMARKS.md `local` queries: q[t] = rho q[t-1] + sqrt(1 - rho^2) e[t], per head, computed in chunks."""
    g = torch.Generator(device=device).manual_seed(seed)
    e = torch.randn(n, h, d, device=device, generator=g)
    b = math.sqrt(1 - rho ** 2)
    i = torch.arange(chunk, device=device)
    A = torch.where(i[:, None] >= i[None, :], rho ** (i[:, None] - i[None, :]).clamp_min(0).float(), 0.0) * b
    pad = (-n) % chunk
    ep = torch.cat([e, e.new_zeros(pad, h, d)]).view(-1, chunk, h * d)
    within = torch.matmul(A, ep)  # (chunks, chunk, h*d): the walk started from 0 in each chunk
    decay = rho ** (i.float() + 1)
    out = torch.empty_like(within)
    prev = torch.zeros(h * d, device=device)  # the walk starts from 0
    for c in range(within.shape[0]):
        out[c] = within[c] + decay[:, None] * prev
        prev = out[c, -1]
    return out.view(-1, h, d)[:n]


def make_inputs(n, hq, hkv, d, pattern, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    k = torch.randn(1, n, hkv, d, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, n, hkv, d, device=DEV, generator=g, dtype=torch.bfloat16)
    if pattern == "random":
        q = torch.randn(1, n, hq, d, device=DEV, generator=g, dtype=torch.bfloat16)
    else:
        q = random_walk(n, hq, d, seed=seed)[None].to(torch.bfloat16)
    return q, k, v


def overlap_stats(idx, budget, block_size, samples=512):
    """Next-token Jaccard overlap and union over 16 consecutive tokens / budget, on tokens with a full budget."""
    hkv, n, _ = idx.shape
    nb = -(-n // block_size)
    start = budget * block_size
    if n - start < 32:
        return None
    g = torch.Generator(device=idx.device).manual_seed(0)
    ts = torch.randint(start, n - 16, (samples,), device=idx.device, generator=g)
    window = ts[:, None] + torch.arange(16, device=idx.device)  # (S, 16)
    sel = idx[:, window.flatten()].long().view(hkv, samples, 16, -1)
    bitmap = torch.zeros(hkv, samples, 16, nb + 1, dtype=torch.bool, device=idx.device)
    bitmap.scatter_(-1, torch.where(sel < 0, nb, sel), True)
    bitmap = bitmap[..., :nb]
    inter = (bitmap[:, :, 0] & bitmap[:, :, 1]).sum(-1).float()
    uni = (bitmap[:, :, 0] | bitmap[:, :, 1]).sum(-1).float()
    union16 = bitmap.any(dim=2).sum(-1).float() / bitmap[:, :, 0].sum(-1).float()
    return {"next_token_jaccard": round((inter / uni).mean().item(), 3), "union16_over_budget": round(
        union16.mean().item(), 2)}


def flex_block_mask(n, hq, hkv, visible_tokens, window, pattern, seed=0):
    """A BlockMask with ~visible_tokens per query (128-token blocks: sink + local window + picks per tile)."""
    from torch.nn.attention.flex_attention import BlockMask
    bs = 128
    nb = -(-n // bs)
    win = max(1, window // bs)
    picks = max(0, visible_tokens // bs - win - 1)
    g = torch.Generator(device=DEV).manual_seed(seed)
    i = torch.arange(nb, device=DEV)
    j = torch.arange(nb, device=DEV)
    forced = (j[None] == 0) | ((j[None] <= i[:, None]) & (j[None] > i[:, None] - win))
    cand = (j[None] < i[:, None]) & ~forced
    if pattern == "random":
        r = torch.rand(hkv, nb, nb, device=DEV, generator=g)
    else:  # slowly drifting preferences: neighbouring tiles pick mostly the same blocks
        base = torch.rand(hkv, 1, nb, device=DEV, generator=g)
        r = base + 0.1 * torch.rand(hkv, nb, nb, device=DEV, generator=g)
    r = torch.where(cand[None], r, -1.0)
    top = r.topk(min(picks, nb), dim=-1).indices if picks else torch.zeros(hkv, nb, 0, dtype=torch.long, device=DEV)
    sel = forced[None].expand(hkv, -1, -1).clone()
    if picks:
        sel.scatter_(-1, top, torch.gather(cand[None].expand(hkv, -1, -1), -1, top))
    full = sel & (j[None, None] < i[None, :, None])
    part = sel & (j[None, None] == i[None, :, None])

    def to_idx(m):
        num = m.sum(-1).int()
        order = torch.sort((~m).int(), dim=-1, stable=True).indices.int()
        return num, order

    fn, fi = to_idx(full)
    pn, pi = to_idx(part)
    G = hq // hkv
    rep = lambda t: t.repeat_interleave(G, dim=0)[None].contiguous()
    bm = BlockMask.from_kv_blocks(rep(pn), rep(pi), rep(fn), rep(fi), BLOCK_SIZE=bs,
                                  mask_mod=lambda b, h, q, k: q >= k, seq_lengths=(n, n))
    return bm, float(sel.sum(-1).float().mean().item() * bs)


def run(args):
    from infllmv2.ops import triton as tri
    rows = []
    errors = []
    if args.decode_only:
        args.lengths, args.patterns, args.flex_lengths = [max(args.lengths)], [], []

    def add(**row):
        row.setdefault("batch", 1)
        row.setdefault("visible_blocks", None)
        row.setdefault("pattern", None)
        rows.append(row)
        with open(os.path.join(args.out_dir, "attention_rows.jsonl"), "a") as f:  # survives a timeout
            f.write(json.dumps(row) + "\n")
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def attempt(label, fn):
        try:
            fn()
        except Exception as e:  # record and go on: one failing path must not lose the run
            msg = f"{label}: {type(e).__name__}: {str(e)[:300]}"
            errors.append(msg)
            print("ERROR", msg, traceback.format_exc()[-800:], flush=True)
        torch.cuda.empty_cache()

    shapes = [(32, 2, 128)] + ([(32, 8, 64)] if not args.quick else [])
    for (hq, hkv, d) in (shapes if not args.decode_only else []):
        std = (hq, hkv, d) == (32, 2, 128)
        lengths = args.lengths if std else [max(args.lengths)]
        for n in lengths:
            # ---------------- dense baselines
            q, k, v = make_inputs(n, hq, hkv, d, "random")
            qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
            for name, be in [("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                             ("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)]:
                if name == "flash" and not std:
                    continue

                def dense_rows(name=name, be=be):
                    with torch.nn.attention.sdpa_kernel(be):
                        f = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                        add(path=f"{name}_fwd", n=n, hq=hq, hkv=hkv, d=d, ms=bench(f), peak_extra_mib=peak_extra_mib(f))
                        if name == "flash" and n > args.flash_bwd_max:
                            return  # ~1.5 s a call at 128K: skipped to save device time (BENCHMARKS.md has it)
                        o = f()
                        gr = torch.randn_like(o)
                        fb = lambda: f().backward(gr)
                        add(path=f"{name}_fwd_bwd", n=n, hq=hq, hkv=hkv, d=d, ms=bench(fb), peak_extra_mib=None)
                attempt(f"{name} n={n}", dense_rows)
            del qt, kt, vt
            budgets = [(96, 2048)] + ([(16, 512), (32, 1024), (64, 2048)] if (std and n == max(lengths)
                                                                             and not args.quick) else [])
            for pattern in args.patterns:
                q, k, v = make_inputs(n, hq, hkv, d, pattern)
                for budget, window in budgets:
                    cfg = SparseConfig(window_size=window, topk=budget - window // 64, dense_len=-1)
                    tag = dict(n=n, hq=hq, hkv=hkv, d=d, visible_blocks=budget, pattern=pattern)

                    def sparse_rows(cfg=cfg, tag=tag):
                        sel = lambda: infllmv2.select_blocks(q, k, cfg, backend="triton")
                        idx = sel()
                        stats = overlap_stats(idx, cfg.budget, cfg.block_size)
                        add(path="selection", ms=bench(sel), peak_extra_mib=peak_extra_mib(sel), overlap=stats, **tag)
                        qp, kp, vp = (t[0].detach().clone().requires_grad_(True) for t in (q, k, v))
                        cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
                        sp = lambda: tri.sparse_attention_triton(qp, kp, vp, idx, 64, cu, cu, n, n, d ** -0.5)[0]
                        add(path="sparse_fwd", ms=bench(sp), peak_extra_mib=peak_extra_mib(sp), overlap=stats, **tag)
                        gr = torch.randn_like(qp)
                        spb = lambda: sp().backward(gr)
                        add(path="sparse_fwd_bwd", ms=bench(spb), peak_extra_mib=peak_extra_mib(spb), overlap=stats,
                            **tag)
                        qb, kb, vb = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                        full = lambda: infllmv2.infllmv2_attention(qb, kb, vb, cfg, backend="triton")
                        add(path="infllmv2_fwd", ms=bench(full), peak_extra_mib=peak_extra_mib(full), overlap=stats,
                            **tag)
                        gb = torch.randn_like(qb)
                        fullb = lambda: full().backward(gb)
                        add(path="infllmv2_fwd_bwd", ms=bench(fullb), peak_extra_mib=None, overlap=stats, **tag)
                    attempt(f"sparse n={n} {pattern} budget={budget}", sparse_rows)

                    if std and n in args.flex_lengths:
                        def flex_rows(cfg=cfg, tag=tag, window=window):
                            from torch.nn.attention.flex_attention import flex_attention
                            flex = torch.compile(flex_attention, dynamic=False)
                            bm, vis = flex_block_mask(n, hq, hkv, cfg.budget * 64, window, tag["pattern"])
                            qf, kf, vf = (t.transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
                            f = lambda: flex(qf, kf, vf, block_mask=bm, enable_gqa=True)
                            add(path="flex_fwd", ms=bench(f), peak_extra_mib=peak_extra_mib(f), flex_visible=vis, **tag)
                            gr = torch.randn_like(f())
                            add(path="flex_fwd_bwd", ms=bench(lambda: f().backward(gr)), peak_extra_mib=None,
                                flex_visible=vis, **tag)
                        attempt(f"flex n={n} {pattern} budget={budget}", flex_rows)
                del q, k, v
    # ---------------- below dense_len: the switch must cost nothing
    def short_rows():
        n = 4096
        q, k, v = make_inputs(n, 32, 2, 128, "random")
        f1 = lambda: infllmv2.infllmv2_attention(q, k, v, SparseConfig())
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        f2 = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
        add(path="infllmv2_dense_switch_fwd", n=n, hq=32, hkv=2, d=128, ms=bench(f1), peak_extra_mib=None)
        add(path="sdpa_direct_fwd", n=n, hq=32, hkv=2, d=128, ms=bench(f2), peak_extra_mib=None)
    if not args.decode_only:
        attempt("short", short_rows)
    # ---------------- decode
    if hasattr(tri, "infllmv2_decode_triton") and not args.quick:
        def decode_rows():
            n, b = max(args.lengths), 8
            hq, hkv, d = 32, 2, 128
            g = torch.Generator(device=DEV).manual_seed(3)
            kc = torch.randn(b, n, hkv, d, device=DEV, dtype=torch.bfloat16, generator=g)
            vc = torch.randn_like(kc)
            qd = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16, generator=g)
            lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
            cfg = SparseConfig(dense_len=-1)
            tag = dict(n=n, hq=hq, hkv=hkv, d=d, batch=b)
            # A serving cache keeps the compressed keys (SPEC "Decoding"); recomputing them is measured too.
            k_fine = kc.unfold(1, cfg.kernel_size, cfg.kernel_stride).mean(-1).contiguous()
            k_coarse = kc.unfold(1, cfg.coarse_kernel_size, cfg.coarse_kernel_stride).mean(-1).contiguous()
            f = lambda: tri.infllmv2_decode_triton(qd, kc, vc, lens, cfg, d ** -0.5, k_fine=k_fine, k_coarse=k_coarse)
            f_recompress = lambda: tri.infllmv2_decode_triton(qd, kc, vc, lens, cfg, d ** -0.5)
            qt, kt, vt = qd[:, :, None], kc.transpose(1, 2), vc.transpose(1, 2)
            fd = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            add(path="decode_step", ms=bench(f), peak_extra_mib=peak_extra_mib(f), visible_blocks=96, pattern="random",
                mode="eager", **tag)
            add(path="dense_decode_step", ms=bench(fd), peak_extra_mib=None, mode="eager", **tag)
            add(path="decode_step_recompress", ms=bench(f_recompress), peak_extra_mib=None, visible_blocks=96,
                pattern="random", mode="eager", **tag)
            add(path="decode_step", ms=bench(graphed(f)), peak_extra_mib=None, visible_blocks=96,
                pattern="random", mode="cuda_graph", **tag)
            add(path="dense_decode_step", ms=bench(graphed(fd)), peak_extra_mib=None, mode="cuda_graph", **tag)
        attempt("decode", decode_rows)
    return rows, errors


def graphed(fn):
    """Capture fn in a CUDA graph (as a serving loop would) and return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def ratio(rows, num, den, **match):
    def pick(path):
        for r in rows:
            if r["path"] == path and all(r.get(k) == v for k, v in match.items()):
                return r["ms"]
        return None
    a, b = pick(num), pick(den)
    return None if a is None or b is None else b / a


def write_outputs(res, out_dir):
    """attention_h200.{json,md,png} in out_dir from a result dict (gpu, torch, triton, date, command(s), rows,
    errors)."""
    rows, errors = res["rows"], res["errors"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention_h200.json"), "w") as f:
        json.dump(res, f, indent=1)
    cmds = res["command"] if isinstance(res["command"], list) else [res["command"]]
    lines = [f"# Attention benchmark ({res['gpu']}, torch {res['torch']}, triton {res['triton']}, {res['date']})", "",
             "Command: " + "; ".join(f"`{c}`" for c in cmds), "",
             "| path | n | Hq/Hkv/d | blocks | pattern | ms | peak extra MiB | overlap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pk = "" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}"
        ov = r.get("overlap") or ""
        if ov:
            ov = f"J={ov['next_token_jaccard']}, U16={ov['union16_over_budget']}x"
        path = r["path"] + (f" ({r['mode']})" if r.get("mode") else "")
        lines.append(f"| {path} | {r['n']} | {r['hq']}/{r['hkv']}/{r['d']} | {r.get('visible_blocks') or ''} | "
                     f"{r.get('pattern') or ''} | {r['ms']:.{3 if r['ms'] < 1 else 2}f} | {pk} | {ov} |")
    lines += ["", "## Ratios (speed-up = baseline ms / ours ms, same run)", "",
              "| ratio | n | pattern | value |", "| --- | --- | --- | --- |"]
    for n in sorted({r["n"] for r in rows}):
        for pat in ("local", "random"):
            m = dict(n=n, hq=32, hkv=2, d=128)
            for label, num, den, extra in [
                ("complete fwd vs cuDNN fwd", "infllmv2_fwd", "cudnn_fwd", {}),
                ("fwd+bwd vs cuDNN fwd+bwd", "infllmv2_fwd_bwd", "cudnn_fwd_bwd", {}),
                ("sparse fwd vs Flex fwd (>= 0.8 passes)", "sparse_fwd", "flex_fwd", {}),
                ("sparse fwd+bwd vs Flex fwd+bwd (>= 0.8 passes)", "sparse_fwd_bwd", "flex_fwd_bwd", {})]:
                val = None
                a = [r for r in rows if r["path"] == num and r["n"] == n and r.get("pattern") == pat
                     and r.get("visible_blocks") == 96 and (r["hq"], r["hkv"], r["d"]) == (32, 2, 128)]
                bb = [r for r in rows if r["path"] == den and r["n"] == n and (r["hq"], r["hkv"], r["d"]) == (32, 2, 128)
                      and (r.get("pattern") in (None, pat)) and r.get("visible_blocks") in (None, 96)]
                if a and bb:
                    val = bb[0]["ms"] / a[0]["ms"]
                    lines.append(f"| {label} | {n} | {pat} | {val:.2f}x |")
    for mode in ("eager", "cuda_graph"):  # one decode step, batch 8
        a = [r for r in rows if r["path"] == "decode_step" and r.get("mode") == mode]
        bb = [r for r in rows if r["path"] == "dense_decode_step" and r.get("mode") == mode]
        if a and bb:
            lines.append(f"| decode step vs dense SDPA decode, batch {a[0]['batch']}, {mode} | {a[0]['n']} | "
                         f"{a[0]['pattern']} | {bb[0]['ms'] / a[0]['ms']:.2f}x |")
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    with open(os.path.join(out_dir, "attention_h200.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, pat in zip(axes, ("local", "random")):
            for path in sorted({r["path"] for r in rows}):
                pts = sorted((r["n"], r["ms"]) for r in rows if r["path"] == path and (r["hq"], r["hkv"], r["d"]) == (
                    32, 2, 128) and r.get("pattern") in (None, pat) and r.get("visible_blocks") in (None, 96)
                    and r.get("batch", 1) == 1)
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker="o", label=path)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("ms")
            ax.set_title(f"Hq=32 Hkv=2 d=128 bf16, 96 blocks, {pat} pattern")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "attention_h200.png"), dpi=110)
    except Exception as e:  # the plot is optional, the numbers are not
        print("plot failed:", e)
    print("\n".join(lines[4:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--patterns", nargs="+", default=["local", "random"], choices=["local", "random"])
    p.add_argument("--quick", action="store_true", help="standard shape only, no budget sweep, no decode")
    p.add_argument("--flex-lengths", type=int, nargs="*", default=[32768, 65536, 131072],
                   help="lengths at which FlexAttention is measured (each compiles anew)")
    p.add_argument("--flash-bwd-max", type=int, default=131072, help="longest length for flash fwd+bwd")
    p.add_argument("--decode-only", action="store_true", help="only the decode step at the longest length")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="no GPU: rewrite json/md/png in --out-dir from earlier attention_h200.json files (several "
                        "are merged, e.g. a full run and a --decode-only run)")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    if args.replot:
        parts = [json.load(open(f)) for f in args.replot]
        res = dict(parts[0], command=[c for r in parts for c in (r["command"] if isinstance(r["command"], list)
                                                                  else [r["command"]])],
                   rows=[row for r in parts for row in r["rows"]], errors=[e for r in parts for e in r["errors"]])
        write_outputs(res, args.out_dir)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    import triton
    t0 = time.time()
    rows, errors = run(args)
    write_outputs({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": datetime.date.today().isoformat(),
                   "command": "python3 benchmarks/bench_attention.py " + " ".join(sys.argv[1:]),
                   "rows": rows, "errors": errors}, args.out_dir)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
