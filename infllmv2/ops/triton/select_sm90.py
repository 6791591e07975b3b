"""Stage-1 top-k kernel for Hopper (sm90) in Gluon, Triton's explicit-layout dialect.

It computes exactly what ``selection._select_kernel`` computes for prefill (per token and KV head: the forced blocks
plus the top-k of the candidate blocks' pooled scores, by the same threshold search on their fp32 bit patterns, ties
to the lower block index, written ascending and padded with -1), hence the same selections, with the layouts chosen
by hand:

* a row of block scores lies over ``WPR`` warps (``NB / (32 WPR)`` consecutive blocks a thread), and a program takes
  ``NW / WPR`` rows at once; with one warp a row a row's reductions are shuffles within the warp;
* a tight search step's three reductions (count, smallest key above, largest key below) are one;
* the selected blocks are stored from the row's own layout. Triton's coalescing pass converts the 2048 64-bit
  pointers of that scatter store through shared memory first (three rounds with barriers), the largest cost
  outside the search loop of the Triton kernel (benchmarks/NOTES_selection.md, "Eighteenth session").

Gluon has no CPU interpreter, so this kernel runs on sm90 GPUs only; ``selection._select_core`` uses the Triton
kernel everywhere else (CPU interpreter, decoding, other GPUs), and the GPU tests compare the two.
"""
from __future__ import annotations

import torch

from .gluon_support import HAVE_GLUON, gl, gluon, on_sm90

# (warps a program, warps a row) per row width; measured in benchmarks/NOTES_selection.md ("Nineteenth session")
_LAUNCH = (4, 4)


