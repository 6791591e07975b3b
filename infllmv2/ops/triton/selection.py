"""Stage 1 of InfLLM-V2 (block selection) in Triton, for packed varlen batches.

Pipeline (SPEC "Stage 1"), no gradients:

1. ``compress_keys_varlen``: one Triton kernel mean-pools every full window of every sequence
   (fine keys ``lc / sc``, and the coarse keys ``4 lc / 4 sc`` when ``lse_approx``).
2. ``_lse_kernel``: one program per (query tile, KV head[, key split]); its rows are the G query
   heads of the tile's tokens. Online log-sum-exp (base 2) of ``scale * q . K`` over the visible
   coarse keys (``lse_approx``) or fine keys (exact); a row that sees fine keys but no coarse key
   is normalised exactly over its fine keys (SPEC fallback). Partial results per key split are
   combined by the next kernel (decoding splits the keys; prefill uses one split). On Hopper GPUs the
   prefill LSE runs as ``lse_sm90.py``'s Gluon kernel instead: the same values, laid out by hand.
3. ``_score_kernel``: same tiling; probabilities over the fine keys (tensor-core ``tl.dot``),
   summed over the G heads of each token on chip and max-pooled onto key blocks on chip
   (window j overlaps block b iff ``j*sc < (b+1)*B`` and ``j*sc + lc > b*B``). Only the pooled
   (token, block) scores of one chunk of query tiles are written, to a fixed-size fp32 workspace
   (at most ``_WORKSPACE_BYTES``): nothing of size n x n1 is ever stored. On Hopper GPUs the prefill
   scoring runs as ``score_sm90.py``'s Gluon kernel instead: the same work and results, laid out by hand,
   on a side stream with two workspaces, so each chunk's top-k runs beside the next chunk's scoring
   (``TOPK_OVERLAP``).
4. ``_select_kernel``: one program per (token, KV head): forced blocks + exact top-k of the
   candidate blocks by a threshold search on the fp32 bit patterns (scores are >= 0, so the bits
   order like the values; interpolation steps alternate with halving steps); ties prefer the lower
   block index; the output row is written sorted ascending and padded with -1.

Block scores at the same value are tied exactly as in the reference (lower index first); with
bf16 inputs the scores themselves differ from the fp32 reference at bf16 resolution, so tests
compare selections by score.

Kernel arguments that change with a batch's lengths (counts, tile offsets, strides of per-head buffers) are marked
``do_not_specialize`` here and in the other kernel files: Triton otherwise compiles a kernel again whenever such an
integer equals 1 or turns divisible by 16, which in training on packed rows of varying documents cost 18
compilations (0.5-1 s each) in the first 12 steps at 32K (benchmarks/README.md, "Thirty-third session").
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import SparseConfig
from ..reuse import once_per_forward
from .gluon_support import GluonKernel
from .lse_sm90 import lse_sm90, lse_sm90_supported
from .score_sm90 import score_blocks_sm90, score_sm90_supported

__all__ = ["compress_keys_varlen", "select_blocks_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:  # grid dependency control (programmatic dependent launch, Hopper+; Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None
_LOG2E = 1.4426950408889634
_WORKSPACE_BYTES = 256 << 20  # fp32 block-score workspace of one chunk of query tiles
_MAX_BLOCKS_PER_ROW = 1 << 14  # select kernel keeps one row of block scores in registers
# decoding: programs per (sequence, KV head) over the compressed keys, enough for about _DECODE_PROGRAMS programs in
# all, from 16 to 64 (H200, 128K cache, CUDA graph, interleaved, eleventh session: batch 8 with 16 / 32 / 64 splits
# 50.9 / 52.2 / 53.2 us a step, batch 1 34.6 / 33.1 / 31.0 us; NOTES_selection.md)
_DECODE_PROGRAMS = 256
# prefill scoring on Hopper by the Gluon kernel of score_sm90.py (``SCORE_SM90.enabled = False``: the Triton kernel;
# gluon_support.GluonKernel: INFLLMV2_GLUON, the Triton releases it was checked on, the fallback on a failed build)
SCORE_SM90 = GluonKernel("scoring")
# prefill log-sum-exp on Hopper by the Gluon kernel of lse_sm90.py (the same switch rules)
LSE_SM90 = GluonKernel("log-sum-exp")
_DECODE_SPLITS = None  # tuning knob: a fixed number of splits for the scoring (and the LSE) instead
_DECODE_LSE_SPLITS = None  # tuning knob: the LSE kernel's own number of splits (None: the scoring's)
# compressed keys (windows) a compression program writes, per KV head: more programs, more loads in flight (H200,
# interleaved, identical outputs, `dev_selection.py --flag-ab _COMPRESS_BLOCK_C=32,16,8,4`: 32 -> 8 took the two
# compression kernels 0.29 -> 0.10 ms at 128K, 0.18 -> 0.05 ms at 64K, 0.21 -> 0.12 ms at Hkv 8 / d 64)
_COMPRESS_BLOCK_C = 8
_SELECT_WARPS = None  # tuning knob: warps of the top-k kernel (None: _select_warps)
# Hopper prefill with at least _OVERLAP_MIN_CHUNKS workspace chunks: each chunk's top-k runs on the caller's stream
# beside the next chunk's scoring, which runs on a high-priority side stream (two workspaces: 256 MiB more). The
# scoring's four programs an SM fill the registers, so the top-k mostly fills the tails the scoring leaves. H200,
# interleaved, identical selections (`dev_selection.py --flag-ab TOPK_OVERLAP=False,True --reps 5`): selection at 128K
# 12.08 -> 11.84 ms `local`, 12.50 -> 12.19 `random`, 18.59 -> 17.70 at Hkv 8 / d 64; 96K 7.09 -> 6.97. At 64K (two
# chunks) it lost 0.1 ms, hence _OVERLAP_MIN_CHUNKS. Lost: the side stream at the caller's priority (11.98 against
# 11.88 ms), a third workspace (no gain), and room made for top-k programs beside the scoring (three scoring programs
# an SM: 12.6 against 12.2 ms without overlap; register caps of 112 / 64 that fit one top-k program beside four: 12.04
# against 11.85) (benchmarks/README.md, "Twenty-first session").
TOPK_OVERLAP = True
_OVERLAP_MIN_CHUNKS = 3
_SCORE_STREAM_PRIORITY = -1  # the side stream's (CUDA: lower is higher; the caller's stream is usually 0)
# block scores (rows x blocks) a top-k program holds: fewer registers, more programs per SM to hide the search's
# reduction latency (H200, interleaved, identical outputs: 4096 -> 1024 took the top-k 4.87 -> 3.13 ms at 128K and
# 0.70 -> 0.33 ms at 32K; Nsight Compute had read 215 registers and 2 programs per SM at 4096)
_SELECT_TILE = 1024
# top-k output positions: a scan within runs of this many blocks, then over the runs' totals (1: one scan over the row;
# H200, identical outputs: 16 took the top-k 2.45 -> 2.22 ms at 128K, `dev_selection.py --flag-ab _TOPK_SCAN_RUN=16,1`)
_TOPK_SCAN_RUN = 16
# The top-k's threshold search (_select_kernel): a halving step every SEARCH_BISECT steps, interpolation kept within
# [SEARCH_CLAMP, 1 - SEARCH_CLAMP] of the bracket, brackets snapped to keys from step SEARCH_TIGHT on. (2, 0.0, 1 << 30)
# is the search of the seventeenth session (alternating steps, no clamp, no snapping).
_TOPK_SEARCH = (4, 0.2, 6)
# query rows one warpgroup's scoring MMA holds as columns: rows are grouped head-major in runs of this many
# (tokens x heads), so the group sum never crosses warpgroups (tests shrink it to exercise several groups)
_GROUP_COLUMNS = 128


def _decode_splits(batch: int, hkv: int) -> tuple:
    """(LSE splits, scoring splits) of one decode step's compressed keys per (sequence, KV head)."""
    n = _DECODE_SPLITS or min(64, max(16, _next_pow2(cdiv(_DECODE_PROGRAMS, max(1, batch * hkv)))))
    return _DECODE_LSE_SPLITS or n, n


