"""``infllmv2_with_kvcache`` on CUDA, bf16, the default config: the Triton path (one-launch cache write + decode
kernels) against the torch path over several steps of a left-padded batch whose rows cross ``dense_len``, under a
CUDA graph too; and the one-launch write's rounding of an fp32 new key into a bf16 cache (which Triton's CPU
interpreter does not reproduce)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from infllmv2 import SparseConfig, infllmv2_with_kvcache  # noqa: E402
from infllmv2.cache import StaticCompressedKeys  # noqa: E402
from infllmv2.ops import naive  # noqa: E402
from infllmv2.ops.triton import infllmv2_decode_triton  # noqa: E402

CONFIG = SparseConfig(dense_len=8192)


def _state(lens, max_len, hkv, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lens)
    kc = torch.randn(b, max_len, hkv, d, device="cuda", generator=g).bfloat16()
    vc = torch.randn(b, max_len, hkv, d, device="cuda", generator=g).bfloat16()
    pad = torch.tensor([max_len - 16 - n for n in lens], dtype=torch.int32, device="cuda")
    ck = StaticCompressedKeys(b, max_len, hkv, d, CONFIG, torch.bfloat16, "cuda")
    ck.prefill(kc, torch.tensor(lens, device="cuda"), pad)
    return kc, vc, pad, ck


def test_triton_path_over_steps_and_in_a_cuda_graph():
    # per step: the Triton path equals its decode kernels called on the state it wrote (bitwise: the wiring of
    # lengths, left padding and compressed keys), its writes equal the torch path's, and the dense row's output
    # (fewer keys than dense_len) is the torch path's; row 0 crosses dense_len
    lens, hq, hkv, d, steps = [8190, 20000, 3000], 32, 2, 128, 4
    max_len = 20032
    tri, ref = _state(lens, max_len, hkv, d, 0), _state(lens, max_len, hkv, d, 0)
    g = torch.Generator(device="cuda").manual_seed(1)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for step in range(steps):
        q = torch.randn(3, 1, hq, d, device="cuda", generator=g).bfloat16()
        k = torch.randn(3, 1, hkv, d, device="cuda", generator=g).bfloat16()
        v = torch.randn(3, 1, hkv, d, device="cuda", generator=g).bfloat16()
        outs = []
        for (kc, vc, pad, ck), backend in ((tri, "triton"), (ref, "torch")):
            outs.append(infllmv2_with_kvcache(q, kc, vc, seqlens, CONFIG, k=k, v=v, compressed_keys=ck,
                                              cache_leftpad=pad, backend=backend))
        kc, vc, pad, ck = tri
        direct = infllmv2_decode_triton(q[:, 0], kc, vc, seqlens + 1, CONFIG, k_fine=ck.fine, k_coarse=ck.coarse,
                                        cache_leftpad=pad)
        assert torch.equal(outs[0][:, 0], direct)
        torch.testing.assert_close(outs[0][2].float(), outs[1][2].float(), atol=2e-2, rtol=2e-2)
        seqlens += 1
    assert torch.equal(tri[0], ref[0]) and torch.equal(tri[1], ref[1])
    for a, b in zip(tri[3].buffers, ref[3].buffers):  # pooled in another order: bf16 rounding apart at most
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
    # one more step captured in a CUDA graph (fixed shapes, no host synchronisation) equals it eagerly
    kc, vc, pad, ck = tri
    q = torch.randn(3, 1, hq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(3, 1, hkv, d, device="cuda", generator=g).bfloat16()
    eager_state = [t.clone() for t in (kc, vc, *ck.buffers)]
    eager = infllmv2_with_kvcache(q, kc, vc, seqlens, CONFIG, k=k, v=k, compressed_keys=ck, cache_leftpad=pad)
    after = [t.clone() for t in (kc, vc, *ck.buffers)]
    for t, s in zip((kc, vc, *ck.buffers), eager_state):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) on a side stream, state restored before capture
        infllmv2_with_kvcache(q, kc, vc, seqlens, CONFIG, k=k, v=k, compressed_keys=ck, cache_leftpad=pad)
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip((kc, vc, *ck.buffers), eager_state):
        t.copy_(s)
    with torch.cuda.graph(graph):
        out = infllmv2_with_kvcache(q, kc, vc, seqlens, CONFIG, k=k, v=k, compressed_keys=ck, cache_leftpad=pad)
    for t, s in zip((kc, vc, *ck.buffers), eager_state):
        t.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    for t, s in zip((kc, vc, *ck.buffers), after):
        assert torch.equal(t, s)


def test_one_launch_write_rounds_fp32_keys_to_the_cache_dtype():
    b, max_len, h, d = 4, 512, 2, 128
    g = torch.Generator(device="cuda").manual_seed(2)
    kc = torch.randn(b, max_len, h, d, device="cuda", generator=g).bfloat16()
    vc = torch.randn_like(kc)
    ck = StaticCompressedKeys(b, max_len, h, d, CONFIG, torch.float32, "cuda")
    lens = torch.tensor([127, 200, 255, 64], dtype=torch.int32, device="cuda")
    ck.prefill(kc, lens)
    for _ in range(70):
        lens += 1
        k = torch.randn(b, h, d, device="cuda", generator=g)
        v = torch.randn(b, h, d, device="cuda", generator=g)
        ck.append(kc, lens, fused=True, new=(k, v, vc))
        rows = torch.arange(b, device="cuda")
        assert torch.equal(kc[rows, lens.long() - 1], k.bfloat16()) and torch.equal(vc[rows, lens.long() - 1],
                                                                                    v.bfloat16())
    for (kern, s), buf in zip(ck.specs, ck.buffers):
        for i, n in enumerate(lens.tolist()):
            want = naive.compress_keys(kc[i, :n].float(), kern, s)
            torch.testing.assert_close(buf[i, :want.shape[0]], want, atol=1e-6, rtol=1e-6)


def test_triton_step_compiles_fullgraph():
    # the Triton path's custom ops (the one-launch write, the decode kernels) under torch.compile(fullgraph=True):
    # no graph break, and the compiled steps write and return what the eager steps do
    lens, hq, hkv, d = [9000, 12000], 32, 2, 128
    states = [_state(lens, 12064, hkv, d, 3) for _ in range(2)]
    step = torch.compile(infllmv2_with_kvcache, fullgraph=True, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(4)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for _ in range(3):
        q = torch.randn(2, 1, hq, d, device="cuda", generator=g).bfloat16()
        k = torch.randn(2, 1, hkv, d, device="cuda", generator=g).bfloat16()
        outs = [fn(q, kc, vc, seqlens, CONFIG, k=k, v=k, compressed_keys=ck, cache_leftpad=pad)
                for fn, (kc, vc, pad, ck) in zip((infllmv2_with_kvcache, step), states)]
        assert torch.equal(outs[0], outs[1])
        seqlens += 1
    for a, b in zip((states[0][0], states[0][1], *states[0][3].buffers), (states[1][0], states[1][1],
                                                                         *states[1][3].buffers)):
        assert torch.equal(a, b)


def test_several_tokens_a_call_equal_one_token_calls():
    # a speculative draft of three tokens in one call: the same writes and outputs as three one-token calls, bitwise
    lens, hq, hkv, d = [8191, 15000], 32, 2, 128
    states = [_state(lens, 15040, hkv, d, 5) for _ in range(2)]
    g = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(2, 3, hq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, 3, hkv, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, 3, hkv, d, device="cuda", generator=g).bfloat16()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kc, vc, pad, ck = states[0]
    together = infllmv2_with_kvcache(q, kc, vc, seqlens, CONFIG, k=k, v=v, compressed_keys=ck, cache_leftpad=pad)
    kc, vc, pad, ck = states[1]
    alone = [infllmv2_with_kvcache(q[:, t:t + 1], kc, vc, seqlens + t, CONFIG, k=k[:, t:t + 1], v=v[:, t:t + 1],
                                   compressed_keys=ck, cache_leftpad=pad) for t in range(3)]
    assert torch.equal(together, torch.cat(alone, 1))
    for a, b in zip((states[0][0], states[0][1], *states[0][3].buffers), (states[1][0], states[1][1],
                                                                         *states[1][3].buffers)):
        assert torch.equal(a, b)
