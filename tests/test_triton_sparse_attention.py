"""Triton stage-2 sparse attention (forward + backward) against the naive reference.

Runs through the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1), at small
sizes: block_size 16, a few hundred tokens. Accuracy rule (SPEC): error against a float64 reference at
most 2x the error of the PyTorch reference run in the same precision, plus a small absolute slack.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from infllmv2.config import SparseConfig
from infllmv2.ops import naive
from infllmv2.ops.triton import sparse_attention_triton

SA = importlib.import_module("infllmv2.ops.triton.sparse_attention")  # the module (not a re-exported name)

CFG = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=4, init_blocks=1,
                   dense_len=-1, lse_approx=False)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _random_selection(n, nk, hkv, budget, block_size, gen):
    """Random per-token selections: block 0 always, then random other blocks (past, current, sometimes
    a future one that the kernel must ignore), sorted, -1 padded."""
    nb = -(-nk // block_size)
    out = torch.full((hkv, n, budget), -1, dtype=torch.int32)
    for h in range(hkv):
        for i in range(n):
            t = nk - n + i
            bq = t // block_size
            hi = min(nb, bq + 2)  # allow one future block
            cand = torch.randperm(hi, generator=gen)[: budget - 1]
            cand = cand[cand != 0][: int(torch.randint(0, budget, (1,), generator=gen))]
            sel = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), cand]))
            out[h, i, : sel.numel()] = sel.to(torch.int32)
    return out


def _make_case(lens_q, lens_k, hq, hkv, d, selection, seed=0, cfg=CFG):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, generator=gen)
    k = torch.randn(tk, hkv, d, generator=gen)
    v = torch.randn(tk, hkv, d, generator=gen)
    dout = torch.randn(tq, hq, d, generator=gen)
    sels = []
    qo = ko = 0
    for nq, nk in zip(lens_q, lens_k):
        if selection == "select" and nq > 0:
            sels.append(naive.select_blocks(q[qo:qo + nq], k[ko:ko + nk], cfg))
        elif selection == "all":  # every block: sparse == dense
            nb = -(-nk // cfg.block_size)
            idx = torch.full((hkv, nq, cfg.budget), -1, dtype=torch.int32)
            idx[:, :, :nb] = torch.arange(nb, dtype=torch.int32)
            sels.append(idx)
        else:
            sels.append(_random_selection(nq, nk, hkv, cfg.budget, cfg.block_size, gen))
        qo += nq
        ko += nk
    bi = torch.cat(sels, dim=1) if sels else torch.zeros(hkv, 0, cfg.budget, dtype=torch.int32)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, dout, bi, cu_q, cu_k


def _reference(q, k, v, dout, bi, lens_q, lens_k, block_size, scale, dtype):
    """Per-sequence naive reference with inputs in `dtype`: out, lse, dq, dk, dv (float64 copies)."""
    q, k, v = (x.to(dtype).clone().requires_grad_(True) for x in (q, k, v))
    outs, lses = [], []
    qo = ko = 0
    for nq, nk in zip(lens_q, lens_k):
        if nq == 0:
            ko += nk
            continue
        o, l = naive.sparse_attention(q[qo:qo + nq], k[ko:ko + nk], v[ko:ko + nk], bi[:, qo:qo + nq], block_size,
                                      scale)
        outs.append(o)
        lses.append(l)
        qo += nq
        ko += nk
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1)
    out.backward(dout.to(dtype))
    return [x.double() for x in (out.detach(), lse.detach(), q.grad, k.grad, v.grad)]


def _run_triton(q, k, v, dout, bi, cu_q, cu_k, lens_q, lens_k, block_size, scale, dtype, variant=None):
    if variant is not None:  # internal paths: pairing off/on, delta by recomputation or from O
        qt, kt, vt, do = (x.to(dtype).to(DEV).contiguous() for x in (q, k, v, dout))
        bi, cu_q, cu_k = bi.to(DEV), cu_q.to(DEV), cu_k.to(DEV)
        out, lse, _ = SA._forward(qt, kt, vt, bi, block_size, cu_q, cu_k, max(lens_q), max(lens_k), scale,
                                  pair=variant["pair"])
        grads = SA._backward(do, qt, kt, vt, out, lse, bi, block_size, cu_q, cu_k, max(lens_q), max(lens_k), scale,
                             pair=variant["pair"], exact_delta=variant["exact_delta"])
        return [x.detach().double().cpu() for x in (out, lse) + tuple(grads)]
    qt, kt, vt = (x.to(dtype).to(DEV).clone().requires_grad_(True) for x in (q, k, v))
    out, lse = sparse_attention_triton(qt, kt, vt, bi.to(DEV), block_size, cu_q.to(DEV), cu_k.to(DEV),
                                       max(lens_q), max(lens_k), scale)
    assert out.dtype == dtype and out.shape == qt.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    out.backward(dout.to(dtype).to(DEV))
    return [x.detach().double().cpu() for x in (out, lse, qt.grad, kt.grad, vt.grad)]


def _check(lens_q, lens_k, hq, hkv, d, dtype, selection, seed=0, slack=None, variant=None):
    q, k, v, dout, bi, cu_q, cu_k = _make_case(lens_q, lens_k, hq, hkv, d, selection, seed)
    scale = d ** -0.5
    # the reference sees the same low-precision inputs
    q, k, v, dout = (x.to(dtype).float() for x in (q, k, v, dout))
    exact = _reference(q, k, v, dout, bi, lens_q, lens_k, CFG.block_size, scale, torch.float64)
    low = _reference(q, k, v, dout, bi, lens_q, lens_k, CFG.block_size, scale, dtype)
    got = _run_triton(q, k, v, dout, bi, cu_q, cu_k, lens_q, lens_k, CFG.block_size, scale, dtype, variant)
    if slack is None:
        slack = 1e-5 if dtype == torch.float32 else 1e-3
    for name, e, lo, g in zip(("out", "lse", "dq", "dk", "dv"), exact, low, got):
        assert torch.isfinite(g).all(), name
        err_ref = (lo - e).abs().max().item()
        err = (g - e).abs().max().item()
        assert err <= 2 * err_ref + slack * max(1.0, e.abs().max().item()), (name, err, err_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_varlen_g1_selected(dtype):
    # G = 1, d = 32; an empty sequence; lengths not multiples of the block size
    _check([37, 0, 150, 211], [37, 0, 150, 211], hq=2, hkv=2, d=32, dtype=dtype, selection="select")


def test_chunked_prefill_g3_random_d64():
    # G = 3, d = 64, len_q < len_k (chunked prefill / decode), random per-token selections
    _check([5, 0, 70, 1], [100, 0, 170, 33], hq=6, hkv=2, d=64, dtype=torch.bfloat16, selection="random", seed=1)


def test_g4_random_fp32():
    _check([129, 64, 17], [129, 64, 17], hq=4, hkv=1, d=32, dtype=torch.float32, selection="random", seed=2)


def test_g16_selected():
    _check([90], [90], hq=16, hkv=1, d=32, dtype=torch.bfloat16, selection="select", seed=3)


@pytest.mark.parametrize("pair,exact_delta,tma", [(False, True, False), (True, True, False), (False, False, False),
                                                   (False, True, True)])
def test_internal_variants(pair, exact_delta, tma, monkeypatch):
    # forward and dq with one or two K/V blocks per step, TMA box loads of K/V, and the
    # two delta modes that the autograd path does not take (it keeps the output's rounding residual
    # instead); the FA-style delta from the rounded O is checked in fp32 only (in bf16 it exceeds the 2x
    # rule).
    monkeypatch.setattr(SA, "TMA_LOADS", tma)
    if tma:  # the descriptor path is taken (a whole box per block: rows of the next sequence get masked)
        kv = torch.zeros(8, 2, 32, dtype=torch.bfloat16, device=DEV)
        assert SA._use_tma(kv, kv, 16, 1) and not SA._use_tma(kv[:, :, :16], kv[:, :, :16], 16, 1)
    dtype = torch.bfloat16 if exact_delta else torch.float32
    _check([45, 0, 101], [60, 0, 101], hq=4, hkv=2, d=32, dtype=dtype, selection="random", seed=7,
           variant=dict(pair=pair, exact_delta=exact_delta))


@pytest.mark.parametrize("chunk", [1, 3])
def test_messy_selections(chunk):
    # block lists as a caller may pass them: unsorted, a block repeated within a row (counts once, as in
    # the reference's mask: the dk/dv kernel's token index must drop the repeat), -1 between entries,
    # future blocks (ignored); dk/dv chunks of 1 or 3 steps of T tokens (many programs per key block)
    gen = torch.Generator().manual_seed(11)
    lens_q, lens_k = [40, 23], [70, 23]
    hq, hkv, d, bs, budget = 4, 2, 32, 16, 6
    q, k, v, dout, _, cu_q, cu_k = _make_case(lens_q, lens_k, hq, hkv, d, "all", seed=11)
    bi = torch.cat([torch.randint(-1, -(-nk // bs), (hkv, nq, budget), generator=gen, dtype=torch.int32)
                    for nq, nk in zip(lens_q, lens_k)], 1)
    bi[:, :, 0] = 0
    bi[:, ::3, 2] = bi[:, ::3, 1]  # repeats, adjacent and not
    bi[:, 1::4, 5] = bi[:, 1::4, 1]
    assert any(torch.unique(r[r >= 0]).numel() < (r >= 0).sum() for r in bi.reshape(-1, budget))
    q, k, v, dout = (x.to(torch.bfloat16).float() for x in (q, k, v, dout))
    scale = d ** -0.5
    exact = _reference(q, k, v, dout, bi, lens_q, lens_k, bs, scale, torch.float64)
    low = _reference(q, k, v, dout, bi, lens_q, lens_k, bs, scale, torch.bfloat16)
    qt, kt, vt, do = (x.to(torch.bfloat16).to(DEV).contiguous() for x in (q, k, v, dout))
    out, lse, resid = SA._forward(qt, kt, vt, bi.to(DEV), bs, cu_q.to(DEV), cu_k.to(DEV), max(lens_q), max(lens_k),
                                  scale, need_resid=True)
    grads = SA._backward(do, qt, kt, vt, out, lse, bi.to(DEV), bs, cu_q.to(DEV), cu_k.to(DEV), max(lens_q),
                         max(lens_k), scale, resid=resid, chunk=chunk)
    for name, e, lo, g in zip(("dq", "dk", "dv"), exact[2:], low[2:], grads):
        g = g.double().cpu()
        err_ref = (lo - e).abs().max().item()
        err = (g - e).abs().max().item()
        assert err <= 2 * err_ref + 1e-3 * max(1.0, e.abs().max().item()), (name, err, err_ref)


def test_token_index_lists_each_blocks_tokens_once_in_order():
    # the dk/dv kernel's transposed index against a direct construction: per (KV head, global key block), the
    # tokens that selected the block, ascending, each once (repeats, -1, future blocks and out-of-range
    # garbage dropped), over chunks of at most 7 entries; sequences of 40, 0 and 23 queries
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k, bs = [40, 0, 23], [70, 5, 23], 16
    cu_q = torch.tensor([0, 40, 40, 63], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 75, 98], dtype=torch.int32)
    bi = torch.randint(-1, 6, (2, 63, 5), generator=g, dtype=torch.int32)
    bi[0, 3, 2] = 2 ** 30
    ch_gb, ch_start, ch_end, e_tok, gb_seq, gb_blk = SA._token_index(bi, cu_q, cu_k, bs, 98, 3, 7)
    blk_off = [0, 5, 6]
    assert (ch_end - ch_start).max() <= 7
    for h in range(2):
        want = {}
        for s in range(3):
            for i in range(lens_q[s]):
                t, pos = int(cu_q[s]) + i, lens_k[s] - lens_q[s] + i
                for b in sorted(set(bi[h, t].tolist())):
                    if 0 <= b and b * bs <= pos:
                        want.setdefault(blk_off[s] + b, []).append(t)
        got = {}
        for c in range(ch_gb.shape[1]):
            gb = int(ch_gb[h, c])
            if gb >= 0:
                assert (int(gb_seq[gb]), int(gb_blk[gb])) == next((s, gb - blk_off[s]) for s in (2, 1, 0)
                                                                   if gb >= blk_off[s] and lens_k[s])
                got.setdefault(gb, []).extend(x for x in e_tok[h, int(ch_start[h, c]):int(ch_end[h, c])].tolist()
                                              if x >= 0)
        assert got == want


@pytest.mark.parametrize("mode", ["sort", "bitmap"])
@pytest.mark.parametrize("rows", ["random", "sorted"])
@pytest.mark.parametrize("T,budget,u_cap", [(4, 5, 20), (3, 7, 6), (16, 3, 40)])
@pytest.mark.parametrize("bs", [4, 1])
def test_union_kernel_equals_torch(T, budget, u_cap, bs, rows, mode, monkeypatch):
    # the Triton union build (its sort, or the tokens' bitmaps of the 14 or 50 blocks: one 32-bit word or two)
    # against the segmented torch.sort
    # version: block lists with -1 padding, future blocks (dropped), partial last tiles, and u_cap truncation
    # (3, 7, 6); "random" rows (repeats, -1 anywhere) and rows of distinct blocks sorted with -1 last, as the
    # selection writes them
    gen = torch.Generator().manual_seed(T * 100 + budget)
    lens_q, lens_k = [37, 0, 9], [50, 4, 9]
    cu_q = torch.tensor([0, 37, 37, 46], dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 54, 63], dtype=torch.int32)
    hkv, nb = 2, -(-50 // bs)
    bi = torch.randint(-1, nb, (hkv, sum(lens_q), budget), generator=gen, dtype=torch.int32)
    if rows == "sorted":
        bi = torch.where(torch.rand(bi.shape, generator=gen) < 0.2, -1,
                         torch.rand(hkv, sum(lens_q), nb, generator=gen).argsort(-1)[..., :budget].int())
        bi = torch.where(bi >= 0, bi, 1 << 20).sort(-1).values  # valid blocks ascending, then the -1 padding
        bi = torch.where(bi == 1 << 20, -1, bi)
    bi = bi.transpose(1, 2).contiguous().transpose(1, 2)  # strided rows: the kernel reads the strides it gets
    monkeypatch.setattr(SA, "UNION_BITMAP_MAX_BINS", 64 if mode == "bitmap" else 0)
    monkeypatch.setattr(SA, "UNION_BITMAP_MIN_CANDIDATES", 0)  # at these sizes too
    tiles = SA._tile_table(cu_q, cu_k, T, sum(lens_q), len(lens_q))
    args = (bi, tiles[1], tiles[2], tiles[3], T, bs, u_cap)
    ub, ubits, cnt = SA._tile_unions(*args, n_blocks=nb)
    ub_t, ubits_t, cnt_t = SA._tile_unions_torch(*args)
    valid = (tiles[0] >= 0)[None, :]
    assert torch.equal(torch.where(valid, cnt, 0), torch.where(valid, cnt_t, 0))
    assert int(cnt_t.max()) > 1 and (u_cap > 6 or int(cnt_t.max()) == u_cap)
    live = (torch.arange(u_cap)[None, None, :] < cnt_t[..., None]) & valid[..., None]
    assert torch.equal(torch.where(live, ub[..., :u_cap], -9), torch.where(live, ub_t[..., :u_cap], -9))
    assert torch.equal(torch.where(live, ubits[..., :u_cap], 0), torch.where(live, ubits_t[..., :u_cap], 0))



@pytest.mark.parametrize("wgs", [1, 3])
def test_plan_tiles_hold_the_union_of_their_tokens_selections(wgs):
    """The plan of the forward: tiles of ``wgs`` row tiles' tokens (the warp-specialised Hopper forward's programs,
    3 row tiles of T tokens), each with the sorted union of the blocks its tokens selected (future blocks dropped)
    and per block the bitmask of the tokens that selected it; checked against a direct count per token."""
    gen = torch.Generator().manual_seed(wgs)
    lens_q, lens_k = [37, 0, 61, 5], [50, 4, 61, 90]
    hq, hkv, bs, budget = 8, 2, 4, 5
    q = torch.zeros(sum(lens_q), hq, 16)
    k = torch.zeros(sum(lens_k), hkv, 16)
    cu_q = torch.tensor([0, 37, 37, 98, 103], dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 54, 115, 205], dtype=torch.int32)
    bi = torch.randint(-1, 24, (hkv, sum(lens_q), budget), generator=gen, dtype=torch.int32)
    plan = SA._Plan(q, k, bi, bs, cu_q, cu_k, max(lens_k), None, wgs=wgs)
    T = SA._tile_shape(hq // hkv, None)[0] * wgs
    assert plan.T == T and plan.wgs == wgs
    seen = 0
    for t in range(plan.n_tiles):
        seq, q0, nq, pos0 = (int(x[t]) for x in (plan.tile_seq, plan.tile_q0, plan.tile_nq, plan.tile_pos0))
        if seq < 0:
            assert all(int(plan.cnt[h, t]) == 0 for h in range(hkv))
            continue
        local = q0 - int(cu_q[seq])  # the tile's first token within its sequence
        assert 0 < nq <= T and local % T == 0 and q0 + nq <= int(cu_q[seq + 1])
        assert nq == T or q0 + nq == int(cu_q[seq + 1])  # only a sequence's last tile is partial
        assert pos0 == lens_k[seq] - lens_q[seq] + local
        seen += nq
        for h in range(hkv):
            want = {}
            for j in range(nq):
                for g in bi[h, q0 + j].tolist():
                    if g >= 0 and g * bs <= pos0 + j:
                        want[g] = want.get(g, 0) | (1 << j)
            cnt = int(plan.cnt[h, t])
            assert plan.ub[h, t, :cnt].tolist() == sorted(want)
            assert plan.ubits[h, t, :cnt].tolist() == [want[g] for g in sorted(want)]
    assert seen == sum(lens_q)


def test_warp_specialised_forward_applies_where_its_tiles_fit(monkeypatch):
    """Where the warp-specialised Hopper forward runs (the choice itself needs no GPU): d 128, bf16 / fp16, TMA,
    64-row tiles, its three row tiles' tokens within the 64-bit token mask, and a plan the union kernel builds; the
    launcher refuses a plan built for another number of row tiles."""
    from infllmv2.ops.triton import sparse_fwd_sm90 as F
    monkeypatch.setattr(F, "on_sm90", lambda x: True)
    q = torch.zeros(4, 32, 128, dtype=torch.bfloat16)
    assert F.sparse_fwd_sm90_ws_tiles(q, 64, 4, 64, True) == 3  # G 16: 4 tokens a row tile
    assert F.sparse_fwd_sm90_ws_tiles(q, 64, 21, 64, True) == 3  # 63 tokens a program
    assert F.sparse_fwd_sm90_ws_tiles(q, 64, 32, 64, True) == 0  # 96 tokens: past the mask
    assert F.sparse_fwd_sm90_ws_tiles(q, 64, 4, 64, False) == 0  # no TMA
    assert F.sparse_fwd_sm90_ws_tiles(q, 64, 4, 128, True) == 0  # 128-row tiles
    assert F.sparse_fwd_sm90_ws_tiles(q.float(), 64, 4, 64, True) == 0
    assert F.sparse_fwd_sm90_ws_tiles(q[..., :64], 64, 4, 64, True) == 0  # d 64: the plain Gluon forward
    # the forward's choice: also only where the union kernel builds the plan of three row tiles
    monkeypatch.setattr(SA, "_INTERPRET", False)
    monkeypatch.setattr(SA.FWD_SM90_WS, "enabled", True)
    kv = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    bi96, bi32 = torch.zeros(2, 4, 96, dtype=torch.int32), torch.zeros(2, 4, 32, dtype=torch.int32)
    assert SA._ws_tiles(q, kv, bi96, 64, None, True) == 3  # G 16: 12 tokens x 96 blocks = 1152 candidates
    assert SA._ws_tiles(q[:, :8], kv, bi96, 64, None, True) == 0  # G 4: 48 tokens x 96 = 4608, past the kernel
    assert SA._ws_tiles(q[:, :8], kv, bi32, 64, None, True) == 3  # G 4 at 32 blocks: 1536
    monkeypatch.setattr(SA, "UNION_KERNEL", False)
    assert SA._ws_tiles(q, kv, bi96, 64, None, True) == 0
    monkeypatch.setattr(SA, "UNION_KERNEL", True)
    monkeypatch.setattr(SA.FWD_SM90_WS, "enabled", False)
    assert SA._ws_tiles(q, kv, bi96, 64, None, True) == 0
    plan = SA._Plan(q, torch.zeros(4, 2, 128), torch.zeros(2, 4, 1, dtype=torch.int32), 64,
                    torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32), 4, None)
    with pytest.raises(ValueError, match="plan"):
        F.sparse_fwd_sm90_ws(q, torch.zeros(4, 2, 128), None, None, None, None, plan, None, 64, 1.0, False)


def test_sm90_forward_launchers_pass_every_kernel_parameter(monkeypatch):
    """The Hopper launchers (the kernels themselves need an sm90 GPU) hand each kernel every parameter exactly once,
    on one program per plan tile and KV head, with the tokens of one row tile as T."""
    from infllmv2.ops.triton import sparse_fwd_sm90 as F
    if not F.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    calls = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.__setitem__(self.name, (grid, args, kwargs))

    names = ("_sparse_fwd_kernel_sm90", "_sparse_fwd_kernel_sm90_ws")
    real = {name: getattr(F, name) for name in names}
    for name in names:
        monkeypatch.setattr(F, name, Recorder(name))
    n, hq, hkv, d = 40, 32, 2, 128
    q = torch.zeros(n, hq, d, dtype=torch.bfloat16)
    k = torch.zeros(n, hkv, d, dtype=torch.bfloat16)
    cu = torch.tensor([0, n], dtype=torch.int32)
    bi = torch.zeros(hkv, n, 3, dtype=torch.int32)
    out, resid, lse = torch.empty_like(q), torch.empty_like(q), torch.empty(hq, n)
    plans = {names[0]: SA._Plan(q, k, bi, 64, cu, cu, n, 64), names[1]: SA._Plan(q, k, bi, 64, cu, cu, n, 64, wgs=3)}
    F.sparse_fwd_sm90(q, k, k, out, resid, lse, plans[names[0]], cu, 64, 1.0, True)
    F.sparse_fwd_sm90_ws(q, k, k, out, resid, lse, plans[names[1]], cu, 64, 1.0, True)
    for name in names:
        grid, args, kwargs = calls[name]
        params = real[name].arg_names
        given = list(params[:len(args)]) + [x for x in kwargs if x not in ("num_warps", "maxnreg")]
        assert sorted(given) == sorted(params), name
        assert grid == (plans[name].n_tiles, hkv)
        assert kwargs["T"] == 4 and kwargs["G"] == 16 and kwargs["D"] == d and kwargs["STORE_RESID"] is True
    assert calls[names[1]][2]["maxnreg"] == F._WS_MAXNREG

def test_full_budget_equals_dense():
    # budget covering every block: equal to dense causal attention (tight fp32 tolerance)
    lens = [70, 33]
    q, k, v, dout, bi, cu_q, cu_k = _make_case(lens, lens, 4, 2, 32, "all", seed=4)
    got = sparse_attention_triton(q, k, v, bi, 16, cu_q, cu_k, 70, 70)
    qo = 0
    for n in lens:
        o, l = naive.dense_attention(q[qo:qo + n], k[qo:qo + n], v[qo:qo + n])
        torch.testing.assert_close(got[0][qo:qo + n], o, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got[1][:, qo:qo + n], l, atol=2e-5, rtol=2e-5)
        qo += n


def test_causal_future_tokens_do_not_matter():
    lens = [80]
    q, k, v, dout, bi, cu_q, cu_k = _make_case(lens, lens, 2, 1, 32, "random", seed=5)
    o1, _ = sparse_attention_triton(q, k, v, bi, 16, cu_q, cu_k, 80, 80)
    k2, v2 = k.clone(), v.clone()
    k2[50:] += 3.0
    v2[50:] -= 2.0
    o2, _ = sparse_attention_triton(q, k2, v2, bi, 16, cu_q, cu_k, 80, 80)
    torch.testing.assert_close(o1[:50], o2[:50], atol=0, rtol=0)


def test_bad_inputs():
    q = torch.randn(10, 4, 32)
    k = torch.randn(10, 2, 32)
    bi = torch.zeros(2, 10, 3, dtype=torch.int32)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple"):
        sparse_attention_triton(q, torch.randn(10, 3, 32), torch.randn(10, 3, 32), torch.zeros(3, 10, 3,
                                dtype=torch.int32), 16, cu, cu, 10, 10)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_attention_triton(torch.randn(10, 4, 48), torch.randn(10, 2, 48), torch.randn(10, 2, 48), bi, 16, cu,
                                cu, 10, 10)
    with pytest.raises(ValueError, match="block_indices"):
        sparse_attention_triton(q, k, k, bi[:, :5], 16, cu, cu, 10, 10)
    with pytest.raises(TypeError, match="block_indices"):
        sparse_attention_triton(q, k, k, bi.long(), 16, cu, cu, 10, 10)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        sparse_attention_triton(q, k, k, bi, 16, cu.long(), cu, 10, 10)
    with pytest.raises(ValueError, match="block_size"):
        sparse_attention_triton(q, k, k, bi, 24, cu, cu, 10, 10)
    with pytest.raises(TypeError, match="dtype"):
        sparse_attention_triton(q, k.half(), k, bi, 16, cu, cu, 10, 10)


def test_torch_compile_traces():
    lens = [40, 23]
    q, k, v, dout, bi, cu_q, cu_k = _make_case(lens, lens, 4, 2, 32, "random", seed=6)
    q.requires_grad_(True)

    def f(q, k, v):
        return sparse_attention_triton(q, k, v, bi, 16, cu_q, cu_k, 40, 40)[0]

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    out.backward(dout)
    ref = f(q.detach(), k, v)
    torch.testing.assert_close(out.detach(), ref)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_decode_batch_and_degenerate_rows():
    # len_q = 1 per sequence (decode), a key length shorter than one block, a token whose head
    # selected nothing (zero output, lse -inf, finite zero gradients), indices past the sequence
    # (ignored), an all-empty batch and a zero budget.
    lens_k = [1, 17, 40, 100]
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(4, 4, 32, generator=gen, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 32, generator=gen, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 32, generator=gen, requires_grad=True)
    cu_q = torch.arange(5, dtype=torch.int32)
    cu_k = torch.tensor([0, 1, 18, 58, 158], dtype=torch.int32)
    bi = torch.full((2, 4, 3), -1, dtype=torch.int32)
    bi[:, 0, 0] = 0
    bi[:, 1, :2] = torch.tensor([0, 1])
    bi[:, 2, :] = torch.tensor([1, 2, 50])
    bi[0, 3, :] = torch.tensor([0, 5, 6])  # head 1 of token 3: nothing selected
    out, lse = sparse_attention_triton(q, k, v, bi, 16, cu_q, cu_k, 1, 100)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert out[3, 2:].abs().max() == 0 and torch.isinf(lse[2:, 3]).all()
    ko = 0
    for i, nk in enumerate(lens_k):
        b = bi[:, i:i + 1]
        b = torch.where(b >= -(-nk // 16), -1, b)
        ro, rl = naive.sparse_attention(q[i:i + 1].detach(), k[ko:ko + nk].detach(), v[ko:ko + nk].detach(), b, 16)
        torch.testing.assert_close(out[i:i + 1].detach(), ro.nan_to_num(), atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse[:, i:i + 1].detach(), rl, atol=2e-6, rtol=2e-6)
        ko += nk
    # all-empty batch and zero budget
    z = torch.zeros(0, 4, 32)
    zk = torch.zeros(0, 2, 32)
    cu0 = torch.zeros(3, dtype=torch.int32)
    o0, l0 = sparse_attention_triton(z, zk, zk, torch.zeros(2, 0, 3, dtype=torch.int32), 16, cu0, cu0, 0, 0)
    assert o0.shape == (0, 4, 32) and l0.shape == (4, 0)
    o1, l1 = sparse_attention_triton(q.detach(), k.detach(), v.detach(), torch.zeros(2, 4, 0, dtype=torch.int32), 16,
                                     cu_q, cu_k, 1, 100)
    assert o1.abs().max() == 0 and torch.isinf(l1).all()
