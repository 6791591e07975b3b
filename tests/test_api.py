"""Public API: layouts, the switch, varlen, decoding, backends, and clear errors on bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from infllmv2 import SparseConfig, infllmv2_attention, select_blocks, sparse_attention
from infllmv2.ops import naive

from helpers import SMALL, mask_from_indices, masked_sdpa, rand_qkv

BACKENDS = ["reference", "torch"]


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_per_sequence(backend):
    q, k, v = rand_qkv(150, 6, 2, 16, batch=3)
    out = infllmv2_attention(q, k, v, SMALL, backend=backend)
    assert out.shape == q.shape
    for b in range(3):
        torch.testing.assert_close(out[b], naive.infllmv2_attention(q[b], k[b], v[b], SMALL)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_separate_sequences_with_per_sequence_switch(backend):
    cfg = SMALL.replace(dense_len=100)  # lengths below 100 run dense, the others sparse
    lengths = [130, 0, 40, 7, 211, 100]
    q, k, v = rand_qkv(sum(lengths), 6, 3, 8, seed=2)
    for t in (q, k, v):
        t.requires_grad_(True)
    cu = _cu(lengths)
    out = infllmv2_attention(q, k, v, cfg, cu_seqlens=cu, backend=backend)
    pieces = []
    for i, n in enumerate(lengths):
        s = slice(int(cu[i]), int(cu[i + 1]))
        pieces.append(naive.infllmv2_attention(q[s], k[s], v[s], cfg)[0])
    want = torch.cat(pieces)
    torch.testing.assert_close(out, want)
    d = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), d), torch.autograd.grad(want, (q, k, v), d)):
        torch.testing.assert_close(a, b)
    # The long sequences really are sparse: dense attention differs.
    s = slice(int(cu[4]), int(cu[5]))
    assert not torch.allclose(out[s], naive.dense_attention(q[s], k[s], v[s])[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode_equals_full_forward(backend):
    n, m = 112, 30
    q, k, v = rand_qkv(n + m, 4, 2, 16, batch=2, seed=4)

    def decode(cfg):
        steps = [infllmv2_attention(q[:, :n], k[:, :n], v[:, :n], cfg, backend=backend)]
        for t in range(n, n + m):
            steps.append(infllmv2_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], cfg, backend=backend))
        return torch.cat(steps, dim=1)

    full = infllmv2_attention(q, k, v, SMALL, backend=backend)  # always sparse
    torch.testing.assert_close(decode(SMALL), full)
    # Crossing dense_len = 120 while decoding: dense up to key length 119, sparse from the step with 120 keys.
    crossing = decode(SMALL.replace(dense_len=120))
    dense = infllmv2_attention(q, k, v, SMALL.replace(dense_len=10_000), backend=backend)
    torch.testing.assert_close(crossing[:, :119], dense[:, :119])
    torch.testing.assert_close(crossing[:, 119:], full[:, 119:])
    assert not torch.allclose(full[:, 119:], dense[:, 119:])


def test_chunked_prefill_with_cache_packed():
    lengths_k, lengths_q = [150, 90], [40, 90]
    q_full, k, v = rand_qkv(240, 4, 2, 8, seed=9)
    cu_k = _cu(lengths_k)
    q = torch.cat([q_full[110:150], q_full[150:240]])
    out = infllmv2_attention(q, k, v, SMALL, cu_seqlens=_cu(lengths_q), cu_seqlens_k=cu_k, backend="torch")
    a = naive.infllmv2_attention(q_full[:150], k[:150], v[:150], SMALL)[0][110:]
    b = naive.infllmv2_attention(q_full[150:], k[150:], v[150:], SMALL)[0]
    torch.testing.assert_close(out, torch.cat([a, b]))


def test_dense_below_dense_len_is_sdpa():
    q, k, v = rand_qkv(64, 4, 2, 16, batch=2, dtype=torch.float32)
    out = infllmv2_attention(q, k, v, SparseConfig())  # 64 < 8192: dense
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_functions(backend):
    q, k, v = rand_qkv(200, 6, 2, 16, batch=2)
    idx = select_blocks(q, k, SMALL, backend=backend)
    assert idx.shape == (2, 400, SMALL.budget) and idx.dtype == torch.int32
    out, lse = sparse_attention(q, k, v, idx, block_size=16, backend=backend, return_lse=True)
    assert lse.shape == (6, 400)
    m = mask_from_indices(idx[:, 200:], 200, 16)
    torch.testing.assert_close(out[1], masked_sdpa(q[1], k[1], v[1], m))
    torch.testing.assert_close(out, infllmv2_attention(q, k, v, SMALL, backend=backend))


def test_auto_backend_on_cpu_is_torch_and_matches():
    q, k, v = rand_qkv(90, 3, 1, 8, batch=1)
    torch.testing.assert_close(infllmv2_attention(q, k, v, SMALL), infllmv2_attention(q, k, v, SMALL,
                                                                                       backend="reference"))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    q, k, v = rand_qkv(32, 4, 2, 8, batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="q must have rank 4"):
        infllmv2_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        infllmv2_attention(q[:, :, :3], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        infllmv2_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="k must be float16"):
        infllmv2_attention(q, k.int(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        infllmv2_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        infllmv2_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="head_dim"):
        infllmv2_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="more positions"):
        infllmv2_attention(q, k[:, :5], v[:, :5])
    with pytest.raises(ValueError, match="backend must be one of"):
        infllmv2_attention(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="config must be"):
        infllmv2_attention(q, k, v, config=3)
    with pytest.raises(ValueError, match="unknown keys"):
        infllmv2_attention(q, k, v, config={"top_k": 3})
    with pytest.raises(ValueError, match="softmax_scale"):
        infllmv2_attention(q, k, v, softmax_scale=-1.0)
    for scale in (float("nan"), float("inf")):  # passed a <= 0 check, then NaN (torch) or zeros (reference) came out
        with pytest.raises(ValueError, match="softmax_scale"):
            infllmv2_attention(q, k, v, softmax_scale=scale)
    with pytest.raises(ValueError, match="positive multiple of the KV heads"):  # no query heads at all
        infllmv2_attention(q[:, :, :0], k, v)


def test_bad_cu_seqlens():
    q, k, v = rand_qkv(32, 4, 2, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        infllmv2_attention(q, k, v, cu_seqlens=torch.tensor([0, 32]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        infllmv2_attention(q, k, v, cu_seqlens=torch.tensor([1, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        infllmv2_attention(q, k, v, cu_seqlens=torch.tensor([0, 20, 10, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at the number of packed tokens"):
        infllmv2_attention(q, k, v, cu_seqlens=torch.tensor([0, 30], dtype=torch.int32))
    with pytest.raises(ValueError, match="q must have rank 3"):
        infllmv2_attention(q[None], k[None], v[None], cu_seqlens=torch.tensor([0, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match="more queries than keys"):
        infllmv2_attention(q, k[:16], v[:16], cu_seqlens=torch.tensor([0, 32], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 16], dtype=torch.int32))


def test_cu_seqlens_read_back_once_while_unchanged(monkeypatch):
    """The offsets are read to the host (a wait for the GPU there) once for a cu_seqlens tensor that every layer
    passes again, and again after an in-place change, which the result then follows."""
    q, k, v = rand_qkv(150, 4, 2, 16, dtype=torch.float32)
    cu = _cu([40, 110])
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t is cu) or real(t))
    first = infllmv2_attention(q, k, v, SMALL, cu_seqlens=cu, backend="torch")
    again = infllmv2_attention(q, k, v, SMALL, cu_seqlens=cu, backend="torch")
    assert reads.count(True) == 1
    torch.testing.assert_close(again, first)
    cu[1] = 90  # in place: other sequences
    moved = infllmv2_attention(q, k, v, SMALL, cu_seqlens=cu, backend="torch")
    assert reads.count(True) == 2
    torch.testing.assert_close(moved, infllmv2_attention(q, k, v, SMALL, cu_seqlens=_cu([90, 60]), backend="torch"))
    assert not torch.allclose(moved, first)


def test_bad_block_indices():
    q, k, v = rand_qkv(32, 4, 2, 8, batch=1, dtype=torch.float32)
    idx = select_blocks(q, k, SMALL)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        sparse_attention(q, k, v, idx[:1], block_size=16)
    with pytest.raises(TypeError, match="block_indices must be int32"):
        sparse_attention(q, k, v, idx.float(), block_size=16)
    with pytest.raises(ValueError, match=r"block_indices must lie in"):
        sparse_attention(q, k, v, idx + 5, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        sparse_attention(q, k, v, idx, block_size=0)


def test_packed_block_index_past_a_shorter_sequence_selects_nothing():
    """An index below the longest sequence's block count but past a shorter one's last block (allowed by the range
    check) is a block that sequence does not have: every backend treats it as -1 (the reference and torch paths
    failed inside scatter_)."""
    q, k, v = rand_qkv(120, 4, 2, 8, dtype=torch.float32)
    cu = _cu([20, 100])  # 2 and 7 blocks of 16
    idx = select_blocks(q, k, SMALL, cu_seqlens=cu)
    past = idx.clone()
    past[:, :20, -1] = 5  # the first sequence has blocks 0 and 1 only
    for backend in ("reference", "torch"):
        want = sparse_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend=backend)
        got = sparse_attention(q, k, v, past, block_size=16, cu_seqlens=cu, backend=backend)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_no_nan_from_finite_inputs_with_missing_current_block():
    # A token whose selection excludes every causal key gets 0, never NaN.
    q, k, v = rand_qkv(40, 2, 1, 8, batch=1, dtype=torch.float32)
    idx = torch.full((1, 40, 2), -1, dtype=torch.int32)
    idx[:, 20:, 0] = 1  # tokens 20..31 see block 1 (keys 16..31); tokens 0..19 see nothing
    out = sparse_attention(q, k, v, idx, block_size=16, backend="torch")
    assert torch.isfinite(out).all() and (out[0, :20] == 0).all()
    ref = sparse_attention(q, k, v, idx, block_size=16, backend="reference")
    torch.testing.assert_close(out, ref)


def test_triton_rejects_unsupported_head_dim():
    if not _triton_runnable():
        pytest.skip("triton backend not runnable here")
    q, k, v = rand_qkv(32, 4, 2, 48, batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="head_dim in"):
        infllmv2_attention(q, k, v, SMALL, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are valid for triton only without CUDA")
def test_triton_backend_needs_cuda_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # outside the interpreter, CPU tensors are refused
    q, k, v = rand_qkv(32, 4, 2, 64, batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        infllmv2_attention(q, k, v, SMALL, backend="triton")


def test_triton_forward_backward_compiles_fullgraph():
    """backend='triton': selection and sparse attention are custom ops, so the whole call (forward and backward)
    traces into one graph with torch.compile(fullgraph=True) and equals the eager call."""
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=2, dense_len=-1)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 100, h, 32, generator=g) for h in (4, 2, 2))
    dout = torch.randn(1, 100, 4, 32, generator=g)

    def run(fn):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*x)
        out.backward(dout)
        return out.detach(), [t.grad for t in x]

    f = lambda q, k, v: infllmv2_attention(q, k, v, cfg, backend="triton")  # noqa: E731
    ref, ref_grads = run(f)
    out, grads = run(torch.compile(f, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def _triton_runnable():
    import os
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def test_dense_documents_share_padded_sdpa_calls_and_equal_each_alone(monkeypatch):
    """A packed batch's dense sequences: grouped longest first into right-padded SDPA batches (padding within
    _PAD_SLACK of the real tokens), sequences with a cache (fewer queries than keys) and lone ones alone, empty ones
    skipped; outputs and gradients equal each sequence through SDPA alone, in any order of ``ids``."""
    import torch.nn.functional as F

    from infllmv2 import attention as A
    lengths_k = [61, 0, 7, 58, 30, 200, 55, 29, 1, 60, 31]
    lengths_q = [61, 0, 7, 58, 30, 200, 55, 29, 1, 20, 31]  # sequence 9: 20 queries against 60 keys (a cache)
    offs_q, offs_k = _cu(lengths_q).tolist(), _cu(lengths_k).tolist()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(offs_q[-1], 6, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(offs_k[-1], 2, 16, generator=g, requires_grad=True) for _ in range(2))
    ids = [10, 0, 1, 2, 3, 4, 6, 7, 8, 9]  # not 5; not in order
    shapes = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda *a, **kw: shapes.append(tuple(a[0].shape)) or
                        real(*a, **kw))
    out = A.dense_documents(q, k, v, offs_q, offs_k, ids, 0.25)
    # longest first: 61, 58, 55, 31 (4 x 61 = 244 padded <= 1.25 x 205 real); 30 would pass the slack, so 30, 29;
    # 7 with 1 would too (14 > 10), so 7 and 1 alone; the cached sequence alone, unpadded
    assert sorted(shapes) == sorted([(4, 6, 61, 16), (2, 6, 30, 16), (1, 6, 7, 16), (1, 6, 1, 16), (1, 6, 20, 16)])
    want = torch.cat([A.dense_attention_sdpa(q[None, offs_q[i]:offs_q[i + 1]], k[None, offs_k[i]:offs_k[i + 1]],
                                             v[None, offs_k[i]:offs_k[i + 1]], 0.25)[0] for i in ids])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    d = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), d), torch.autograd.grad(want, (q, k, v), d)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), slack=st.sampled_from([1.0, 1.25, 4.0]))
def test_dense_documents_equal_each_alone_for_any_layout(data, slack):
    """Any packed layout (empty sequences, sequences with a cache, any order and subset of ``ids``) and any padding
    slack: dense_documents' outputs and gradients equal each sequence through SDPA alone."""
    from unittest import mock

    from infllmv2 import attention as A
    n_seq = data.draw(st.integers(1, 7))
    lengths_q = data.draw(st.lists(st.integers(0, 40), min_size=n_seq, max_size=n_seq))
    lengths_k = [n + data.draw(st.sampled_from([0, 0, 0, 5])) for n in lengths_q]  # some with a cache
    ids = data.draw(st.permutations(range(n_seq)))
    ids = ids[:data.draw(st.integers(1, n_seq))]
    offs_q, offs_k = _cu(lengths_q).tolist(), _cu(lengths_k).tolist()
    g = torch.Generator().manual_seed(sum(lengths_q) + 31 * n_seq)
    q = torch.randn(offs_q[-1], 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(offs_k[-1], 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with mock.patch.object(A, "_PAD_SLACK", slack):
        out = A.dense_documents(q, k, v, offs_q, offs_k, list(ids), 0.3)
    want = [A.dense_attention_sdpa(q[None, offs_q[i]:offs_q[i + 1]], k[None, offs_k[i]:offs_k[i + 1]],
                                   v[None, offs_k[i]:offs_k[i + 1]], 0.3)[0] for i in ids]
    want = torch.cat(want)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)
    d = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), d, allow_unused=True)
    want_grads = torch.autograd.grad(want, (q, k, v), d, allow_unused=True)
    for a, b, x in zip(got_grads, want_grads, (q, k, v)):
        torch.testing.assert_close(torch.zeros_like(x) if a is None else a, torch.zeros_like(x) if b is None else b)


