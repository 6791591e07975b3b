"""``infllmv2_with_kvcache`` (one decode step against a static KV cache) and the one-launch cache write of
``append_windows(..., new=...)``: several steps, each checked against the reference attention over an independent
record of each row's keys; the cache and its compressed keys against that record. CPU (Triton: interpreter)."""
from __future__ import annotations

import pytest
import torch

from infllmv2 import SparseConfig, infllmv2_with_kvcache
from infllmv2.cache import StaticCompressedKeys, append_windows
from infllmv2.ops import naive

SMALL = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=3, init_blocks=1)


def _start(lens, max_len, hq, hkv, d, config, leftpad, dtype=torch.float32, seed=0):
    """Rows' keys/values placed in a static cache (garbage elsewhere), their compressed keys, and the record."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    kc = torch.randn(b, max_len, hkv, d, generator=g).to(dtype)
    vc = torch.randn(b, max_len, hkv, d, generator=g).to(dtype)
    pad = torch.tensor([max_len - 8 - n for n in lens] if leftpad else [0] * b, dtype=torch.int32)
    rec_k = [kc[i, pad[i]:pad[i] + n].clone() for i, n in enumerate(lens)]
    rec_v = [vc[i, pad[i]:pad[i] + n].clone() for i, n in enumerate(lens)]
    ck = StaticCompressedKeys(b, max_len, hkv, d, config, dtype, "cpu")
    for buf in ck.buffers:
        buf.normal_(generator=g)  # garbage past each row's windows must be ignored
    ck.prefill(kc, torch.tensor(lens), pad)
    return kc, vc, pad if leftpad else None, rec_k, rec_v, ck


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("lse_approx", [True, False])
def test_with_kvcache_steps_match_reference(backend, leftpad, lse_approx):
    # rows cross dense_len (150) during the steps, one starts with a single key
    config = SMALL.replace(lse_approx=lse_approx, dense_len=150)
    lens, hq, hkv, d, steps = [146, 1, 200, 127], 4, 2, 32, 6
    kc, vc, pad, rec_k, rec_v, ck = _start(lens, 224, hq, hkv, d, config, leftpad)
    g = torch.Generator().manual_seed(1)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for _ in range(steps):
        q = torch.randn(len(lens), 1, hq, d, generator=g)
        k, v = torch.randn(len(lens), 1, hkv, d, generator=g), torch.randn(len(lens), 1, hkv, d, generator=g)
        out = infllmv2_with_kvcache(q, kc, vc, seqlens, config, k=k, v=v, compressed_keys=ck, cache_leftpad=pad,
                                    softmax_scale=0.3, backend=backend)
        assert out.shape == q.shape
        for i in range(len(lens)):
            rec_k[i] = torch.cat([rec_k[i], k[i]])
            rec_v[i] = torch.cat([rec_v[i], v[i]])
            ref, _ = naive.infllmv2_attention(q[i], rec_k[i], rec_v[i], config, scale=0.3)
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
        seqlens += 1
    first = pad if pad is not None else torch.zeros(len(lens), dtype=torch.int32)
    for i, n in enumerate(seqlens.tolist()):
        assert torch.equal(kc[i, first[i]:first[i] + n], rec_k[i]) and torch.equal(vc[i, first[i]:first[i] + n],
                                                                                    rec_v[i])
        for (kern, s), buf in zip(ck.specs, ck.buffers):
            want = naive.compress_keys(rec_k[i], kern, s)
            torch.testing.assert_close(buf[i, :want.shape[0]], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_with_kvcache_several_tokens_a_call_are_causal(backend):
    # three new tokens a call (a speculative draft): query t over the keys up to its own token, against the
    # reference; then the last two cached tokens' queries again without k / v (read only)
    config = SMALL.replace(dense_len=150)
    lens, hq, hkv, d = [146, 3, 180], 4, 2, 32
    kc, vc, pad, rec_k, rec_v, ck = _start(lens, 224, hq, hkv, d, config, leftpad=True, seed=8)
    g = torch.Generator().manual_seed(9)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for _ in range(2):
        q = torch.randn(3, 3, hq, d, generator=g)
        k, v = torch.randn(3, 3, hkv, d, generator=g), torch.randn(3, 3, hkv, d, generator=g)
        out = infllmv2_with_kvcache(q, kc, vc, seqlens, config, k=k, v=v, compressed_keys=ck, cache_leftpad=pad,
                                    backend=backend)
        assert out.shape == q.shape
        for i in range(3):
            for t in range(3):
                keys = torch.cat([rec_k[i], k[i, :t + 1]])
                ref, _ = naive.infllmv2_attention(q[i, t:t + 1], keys, torch.cat([rec_v[i], v[i, :t + 1]]), config)
                torch.testing.assert_close(out[i, t], ref[0], atol=1e-5, rtol=1e-5)
            rec_k[i], rec_v[i] = torch.cat([rec_k[i], k[i]]), torch.cat([rec_v[i], v[i]])
        seqlens += 3
    again = infllmv2_with_kvcache(q[:, 1:], kc, vc, seqlens, config, compressed_keys=ck, cache_leftpad=pad,
                                  backend=backend)
    torch.testing.assert_close(again, out[:, 1:], atol=1e-5, rtol=1e-5)
    for (kern, s), buf in zip(ck.specs, ck.buffers):
        for i in range(3):
            want = naive.compress_keys(rec_k[i], kern, s)
            torch.testing.assert_close(buf[i, :want.shape[0]], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_with_kvcache_without_compressed_keys(backend):
    # compressed_keys=None compresses the cache from scratch: the same outputs; and without k/v the cache is only read
    config = SMALL.replace(dense_len=-1)
    lens = [150, 90, 200]
    kc, vc, pad, _, _, ck = _start(lens, 224, 4, 2, 32, config, leftpad=True, seed=3)
    q = torch.randn(3, 1, 4, 32, generator=torch.Generator().manual_seed(4))
    seqlens = torch.tensor(lens, dtype=torch.int32)
    before = kc.clone()
    a = infllmv2_with_kvcache(q, kc, vc, seqlens, config, compressed_keys=ck, cache_leftpad=pad, backend=backend)
    b = infllmv2_with_kvcache(q, kc, vc, seqlens, config, cache_leftpad=pad, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, before)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i], kc[i, pad[i]:pad[i] + n], vc[i, pad[i]:pad[i] + n], config)
        torch.testing.assert_close(a[i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dense_len", [-1, 1000], ids=["sparse", "dense"])
def test_with_kvcache_ignores_nan_in_unfilled_slots(backend, dense_len):
    """Slots outside each row's keys may hold anything (a cache from torch.empty): NaN there changes nothing (the
    torch path multiplied the zero weights of those slots by their values, NaN in every row)."""
    config = SMALL.replace(dense_len=dense_len)
    lens = [150, 90]
    kc, vc, pad, _, _, ck = _start(lens, 224, 4, 2, 32, config, leftpad=True, seed=5)
    q = torch.randn(2, 1, 4, 32, generator=torch.Generator().manual_seed(6))
    seqlens = torch.tensor(lens, dtype=torch.int32)
    want = infllmv2_with_kvcache(q, kc, vc, seqlens, config, compressed_keys=ck, cache_leftpad=pad, backend=backend)
    for i, n in enumerate(lens):  # NaN before and after each row's keys
        for x in (kc, vc):
            x[i, :pad[i]] = float("nan")
            x[i, pad[i] + n:] = float("nan")
    got = infllmv2_with_kvcache(q, kc, vc, seqlens, config, compressed_keys=ck, cache_leftpad=pad, backend=backend)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_append_windows_writes_new_token_rounded_to_cache_dtype(fused):
    # an fp32 new key into a bf16 cache: the cache holds it rounded, and the windows pool the rounded key
    b, max_len, h, d = 2, 80, 2, 16
    g = torch.Generator().manual_seed(5)
    kc = torch.randn(b, max_len, h, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(b, max_len, h, d, generator=g).to(torch.bfloat16)
    kinds = [(16, 8, torch.zeros(b, max_len // 8, h, d)), (32, 16, torch.zeros(b, max_len // 16, h, d))]
    lens = torch.tensor([31, 47], dtype=torch.int32)  # the new key completes both kinds' windows in row 1
    for kern, s, buf in kinds:
        for i, n in enumerate(lens.tolist()):
            c = naive.compress_keys(kc[i, :n].float(), kern, s)
            buf[i, :c.shape[0]] = c
    for _ in range(2):  # and row 0's on the second step
        lens = lens + 1
        k, v = torch.randn(b, h, d, generator=g), torch.randn(b, h, d, generator=g)
        if fused and not torch.cuda.is_available():  # Triton's interpreter rounds fp32 -> bf16 its own way (the
            k, v = k.bfloat16().float(), v.bfloat16().float()  # GPU test covers the rounding)
        append_windows(kinds, kc, lens, fused=fused, new=(k, v, vc))
        rows = torch.arange(b)
        assert torch.equal(kc[rows, lens.long() - 1], k.to(torch.bfloat16))
        assert torch.equal(vc[rows, lens.long() - 1], v.to(torch.bfloat16))
    for kern, s, buf in kinds:
        for i, n in enumerate(lens.tolist()):
            want = naive.compress_keys(kc[i, :n].float(), kern, s)
            torch.testing.assert_close(buf[i, :want.shape[0]], want, atol=1e-6, rtol=1e-6)
            assert not buf[i, want.shape[0]:].any()


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_append_windows_write_only_with_no_kinds_strided_input(fused):
    kc, vc = torch.zeros(2, 10, 1, 16), torch.zeros(2, 10, 1, 16)
    k = torch.arange(2 * 32, dtype=torch.float32).view(2, 1, 32)[..., ::2]  # head dim with stride 2
    v = -torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 16)
    append_windows([], kc, torch.tensor([3, 10], dtype=torch.int32), fused=fused, new=(k, v, vc))
    assert torch.equal(kc[0, 2], k[0]) and torch.equal(kc[1, 9], k[1])
    assert torch.equal(vc[0, 2], v[0]) and torch.equal(vc[1, 9], v[1])
    assert kc.abs().sum() == k.abs().sum() and vc.abs().sum() == v.abs().sum()  # nothing written elsewhere


def test_with_kvcache_rejects_bad_input():
    config = SMALL.replace(dense_len=-1)
    kc, vc = torch.zeros(2, 64, 2, 16), torch.zeros(2, 64, 2, 16)
    q = torch.zeros(2, 1, 4, 16)
    sl = torch.tensor([10, 20], dtype=torch.int32)
    k = torch.zeros(2, 1, 2, 16)
    cases = [
        (dict(q=torch.zeros(2, 0, 4, 16)), "seqlen_q >= 1"),
        (dict(q=torch.zeros(2, 2, 4, 16), k=k, v=k), "k must be \\(batch=2, seqlen_q=2"),
        (dict(q=torch.zeros(2, 11, 4, 16)), "seqlen_q=11"),
        (dict(q=torch.zeros(2, 4, 16)), "q must have rank 4"),
        (dict(q=torch.zeros(2, 1, 3, 16)), "multiple of k_cache"),
        (dict(v_cache=torch.zeros(2, 64, 2, 8)), "v_cache must be"),
        (dict(cache_seqlens=sl.long()), "cache_seqlens must be"),
        (dict(cache_seqlens=torch.tensor([10], dtype=torch.int32)), "cache_seqlens must be"),
        (dict(cache_seqlens=torch.tensor([64, 3], dtype=torch.int32), k=k, v=k), "max_len=64"),
        (dict(cache_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "1 to max_len"),
        (dict(cache_leftpad=torch.tensor([60, 0], dtype=torch.int32)), "cache_leftpad"),
        (dict(k=k), "k and v must be given together"),
        (dict(k=torch.zeros(2, 1, 2, 8), v=k), "k must be"),
        (dict(compressed_keys=kc), "StaticCompressedKeys"),
        (dict(compressed_keys=StaticCompressedKeys(2, 64, 2, 16, SMALL.replace(kernel_size=32), torch.float32,
                                                   "cpu")), "compressed_keys hold windows"),
        (dict(compressed_keys=StaticCompressedKeys(3, 64, 2, 16, config, torch.float32, "cpu")), "batch=2"),
        (dict(config=config.replace(use_nope=True)), "use_nope"),
        (dict(q=q.int(), k_cache=kc.int(), v_cache=vc.int()), "q must be float16"),  # int32 ran, rounded nonsense
        (dict(k=k.double(), v=k.double()), "k must have the caches' dtype"),  # was cast silently
        (dict(q=torch.zeros(2, 1, 0, 16)), "positive multiple of k_cache"),
        (dict(softmax_scale=float("nan")), "softmax_scale"),
        # made for a smaller cache: windows past its rows were written onto its last row (a wrong selection)
        (dict(compressed_keys=StaticCompressedKeys(2, 16, 2, 16, config, torch.float32, "cpu")),
         "made for a cache of 16 slots"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(compressed_keys=StaticCompressedKeys(2, 64, 2, 16, config, torch.float64, "cpu"), backend="triton",
              q=torch.zeros(2, 1, 4, 32), k_cache=torch.zeros(2, 64, 2, 32), v_cache=torch.zeros(2, 64, 2, 32)),
         "compressed_keys buffers must be"),
    ]
    for kw, msg in cases:
        args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=sl, config=config)
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=msg):
            infllmv2_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
                                  args.pop("config"), **args)
    # Triton: compressed keys of another dtype than q are refused before the cache is written
    kc32, vc32 = torch.zeros(2, 64, 2, 32), torch.zeros(2, 64, 2, 32)
    ck = StaticCompressedKeys(2, 64, 2, 32, config, torch.float64, "cpu")
    with pytest.raises(ValueError, match="compressed_keys must hold q's dtype"):
        infllmv2_with_kvcache(torch.zeros(2, 1, 4, 32), kc32, vc32, sl, config, k=torch.ones(2, 1, 2, 32),
                              v=torch.ones(2, 1, 2, 32), compressed_keys=ck, backend="triton")
    assert not kc32.any() and not vc32.any()


def test_with_kvcache_step_compiles_fullgraph():
    # the torch path under torch.compile(fullgraph=True): no graph break (no host synchronisation), and the
    # compiled steps give the eager steps' outputs, cache writes and compressed keys
    config = SMALL.replace(dense_len=150)
    lens = [146, 30, 200]
    states = [_start(lens, 224, 4, 2, 16, config, leftpad=True, seed=6) for _ in range(2)]
    step = torch.compile(infllmv2_with_kvcache, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(7)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for _ in range(3):
        q = torch.randn(3, 1, 4, 16, generator=g)
        k, v = torch.randn(3, 1, 2, 16, generator=g), torch.randn(3, 1, 2, 16, generator=g)
        outs = []
        for fn, (kc, vc, pad, _, _, ck) in zip((infllmv2_with_kvcache, step), states):
            outs.append(fn(q, kc, vc, seqlens, config, k=k, v=v, compressed_keys=ck, cache_leftpad=pad,
                           backend="torch"))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        seqlens += 1
    (kc0, vc0, _, _, _, ck0), (kc1, vc1, _, _, _, ck1) = states
    assert torch.equal(kc0, kc1) and torch.equal(vc0, vc1)
    for a, b in zip(ck0.buffers, ck1.buffers):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
