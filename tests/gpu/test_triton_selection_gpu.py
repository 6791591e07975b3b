"""Triton stage-1 selection and decode on a GPU at full sizes (skipped without CUDA).

bf16 selections are compared with the fp32 reference by score (reference block scores of the
chosen set vs of the reference set), plus the structural invariants; fp32 selections exactly.
The reference materialises (Hkv, n, nb, n1) masks, so the reference checks stay at a few thousand
tokens (and 16 query rows at 128K); the 128K case also checks invariants and peak memory.
"""
from __future__ import annotations

import pytest
import torch

from infllmv2.config import SparseConfig
from infllmv2.ops import naive

from helpers import assert_selection_matches_by_score

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEV = "cuda"


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype,g,hkv,d,approx", [
    (torch.bfloat16, 16, 2, 128, True),   # standard shape
    (torch.bfloat16, 4, 2, 64, False),    # Llama-like
    (torch.float32, 16, 2, 128, True),
])
def test_selection_vs_reference(dtype, g, hkv, d, approx):
    from infllmv2.ops.triton import select_blocks_triton
    cfg = SparseConfig(dense_len=-1, lse_approx=approx, topk=32, window_size=1024)
    lens_k, lens_q = [5000, 0, 700, 2100], [5000, 0, 100, 33]
    torch.manual_seed(0)
    k = torch.randn(sum(lens_k), hkv, d, device=DEV, dtype=dtype)
    q = torch.randn(sum(lens_q), hkv * g, d, device=DEV, dtype=dtype)
    cuq, cuk = _cu(lens_q), _cu(lens_k)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    for i in range(len(lens_k)):
        if lens_q[i] == 0:
            continue
        qs, ks, gi = q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], got[:, cuq[i]:cuq[i + 1]]
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        ref = assert_selection_matches_by_score(qs, ks, cfg, gi, d ** -0.5, rtol=tol, atol=tol)
        if dtype == torch.float32:
            # fp32 on the GPU: the kernel's dot sums in another order than the reference's matmul,
            # so near-ties (~1e-7 relative) may flip; nearly all rows must still be identical
            assert (gi == ref).all(-1).float().mean().item() >= 0.99


