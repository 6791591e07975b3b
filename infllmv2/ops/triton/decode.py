"""One decode step of InfLLM-V2 in Triton: one new query token per sequence against a KV cache.

Stage 1 reuses the selection kernels of ``selection.py`` (one tile per sequence, keys split over
several programs, flash-decoding style); stage 2 splits the selected blocks of each (sequence,
KV head) over several programs (``_decode_split_kernel``; the G query heads of the group are the
rows of one program, since they share the selection) and ``_decode_combine_kernel`` merges the
partial results by their log-sum-exp. The forced blocks (init, local window) are known from the
length alone: their programs do not wait for the top-k (programmatic dependent launch) and run
while it does. A sequence whose key length is below ``dense_len`` attends
to all its keys (same kernels, the block list is then 0, 1, 2, ...).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...config import SparseConfig
from .selection import (_INTERPRET, _LOG2E, _check_pooling, _compress_core, _compressed_count, _forced_blocks,
                        _next_pow2, _pdl_launch_args, _pdl_start, _select_core, cdiv, config_args,
                        gdc_launch_dependents, gdc_wait, on_tensor_device, softmax_scale_or_default)

__all__ = ["infllmv2_decode_triton"]


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, seqlen_ptr, leftpad_ptr, o_ptr, lse_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_ih, stride_ib, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                         qk_scale, D, budget, dense_len, known_splits, known_per_split, chosen_per_split,
                         dense_per_split,
                         G: tl.constexpr, BLOCK_M: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr,
                         INIT: tl.constexpr, LOCAL: tl.constexpr,
                         TO_F32: tl.constexpr, PREC: tl.constexpr, HAS_LEFTPAD: tl.constexpr, SPLIT_P: tl.constexpr,
                         EARLY: tl.constexpr, PDL: tl.constexpr = False):
    """Program (sequence, KV head, split). A dense sequence spreads its blocks over all splits. For a sparse
    one, splits below ``known_splits`` attend to its forced blocks (known from its length alone) and the
    others to the top-k's chosen blocks."""
    bid = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    # the lengths were written before the selection kernels ran, so they are safe to read before the wait
    L = tl.load(seqlen_ptr + bid)
    is_dense = (dense_len >= 0) & (L < dense_len)
    known = is_dense | (split < known_splits)
    if PDL:
        # the known blocks need nothing from the selection kernels: with EARLY their programs run while the
        # top-k still runs (everything before it has finished: a PDL kernel launches only once all programs of
        # its predecessor have passed their own wait), and only the chosen blocks' programs wait for the top-k
        if EARLY:
            if not known:
                gdc_wait()
        else:
            gdc_wait()
        gdc_launch_dependents()
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile (inductor) may pass Python floats as fp64
    bq = (L - 1) // BS  # the block of the newest token
    n_init, lo_local, n_local = _forced_blocks(bq, INIT, LOCAL)
    ent = tl.arange(0, SPLIT_P)
    bid64 = bid.to(tl.int64)
    if is_dense:  # blocks 0, 1, ... of the sequence, dense_per_split to a split
        p0 = split * dense_per_split
        blks = p0 + ent
        n_here = tl.minimum(tl.maximum((L + BS - 1) // BS - p0, 0), dense_per_split)
    elif known:  # its forced blocks: init, then the local window up to the current block
        p0 = split * known_per_split
        p = p0 + ent
        blks = tl.where(p < n_init, p, lo_local + p - n_init)
        n_here = tl.minimum(tl.maximum(n_init + n_local - p0, 0), known_per_split)
    else:  # the top-k's chosen blocks, at positions [n_init, n_valid - n_local) of the sorted selection
        p0 = n_init + (split - known_splits) * chosen_per_split
        p = p0 + ent
        n_here = tl.minimum(tl.maximum(tl.minimum(budget, bq + 1) - n_local - p0, 0), chosen_per_split)
        # one load of the split's block ids before the loop: each block's K/V loads need no index round trip
        blks = tl.load(idx_ptr + h * stride_ih + bid64 * stride_ib + p, mask=ent < n_here, other=-1)
    g = tl.arange(0, BLOCK_M)
    gmask = g < G
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + bid64 * stride_qb + (h * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if TO_F32:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    offs_u = tl.arange(0, BS)
    kbase = k_ptr + bid64 * stride_kb + h * stride_kh
    vbase = v_ptr + bid64 * stride_vb + h * stride_vh
    if HAS_LEFTPAD:  # the row's keys start at this slot (left-padded batch)
        pad = tl.load(leftpad_ptr + bid).to(tl.int64)
        kbase += pad * stride_kt
        vbase += pad * stride_vt
    for e in range(0, n_here):
        blk = tl.sum(tl.where(ent == e, blks, 0))
        u = blk * BS + offs_u
        umask = (u < L) & (u >= 0)  # a -1 entry gives u < 0
        kt = tl.load(kbase + u.to(tl.int64)[None, :] * stride_kt + offs_d[:, None],
                     mask=umask[None, :] & dmask[:, None], other=0.0)
        vv = tl.load(vbase + u.to(tl.int64)[:, None] * stride_vt + offs_d[None, :],
                     mask=umask[:, None] & dmask[None, :], other=0.0)
        if TO_F32:
            kt = kt.to(tl.float32)
            vv = vv.to(tl.float32)
        # the max over the raw scores, scaled per row: each exponent is one FMA (as in the prefill kernels)
        s = tl.where(umask[None, :], tl.dot(q, kt, input_precision=PREC), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_ = tl.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p_, 1)
        acc = acc * alpha[:, None] + tl.dot(p_.to(vv.dtype), vv, input_precision=PREC)
        m = m_new
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    hq = h * G + g
    tl.store(o_ptr + bid64 * stride_ob + hq[:, None] * stride_oh + split * stride_os + offs_d[None, :], o,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + bid64 * stride_lb + hq * stride_lh + split, lse, mask=gmask)


@triton.jit
def _decode_combine_kernel(o_ptr, lse_ptr, out_ptr, n_split, D,
                           stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_xb, stride_xh,
                           SPLIT_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_start(PDL)
    bid = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    s = tl.arange(0, SPLIT_P)
    smask = s < n_split
    lse = tl.load(lse_ptr + bid * stride_lb + hq * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    den = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    o = tl.load(o_ptr + bid * stride_ob + hq * stride_oh + s[:, None] * stride_os + offs_d[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + bid * stride_xb + hq * stride_xh + offs_d, res.to(out_ptr.dtype.element_ty), mask=dmask)


_DECODE_SELECT_OPTS: dict = {}  # tuning knob: kernel options of the decode selection (dev_selection --tune)
# stage 2 splits a sparse sequence's forced blocks into pieces of this many blocks (H200, 128K, batch 8, one list
# of 96 blocks before the tenth session: 4 beat 6 by 3 us a call, 3 and 2 were slower; NOTES_selection.md) ...
_DECODE_BLOCKS_PER_SPLIT = 4  # (tenth session, with the forced blocks early: 8 and 12 took 56.4 and 62.9 us)
# ... and the top-k's chosen blocks into pieces of this many; with PDL the forced blocks' programs run while the
# top-k still runs (H200, 128K, CUDA graph, interleaved: one 96-block list 57.9 us at batch 8 / 34.3 us at batch 1;
# forced blocks early, chosen ones 4 / 3 / 2 a split 54.2 / 54.0 / 55.1 us, 35.0 / 33.8 / 32.9 us)
_DECODE_CHOSEN_PER_SPLIT = 3
_DECODE_KNOWN_EARLY = True  # switch of the A/B above: False makes every stage-2 program wait for the top-k
# launch options of the stage-2 split kernel (H200, 128K, CUDA graph, batch 8 / 1: 4 warps 2 stages 53.9 / 33.9 us;
# 2 warps 54.4 / 34.2; 8 warps 56.5 / 33.9; 3 stages 55.8 / 32.1; 1 stage 60.4 / 34.0; --decode-variants)
_DECODE_SPLIT_LAUNCH = dict(num_warps=4, num_stages=2)
# warps of the combine kernel: one keeps its reduction over the splits inside a warp (H200, 128K, CUDA graph,
# interleaved: batch 8 53.9 / 54.1 / 52.5 us with 4 / 2 / 1 warps, batch 1 34.0 / 35.0 / 33.8 us)
_DECODE_COMBINE_WARPS = 1


def _check_decode_inputs(q, k_cache, v_cache, cache_seqlens, config, cache_leftpad=None):
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a (batch, Hq, d) tensor, got {getattr(q, 'shape', type(q))}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (batch, max_len, Hkv, d) tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} shapes differ")
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    hkv = k_cache.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if d < 16 or d > 256:
        raise ValueError(f"head dim {d} not supported (16..256)")
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (b,)
            or cache_seqlens.dtype != torch.int32 or cache_seqlens.device != q.device):
        raise ValueError("cache_seqlens must be a (batch,) int32 tensor on q's device")
    if cache_leftpad is not None and (not isinstance(cache_leftpad, torch.Tensor) or cache_leftpad.shape != (b,)
                                      or cache_leftpad.dtype != torch.int32 or cache_leftpad.device != q.device):
        raise ValueError("cache_leftpad must be a (batch,) int32 tensor on q's device")
    _check_pooling(config)


def infllmv2_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, config: SparseConfig, softmax_scale: float | None = None,
                           k_fine: torch.Tensor | None = None, k_coarse: torch.Tensor | None = None,
                           return_block_indices: bool = False, blocks_per_split: int | None = None,
                           cache_leftpad: torch.Tensor | None = None):
    """One decode step.

    q: (batch, Hq, d), the newest token's query (its key/value already written into the cache);
    k_cache, v_cache: (batch, max_len, Hkv, d); cache_seqlens: (batch,) int32 key lengths including
    the new token (>= 1). cache_leftpad: optional (batch,) int32 first slot of each row's keys (a
    left-padded batch, as flash-attn's ``cache_leftpad``): row i's keys are
    ``k_cache[i, leftpad[i] : leftpad[i] + cache_seqlens[i]]`` (default: from slot 0).
    k_fine / k_coarse: optional (batch, max_n, Hkv, d) compressed keys of each row's keys (the first
    ``(len - kernel) // stride + 1`` rows of each sequence are used); computed from the cache when not
    given. ``blocks_per_split``: blocks per stage-2 program, for the forced and the chosen blocks alike
    (default: the tuned ``_DECODE_BLOCKS_PER_SPLIT`` / ``_DECODE_CHOSEN_PER_SPLIT``). Returns out
    (batch, Hq, d) in q's dtype (and the (Hkv, batch, budget) selection when ``return_block_indices``;
    rows of dense sequences are then meaningless).
    """
    _check_decode_inputs(q, k_cache, v_cache, cache_seqlens, config, cache_leftpad)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k_cache, v_cache, k_fine,
                                                                                   k_coarse)):
        raise RuntimeError("infllmv2_decode_triton has no backward, and an input requires grad: call it under "
                           "torch.no_grad() (inference), or use infllmv2_attention, which is differentiable")
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    if return_block_indices or blocks_per_split is not None or not torch.compiler.is_compiling():
        # eager: called directly, as the custom op's dispatch costs tens of microseconds of host time a call, and
        # an eager decode step is bound by the host
        return _decode(q, k_cache, v_cache, cache_seqlens, config, scale, k_fine, k_coarse, return_block_indices,
                       blocks_per_split, cache_leftpad)
    # compiled: the custom op, which torch.compile sees as one opaque call (the config travels as its fields)
    return _decode_op(q, k_cache, v_cache, cache_seqlens, cache_leftpad, k_fine, k_coarse, scale,
                      *config_args(config))


@torch.library.custom_op("infllmv2::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               cache_leftpad: torch.Tensor | None, k_fine: torch.Tensor | None, k_coarse: torch.Tensor | None,
               softmax_scale: float, block_size: int, kernel_size: int, kernel_stride: int, init_blocks: int,
               window_size: int, topk: int, dense_len: int, lse_approx: bool, use_nope: bool) -> torch.Tensor:
    config = SparseConfig(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk, dense_len,
                          lse_approx, use_nope)
    return _decode(q, k_cache, v_cache, cache_seqlens, config, softmax_scale, k_fine, k_coarse, False, None,
                   cache_leftpad)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_leftpad, k_fine, k_coarse, softmax_scale, *config_fields):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _check_given(given, batch, k_cache, q):
    if given.dim() != 4 or given.shape[0] != batch or given.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"compressed keys must be (batch, max_n, Hkv, d), got {tuple(given.shape)}")
    if given.dtype != q.dtype or given.device != q.device:
        raise ValueError("compressed keys must have q's dtype and device")


