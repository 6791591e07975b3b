"""Packed batches of new layouts compile no Triton kernel again (CUDA): the kernels leave the integer arguments that
follow a batch's lengths unspecialised, so a training run on packed rows of varying documents stops compiling after
its first layout (it paid 0.5-1 s a compilation, 18 in the first 12 steps at 32K, before)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
triton = pytest.importorskip("triton")

from infllmv2 import SparseConfig, infllmv2_attention  # noqa: E402


def _step(lengths, config):
    """Forward + backward of one packed batch of these lengths."""
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    cu = torch.tensor(offs, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(offs[-1], h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (16, 2, 2))
    out = infllmv2_attention(q, k, v, config, cu_seqlens=cu, max_seqlen=max(lengths))
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def test_new_packed_layouts_compile_nothing():
    config = SparseConfig(window_size=512, topk=16, dense_len=-1)  # every document sparse: the Triton path
    compiled = []
    hook = triton.knobs.runtime.jit_cache_hook

    def count(*args, **kwargs):
        compiled.append(getattr(kwargs.get("fn"), "name", "?"))
        return None

    _step([8192, 4000], config)  # the first layout compiles every kernel
    triton.knobs.runtime.jit_cache_hook = count
    try:
        # the same longest document (the same constexpr tile widths); totals, tile counts and strides of
        # every residue mod 16, one of them odd
        for second in (4001, 4017, 3985, 4096, 17):
            _step([8192, second], config)
    finally:
        triton.knobs.runtime.jit_cache_hook = hook
    assert compiled == [], f"kernels compiled again for new layouts: {compiled}"
