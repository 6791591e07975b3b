"""Development check + timing of the Triton stage-1 selection and the decode kernel (one GPU run).

    python benchmarks/dev_selection.py [--quick] [--variants]

Prints correctness against infllmv2.ops.naive (bf16 compared by score, fp32 exactly), then
selection time / peak extra memory at 32K/64K/128K (standard shape, `random` pattern) and one
decode step at a 128K cache, batch 8, against dense SDPA decode, all in one process.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import shlex
import sys
import time
import traceback

import torch
import triton
import triton.testing

sys.path.insert(0, ".")
from bench_attention import bench, graphed  # noqa: E402  (this script's folder is on sys.path)
from infllmv2.config import SparseConfig  # noqa: E402
from infllmv2.ops import naive  # noqa: E402
from infllmv2.ops.triton.decode import infllmv2_decode_triton  # noqa: E402
from infllmv2.ops.triton import selection as sel_mod  # noqa: E402
from infllmv2.ops.triton.selection import compress_keys_varlen, select_blocks_triton  # noqa: E402

DEV = "cuda"
VARIANTS = [(True, 128, 64, 4, 3), (True, 64, 64, 4, 3), (True, 256, 64, 8, 3), (True, 256, 64, 4, 3),
            (True, 128, 32, 4, 3), (True, 256, 32, 8, 3), (False, 128, 64, 8, 3)]
RESULTS = {}


def section(name):
    def deco(fn):
        def run(*a, **k):
            print(f"\n=== {name} ===", flush=True)
            t0 = time.time()
            try:
                fn(*a, **k)
            except Exception:  # keep going: one GPU run must report everything
                traceback.print_exc()
                RESULTS[name] = "FAILED"
            print(f"--- {name}: {time.time() - t0:.1f}s", flush=True)
        return run
    return deco


def score_check(q, k, cfg, got, scale):
    """got (Hkv, n, budget) vs the fp32 reference: same sizes, forced present, no future, score sums."""
    ref = naive.select_blocks(q.float(), k.float(), cfg, scale)
    sc = naive.block_scores(q.float(), k.float(), cfg, scale)  # (Hkv, n, nb)
    nb = sc.shape[-1]
    exact = (ref == got).all(-1).float().mean().item()
    size_ok = ((ref >= 0).sum(-1) == (got >= 0).sum(-1)).all().item()
    g = torch.where(got < 0, nb, got.long())
    r = torch.where(ref < 0, nb, ref.long())
    scp = torch.cat([sc, sc.new_zeros(sc.shape[:-1] + (1,))], -1)
    sg = torch.gather(scp, -1, g).sum(-1)
    sr = torch.gather(scp, -1, r).sum(-1)
    rel = ((sg - sr).abs() / sr.abs().clamp_min(1e-6)).max().item()
    n, nk = q.shape[0], k.shape[0]
    bq = (torch.arange(nk - n, nk, device=q.device) // cfg.block_size)[None, :, None]
    future = (got > bq).any().item()
    # forced present
    mask = torch.zeros(got.shape[0], n, nb + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, g, True)
    b = torch.arange(nb, device=q.device)[None, None, :]
    forced = ((b < cfg.init_blocks) | (b >= bq - cfg.local_blocks)) & (b <= bq)
    forced_ok = (~forced | mask[..., :nb]).all().item()
    return dict(exact_rows=round(exact, 4), sizes_equal=size_ok, no_future=not future, forced_ok=forced_ok,
                max_rel_score_sum_diff=rel)


@section("correctness: selection vs naive")
def check_selection():
    torch.manual_seed(0)
    out = {}
    for dtype, lens_k, lens_q, G, hkv, d, approx in [
        (torch.float32, [3000, 0, 700, 2100], [3000, 0, 100, 33], 16, 2, 128, True),
        (torch.float32, [2500, 513], [2500, 513], 4, 2, 64, False),
        (torch.bfloat16, [6000, 1500], [6000, 700], 16, 2, 128, True),
        (torch.bfloat16, [5000], [5000], 4, 4, 64, False),
    ]:
        cfg = SparseConfig(dense_len=-1, lse_approx=approx, topk=32, window_size=1024)
        k = torch.randn(sum(lens_k), hkv, d, device=DEV, dtype=dtype)
        q = torch.randn(sum(lens_q), hkv * G, d, device=DEV, dtype=dtype)
        cuk = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
        cuq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
        got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
        kc, cuc = compress_keys_varlen(k, cuk, 32, 16)
        torch.cuda.synchronize()
        for i in range(len(lens_k)):
            if lens_q[i] == 0:
                continue
            ks, qs = k[cuk[i]:cuk[i + 1]], q[cuq[i]:cuq[i + 1]]
            cerr = (kc[cuc[i]:cuc[i + 1]].float() - naive.compress_keys(ks.float(), 32, 16)).abs().max().item()
            r = score_check(qs, ks, cfg, got[:, cuq[i]:cuq[i + 1]], d ** -0.5)
            r["compress_max_err"] = cerr
            key = f"{dtype} G{G} d{d} approx{approx} lk{lens_k[i]} lq{lens_q[i]}"
            out[key] = r
            print(key, r, flush=True)
    RESULTS["selection_correctness"] = out


@section("correctness: decode vs naive")
def check_decode():
    torch.manual_seed(1)
    out = {}
    for dtype, G, d, dl in [(torch.float32, 16, 128, -1), (torch.bfloat16, 16, 128, 3000), (torch.bfloat16, 4, 64, -1)]:
        cfg = SparseConfig(dense_len=dl, topk=32, window_size=1024)
        lens = [5000, 1, 2999, 3000, 4100]
        hkv, ml = 2, 5100
        kc = torch.randn(len(lens), ml, hkv, d, device=DEV, dtype=dtype)
        vc = torch.randn(len(lens), ml, hkv, d, device=DEV, dtype=dtype)
        q = torch.randn(len(lens), hkv * G, d, device=DEV, dtype=dtype)
        sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
        o, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, return_block_indices=True)
        for i, n in enumerate(lens):
            ref, _ = naive.infllmv2_attention(q[i:i + 1].double(), kc[i, :n].double(), vc[i, :n].double(), cfg)
            low, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg)
            err = (o[i].double() - ref[0]).abs().max().item()
            lerr = (low[0].double() - ref[0]).abs().max().item()
            r = dict(err=err, ref_lowprec_err=lerr)
            if cfg.is_sparse(n):
                r.update(score_check(q[i:i + 1], kc[i, :n], cfg, idx[:, i:i + 1], d ** -0.5))
            key = f"{dtype} G{G} d{d} dense_len{dl} L{n}"
            out[key] = r
            print(key, r, flush=True)
    RESULTS["decode_correctness"] = out


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return peak / 2 ** 30


def _random_inputs(n):
    """Standard-shape q (n, 32, 128), k (n, 2, 128), bf16, `random` pattern, and the offsets of one sequence."""
    torch.manual_seed(0)
    q = torch.randn(n, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(n, 2, 128, device=DEV, dtype=torch.bfloat16)
    return q, k, torch.tensor([0, n], dtype=torch.int32, device=DEV)


@section("selection timing (standard shape, random)")
def time_selection(lengths, variants):
    cfg = SparseConfig(dense_len=-1)
    out = {}
    for n in lengths:
        q, k, cu = _random_inputs(n)
        f = lambda **kw: select_blocks_triton(q, k, cfg, cu, cu, n, n, **kw)  # noqa: E731
        comp = lambda: (compress_keys_varlen(k, cu, 32, 16), compress_keys_varlen(k, cu, 128, 64))  # noqa: E731
        row = dict(compress_ms=triton.testing.do_bench(comp, warmup=5, rep=20))
        row["select_ms"] = triton.testing.do_bench(f, warmup=3, rep=15)
        row["peak_extra_GiB"] = peak_extra(f)
        cfg_x = cfg.replace(lse_approx=False)
        row["select_exact_ms"] = triton.testing.do_bench(
            lambda: select_blocks_triton(q, k, cfg_x, cu, cu, n, n), warmup=2, rep=10)
        if variants and n >= 65536:
            for tr, bm, bn, nw, ns in VARIANTS:
                name = f"select_ms_T{int(tr)}_bm{bm}_bn{bn}_w{nw}_s{ns}"
                try:
                    row[name] = triton.testing.do_bench(
                        lambda: f(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, transposed=tr), warmup=2, rep=10)
                except Exception as e:  # noqa: BLE001
                    row[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        if n == lengths[-1]:  # per-kernel break-down
            tot = {k_: round(us / 1e3, 3) for k_, us in _kernel_us(f, 3).items()}
            row["kernel_ms_per_call"] = dict(sorted(tot.items(), key=lambda x: -x[1])[:10])
        out[n] = row
        print(n, json.dumps(row), flush=True)
        del q, k
    RESULTS["selection_timing"] = out


def _kernel_us(fn, reps=5):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {ev.key[:40]: round(getattr(ev, "device_time_total", 0) / reps, 1)
            for ev in prof.key_averages() if getattr(ev, "device_time_total", 0) > 0}


def _decode_inputs(L, batch, hkv=2, hq=32, d=128):
    """A full bf16 cache of L keys per row with its fine and coarse compressed keys (default config)."""
    kc = torch.randn(batch, L, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(batch, L, hkv, d, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(batch, hq, d, device=DEV, dtype=torch.bfloat16)
    sl = torch.full((batch,), L, dtype=torch.int32, device=DEV)
    kf = torch.stack([naive.compress_keys(kc[b], 32, 16) for b in range(batch)])
    kco = torch.stack([naive.compress_keys(kc[b], 128, 64) for b in range(batch)])
    return q, kc, vc, sl, kf, kco


def _dense_decode_graph_us(q, k_cache, v_cache):
    """One dense SDPA decode step (default backend) under a CUDA graph, in microseconds."""
    import torch.nn.functional as F
    qq, kk, vv = q[:, :, None, :], k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    dense = lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)  # noqa: E731
    return 1e3 * triton.testing.do_bench(graphed(dense), warmup=10, rep=50)


@section("decode timing: 128K cache, batch 8")
def time_decode(L=131072, batch=8):
    torch.manual_seed(0)
    cfg = SparseConfig()
    d = 128
    q, kc, vc, sl, kf, kco = _decode_inputs(L, batch, d=d)
    out = {}
    o, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, k_fine=kf, k_coarse=kco, return_block_indices=True)
    # stage-2 check at scale: attention over the returned blocks, in fp32
    errs = []
    for b in range(2):
        mask = naive.selection_mask(idx[:, b:b + 1], L, cfg.block_size)  # (Hkv, 1, L)
        ref, _ = naive._masked_attention(q[b:b + 1].float(), kc[b].float(), vc[b].float(), mask, d ** -0.5)
        errs.append((o[b].float() - ref[0]).abs().max().item())
    out["stage2_err_vs_fp32_given_blocks"] = max(errs)
    # stage-1 check at scale: the decode selection vs the prefill kernel's selection of the last token
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, L], dtype=torch.int32, device=DEV)
    pre = select_blocks_triton(q[:1], kc[0], cfg, cu_q, cu_k, 1, L)
    out["decode_vs_prefill_selection_equal"] = bool((pre[:, 0] == idx[:, 0]).all().item())
    ours = lambda: infllmv2_decode_triton(q, kc, vc, sl, cfg, k_fine=kf, k_coarse=kco)  # noqa: E731
    ours_nocache = lambda: infllmv2_decode_triton(q, kc, vc, sl, cfg)  # noqa: E731
    out["ours_ms"] = triton.testing.do_bench(ours, warmup=10, rep=50)
    out["ours_compress_from_cache_ms"] = triton.testing.do_bench(ours_nocache, warmup=5, rep=20)
    try:
        out["ours_graph_ms"] = triton.testing.do_bench(graphed(ours), warmup=10, rep=50)
    except Exception as e:  # noqa: BLE001
        out["ours_graph_ms"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    qq = q[:, :, None, :]
    kk, vv = kc.transpose(1, 2), vc.transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    for name, be in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def dense():
            if be is None:
                return F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
        try:
            dense()
            out[f"sdpa_{name}_ms"] = triton.testing.do_bench(dense, warmup=5, rep=30)
            out[f"sdpa_{name}_graph_ms"] = triton.testing.do_bench(graphed(dense), warmup=5, rep=30)
        except Exception as e:  # noqa: BLE001
            out[f"sdpa_{name}_ms"] = f"failed: {type(e).__name__}: {str(e)[:150]}"
    # contiguous-head layout for SDPA (what a dense decoder would keep)
    kk2, vv2 = kk.contiguous(), vv.contiguous()
    for name, be in [("flash_contig", SDPBackend.FLASH_ATTENTION), ("cudnn_contig", SDPBackend.CUDNN_ATTENTION)]:
        def dense2():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qq, kk2, vv2, enable_gqa=True)
        try:
            dense2()
            out[f"sdpa_{name}_ms"] = triton.testing.do_bench(dense2, warmup=5, rep=30)
        except Exception as e:  # noqa: BLE001
            out[f"sdpa_{name}_ms"] = f"failed: {type(e).__name__}: {str(e)[:150]}"
    dense_times = [v for kk_, v in out.items() if kk_.startswith("sdpa_") and isinstance(v, float)]
    if dense_times:
        out["speedup_eager_vs_fastest_sdpa"] = min(dense_times) / out["ours_ms"]
        if isinstance(out.get("ours_graph_ms"), float):
            out["speedup_graph_vs_fastest_sdpa"] = min(dense_times) / out["ours_graph_ms"]
    out["kernel_us_per_step"] = _kernel_us(ours)  # decode break-down
    print(json.dumps(out, indent=1), flush=True)
    RESULTS["decode_timing"] = out


@section("tuning: top-k warps and decode split counts")
def tune(L=131072, batch=8):
    out = {}
    cfg = SparseConfig(dense_len=-1)
    # prefill selection at 128K: top-k kernel warps (identical outputs)
    torch.manual_seed(0)
    q = torch.randn(L, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(L, 2, 128, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, L], dtype=torch.int32, device=DEV)
    f = lambda: select_blocks_triton(q, k, cfg, cu, cu, L, L)  # noqa: E731
    res = {}
    for warps in (None, 2):
        sel_mod._SELECT_WARPS = warps
        res[warps] = f()
        out[f"prefill_select_ms_warps{warps}"] = triton.testing.do_bench(f, warmup=3, rep=15)
        out[f"prefill_topk_ms_warps{warps}"] = _kernel_us(f, 2).get("_select_kernel", 0) / 1e3
        out[f"prefill_warps{warps}_same"] = bool((res[None] == res[warps]).all().item())
    sel_mod._SELECT_WARPS = None
    del q, k, res
    # decode at 128K, batch 8, compressed keys given
    cfg = SparseConfig()
    qd, kc, vc, sl, kf, kco = _decode_inputs(L, batch)
    out["dense_graph_us"] = _dense_decode_graph_us(qd, kc, vc)
    ref = None
    table = []
    from infllmv2.ops.triton import decode as dec_mod
    defaults = sel_mod._SELECT_WARPS, sel_mod._DECODE_SPLITS, dec_mod._DECODE_SELECT_OPTS
    old_scoring = dict(transposed=False, num_stages=2, num_warps=4)  # decode scoring before the fourth session
    grid = [(None, 16, 6, old_scoring), (None, 32, None, old_scoring)]  # the old defaults first
    grid += [(w, 32, None, {}) for w in (None, 8)]  # {}: today's defaults
    # the decode top-k has one row per program (16 programs): fewer warps shorten its 31 reductions
    grid += [(None, 32, None, dict(select_warps=w)) for w in (1, 2)]
    for warps, splits, bps, opts in grid:
        sel_mod._SELECT_WARPS, sel_mod._DECODE_SPLITS, dec_mod._DECODE_SELECT_OPTS = warps, splits, opts
        fn = lambda: infllmv2_decode_triton(qd, kc, vc, sl, cfg, k_fine=kf, k_coarse=kco,  # noqa: E731
                                            blocks_per_split=bps)
        try:
            o = fn()
            if ref is None:
                ref = o
            same = bool((o == ref).all().item()) or float((o.float() - ref.float()).abs().max())
            us = 1e3 * triton.testing.do_bench(graphed(fn), warmup=10, rep=50)
            row = dict(warps=warps, splits=splits, bps=bps, opts=str(opts), graph_us=round(us, 1), same_as_first=same,
                       speedup=round(out["dense_graph_us"] / us, 2), kernels_us=_kernel_us(fn))
        except Exception as e:  # noqa: BLE001
            row = dict(warps=warps, splits=splits, bps=bps, opts=str(opts), error=f"{type(e).__name__}: {str(e)[:300]}")
        print(json.dumps(row), flush=True)
        table.append(row)
    out["decode"] = table
    print(f"dense graph {out['dense_graph_us']:.1f} us")
    sel_mod._SELECT_WARPS, sel_mod._DECODE_SPLITS, dec_mod._DECODE_SELECT_OPTS = defaults
    print("select warps, splits, bps, opts | graph us | speedup | select us | score us | split us")
    for r in table:
        ku = r.get("kernels_us", {})
        print(r["warps"], r["splits"], r["bps"], r["opts"], "|", r.get("graph_us"), "|", r.get("speedup"), "|",
              ku.get("_select_kernel"), "|", ku.get("_score_kernel"), "|", ku.get("_decode_split_kernel"),
              r.get("error", ""))
    print({k_: v for k_, v in out.items() if k_ != "decode"})
    RESULTS["tune"] = out


@section("A/B: decode step with and without programmatic dependent launch (128K, CUDA graph)")
def decode_pdl_ab(L=131072):
    cfg = SparseConfig()
    out = {}
    default = sel_mod.DECODE_PDL
    for batch in (8, 1):
        torch.manual_seed(0)
        qd, kc, vc, sl, kf, kco = _decode_inputs(L, batch)
        row = dict(dense_graph_us=_dense_decode_graph_us(qd, kc, vc))
        fn = lambda: infllmv2_decode_triton(qd, kc, vc, sl, cfg, k_fine=kf, k_coarse=kco)  # noqa: E731
        ref = None
        for pdl in (False, True, False, True):  # twice each, interleaved
            sel_mod.DECODE_PDL = pdl
            o = fn()
            ref = o if ref is None else ref
            us = 1e3 * triton.testing.do_bench(graphed(fn), warmup=10, rep=100)
            row.setdefault(f"pdl{int(pdl)}_graph_us", []).append(round(us, 1))
            row[f"pdl{int(pdl)}_same"] = bool(torch.equal(o, ref))
        row["kernels_us_pdl1"] = _kernel_us(fn)
        row["speedup_pdl1"] = round(row["dense_graph_us"] / min(row["pdl1_graph_us"]), 2)
        row["speedup_pdl0"] = round(row["dense_graph_us"] / min(row["pdl0_graph_us"]), 2)
        out[batch] = row
        print(batch, json.dumps(row), flush=True)
        del qd, kc, vc, kf, kco
    sel_mod.DECODE_PDL = default
    RESULTS["decode_pdl_ab"] = out


@section("decode step A/B across package versions (128K, CUDA graph); run once per version, compare with --compare")
def decode_ab(tag, L=131072):
    """Times one decode step of whichever ``infllmv2`` is importable (run a copy of the repository to time
    another version) and saves its outputs under $AB_DIR (default /tmp) for ``--compare``."""
    import os
    cfg = SparseConfig()
    out = {}
    for batch in (8, 1):
        torch.manual_seed(0)
        qd, kc, vc, sl, kf, kco = _decode_inputs(L, batch)
        fn = lambda: infllmv2_decode_triton(qd, kc, vc, sl, cfg, k_fine=kf, k_coarse=kco)  # noqa: E731
        o = fn()
        torch.save(o.cpu(), os.path.join(os.environ.get("AB_DIR", "/tmp"), f"decode_{tag}_b{batch}.pt"))
        g = graphed(fn)
        row = dict(dense_graph_us=round(_dense_decode_graph_us(qd, kc, vc), 1),
                   graph_us=[round(1e3 * triton.testing.do_bench(g, warmup=10, rep=100), 1) for _ in range(2)],
                   eager_us=round(1e3 * triton.testing.do_bench(fn, warmup=5, rep=30), 1),
                   kernels_us=_kernel_us(fn), launches_us=_launches_us(fn))
        row["speedup"] = round(row["dense_graph_us"] / min(row["graph_us"]), 2)
        out[batch] = row
        print(tag, batch, json.dumps(row), flush=True)
        del qd, kc, vc, kf, kco
    RESULTS[f"decode_ab_{tag}"] = out


def _launches_us(fn):
    """Each kernel launch of one call in issue order (name, microseconds), from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if getattr(e, "device_type", None) is not None
           and str(e.device_type).endswith("CUDA") and e.name.startswith("_")]
    evs.sort(key=lambda e: e.time_range.start)
    t0 = evs[0].time_range.start if evs else 0
    return [(e.name[:24], round(e.time_range.start - t0, 1), round(e.time_range.elapsed_us(), 1)) for e in evs]


