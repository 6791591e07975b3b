"""Stage 2 of InfLLM-V2 in Triton: per-token block-sparse attention, forward and backward.

Layout (packed varlen, the only layout): ``q (total_q, Hq, d)``, ``k, v (total_k, Hkv, d)``;
sequence ``i`` owns queries ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and keys
``cu_seqlens_k[i]:cu_seqlens_k[i+1]``; its queries are the LAST ``len_q`` positions of its ``len_k``
keys (token position ``t = len_k - len_q + i``), causal. ``block_indices (Hkv, total_q, budget)``
int32 holds, per KV head and token, the selected key blocks (relative to the sequence's key start),
padded with -1. The ``G = Hq / Hkv`` query heads of a group share them.

Design (the reuse that a per-token kernel lacks):

* The queries of a sequence are cut into tiles of ``T`` consecutive tokens; one program owns a
  (tile, KV head) pair and its ``M = T * G`` rows (the G heads of each of the T tokens).
* Before the kernels, on the GPU with fixed-size tensors only (no host synchronisation), the
  per-(head, tile) **union** of the blocks its tokens selected is built (sorted, -1 padded, plus a
  count) together with, per union entry, an int64 **bitmask** of the tile's tokens that selected
  it (``_tile_union_kernel``: one program per (tile, head) sorts the candidates in registers; for large tiles,
  ``_row_bitmap_kernel`` + ``_tile_union_bitmap_kernel`` OR the tokens' bitmaps of selected blocks instead).
  The kernels loop over the union, load each K/V block once for the whole tile, and mask rows
  whose token did not select the block (a per-row -inf bias folded into the score scaling) and, on
  blocks that reach past the tile's first token, causality: semantics stay exactly per token. On
  Hopper the forward and dq kernels load K/V blocks as TMA boxes.
* Backward FA2-style: ``dq`` (+ ``delta = rowsum(dO * O)``, from O plus the forward's saved
  bf16/fp16 rounding residual, so delta is exact) with the forward's structure; ``dk/dv``
  per (KV head, key block) over exactly the tokens that selected the block, T of them (from anywhere
  in the sequence) per step: no rows that did not select it, unlike the forward's union tiles (at
  128K on the H200 this halved the backward on `random` selections, 343 -> 175 ms, and cut it
  175 -> 132 ms on `local` ones). That token-level transposed index is a stable sort of the
  (token, block) pairs by global block on the GPU, cut into chunks of at most ``chunk`` steps so that
  heavily shared blocks (the attention sink) are split over several programs, which accumulate into
  fp32 buffers with atomics.

On Hopper GPUs the forward runs as ``sparse_fwd_sm90.py``'s Gluon kernels instead: at d 128 the warp-specialised
one (``FWD_SM90_WS``: three row tiles a program sharing one K / V stream over the union of their blocks, the
plan's tiles then holding three row tiles' tokens), else the plain one (``FWD_SM90``: the same work in the same
order, three programs an SM instead of two).

Registered as ``torch.ops.infllmv2.sparse_attention_fwd`` / ``..._bwd`` custom ops with a fake
implementation and autograd, so torch.compile can trace it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reuse import once_per_forward
from .selection import _next_pow2, cdiv, on_tensor_device, softmax_scale_or_default
from .gluon_support import GluonKernel
from .sparse_fwd_sm90 import sparse_fwd_sm90, sparse_fwd_sm90_supported
from .sparse_fwd_sm90 import sparse_fwd_sm90_ws, sparse_fwd_sm90_ws_tiles

try:  # host-side TMA descriptors (Triton >= 3.4); without them K/V load through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = ["sparse_attention_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_MAX_TOKENS_PER_TILE = 64  # bits of the int64 token mask
_SUPPORTED_HEAD_DIMS = (32, 64, 128)
_PAD_KEY = 2 ** 31 - 1
# delta = rowsum(dO * O) for the backward. The autograd path keeps the output's bf16/fp16 rounding
# residual (O_fp32 - O, one extra tensor of O's size saved for backward) and uses O + residual:
# exact at no extra matmul. Without a residual (direct _backward calls): True recomputes O in fp32
# (one extra pass of two matmuls in the dq kernel, ~25% slower backward); False uses the rounded O as
# FlashAttention does (its gradient error then exceeds the SPEC 2x rule against an fp32 reference).
EXACT_DELTA = True
# Pair two union blocks per step (K/V tiles of 2*block_size keys) in the forward and dq kernels.
# Measured slower on the H200 (fwd 75 vs 48 ms at 128K), so off by default; kept as an option (tested in
# the interpreter).
PAIR_BLOCKS = os.environ.get("INFLLMV2_SPARSE_PAIR", "0") == "1"
# Rows per program on the GPU (T = BLOCK_M // G tokens share each K/V block load).
DEFAULT_BLOCK_M = int(os.environ.get("INFLLMV2_SPARSE_BLOCK_M", "64"))
# Build the per-tile unions with one Triton kernel (sort in registers) instead of a segmented torch.sort,
# up to this many candidates (T * budget, rounded up to a power of two) per tile: the sizes measured on the
# H200 (512 at G = 16 and 2048 at G = 4 with 96 blocks); larger tiles keep the torch build unless the bitmap build
# below takes them.
UNION_KERNEL = os.environ.get("INFLLMV2_SPARSE_UNION_KERNEL", "1") == "1"
UNION_KERNEL_MAX = 2048
UNION_WARPS = None  # tuning knob: warps of the union kernel (None: as measured, in _tile_unions)
# ... or, for tiles of at least this many candidates (T * budget rounded up to a power of two) and up to this many
# visible blocks, from per-token bitmaps of the selected blocks (``_row_bitmap_kernel``): the union is an OR of the
# tile's bitmaps and each block's token mask their bits, with no sort or atomics (H200, 12-token tiles at 128K:
# 2.25 -> 0.66 ms; it lost to the sort for 4-token tiles, 0.75-0.95 -> 0.85-1.03 ms)
UNION_BITMAP_MIN_CANDIDATES = 1024
UNION_BITMAP_MAX_BINS = 4096
# Load K/V blocks of the forward and dq kernels as TMA boxes (tensor descriptors) where the GPU has TMA.
TMA_LOADS = os.environ.get("INFLLMV2_SPARSE_TMA", "1") == "1"
# Rows that did not select a block get -inf through a per-row bias folded into the score scaling, and the
# causal mask runs only on blocks that reach past a tile's first token (else a select per score).
ROW_MASK = os.environ.get("INFLLMV2_SPARSE_ROW_MASK", "1") == "1"
# The forward on Hopper by the Gluon kernel of sparse_fwd_sm90.py (``FWD_SM90.enabled = False``: the Triton kernel;
# gluon_support.GluonKernel: INFLLMV2_GLUON, the Triton releases it was checked on, the fallback on a failed build).
FWD_SM90 = GluonKernel("sparse forward")
# ... and, where it applies (d 128), by its warp-specialised variant (``FWD_SM90_WS.enabled = False``: the above)
FWD_SM90_WS = GluonKernel("warp-specialised sparse forward")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _kv_tile(UB, UBITS, ubase, i, cnt, tok64, half, within,
             BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Key positions [NB*BLOCK_N] and per-row selection [BLOCK_M, NB*BLOCK_N] of union entries i (, i+1)."""
    blk_a = tl.load(UB + ubase + i)
    sel_a = ((tl.load(UBITS + ubase + i) >> tok64) & 1) != 0
    if NB == 2:
        has_b = (i + 1) < cnt
        blk_b = tl.where(has_b, tl.load(UB + ubase + i + 1), -1)
        bits_b = tl.where(has_b, tl.load(UBITS + ubase + i + 1), 0)
        sel_b = ((bits_b >> tok64) & 1) != 0
        blk_n = tl.where(half == 0, blk_a, blk_b)
        sel = tl.where(half[None, :] == 0, sel_a[:, None], sel_b[:, None])
    else:
        blk_n = blk_a + half * 0
        sel = sel_a[:, None] & (half[None, :] == 0)
    kpos = blk_n * BLOCK_N + within
    return blk_a, blk_n, kpos, sel


