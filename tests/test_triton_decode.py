"""Triton decode step (infllmv2.ops.triton.decode) against the reference on the last token.

Runs through the Triton interpreter on the CPU at small sizes: batch of sequences of different
lengths in a padded cache; dense below ``dense_len`` per sequence, sparse otherwise.
"""
from __future__ import annotations

import pytest
import torch

from infllmv2.config import SparseConfig
from infllmv2.ops import naive
from infllmv2.ops.triton.decode import infllmv2_decode_triton

SMALL = dict(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=3, init_blocks=1)


def _cache(lens, max_len, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    kc = torch.randn(b, max_len, hkv, d, generator=g).to(dtype)
    vc = torch.randn(b, max_len, hkv, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("lse_approx", [True, False])
@pytest.mark.parametrize("dense_len", [-1, 150])
@pytest.mark.parametrize("g,hkv,d", [(1, 2, 32), (3, 1, 32), (4, 2, 64)])
def test_decode_matches_reference_fp32(lse_approx, dense_len, g, hkv, d):
    cfg = SparseConfig(lse_approx=lse_approx, dense_len=dense_len, **SMALL)
    # 30: the local window reaches back over the initial block (counted once)
    lens = [300, 1, 45, 200, 150, 149, 30]
    q, kc, vc, sl = _cache(lens, 310, g * hkv, hkv, d, torch.float32, seed=g * 10 + d)
    out, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, return_block_indices=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg)
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)
        if cfg.is_sparse(n):
            assert torch.equal(idx[:, i], naive.select_blocks(q[i:i + 1], kc[i, :n], cfg)[:, 0])


def test_decode_topk_ties_prefer_lower_blocks():
    # the decode top-k selects what the reference does with distinct scores, and with bitwise ties (keys
    # repeating with the block period make every candidate block score equal) keeps the lowest blocks (the
    # float64 reference's own rounding is not tie-consistent there, so row 1 is checked against the rule)
    cfg = SparseConfig(dense_len=-1, **SMALL)
    lens = [300, 230, 151]
    q, kc, vc, sl = _cache(lens, 300, 4, 2, 16, torch.float32, seed=9)
    period = torch.randn(cfg.block_size, 2, 16, generator=torch.Generator().manual_seed(2))
    kc[1] = period.repeat(-(-300 // cfg.block_size), 1, 1)[:300]
    _, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, return_block_indices=True)
    for i in (0, 2):
        assert torch.equal(idx[:, i], naive.select_blocks(q[i:i + 1], kc[i, :lens[i]], cfg)[:, 0]), i
    free = cfg.budget - cfg.init_blocks - (cfg.local_blocks + 1)
    b = (lens[1] - 1) // cfg.block_size
    expect = list(range(cfg.init_blocks + free)) + list(range(b - cfg.local_blocks, b + 1))
    assert idx[0, 1].tolist() == expect and idx[1, 1].tolist() == expect


@pytest.mark.parametrize("lse_approx", [True, False])
def test_decode_given_compressed_keys_and_scale(lse_approx):
    # given keys (a padded (batch, rows) layout the kernels index by length); lengths below and at the window sizes
    cfg = SparseConfig(dense_len=-1, lse_approx=lse_approx, **SMALL)
    lens = [260, 77, 16, 5, 64]
    q, kc, vc, sl = _cache(lens, 270, 8, 2, 32, torch.float32, seed=5)
    kf = torch.zeros(len(lens), 40, 2, 32)
    kco = torch.zeros(len(lens), 10, 2, 32)
    for i, n in enumerate(lens):
        f = naive.compress_keys(kc[i, :n], 16, 8)
        c = naive.compress_keys(kc[i, :n], 64, 32)
        kf[i, :f.shape[0]] = f
        kco[i, :c.shape[0]] = c
    out = infllmv2_decode_triton(q, kc, vc, sl, cfg, softmax_scale=0.2, k_fine=kf,
                                 k_coarse=kco if lse_approx else None)
    out2 = infllmv2_decode_triton(q, kc, vc, sl, cfg, softmax_scale=0.2)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg, scale=0.2)
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-6)
    # fine keys given, coarse ones computed from the cache
    out3 = infllmv2_decode_triton(q, kc, vc, sl, cfg, softmax_scale=0.2, k_fine=kf)
    torch.testing.assert_close(out3, out2, rtol=1e-6, atol=1e-6)
    # the same keys in buffers whose head dim is not unit-stride (read as unit-stride before: another output)
    strided = [x.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0) for x in (kf, kco)]
    assert strided[0].stride(-1) != 1
    out4 = infllmv2_decode_triton(q, kc, vc, sl, cfg, softmax_scale=0.2, k_fine=strided[0],
                                  k_coarse=strided[1] if lse_approx else None)
    torch.testing.assert_close(out4, out, rtol=0, atol=0)