# (block_m, block_n, num_warps, num_stages, maxnreg) of the LSE + scoring kernels; None = today's default
SCORE_VARIANTS = [None, (256, 64, 8, 2, None), (256, 64, 8, 2, 128), (128, 64, 4, 1, 128), (128, 64, 4, 2, 168),
                  (256, 64, 8, 1, 128)]


@section("scoring-kernel launch variants (identical selections required)")
def score_variants(lengths=(131072, 32768, 65536), reps=3):
    """Each SCORE_VARIANTS entry for the LSE and scoring kernels, interleaved over `reps` rounds: the
    selection's do_bench median and the per-kernel times (profiler), plus whether the selection equals
    the default's."""
    cfg = SparseConfig(dense_len=-1)
    out = {}
    for n in lengths:
        q, k, cu = _random_inputs(n)
        ref = select_blocks_triton(q, k, cfg, cu, cu, n, n)
        rows = {}
        for _ in range(reps):
            for v in SCORE_VARIANTS:
                kw = {} if v is None else dict(block_m=v[0], block_n=v[1], num_warps=v[2], num_stages=v[3],
                                               maxnreg=v[4])
                name = "default" if v is None else "bm{}_bn{}_w{}_s{}_r{}".format(*v)
                f = lambda: select_blocks_triton(q, k, cfg, cu, cu, n, n, **kw)  # noqa: E731
                row = rows.setdefault(name, dict(select_ms=[], lse_ms=[], score_ms=[]))
                try:
                    if "same" not in row:
                        row["same"] = bool(torch.equal(f(), ref))
                    row["select_ms"].append(round(triton.testing.do_bench(f, warmup=3, rep=15), 3))
                    ku = _kernel_us(f, 2)
                    row["lse_ms"].append(round(ku.get("_lse_kernel", 0) / 1e3, 3))
                    row["score_ms"].append(round(ku.get("_score_kernel", ku.get("_score_kernel_sm90", 0)) / 1e3, 3))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out[n] = rows
        del q, k, ref
    RESULTS["score_variants"] = out
    print("n | variant | same | selection ms | LSE ms | scoring ms")
    for n, rows in out.items():
        for name, r in rows.items():
            print(n, "|", name, "|", r.get("same"), "|", r["select_ms"], "|", r["lse_ms"], "|", r["score_ms"],
                  r.get("error", ""))


