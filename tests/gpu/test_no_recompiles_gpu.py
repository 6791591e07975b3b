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


def test_decode_calls_on_caches_of_new_sizes_compile_nothing():
    """Eager decoding replays a CUDA graph sized for the cache's room and its compressed-key buffers, which grow
    with the sequence: calls on buffers of new sizes compile nothing while the key blocks stay within one power of
    two (the top-k's tile width). The row counts of the compressed keys were specialised (a compilation within a
    step of eager generate(), ~1 s), and so was the count of LSE partials the scoring reads
    (``benchmarks/dev_decode_compiles.py``)."""
    from infllmv2.ops.triton.decode import infllmv2_decode_triton

    config = SparseConfig()  # MiniCPM4's: every cache here is past dense_len, so the sparse chain runs
    hq, hkv, d = 16, 2, 128

    def call(room, length, extra1, extra2):
        k_cache, v_cache = (torch.randn(1, room, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        rows1 = (room - config.kernel_size) // config.kernel_stride + 1 + extra1
        rows2 = (room - config.coarse_kernel_size) // config.coarse_kernel_stride + 1 + extra2
        k_fine = torch.randn(1, rows1, hkv, d, device="cuda", dtype=torch.bfloat16)
        k_coarse = torch.randn(1, rows2, hkv, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
        lens = torch.tensor([length], dtype=torch.int32, device="cuda")
        with torch.no_grad():
            out = infllmv2_decode_triton(q, k_cache, v_cache, lens, config, k_fine=k_fine, k_coarse=k_coarse)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()

    call(17000, 16500, 0, 0)  # the first call compiles every kernel of the chain (1061 / 264 rows: not divisible by 16)
    compiled = []
    hook = triton.knobs.runtime.jit_cache_hook

    def count(*args, **kwargs):
        compiled.append(getattr(kwargs.get("fn"), "name", "?"))
        return None

    triton.knobs.runtime.jit_cache_hook = count
    try:
        # rooms of 266 to 512 key blocks (the top-k's width stays 512), compressed-key row counts of other
        # residues mod 16 (1264 / 320 rows: divisible by 16), and 5 to 9 LSE partials (with 64 LSE splits: a
        # constexpr width of 8, then of 16)
        for room, length, extra1, extra2 in ((17011, 16999, 3, 3), (20000, 19000, 15, 9), (24576, 24576, 16, 16),
                                             (32760, 32001, 1, 1)):
            call(room, length, extra1, extra2)
    finally:
        triton.knobs.runtime.jit_cache_hook = hook
    assert compiled == [], f"decode kernels compiled again for caches of new sizes: {compiled}"