@pytest.mark.parametrize("given", [False, True])
def test_decode_left_padded_cache_equals_each_row_alone(given):
    # rows right-aligned in the cache (generate()'s left padding), garbage in the pad slots
    cfg = SparseConfig(dense_len=100, **SMALL)
    lens, max_len = [260, 77, 16, 130], 280
    q, kc, vc, sl = _cache(lens, max_len, 6, 2, 32, torch.float32, seed=11)
    pad = torch.tensor([max_len - n for n in lens], dtype=torch.int32)
    kw = {}
    if given:
        kf, kco = torch.zeros(4, 40, 2, 32), torch.zeros(4, 10, 2, 32)
        for i, n in enumerate(lens):
            f = naive.compress_keys(kc[i, max_len - n:], 16, 8)
            c = naive.compress_keys(kc[i, max_len - n:], 64, 32)
            kf[i, :f.shape[0]], kco[i, :c.shape[0]] = f, c
        kw = dict(k_fine=kf, k_coarse=kco)
    out, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, cache_leftpad=pad, return_block_indices=True, **kw)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, max_len - n:], vc[i, max_len - n:], cfg)
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)
        if cfg.is_sparse(n):
            assert torch.equal(idx[:, i], naive.select_blocks(q[i:i + 1], kc[i, max_len - n:], cfg)[:, 0])
    with pytest.raises(ValueError, match="cache_leftpad"):
        infllmv2_decode_triton(q, kc, vc, sl, cfg, cache_leftpad=pad.long())


def test_decode_bf16_accuracy_rule():
    """Error vs an fp64 reference at most ~2x that of the reference run on bf16 inputs."""
    cfg = SparseConfig(dense_len=-1, **SMALL)
    lens = [300, 90]
    q, kc, vc, sl = _cache(lens, 300, 8, 2, 64, torch.bfloat16, seed=9)
    out, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, return_block_indices=True)
    for i, n in enumerate(lens):
        # same selection -> compare stage 2 under the kernel's own blocks
        mask = naive.selection_mask(idx[:, i:i + 1], n, cfg.block_size)
        ref, _ = naive._masked_attention(q[i:i + 1].double(), kc[i, :n].double(), vc[i, :n].double(), mask, 64 ** -0.5)
        low, _ = naive._masked_attention(q[i:i + 1], kc[i, :n], vc[i, :n], mask, 64 ** -0.5)
        err = (out[i].double() - ref[0]).abs().max().item()
        lerr = (low[0].double() - ref[0]).abs().max().item()
        assert err <= 2 * lerr + 1e-3, (err, lerr)
        # structural: sizes and forced blocks
        bq = (n - 1) // cfg.block_size
        sel = idx[:, i]
        assert ((sel >= 0).sum(-1) == min(cfg.budget, bq + 1)).all()
        assert (sel <= bq).all()