def _get_attr(path):
    """``selection.<path>``; a dotted path reaches into an object (``SCORE_SM90.enabled``) or starts at another
    module of ``infllmv2.ops.triton`` (``score_sm90.WS_TILES``)."""
    names = path.split(".")
    obj = sel_mod
    if not hasattr(sel_mod, names[0]):
        obj = importlib.import_module(f"infllmv2.ops.triton.{names.pop(0)}")
    for name in names:
        obj = getattr(obj, name)
    return obj


def _set_attr(path, value):
    owner, _, name = path.rpartition(".")
    setattr(_get_attr(owner) if owner else sel_mod, name, value)


def _flag_rows(attr, values, select, reps, full=None):
    """``selection.<attr>`` set to each of `values`, interleaved over `reps` rounds: `select`'s median (`bench`), its
    kernels (profiler, once) and, when given, `full`'s median; plus whether all settings select identically."""
    rows, sels = {}, {}
    for _ in range(reps):
        for flag in values:
            _set_attr(attr, flag)
            row = rows.setdefault(f"{attr}={flag}", dict(select_ms=[], fwd_ms=[], kernels_ms=None))
            if flag not in sels:
                sels[flag] = select()
            # bench(): at least 10 timed calls (do_bench's rep=20 ms had left a 13 ms selection one or two)
            row["select_ms"].append(round(bench(select, rep=50), 3))
            if full is not None:
                row["fwd_ms"].append(round(bench(full, rep=50), 3))
            if row["kernels_ms"] is None:
                row["kernels_ms"] = {k_: round(us / 1e3, 3) for k_, us in _kernel_us(select, 2).items()
                                     if k_.startswith("_")}
    rows["identical"] = all(torch.equal(sels[values[0]], sels[v]) for v in values)
    # share of (head, token) rows selected identically by every setting
    rows["rows_identical"] = min((sels[values[0]] == sels[v]).all(-1).float().mean().item() for v in values)
    return rows