@on_tensor_device
def _decode(q, k_cache, v_cache, cache_seqlens, config, scale, k_fine, k_coarse, return_block_indices,
            blocks_per_split, cache_leftpad):
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    batch, hq, d = q.shape
    max_len, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    dev = q.device
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return (out, torch.empty((hkv, 0, config.budget), dtype=torch.int32, device=dev)) if return_block_indices else out
    lens = cache_seqlens
    B = config.block_size
    pdl = _pdl_launch_args(dev)
    with torch.no_grad():
        sparse_possible = config.dense_len < 0 or max_len >= config.dense_len
        # stage-2 splits of a sparse sequence: first those over its forced blocks (known from its length
        # alone), then those over the top-k's chosen blocks; a dense sequence spreads its blocks over all
        n_dense = cdiv(min(max_len, config.dense_len - 1), B) if config.dense_len > 0 else 0
        if sparse_possible:
            per_known = blocks_per_split or _DECODE_BLOCKS_PER_SPLIT
            per_chosen = blocks_per_split or _DECODE_CHOSEN_PER_SPLIT
            known_splits = cdiv(config.init_blocks + config.local_blocks + 1, per_known)
            n_split = known_splits + cdiv(config.topk - config.init_blocks - 1, per_chosen)
        else:
            per_known = per_chosen = 1
            n_split = known_splits = cdiv(n_dense, blocks_per_split or max(_DECODE_BLOCKS_PER_SPLIT,
                                                                           cdiv(n_dense, 64)))
        per_dense = max(1, cdiv(n_dense, n_split))
        # allocated before stage 1: with PDL the known splits write these while the top-k still runs, so they
        # must not reuse memory of stage 1's temporaries
        o_part = torch.empty((batch, hq, n_split, d), dtype=torch.float32, device=dev)
        lse_part = torch.empty((batch, hq, n_split), dtype=torch.float32, device=dev)
        if sparse_possible:
            kinds = [(k_fine, config.kernel_size, config.kernel_stride)]
            if config.lse_approx:
                kinds.append((k_coarse, config.coarse_kernel_size, config.coarse_kernel_stride))
            keys = []
            for given, kernel, stride in kinds:
                if given is None:  # compressed from the cache into the padded (batch, rows) layout
                    rows = max(1, _compressed_count(max_len, kernel, stride))
                    kstart = torch.arange(batch, dtype=torch.int32, device=dev) * max_len
                    if cache_leftpad is not None:
                        kstart = kstart + cache_leftpad
                    c, _, _, _ = _compress_core(k_cache.reshape(batch * max_len, hkv, d), kstart, lens, kernel,
                                                stride, rows_per_seq=rows)
                else:
                    _check_given(given, batch, k_cache, q)
                    rows = given.shape[1]
                    c = given.reshape(batch * rows, hkv, d)
                keys.append((c, rows))
            (k1, rows1), (k2, rows2) = keys[0], keys[-1]
            # one tile per sequence (its single query); the layout needs no launch and no host synchronisation
            idx = _select_core(q, k1, k2, lens, lens, lens, lens, lens, lens, lens, max_len, config, scale,
                               decode_rows=(rows1, rows2), **_DECODE_SELECT_OPTS)
        else:
            idx = torch.full((hkv, batch, config.budget), -1, dtype=torch.int32, device=dev)

        to_f32 = _INTERPRET or q.dtype == torch.float32
        prec = "ieee" if to_f32 else "tf32"
        BLOCK_D = max(16, _next_pow2(d))
        kw = {} if _INTERPRET else dict(_DECODE_SPLIT_LAUNCH)
        _decode_split_kernel[(batch, hkv, n_split)](
            q, k_cache, v_cache, idx, lens, lens if cache_leftpad is None else cache_leftpad, o_part, lse_part,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            idx.stride(0), idx.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            scale * _LOG2E, d, config.budget, config.dense_len, known_splits, per_known, per_chosen, per_dense,
            G=g, BLOCK_M=max(16, _next_pow2(g)), BS=B, BLOCK_D=BLOCK_D, INIT=config.init_blocks,
            LOCAL=config.local_blocks, TO_F32=to_f32, PREC=prec, HAS_LEFTPAD=cache_leftpad is not None,
            SPLIT_P=_next_pow2(max(per_known, per_chosen, per_dense)), EARLY=_DECODE_KNOWN_EARLY, **kw, **pdl)
        _decode_combine_kernel[(batch, hq)](
            o_part, lse_part, out, n_split, d,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1), SPLIT_P=max(2, _next_pow2(n_split)), BLOCK_D=BLOCK_D,
            **({} if _INTERPRET else dict(num_warps=_DECODE_COMBINE_WARPS)), **pdl)
    return (out, idx) if return_block_indices else out