def _select_warps(nb_c: int, decode: bool) -> int:
    """Warps of a top-k program over rows of ``nb_c`` blocks. Two for prefill rows of at most 1024 blocks (H200,
    interleaved, identical outputs, `dev_selection.py --flag-ab _SELECT_WARPS=None,1,2`: the top-k kernel 0.69 ->
    0.55 ms at 64K and 0.26 -> 0.19 ms at 32K, whose rows are that narrow; at 2048 blocks two or one warp lost, 2.14 ->
    2.44 / 3.10 ms at 128K, and so did a decode step at a 128K cache)."""
    return 2 if nb_c <= 1024 and not decode else 4 if nb_c <= 4096 else 8


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host: ``triton.cdiv`` is a constexpr function whose call costs microseconds, which a
    decode step's launches pay a dozen times a layer."""
    return -(-a // b)


def softmax_scale_or_default(softmax_scale, d: int) -> float:
    """The scale of q . k, 1 / sqrt(d) by default. The kernels take each row's max over the unscaled scores and
    scale it afterwards, which only a positive scale allows."""
    if softmax_scale is None:
        return d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def on_tensor_device(fn):
    """Run a launcher with its first tensor argument's GPU as the current device. Triton launches on the current
    device and stream: a layer on cuda:1 (a model split over GPUs with ``device_map``, or moved to cuda:1 without
    ``torch.cuda.set_device``) would otherwise run on cuda:0 against memory of cuda:1."""
    @functools.wraps(fn)
    def launch_on_device(*args, **kwargs):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        if dev.type != "cuda" or dev.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)
    return launch_on_device


# Decoding launches several small kernels back to back; with programmatic dependent launch each one is set
# up while its predecessor runs and waits on the GPU (``_pdl_start``) for the predecessor's results.
DECODE_PDL = os.environ.get("INFLLMV2_DECODE_PDL", "1") == "1"


def _pdl_launch_args(device: torch.device) -> dict:
    """Launch arguments of a kernel in the decode chain: PDL on Hopper or newer (not in the interpreter)."""
    if DECODE_PDL and not _INTERPRET and gdc_wait is not None and device.type == "cuda" and _pdl_device(device.index):
        return dict(PDL=True, launch_pdl=True)
    return {}


@functools.lru_cache(maxsize=None)
def _pdl_device(index) -> bool:  # cached: asked at every launch of a decode step
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel in the stream has finished (its writes visible), then let
    the next one launch. Every kernel of a PDL chain calls this before touching memory."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