@section("A/B: settings of a selection-module attribute (prefill and one decode step)")
def flag_ab(attr, values=(True, False), lengths=(131072, 32768, 65536), reps=3, shapes=((8, 64),)):
    """``selection.<attr>`` set to each of `values` (a switch: True / False), interleaved in one process: the
    selection (median of `bench`), its kernels (profiler), and the complete forward (`infllmv2_attention`, Triton
    backend, `local` inputs) at each length; then the selection of the Llama-like shape (Hkv 8, d 64: 4x the
    top-k rows; `shapes`: (Hkv, d) pairs, 32 query heads, at the longest length), the 128K selection and complete
    forward on `random` inputs, and one decode step; outputs must be identical."""
    from bench_attention import make_inputs
    import infllmv2
    cfg = SparseConfig(dense_len=-1)
    out = {}
    default = _get_attr(attr)
    try:
        runs = ([(2, 128, n, "local") for n in lengths] + [(2, 128, max(lengths), "random")]
                + [(hkv, d, max(lengths), "local") for hkv, d in shapes])
        for hkv, d, n, pattern in runs:
            qb, kb, vb = make_inputs(n, 32, hkv, d, pattern)  # (1, n, heads, d)
            # as the harness calls it (batched layout: no host synchronisation to size the query tiles)
            select = lambda: infllmv2.select_blocks(qb, kb, cfg, backend="triton")  # noqa: E731
            std = (hkv, d) == (2, 128)
            full = (lambda: infllmv2.infllmv2_attention(qb, kb, vb, cfg, backend="triton")) if std else None
            name = n if std else f"{n}_hkv{hkv}_d{d}"
            out[name if pattern == "local" else f"{name}_{pattern}"] = _flag_rows(attr, values, select, reps, full)
            del qb, kb, vb
    finally:
        _set_attr(attr, default)
    n = max(lengths)
    # one decode step at a 128K cache, batch 8 (CUDA graph; the switch is read when the graph is captured)
    dcfg = SparseConfig()
    qd, kc, vc, sl, kf, kco = _decode_inputs(n, 8)
    fn = lambda: infllmv2_decode_triton(qd, kc, vc, sl, dcfg, k_fine=kf, k_coarse=kco)  # noqa: E731
    rows, outs = {}, {}
    graphs = {}
    for flag in values:
        _set_attr(attr, flag)
        outs[flag] = fn()
        graphs[flag] = graphed(fn)
    for _ in range(reps):
        for flag in values:
            row = rows.setdefault(f"{attr}={flag}", dict(graph_us=[], kernels_us=None))
            row["graph_us"].append(round(1e3 * triton.testing.do_bench(graphs[flag], warmup=10, rep=100), 1))
            if row["kernels_us"] is None:
                _set_attr(attr, flag)
                row["kernels_us"] = _kernel_us(fn)
    _set_attr(attr, default)
    rows["identical"] = all(torch.equal(outs[values[0]], outs[v]) for v in values)
    rows["dense_graph_us"] = round(_dense_decode_graph_us(qd, kc, vc), 1)
    out["decode_b8"] = rows
    RESULTS[f"flag_ab_{attr}"] = out
    print("n | variant | selection ms (decode: graph us) | complete forward ms (local) | kernels")
    for n, rows in out.items():
        for name, r in rows.items():
            if isinstance(r, dict):
                print(n, "|", name, "|", r.get("select_ms", r.get("graph_us")), "|", r.get("fwd_ms", ""), "|",
                      r.get("kernels_ms", r.get("kernels_us")))
        print(n, "| identical:", rows["identical"], rows.get("dense_graph_us", ""))