@triton.jit
def _row_bias(UBITS, ubase, i, tok64, base):
    """Per row: ``base`` where the row's token selected union entry i, else -inf. Added to the row's max and to
    each exponent (inside its one FMA) it removes the rows that did not select the block, which a per-element mask
    would do at the cost of a select per score; rows past the tile's tokens never have their bit set."""
    return tl.where(((tl.load(UBITS + ubase + i) >> tok64) & 1) != 0, base, float("-inf"))


@triton.jit
def _load_kv(K, V, k0, blk, kpos, kmask, h, offs_d, stride_kt, stride_kh, stride_vt, stride_vh,
             BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """K and V rows of one key block (TMA: K, V are 2-D descriptors (total_k, Hkv * D) and the box is
    loaded whole; rows past the block's visible keys hold other finite keys, which the score mask
    removes) or of the NB * BLOCK_N positions ``kpos`` (pointers, masked rows read as zeros)."""
    if TMA:
        r = (k0 + blk * BLOCK_N).to(tl.int32)
        k = K.load([r, h * D])
        v = V.load([r, h * D])
    else:
        krow = k0 + kpos.to(tl.int64)
        k = tl.load(K + krow[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + krow[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kmask[:, None], other=0.0)
    return k, v


@triton.jit(do_not_specialize=["stride_lse_h", "stride_u_h", "stride_u_t", "stride_cnt_h", "n_tiles"])
def _sparse_fwd_kernel(
    Q, K, V, O, R, LSE,
    UB, UBITS, UCNT,
    TILE_SEQ, TILE_Q0, TILE_NQ, TILE_POS0, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_rt, stride_rh,
    stride_lse_h, stride_u_h, stride_u_t, stride_cnt_h, n_tiles,
    scale_log2,
    G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, STORE_RESID: tl.constexpr, TMA: tl.constexpr,
    ROW_MASK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(TILE_SEQ + pid_t)
    if seq < 0:
        return
    q0 = tl.load(TILE_Q0 + pid_t)
    nq = tl.load(TILE_NQ + pid_t)
    pos0 = tl.load(TILE_POS0 + pid_t)
    k0 = tl.load(CU_K + seq).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    tok = rows // G
    head = h * G + rows % G
    row_ok = (rows < T * G) & (tok < nq)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, NB * BLOCK_N)
    half = offs_n // BLOCK_N
    within = offs_n % BLOCK_N
    qrow = (q0 + tok).to(tl.int64)
    q = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos = pos0 + tok
    pos_last = pos0 + nq - 1
    tok64 = tok.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    ubase = h.to(tl.int64) * stride_u_h + pid_t.to(tl.int64) * stride_u_t
    cnt = tl.load(UCNT + h * stride_cnt_h + pid_t)
    for i in range(0, cnt, NB):
        blk_a, blk_n, kpos, sel = _kv_tile(UB, UBITS, ubase, i, cnt, tok64, half, within, BLOCK_N, NB)
        kmask = (blk_n >= 0) & (kpos <= pos_last)
        k, v = _load_kv(K, V, k0, blk_a, kpos, kmask, h, offs_d, stride_kt, stride_kh, stride_vt, stride_vh,
                        BLOCK_N, D, TMA)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        # the row max over the raw scores, scaled per row (scale > 0, so it is the max of the scaled ones): each
        # exponent is then one FMA, s * scale + (bias - m), with no subtraction per score
        if ROW_MASK:
            bias = _row_bias(UBITS, ubase, i, tok64, 0.0)
            if (blk_a + 1) * BLOCK_N > pos0 + 1:  # a block reaching past the tile's first token: causal mask
                s = tl.where(kpos[None, :] <= pos[:, None], s, float("-inf"))
        else:
            bias = tl.zeros([BLOCK_M], dtype=tl.float32)
            s = tl.where(sel & row_ok[:, None] & (kpos[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2 + bias)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * scale_log2 + (bias - m_use)[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    out_lp = out.to(O.dtype.element_ty)
    tl.store(O + qrow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :], out_lp,
             mask=row_ok[:, None])
    if STORE_RESID:  # rounding residual of the output, for an exact delta = rowsum(dO * O) in the backward
        resid = out - out_lp.to(tl.float32)
        tl.store(R + qrow[:, None] * stride_rt + head[:, None] * stride_rh + offs_d[None, :],
                 resid.to(R.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head.to(tl.int64) * stride_lse_h + qrow, lse, mask=row_ok)


@triton.jit(do_not_specialize=["stride_lse_h", "stride_u_h", "stride_u_t", "stride_cnt_h", "n_tiles"])
def _sparse_bwd_dq_kernel(
    Q, K, V, O, R, DO, LSE, DELTA, DQ,
    UB, UBITS, UCNT,
    TILE_SEQ, TILE_Q0, TILE_NQ, TILE_POS0, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_rt, stride_rh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    stride_lse_h, stride_u_h, stride_u_t, stride_cnt_h, n_tiles,
    scale, scale_log2,
    G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_RESID: tl.constexpr, EXACT_DELTA: tl.constexpr,
    TMA: tl.constexpr, ROW_MASK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(TILE_SEQ + pid_t)
    if seq < 0:
        return
    q0 = tl.load(TILE_Q0 + pid_t)
    nq = tl.load(TILE_NQ + pid_t)
    pos0 = tl.load(TILE_POS0 + pid_t)
    k0 = tl.load(CU_K + seq).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    tok = rows // G
    head = h * G + rows % G
    row_ok = (rows < T * G) & (tok < nq)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, NB * BLOCK_N)
    half = offs_n // BLOCK_N
    within = offs_n % BLOCK_N
    qrow = (q0 + tok).to(tl.int64)
    q = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + qrow[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse_ptr = head.to(tl.int64) * stride_lse_h + qrow
    lse = tl.load(LSE + lse_ptr, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    pos = pos0 + tok
    pos_last = pos0 + nq - 1
    tok64 = tok.to(tl.int64)
    ubase = h.to(tl.int64) * stride_u_h + pid_t.to(tl.int64) * stride_u_t
    cnt = tl.load(UCNT + h * stride_cnt_h + pid_t)

    if EXACT_DELTA:
        # delta = rowsum(dO * O) with the unrounded O, recomputed in fp32 by one extra pass.
        o_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for i in range(0, cnt, NB):
            blk_a, blk_n, kpos, sel = _kv_tile(UB, UBITS, ubase, i, cnt, tok64, half, within, BLOCK_N, NB)
            kmask = (blk_n >= 0) & (kpos <= pos_last)
            k, v = _load_kv(K, V, k0, blk_a, kpos, kmask, h, offs_d, stride_kt, stride_kh, stride_vt, stride_vh,
                            BLOCK_N, D, TMA)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            mask = sel & row_ok[:, None] & (kpos[None, :] <= pos[:, None])
            p = tl.where(mask, tl.exp2(s - lse2[:, None]), 0.0)
            o_acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
        delta = tl.sum(o_acc * do.to(tl.float32), 1)
    else:
        o = tl.load(O + qrow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        if HAS_RESID:
            o += tl.load(R + qrow[:, None] * stride_rt + head[:, None] * stride_rh + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0).to(tl.float32)
        delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + lse_ptr, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for i in range(0, cnt, NB):
        blk_a, blk_n, kpos, sel = _kv_tile(UB, UBITS, ubase, i, cnt, tok64, half, within, BLOCK_N, NB)
        kmask = (blk_n >= 0) & (kpos <= pos_last)
        k, v = _load_kv(K, V, k0, blk_a, kpos, kmask, h, offs_d, stride_kt, stride_kh, stride_vt, stride_vh,
                        BLOCK_N, D, TMA)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if ROW_MASK:
            p = tl.exp2(s * scale_log2 + _row_bias(UBITS, ubase, i, tok64, -lse2)[:, None])
            if (blk_a + 1) * BLOCK_N > pos0 + 1:
                p = tl.where(kpos[None, :] <= pos[:, None], p, 0.0)
        else:
            mask = sel & row_ok[:, None] & (kpos[None, :] <= pos[:, None])
            p = tl.where(mask, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + qrow[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["stride_lse_h", "stride_ch_h", "stride_e_h"])
def _sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    CH_GB, CH_START, CH_END, E_TOK, GB_SEQ, GB_BLK, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lse_h, stride_ch_h, stride_e_h,
    scale, scale_log2,
    G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (chunk of the tokens that selected one key block, KV head). Each step takes the
    next T of those tokens (sorted ascending, from anywhere in the sequence) and their G heads as its
    BLOCK_M rows: every row selected the block, so no step is spent on rows that did not (the union
    tiles of the forward carry such rows: 1.25x the selected blocks on `local` inputs, 2.5x on `random`)."""
    pid_c = tl.program_id(0)
    h = tl.program_id(1)
    chb = h.to(tl.int64) * stride_ch_h + pid_c
    gb = tl.load(CH_GB + chb)
    if gb < 0:
        return
    start = tl.load(CH_START + chb)
    end = tl.load(CH_END + chb)
    seq = tl.load(GB_SEQ + gb)
    blk = tl.load(GB_BLK + gb)
    k0 = tl.load(CU_K + seq).to(tl.int64)
    len_k = tl.load(CU_K + seq + 1) - tl.load(CU_K + seq)
    # position of query row r in its sequence: r + pos_shift (the queries are the last len_q of len_k keys)
    pos_shift = len_k - tl.load(CU_Q + seq + 1)

    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    kpos = blk * BLOCK_N + offs_n
    kmask = kpos < len_k
    krow = k0 + kpos.to(tl.int64)
    k = tl.load(K + krow[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(V + krow[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kmask[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    rows = tl.arange(0, BLOCK_M)
    j = rows // G
    head = h * G + rows % G
    row_in = rows < T * G
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    ebase = E_TOK + h.to(tl.int64) * stride_e_h
    for e in range(start, end, T):
        ej = e + j
        ok = row_in & (ej < end)
        tok = tl.load(ebase + ej, mask=ok, other=-1)
        ok = ok & (tok >= 0)  # -1: a repeat of the previous entry (see _token_index)
        qrow = tok.to(tl.int64)
        q = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=ok[:, None], other=0.0)
        do = tl.load(DO + qrow[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                     mask=ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse_ptr = head.to(tl.int64) * stride_lse_h + qrow
        lse = tl.load(LSE + lse_ptr, mask=ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + lse_ptr, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.exp2(s * scale_log2 + tl.where(ok, -lse2, float("-inf"))[:, None])
        # causal mask only where the block reaches past the step's first (smallest) token (a -1 there, a
        # repeat, only makes the test more conservative)
        if (blk + 1) * BLOCK_N > tl.load(ebase + e) + pos_shift + 1:
            p = tl.where(kpos[None, :] <= (tok + pos_shift)[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * scale
    tl.atomic_add(DK + krow[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :], dk, mask=kmask[:, None])
    tl.atomic_add(DV + krow[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :], dv, mask=kmask[:, None])


@triton.jit
def _union_tile(TILE_Q0, TILE_NQ, TILE_POS0):
    """A union program's (tile, KV head) and its tile: first query row, tokens, first token's position."""
    pid_t = tl.program_id(0)
    return (pid_t, tl.program_id(1), tl.load(TILE_Q0 + pid_t).to(tl.int64), tl.load(TILE_NQ + pid_t),
            tl.load(TILE_POS0 + pid_t))


@triton.jit(do_not_specialize=["stride_bh", "stride_u_h", "stride_u_t", "stride_cnt_h", "u_cap"])
def _tile_union_kernel(
    BI, TILE_Q0, TILE_NQ, TILE_POS0, UB, UBITS, UCNT,
    stride_bh, stride_bt, stride_u_h, stride_u_t, stride_cnt_h, budget, u_cap, block_size,
    T: tl.constexpr, TB: tl.constexpr, PAD: tl.constexpr, TOK_BITS: tl.constexpr,
):
    """One program per (tile, KV head): the sorted union of the blocks its T tokens selected and, per
    union entry, the bitmask of those tokens (the torch version is ``_tile_unions_torch``), by a sort of the tile's
    (block, token) keys in registers. UB must be -1 filled and UBITS zeroed; entries past ``u_cap`` are dropped (the
    count is clamped)."""
    pid_t, h, q0, nq, pos0 = _union_tile(TILE_Q0, TILE_NQ, TILE_POS0)
    e = tl.arange(0, TB)
    j = e // budget
    in_tile = (e < T * budget) & (j < nq)
    g = tl.load(BI + h.to(tl.int64) * stride_bh + (q0 + j) * stride_bt + e % budget, mask=in_tile, other=-1)
    valid = in_tile & (g >= 0) & (g * block_size <= pos0 + j)
    base = h.to(tl.int64) * stride_u_h + pid_t.to(tl.int64) * stride_u_t
    key = tl.sort(tl.where(valid, g * TOK_BITS + j, PAD))  # (block, token)
    valid = key != PAD
    blk = key // TOK_BITS
    j = key % TOK_BITS
    prev_blk = tl.gather(blk, tl.maximum(e - 1, 0), 0)
    first = valid & ((e == 0) | (prev_blk != blk))
    seg = tl.cumsum(first.to(tl.int32), 0) - 1
    tl.store(UB + base + seg, blk, mask=first & (seg < u_cap))
    n_union = tl.sum(first.to(tl.int32), 0)
    keep = valid & (seg < u_cap)
    tl.atomic_or(UBITS + base + seg, tl.full([TB], 1, tl.int64) << j.to(tl.int64), mask=keep)
    tl.store(UCNT + h * stride_cnt_h + pid_t, tl.minimum(n_union, u_cap))


@triton.jit
def _seg_or(v1, w1, v2, w2):
    # segmented OR scan: runs of equal keys (words) restart it
    return tl.where(w1 == w2, v1 | v2, v2), w2


@triton.jit(do_not_specialize=["n_rows", "stride_bh", "stride_wh"])
def _row_bitmap_kernel(BI, WORDS, n_rows, budget, stride_bh, stride_bt, stride_wh, stride_wt,
                       W: tl.constexpr, ROWS: tl.constexpr, BP: tl.constexpr):
    """One program per (ROWS query rows, KV head): each row's selected blocks as W 32-bit words (block b: bit b % 32 of
    word b // 32; blocks >= 32 W dropped). WORDS must be zeroed. A row sorted ascending with -1 last (as the selection
    writes it) has each word's blocks side by side: a segmented OR scan collects them and one store a word writes
    them; any other row (repeats, -1 anywhere, any order) ORs its blocks in atomically."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    r = pid * ROWS + tl.arange(0, ROWS)
    e = tl.arange(0, BP)
    ptr = BI + h.to(tl.int64) * stride_bh + r.to(tl.int64)[:, None] * stride_bt + e[None, :]
    row_ok = (r < n_rows)[:, None]
    g = tl.load(ptr, mask=row_ok & (e[None, :] < budget), other=-1)
    g_next = tl.load(ptr + 1, mask=row_ok & (e[None, :] + 1 < budget), other=-1)
    valid = (g >= 0) & (g < W * 32)
    valid_next = (g_next >= 0) & (g_next < W * 32)
    big = W * 32
    ordered = tl.where(valid, g, big) <= tl.where(valid_next, g_next, big)
    row_sorted = tl.min(ordered.to(tl.int32), 1) > 0
    word = tl.where(valid, g >> 5, -1)
    bit = tl.where(valid, tl.full(g.shape, 1, tl.int32) << (g & 31), 0)
    acc, _ = tl.associative_scan((bit, word), 1, _seg_or)
    run_end = valid & (~valid_next | ((g_next >> 5) != word))
    wptr = WORDS + h.to(tl.int64) * stride_wh + r.to(tl.int64)[:, None] * stride_wt + word
    tl.store(wptr, acc, mask=row_sorted[:, None] & run_end)
    tl.atomic_or(wptr, bit, mask=~row_sorted[:, None] & valid)


@triton.jit(do_not_specialize=["stride_wh", "stride_u_h", "stride_u_t", "stride_cnt_h", "u_cap"])
def _tile_union_bitmap_kernel(
    WORDS, TILE_Q0, TILE_NQ, TILE_POS0, UB, UBITS, UCNT,
    stride_wh, stride_wt, stride_u_h, stride_u_t, stride_cnt_h, u_cap, block_size, W: tl.constexpr,
):
    """The output of ``_tile_union_kernel`` from the tokens' bitmaps (``_row_bitmap_kernel``): the union's words are
    the OR of the tile's rows (each cut to the blocks its token may see), a block's token mask is the bits of its
    column, and a cumulative sum over the present blocks places them in ascending order. UB -1 filled, UBITS zeroed."""
    pid_t, h, q0, nq, pos0 = _union_tile(TILE_Q0, TILE_NQ, TILE_POS0)
    wi = tl.arange(0, W)
    bi = tl.arange(0, 32)
    union = tl.zeros([W], tl.int32)
    masks = tl.zeros([W, 32], tl.int64)
    row = WORDS + h.to(tl.int64) * stride_wh + q0 * stride_wt + wi
    for j in range(nq):
        w = tl.load(row + j * stride_wt)
        # the blocks the token may see: bits up to (its position // block_size), computed in 64 bits (32 bits set)
        last = tl.minimum(tl.maximum((pos0 + j) // block_size - wi * 32, -1), 31)
        w = w & ((tl.full([W], 1, tl.int64) << (last + 1)) - 1).to(tl.int32)
        union = union | w
        masks = masks | (((w[:, None] >> bi[None, :]) & 1).to(tl.int64) << j)
    present = tl.reshape(((union[:, None] >> bi[None, :]) & 1) != 0, [W * 32])
    masks = tl.reshape(masks, [W * 32])
    slot = tl.cumsum(present.to(tl.int32), 0) - 1
    keep = present & (slot < u_cap)
    base = h.to(tl.int64) * stride_u_h + pid_t.to(tl.int64) * stride_u_t
    tl.store(UB + base + slot, tl.arange(0, W * 32), mask=keep)
    tl.store(UBITS + base + slot, masks, mask=keep)
    tl.store(UCNT + h * stride_cnt_h + pid_t, tl.minimum(tl.sum(present.to(tl.int32), 0), u_cap))


# Launch configurations. The interpreter gets one config (autotune with several fails there);
# on the GPU the tile shape (BLOCK_M, hence T) is chosen on the host because the union depends on
# it; warps/stages are autotuned.
if _INTERPRET:
    _fwd_launch = _sparse_fwd_kernel
    _dq_launch = _sparse_bwd_dq_kernel
    _dkdv_launch = _sparse_bwd_dkdv_kernel
    _LAUNCH_KW = dict(num_warps=4, num_stages=1)
else:
    _fwd_cfgs = [triton.Config({}, num_warps=4, num_stages=3), triton.Config({}, num_warps=8, num_stages=2)]
    # (a 168-register cap was 1% faster for dq at 32K and 128K, both patterns, H200, eighth session; the other
    # kernels' caps and stage counts in benchmarks/dev_launch_configs.py lost)
    _dq_cfgs = [triton.Config({}, num_warps=4, num_stages=2, maxnreg=168), triton.Config({}, num_warps=4, num_stages=2),
                triton.Config({}, num_warps=8, num_stages=2)]
    # (H200, standard shape: 4 warps with 3 stages won at 32K and 128K, both patterns)
    _dkdv_cfgs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2))]
    _shape_key = ["G", "T", "BLOCK_M", "BLOCK_N", "D", "UPCAST"]
    _key = _shape_key + ["TMA", "ROW_MASK"]
    _fwd_launch = triton.autotune(configs=_fwd_cfgs, key=_key + ["NB", "STORE_RESID"])(_sparse_fwd_kernel)
    _dq_launch = triton.autotune(configs=_dq_cfgs, key=_key + ["NB", "HAS_RESID", "EXACT_DELTA"])(
        _sparse_bwd_dq_kernel)
    _dkdv_launch = triton.autotune(configs=_dkdv_cfgs, key=_shape_key, reset_to_zero=["DK", "DV"])(
        _sparse_bwd_dkdv_kernel)
    _LAUNCH_KW = {}


# --------------------------------------------------------------------------------------------
# Index preparation (GPU, fixed-size tensors, no host synchronisation)
# --------------------------------------------------------------------------------------------


def _tile_shape(G: int, block_m: int | None) -> tuple[int, int]:
    """(T tokens per tile, BLOCK_M rows) for group size G."""
    if block_m is None:
        block_m = 32 if _INTERPRET else DEFAULT_BLOCK_M
    block_m = max(block_m, _next_pow2(G), 16)
    T = max(1, min(block_m // G, _MAX_TOKENS_PER_TILE))
    return T, block_m


def _tile_table(cu_q, cu_k, T: int, total_q: int, batch: int):
    """Per tile of T tokens: sequence id (-1 = no tile), first query row, valid tokens, first position."""
    dev = cu_q.device
    n_tiles = total_q // T + batch
    cu_q64, cu_k64 = cu_q.long(), cu_k.long()
    len_q = cu_q64[1:] - cu_q64[:-1]
    len_k = cu_k64[1:] - cu_k64[:-1]
    ntile = (len_q + T - 1) // T
    cum = torch.cumsum(ntile, 0)
    ids = torch.arange(n_tiles, device=dev)
    seq = torch.searchsorted(cum, ids, right=True)
    valid = seq < batch
    seq_c = seq.clamp(max=max(batch - 1, 0))
    local = ids - (cum[seq_c] - ntile[seq_c])
    q0 = cu_q64[seq_c] + local * T
    nq = torch.clamp(len_q[seq_c] - local * T, max=T)
    pos0 = len_k[seq_c] - len_q[seq_c] + local * T
    tile_seq = torch.where(valid, seq_c, -1).to(torch.int32)
    nq = torch.where(valid, nq, 0)
    q0 = torch.where(valid, q0, 0)
    pos0 = torch.where(valid, pos0, 0)
    return tile_seq, q0.to(torch.int32), nq.to(torch.int32), pos0.to(torch.int32)


def _tile_unions(block_indices, tile_q0, tile_nq, tile_pos0, T: int, block_size: int, u_cap: int,
                 n_blocks: int | None = None):
    """Per (KV head, tile): sorted union of selected blocks (-1 padded, width u_cap + 1 incl. a dump
    column), int64 bitmask of the tile's tokens selecting each, and the union size. One Triton program
    per (tile, head) ORs its tokens' bitmaps of selected blocks where ``n_blocks`` (the bound of the visible blocks)
    is given and UNION_BITMAP_* allow; else it sorts the tile's T * budget candidates in registers; beyond
    UNION_KERNEL_MAX of them (or with UNION_KERNEL off) a segmented torch.sort does the same."""
    hkv, total_q, budget = block_indices.shape
    n_tiles = tile_q0.shape[0]
    tb = _next_pow2(max(T * budget, 16))
    bitmap = (n_blocks is not None and 0 < n_blocks <= UNION_BITMAP_MAX_BINS and tb >= UNION_BITMAP_MIN_CANDIDATES
              and T <= _MAX_TOKENS_PER_TILE)
    if (not UNION_KERNEL or (tb > UNION_KERNEL_MAX and not bitmap)
            or (block_indices.device.type == "cpu" and not _INTERPRET)):
        return _tile_unions_torch(block_indices, tile_q0, tile_nq, tile_pos0, T, block_size, u_cap)
    dev = block_indices.device
    block_indices = block_indices.contiguous()
    ub = torch.full((hkv, n_tiles, u_cap + 1), -1, dtype=torch.int32, device=dev)
    ubits = torch.zeros((hkv, n_tiles, u_cap + 1), dtype=torch.int64, device=dev)
    cnt = torch.empty((hkv, n_tiles), dtype=torch.int32, device=dev)
    if bitmap and n_tiles and hkv and budget:
        n_words = _next_pow2(cdiv(n_blocks, 32))
        words = torch.zeros((hkv, total_q, n_words), dtype=torch.int32, device=dev)
        rows = 16
        _row_bitmap_kernel[(cdiv(total_q, rows), hkv)](
            block_indices, words, total_q, budget, block_indices.stride(0), block_indices.stride(1),
            words.stride(0), words.stride(1), W=n_words, ROWS=rows, BP=_next_pow2(budget), num_warps=4)
        _tile_union_bitmap_kernel[(n_tiles, hkv)](
            words, tile_q0, tile_nq, tile_pos0, ub, ubits, cnt, words.stride(0), words.stride(1), ub.stride(0),
            ub.stride(1), cnt.stride(0), u_cap, block_size, W=n_words, num_warps=UNION_WARPS or 2)
        return ub, ubits, cnt
    # warps (H200, 128K): the sort of 2048 keys 2.53 ms with 8, 1.99 with 16
    warps = UNION_WARPS or (4 if tb <= 1024 else 16)
    if n_tiles and hkv and budget:
        _tile_union_kernel[(n_tiles, hkv)](
            block_indices, tile_q0, tile_nq, tile_pos0, ub, ubits, cnt,
            block_indices.stride(0), block_indices.stride(1), ub.stride(0), ub.stride(1), cnt.stride(0),
            budget, u_cap, block_size, T=T, TB=tb, PAD=_PAD_KEY, TOK_BITS=_MAX_TOKENS_PER_TILE, num_warps=warps)
    else:
        cnt.zero_()
    return ub, ubits, cnt


def _tile_unions_torch(block_indices, tile_q0, tile_nq, tile_pos0, T: int, block_size: int, u_cap: int):
    """Per (KV head, tile): sorted union of selected blocks (-1 padded, width u_cap + 1 incl. a dump
    column), int64 bitmask of the tile's tokens selecting each, and the union size."""
    hkv, total_q, budget = block_indices.shape
    n_tiles = tile_q0.shape[0]
    dev = block_indices.device
    j = torch.arange(T, device=dev, dtype=torch.int32)
    tok = tile_q0[:, None] + j[None, :]  # (n_tiles, T)
    tok_ok = j[None, :] < tile_nq[:, None]
    tok = torch.where(tok_ok, tok, 0).clamp_(max=max(total_q - 1, 0))
    pos = tile_pos0[:, None] + j[None, :]
    g = block_indices[:, tok.reshape(-1).long(), :].view(hkv, n_tiles, T, budget)
    valid = tok_ok[None, :, :, None] & (g >= 0) & (g.to(torch.int64) * block_size <= pos[None, :, :, None])
    key = torch.where(valid, g * _MAX_TOKENS_PER_TILE + j[None, None, :, None], _PAD_KEY)
    key = key.view(hkv, n_tiles, T * budget)
    key = torch.sort(key, dim=-1).values
    ok = key != _PAD_KEY
    blk = key // _MAX_TOKENS_PER_TILE
    tid = (key % _MAX_TOKENS_PER_TILE).to(torch.int64)
    prev_key = torch.nn.functional.pad(key[..., :-1], (1, 0), value=-1)
    prev_blk = torch.nn.functional.pad(blk[..., :-1], (1, 0), value=-1)
    first_key = ok & (key != prev_key)
    first_blk = ok & (blk != prev_blk)
    seg = torch.cumsum(first_blk.to(torch.int32), dim=-1) - 1
    seg = torch.where(ok & (seg < u_cap), seg, u_cap).long()
    ub = torch.full((hkv, n_tiles, u_cap + 1), -1, dtype=torch.int32, device=dev)
    ub.scatter_(-1, seg, torch.where(ok, blk, -1))
    ubits = torch.zeros((hkv, n_tiles, u_cap + 1), dtype=torch.int64, device=dev)
    bit = torch.where(first_key, torch.ones_like(tid) << tid, 0)
    ubits.scatter_add_(-1, seg, bit)
    cnt = first_blk.sum(-1).clamp_(max=u_cap).to(torch.int32)
    return ub, ubits, cnt


def _key_block_table(cu_k, block_size: int, total_k: int, batch: int):
    """Global key blocks (sequence by sequence): first global block of each sequence, an upper bound
    ``ngb`` on their number, and per global block its sequence and block index in it."""
    dev = cu_k.device
    cu_k64 = cu_k.long()
    len_k = cu_k64[1:] - cu_k64[:-1]
    nbs = (len_k + block_size - 1) // block_size
    blk_cum = torch.cumsum(nbs, 0)
    blk_off = blk_cum - nbs
    ngb = total_k // block_size + batch
    gids = torch.arange(ngb, device=dev)
    gb_seq = torch.searchsorted(blk_cum, gids, right=True)
    gb_ok = gb_seq < batch
    gb_seq_c = gb_seq.clamp(max=max(batch - 1, 0))
    gb_blk = torch.where(gb_ok, gids - blk_off[gb_seq_c], 0).to(torch.int32)
    return blk_off, ngb, gb_seq_c.to(torch.int32), gb_blk


def _chunk_table(key, ngb: int, chunk: int):
    """Per KV head, entries sorted by their global key block ``key`` (``(hkv, n)``, ``ngb`` past the last),
    cut into chunks of at most ``chunk`` entries of one block. Returns (gb, start, end) per chunk, ``gb = -1``
    past the last one (the number of chunks is bounded from the shapes alone, so no host synchronisation)."""
    hkv, n_entries = key.shape
    dev = key.device
    bounds = torch.arange(ngb + 1, device=dev, dtype=key.dtype)
    off = torch.searchsorted(key, bounds[None, :].expand(hkv, -1).contiguous())  # (hkv, ngb+1)
    count = off[:, 1:] - off[:, :-1]
    nch = (count + chunk - 1) // chunk
    cumch = torch.cumsum(nch, -1)
    nch_max = (n_entries + chunk - 1) // chunk + ngb
    cid = torch.arange(nch_max, device=dev)
    cgb = torch.searchsorted(cumch, cid[None, :].expand(hkv, -1).contiguous(), right=True)
    cvalid = cgb < ngb
    cgb_c = cgb.clamp(max=ngb - 1)
    first = torch.gather(cumch - nch, 1, cgb_c)
    bstart = torch.gather(off[:, :-1], 1, cgb_c)
    bend = torch.gather(off[:, 1:], 1, cgb_c)
    cstart = bstart + (cid[None, :] - first) * chunk
    cend = torch.minimum(cstart + chunk, bend)
    ch_gb = torch.where(cvalid, cgb_c, -1).to(torch.int32)
    ch_start = torch.where(cvalid, cstart, 0).to(torch.int32)
    ch_end = torch.where(cvalid, cend, 0).to(torch.int32)
    return ch_gb, ch_start, ch_end


def _token_index(block_indices, cu_q, cu_k, block_size: int, total_k: int, batch: int, chunk: int):
    """Per KV head, the (token, selected block) pairs sorted by global key block, tokens ascending
    within a block (a stable sort of the token-major selection), cut into chunks of at most `chunk`
    tokens of one block; blocks a token cannot see (causality) or -1 entries are dropped. Returns
    chunk table (gb, start, end), the tokens (global query rows), block table."""
    hkv, total_q, budget = block_indices.shape
    dev = block_indices.device
    blk_off, ngb, gb_seq, gb_blk = _key_block_table(cu_k, block_size, total_k, batch)
    cu_q64, cu_k64 = cu_q.long(), cu_k.long()
    tok = torch.arange(total_q, device=dev)
    tseq = torch.searchsorted(cu_q64[1:], tok, right=True).clamp(max=max(batch - 1, 0))
    pos = tok - cu_q64[1:][tseq] + (cu_k64[1:] - cu_k64[:-1])[tseq]
    # (hkv, total_q, budget) temporaries stay int32 where the sizes allow (they are the index's memory peak)
    kdt = torch.int32 if ngb < 2 ** 31 - 1 else torch.int64
    b = block_indices.to(kdt)
    valid = (b >= 0) & (b <= torch.div(pos, block_size, rounding_mode="floor").to(kdt)[None, :, None])
    key = torch.where(valid, blk_off[tseq].to(kdt)[None, :, None] + b, ngb).view(hkv, -1)
    key, order = torch.sort(key, dim=-1, stable=True)
    e_tok = torch.div(order, budget, rounding_mode="floor").to(torch.int32)
    # a block listed twice in a token's row counts once, as in the forward's union: after the stable sort the
    # repeat directly follows the first entry, and becomes -1 (a row the kernel skips)
    rep = (key[:, 1:] == key[:, :-1]) & (e_tok[:, 1:] == e_tok[:, :-1])
    e_tok[:, 1:].masked_fill_(rep, -1)
    ch_gb, ch_start, ch_end = _chunk_table(key, ngb, chunk)
    return ch_gb, ch_start, ch_end, e_tok, gb_seq, gb_blk


class _Plan:
    """Everything the kernels need besides the tensors themselves."""

    def __init__(self, q, k, block_indices, block_size, cu_q, cu_k, max_seqlen_k, block_m, wgs=1):
        """``wgs`` > 1: tiles of ``wgs`` row tiles' tokens (the warp-specialised forward's programs)."""
        total_q, hq, d = q.shape
        hkv = k.shape[1]
        self.G = hq // hkv
        self.T, self.BLOCK_M = _tile_shape(self.G, block_m)
        self.wgs = wgs
        self.T *= wgs
        self.batch = cu_q.shape[0] - 1
        budget = block_indices.shape[-1]
        nb_max = max(1, cdiv(max(int(max_seqlen_k), 1), block_size))
        self.u_cap = max(1, min(self.T * budget, nb_max))
        # from the offsets alone: built once a forward (and reused by the backward) when every layer passes the
        # same offset tensors
        self.tile_seq, self.tile_q0, self.tile_nq, self.tile_pos0 = once_per_forward(
            "tile_table", (cu_q, cu_k), (self.T, total_q, self.batch),
            lambda: _tile_table(cu_q, cu_k, self.T, total_q, self.batch), device_result=True)
        self.n_tiles = self.tile_seq.shape[0]
        self.ub, self.ubits, self.cnt = _tile_unions(
            block_indices, self.tile_q0, self.tile_nq, self.tile_pos0, self.T, block_size, self.u_cap, nb_max)


def _use_tma(k, v, block_size: int, nb: int) -> bool:
    """TMA box loads from two (tokens, heads, d) tensors (K and V): Hopper or
    newer (or the interpreter), one block per step, and a layout a descriptor can describe (heads and d
    contiguous, 16-byte aligned rows)."""
    if not TMA_LOADS or TensorDescriptor is None or nb != 1 or k.shape[0] == 0:
        return False
    if not _INTERPRET and not (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    d = k.shape[-1]
    return all(x.stride(2) == 1 and x.stride(1) == d and (x.stride(0) * x.element_size()) % 16 == 0
               and x.data_ptr() % 16 == 0 for x in (k, v))


def _kv_args(k, v, block_size: int, tma: bool):
    if not tma:
        return k, v
    d = k.shape[-1]
    return tuple(TensorDescriptor(x, [x.shape[0], x.shape[1] * d], [x.stride(0), 1], [block_size, d])
                 for x in (k, v))


def _prec(dtype):
    return "ieee" if (_INTERPRET or dtype == torch.float32) else "tf32"


def _pair_default(pair):
    return PAIR_BLOCKS if pair is None else bool(pair)


# --------------------------------------------------------------------------------------------
# Forward / backward drivers
# --------------------------------------------------------------------------------------------


def _ws_tiles(q, k, block_indices, block_size: int, block_m, tma: bool) -> int:
    """Row tiles a program of the warp-specialised Hopper forward for this call, or 0 (the other kernels run): where
    ``sparse_fwd_sm90_ws_tiles`` allows it and the union kernel builds its plan. Beyond ``UNION_KERNEL_MAX``
    candidates a tile (G 4 or 8 at 96 blocks, whose tiles of three row tiles hold 48 or 24 tokens) a torch sort would
    build it, which was never timed with this kernel (it was timed at G 16: 12-token tiles, 1152 candidates)."""
    if _INTERPRET or not FWD_SM90_WS.enabled or not UNION_KERNEL:
        return 0
    T, bm = _tile_shape(q.shape[1] // k.shape[1], block_m)
    wgs = sparse_fwd_sm90_ws_tiles(q, block_size, T, bm, tma)
    return wgs if _next_pow2(max(T * wgs * block_indices.shape[-1], 16)) <= UNION_KERNEL_MAX else 0


@on_tensor_device
def _forward(q, k, v, block_indices, block_size, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, block_m=None,
             need_resid=False, pair=None):
    """-> out, lse, resid. resid (only when need_resid and q is bf16/fp16, else an empty tensor) is
    the rounding residual O_fp32 - O, kept for an exact delta in the backward."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    low = q.dtype != torch.float32
    need_resid = need_resid and low
    # The interpreter's fp32 -> bf16/fp16 store truncates: there, write fp32 and round on the host.
    out = torch.empty(q.shape, dtype=torch.float32 if _INTERPRET else q.dtype, device=q.device)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    store_resid = need_resid and not _INTERPRET
    resid = torch.empty(q.shape if store_resid else (0,), dtype=q.dtype, device=q.device)
    if total_q > 0 and cu_q.shape[0] >= 2:
        nb = 2 if _pair_default(pair) else 1
        tma = _use_tma(k, v, block_size, nb)
        # Hopper: the warp-specialised Gluon forward (tiles of several row tiles), else the Gluon forward, else (or
        # where a Gluon kernel does not build) the Triton one
        wgs = _ws_tiles(q, k, block_indices, block_size, block_m, tma)
        done = False
        if wgs:
            plan = _Plan(q, k, block_indices, block_size, cu_q, cu_k, max_seqlen_k, block_m, wgs=wgs)
            done = FWD_SM90_WS(sparse_fwd_sm90_ws, q, k, v, out, resid, lse, plan, cu_k, block_size,
                               scale * _LOG2E, store_resid)
        if not done:
            plan = _Plan(q, k, block_indices, block_size, cu_q, cu_k, max_seqlen_k, block_m)
            done = (FWD_SM90.enabled and not _INTERPRET
                    and sparse_fwd_sm90_supported(q, block_size, plan.BLOCK_M, tma)
                    and FWD_SM90(sparse_fwd_sm90, q, k, v, out, resid, lse, plan, cu_k, block_size,
                                 scale * _LOG2E, store_resid))
        if not done:
            rs = (resid.stride(0), resid.stride(1)) if store_resid else (0, 0)
            _fwd_launch[(plan.n_tiles, hkv)](
                q, *_kv_args(k, v, block_size, tma), out, resid, lse,
                plan.ub, plan.ubits, plan.cnt,
                plan.tile_seq, plan.tile_q0, plan.tile_nq, plan.tile_pos0, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
                out.stride(1), rs[0], rs[1],
                lse.stride(0), plan.ub.stride(0), plan.ub.stride(1), plan.cnt.stride(0), plan.n_tiles,
                scale * _LOG2E,
                G=plan.G, T=plan.T, BLOCK_M=plan.BLOCK_M, BLOCK_N=block_size, D=d, NB=nb,
                UPCAST=_INTERPRET, PREC=_prec(q.dtype), STORE_RESID=store_resid, TMA=tma,
                ROW_MASK=ROW_MASK and nb == 1, **_LAUNCH_KW,
            )
    elif store_resid:
        resid.zero_()
    if _INTERPRET:
        out_lp = out.to(q.dtype)
        if need_resid:
            resid = (out - out_lp.float()).to(q.dtype)
        return out_lp, lse, resid
    return out, lse, resid


@on_tensor_device
def _backward(do, q, k, v, out, lse, block_indices, block_size, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale,
              resid=None, block_m=None, chunk=None, exact_delta=None, pair=None):
    """-> dq, dk, dv. delta = rowsum(dO * O) uses O + resid when resid is given (exact), else either a
    recomputation pass (exact_delta, default EXACT_DELTA) or the stored O as FlashAttention does."""
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    do = do.contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32 if _INTERPRET else q.dtype, device=q.device)
    if total_q == 0 or total_k == 0 or cu_q.shape[0] < 2:
        return dq.to(q.dtype), torch.zeros_like(k), torch.zeros_like(v)
    plan = _Plan(q, k, block_indices, block_size, cu_q, cu_k, max_seqlen_k, block_m)
    delta = torch.empty_like(lse)
    has_resid = resid is not None and resid.numel() == out.numel() and out.dtype != torch.float32
    if exact_delta is None:
        exact_delta = EXACT_DELTA and out.dtype != torch.float32
    exact_delta = bool(exact_delta) and not has_resid
    r = resid if has_resid else out
    pair = _pair_default(pair)
    tma = _use_tma(k, v, block_size, 2 if pair else 1)
    _dq_launch[(plan.n_tiles, hkv)](
        q, *_kv_args(k, v, block_size, tma), out, r, do, lse, delta, dq,
        plan.ub, plan.ubits, plan.cnt,
        plan.tile_seq, plan.tile_q0, plan.tile_nq, plan.tile_pos0, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        r.stride(0), r.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        lse.stride(0), plan.ub.stride(0), plan.ub.stride(1), plan.cnt.stride(0), plan.n_tiles,
        scale, scale * _LOG2E,
        G=plan.G, T=plan.T, BLOCK_M=plan.BLOCK_M, BLOCK_N=block_size, D=d, NB=2 if pair else 1,
        UPCAST=_INTERPRET, PREC=_prec(q.dtype), HAS_RESID=has_resid, EXACT_DELTA=exact_delta, TMA=tma,
        ROW_MASK=ROW_MASK and not pair, **_LAUNCH_KW,
    )
    if chunk is None:
        chunk = 8 if _INTERPRET else 256
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    ch_gb, ch_start, ch_end, e_tok, gb_seq, gb_blk = _token_index(
        block_indices, cu_q, cu_k, block_size, total_k, plan.batch, chunk * plan.T)
    _dkdv_launch[(ch_gb.shape[1], hkv)](
        q, k, v, do, lse, delta, dk32, dv32,
        ch_gb, ch_start, ch_end, e_tok, gb_seq, gb_blk, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk32.stride(0), dk32.stride(1), dv32.stride(0), dv32.stride(1),
        lse.stride(0), ch_gb.stride(0), e_tok.stride(0),
        scale, scale * _LOG2E,
        G=plan.G, T=plan.T, BLOCK_M=plan.BLOCK_M, BLOCK_N=block_size, D=d,
        UPCAST=_INTERPRET, PREC=_prec(q.dtype), **_LAUNCH_KW,
    )
    return dq.to(q.dtype), dk32.to(k.dtype), dv32.to(v.dtype)


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile-traceable) + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("infllmv2::sparse_attention_fwd", mutates_args=())
def _sparse_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int,
                             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, need_resid: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, block_indices, block_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, need_resid=need_resid)


@_sparse_attention_fwd_op.register_fake
def _(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, block_size, max_seqlen_q, max_seqlen_k, softmax_scale,
      need_resid):
    resid_shape = q.shape if (need_resid and q.dtype != torch.float32) else (0,)
    return (torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            q.new_empty(resid_shape))


@torch.library.custom_op("infllmv2::sparse_attention_bwd", mutates_args=())
def _sparse_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, resid: torch.Tensor, block_indices: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int,
                             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, block_indices, block_size, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, softmax_scale, resid=resid)


@_sparse_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, resid, block_indices, cu_seqlens_q, cu_seqlens_k, block_size, max_seqlen_q,
      max_seqlen_k, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_indices, cu_q, cu_k, block_size, max_seqlen_q, max_seqlen_k, softmax_scale, _ = inputs
    out, lse, resid = output
    ctx.save_for_backward(q, k, v, out, lse, resid, block_indices, cu_q, cu_k)
    ctx.meta = (block_size, max_seqlen_q, max_seqlen_k, softmax_scale)


def _backward_fn(ctx, dout, dlse, dresid):
    # The lse output is not differentiable (dlse is ignored), as in FlashAttention.
    q, k, v, out, lse, resid, block_indices, cu_q, cu_k = ctx.saved_tensors
    block_size, max_seqlen_q, max_seqlen_k, softmax_scale = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.infllmv2.sparse_attention_bwd(
        dout, q, k, v, out, lse, resid, block_indices, cu_q, cu_k, block_size, max_seqlen_q, max_seqlen_k,
        softmax_scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_sparse_attention_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check(q, k, v, block_indices, block_size, cu_q, cu_k):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be 3-D (tokens, heads, head_dim); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    total_q, hq, d = q.shape
    total_k, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"q head_dim {d} != k head_dim {dk}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    if d not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} not supported by the Triton sparse attention (supported: "
                         f"{_SUPPORTED_HEAD_DIMS})")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"q dtype must be bfloat16, float16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (isinstance(block_size, int) and 16 <= block_size <= 256 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    if block_indices.dim() != 3 or block_indices.shape[0] != hkv or block_indices.shape[1] != total_q:
        raise ValueError(f"block_indices must have shape (Hkv={hkv}, total_q={total_q}, budget); "
                         f"got {tuple(block_indices.shape)}")
    if block_indices.dtype != torch.int32:
        raise TypeError(f"block_indices must be int32, got {block_indices.dtype}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of length batch + 1; got "
                             f"{cu.dtype} {tuple(cu.shape)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} differ in length")
    devs = {t.device for t in (q, k, v, block_indices, cu_q, cu_k)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(x) for x in devs)}")


def sparse_attention_triton(q, k, v, block_indices, block_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, softmax_scale=None):
    """Per-token block-sparse causal attention (InfLLM-V2 stage 2), packed varlen layout.

    q: (total_q, Hq, d); k, v: (total_k, Hkv, d), bf16/fp16/fp32; block_indices: (Hkv, total_q, budget)
    int32 (block ids relative to each sequence's key start, -1 padded; entries in the future or
    beyond the sequence are ignored); cu_seqlens_q/k: (batch+1,) int32 on the device;
    max_seqlen_k must bound every sequence's key length (sizes the union buffers).
    Returns out (total_q, Hq, d) in q's dtype and lse (Hq, total_q) float32 (natural log; -inf and a
    zero output for a token that sees no key). Differentiable in q, k, v.
    """
    _check(q, k, v, block_indices, block_size, cu_seqlens_q, cu_seqlens_k)
    # (the forward takes each row's max over the unscaled scores, which only a positive scale allows)
    softmax_scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    q, k, v, block_indices = q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous()
    need_resid = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, lse, _ = torch.ops.infllmv2.sparse_attention_fwd(
        q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, int(block_size), int(max_seqlen_q), int(max_seqlen_k),
        float(softmax_scale), bool(need_resid))
    return out, lse