# ------------------------------------------------------------------------------------------------
# Eager decode steps replayed from CUDA graphs
# ------------------------------------------------------------------------------------------------
# switch of the graph replay (INFLLMV2_DECODE_GRAPHS=0: every eager call launches the chain itself)
DECODE_GRAPHS = os.environ.get("INFLLMV2_DECODE_GRAPHS", "1") == "1"
_CAPTURE_STREAMS: dict = {}  # device index -> the side stream graphs are captured on


def _tensor_key(x):
    return None if x is None else (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)


class DecodeGraph:
    """One eager decode call captured in a CUDA graph, replayed while its caches stay where they are.

    An eager decode step (transformers' default generate loop) is bound by the host: the chain's Python and its
    five Triton launches cost ~0.4 ms of host time a call on the H200's host against ~20 us of GPU time
    (``benchmarks/results/profile_triton_launch_h200.json``). Captured over caches with room to grow (the cache's
    ``_append_in_room``: same addresses from step to step), a call costs the copies of q and of the lengths, one
    graph launch and a copy of the output. The graph sizes its launches for the whole room (``k_cache`` holds
    ``max_len`` slots, ``cache_seqlens`` says how many are filled), so it serves every step until the caches move.

    ``key_of(...)`` says what it was captured on (addresses, shapes, strides, config, scale); a caller keeps one
    graph per cache layer and captures a new one when the key changes. Each graph has its own memory pool (the
    chain's temporaries, a few MB), freed with it: a pool handle shared by graphs of a device cannot be used again
    once they are all gone (torch 2.11: an internal assert at the next capture), as happens when a cache is dropped.
    """

    @on_tensor_device  # captured on q's GPU, its streams and launches too
    def __init__(self, q, k_cache, v_cache, cache_seqlens, config, softmax_scale, k_fine, k_coarse,
                 cache_leftpad=None):
        dev = q.device
        self.key = self.key_of(q, k_cache, v_cache, config, softmax_scale, k_fine, k_coarse, cache_leftpad)
        self.q = q.clone(memory_format=torch.contiguous_format)
        self.lens = cache_seqlens.clone()
        self.leftpad = None if cache_leftpad is None else cache_leftpad.clone()
        args = (k_cache, v_cache, self.lens, config, softmax_scale, k_fine, k_coarse, False, None, self.leftpad)
        _decode(self.q, *args)  # compiles any kernel specialisation first: nothing may compile while capturing
        side = _CAPTURE_STREAMS.get(dev.index)
        if side is None:
            side = _CAPTURE_STREAMS[dev.index] = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            # torch.cuda.graph() would also run gc.collect() and empty_cache() at every capture: tens of ms a
            # layer at the first decode step of a large model
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = _decode(self.q, *args)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(dev).wait_stream(side)

    @staticmethod
    def key_of(q, k_cache, v_cache, config, softmax_scale, k_fine, k_coarse, cache_leftpad=None) -> tuple:
        # inference mode too: buffers made in it take no in-place copy outside it
        return (tuple(q.shape), q.dtype, q.device, _tensor_key(k_cache), _tensor_key(v_cache), config,
                float(softmax_scale), _tensor_key(k_fine), _tensor_key(k_coarse), cache_leftpad is not None,
                torch.is_inference_mode_enabled())

    def __call__(self, q: torch.Tensor, cache_seqlens, cache_leftpad=None) -> torch.Tensor:
        """q (batch, Hq, d); cache_seqlens: (batch,) int32 tensor, or an int for every row. Returns (batch, Hq, d)."""
        self.q.copy_(q)
        if isinstance(cache_seqlens, torch.Tensor):
            self.lens.copy_(cache_seqlens)
        else:
            self.lens.fill_(cache_seqlens)
        if self.leftpad is not None:
            self.leftpad.copy_(cache_leftpad)
        self.graph.replay()
        return self.out.clone()


def decode_graphs_apply(q: torch.Tensor) -> bool:
    """Whether an eager decode call on q may replay a graph: CUDA, the switch on, not compiling, not capturing."""
    return (DECODE_GRAPHS and q.is_cuda and not _INTERPRET and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())