# decode settings compared by --decode-variants (the first is the baseline): attributes of ops.triton.decode, or of
# ops.triton.selection with a "selection." prefix
DECODE_VARIANTS = [dict(),
                   {"selection._DECODE_SPLITS": 32},
                   {"selection._DECODE_SPLITS": 8},
                   {"selection._DECODE_SPLITS": 12},
                   {"selection._DECODE_SPLITS": 24},
                   {"selection._DECODE_SPLITS": 96},
                   {"selection._DECODE_LSE_SPLITS": 32},
                   {"selection._DECODE_LSE_SPLITS": 8}]


def _decode_setting(name):
    """(module, attribute) of a DECODE_VARIANTS key."""
    from infllmv2.ops.triton import decode as dec_mod
    return (sel_mod, name.split(".", 1)[1]) if name.startswith("selection.") else (dec_mod, name)


@section("decode step: settings of the decode module (128K, CUDA graph, interleaved)")
def decode_variants(variants=None, L=131072, reps=3):
    """Each entry of `variants` (default DECODE_VARIANTS: attributes of ``ops.triton.decode``, or of the selection
    module with a "selection." prefix) under a CUDA graph captured with it, interleaved over `reps` rounds, at
    batch 8 and 1; outputs against the first variant's."""
    variants = DECODE_VARIANTS if variants is None else variants
    cfg = SparseConfig()
    defaults = {k_: getattr(*_decode_setting(k_)) for v in variants for k_ in v}
    out = {}
    try:
        for batch in (8, 1):
            torch.manual_seed(0)
            qd, kc, vc, sl, kf, kco = _decode_inputs(L, batch)
            fn = lambda: infllmv2_decode_triton(qd, kc, vc, sl, cfg, k_fine=kf, k_coarse=kco)  # noqa: E731
            graphs, rows, ref = [], [], None
            for v in variants:
                for k_, val in {**defaults, **v}.items():
                    setattr(*_decode_setting(k_), val)
                o = fn()
                ref = o if ref is None else ref
                graphs.append(graphed(fn))
                rows.append(dict(variant=str(v), graph_us=[], max_diff=float((o.float() - ref.float()).abs().max()),
                                 kernels_us=_kernel_us(fn), launches_us=_launches_us(fn)))
            for _ in range(reps):
                for g_, row in zip(graphs, rows):
                    row["graph_us"].append(round(1e3 * triton.testing.do_bench(g_, warmup=10, rep=100), 1))
            dense = round(_dense_decode_graph_us(qd, kc, vc), 1)
            for row in rows:
                row["speedup"] = round(dense / min(row["graph_us"]), 2)
            out[batch] = dict(dense_graph_us=dense, rows=rows)
            del qd, kc, vc, kf, kco, graphs
    finally:
        for k_, val in defaults.items():
            setattr(*_decode_setting(k_), val)
    RESULTS["decode_variants"] = out
    print("batch | variant | graph us | speedup | max diff | kernels us")
    for batch, r in out.items():
        for row in r["rows"]:
            print(batch, "|", row["variant"], "|", row["graph_us"], "|", row["speedup"], "|", row["max_diff"], "|",
                  row["kernels_us"])
        print(batch, "| dense graph us", r["dense_graph_us"])