def test_decode_bad_inputs():
    cfg = SparseConfig(dense_len=-1, **SMALL)
    q, kc, vc, sl = _cache([20, 30], 32, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        infllmv2_decode_triton(q, kc, vc, sl.long(), cfg)
    with pytest.raises(ValueError, match="Hq"):
        infllmv2_decode_triton(q[:, :3], kc, vc, sl, cfg)
    with pytest.raises(TypeError, match="v_cache"):
        infllmv2_decode_triton(q, kc, vc.double(), sl, cfg)
    with pytest.raises(ValueError, match="k_cache"):
        infllmv2_decode_triton(q, kc[:1], vc[:1], sl, cfg)
    # no backward: an input that requires grad is refused under autograd (its gradient would be lost silently)
    with pytest.raises(RuntimeError, match="no backward"):
        infllmv2_decode_triton(q.requires_grad_(), kc, vc, sl, cfg)
    with torch.no_grad():
        infllmv2_decode_triton(q, kc, vc, sl, cfg)


@pytest.mark.parametrize("splits,lse_splits", [(None, None), (2, None), (None, 1)])
@pytest.mark.parametrize("lse_approx", [True, False])
def test_decode_lse_combines_several_key_splits(lse_approx, splits, lse_splits, monkeypatch):
    """Rows long enough for several decode key splits whose log-sum-exp partials the scoring kernel merges per
    head; the per-head normalisation then weighs the heads in the group sum (a wrong merge, such as max instead
    of sum of the partials, changes the exact-mode selections here). The split counts (interpreter, 32-key tiles):
    the default for this batch (3 scoring splits, 2 LSE splits over the coarse keys or 6 over the fine ones in
    exact mode), two of each, and one LSE split beside 3 scoring splits."""
    from infllmv2.ops.triton import selection
    monkeypatch.setattr(selection, "_DECODE_SPLITS", splits)
    monkeypatch.setattr(selection, "_DECODE_LSE_SPLITS", lse_splits)
    cfg = SparseConfig(dense_len=-1, lse_approx=lse_approx, **dict(SMALL, topk=8))
    lens = [1500, 700, 1090]
    q, kc, vc, sl = _cache(lens, 1500, 8, 2, 16, torch.float32, seed=13)
    out, idx = infllmv2_decode_triton(q, kc, vc, sl, cfg, return_block_indices=True)
    for i, n in enumerate(lens):
        assert torch.equal(idx[:, i], naive.select_blocks(q[i:i + 1], kc[i, :n], cfg)[:, 0]), i
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg)
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,bps", [
    (dict(init_blocks=0, window_size=0, topk=1), None),  # no init, no window: the current block + 1 chosen
    (dict(init_blocks=2, window_size=32, topk=3), None),  # topk = init + 1: nothing left to choose
    (dict(init_blocks=1, window_size=16, topk=6), 1),  # one block a split
    (dict(init_blocks=1, window_size=48, topk=5), 2),
])
@pytest.mark.parametrize("dense_len", [90, -1])  # -1: short sequences are sparse too (window over the init blocks)
def test_decode_forced_and_chosen_splits(config, bps, dense_len):
    """Stage 2 splits a sparse sequence's forced blocks (computed from its length) apart from the top-k's chosen
    blocks (read from the selection), and a dense sequence's blocks over all splits: configurations at the edges
    of that arithmetic, lengths around block, window and dense_len boundaries, against the reference."""
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, dense_len=dense_len, **config)
    lens = [1, 16, 17, 47, 89, 90, 95, 160, 250]
    q, kc, vc, sl = _cache(lens, 250, 6, 2, 16, torch.float32, seed=21)
    out = infllmv2_decode_triton(q, kc, vc, sl, cfg, blocks_per_split=bps)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg)
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5, msg=f"row {i} (length {n})")


def test_decode_is_one_custom_op_when_compiled_and_a_direct_call_in_eager(monkeypatch):
    # torch.compile sees the decode step as one opaque call (infllmv2::decode); an eager call skips the op's
    # dispatch (host time that an eager decode step, bound by the host, pays every layer) and computes the same
    import infllmv2.ops.triton.decode as decode_mod

    cfg = SparseConfig(dense_len=-1, **SMALL)
    lens = [150, 97]
    q, kc, vc, sl = _cache(lens, 160, 4, 2, 32, torch.float32, seed=11)
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(infllmv2_decode_triton, backend=record, fullgraph=True)
    compiled = step(q, kc, vc, sl, cfg, softmax_scale=0.3)
    assert graphs == [["infllmv2.decode.default"]], graphs
    calls = []
    real = decode_mod._decode_op
    monkeypatch.setattr(decode_mod, "_decode_op", lambda *a: calls.append(1) or real(*a))
    eager = infllmv2_decode_triton(q, kc, vc, sl, cfg, softmax_scale=0.3)
    assert calls == []
    torch.testing.assert_close(eager, compiled, rtol=0, atol=0)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, :n], vc[i, :n], cfg, scale=0.3)
        torch.testing.assert_close(eager[i], ref[0], rtol=1e-5, atol=1e-5)