@pytest.mark.skipif(not _triton_runnable(), reason="triton backend not runnable here")
def test_triton_packed_layouts_equal_reference():
    """backend='triton' through the public API: a packed batch of unequal lengths (offsets copied to the device),
    a mixed dense / sparse batch (a sub-batch with its own offsets), queries shorter than their keys
    (cu_seqlens_k), and the batched layout (offsets from an arange), each against the reference."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=2, dense_len=-1)
    g = torch.Generator().manual_seed(5)
    lengths = [150, 37, 90]
    q, k, v = (torch.randn(sum(lengths), h, 32, generator=g).to(dev) for h in (4, 2, 2))
    cu = _cu(lengths).to(dev)
    for c in (cfg, cfg.replace(dense_len=60)):  # all sparse; 37 dense and the others sparse
        out = infllmv2_attention(q, k, v, c, cu_seqlens=cu, backend="triton")
        for i in range(len(lengths)):
            s = slice(int(cu[i]), int(cu[i + 1]))
            torch.testing.assert_close(out[s], naive.infllmv2_attention(q[s], k[s], v[s], c)[0], atol=1e-4, rtol=1e-4)
    lengths_q = [40, 37, 1]
    cu_q = _cu(lengths_q).to(dev)
    qs = torch.cat([q[int(cu[i + 1]) - n:int(cu[i + 1])] for i, n in enumerate(lengths_q)])
    out = infllmv2_attention(qs, k, v, cfg, cu_seqlens=cu_q, cu_seqlens_k=cu, backend="triton")
    for i, n in enumerate(lengths_q):
        s = slice(int(cu[i]), int(cu[i + 1]))
        want = naive.infllmv2_attention(q[s], k[s], v[s], cfg)[0][-n:]
        torch.testing.assert_close(out[int(cu_q[i]):int(cu_q[i + 1])], want, atol=1e-4, rtol=1e-4)
    qb, kb, vb = (x[:180].reshape(2, 90, *x.shape[1:]) for x in (q, k, v))
    out = infllmv2_attention(qb, kb, vb, cfg, backend="triton")
    for b in range(2):
        torch.testing.assert_close(out[b], naive.infllmv2_attention(qb[b], kb[b], vb[b], cfg)[0], atol=1e-4, rtol=1e-4)


def test_custom_op_config_round_trip():
    # the custom ops pass a config as its fields; rebuilding it must give the same config
    from infllmv2.ops.triton.selection import config_args
    cfg = SparseConfig(block_size=32, kernel_size=16, kernel_stride=8, init_blocks=2, window_size=96, topk=5,
                       dense_len=300, lse_approx=False, use_nope=True)
    assert SparseConfig(*config_args(cfg)) == cfg


def test_masked_sdpa_calls_never_ask_for_gqa(monkeypatch):
    """With an attn_mask, SDPA's enable_gqa=True runs CUDA's math backend (fp32 scores of size Hq x nq x nk);
    the dense path of a chunk against a longer cache and NSA's compression branch repeat the KV heads
    instead, with the same result."""
    import torch.nn.functional as F

    from infllmv2.attention import dense_attention_sdpa
    from infllmv2.train import build_model, convert_to_nsa

    real = F.scaled_dot_product_attention
    calls = []

    def spy(*args, attn_mask=None, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa))
        return real(*args, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = rand_qkv(40, 6, 2, 16)  # 40 queries, the last of 40 keys: take the last 15 queries
    out = dense_attention_sdpa(q[None, 25:], k[None], v[None], 0.25)[0]
    torch.testing.assert_close(out, naive.dense_attention(q[25:], k, v, 0.25)[0])
    torch.manual_seed(0)
    model = convert_to_nsa(build_model("tiny", max_position=256).eval(), SMALL, backend="torch")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 120)))
    assert (True, False) in calls and (True, True) not in calls