@section("sm90 LSE kernel: launch variants (interleaved, against the Triton kernel)")
def lse_variants(variants, lengths=(131072, 65536, 32768), reps=3):
    """Each variant (a dict: "name", "gluon" (default True), "score.ATTR" (an attribute of ``score_sm90``, e.g.
    "score._PAIRS": false), and overrides of ``lse_sm90.VARIANT``: M, WARPS, Q_REGS, STAGES, maxnreg; the PAIRS key
    of the fourteenth session's runs went with the kernel's pairs loop, see lse_sm90.py) on the standard shape's
    `local` inputs, interleaved over `reps` rounds: the selection's do_bench median, its kernels (profiler, once), and
    the LSE (captured where the scoring kernel receives it) and the selection against the Triton kernel's."""
    from bench_attention import make_inputs
    from infllmv2.ops.triton import lse_sm90 as lse_mod
    from infllmv2.ops.triton import score_sm90 as score_mod
    score_defaults = {k_[len("score."):]: getattr(score_mod, k_[len("score."):])
                      for v in variants for k_ in v if k_.startswith("score.")}
    cfg = SparseConfig(dense_len=-1)
    seen = []
    real = sel_mod.score_blocks_sm90

    def spy(q, k1, lse, *a, **kw):
        if not seen:
            seen.append(lse.clone())
        return real(q, k1, lse, *a, **kw)

    sel_mod.score_blocks_sm90 = spy
    enabled = sel_mod.LSE_SM90.enabled
    out = {}
    try:
        for n in lengths:
            qb, kb, _ = make_inputs(n, 32, 2, 128, "local")
            q, k = qb[0], kb[0]
            cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
            select = lambda: select_blocks_triton(q, k, cfg, cu, cu, n, n)  # noqa: E731

            def use(v):
                sel_mod.LSE_SM90.enabled = v.get("gluon", True)
                for k_, x in score_defaults.items():
                    setattr(score_mod, k_, v.get("score." + k_, x))
                lse_mod.VARIANT.clear()
                lse_mod.VARIANT.update({k_: x for k_, x in v.items()
                                        if k_ not in ("name", "gluon") and not k_.startswith("score.")})

            use({"gluon": False})
            seen.clear()
            ref_sel = select()
            ref_lse = seen[0]
            rows = {}
            for _ in range(reps):
                for v in variants:
                    use(v)
                    row = rows.setdefault(v["name"], dict(variant=v, select_ms=[]))
                    try:
                        if "kernels_ms" not in row:
                            seen.clear()
                            got = select()
                            row["same_selection"] = bool(torch.equal(got, ref_sel))
                            row["rows_identical"] = (got == ref_sel).all(-1).float().mean().item()
                            fin = torch.isfinite(ref_lse)
                            row["lse_equal"] = bool(torch.equal(seen[0], ref_lse))
                            row["lse_max_diff"] = float((seen[0][fin] - ref_lse[fin]).abs().max())
                            row["lse_inf_same"] = bool(torch.equal(torch.isfinite(seen[0]), fin))
                            row["kernels_ms"] = {k_: round(us / 1e3, 3) for k_, us in _kernel_us(select, 2).items()
                                                 if k_.startswith("_")}
                        row["select_ms"].append(round(bench(select, rep=50), 3))
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out[n] = rows
            del qb, kb, q, k
    finally:
        sel_mod.score_blocks_sm90 = real
        sel_mod.LSE_SM90.enabled = enabled
        for k_, x in score_defaults.items():
            setattr(score_mod, k_, x)
        lse_mod.VARIANT.clear()
    RESULTS["lse_variants"] = out
    print("n | variant | selection ms | LSE kernel ms | scoring kernel ms | same selection | LSE equal / max diff | "
          "error")
    for n, rows in out.items():
        for name, r in rows.items():
            km = r.get("kernels_ms") or {}
            lk = km.get("_lse_kernel_sm90", km.get("_lse_kernel"))
            sk = km.get("_score_kernel_sm90", km.get("_score_kernel"))
            print(n, "|", name, "|", r["select_ms"], "|", lk, "|", sk, "|", r.get("same_selection"), "|",
                  r.get("lse_equal"), r.get("lse_max_diff"), "|", r.get("error", ""))


