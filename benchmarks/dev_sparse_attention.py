"""Development benchmark of the Triton stage-2 sparse attention (GPU): correctness + timings in one run.

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_sparse_attention.py [--lens 32768,65536,131072] [--flex] [--out DIR]

Selections are synthetic (no stage 1 needed): per token and KV head, forced blocks (init + local +
current, as SPEC) plus the top scoring past blocks of a score field that follows an AR(1) walk along
the tokens, ``s[t] = rho s[t-1] + sqrt(1-rho^2) e[t]``: rho = 0.97 gives next-token Jaccard ~0.75
(`local`), rho = 0 independent picks (`random`). Measured overlap statistics are printed.
Baselines in the same run: SDPA cuDNN dense causal (enable_gqa), optionally FlexAttention with a
BlockMask of the same visible tokens (per 128-query tile).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infllmv2.ops.triton import sparse_attention as SA  # noqa: E402
sparse_attention_triton = SA.sparse_attention_triton

DEV = os.environ.get("DEV_DEVICE", "cuda")


# ------------------------------------------------------------------ synthetic selections
def make_selection(n_q, n_k, hkv, B, budget, init, local, rho, seed=0):
    """(hkv, n_q, budget) int32 sorted, -1 padded; queries are the last n_q of n_k positions."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nb = -(-n_k // B)
    M = hkv * nb
    L = 256
    nc = -(-n_q // L)
    e = torch.randn(nc * L, M, device=DEV, generator=g)
    if rho > 0:
        c = math.sqrt(1 - rho * rho)
        i = torch.arange(L, device=DEV)
        W = torch.where(i[:, None] >= i[None, :], rho ** (i[:, None] - i[None, :]).clamp(min=0).float(), 0.0)
        local_part = torch.matmul(W, e.view(nc, L, M)) * c  # (nc, L, M)
        del e
        powers = rho ** (i + 1).float()  # (L,)
        prev = torch.randn(M, device=DEV, generator=g)
        ends = []
        for ci in range(nc):
            ends.append(prev)
            prev = local_part[ci, -1] + rho ** L * prev
        carry = torch.stack(ends)  # (nc, M): state before chunk ci
        s = local_part + powers[None, :, None] * carry[:, None, :]
        del local_part
    else:
        s = e.view(nc, L, M)
    s = s.view(nc * L, hkv, nb)[:n_q].permute(1, 0, 2)  # (hkv, n_q, nb) view
    t = torch.arange(n_k - n_q, n_k, device=DEV)
    bq = t // B
    b = torch.arange(nb, device=DEV)
    cand = (b[None, :] >= init) & (b[None, :] < (bq[:, None] - local))  # (n_q, nb)
    free = budget - init - local - 1
    out = []
    for h in range(hkv):  # per head keeps the peak memory at one (n_q, nb) score matrix
        sh = s[h].masked_fill(~cand, float("-inf"))
        vals, idx = torch.topk(sh, min(free, nb), dim=-1)
        idx = torch.where(vals == float("-inf"), -1, idx)
        forced = torch.cat([torch.arange(init, device=DEV)[None, :].expand(n_q, -1),
                            bq[:, None] - local + torch.arange(local + 1, device=DEV)[None, :]], 1)
        forced = torch.where((forced >= 0) & (forced <= bq[:, None]), forced, -1)
        forced[:, init:] = torch.where(forced[:, init:] < init, -1, forced[:, init:])  # no duplicates with init
        allb = torch.cat([forced, idx], 1)
        allb = torch.where(allb < 0, 1 << 30, allb)
        allb = torch.sort(allb, -1).values
        allb = torch.where(allb == 1 << 30, -1, allb)[:, :budget]
        if allb.shape[1] < budget:
            allb = torch.cat([allb, allb.new_full((n_q, budget - allb.shape[1]), -1)], 1)
        out.append(allb.to(torch.int32))
        del sh
    return torch.stack(out).contiguous()


def overlap_stats(bi, nb, tokens=16, samples=2048):
    """Next-token Jaccard and union of `tokens` consecutive tokens / budget, on sampled positions."""
    hkv, n, budget = bi.shape
    gen = torch.Generator(device=DEV).manual_seed(1)
    st = torch.randint(n // 2, n - tokens - 1, (samples,), device=DEV, generator=gen)
    bm = torch.zeros(samples, tokens + 1, nb + 1, dtype=torch.bool, device=DEV)
    rows = bi[0][st[:, None] + torch.arange(tokens + 1, device=DEV)[None, :]].long()  # (S, T+1, budget)
    bm.scatter_(-1, torch.where(rows < 0, nb, rows), True)
    bm = bm[..., :nb]
    inter = (bm[:, 0] & bm[:, 1]).sum(-1).float()
    uni = (bm[:, 0] | bm[:, 1]).sum(-1).float()
    jac = (inter / uni).mean().item()
    u = bm[:, :tokens].any(1).sum(-1).float().mean().item()
    per = bm[:, 0].sum(-1).float().mean().item()
    return dict(jaccard_next=round(jac, 3), union16_over_budget=round(u / per, 2), visible_blocks=per)


# ------------------------------------------------------------------ reference (fp32, chunked queries)
def reference_chunked(q, k, v, bi, B, scale, dout, chunk=512):
    """One sequence. Returns out, lse, dq, dk, dv in fp32 without an n x n matrix."""
    n, hq, d = q.shape
    nk, hkv, _ = k.shape
    G = hq // hkv
    nb = -(-nk // B)
    kf = k.float().detach().requires_grad_(True)
    vf = v.float().detach().requires_grad_(True)
    outs, lses, dqs = [], [], []
    for s0 in range(0, n, chunk):
        e0 = min(n, s0 + chunk)
        qc = q[s0:e0].float().detach().requires_grad_(True)
        idx = bi[:, s0:e0].long()
        blocks = torch.zeros(hkv, e0 - s0, nb + 1, dtype=torch.bool, device=q.device)
        blocks.scatter_(-1, torch.where(idx < 0, nb, idx.clamp(max=nb)), True)
        allowed = blocks[..., :nb].repeat_interleave(B, -1)[..., :nk]
        pos = torch.arange(nk - n + s0, nk - n + e0, device=q.device)
        mask = allowed & (torch.arange(nk, device=q.device)[None, :] <= pos[:, None])[None]
        logits = scale * torch.einsum("nhgd,uhd->hgnu", qc.view(-1, hkv, G, d), kf)
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        lse = torch.logsumexp(logits, -1)
        p = torch.exp(logits - lse[..., None])
        o = torch.einsum("hgnu,uhd->nhgd", p, vf).reshape(-1, hq, d)
        o.backward(dout[s0:e0].float())
        outs.append(o.detach())
        lses.append(lse.detach().reshape(hq, -1))
        dqs.append(qc.grad)
        del logits, p, mask, allowed, blocks
    return torch.cat(outs), torch.cat(lses, 1), torch.cat(dqs), kf.grad, vf.grad


def make_case(lens_q, lens_k, hq, hkv, d, B, budget, init, local, rho, dtype=torch.bfloat16):
    """A packed varlen batch (sequence i: the last lens_q[i] of lens_k[i] positions) with synthetic selections:
    q, k, v, do, block_indices, cu_q, cu_k."""
    torch.manual_seed(0)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, device=DEV, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=DEV, dtype=dtype)
    v = torch.randn(tk, hkv, d, device=DEV, dtype=dtype)
    do = torch.randn(tq, hq, d, device=DEV, dtype=dtype)
    sels = [make_selection(nq, nk, hkv, B, budget, init, local, rho, seed=i) if nq else
            torch.zeros(hkv, 0, budget, dtype=torch.int32, device=DEV)
            for i, (nq, nk) in enumerate(zip(lens_q, lens_k))]
    bi = torch.cat(sels, 1).contiguous()
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, do, bi, cu_q, cu_k


def check_case(name, lens_q, lens_k, hq, hkv, d, B, budget, init, local, rho, dtype=torch.bfloat16):
    q, k, v, do, bi, cu_q, cu_k = make_case(lens_q, lens_k, hq, hkv, d, B, budget, init, local, rho, dtype)
    scale = d ** -0.5
    qt, kt, vt = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = sparse_attention_triton(qt, kt, vt, bi, B, cu_q, cu_k, max(lens_q), max(lens_k), scale)
    out.backward(do)
    refs = [[], [], [], [], []]
    qo = ko = 0
    for nq, nk in zip(lens_q, lens_k):
        if nq:
            r = reference_chunked(q[qo:qo + nq], k[ko:ko + nk], v[ko:ko + nk], bi[:, qo:qo + nq], B, scale,
                                  do[qo:qo + nq])
        else:
            r = (torch.zeros(0, hq, d, device=DEV), torch.zeros(hq, 0, device=DEV), torch.zeros(0, hq, d, device=DEV),
                 torch.zeros(nk, hkv, d, device=DEV), torch.zeros(nk, hkv, d, device=DEV))
        for lst, x in zip(refs, r):
            lst.append(x)
        qo += nq
        ko += nk
    ref = [torch.cat(refs[0]), torch.cat(refs[1], 1), torch.cat(refs[2]), torch.cat(refs[3]), torch.cat(refs[4])]
    got = [out, lse, qt.grad, kt.grad, vt.grad]
    res = {}
    ok_all = True
    for nm, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        r = r.float()
        err = (g.float() - r).abs().max().item()
        err_lp = (r.to(dtype).float() - r).abs().max().item() if nm != "lse" else 0.0
        bound = 2 * err_lp + 1e-3 * max(1.0, r.abs().max().item()) if nm != "lse" else 1e-3
        ok = err <= bound and torch.isfinite(g).all().item()
        ok_all &= ok
        res[nm] = dict(err=err, err_lowprec_ref=err_lp, ok=ok)
    print(f"[check] {name}: {'PASS' if ok_all else 'FAIL'} " +
          " ".join(f"{k}={v['err']:.2e}/{v['err_lowprec_ref']:.2e}" for k, v in res.items()), flush=True)
    return dict(name=name, ok=ok_all, errors=res)


# ------------------------------------------------------------------ timing
def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def kernel_ms(fn, reps=3, top=12):
    """GPU time per call of each kernel (torch profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    ev = [(e.key[:48], getattr(e, "device_time_total", 0) / reps / 1e3) for e in prof.key_averages()]
    ev = sorted([e for e in ev if e[1] > 0], key=lambda e: -e[1])
    return {k: round(v, 3) for k, v in ev[:top]} | {"total": round(sum(v for _, v in ev), 3)}


def run_timings(n, pattern, args, results, hq=32, hkv=2, d=128, B=64, budget=96, init=1, local=32):
    rho = 0.97 if pattern == "local" else 0.0
    torch.manual_seed(0)
    q = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16)
    bi = make_selection(n, n, hkv, B, budget, init, local, rho)
    torch.cuda.synchronize()
    stats = overlap_stats(bi, -(-n // B))
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    row = dict(n=n, pattern=pattern, hq=hq, hkv=hkv, d=d, budget=budget, **stats)
    qd, kd, vd = q.detach(), k.detach(), v.detach()

    # plan (union build) alone, per tile shape; kernels per variant (tile rows, paired blocks)
    defaults = SA.UNION_KERNEL, SA.TMA_LOADS, SA.ROW_MASK
    for bm in args.block_ms:
        for uk in args.union_kernel:  # union build: Triton kernel vs segmented torch.sort (must agree)
            SA.UNION_KERNEL = uk
            plan = SA._Plan(qd, kd, bi, B, cu, cu, n, bm)
            row[f"union_over_budget_T{plan.T}"] = round(plan.cnt.float().mean().item() / budget, 2)
            row[f"plan_ms_bm{bm}_uk{int(uk)}"] = bench(lambda: SA._Plan(qd, kd, bi, B, cu, cu, n, bm), rep=50)
            if uk:
                ref = SA._tile_unions_torch(bi, plan.tile_q0, plan.tile_nq, plan.tile_pos0, plan.T, B, plan.u_cap)
                live = torch.arange(plan.u_cap, device=DEV)[None, None, :] < ref[2][..., None]
                row[f"union_kernel_equal_bm{bm}"] = bool(
                    torch.equal(plan.cnt, ref[2]) and torch.equal(plan.ub[..., :-1][live], ref[0][..., :-1][live])
                    and torch.equal(plan.ubits[..., :-1][live], ref[1][..., :-1][live]))
                del ref, live
            del plan
        SA.UNION_KERNEL = defaults[0]
        for pair, tma, mskip in [(p, t, m) for p in args.pairs for t in args.tma for m in args.row_mask]:
            SA.TMA_LOADS, SA.ROW_MASK = tma, mskip
            tag = f"bm{bm}_pair{int(pair)}_tma{int(tma)}_ms{int(mskip)}"
            row[f"fwd_ms_{tag}"] = bench(lambda: SA._forward(qd, kd, vd, bi, B, cu, cu, n, n, scale, block_m=bm,
                                                              pair=pair))
            out, lse, resid = SA._forward(qd, kd, vd, bi, B, cu, cu, n, n, scale, block_m=bm, need_resid=True,
                                          pair=pair)
            for ch in args.chunks:  # dk/dv steps of T tokens a program
                row[f"bwd_ms_{tag}_ch{ch}"] = bench(
                    lambda: SA._backward(do, qd, kd, vd, out, lse, bi, B, cu, cu, n, n, scale, resid=resid,
                                         block_m=bm, pair=pair, chunk=ch), rep=100)
            if hasattr(SA._dkdv_launch, "best_config"):
                row["dkdv_best_config"] = str(SA._dkdv_launch.best_config)
            if args.profile:  # where the backward's time goes (default path)
                row[f"bwd_kernels_ms_{tag}"] = kernel_ms(
                    lambda: SA._backward(do, qd, kd, vd, out, lse, bi, B, cu, cu, n, n, scale, resid=resid,
                                         block_m=bm, pair=pair))
                row[f"fwd_kernels_ms_{tag}"] = kernel_ms(
                    lambda: SA._forward(qd, kd, vd, bi, B, cu, cu, n, n, scale, block_m=bm, pair=pair))
            del out, lse, resid
        SA.TMA_LOADS, SA.ROW_MASK = defaults[1:]
    torch.cuda.synchronize()
    m0 = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row["fwd_ms"] = bench(lambda: sparse_attention_triton(qd, kd, vd, bi, B, cu, cu, n, n, scale))

    def fb():
        o, _ = sparse_attention_triton(q, k, v, bi, B, cu, cu, n, n, scale)
        o.backward(do)
    row["fwd_bwd_ms"] = bench(fb, rep=100)
    if args.profile:
        row["fwd_bwd_kernels_ms"] = kernel_ms(fb, top=16)
    row["peak_extra_GiB"] = round((torch.cuda.max_memory_allocated() - m0) / 2 ** 30, 2)

    # dense cuDNN baseline
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qT = qd.transpose(0, 1)[None].detach().requires_grad_(True)
    kT = kd.transpose(0, 1)[None].detach().requires_grad_(True)
    vT = vd.transpose(0, 1)[None].detach().requires_grad_(True)
    doT = do.transpose(0, 1)[None]
    F = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["cudnn_fwd_ms"] = bench(
                lambda: F(qT.detach(), kT.detach(), vT.detach(), is_causal=True, enable_gqa=True))

            def dfb():
                o = F(qT, kT, vT, is_causal=True, enable_gqa=True)
                o.backward(doT)
            row["cudnn_fwd_bwd_ms"] = bench(dfb, rep=100)
    except Exception as ex:  # noqa: BLE001
        row["cudnn_error"] = repr(ex)[:200]
    if "cudnn_fwd_ms" in row:
        row["speedup_fwd_vs_cudnn"] = round(row["cudnn_fwd_ms"] / row["fwd_ms"], 2)
        row["speedup_fwd_bwd_vs_cudnn"] = round(row["cudnn_fwd_bwd_ms"] / row["fwd_bwd_ms"], 2)
    print(json.dumps(row), flush=True)
    results.append(row)
    if args.flex and pattern == "local":
        try:
            fr = flex_timings(qd, kd, vd, do, n, budget * B, hq, hkv, d)
            row.update(fr)
            row["ratio_fwd_vs_flex"] = round(row["fwd_ms"] / row["flex_fwd_ms"], 2)
            row["ratio_fwd_bwd_vs_flex"] = round(row["fwd_bwd_ms"] / row["flex_fwd_bwd_ms"], 2)
        except Exception as ex:  # noqa: BLE001
            row["flex_error"] = repr(ex)[:300]
        print(json.dumps({k: row[k] for k in row if "flex" in k or k in ("n", "pattern")}), flush=True)
    del q, k, v, do, bi, qT, kT, vT
    torch.cuda.empty_cache()


_FLEX = {}


def flex_timings(q, k, v, do, n, visible, hq, hkv, d, FB=128):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    fa = _FLEX["fn"]
    nblk = -(-n // FB)
    per = visible // FB  # kv blocks per query tile: init + local window + random past
    qb = torch.arange(nblk, device=DEV)
    kv = torch.arange(nblk, device=DEV)
    # per query tile: block 0, the `per-16` most recent (incl. the diagonal), 15 random past ones
    loc = per - 16
    sc = torch.rand(nblk, nblk, device=DEV)
    sc = torch.where(kv[None, :] <= qb[:, None], sc, -1.0)
    sc = torch.where((kv[None, :] > qb[:, None] - loc) & (kv[None, :] <= qb[:, None]), 3.0, sc)
    sc[:, 0] = torch.where(qb >= 0, 2.0, sc[:, 0])
    top = torch.topk(sc, min(per, nblk), -1)
    valid = top.values >= 0
    idx = torch.sort(torch.where(valid, top.indices, nblk + 1), -1).values
    cnt = valid.sum(-1).to(torch.int32)
    idx = torch.where(idx > nblk, 0, idx).to(torch.int32)
    kv_idx = torch.zeros(nblk, nblk, dtype=torch.int32, device=DEV)
    kv_idx[:, :idx.shape[1]] = idx
    kv_num = cnt

    def causal(b, h, qi, ki):
        return qi >= ki
    bm = BlockMask.from_kv_blocks(kv_num[None, None], kv_idx[None, None], BLOCK_SIZE=FB, mask_mod=causal,
                                  seq_lengths=(n, n))
    qT = q.transpose(0, 1)[None].contiguous()
    kT = k.transpose(0, 1)[None].contiguous()
    vT = v.transpose(0, 1)[None].contiguous()
    r = {}
    r["flex_fwd_ms"] = bench(lambda: fa(qT, kT, vT, block_mask=bm, enable_gqa=True))
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (qT, kT, vT))
    doT = do.transpose(0, 1)[None].contiguous()

    def fb():
        o = fa(qg, kg, vg, block_mask=bm, enable_gqa=True)
        o.backward(doT)
    r["flex_fwd_bwd_ms"] = bench(fb, rep=100)
    r["flex_visible_tokens_per_tile"] = round(cnt.float().mean().item() * FB)
    return r


def flag_ab(attr, lens, patterns, reps=3, hq=32, hkv=2, d=128, B=64, budget=96, init=1, local=32):
    """``sparse_attention.<attr>`` False / True, interleaved over `reps` rounds in one process: the forward kernel
    (``_forward``, do_bench median) and the forward + backward on the synthetic selections; outputs compared."""
    default = getattr(SA, attr)
    rows = []
    try:
        for n in lens:
            for pattern in patterns:
                torch.manual_seed(0)
                q = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                do = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16)
                bi = make_selection(n, n, hkv, B, budget, init, local, 0.97 if pattern == "local" else 0.0)
                cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
                qd, kd, vd = q.detach(), k.detach(), v.detach()
                row = dict(n=n, pattern=pattern, attr=attr)
                outs = {}
                for val in (False, True):
                    setattr(SA, attr, val)
                    outs[val] = SA._forward(qd, kd, vd, bi, B, cu, cu, n, n, d ** -0.5)
                row["max_out_diff"] = float((outs[False][0].float() - outs[True][0].float()).abs().max())
                row["max_lse_diff"] = float((outs[False][1] - outs[True][1]).abs().max())
                del outs

                def fb():
                    o, _ = sparse_attention_triton(q, k, v, bi, B, cu, cu, n, n, d ** -0.5)
                    o.backward(do)
                for _ in range(reps):
                    for val in (False, True):
                        setattr(SA, attr, val)
                        row.setdefault(f"fwd_ms_{val}", []).append(round(bench(
                            lambda: SA._forward(qd, kd, vd, bi, B, cu, cu, n, n, d ** -0.5)), 3))
                        row.setdefault(f"fwd_bwd_ms_{val}", []).append(round(bench(fb, rep=100), 3))
                print(json.dumps(row), flush=True)
                rows.append(row)
                del q, k, v, do, bi, qd, kd, vd
                torch.cuda.empty_cache()
    finally:
        setattr(SA, attr, default)
    print("n | pattern | fwd ms off | fwd ms on | fwd+bwd ms off | fwd+bwd ms on | max out diff")
    for r in rows:
        print(r["n"], "|", r["pattern"], "|", min(r["fwd_ms_False"]), "|", min(r["fwd_ms_True"]), "|",
              min(r["fwd_bwd_ms_False"]), "|", min(r["fwd_bwd_ms_True"]), "|", r["max_out_diff"])
    return rows


def fwd_variants(variants, lens, patterns, reps=3, hq=32, hkv=2, d=128, B=64, budget=96, init=1, local=32):
    """Forward launch variants, interleaved over `reps` rounds in one process (do_bench median of ``_forward``):
    each variant is a dict of ``sparse_fwd_sm90.VARIANT`` keys (launch settings, maxnreg) plus ``gluon`` (False: the
    Triton kernel), ``ws`` (False: not the warp-specialised kernel), ``ws_settings`` (``sparse_fwd_sm90.WS_VARIANT``)
    and ``name``; outputs compared with the first variant's."""
    from infllmv2.ops.triton import sparse_fwd_sm90 as F
    default, ws_default = dict(F.VARIANT), dict(F.WS_VARIANT)
    gluon_default, ws_on = SA.FWD_SM90.enabled, SA.FWD_SM90_WS.enabled
    rows = []

    def use(var):
        F.VARIANT.clear()
        F.VARIANT.update(default, **{k: v for k, v in var.items() if k not in ("name", "gluon", "ws", "ws_settings")})
        F.WS_VARIANT.clear()
        F.WS_VARIANT.update(ws_default, **var.get("ws_settings", {}))
        SA.FWD_SM90.enabled = var.get("gluon", gluon_default)
        SA.FWD_SM90_WS.enabled = var.get("ws", ws_on) and var.get("gluon", True)
    try:
        for n in lens:
            for pattern in patterns:
                torch.manual_seed(0)
                q = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16)
                k, v = (torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
                bi = make_selection(n, n, hkv, B, budget, init, local, 0.97 if pattern == "local" else 0.0)
                cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
                row = dict(n=n, pattern=pattern, ms={}, max_out_diff={}, max_lse_diff={})
                ref = None
                for var in variants:
                    use(var)
                    o, lse, _ = SA._forward(q, k, v, bi, B, cu, cu, n, n, d ** -0.5)
                    if ref is None:
                        ref = (o.float(), lse)
                    row["max_out_diff"][var["name"]] = float((o.float() - ref[0]).abs().max())
                    row["max_lse_diff"][var["name"]] = float((lse - ref[1]).abs().max())
                del o, lse, ref
                for _ in range(reps):
                    for var in variants:
                        use(var)
                        row["ms"].setdefault(var["name"], []).append(
                            round(bench(lambda: SA._forward(q, k, v, bi, B, cu, cu, n, n, d ** -0.5), rep=100), 3))
                print(json.dumps(row), flush=True)
                rows.append(row)
                del q, k, v, bi
                torch.cuda.empty_cache()
    finally:
        use({})
        SA.FWD_SM90.enabled, SA.FWD_SM90_WS.enabled = gluon_default, ws_on
    print("n | pattern | " + " | ".join(v["name"] for v in variants) + " (ms, best of rounds; max out diff)")
    for r in rows:
        print(r["n"], "|", r["pattern"], "|", " | ".join(f"{min(r['ms'][v['name']])} ({r['max_out_diff'][v['name']]:.3g})"
                                                        for v in variants))
    return rows


def union_variants(variants, lens, patterns, reps=3, hq=32, hkv=2, d=128, B=64, budget=96, init=1, local=32):
    """The forward's plan (``_Plan``: tile table + union build) under settings of ``sparse_attention`` (each variant a
    dict of its attributes plus ``name``), for tiles of one row tile (the plain kernels) and of three (the
    warp-specialised forward), interleaved over `reps` rounds; every plan compared with the torch build."""
    defaults = {}
    rows = []

    def use(var):
        for key, val in defaults.items():
            setattr(SA, key, val)
        for key, val in var.items():
            if key != "name":
                defaults.setdefault(key, getattr(SA, key))
                setattr(SA, key, val)
    try:
        for n in lens:
            for pattern in patterns:
                q = torch.empty(n, hq, d, device=DEV, dtype=torch.bfloat16)
                k = torch.empty(n, hkv, d, device=DEV, dtype=torch.bfloat16)
                bi = make_selection(n, n, hkv, B, budget, init, local, 0.97 if pattern == "local" else 0.0)
                cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
                for wgs in (1, 3):
                    row = dict(n=n, pattern=pattern, wgs=wgs, ms={}, equal_to_torch={})
                    for var in variants:
                        use(var)
                        plan = SA._Plan(q, k, bi, B, cu, cu, n, None, wgs=wgs)
                        ub, ubits, cnt = SA._tile_unions_torch(bi, plan.tile_q0, plan.tile_nq, plan.tile_pos0,
                                                               plan.T, B, plan.u_cap)
                        live = torch.arange(plan.u_cap, device=DEV)[None, None, :] < cnt[..., None]
                        row["equal_to_torch"][var["name"]] = bool(
                            torch.equal(plan.cnt, cnt) and torch.equal(plan.ub[..., :-1][live], ub[..., :-1][live])
                            and torch.equal(plan.ubits[..., :-1][live], ubits[..., :-1][live]))
                        del plan, ub, ubits, cnt, live
                    for _ in range(reps):
                        for var in variants:
                            use(var)
                            row["ms"].setdefault(var["name"], []).append(round(bench(
                                lambda: SA._Plan(q, k, bi, B, cu, cu, n, None, wgs=wgs), rep=100), 3))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                del q, k, bi
                torch.cuda.empty_cache()
    finally:
        use({})
    print("n | pattern | tiles of row tiles | " + " | ".join(v["name"] for v in variants) + " (ms, best of rounds)")
    for r in rows:
        print(r["n"], "|", r["pattern"], "|", r["wgs"], "|", " | ".join(
            f"{min(r['ms'][v['name']])}{'' if r['equal_to_torch'][v['name']] else ' WRONG'}" for v in variants))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="32768,65536,131072")
    ap.add_argument("--patterns", default="local,random")
    ap.add_argument("--block-ms", default="64", help="tile rows to compare, e.g. 64,128")
    ap.add_argument("--pairs", default="0", help="paired-block variants to compare, e.g. 0,1")
    ap.add_argument("--tma", default="0", help="TMA K/V load variants to compare, e.g. 0,1")
    ap.add_argument("--row-mask", default="1", help="row-bias masking variants to compare, e.g. 0,1")
    ap.add_argument("--union-kernel", default="1", help="union build variants to compare, e.g. 0,1")
    ap.add_argument("--chunks", default="256", help="dk/dv chunk sizes (steps of T tokens a program), e.g. 64,256")
    ap.add_argument("--union-variants", default="", help="settings of sparse_attention.py for the plan's union build "
                    "(JSON list of dicts: name and attribute values, e.g. UNION_HIST), timed interleaved at --lens")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of the forward and backward")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--shape", default="32,2,128", help="Hq,Hkv,d")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--flag-ab", metavar="ATTR", help="only the interleaved off/on A/B of a boolean switch of the "
                    "sparse_attention module (e.g. ROW_MASK) at --lens x --patterns")
    ap.add_argument("--fwd-variants", metavar="JSON", help="only the interleaved A/B of forward launch variants (a "
                    "JSON list of dicts: name, gluon, ws, ws_settings, and sparse_fwd_sm90.VARIANT keys) at --lens x "
                    "--patterns x --shape")
    args = ap.parse_args()
    if args.union_variants:
        rows = union_variants(json.loads(args.union_variants), [int(x) for x in args.lens.split(",")],
                              args.patterns.split(","))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dev_sparse_attention_union_variants{args.tag}.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)
        return
    if args.fwd_variants:
        hq, hkv, d = (int(x) for x in args.shape.split(","))
        rows = fwd_variants(json.loads(args.fwd_variants), [int(x) for x in args.lens.split(",")],
                            args.patterns.split(","), hq=hq, hkv=hkv, d=d)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dev_sparse_attention_fwd_variants{args.tag}.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)
        return
    if args.flag_ab:
        rows = flag_ab(args.flag_ab, [int(x) for x in args.lens.split(",")], args.patterns.split(","))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dev_sparse_attention_flag_ab{args.tag}.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)
        return
    args.block_ms = [int(x) for x in args.block_ms.split(",")]
    args.pairs = [x == "1" for x in args.pairs.split(",")]
    args.tma = [x == "1" for x in args.tma.split(",")]
    args.union_kernel = [x == "1" for x in args.union_kernel.split(",")]
    args.row_mask = [x == "1" for x in args.row_mask.split(",")]
    args.chunks = [int(x) for x in args.chunks.split(",")]
    SA.TMA_LOADS = SA.TMA_LOADS or any(args.tma)  # the checks and public-API timings take the new path
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    t0 = time.time()
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), checks=[], timings=[])
    if not args.no_check:
        cases = [("std G16 d128 8K local", [8192], [8192], 32, 2, 128, 64, 96, 1, 32, 0.97),
                 ("G4 d64 varlen random (len_q<len_k, empty)", [3000, 0, 1, 2500], [5000, 0, 4100, 2500],
                  8, 2, 64, 64, 32, 1, 8, 0.0),
                 ("G1 d64 fp16 local", [3001], [3001], 2, 2, 64, 64, 16, 1, 4, 0.97, torch.float16)]
        for c in cases:
            try:
                report["checks"].append(check_case(*c))
            except Exception as ex:  # noqa: BLE001
                print(f"[check] {c[0]}: ERROR {ex!r}"[:2000], flush=True)
                report["checks"].append(dict(name=c[0], ok=False, error=repr(ex)[:500]))
        print(f"checks done {time.time() - t0:.1f}s", flush=True)
    for n in [int(x) for x in args.lens.split(",")]:
        for pat in args.patterns.split(","):
            hq, hkv, d = (int(x) for x in args.shape.split(","))
            run_timings(n, pat, args, report["timings"], hq=hq, hkv=hkv, d=d)
            print(f"  t={time.time() - t0:.1f}s", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dev_sparse_attention{args.tag}.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