if HAVE_GLUON:
    @gluon.jit
    def _add_i32(a, b):
        return a + b

    @gluon.jit
    def _count_above_below(c0, a0, b0, c1, a1, b1):
        return c0 + c1, gl.minimum(a0, a1), gl.maximum(b0, b1)

    @gluon.jit
    def _select_rows(ws_tile, out_h, stride_wr, stride_ot, r0, qs, off, ql, kl, budget, BLOCK_T: gl.constexpr,
                     BS: gl.constexpr, NB: gl.constexpr, NW: gl.constexpr, WPR: gl.constexpr, LOCAL: gl.constexpr,
                     INIT: gl.constexpr, SEARCH_BISECT: gl.constexpr, SEARCH_CLAMP: gl.constexpr,
                     SEARCH_TIGHT: gl.constexpr, FUSE3: gl.constexpr = True):
        """Forced blocks + top-k of rows r0 .. r0 + NW / WPR - 1 of a query tile (row r: token off + r of a sequence
        whose ``ql`` queries start at row ``qs`` and end at key ``kl``; its scores at ``ws_tile + r * stride_wr``,
        NB >= 32 WPR blocks, NB >= budget) into their output rows ``out_h + (qs + off + r) * stride_ot``. The search
        is ``selection._select_kernel``'s (its comments explain it); the warps meet once a step, to see whether
        every row is done."""
        row_l: gl.constexpr = gl.BlockedLayout([1, NB // (32 * WPR)], [1, 32], [NW // WPR, WPR], [1, 0])
        r = r0 + gl.arange(0, NW // WPR, layout=gl.SliceLayout(1, row_l))
        tok = off + r
        tvalid = (tok < ql) & (r < BLOCK_T)
        bq1 = (kl - ql + tok) // BS
        bq = gl.expand_dims(bq1, 1)
        b = gl.expand_dims(gl.arange(0, NB, layout=gl.SliceLayout(0, row_l)), 0)
        tv = gl.expand_dims(tvalid, 1)
        cand = (b >= INIT) & (b < bq - LOCAL) & tv
        sc = gl.load(ws_tile + gl.expand_dims(r.to(gl.int64) * stride_wr, 1) + b, mask=cand, other=0.0)
        key = gl.where(cand, sc.to(gl.int32, bitcast=True), -1)
        n_init = gl.minimum(bq1 + 1, INIT)
        n_local = gl.maximum(bq1 - gl.maximum(bq1 - LOCAL, INIT) + 1, 0)
        n_forced = gl.where(tvalid, n_init + n_local, 0)
        n_cand = gl.where(tvalid, gl.maximum(bq1 - LOCAL - INIT, 0), 0)
        need = gl.minimum(budget - n_forced, n_cand)
        kmax = gl.max(key, 1)
        lo = gl.where(need > 0, gl.min(gl.where(cand, key, 0x7FFFFFFF), 1), kmax + 1)
        hi = kmax + 1
        cnt_lo = gl.where(need > 0, n_cand, 0)
        cnt_hi = cnt_lo * 0
        done = (cnt_lo == need) | (hi - lo <= 1)
        step = 0
        while gl.max(gl.where(done, 0, 1), 0) > 0:
            span = hi - lo
            if step % SEARCH_BISECT == SEARCH_BISECT - 1:
                off_ = span // 2
            else:
                frac = (cnt_lo - need).to(gl.float32) / gl.maximum(cnt_lo - cnt_hi, 1).to(gl.float32)
                frac = gl.minimum(gl.maximum(frac, SEARCH_CLAMP), 1.0 - SEARCH_CLAMP)
                off_ = (span.to(gl.float32) * frac).to(gl.int32)
            mid = lo + gl.minimum(gl.maximum(off_, 1), span - 1)
            ge = key >= gl.expand_dims(mid, 1)
            if step >= SEARCH_TIGHT:
                if FUSE3:
                    cnt, above, below = gl.reduce((ge.to(gl.int32), gl.where(ge, key, 0x7FFFFFFF),
                                                   gl.where(ge, -1, key)), 1, _count_above_below)
                else:
                    cnt = gl.sum(ge.to(gl.int32), 1)
                    above = gl.min(gl.where(ge, key, 0x7FFFFFFF), 1)
                    below = gl.max(gl.where(ge, -1, key), 1)
                up = (cnt >= need) & ~done
                down = (cnt < need) & ~done
                lo = gl.where(up, above, lo)
                hi = gl.where(down, below + 1, hi)
            else:
                cnt = gl.sum(ge.to(gl.int32), 1)
                up = (cnt >= need) & ~done
                down = (cnt < need) & ~done
                lo = gl.where(up, mid, lo)
                hi = gl.where(down, mid, hi)
            cnt_lo = gl.where(up, cnt, cnt_lo)
            cnt_hi = gl.where(down, cnt, cnt_hi)
            done = (cnt_lo == need) | (hi - lo <= 1)
            step += 1
        thr = gl.expand_dims(lo, 1)
        gt = key > thr
        eq = key == thr
        forced = ((b < INIT) | (b >= bq - LOCAL)) & (b <= bq) & tv
        if gl.max(cnt_lo - need, 0) > 0:  # more keys at a threshold than needed: lower block indices first
            rank = gl.associative_scan(eq.to(gl.int32), 1, _add_i32) - 1
            sel = gt | (eq & (rank < gl.expand_dims(need - cnt_hi, 1))) | forced
        else:
            sel = gt | eq | forced
        pos = gl.associative_scan(sel.to(gl.int32), 1, _add_i32) - 1
        orow = out_h + gl.expand_dims((qs + tok).to(gl.int64) * stride_ot, 1)
        gl.store(orow + pos, b + gl.zeros_like(key), mask=sel)
        n_sel = gl.expand_dims(n_forced + gl.maximum(need, 0), 1)
        gl.store(orow + b, gl.full_like(key, -1), mask=(b >= n_sel) & (b < budget) & tv)

    @gluon.jit
    def _select_kernel_sm90(ws_ptr, out_ptr, tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
                            stride_wh, stride_wr, stride_oh, stride_ot, tile_base, budget,
                            BLOCK_T: gl.constexpr, BS: gl.constexpr, NB: gl.constexpr, WPR: gl.constexpr,
                            LOCAL: gl.constexpr, INIT: gl.constexpr, SEARCH_BISECT: gl.constexpr,
                            SEARCH_CLAMP: gl.constexpr, SEARCH_TIGHT: gl.constexpr, FUSE3: gl.constexpr = True):
        """One program per (NW / WPR rows of a query tile of the chunk, KV head)."""
        NW: gl.constexpr = gl.num_warps()
        RPP: gl.constexpr = NW // WPR
        PPT: gl.constexpr = (BLOCK_T + RPP - 1) // RPP  # programs a tile
        lt = gl.program_id(0) // PPT
        r0 = (gl.program_id(0) % PPT) * RPP
        h = gl.program_id(1)
        tile = tile_base + lt
        seq = gl.load(tile_seq_ptr + tile)
        off = gl.load(tile_off_ptr + tile)
        ws_tile = ws_ptr + h * stride_wh + (lt * BLOCK_T).to(gl.int64) * stride_wr
        _select_rows(ws_tile, out_ptr + h * stride_oh, stride_wr, stride_ot, r0, gl.load(q_start_ptr + seq), off,
                     gl.load(q_len_ptr + seq), gl.load(k_len_ptr + seq), budget, BLOCK_T, BS, NB, NW, WPR, LOCAL,
                     INIT, SEARCH_BISECT, SEARCH_CLAMP, SEARCH_TIGHT, FUSE3)


def select_sm90_supported(ws: torch.Tensor, decode: bool) -> bool:
    """Whether ``select_blocks_sm90`` can run (else the Triton top-k kernel does): prefill on an sm90 GPU."""
    return not decode and on_sm90(ws)


def select_blocks_sm90(ws, out, tile_seq, tile_off, q_start, q_len, k_len, tile_base: int, n_tiles: int,
                       budget: int, nb: int, block_t: int, block_size: int, local_blocks: int, init_blocks: int,
                       search=(4, 0.2, 6), launch=None):
    """Launch the sm90 top-k on one chunk of ``n_tiles`` query tiles (tiles ``tile_base ..``; the arguments of the
    Triton kernel's prefill launch in ``selection._select_core``): ``ws`` (Hkv, rows, nb_ws) fp32 pooled scores,
    row ``i * block_t + r`` for token r of the chunk's tile i; ``out`` (Hkv, total_q, budget) int32; rows of ``nb``
    blocks (a power of two); ``search``: ``selection._TOPK_SEARCH``; ``launch``: (warps, warps a row[, a tight step's
    three reductions as one])."""
    nw, wpr, fuse3 = (tuple(launch or _LAUNCH) + (True,))[:3]
    if nw not in (1, 2, 4, 8) or wpr not in (1, 2, 4, 8) or nw % wpr:
        raise ValueError(f"select_blocks_sm90: launch must be (warps, warps a row) with warps a multiple of warps a "
                         f"row, both in 1, 2, 4, 8; got {launch}")
    nb = max(nb, 32 * wpr, 1 << max(0, budget - 1).bit_length())
    if nb & (nb - 1):
        raise ValueError(f"select_blocks_sm90: nb must be a power of two, got {nb}")
    rpp = nw // wpr
    _select_kernel_sm90[(n_tiles * -(-block_t // rpp), ws.shape[0])](
        ws, out, tile_seq, tile_off, q_start, q_len, k_len, ws.stride(0), ws.stride(1), out.stride(0), out.stride(1),
        tile_base, budget, BLOCK_T=block_t, BS=block_size, NB=nb, WPR=wpr, LOCAL=local_blocks, INIT=init_blocks,
        SEARCH_BISECT=search[0], SEARCH_CLAMP=search[1], SEARCH_TIGHT=search[2], FUSE3=bool(fuse3), num_warps=nw)
