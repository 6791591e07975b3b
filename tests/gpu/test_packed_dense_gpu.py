"""A packed batch's dense documents on CUDA: exact against a float32 reference per document, gradients included, and
run without cuDNN, which builds an execution plan (~70 ms) for every new document length."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from infllmv2 import SparseConfig, infllmv2_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _reference(q, k, v, offs):
    """float32 math-backend SDPA per document (GQA by repeating the key heads)."""
    outs = []
    for a, b in zip(offs, offs[1:]):
        g = q.shape[1] // k.shape[1]
        qt = q[a:b].float().transpose(0, 1)
        kt, vt = (x[a:b].float().repeat_interleave(g, dim=1).transpose(0, 1) for x in (k, v))
        outs.append(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [(37, 501, 1999, 3001), (700, 9000, 130, 2500)], ids=["all_dense", "mixed"])
def test_packed_dense_documents_are_exact_and_skip_cudnn(lengths):
    torch.manual_seed(0)
    hq, hkv, d = 8, 2, 64
    total = sum(lengths)
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    cu = torch.tensor(offs, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    config = SparseConfig(window_size=512, topk=16, dense_len=8192)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = infllmv2_attention(q, k, v, config, cu_seqlens=cu, max_seqlen=max(lengths))
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not [n for n in kernels if "cudnn" in n.lower()], "a dense document ran through cuDNN"

    dense = [i for i, n in enumerate(lengths) if not config.is_sparse(n)]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = _reference(q32, k32, v32, offs)
    ref.backward(grad_out.float())
    for i in dense:
        a, b = offs[i], offs[i + 1]
        torch.testing.assert_close(out[a:b].float(), ref[a:b], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(q.grad[a:b].float(), q32.grad[a:b], atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(k.grad[a:b].float(), k32.grad[a:b], atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(v.grad[a:b].float(), v32.grad[a:b], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("n_queries", [1, 7, None], ids=["decode_step", "chunk_against_cache", "prefill_no_grad"])
def test_calls_of_new_lengths_below_dense_len_skip_cudnn(n_queries):
    """Decoding below dense_len brings SDPA a new key length at every step, and an inference prefill (no gradients)
    a new prompt length: no cuDNN (a plan per new shape), and the queries' outputs equal a float32 reference."""
    torch.manual_seed(0)
    hq, hkv, d, batch = 8, 2, 128, 2
    config = SparseConfig(window_size=512, topk=16, dense_len=8192)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cases = []
        for n_keys in (1000, 1001, 4097):
            nq = n_keys if n_queries is None else n_queries
            q = torch.randn(batch, nq, hq, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, n_keys, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            with torch.no_grad() if n_queries is None else contextlib.nullcontext():
                cases.append((q, k, v, infllmv2_attention(q, k, v, config)))
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not [n for n in kernels if "cudnn" in n.lower()], "a call of a new length ran through cuDNN"
    for q, k, v, out in cases:
        nq, n_keys = q.shape[1], k.shape[1]
        qt = q.float().transpose(1, 2)
        kt, vt = (x.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2) for x in (k, v))
        mask = torch.ones(nq, n_keys, dtype=torch.bool, device="cuda").tril(n_keys - nq)
        ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
