"""The memory-bounded PyTorch path (ops/torch_chunked.py) against the reference, over awkward sizes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from infllmv2 import SparseConfig
from infllmv2.ops import naive, torch_chunked

from helpers import rand_qkv


@st.composite
def configs(draw):
    sc = draw(st.sampled_from([4, 8, 16]))
    lc = sc * draw(st.integers(1, 3))
    B = sc * draw(st.integers(1, 4))
    init = draw(st.integers(0, 2))
    return SparseConfig(block_size=B, kernel_size=lc, kernel_stride=sc, init_blocks=init,
                        window_size=B * draw(st.integers(0, 2)), topk=init + draw(st.integers(1, 4)),
                        lse_approx=draw(st.booleans()), dense_len=-1)


@settings(max_examples=40, deadline=None)
@given(cfg=configs(), n=st.integers(0, 160), extra=st.integers(0, 40), G=st.sampled_from([1, 2, 3]),
       hkv=st.integers(1, 2), seed=st.integers(0, 10_000))
def test_selection_equals_reference(cfg, n, extra, G, hkv, seed):
    q, k, _ = rand_qkv(n, G * hkv, hkv, 8, nk=n + extra, seed=seed)
    assert torch.equal(torch_chunked.select_blocks(q, k, cfg), naive.select_blocks(q, k, cfg))


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), n=st.integers(1, 150), extra=st.integers(0, 30), G=st.sampled_from([1, 3, 4]),
       seed=st.integers(0, 10_000))
def test_sparse_attention_and_grads_equal_reference(cfg, n, extra, G, seed):
    q, k, v = rand_qkv(n, 2 * G, 2, 8, nk=n + extra, seed=seed)
    idx = naive.select_blocks(q, k, cfg)
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qr = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o1, l1 = torch_chunked.sparse_attention(*qs, idx, cfg.block_size)
    o2, l2 = naive.sparse_attention(*qr, idx, cfg.block_size)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1.double(), l2.double())
    dout = torch.randn_like(o1)
    dlse = torch.randn_like(l2)
    g1 = torch.autograd.grad((o1 * dout).sum() + (l1.double() * dlse).sum(), qs)
    g2 = torch.autograd.grad((o2 * dout).sum() + (l2 * dlse).sum(), qr)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_chunking_really_splits(monkeypatch):
    # Force tiny chunks so the multi-chunk code (union of blocks per chunk, index_add of dk/dv) runs.
    monkeypatch.setattr(torch_chunked, "_CHUNK_ELEMENTS", 1)
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=3, dense_len=-1)
    q, k, v = rand_qkv(300, 4, 2, 8, seed=1)
    assert torch.equal(torch_chunked.select_blocks(q, k, cfg), naive.select_blocks(q, k, cfg))
    idx = naive.select_blocks(q, k, cfg)
    for t in (q, k, v):
        t.requires_grad_(True)
    o1, _ = torch_chunked.sparse_attention(q, k, v, idx, 16)
    o2, _ = naive.sparse_attention(q, k, v, idx, 16)
    torch.testing.assert_close(o1, o2)
    d = torch.randn_like(o1)
    for a, b in zip(torch.autograd.grad(o1, (q, k, v), d), torch.autograd.grad(o2, (q, k, v), d)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_accuracy_rule(dtype):
    # Error vs an fp64 reference at most ~2x that of the reference run in the same precision.
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=32, topk=3, dense_len=-1)
    q, k, v = rand_qkv(257, 6, 2, 32, seed=11)
    idx = naive.select_blocks(q, k, cfg)
    ref, _ = naive.sparse_attention(q, k, v, idx, 16)
    low = [t.to(dtype) for t in (q, k, v)]
    err_ref = (naive.sparse_attention(*low, idx, 16)[0].double() - ref).abs().max()
    err_torch = (torch_chunked.sparse_attention(*low, idx, 16)[0].double() - ref).abs().max()
    assert err_torch <= 2 * err_ref + 1e-6


@settings(max_examples=20, deadline=None)
@given(cfg=configs(), n=st.integers(1, 150), extra=st.integers(0, 30), G=st.sampled_from([1, 3]),
       seed=st.integers(0, 10_000))
def test_inference_path_equals_reference(cfg, n, extra, G, seed):
    # No gradient and no lse asked: the SDPA-based inference path runs; same outputs as the reference.
    q, k, v = rand_qkv(n, 2 * G, 2, 8, nk=n + extra, seed=seed)
    idx = naive.select_blocks(q, k, cfg)
    with torch.no_grad():
        out, lse = torch_chunked.sparse_attention(q, k, v, idx, cfg.block_size, return_lse=False)
    assert lse is None
    torch.testing.assert_close(out, naive.sparse_attention(q, k, v, idx, cfg.block_size)[0])


def test_inference_path_token_without_keys_gets_zero():
    q, k, v = rand_qkv(40, 2, 1, 8, dtype=torch.float32)
    idx = torch.full((1, 40, 2), -1, dtype=torch.int32)
    idx[:, 20:, 0] = 1  # tokens 0..19 select nothing
    with torch.no_grad():
        out, _ = torch_chunked.sparse_attention(q, k, v, idx, 16, return_lse=False)
    assert torch.isfinite(out).all() and (out[:20] == 0).all()
    torch.testing.assert_close(out, naive.sparse_attention(q, k, v, idx, 16)[0])
