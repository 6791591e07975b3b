"""One decode step's cache write in one launch: the new token's key and value into the KV cache and the
compressed-key windows it completes (``infllmv2.cache.append_windows(..., fused=True)``)."""
from __future__ import annotations

import triton
import triton.language as tl

from .selection import on_tensor_device

__all__ = ["append_token"]


@triton.jit
def _window_mean(kbase, stride_kt, new_k, buf_ptr, row, h, L, stride_bb, stride_bj, stride_bh, n_buf, D,
                 KERN: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_NEW: tl.constexpr):
    start = L - KERN
    ok = (start >= 0) & ((start % STRIDE) == 0) & (start // STRIDE < n_buf)
    t = tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    lim_t = tl.where(ok, KERN, 0)
    lim_d = tl.where(ok, D, 0)
    m = (t[:, None] < lim_t) & (dd[None, :] < lim_d)
    if HAS_NEW:  # the window's last key is the new one, taken from registers: this program's store of
        m = m & (t[:, None] < KERN - 1)  # it to the cache need not be visible to its other threads yet
    x = tl.load(kbase + (start + t)[:, None] * stride_kt + dd[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_NEW:
        x = tl.where((t == KERN - 1)[:, None], new_k[None, :], x)
    mean = tl.sum(x, 0) / KERN
    j = tl.where(ok, start // STRIDE, 0)
    dst = buf_ptr + row * stride_bb + j * stride_bj + h * stride_bh + dd
    tl.store(dst, mean.to(buf_ptr.dtype.element_ty), mask=dd < lim_d)


@triton.jit
def _append_token_kernel(k_ptr, v_ptr, kn_ptr, vn_ptr, buf1_ptr, buf2_ptr, lens_ptr, pad_ptr,
                         stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_knb, stride_knh,
                         stride_vnb, stride_vnh, stride_1b, stride_1j, stride_1h, stride_2b, stride_2j, stride_2h,
                         n_buf1, n_buf2, max_len, D,
                         KERN1: tl.constexpr, STRIDE1: tl.constexpr, BLOCK_T1: tl.constexpr,
                         KERN2: tl.constexpr, STRIDE2: tl.constexpr, BLOCK_T2: tl.constexpr,
                         BLOCK_D: tl.constexpr, HAS_PAD: tl.constexpr, HAS_NEW: tl.constexpr):
    """Program (row, head): the new key/value into the caches (HAS_NEW), then the window it completes
    for each of up to two kinds (KERN = 0: none)."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    L = tl.load(lens_ptr + row).to(tl.int64)
    pad = 0
    if HAS_PAD:  # the row's keys start at this slot
        pad = tl.load(pad_ptr + row).to(tl.int64)
    kbase = k_ptr + row * stride_kb + h * stride_kh + pad * stride_kt
    dd = tl.arange(0, BLOCK_D)
    new_k = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_NEW:
        dm = dd < D
        # rounded to the cache's dtype first, so that the windows pool what the cache holds
        kn = tl.load(kn_ptr + row * stride_knb + h * stride_knh + dd, mask=dm).to(k_ptr.dtype.element_ty)
        vn = tl.load(vn_ptr + row * stride_vnb + h * stride_vnh + dd, mask=dm).to(v_ptr.dtype.element_ty)
        wm = dd < tl.where((L >= 1) & (pad + L - 1 < max_len), D, 0)
        tl.store(kbase + (L - 1) * stride_kt + dd, kn, mask=wm)
        tl.store(v_ptr + row * stride_vb + h * stride_vh + (pad + L - 1) * stride_vt + dd, vn, mask=wm)
        new_k = kn.to(tl.float32)
    if KERN1 > 0:
        _window_mean(kbase, stride_kt, new_k, buf1_ptr, row, h, L, stride_1b, stride_1j, stride_1h, n_buf1,
                     D, KERN1, STRIDE1, BLOCK_T1, BLOCK_D, HAS_NEW)
    if KERN2 > 0:
        _window_mean(kbase, stride_kt, new_k, buf2_ptr, row, h, L, stride_2b, stride_2j, stride_2h, n_buf2,
                     D, KERN2, STRIDE2, BLOCK_T2, BLOCK_D, HAS_NEW)


@on_tensor_device
def append_token(bufs, k_cache, lens, leftpad, kernels, strides, k_new, v_new, v_cache) -> None:
    """Launch over (batch, Hkv): bufs/kernels/strides the (at most two) kinds of compressed keys; k_new, v_new
    (batch, Hkv, d) and v_cache, or all three None (windows only); lens (batch,) int32 keys per row, the new one
    counted; leftpad (batch,) int32 or None."""
    b, max_len, h, d = k_cache.shape
    pad = lens if leftpad is None else leftpad
    has_new = k_new is not None
    if not has_new:  # placeholders, never read
        k_new = v_new = v_cache = k_cache
    kinds = [(kern, stride, buf, 1 << max(4, (kern - 1).bit_length()))
             for kern, stride, buf in zip(kernels, strides, bufs)]
    kinds += [(0, 1, k_cache, 16)] * (2 - len(kinds))  # KERN = 0: no such kind
    (k1, s1, buf1, t1), (k2, s2, buf2, t2) = kinds
    _append_token_kernel[(b, h)](
        k_cache, v_cache, k_new, v_new, buf1, buf2, lens, pad,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), k_new.stride(0), k_new.stride(-2), v_new.stride(0), v_new.stride(-2),
        buf1.stride(0), buf1.stride(1), buf1.stride(2), buf2.stride(0), buf2.stride(1), buf2.stride(2),
        buf1.shape[1], buf2.shape[1], max_len, d,
        KERN1=k1, STRIDE1=s1, BLOCK_T1=t1, KERN2=k2, STRIDE2=s2, BLOCK_T2=t2,
        BLOCK_D=1 << max(4, (d - 1).bit_length()), HAS_PAD=leftpad is not None, HAS_NEW=has_new)