@pytest.mark.parametrize("overlap", [False, True])
def test_selection_128k_invariants_and_memory(overlap, monkeypatch):
    from infllmv2.ops.triton import select_blocks_triton
    from infllmv2.ops.triton import selection as S
    monkeypatch.setattr(S, "TOPK_OVERLAP", overlap)  # two workspaces: still within 1 GiB
    cfg = SparseConfig(dense_len=-1)
    n = 131072
    torch.manual_seed(0)
    q = torch.randn(n, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(n, 2, 128, device=DEV, dtype=torch.bfloat16)
    cu = _cu([n])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    idx = select_blocks_triton(q, k, cfg, cu, cu, n, n)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= (1 << 30)
    bq = (torch.arange(n, device=DEV) // 64)
    size = (idx >= 0).sum(-1)
    assert torch.equal(size, torch.clamp(bq + 1, max=cfg.budget).expand_as(size))
    assert (idx <= bq[None, :, None]).all()
    valid = idx >= 0
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all()
    # forced: block 0, the current block and the 32 before it
    assert (idx[..., 0][:, 64:] == 0).all()
    last = idx.gather(-1, (size - 1).clamp_min(0).long()[..., None])[..., 0]
    assert torch.equal(last, bq.int().expand_as(last))
    # the last 16 tokens by score against an fp32 scoring of their rows
    sub = slice(n - 16, n)
    sc = naive.block_scores(q[sub].float(), k.float(), cfg, 128 ** -0.5)
    ref = naive.topk_blocks(sc, torch.arange(n - 16, n, device=DEV), cfg)
    nb = sc.shape[-1]
    scp = torch.cat([sc, sc.new_zeros(sc.shape[:-1] + (1,))], -1)
    got = idx[:, sub]
    sg = torch.gather(scp, -1, torch.where(got < 0, nb, got.long())).sum(-1)
    sr = torch.gather(scp, -1, torch.where(ref < 0, nb, ref.long())).sum(-1)
    torch.testing.assert_close(sg, sr, rtol=1e-3, atol=1e-3)


def test_topk_overlap_selects_identically(monkeypatch):
    """TOPK_OVERLAP: each workspace chunk's top-k beside the next chunk's scoring (on a side stream) selects exactly
    what the one-stream path selects (a small workspace: many chunks, both workspaces reused; an empty sequence), and
    the output is complete on the caller's stream when the call returns."""
    from infllmv2.ops.triton import select_blocks_triton
    from infllmv2.ops.triton import selection as S
    cfg = SparseConfig(dense_len=-1)
    lens = [20000, 0, 9000]
    torch.manual_seed(0)
    q = torch.randn(sum(lens), 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(sum(lens), 2, 128, device=DEV, dtype=torch.bfloat16)
    cu = _cu(lens)
    monkeypatch.setattr(S, "_WORKSPACE_BYTES", 8 << 20)
    monkeypatch.setattr(S, "TOPK_OVERLAP", False)
    ref = select_blocks_triton(q, k, cfg, cu, cu, max(lens), max(lens))
    monkeypatch.setattr(S, "TOPK_OVERLAP", True)
    side = []  # the overlapped path ran (it needs at least _OVERLAP_MIN_CHUNKS chunks)
    stream_of = S._score_stream
    monkeypatch.setattr(S, "_score_stream", lambda dev: side.append(dev) or stream_of(dev))
    got = select_blocks_triton(q, k, cfg, cu, cu, max(lens), max(lens))
    assert side
    assert torch.equal(got, ref)


def test_decode_vs_reference_and_prefill():
    from infllmv2.ops.triton import infllmv2_decode_triton, select_blocks_triton
    torch.manual_seed(1)
    cfg = SparseConfig(dense_len=3000, topk=32, window_size=1024)
    lens = [5000, 1, 2999, 3000, 4100]
    hkv, d, g, ml = 2, 128, 16, 5100
    kc = torch.randn(len(lens), ml, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(len(lens), ml, hkv, d, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(len(lens), hkv * g, d, device=DEV, dtype=torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, return_block_indices=True)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1].double(), kc[i, :n].double(), vc[i, :n].double(), cfg)
        low, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg)
        err = (out[i].double() - ref[0]).abs().max().item()
        lerr = (low[0].double() - ref[0]).abs().max().item()
        assert err <= 2 * lerr + 1e-4, (n, err, lerr)
        if cfg.is_sparse(n):
            pre = select_blocks_triton(q[i:i + 1], kc[i, :n].contiguous(), cfg, _cu([1]), _cu([n]), 1, n)
            assert torch.equal(pre[:, 0], idx[:, i])


def test_decode_left_padded_equals_right_aligned_rows_moved_to_slot_0():
    from infllmv2.ops.triton import infllmv2_decode_triton
    torch.manual_seed(2)
    cfg = SparseConfig(dense_len=3000, topk=32, window_size=1024)
    lens, ml, hkv, d, g = [5000, 2999, 4100, 1], 5100, 2, 128, 16
    kc = torch.randn(len(lens), ml, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(len(lens), ml, hkv, d, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(len(lens), hkv * g, d, device=DEV, dtype=torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    pad = ml - sl
    out = infllmv2_decode_triton(q, kc, vc, sl, cfg, cache_leftpad=pad)
    k0, v0 = torch.zeros_like(kc), torch.zeros_like(vc)
    for i, n in enumerate(lens):  # the same rows starting at slot 0
        k0[i, :n], v0[i, :n] = kc[i, ml - n:], vc[i, ml - n:]
    torch.testing.assert_close(out, infllmv2_decode_triton(q, k0, v0, sl, cfg), atol=0, rtol=0)


def test_decode_cuda_graph_replays_equal_eager_steps():
    # the forced blocks' attention runs on a side stream and the last program per (sequence, KV head) merges
    # the partials through an atomic ticket: captured once, replayed with new queries and lengths, every replay
    # must equal the eager step (same kernels, same order of sums)
    from infllmv2.ops.triton import infllmv2_decode_triton
    torch.manual_seed(3)
    cfg = SparseConfig(dense_len=3000)
    hkv, d, g, ml, b = 2, 128, 16, 20000, 4
    kc = torch.randn(b, ml, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(b, ml, hkv, d, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(b, hkv * g, d, device=DEV, dtype=torch.bfloat16)
    sl = torch.tensor([20000, 7000, 2999, 1], dtype=torch.int32, device=DEV)
    step = lambda: infllmv2_decode_triton(q, kc, vc, sl, cfg)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for i in range(20):
        q.copy_(torch.randn_like(q))
        sl.copy_(torch.tensor([20000 - 37 * i, 7000 + 501 * i, 2999 + i, 1 + 900 * i], dtype=torch.int32))
        graph.replay()
        torch.testing.assert_close(out, step(), atol=0, rtol=0)


@pytest.mark.parametrize("g,hkv,d,cfg_kw", [
    (16, 2, 128, {}), (3, 3, 64, {}), (4, 2, 128, {}), (32, 1, 128, {}),
    (16, 2, 128, dict(block_size=128, topk=16, window_size=1024)),  # 8 windows a block
    (4, 2, 64, dict(block_size=32, kernel_size=32, kernel_stride=16, topk=64, window_size=512)),  # 2 a block
])
@pytest.mark.parametrize("pairs,stages,ws", [(False, 1, 0), (False, 2, 0), (True, 2, 0), (False, 1, 4)])
def test_sm90_scoring_kernel_matches_triton_kernel(g, hkv, d, cfg_kw, pairs, stages, ws, monkeypatch):
    """The Gluon scoring kernel (Hopper) against the Triton one on the same inputs: the same products,
    exponentials and sums, so the same selections up to summation-order near-ties; window tiles one a step through
    one TMA slot (the default) or two, or in pairs (``score_sm90._PAIRS``, ``_STAGES``), or the warp-specialised
    kernel (``WS_TILES``: four tiles a program, with the tiles of a group that starts in another sequence left to the
    one-tile kernel; a small workspace, so chunks start at tiles other than 0; at every G and d, where the default keeps
    it to G >= 16 at d 128)."""
    from infllmv2.ops.triton import score_sm90, select_blocks_triton, selection
    if torch.cuda.get_device_capability()[0] != 9 or not score_sm90.HAVE_GLUON:
        pytest.skip("needs an sm90 GPU and Triton's Gluon")
    monkeypatch.setattr(score_sm90, "_PAIRS", pairs)
    monkeypatch.setattr(score_sm90, "_STAGES", stages)
    monkeypatch.setattr(score_sm90, "WS_TILES", ws)
    ws_launches = []
    if ws:
        monkeypatch.setattr(selection, "_WORKSPACE_BYTES", 16 << 20)
        monkeypatch.setattr(score_sm90, "_WS_MIN_GP", 0)
        monkeypatch.setattr(score_sm90, "_WS_HEAD_DIMS", (64, 128))
        real_ws = score_sm90._score_kernel_sm90_ws

        class WsSpy:  # counts the warp-specialised kernel's launches
            def __getitem__(self, grid):
                ws_launches.append(grid)
                return real_ws[grid]
        monkeypatch.setattr(score_sm90, "_score_kernel_sm90_ws", WsSpy())
    calls = []
    real = selection.score_blocks_sm90
    monkeypatch.setattr(selection, "score_blocks_sm90", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    cfg = SparseConfig(dense_len=-1, **cfg_kw)
    lens_k, lens_q = [37000, 0, 700, 2100, 4099], [37000, 0, 100, 33, 4099]
    torch.manual_seed(1)
    k = torch.randn(sum(lens_k), hkv, d, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(sum(lens_q), hkv * g, d, device=DEV, dtype=torch.bfloat16)
    cuq, cuk = _cu(lens_q), _cu(lens_k)
    monkeypatch.setattr(selection.SCORE_SM90, "enabled", True)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    n_calls = len(calls)
    assert n_calls, "the sm90 scoring kernel did not run"
    assert bool(ws_launches) == bool(ws), ws_launches
    monkeypatch.setattr(selection.SCORE_SM90, "enabled", False)
    ref = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    assert len(calls) == n_calls
    same = (got == ref).all(-1).float().mean().item()
    assert same >= 0.999, same
    # the short sequences against the fp32 reference, by score
    for i in (2, 3):
        qs, ks, gi = q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], got[:, cuq[i]:cuq[i + 1]]
        assert_selection_matches_by_score(qs, ks, cfg, gi, d ** -0.5, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("g,hkv,d,dtype,cfg_kw", [
    (16, 2, 128, torch.bfloat16, {}), (3, 3, 64, torch.bfloat16, {}), (4, 2, 128, torch.float16, {}),
    (32, 1, 128, torch.bfloat16, {}), (1, 4, 64, torch.bfloat16, {}),
    (16, 2, 128, torch.bfloat16, dict(lse_approx=False)), (4, 2, 64, torch.bfloat16, dict(lse_approx=False)),
])
def test_sm90_lse_kernel_matches_triton_kernel(g, hkv, d, dtype, cfg_kw, monkeypatch):
    """The Gluon LSE kernel (Hopper) against the Triton one on the same inputs: the same products and the same
    per-tile online update in the same tile order, so the same log-sum-exps; varlen with an empty sequence and short
    sequences whose rows see no coarse key yet (the exact fallback over their fine keys). The LSE is read where the
    scoring kernel (either one) receives it."""
    from infllmv2.ops.triton import lse_sm90, select_blocks_triton, selection
    if torch.cuda.get_device_capability()[0] != 9 or not lse_sm90.HAVE_GLUON:
        pytest.skip("needs an sm90 GPU and Triton's Gluon")
    calls, seen = [], []
    real_lse = selection.lse_sm90
    monkeypatch.setattr(selection, "lse_sm90", lambda *a, **kw: (calls.append(1), real_lse(*a, **kw))[1])

    class ScoreSpy:  # the LSE, as the Triton scoring kernel's third argument
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(a[2].clone())
                return real_score[grid](*a, **kw)
            return launch
    real_score = selection._score_kernel
    real_score90 = selection.score_blocks_sm90
    monkeypatch.setattr(selection, "_score_kernel", ScoreSpy())
    monkeypatch.setattr(selection, "score_blocks_sm90",
                        lambda q, k1, lse, *a, **kw: (seen.append(lse.clone()), real_score90(q, k1, lse, *a, **kw))[1])
    cfg = SparseConfig(dense_len=-1, **cfg_kw)
    lens_k, lens_q = [37000, 0, 700, 2100, 100, 4099], [37000, 0, 100, 33, 100, 4099]
    torch.manual_seed(2)
    k = torch.randn(sum(lens_k), hkv, d, device=DEV, dtype=dtype)
    q = torch.randn(sum(lens_q), hkv * g, d, device=DEV, dtype=dtype)
    cuq, cuk = _cu(lens_q), _cu(lens_k)
    monkeypatch.setattr(selection.LSE_SM90, "enabled", True)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    assert calls, "the sm90 LSE kernel did not run"
    lse_got = seen[0]
    seen.clear()
    monkeypatch.setattr(selection.LSE_SM90, "enabled", False)
    ref = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    assert len(calls) == 1
    lse_ref = seen[0]
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse_got), fin)
    assert fin.float().mean() > 0.99
    torch.testing.assert_close(lse_got[fin], lse_ref[fin], atol=1e-5, rtol=1e-6)
    same = (got == ref).all(-1).float().mean().item()
    assert same >= 0.999, same