# ------------------------------------------------------------------------------------------------
# Compression
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["total_c"])
def _compress_kernel(k_ptr, out_ptr, row_seq_ptr, k_start_ptr, c_start_ptr, c_len_ptr,
                     stride_kt, stride_kh, stride_ot, stride_oh, total_c, D,
                     KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < total_c
    seq = tl.load(row_seq_ptr + rows, mask=rmask, other=0)
    j = rows - tl.load(c_start_ptr + seq, mask=rmask, other=0)
    rmask &= j < tl.load(c_len_ptr + seq, mask=rmask, other=0)  # padded layouts hold rows past a sequence's end
    start = (tl.load(k_start_ptr + seq, mask=rmask, other=0) + j * STRIDE).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m2 = rmask[:, None] & (offs_d < D)[None, :]
    ptrs = k_ptr + start[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for i in range(KERNEL):
        acc += tl.load(ptrs + i * stride_kt, mask=m2, other=0.0).to(tl.float32)
    acc = acc / KERNEL
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m2)


def _compressed_count(k_len, kernel: int, stride: int):
    """Windows wholly inside each sequence's keys (an int tensor or a Python int)."""
    if isinstance(k_len, int):
        return (k_len - kernel) // stride + 1 if k_len >= kernel else 0
    return torch.where(k_len >= kernel, torch.div(k_len - kernel, stride, rounding_mode="floor") + 1,
                       torch.zeros_like(k_len)).to(torch.int32)


def _compress_layout(k_start: torch.Tensor, k_len: torch.Tensor, kernel: int, stride: int,
                     rows_per_seq: int | None = None, host_k_len: list | None = None) -> tuple:
    """Where ``_compress_core`` writes each sequence's windows: (c_len, cu, c_start, row_seq, total_c), from the
    sequences' layout alone (so the same for every layer of a forward)."""
    nseq = k_start.shape[0]
    dev = k_start.device
    c_len = _compressed_count(k_len, kernel, stride)
    if rows_per_seq is None:
        cu = torch.zeros(nseq + 1, dtype=torch.int32, device=dev)
        cu[1:] = torch.cumsum(c_len, 0)
        if host_k_len is not None:
            total_c = sum(_compressed_count(int(x), kernel, stride) for x in host_k_len)
        else:
            total_c = int(cu[-1].item()) if nseq else 0
        c_start = cu[:-1].clone()
    else:
        c_len = torch.clamp(c_len, max=rows_per_seq)
        cu, total_c = None, nseq * rows_per_seq
        c_start = torch.arange(nseq, dtype=torch.int32, device=dev) * rows_per_seq
    if not total_c:
        row_seq = None
    elif rows_per_seq is None:
        row_seq = torch.repeat_interleave(torch.arange(nseq, device=dev, dtype=torch.int32), c_len, output_size=total_c)
    else:
        row_seq = torch.arange(total_c, device=dev, dtype=torch.int32) // rows_per_seq
    return c_len, cu, c_start, row_seq, total_c


@on_tensor_device
def _compress_core(k_flat: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor, kernel: int, stride: int,
                   rows_per_seq: int | None = None, host_k_len: list | None = None, layout: tuple | None = None):
    """k_flat (rows, H, d); sequence i is rows [k_start[i], k_start[i] + k_len[i]).

    Returns (out (total_c, H, d), c_start (nseq,) int32, c_len (nseq,) int32, cu (nseq + 1,) int32): packed,
    or with ``rows_per_seq`` padded (sequence i's keys at rows i * rows_per_seq + j; cu None). The packed
    layout's size needs one host synchronisation unless ``host_k_len`` (k_len on the host) gives it. ``layout``:
    ``_compress_layout``'s result for these arguments, when the caller has it already.
    """
    c_len, cu, c_start, row_seq, total_c = layout or _compress_layout(k_start, k_len, kernel, stride, rows_per_seq,
                                                                      host_k_len)
    dev = k_flat.device
    H, d = k_flat.shape[1], k_flat.shape[2]
    out = torch.empty((total_c, H, d), dtype=k_flat.dtype, device=dev)
    if total_c:
        if k_flat.stride(-1) != 1:
            k_flat = k_flat.contiguous()
        BLOCK_C = 16 if _INTERPRET else _COMPRESS_BLOCK_C
        grid = (cdiv(total_c, BLOCK_C), H)
        _compress_kernel[grid](k_flat, out, row_seq, k_start.to(torch.int32).contiguous(), c_start, c_len,
                               k_flat.stride(0), k_flat.stride(1), out.stride(0), out.stride(1), total_c, d,
                               KERNEL=kernel, STRIDE=stride, BLOCK_C=BLOCK_C, BLOCK_D=max(16, _next_pow2(d)),
                               num_warps=4)
    return out, c_start, c_len, cu


def _check_cu(cu: torch.Tensor, name: str, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor with at least one entry")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")


def compress_keys_varlen(k: torch.Tensor, cu_seqlens_k: torch.Tensor, kernel_size: int, kernel_stride: int):
    """Mean-pool the full windows of every sequence of a packed batch.

    k: (total_k, H, d); cu_seqlens_k: (nseq + 1,) int32. Returns (k_compressed (total_c, H, d) in
    k's dtype, cu_seqlens_c (nseq + 1,) int32) with sequence i's
    ``K[j] = mean(k_i[j*stride : j*stride + kernel])``, ``j < (len_i - kernel) // stride + 1``.
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"k must be a (total_k, H, d) tensor, got {getattr(k, 'shape', type(k))}")
    _check_cu(cu_seqlens_k, "cu_seqlens_k", k.device)
    if kernel_size <= 0 or kernel_stride <= 0:
        raise ValueError(f"kernel_size and kernel_stride must be positive, got {kernel_size}, {kernel_stride}")
    cu = cu_seqlens_k
    out, _, _, cu_c = _compress_core(k, cu[:-1], cu[1:] - cu[:-1], kernel_size, kernel_stride)
    return out, cu_c


# ------------------------------------------------------------------------------------------------
# Stage 1 kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile_rows(q_ptr, tile, h, tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
                    stride_qt, stride_qh, D,
                    G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    TO_F32: tl.constexpr, DECODE: tl.constexpr, TG: tl.constexpr):
    if DECODE:  # one query per sequence: tile i is row i of q, the newest token of sequence i
        seq = tile
        off = 0
        qs = tile
        ql = 1
    else:
        seq = tl.load(tile_seq_ptr + tile)
        off = tl.load(tile_off_ptr + tile)
        qs = tl.load(q_start_ptr + seq)
        ql = tl.load(q_len_ptr + seq)
    kl = tl.load(k_len_ptr + seq)
    # rows are head-major within groups of TG tokens (row = (token // TG, g, token % TG)): the scoring
    # kernel's group sum over the G heads of a token then stays inside each thread of the MMA layout
    # (token-major rows cost a layout conversion: 14.2 -> 10.0 ms for the scoring kernel at 128K, H200),
    # also when a tile is wider than one warpgroup's MMA columns (TG * GP = 128)
    rows = tl.arange(0, BLOCK_T * GP)
    tok = off + (rows // (TG * GP)) * TG + rows % TG
    g = (rows // TG) % GP
    rvalid = (tok < ql) & (g < G)
    t = kl - ql + tok
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qrow = (qs + tok).to(tl.int64)
    q = tl.load(q_ptr + qrow[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=rvalid[:, None] & dmask[None, :], other=0.0)
    if TO_F32:
        q = q.to(tl.float32)
    t_min = kl - ql + off
    t_max = kl - ql + tl.minimum(off + BLOCK_T, ql) - 1
    return seq, qs, kl, tok, g, rvalid, t, q, offs_d, dmask, t_min, t_max


@triton.jit
def _key_rows(c_start_ptr, c_len_ptr, seq, kl, rows, KS: tl.constexpr, ST: tl.constexpr, DECODE: tl.constexpr):
    """First row and count of a sequence's compressed keys: from the per-sequence arrays, or (decoding) the
    padded (batch, rows) layout, sequence i at row i * rows, holding the windows wholly inside its kl keys."""
    if DECODE:
        start = seq * rows
        count = tl.minimum(tl.where(kl >= KS, (kl - KS) // ST + 1, 0), rows)
    else:
        start = tl.load(c_start_ptr + seq)
        count = tl.load(c_len_ptr + seq)
    return start, count


@triton.jit
def _online_lse(q, k_ptr, stride_kt, c_start, j_lo, j_hi, j_all, t, qk_scale, offs_d, dmask,
                KS: tl.constexpr, ST: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
                TO_F32: tl.constexpr, PREC: tl.constexpr):
    """Online (max, sum) in base 2 of qk_scale * q . K[j] over visible j in [j_lo, j_hi); keys below j_all
    are visible to every row (no mask there)."""
    m = tl.full((M,), float("-inf"), tl.float32)
    s_acc = tl.zeros((M,), tl.float32)
    j_mid = tl.minimum(tl.maximum(j_lo + (j_all - j_lo) // BLOCK_N * BLOCK_N, j_lo), j_hi)
    for j0 in range(j_lo, j_mid, BLOCK_N):
        m, s_acc = _lse_step(q, k_ptr, stride_kt, c_start, j0, j_hi, t, qk_scale, offs_d, dmask, m, s_acc,
                             KS, ST, BLOCK_N, TO_F32, PREC, False)
    for j0 in range(j_mid, j_hi, BLOCK_N):
        m, s_acc = _lse_step(q, k_ptr, stride_kt, c_start, j0, j_hi, t, qk_scale, offs_d, dmask, m, s_acc,
                             KS, ST, BLOCK_N, TO_F32, PREC, True)
    return m, s_acc


@triton.jit
def _lse_step(q, k_ptr, stride_kt, c_start, j0, j_hi, t, qk_scale, offs_d, dmask, m, s_acc,
              KS: tl.constexpr, ST: tl.constexpr, BLOCK_N: tl.constexpr, TO_F32: tl.constexpr,
              PREC: tl.constexpr, MASKED: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_N)
    jm = j < j_hi
    kt = tl.load(k_ptr + (c_start + j).to(tl.int64)[None, :] * stride_kt + offs_d[:, None],
                 mask=jm[None, :] & dmask[:, None], other=0.0)
    if TO_F32:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PREC)
    if MASKED:
        vis = (j[None, :] * ST + KS <= t[:, None] + 1) & jm[None, :]
        s = tl.where(vis, s, float("-inf"))
    # the max of the raw scores, scaled per row (qk_scale > 0): each exponent is then one FMA, s * qk_scale - m,
    # instead of a multiply and a subtraction per score
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_acc = s_acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s * qk_scale - m_safe[:, None]), 1)
    return m_new, s_acc


@triton.jit(do_not_specialize=["stride_ls", "keys_per_split", "rows1", "rows2"])
def _lse_kernel(q_ptr, k1_ptr, k2_ptr, lse_ptr,
                tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
                c1_start_ptr, c1_len_ptr, c2_start_ptr, c2_len_ptr,
                stride_qt, stride_qh, stride_k1t, stride_k1h, stride_k2t, stride_k2h,
                stride_ls, stride_lt, qk_scale, D, keys_per_split, rows1, rows2,
                G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, TG: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, KS1: tl.constexpr, ST1: tl.constexpr, KS2: tl.constexpr,
                ST2: tl.constexpr, LSE_APPROX: tl.constexpr, TO_F32: tl.constexpr, PREC: tl.constexpr,
                DECODE: tl.constexpr = False, PDL: tl.constexpr = False):
    _pdl_start(PDL)
    tile = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile (inductor) may pass Python floats as fp64
    M: tl.constexpr = BLOCK_T * GP
    seq, qs, kl, tok, g, rvalid, t, q, offs_d, dmask, t_min, t_max = _load_tile_rows(
        q_ptr, tile, h, tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
        stride_qt, stride_qh, D, G, GP, BLOCK_T, BLOCK_D, TO_F32, DECODE, TG)
    c1s, c1n = _key_rows(c1_start_ptr, c1_len_ptr, seq, kl, rows1, KS1, ST1, DECODE)
    # fine keys visible to the last token of the tile, and to all its tokens
    n1vis = tl.minimum(c1n, tl.where(t_max + 1 >= KS1, (t_max + 1 - KS1) // ST1 + 1, 0))
    n1all = tl.minimum(c1n, tl.where(t_min + 1 >= KS1, (t_min + 1 - KS1) // ST1 + 1, 0))
    if LSE_APPROX:
        c2s, c2n = _key_rows(c2_start_ptr, c2_len_ptr, seq, kl, rows2, KS2, ST2, DECODE)
        n2vis = tl.minimum(c2n, tl.where(t_max + 1 >= KS2, (t_max + 1 - KS2) // ST2 + 1, 0))
        n2all = tl.minimum(c2n, tl.where(t_min + 1 >= KS2, (t_min + 1 - KS2) // ST2 + 1, 0))
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, n2vis)
        m, s = _online_lse(q, k2_ptr + h * stride_k2h, stride_k2t, c2s, lo, hi, n2all, t, qk_scale, offs_d,
                           dmask, KS2, ST2, M, BLOCK_N, TO_F32, PREC)
        part = tl.where(s > 0, m + tl.log2(tl.where(s > 0, s, 1.0)), float("-inf"))
        if (t_min + 1 < KS2) & (split == 0):
            # rows that see no coarse key yet: exact over their fine keys
            m1, s1 = _online_lse(q, k1_ptr + h * stride_k1h, stride_k1t, c1s, 0, n1vis, n1all, t, qk_scale,
                                 offs_d, dmask, KS1, ST1, M, BLOCK_N, TO_F32, PREC)
            part1 = tl.where(s1 > 0, m1 + tl.log2(tl.where(s1 > 0, s1, 1.0)), float("-inf"))
            part = tl.where(t + 1 < KS2, part1, part)
        else:
            part = tl.where(t + 1 < KS2, float("-inf"), part)
    else:
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, n1vis)
        m, s = _online_lse(q, k1_ptr + h * stride_k1h, stride_k1t, c1s, lo, hi, n1all, t, qk_scale, offs_d,
                           dmask, KS1, ST1, M, BLOCK_N, TO_F32, PREC)
        part = tl.where(s > 0, m + tl.log2(tl.where(s > 0, s, 1.0)), float("-inf"))
    tl.store(lse_ptr + split * stride_ls + (qs + tok).to(tl.int64) * stride_lt + h * G + g, part, mask=rvalid)


@triton.jit(do_not_specialize=["stride_ls", "tile_base", "n_tiles", "n_lse_splits", "windows_per_split", "nb_ws",
                              "rows1"])
def _score_kernel(q_ptr, k1_ptr, lse_ptr, ws_ptr,
                  tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr, c1_start_ptr, c1_len_ptr,
                  stride_qt, stride_qh, stride_k1t, stride_k1h, stride_ls, stride_lt,
                  stride_wh, stride_wr, tile_base, n_tiles, n_lse_splits, windows_per_split, nb_ws,
                  qk_scale, D, rows1,
                  G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, TG: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KS1: tl.constexpr, ST1: tl.constexpr, R: tl.constexpr,
                  L: tl.constexpr,
                  BS: tl.constexpr, LOCAL: tl.constexpr, INIT: tl.constexpr,
                  TO_F32: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr, NSP: tl.constexpr,
                  DECODE: tl.constexpr = False, PDL: tl.constexpr = False):
    _pdl_start(PDL)
    lt = n_tiles - 1 - tl.program_id(0)  # heaviest (latest) tiles first
    tile = tile_base + lt
    h = tl.program_id(1)
    split = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile (inductor) may pass Python floats as fp64
    M: tl.constexpr = BLOCK_T * GP
    seq, qs, kl, tok, g, rvalid, t, q, offs_d, dmask, t_min, t_max = _load_tile_rows(
        q_ptr, tile, h, tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
        stride_qt, stride_qh, D, G, GP, BLOCK_T, BLOCK_D, TO_F32, DECODE, TG)
    c1s, c1n = _key_rows(c1_start_ptr, c1_len_ptr, seq, kl, rows1, KS1, ST1, DECODE)
    # candidate blocks of the tile: [INIT, nbc) with nbc = bq_max - LOCAL; windows j < nbc * R
    nbc = t_max // BS - LOCAL
    j_end = tl.minimum(nbc * R, (split + 1) * windows_per_split)
    j_start = split * windows_per_split
    if (nbc > INIT) & (j_start < j_end):
        # per-row log-sum-exp (base 2) from the key-split partials, loaded as one (splits, rows) tile: a loop
        # over the splits waits on one load round trip per split (decoding has 32)
        row_l = (qs + tok).to(tl.int64) * stride_lt + h * G + g
        sp = tl.arange(0, NSP)
        parts = tl.load(lse_ptr + sp[:, None] * stride_ls + row_l[None, :],
                        mask=(sp[:, None] < n_lse_splits) & rvalid[None, :], other=float("-inf"))
        lm = tl.max(parts, 0)
        m_safe = tl.where(lm == float("-inf"), 0.0, lm)
        la = tl.sum(tl.exp2(parts - m_safe[None, :]), 0)
        lse = tl.where(la > 0, lm + tl.log2(tl.where(la > 0, la, 1.0)), 0.0)

        tok_t = tl.arange(0, BLOCK_T)
        if DECODE:
            tvalid = tok_t < 1
        else:
            tvalid = (tl.load(tile_off_ptr + tile) + tok_t) < tl.load(q_len_ptr + seq)
        slot = lt * BLOCK_T + tok_t
        carry = tl.zeros((BLOCK_T,), tl.float32)
        kbase = k1_ptr + h * stride_k1h
        wsbase = ws_ptr + h * stride_wh
        j_first = tl.maximum(j_start - BLOCK_N, 0)  # one tile of overlap gives the pooling carry
        if TRANS:
            q_op = tl.trans(q)  # (D, M): the dot's right operand
        else:
            q_op = q
        # (a mask-free loop over the key tiles every row sees, as the LSE kernel has, was slower here in
        # two sessions: 14.1 -> 15.4 ms, then 10.0 -> 11.8 ms with head-major rows)
        for j0 in range(j_first, j_end, BLOCK_N):
            carry = _score_window_tile(q_op, kbase, stride_k1t, c1s, c1n, j0, j_start, nb_ws, t, rvalid, lse,
                                       qk_scale, offs_d, dmask, carry, wsbase, stride_wr, slot, tvalid,
                                       GP, BLOCK_T, TG, BLOCK_N, KS1, ST1, R, L, TO_F32, PREC, TRANS)


@triton.jit
def _score_window_tile(q, kbase, stride_k1t, c1s, c1n, j0, j_start, nb_ws, t, rvalid, lse, qk_scale,
                       offs_d, dmask, carry, wsbase, stride_wr, slot, tvalid,
                       GP: tl.constexpr, BLOCK_T: tl.constexpr, TG: tl.constexpr, BLOCK_N: tl.constexpr,
                       KS1: tl.constexpr,
                       ST1: tl.constexpr, R: tl.constexpr, L: tl.constexpr, TO_F32: tl.constexpr,
                       PREC: tl.constexpr, TRANS: tl.constexpr):
    """Windows [j0, j0 + BLOCK_N) of one tile (q is (D, M) when TRANS, else (M, D)): probabilities, group
    sum, max pooling onto blocks (with the previous tile's tail in ``carry``), stored to the workspace;
    returns the new carry."""
    NBT: tl.constexpr = BLOCK_N // R
    col = tl.arange(0, NBT)
    pos_r = tl.arange(0, R)
    tail_sel = pos_r >= R - (L - 1)
    j = j0 + tl.arange(0, BLOCK_N)
    jm = j < c1n
    b = j0 // R + col
    bmask = (b < nb_ws) & (b * R >= j_start)
    if TRANS:
        # windows on the rows: logits^T = K (N, D) @ q^T (D, M); the group sum is along columns
        kn = tl.load(kbase + (c1s + j).to(tl.int64)[:, None] * stride_k1t + offs_d[None, :],
                     mask=jm[:, None] & dmask[None, :], other=0.0)
        if TO_F32:
            kn = kn.to(tl.float32)
        st = tl.dot(kn, q, input_precision=PREC) * qk_scale
        vis = (j[:, None] * ST1 + KS1 <= t[None, :] + 1) & jm[:, None] & rvalid[None, :]
        p = tl.where(vis, tl.exp2(st - lse[None, :]), 0.0)
        # group sum over the heads (rows (token // TG, g, token % TG)): (BLOCK_N, BLOCK_T)
        sg = tl.reshape(tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_T // TG, GP, TG)), 2), (BLOCK_N, BLOCK_T))
        s3 = tl.reshape(sg, (NBT, R, BLOCK_T))
        pooled = tl.max(s3, 1)  # (NBT, BLOCK_T)
        if L > 1:
            tail = tl.max(tl.where(tail_sel[None, :, None], s3, 0.0), 1)
            shift_idx_t = tl.maximum(col - 1, 0)[:, None] + tl.zeros((NBT, BLOCK_T), tl.int32)
            prev = tl.gather(tail, shift_idx_t, 0)
            prev = tl.where(col[:, None] == 0, carry[None, :], prev)
            pooled = tl.maximum(pooled, prev)
            carry = tl.max(tl.where(col[:, None] == NBT - 1, tail, 0.0), 0)
        tl.store(wsbase + slot.to(tl.int64)[None, :] * stride_wr + b[:, None], pooled,
                 mask=tvalid[None, :] & bmask[:, None])
    else:
        kt = tl.load(kbase + (c1s + j).to(tl.int64)[None, :] * stride_k1t + offs_d[:, None],
                     mask=jm[None, :] & dmask[:, None], other=0.0)
        if TO_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        vis = (j[None, :] * ST1 + KS1 <= t[:, None] + 1) & jm[None, :] & rvalid[:, None]
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        # group sum over the heads: (BLOCK_T, BLOCK_N)
        sg = tl.reshape(tl.sum(tl.reshape(p, (BLOCK_T // TG, GP, TG, BLOCK_N)), 1), (BLOCK_T, BLOCK_N))
        s3 = tl.reshape(sg, (BLOCK_T, NBT, R))
        pooled = tl.max(s3, 2)  # windows [bR, bR + R) of block b
        if L > 1:
            # windows [bR - L + 1, bR) = the tail of the previous block's R windows
            tail = tl.max(tl.where(tail_sel[None, None, :], s3, 0.0), 2)
            shift_idx = tl.maximum(col - 1, 0)[None, :] + tl.zeros((BLOCK_T, NBT), tl.int32)
            prev = tl.gather(tail, shift_idx, 1)
            prev = tl.where(col[None, :] == 0, carry[:, None], prev)
            pooled = tl.maximum(pooled, prev)
            carry = tl.max(tl.where(col[None, :] == NBT - 1, tail, 0.0), 1)
        tl.store(wsbase + slot.to(tl.int64)[:, None] * stride_wr + b[None, :], pooled,
                 mask=tvalid[:, None] & bmask[None, :])
    return carry


@triton.jit
def _forced_blocks(bq, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """The forced blocks of a token in block ``bq``: blocks [0, n_init) and the local window [lo_local, bq] of
    n_local blocks (they never overlap; the candidates of the top-k lie between them)."""
    n_init = tl.minimum(INIT, bq + 1)
    lo_local = tl.maximum(INIT, bq - LOCAL)
    return n_init, lo_local, tl.maximum(bq - lo_local + 1, 0)


@triton.jit(do_not_specialize=["stride_oh", "tile_base"])
def _select_kernel(ws_ptr, out_ptr, tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
                   stride_wh, stride_wr, stride_oh, stride_ot, tile_base, budget,
                   BLOCK_T: tl.constexpr, SEL_T: tl.constexpr, BLOCK_NB: tl.constexpr, BUDGET_P: tl.constexpr,
                   BS: tl.constexpr, LOCAL: tl.constexpr, INIT: tl.constexpr, DECODE: tl.constexpr = False,
                   PDL: tl.constexpr = False, SCAN_RUN: tl.constexpr = 16, SEARCH_BISECT: tl.constexpr = 4,
                   SEARCH_CLAMP: tl.constexpr = 0.2, SEARCH_TIGHT: tl.constexpr = 6):
    """One program per (SEL_T tokens of a query tile, KV head): forced blocks + top-k."""
    _pdl_start(PDL)
    slot0 = tl.program_id(0) * SEL_T
    h = tl.program_id(1)
    tile = tile_base + slot0 // BLOCK_T
    if DECODE:  # as in _load_tile_rows: tile i is sequence i's single query, row i of q
        seq = tile
        tok = slot0 % BLOCK_T + tl.arange(0, SEL_T)
        ql = 1
        qs = tile
    else:
        seq = tl.load(tile_seq_ptr + tile)
        tok = tl.load(tile_off_ptr + tile) + slot0 % BLOCK_T + tl.arange(0, SEL_T)
        ql = tl.load(q_len_ptr + seq)
        qs = tl.load(q_start_ptr + seq)
    kl = tl.load(k_len_ptr + seq)
    tvalid = tok < ql
    qrow = (qs + tok).to(tl.int64)
    slot = (slot0 + tl.arange(0, SEL_T)).to(tl.int64)
    bq1 = (kl - ql + tok) // BS  # the block of each row's token
    bq = bq1[:, None]
    b = tl.arange(0, BLOCK_NB)[None, :]
    forced = ((b < INIT) | (b >= bq - LOCAL)) & (b <= bq) & tvalid[:, None]
    cand = (b >= INIT) & (b < bq - LOCAL) & tvalid[:, None]
    sc = tl.load(ws_ptr + h * stride_wh + slot[:, None] * stride_wr + b, mask=cand, other=0.0)
    key = tl.where(cand, sc.to(tl.int32, bitcast=True), -1)
    # the counts follow from bq, with no reduction over the row (each waits on the other warps; five fewer
    # reductions here and below: top-k 2.87 -> 2.53 ms at 128K, H200)
    n_init, _, n_local = _forced_blocks(bq1, INIT, LOCAL)
    n_forced = tl.where(tvalid, n_init + n_local, 0)
    n_cand = tl.where(tvalid, tl.maximum(bq1 - LOCAL - INIT, 0), 0)
    need = tl.minimum(budget - n_forced, n_cand)
    # per row, search the fp32 bit patterns (scores >= 0 order like their bits) of the candidates for a
    # threshold thr with count(key >= thr) == need (then the selection is {key >= thr}, whatever thr is
    # exactly), or else the need-th largest key itself (lo + 1 == hi: ties are broken below). Invariant:
    # count(key >= lo) >= need > count(key >= hi). Each step interpolates the count linearly between lo and
    # hi, kept within the bracket's middle 60% (a bare interpolation crawls on skewed rows), and every
    # SEARCH_BISECT-th step halves the bracket, so the search ends within about 2 x 31 steps on any input.
    # From step SEARCH_TIGHT on, a step also moves lo up to the smallest key >= mid and hi down to just above
    # the largest key < mid: a row whose need-th largest key ties with its neighbours (pooled windows shared
    # by adjacent blocks: a fifth of the rows) then ends as soon as its bracket holds one key value, where
    # halving the bit range took up to 31 steps. On pooled 128K rows of both input patterns the search takes
    # 7.4 steps a row instead of 12.7 (`python benchmarks/topk_search_steps.py`, CPU); H200, interleaved, identical
    # selections: the selection at 128K 12.36 -> 12.09 ms (`local`), 12.91 -> 12.37 (`random`), at Hkv 8 / d 64
    # 20.2 -> 18.5 ms (benchmarks/README.md, "Eighteenth session").
    kmax = tl.max(key, 1)
    lo = tl.where(need > 0, tl.min(tl.where(cand, key, 0x7FFFFFFF), 1), kmax + 1)
    hi = kmax + 1
    cnt_lo = tl.where(need > 0, n_cand, 0)
    cnt_hi = tl.zeros((SEL_T,), tl.int32)
    done = (cnt_lo == need) | (hi - lo <= 1)
    step = 0
    while tl.max(tl.where(done, 0, 1), 0) > 0:
        span = hi - lo
        if step % SEARCH_BISECT == SEARCH_BISECT - 1:
            off = span // 2
        else:
            frac = (cnt_lo - need).to(tl.float32) / tl.maximum(cnt_lo - cnt_hi, 1).to(tl.float32)
            frac = tl.minimum(tl.maximum(frac, SEARCH_CLAMP), 1.0 - SEARCH_CLAMP)
            off = (span.to(tl.float32) * frac).to(tl.int32)
        mid = lo + tl.minimum(tl.maximum(off, 1), span - 1)
        # key - mid is negative exactly where key < mid (keys in [-1, 2^31), mid in [0, 2^31): no overflow), so its
        # sign bit, shifted down (-1 below mid, else 0), counts the keys below mid. The kernel is bound by its ALU
        # pipe (88% in Nsight Compute), and this takes an add (on the FMA pipe) and half a shift a key where a
        # compare, a select and a predicate copy took the ALU: a plain step 122 -> 91 instructions (Triton 3.6);
        # H200, interleaved, identical selections: 128K 12.02 -> 11.74 ms (`local`), 12.38 -> 12.11 (`random`),
        # Hkv 8 / d 64 17.69 -> 16.46 (benchmarks/README.md, "Twenty-second session")
        below_mid = (key - mid[:, None]) >> 31
        cnt = BLOCK_NB + tl.sum(below_mid, 1)
        ge = below_mid == 0
        up = (cnt >= need) & ~done
        down = (cnt < need) & ~done
        if step >= SEARCH_TIGHT:
            # no key lies in [mid, above) nor in [below + 1, mid): the counts stay those of mid
            above = tl.min(tl.where(ge, key, 0x7FFFFFFF), 1)
            below = tl.max(tl.where(ge, -1, key), 1)
            lo = tl.where(up, above, lo)
            hi = tl.where(down, below + 1, hi)
        else:
            lo = tl.where(up, mid, lo)
            hi = tl.where(down, mid, hi)
        cnt_lo = tl.where(up, cnt, cnt_lo)
        cnt_hi = tl.where(down, cnt, cnt_hi)
        done = (cnt_lo == need) | (hi - lo <= 1)
        step += 1
    thr = lo
    gt = key > thr[:, None]
    eq = key == thr[:, None]
    # the search's counts say it all: count(key >= thr) = cnt_lo >= need, and a row with cnt_lo > need ended
    # with hi = thr + 1, so count(key > thr) = cnt_hi
    surplus = cnt_lo - need
    need_eq = need - cnt_hi
    if tl.max(surplus, 0) > 0:
        rank = tl.cumsum(eq.to(tl.int32), 1) - 1  # ties: lower block index first
        sel = gt | (eq & (rank < need_eq[:, None])) | forced
    else:  # no row has more keys at its threshold than it needs (the usual case): no tie to break, no scan
        sel = gt | eq | forced
    n_sel = n_forced + tl.maximum(need, 0)  # exactly max(need, 0) candidates are selected
    # output positions by a two-level scan, within runs of SCAN_RUN blocks and then over the runs' totals: one scan
    # over the row compiles to four interleaved scans a warp in the row's load layout (H200, identical outputs, runs
    # of 16: top-k 2.45 -> 2.22 ms at 128K, 9.1 -> 8.2 ms at Hkv 8 d 64; decode step 51.0 -> 50.4 us)
    s3 = tl.reshape(sel.to(tl.int32), (SEL_T, BLOCK_NB // SCAN_RUN, SCAN_RUN))
    run_tot = tl.sum(s3, 2)
    pos = tl.reshape(tl.cumsum(s3, 2) + (tl.cumsum(run_tot, 1) - run_tot)[:, :, None], (SEL_T, BLOCK_NB)) - 1
    obase = out_ptr + h * stride_oh + qrow * stride_ot
    tl.store(obase[:, None] + pos, b + tl.zeros((SEL_T, BLOCK_NB), tl.int32), mask=sel)
    o = tl.arange(0, BUDGET_P)[None, :]
    tl.store(obase[:, None] + o, tl.full((SEL_T, BUDGET_P), -1, tl.int32),
             mask=(o >= n_sel[:, None]) & (o < budget) & tvalid[:, None])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
def _check_pooling(config: SparseConfig) -> None:
    R = config.block_size // config.kernel_stride
    L = config.kernel_size // config.kernel_stride
    if R & (R - 1) or config.block_size & (config.block_size - 1):  # tile widths (tl.arange) are powers of two
        raise NotImplementedError(
            f"the Triton kernels need block_size and block_size / kernel_stride to be powers of two (got block_size "
            f"{config.block_size}, kernel_stride {config.kernel_stride}); backend='torch' runs any config")
    if L - 1 > R:
        raise NotImplementedError(
            f"select_blocks_triton needs kernel_size <= block_size + kernel_stride (got kernel_size "
            f"{config.kernel_size}, block_size {config.block_size}, kernel_stride {config.kernel_stride})")


@on_tensor_device
def _select_core(q, k1, k2, q_start, q_len, k_len, c1_start, c1_len, c2_start, c2_len,
                 max_seqlen_k: int, config: SparseConfig, scale: float, decode_rows: tuple | None = None,
                 block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, transposed: bool | None = None, select_warps: int | None = None,
                 host_lens: tuple | None = None, maxnreg: int | None = None):
    """Stages 1.2-1.4 on given compressed keys. Per-sequence int32 arrays describe the layout:
    sequence i has queries q[q_start[i] : q_start[i] + q_len[i]], key length k_len[i], fine keys
    k1[c1_start[i] : + c1_len[i]] and coarse keys k2[c2_start[i] : + c2_len[i]].
    Decoding passes ``decode_rows`` = (rows1, rows2) instead: q holds one query per sequence (the last of
    its k_len[i] keys) and the compressed keys of sequence i start at row i * rows1 of k1 (i * rows2 of k2);
    the kernels derive every other quantity from k_len (no launch, no host synchronisation; the other
    arrays are not read). Prefill needs ``host_lens`` = (q_len, k_len) as host lists, which size the query
    tiles without a host synchronisation.
    Returns (Hkv, total_q, budget) int32."""
    decode = decode_rows is not None
    # the kernels read the head dim as unit-stride (q given by a caller, compressed keys passed to a decode call)
    q, k1, k2 = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k1, k2))
    total_q, hq, d = q.shape
    hkv = k1.shape[1]
    g = hq // hkv
    dev = q.device
    budget = config.budget
    out = torch.empty((hkv, total_q, budget), dtype=torch.int32, device=dev)
    nseq = q_start.shape[0]
    if total_q == 0 or nseq == 0:
        return out
    B, lc, sc = config.block_size, config.kernel_size, config.kernel_stride
    R, L = B // sc, lc // sc
    GP = _next_pow2(g)
    # measured on an H200 (NOTES_selection.md): windows-on-rows (transposed) tiles and 4 warps are the fastest
    # variant for prefill (128 rows = 8 tokens x 16 heads, 64 windows) and for decoding
    trans = True if transposed is None else bool(transposed)
    # Hopper prefill: the Gluon scoring kernel (score_sm90.py) on the same 128-row tiles, unless a launch setting
    # of the Triton kernel is asked for
    default_launch = all(x is None for x in (block_m, block_n, num_warps, num_stages, transposed, maxnreg))
    sm90 = (SCORE_SM90.enabled and not _INTERPRET and score_sm90_supported(q, k1, GP, R, L, decode)
            and default_launch)
    if block_m is None:
        block_m = 64 if (_INTERPRET or not trans or decode) else 128
    BLOCK_T = max(1, block_m // GP)
    if decode:
        BLOCK_T = max(1, 16 // GP)
    # tokens per head-major row group: one warpgroup's MMA columns (128) hold whole groups of heads, so
    # tiles of more than 128 rows (8 warps) keep the group sum inside each thread
    TG = min(BLOCK_T, max(1, _GROUP_COLUMNS // GP))
    BLOCK_N = block_n or (32 if _INTERPRET else 64)
    BLOCK_N = max(BLOCK_N, R)
    BLOCK_D = max(16, _next_pow2(d))
    to_f32 = _INTERPRET or q.dtype == torch.float32
    prec = "ieee" if to_f32 else "tf32"
    nw = num_warps or (4 if trans else 8)
    # 2 stages for prefill (128K, H200, interleaved A/B: scoring 9.95 -> 9.75 ms, LSE 3.10 -> 2.73 ms), 3 for
    # decoding (measured there in the fourth session)
    ns = num_stages or (3 if decode else 2)
    kw = {} if _INTERPRET else dict(num_warps=nw, num_stages=ns, **({"maxnreg": maxnreg} if maxnreg else {}))
    pdl = _pdl_launch_args(dev) if decode else {}

    # query tiles (never across sequences)
    max_prefix = max_seqlen_k  # keys before each sequence's first query: no bound known
    rows1, rows2 = decode_rows or (0, 0)
    if decode:  # one tile per sequence
        tile_seq = tile_off = k_len
        n_tiles = total_q
    else:
        n_tiles = sum(cdiv(int(x), BLOCK_T) for x in host_lens[0])
        max_prefix = max(int(b) - int(a) for a, b in zip(*host_lens))
        if n_tiles == 0:
            return out

        def tiles():  # from the layout alone: once a forward when every layer passes the same q_len tensor
            ntile_seq = torch.div(q_len + BLOCK_T - 1, BLOCK_T, rounding_mode="floor")
            tptr = torch.cumsum(ntile_seq, 0)
            tile_seq = torch.repeat_interleave(torch.arange(nseq, device=dev, dtype=torch.int32), ntile_seq,
                                               output_size=n_tiles)
            return tile_seq, ((torch.arange(n_tiles, device=dev) - (tptr - ntile_seq)[tile_seq.long()]) * BLOCK_T
                              ).to(torch.int32)

        tile_seq, tile_off = once_per_forward("query_tiles", q_len, (BLOCK_T, n_tiles), tiles, device_result=True)
    q_start, q_len, k_len = (x.to(torch.int32).contiguous() for x in (q_start, q_len, k_len))
    c1_start, c1_len, c2_start, c2_len = (x.to(torch.int32).contiguous() for x in (c1_start, c1_len, c2_start, c2_len))
    qk_scale = float(scale) * _LOG2E

    # 1) log-sum-exp partials
    if decode:  # split the keys of each sequence over several programs
        lse_splits, score_splits = _decode_splits(total_q, hkv)
        n2max = cdiv(max_seqlen_k, 4 * sc if config.lse_approx else sc) + 1
        kps = cdiv(cdiv(n2max, lse_splits), BLOCK_N) * BLOCK_N
        n_lse = cdiv(n2max, kps)
    else:
        n_lse, kps = 1, 1 << 30
    lse = torch.empty((n_lse, total_q, hq), dtype=torch.float32, device=dev)
    # Hopper prefill: the Gluon LSE kernel (lse_sm90.py) on the same 128-row tiles, unless a launch setting is asked for
    lse_gluon = LSE_SM90.enabled and not _INTERPRET and lse_sm90_supported(q, k1, k2, GP, decode) and default_launch
    if lse_gluon:
        lse_gluon = LSE_SM90(lse_sm90, q, k1, k2, lse, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len,
                             c2_start, c2_len, n_tiles, qk_scale, g, GP, lc, sc, 4 * lc, 4 * sc, config.lse_approx)
    if not lse_gluon:
        _lse_kernel[(n_tiles, hkv, n_lse)](
            q, k1, k2, lse, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len, c2_start, c2_len,
            q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k2.stride(0), k2.stride(1),
            lse.stride(0), lse.stride(1), qk_scale, d, kps, rows1, rows2,
            G=g, GP=GP, BLOCK_T=BLOCK_T, TG=TG, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, KS1=lc, ST1=sc, KS2=4 * lc,
            ST2=4 * sc, LSE_APPROX=config.lse_approx, TO_F32=to_f32, PREC=prec, DECODE=decode, **kw, **pdl)

    # 2) pooled block scores per chunk of tiles, 3) top-k
    # partials the scoring reads (a constexpr width): in decoding the most there can be, not the count at this
    # length, so that a cache growing past a power of two compiles nothing (masked lanes cost nothing measurable)
    nsp = _next_pow2(lse_splits if decode else n_lse)
    nb_ws = max(1, cdiv(max_seqlen_k, B))
    BLOCK_NB = _next_pow2(nb_ws)
    if BLOCK_NB > _MAX_BLOCKS_PER_ROW:
        raise NotImplementedError(
            f"select_blocks_triton supports at most {_MAX_BLOCKS_PER_ROW} key blocks per sequence "
            f"(max_seqlen_k {max_seqlen_k}, block_size {B})")
    if decode:
        n1max = cdiv(max_seqlen_k, sc) + 1
        wps = max(2 * BLOCK_N, cdiv(cdiv(n1max, score_splits), BLOCK_N) * BLOCK_N)
        n_split = cdiv(n1max, wps)
    else:
        wps, n_split = 1 << 30, 1
    tpc = max(1, _WORKSPACE_BYTES // (hkv * BLOCK_T * cdiv(nb_ws, 16) * 16 * 4))
    tpc = min(tpc, n_tiles)
    overlap = (TOPK_OVERLAP and sm90 and n_tiles > (_OVERLAP_MIN_CHUNKS - 1) * tpc
               and not torch.cuda.is_current_stream_capturing())
    n_ws = 2 if overlap else 1  # the scoring of chunk i waits for the top-k of chunk i - 2
    # rows padded to a multiple of 16 floats: the row and head strides then stay divisible by 16 whatever the
    # lengths, so the kernels keep them specialised (aligned, vectorised rows) without compiling again
    nb_pad = cdiv(nb_ws, 16) * 16
    wss = [torch.empty((hkv, tpc * BLOCK_T, nb_pad), dtype=torch.float32, device=dev)[..., :nb_ws]
           for _ in range(n_ws)]
    released = [None] * n_ws  # per workspace: the event after the last top-k that read it
    if overlap:
        main, side = torch.cuda.current_stream(dev), _score_stream(dev)
        side.wait_stream(main)  # the log-sum-exps, the inputs
    for i, c0 in enumerate(range(0, n_tiles, tpc)):
        nt = min(tpc, n_tiles - c0)
        ws = wss[i % n_ws]
        # the chunk's queries see key blocks up to its last key position (a tile's token offset in its
        # sequence is at most its global index x BLOCK_T), so early chunks get a narrower top-k row
        kpos_max = min(max_seqlen_k, max_prefix + (c0 + nt) * BLOCK_T) - 1
        nb_c = min(BLOCK_NB, _next_pow2(kpos_max // B + 1))
        # rows per select program: keep a (rows, nb_c) tile at <= _SELECT_TILE elements (registers)
        sel_t = max(1, min(BLOCK_T, _SELECT_TILE // nb_c))
        if sm90:
            with torch.cuda.stream(side) if overlap else contextlib.nullcontext():
                if released[i % n_ws] is not None:
                    side.wait_event(released[i % n_ws])
                sm90 = SCORE_SM90(score_blocks_sm90, q, k1, lse, ws, tile_seq, tile_off, q_start, q_len, k_len,
                                  c1_start, c1_len, c0, nt, nb_ws, qk_scale, g, GP, BLOCK_T, lc, sc, R, L, B,
                                  config.local_blocks, config.init_blocks, one_sequence=nseq == 1)
            if overlap:
                main.wait_stream(side)  # this chunk's scores
        if not sm90:
            _score_kernel[(nt, hkv, n_split)](
                q, k1, lse, ws, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len,
                q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), lse.stride(0), lse.stride(1),
                ws.stride(0), ws.stride(1), c0, nt, n_lse, wps, nb_ws, qk_scale, d, rows1,
                G=g, GP=GP, BLOCK_T=BLOCK_T, TG=TG, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, KS1=lc, ST1=sc, R=R, L=L,
                BS=B, LOCAL=config.local_blocks, INIT=config.init_blocks, TO_F32=to_f32, PREC=prec, TRANS=trans,
                NSP=nsp, DECODE=decode, **kw, **pdl)
        _select_kernel[(nt * BLOCK_T // sel_t, hkv)](
            ws, out, tile_seq, tile_off, q_start, q_len, k_len,
            ws.stride(0), ws.stride(1), out.stride(0), out.stride(1), c0, budget,
            BLOCK_T=BLOCK_T, SEL_T=sel_t, BLOCK_NB=nb_c, BUDGET_P=_next_pow2(budget), BS=B,
            LOCAL=config.local_blocks, INIT=config.init_blocks, DECODE=decode,
            SCAN_RUN=min(_TOPK_SCAN_RUN, nb_c), SEARCH_BISECT=_TOPK_SEARCH[0], SEARCH_CLAMP=_TOPK_SEARCH[1],
            SEARCH_TIGHT=_TOPK_SEARCH[2],
            **({} if _INTERPRET else dict(num_warps=select_warps or _SELECT_WARPS or _select_warps(nb_c, decode))),
            **pdl)
        if overlap:
            released[i % n_ws] = main.record_event()
    return out


_SCORE_STREAMS: dict = {}


def _score_stream(device) -> "torch.cuda.Stream":
    """One high-priority side stream per device for the scoring beside the top-k (TOPK_OVERLAP): when both kernels
    have programs waiting, the SMs take the scoring's first."""
    device = torch.device(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), _SCORE_STREAM_PRIORITY)
    if key not in _SCORE_STREAMS:
        _SCORE_STREAMS[key] = torch.cuda.Stream(device=device, priority=_SCORE_STREAM_PRIORITY)
    return _SCORE_STREAMS[key]


def _check_inputs(q, k, config):
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a (total_q, Hq, d) tensor, got {getattr(q, 'shape', type(q))}")
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"k must be a (total_k, Hkv, d) tensor, got {getattr(k, 'shape', type(k))}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if q.shape[2] < 16 or q.shape[2] > 256:
        raise ValueError(f"head dim {q.shape[2]} not supported (16..256)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq ({q.shape[1]}) must be a multiple of Hkv ({k.shape[1]})")
    _check_pooling(config)


def select_blocks_triton(q: torch.Tensor, k: torch.Tensor, config: SparseConfig, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float | None = None, host_offsets: tuple | None = None,
                         **tuning) -> torch.Tensor:
    """Stage 1 for a packed varlen batch.

    q: (total_q, Hq, d), k: (total_k, Hkv, d); sequence i's queries are the last len_q(i) positions of
    its keys. Returns (Hkv, total_q, budget) int32 block indices relative to the sequence's key start,
    sorted ascending, padded with -1 (SPEC stage 1). ``max_seqlen_k`` must be >= every key length.
    ``host_offsets`` = (cu_seqlens_q, cu_seqlens_k) as host lists (equal to the tensors) lets the layout be
    checked and sized on the host with no host synchronisation, so the caller's host work overlaps the GPU's;
    without it the call reads the two tensors back once.
    """
    _check_inputs(q, k, config)
    _check_cu(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_cu(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    if cu_seqlens_q.numel() < 2:
        return torch.empty((k.shape[1], q.shape[0], config.budget), dtype=torch.int32, device=q.device)
    if host_offsets is None:
        # one read-back of the layout, which is then checked and sized on the host (it had taken one host
        # synchronisation to check it and three to size the buffers: each drains the GPU's queue)
        both = torch.cat([cu_seqlens_q.long(), cu_seqlens_k.long()]).tolist()
        host_offsets = (both[:cu_seqlens_q.numel()], both[cu_seqlens_q.numel():])
    oq, ok = (list(map(int, x)) for x in host_offsets)
    if len(oq) != cu_seqlens_q.numel() or len(ok) != cu_seqlens_k.numel():
        raise ValueError("host_offsets must hold as many entries as cu_seqlens_q and cu_seqlens_k")
    host_lens = ([b - a for a, b in zip(oq, oq[1:])], [b - a for a, b in zip(ok, ok[1:])])
    cq0, ck0, cqe, cke = oq[0], ok[0], oq[-1], ok[-1]
    dec_q, dec_k = min(host_lens[0]) < 0, min(host_lens[1]) < 0
    q_gt_k = any(a > b for a, b in zip(*host_lens))
    kmax = max(host_lens[1])
    if cq0 != 0 or dec_q or cqe != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must be non-decreasing, start at 0 and end at total_q={q.shape[0]}")
    if ck0 != 0 or dec_k or cke != k.shape[0]:
        raise ValueError(f"cu_seqlens_k must be non-decreasing, start at 0 and end at total_k={k.shape[0]}")
    if q_gt_k:
        raise ValueError("every sequence needs len_q <= len_k (queries are the last len_q key positions)")
    if int(max_seqlen_k) < kmax:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) is smaller than the longest key sequence ({kmax})")
    kinds = [(config.kernel_size, config.kernel_stride)]
    if config.lse_approx:
        kinds.append((config.coarse_kernel_size, config.coarse_kernel_stride))

    def layouts():  # from the offsets alone: built once a forward, every layer passing the same offset tensors
        q_len = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        k_len = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        return q_len, k_len, [_compress_layout(cu_seqlens_k[:-1], k_len, kernel, stride, host_k_len=host_lens[1])
                              for kernel, stride in kinds]

    q_len, k_len, compress_layouts = once_per_forward("selection_layout", (cu_seqlens_q, cu_seqlens_k),
                                                      tuple(kinds), layouts, device_result=True)
    with torch.no_grad():
        k1, s1, n1, _ = _compress_core(k, cu_seqlens_k[:-1], k_len, *kinds[0], layout=compress_layouts[0])
        if config.lse_approx:
            k2, s2, n2, _ = _compress_core(k, cu_seqlens_k[:-1], k_len, *kinds[1], layout=compress_layouts[1])
        else:
            k2, s2, n2 = k1, s1, n1
        return _select_core(q, k1, k2, cu_seqlens_q[:-1], q_len, k_len, s1, n1, s2, n2, int(max_seqlen_k),
                            config, scale, host_lens=host_lens, **tuning)


# Custom ops take the config as its fields (their schema has no room for a dataclass), in field order.
def config_args(config: SparseConfig) -> tuple:
    return (config.block_size, config.kernel_size, config.kernel_stride, config.init_blocks, config.window_size,
            config.topk, config.dense_len, config.lse_approx, config.use_nope)


# the custom op: torch.compile sees stage 1 as one opaque call (no tracing into the launcher's host logic)
@torch.library.custom_op("infllmv2::select_blocks", mutates_args=())
def _select_blocks_op(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, block_size: int, kernel_size: int,
                      kernel_stride: int, init_blocks: int, window_size: int, topk: int, dense_len: int,
                      lse_approx: bool, use_nope: bool, host_offsets_q: Optional[list[int]] = None,
                      host_offsets_k: Optional[list[int]] = None) -> torch.Tensor:
    config = SparseConfig(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk, dense_len,
                          lse_approx, use_nope)
    host = None if host_offsets_q is None else (host_offsets_q, host_offsets_k)
    return select_blocks_triton(q, k, config, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                host_offsets=host)


@_select_blocks_op.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, *config_fields, **host):
    return q.new_empty((k.shape[1], q.shape[0], SparseConfig(*config_fields[:9]).budget), dtype=torch.int32)


def select_blocks_compilable(q: torch.Tensor, k: torch.Tensor, config: SparseConfig, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                             softmax_scale: float | None = None, host_offsets: tuple | None = None) -> torch.Tensor:
    """``select_blocks_triton`` as the custom op ``infllmv2::select_blocks`` (default tuning)."""
    _check_inputs(q, k, config)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    host = (None, None) if host_offsets is None else tuple(list(map(int, x)) for x in host_offsets)
    return _select_blocks_op(q, k, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale,
                             *config_args(config), *host)
