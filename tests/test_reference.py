"""The reference (ops/naive.py) against brute-force loops of the SPEC, and the SPEC's invariants."""
import math

import pytest
import torch

from infllmv2 import SparseConfig
from infllmv2.ops import naive

from helpers import SMALL, brute_select, mask_from_indices, masked_sdpa, rand_qkv


def test_compress_keys_matches_loop():
    k = torch.randn(75, 2, 8, dtype=torch.float64)
    c = naive.compress_keys(k, 16, 8)
    assert c.shape == ((75 - 16) // 8 + 1, 2, 8)
    for j in range(c.shape[0]):
        torch.testing.assert_close(c[j], k[j * 8:j * 8 + 16].mean(0))
    assert naive.compress_keys(k[:15], 16, 8).shape[0] == 0


@pytest.mark.parametrize("lse_approx", [True, False])
@pytest.mark.parametrize("n, nk, hq, hkv", [(150, 150, 4, 2), (37, 37, 3, 1), (20, 170, 2, 2), (1, 200, 4, 1)])
def test_selection_matches_brute_force(lse_approx, n, nk, hq, hkv):
    cfg = SMALL.replace(lse_approx=lse_approx)
    q, k, _ = rand_qkv(n, hq, hkv, 8, nk=nk, seed=n + nk)
    scale = 8 ** -0.5
    want, scores = brute_select(q, k, cfg, scale)
    torch.testing.assert_close(naive.block_scores(q, k, cfg, scale), scores)
    got = naive.select_blocks(q, k, cfg, scale)
    for h in range(hkv):
        for i in range(n):
            row = got[h, i].tolist()
            assert [b for b in row if b >= 0] == want[h][i]
            assert row == sorted(b for b in row if b >= 0) + [-1] * row.count(-1)


def test_selection_invariants_default_config():
    cfg = SparseConfig(dense_len=-1, topk=8, window_size=256)  # budget 12 blocks of 64
    n = 1500
    q, k, _ = rand_qkv(n, 4, 2, 16, dtype=torch.float32)
    idx = naive.select_blocks(q, k, cfg)
    pos = torch.arange(n)
    bq = pos // 64
    for h in range(2):
        for i in range(0, n, 7):
            sel = [b for b in idx[h, i].tolist() if b >= 0]
            assert len(sel) == min(cfg.budget, int(bq[i]) + 1)  # selection size
            assert max(sel) <= bq[i]  # no future block
            forced = {0} | set(range(max(0, int(bq[i]) - cfg.local_blocks), int(bq[i]) + 1))
            assert forced <= set(sel)


def test_sparse_equals_dense_when_budget_covers():
    cfg = SMALL.replace(topk=20)  # budget 21 blocks * 16 >= 300
    q, k, v = rand_qkv(300, 6, 2, 16)
    out, _ = naive.infllmv2_attention(q, k, v, cfg)
    want = masked_sdpa(q, k, v, torch.ones(300, 300, dtype=torch.bool).tril()[None].expand(2, -1, -1))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_sparse_matches_masked_dense_forward_and_gradients():
    q, k, v = rand_qkv(200, 6, 2, 16)
    idx = naive.select_blocks(q, k, SMALL)
    mask = mask_from_indices(idx, 200, SMALL.block_size)
    assert (naive.selection_mask(idx, 200, 16) == mask).all()
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = naive.sparse_attention(q, k, v, idx, 16)
    want = masked_sdpa(q, k, v, mask)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), dout)
    g2 = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_forced_blocks_outrank_scores_that_overflowed():
    """Candidate scores of +inf (an fp32 overflow) tie with nothing: the forced blocks (first, local, current) are
    always selected, as the Triton kernels do (a tie with their +inf rank let lower candidates push them out)."""
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=3, init_blocks=1)
    scores = torch.full((1, 1, 8), math.inf)
    got = naive.topk_blocks(scores, torch.tensor([127]), cfg)  # token 127: block 7, window block 6, first block 0
    assert got.flatten().tolist() == [0, 1, 6, 7]  # budget 4: the forced blocks, then a candidate, ties to the lower


@pytest.mark.parametrize("lse_approx", [True, False])
def test_causality(lse_approx):
    cfg = SMALL.replace(lse_approx=lse_approx)
    q, k, v = rand_qkv(220, 4, 2, 8, seed=3)
    t = 131
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[t + 1:] += torch.randn_like(q2[t + 1:]) * 3
    k2[t + 1:] += torch.randn_like(k2[t + 1:]) * 3
    v2[t + 1:] -= 1
    i1, i2 = naive.select_blocks(q, k, cfg), naive.select_blocks(q2, k2, cfg)
    assert torch.equal(i1[:, :t + 1], i2[:, :t + 1])
    o1, _ = naive.infllmv2_attention(q, k, v, cfg)
    o2, _ = naive.infllmv2_attention(q2, k2, v2, cfg)
    torch.testing.assert_close(o1[:t + 1], o2[:t + 1], rtol=0, atol=0)


def test_group_shares_selection():
    # Heads of one group see the same blocks: permuting the G query heads of a group changes nothing.
    q, k, v = rand_qkv(180, 6, 2, 8, seed=5)
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    assert torch.equal(naive.select_blocks(q, k, SMALL), naive.select_blocks(q[:, perm], k, SMALL))


def test_decode_positions_count_the_cache():
    # q shorter than k: queries are the last positions; equal to the rows of a full pass.
    q, k, v = rand_qkv(190, 4, 2, 8, seed=7)
    full, _ = naive.infllmv2_attention(q, k, v, SMALL)
    part, _ = naive.infllmv2_attention(q[-5:], k, v, SMALL)
    torch.testing.assert_close(part, full[-5:], rtol=1e-12, atol=1e-12)


def test_short_and_empty_sequences():
    q, k, v = rand_qkv(5, 2, 1, 8)  # shorter than one window: no fine key, all scores 0
    out, lse = naive.infllmv2_attention(q, k, v, SMALL)
    torch.testing.assert_close(out, naive.dense_attention(q, k, v)[0])
    q0 = q[:0]
    out0, _ = naive.infllmv2_attention(q0, k[:0], v[:0], SMALL)
    assert out0.shape == (0, 2, 8)