def compare_saved(tags):
    import os
    base = os.environ.get("AB_DIR", "/tmp")
    res = {}
    for batch in (8, 1):
        outs = [torch.load(os.path.join(base, f"decode_{t}_b{batch}.pt")).float() for t in tags]
        res[batch] = {f"{tags[0]}_vs_{t}": float((outs[0] - o).abs().max()) for t, o in zip(tags[1:], outs[1:])}
    print("max abs difference of the decode outputs:", res)
    RESULTS["decode_ab_compare"] = res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--tune", action="store_true", help="only the top-k and decode-split sweep")
    ap.add_argument("--decode-pdl", action="store_true", help="only the decode PDL A/B")
    ap.add_argument("--decode-ab", metavar="TAG", help="only time the decode step, saving outputs as TAG")
    ap.add_argument("--compare", nargs="+", metavar="TAG", help="compare the outputs saved by --decode-ab runs")
    ap.add_argument("--score-variants", action="store_true", help="only the LSE/scoring launch-variant sweep")
    ap.add_argument("--decode-variants", nargs="?", const="", metavar="JSON",
                    help="only the decode settings A/B: DECODE_VARIANTS, or this JSON list of {attribute: value}")
    ap.add_argument("--flag-ab", metavar="ATTR[=V1,V2,...]",
                    help="only the A/B of a selection-module attribute: a switch on / off, or the listed values "
                         "(Python literals, e.g. _SELECT_TILE=4096,1024)")
    ap.add_argument("--lse-variants", metavar="JSON",
                    help="only launch variants of the sm90 LSE kernel (and of the sm90 scoring kernel: "
                         "\"score.ATTR\" keys), a JSON list of dicts (see lse_variants)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds of --flag-ab")
    ap.add_argument("--shapes", default="8:64", help="--flag-ab's other shapes, HKV:D pairs (32 query heads), "
                    "selection only, at the longest length")
    ap.add_argument("--set", action="append", default=[], metavar="ATTR=VALUE",
                    help="set a selection-module attribute for the whole run (a Python literal), e.g. "
                         "score_sm90.WS_TILES=0 before --flag-ab _TOPK_SCAN_RUN=8,16")
    ap.add_argument("--lens", default="131072,65536,32768", help="lengths of --lse-variants and --flag-ab (whose "
                    "random, Hkv 8 and decode rows run at the longest)")
    args = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for item in args.set:
        attr, _, val = item.partition("=")
        _set_attr(attr, ast.literal_eval(val))
    if args.lse_variants:
        lse_variants(json.loads(args.lse_variants), tuple(int(x) for x in args.lens.split(",")))
    elif args.flag_ab:
        attr, _, vals = args.flag_ab.partition("=")
        # values as a Python list's items: True,False / None,1,2 / (4,0.2,4),(2,0.0,99)
        flag_ab(attr, tuple(ast.literal_eval(f"[{vals}]")) if vals else (True, False),
                tuple(int(x) for x in args.lens.split(",")), reps=args.reps,
                shapes=tuple(tuple(int(v) for v in x.split(":")) for x in args.shapes.split(",")))
    elif args.decode_variants is not None:
        decode_variants(json.loads(args.decode_variants) if args.decode_variants else None)
    elif args.score_variants:
        score_variants()
    elif args.compare:
        compare_saved(args.compare)
    elif args.decode_ab:
        decode_ab(args.decode_ab)
    elif args.decode_pdl:
        decode_pdl_ab()
    elif args.tune:
        tune()
    else:
        if not args.skip_correctness:
            check_selection()
            check_decode()
        time_selection([32768] if args.quick else [32768, 65536, 131072], args.variants)
        time_decode()
    import os
    name = f"dev_selection_{args.decode_ab}.json" if args.decode_ab else "dev_selection.json"
    path = os.path.join(os.environ.get("OUT", "."), name)
    meta = dict(command="python3 benchmarks/dev_selection.py " + shlex.join(sys.argv[1:]),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    with open(path, "w") as fh:
        json.dump({**meta, **RESULTS}, fh, indent=1, default=str)
    print("wrote", path)


if __name__ == "__main__":
    main()
