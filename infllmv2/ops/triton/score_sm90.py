"""Stage-1 scoring kernel for Hopper (sm90) in Gluon, Triton's explicit-layout dialect.

It computes exactly what ``selection._score_kernel`` computes for prefill (one tile of query tokens x the G
heads of one KV head, every candidate fine window: probabilities summed over the group and max-pooled onto key
blocks, written to the block-score workspace), with the same selections, but lays the work out by hand:

* one window tile a loop step through a single TMA slot: 122 registers and 49 KB of shared memory, so four
  programs an SM, which hide each other's loads and exponentials (the kernel is latency-bound). The twelfth
  session's pairs of tiles (the second tile's product issued before the first tile's exponentials, within one
  loop iteration: ptxas serialises every MMA when a product stays in flight across the loop's back edge, message
  C7514) remain behind ``_PAIRS``: 184 registers, two programs an SM, 8.40 against 7.16 ms at 128K;
* the pooling shift (a block also takes the last window of the block before it, which another warp holds)
  goes through one layout conversion to a layout with all blocks of a token in one warp, where the shift is a
  shuffle: about 4 block-wide barriers a tile instead of 8, and 327 instructions instead of 507.

H200, identical selections (``python3 benchmarks/dev_selection.py --flag-ab SCORE_SM90.enabled=True,False``): scoring
10.45 -> 8.65 ms at 128K, 2.55 -> 2.21 ms at 64K, equal at 32K, 12.9 -> 9.5 ms for Hkv 8 / d 64
(benchmarks/README.md, "Twelfth session", with pairs); one tile a step at four programs an SM then took the
128K scoring from 8.40 to 7.16 ms and 64K from 2.15 to 1.75 ms (interleaved, "Fifteenth session").

``_score_kernel_sm90_ws`` (``WS_TILES``, for groups of 16 padded heads or more at d 128) is a warp-specialised form:
four query tiles a program, one consumer warpgroup each, sharing one stream of key tiles (see its comment and
``_WS_MIN_GP``).

Gluon has no CPU interpreter, so this kernel runs on sm90 GPUs only; ``selection._select_core`` uses the Triton
kernel everywhere else (CPU interpreter, decoding, fp32, d other than 64 / 128, other GPUs), and the GPU tests
compare the two on the same inputs.
"""
from __future__ import annotations

import torch
import triton

from .gluon_support import HAVE_GLUON, TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, on_sm90
from .gluon_support import cta_barrier as _cta_barrier
from .gluon_support import tma_load as _tma_load
from .gluon_support import warpgroup_mma, warpgroup_mma_wait

_BLOCK_N = 64  # fine windows per MMA tile (the MMA's M)
_ROWS = 128  # query rows per warpgroup (tokens x padded heads, the MMA's N)
# One window tile a loop step, and one TMA slot: 122 registers and 49 KB of shared memory (Triton 3.6), so four
# programs an SM, whose pooling hides each other's loads. Measured on the H200 (128K, `local`, scoring kernel,
# interleaved): pairs of tiles with 2 slots (184 registers, two programs an SM) 8.40 ms; one tile, 2 slots (three
# programs) 7.99; one tile, 1 slot (four) 7.16; one tile, 3 slots 9.13 (64K: 2.15 / 1.99 / 1.75 / 2.30 ms).
# _PAIRS: the second tile's product is issued beside the first's exponentials; it needs _STAGES >= 2.
_STAGES = 1
_PAIRS = False
# The warp-specialised variant (_score_kernel_sm90_ws): 4 query tiles a program (0: off), for groups of at least
# _WS_MIN_GP padded heads at head dim 128, the only shape where it won. H200, interleaved, identical selections
# (benchmarks/README.md, "Twenty-second session"), selection at 128K, 32 query heads: G 16 / d 128 11.55 -> 11.32 ms
# (`local`), 11.88 -> 11.53 (`random`), 64K equal; lost at G 16 / d 64 9.03 -> 9.14, G 8 / d 128 13.95 -> 14.10,
# G 4 / d 128 19.10 -> 19.91, G 8 / d 64 11.23 -> 11.94, G 4 / d 64 16.50 -> 17.65: with d 64 a key tile is half the
# bytes, so sharing it saves less, and tiles of fewer heads hold more tokens, whose pooling the consumers spill.
WS_TILES = 4
_WS_MIN_GP = 16
_WS_HEAD_DIMS = (128,)
_WS_STAGES = 4
_WS_CONSUMER_REGS = 112
_WS_MAXNREG = 96  # 20 warps x 32 x 96 = 61440 registers at launch; setmaxnreg: 4 x 128 x 112 + 128 x 32


if HAVE_GLUON:
    @gluon.jit
    def _pool_layout(BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, R: gl.constexpr):
        """A (block, token) tensor in the layout the pooled scores are stored from (for its ``.type.layout``):
        all NBT blocks of a token in one warp, as ``_pool_tile`` converts them."""
        NBT: gl.constexpr = BLOCK_N // R
        wl3: gl.constexpr = gl.BlockedLayout([1, 1, 2], [NBT, 32 // NBT, 1], [1, 4, 1], [2, 0, 1])
        return gl.split(gl.zeros([NBT, BLOCK_T, 2], gl.float32, layout=wl3))[0]

    @gluon.jit
    def _pool_tile(s, j0, lse_c, wlast, carry, ws_h, slot0, stride_wr, n_tok, b_lim, qk_scale,
                   GP: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr,
                   R: gl.constexpr, L: gl.constexpr):
        """One window tile's products ``s`` (BLOCK_N windows x GP * BLOCK_T columns, column head x BLOCK_T +
        token): probabilities, the group sum over the heads, the visibility mask, max pooling onto blocks
        (with the previous tile's tail in ``carry``) and the store of tokens < n_tok, blocks < b_lim; returns
        the new carry."""
        NBT: gl.constexpr = BLOCK_N // R
        # columns of heads that do not exist have lse = +inf: their probabilities are 0 without a mask
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse_c, 0))
        sg = gl.sum(gl.reshape(p, [BLOCK_N, GP, BLOCK_T]), 1)  # group sum, inside each thread
        jl: gl.constexpr = gl.SliceLayout(1, sg.type.layout)
        j = j0 + gl.arange(0, BLOCK_N, layout=jl)
        sg = gl.where(gl.expand_dims(j, 1) <= gl.expand_dims(wlast, 0), sg, 0.0)
        s3 = gl.reshape(sg, [NBT, R, BLOCK_T])
        pooled = gl.max(s3, 1)  # windows [bR, bR + R) of block b
        # windows [bR - L + 1, bR): the tail of the previous block, which may sit in another warp; one layout
        # conversion (one shared-memory round trip) puts all blocks of a token in one warp, where the shift by
        # one block is a shuffle
        rl: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, s3.type.layout))
        tail_sel = gl.arange(0, R, layout=rl) >= R - (L - 1)
        tail = gl.max(gl.where(gl.expand_dims(gl.expand_dims(tail_sel, 0), 2), s3, 0.0), 1)
        # (the layout of _pool_layout: 4 warps, NBT divides 32)
        wl3: gl.constexpr = gl.BlockedLayout([1, 1, 2], [NBT, 32 // NBT, 1], [1, 4, 1], [2, 0, 1])
        pooled, tail = gl.split(gl.convert_layout(gl.join(pooled, tail), wl3))
        pl: gl.constexpr = pooled.type.layout
        col = gl.arange(0, NBT, layout=gl.SliceLayout(1, pl))
        if L > 1:
            shift = gl.expand_dims(gl.maximum(col - 1, 0), 1) + gl.zeros([NBT, BLOCK_T], gl.int32, layout=pl)
            prev = gl.gather(tail, shift, 0)
            prev = gl.where(gl.expand_dims(col, 1) == 0, gl.expand_dims(carry, 0), prev)
            pooled = gl.maximum(pooled, prev)
            carry = gl.max(gl.where(gl.expand_dims(col, 1) == NBT - 1, tail, 0.0), 0)
        tt = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, pl))
        b = j0 // R + col
        gl.store(ws_h + gl.expand_dims((slot0 + tt).to(gl.int64) * stride_wr, 0) + gl.expand_dims(b, 1), pooled,
                 mask=gl.expand_dims(b < b_lim, 1) & gl.expand_dims(tt < n_tok, 0))
        return carry

    @gluon.jit
    def load_query_rows(q_ptr, qs, ql, off, h, row0, stride_qt, stride_qh, G: gl.constexpr, BLOCK_T: gl.constexpr,
                        M: gl.constexpr, D: gl.constexpr, WARPS: gl.constexpr):
        """Rows [row0, row0 + M) of a stage-1 query tile of KV head h (row = head x BLOCK_T + token; the tokens
        start at ``off`` in a sequence whose ``ql`` queries start at row ``qs`` of q), zeros for padded heads and
        tokens past the sequence, in a blocked layout over WARPS warps. Shared by this kernel and lse_sm90.py."""
        TPW_D: gl.constexpr = D // 8 if D // 8 < 32 else 32
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [WARPS, 1], [1, 0])
        rows = row0 + gl.arange(0, M, layout=gl.SliceLayout(1, q_l))
        tok = off + rows % BLOCK_T
        g = rows // BLOCK_T
        rvalid = (tok < ql) & (g < G)
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_l))
        return gl.load(q_ptr + gl.expand_dims((qs + tok).to(gl.int64) * stride_qt + (h * G + g) * stride_qh, 1)
                       + gl.expand_dims(offs_d, 0), mask=gl.expand_dims(rvalid, 1), other=0.0)

    @gluon.jit
    def _tile_prologue(q_ptr, lse_ptr, q_smem, qs, ql, kl, off, c1n, h, stride_qt, stride_qh, stride_lt,
                       G: gl.constexpr, GP: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr,
                       BLOCK_N: gl.constexpr, KS1: gl.constexpr, ST1: gl.constexpr, R: gl.constexpr):
        """What one query tile's window loop needs (the tile's BLOCK_T tokens from ``off`` in a sequence of ``ql``
        queries from row ``qs`` and ``kl`` keys, ``c1n`` fine keys; KV head h): the query tile stored in ``q_smem``
        as the MMA's B operand, each column's log-sum-exp, each token's last visible window and a zero pooling
        carry. Returns (B operand, lse per column, last window per token, carry)."""
        M: gl.constexpr = GP * BLOCK_T
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M, 16])
        # the query tile (rows head x BLOCK_T + token), through shared memory as the MMA's B operand
        q = load_query_rows(q_ptr, qs, ql, off, h, 0, stride_qt, stride_qh, G, BLOCK_T, M, D, 4)
        q_smem.store(q)
        fence_async_shared()
        _cta_barrier()
        q_op = q_smem.permute((1, 0))

        # per column: log-sum-exp (+inf for padded heads, 0 for rows that see nothing)
        cl: gl.constexpr = gl.SliceLayout(0, mma_l)
        cols = gl.arange(0, M, layout=cl)
        ctok = off + cols % BLOCK_T
        cg = cols // BLOCK_T
        cvalid = (ctok < ql) & (cg < G)
        part = gl.load(lse_ptr + (qs + ctok).to(gl.int64) * stride_lt + h * G + cg, mask=cvalid, other=float("inf"))
        lse_c = gl.where(part == float("-inf"), 0.0, part)

        # per token: last visible window (-1: none), in the layout of the group sums
        sg0 = gl.sum(gl.reshape(gl.zeros([BLOCK_N, M], gl.float32, layout=mma_l), [BLOCK_N, GP, BLOCK_T]), 1)
        tl_: gl.constexpr = gl.SliceLayout(0, sg0.type.layout)
        tt = gl.arange(0, BLOCK_T, layout=tl_)
        ttok = off + tt
        tvalid0 = ttok < ql
        tpos = kl - ql + ttok
        wlast = gl.where(tpos + 1 >= KS1, (tpos + 1 - KS1) // ST1, -1)
        wlast = gl.where(tvalid0, gl.minimum(wlast, c1n - 1), -1)
        pool_l: gl.constexpr = _pool_layout(BLOCK_N, BLOCK_T, R).type.layout
        carry = gl.zeros([BLOCK_T], gl.float32, layout=gl.SliceLayout(0, pool_l))
        return q_op, lse_c, wlast, carry

    @gluon.jit
    def _refill(k_desc, k_smem, bars, i, n_it, c1s, h, BLOCK_N: gl.constexpr, D: gl.constexpr,
                STAGES: gl.constexpr):
        """Tile i's product is done: load tile i + STAGES into its slot. The barrier first: each warp's wait covers
        only its own slice of the warpgroup's product (its quarter of the SM's tensor cores), so another warp may
        still be reading the slot."""
        _cta_barrier()
        if i + STAGES < n_it:
            slot = i % STAGES
            mbarrier.expect(bars.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [c1s + (i + STAGES) * BLOCK_N, h * D], bars.index(slot), k_smem.index(slot))

    @gluon.jit(do_not_specialize=["stride_lt", "tile_base", "n_tiles", "nb_ws"])
    def _score_kernel_sm90(q_ptr, k_desc, lse_ptr, ws_ptr,
                           tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr, c1_start_ptr, c1_len_ptr,
                           stride_qt, stride_qh, stride_lt, stride_wh, stride_wr, tile_base, n_tiles, nb_ws,
                           qk_scale,
                           G: gl.constexpr, GP: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr,
                           KS1: gl.constexpr, ST1: gl.constexpr, R: gl.constexpr, L: gl.constexpr,
                           BS: gl.constexpr, LOCAL: gl.constexpr, INIT: gl.constexpr, STAGES: gl.constexpr,
                           PAIRS: gl.constexpr, GROUP: gl.constexpr = 0):
        """GROUP > 0: only the tiles the warp-specialised kernel leaves out (``_score_kernel_sm90_ws`` with GROUP
        tiles a program: those of another sequence than their group's first tile)."""
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        M: gl.constexpr = GP * BLOCK_T
        lt = n_tiles - 1 - gl.program_id(0)  # heaviest (latest) tiles first
        tile = tile_base + lt
        h = gl.program_id(1)
        seq = gl.load(tile_seq_ptr + tile)
        mine = True
        if GROUP > 0:
            mine = gl.load(tile_seq_ptr + tile_base + (lt // GROUP) * GROUP) != seq
        off = gl.load(tile_off_ptr + tile)
        qs = gl.load(q_start_ptr + seq)
        ql = gl.load(q_len_ptr + seq)
        kl = gl.load(k_len_ptr + seq)
        c1s = gl.load(c1_start_ptr + seq)
        c1n = gl.load(c1_len_ptr + seq)
        t_max = kl - ql + gl.minimum(off + BLOCK_T, ql) - 1
        nbc = t_max // BS - LOCAL  # candidate blocks [INIT, nbc): windows j < nbc * R
        if (nbc > INIT) & mine:
            mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, M, 16])
            q_smem = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [M, D],
                                               gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                                    rank=2))
            q_op, lse_c, wlast, carry = _tile_prologue(q_ptr, lse_ptr, q_smem, qs, ql, kl, off, c1n, h, stride_qt,
                                                       stride_qh, stride_lt, G, GP, BLOCK_T, D, BLOCK_N, KS1, ST1, R)
            ws_h = ws_ptr + h * stride_wh
            n_tok = ql - off

            # window tiles through a STAGES-deep TMA ring
            j_end = nbc * R
            n_it = gl.cdiv(j_end, BLOCK_N)
            k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
            bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for s in gl.static_range(STAGES):
                mbarrier.init(bars.index(s), count=1)
            for s in gl.static_range(STAGES):
                if s < n_it:
                    mbarrier.expect(bars.index(s), k_desc.block_type.nbytes)
                    _tma_load(k_desc, [c1s + s * BLOCK_N, h * D], bars.index(s), k_smem.index(s))
            # Pairs of tiles: tile i0 + 1's product is issued before tile i0's exponentials and runs beside them.
            # Each product starts from a constant zero tile (no accumulator input, so no register copies) and
            # is waited for within the iteration: a product in flight across the loop's back edge, or a copy of
            # an accumulator in flight, makes ptxas serialise every MMA (C7514). With an odd count the pair's
            # second product reads the last tile's slot again and its scores are masked off the store.
            b_lim = gl.minimum(nb_ws, nbc)
            zero = gl.zeros([BLOCK_N, M], gl.float32, layout=mma_l)
            if not PAIRS:  # one tile a step: fewer registers, more programs an SM (see _PAIRS)
                for i in range(0, n_it):
                    mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
                    acc = warpgroup_mma(k_smem.index(i % STAGES), q_op, zero, use_acc=False, is_async=True)
                    s_i = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    _refill(k_desc, k_smem, bars, i, n_it, c1s, h, BLOCK_N, D, STAGES)
                    carry = _pool_tile(s_i, i * BLOCK_N, lse_c, wlast, carry, ws_h, lt * BLOCK_T, stride_wr, n_tok,
                                       b_lim, qk_scale, GP, BLOCK_T, BLOCK_N, R, L)
            for i0 in range(0, n_it if PAIRS else 0, 2):
                mbarrier.wait(bars.index(i0 % STAGES), (i0 // STAGES) & 1)
                acc0 = warpgroup_mma(k_smem.index(i0 % STAGES), q_op, zero, use_acc=False, is_async=True)
                i1 = i0 + 1
                if i1 < n_it:
                    mbarrier.wait(bars.index(i1 % STAGES), (i1 // STAGES) & 1)
                acc1 = warpgroup_mma(k_smem.index(gl.minimum(i1, n_it - 1) % STAGES), q_op, zero, use_acc=False,
                                     is_async=True)
                s0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
                _refill(k_desc, k_smem, bars, i0, n_it, c1s, h, BLOCK_N, D, STAGES)
                carry = _pool_tile(s0, i0 * BLOCK_N, lse_c, wlast, carry, ws_h, lt * BLOCK_T, stride_wr, n_tok, b_lim,
                                   qk_scale, GP, BLOCK_T, BLOCK_N, R, L)
                s1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc1, ))
                _refill(k_desc, k_smem, bars, i1, n_it, c1s, h, BLOCK_N, D, STAGES)
                carry = _pool_tile(s1, i1 * BLOCK_N, lse_c, wlast, carry, ws_h, lt * BLOCK_T, stride_wr, n_tok, b_lim,
                                   qk_scale, GP, BLOCK_T, BLOCK_N, R, L)
            for s in gl.static_range(STAGES):
                mbarrier.invalidate(bars.index(s))


    # ---------------------------------------------------------------------------------------------------------------
    # Warp-specialised variant (``WS_TILES`` = 4, used for GP >= ``_WS_MIN_GP``; twenty-first / second sessions): one
    # program serves four consecutive query tiles of one sequence, one consumer warpgroup each, and a producer
    # warpgroup streams the fine-key window tiles once through a ring of ``_WS_STAGES`` slots for all four, where the
    # kernel above loads them once a tile. That is a quarter of the K traffic into shared memory and a ring deep enough
    # to hide the loads, at the same four warpgroups an SM: four consumers of ``_WS_CONSUMER_REGS`` = 112 registers
    # (no spill at G 16; 48 B at G 4, whose tiles hold 32 tokens) and a producer of 32. A consumer releases a slot
    # through the slot's ``empty`` barrier once its product is done, before its exponentials, and a consumer whose
    # tile sees fewer windows still waits for each slot and releases it, which keeps the four within ``_WS_STAGES``
    # tiles of each other. Tiles of another sequence than their group's first tile (at most three at each sequence's
    # start) are left to the kernel above (``GROUP``), so the four always share their keys.
    # ---------------------------------------------------------------------------------------------------------------

    @gluon.jit
    def _ws_tile_windows(tile, t_end, seq, tile_seq_ptr, tile_off_ptr, q_len_ptr, k_len_ptr,
                         BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, R: gl.constexpr, BS: gl.constexpr,
                         LOCAL: gl.constexpr, INIT: gl.constexpr):
        """(the tile's first token, its candidate blocks' end nbc, the window tiles it scores): 0 tiles for a tile
        past ``t_end`` or of another sequence than ``seq``."""
        tile_c = gl.minimum(tile, t_end - 1)
        off = gl.load(tile_off_ptr + tile_c)
        ql = gl.load(q_len_ptr + seq)
        kl = gl.load(k_len_ptr + seq)
        nbc = (kl - ql + gl.minimum(off + BLOCK_T, ql) - 1) // BS - LOCAL
        ok = (tile < t_end) & (gl.load(tile_seq_ptr + tile_c) == seq) & (nbc > INIT)
        return off, nbc, gl.where(ok, gl.cdiv(nbc * R, BLOCK_N), 0)

    @gluon.jit
    def _ws_score_producer(args, G: gl.constexpr, GP: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr,
                           KS1: gl.constexpr, ST1: gl.constexpr, R: gl.constexpr, L: gl.constexpr,
                           BS: gl.constexpr, LOCAL: gl.constexpr, INIT: gl.constexpr):
        (q_ptr, k_desc, lse_ptr, ws_ptr, q_smem, k_smem, kbar, empty, tile_seq_ptr, tile_off_ptr, q_start_ptr,
         q_len_ptr, k_len_ptr, c1_start_ptr, c1_len_ptr, stride_qt, stride_qh, stride_lt, stride_wh, stride_wr,
         tile_base, t0, t_end, seq, h, n_it_max, nb_ws, qk_scale) = args
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        c1s = gl.load(c1_start_ptr + seq)
        for i in range(0, n_it_max):
            slot = i % STAGES
            # a slot is free once every consumer released its previous tile (a fresh barrier passes parity 1)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(kbar.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [c1s + i * BLOCK_N, h * D], kbar.index(slot), k_smem.index(slot))

    @gluon.jit
    def _ws_score_consumer(args, G: gl.constexpr, GP: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr,
                           KS1: gl.constexpr, ST1: gl.constexpr, R: gl.constexpr, L: gl.constexpr,
                           BS: gl.constexpr, LOCAL: gl.constexpr, INIT: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup WG: query tile t0 + WG of the program's group. (FlashAttention-3's ping-pong order of
        the consumers' products, by a ring of ``turn`` barriers, lost: 11.63 -> 11.81 ms at 128K, H200.)"""
        (q_ptr, k_desc, lse_ptr, ws_ptr, q_smem, k_smem, kbar, empty, tile_seq_ptr, tile_off_ptr, q_start_ptr,
         q_len_ptr, k_len_ptr, c1_start_ptr, c1_len_ptr, stride_qt, stride_qh, stride_lt, stride_wh, stride_wr,
         tile_base, t0, t_end, seq, h, n_it_max, nb_ws, qk_scale) = args
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        M: gl.constexpr = GP * BLOCK_T
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M, 16])
        tile = t0 + WG
        off, nbc, n_it = _ws_tile_windows(tile, t_end, seq, tile_seq_ptr, tile_off_ptr, q_len_ptr, k_len_ptr, BLOCK_T,
                                     BLOCK_N, R, BS, LOCAL, INIT)
        qs = gl.load(q_start_ptr + seq)
        ql = gl.load(q_len_ptr + seq)
        kl = gl.load(k_len_ptr + seq)
        c1n = gl.load(c1_len_ptr + seq)
        q_op, lse_c, wlast, carry = _tile_prologue(q_ptr, lse_ptr, q_smem.index(WG), qs, ql, kl, off, c1n, h,
                                                   stride_qt, stride_qh, stride_lt, G, GP, BLOCK_T, D, BLOCK_N, KS1,
                                                   ST1, R)
        ws_h = ws_ptr + h * stride_wh
        n_tok = ql - off
        b_lim = gl.minimum(nb_ws, nbc)
        zero = gl.zeros([BLOCK_N, M], gl.float32, layout=mma_l)
        for i in range(0, n_it_max):
            slot = i % STAGES
            mbarrier.wait(kbar.index(slot), (i // STAGES) & 1)
            if i < n_it:
                acc = warpgroup_mma(k_smem.index(slot), q_op, zero, use_acc=False, is_async=True)
                s_i = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                # every warp's slice of the product is done before the slot is released
                _cta_barrier()
                mbarrier.arrive(empty.index(slot), count=1)
                carry = _pool_tile(s_i, i * BLOCK_N, lse_c, wlast, carry, ws_h, (tile - tile_base) * BLOCK_T,
                                   stride_wr, n_tok, b_lim, qk_scale, GP, BLOCK_T, BLOCK_N, R, L)
            else:
                mbarrier.arrive(empty.index(slot), count=1)

    @gluon.jit(do_not_specialize=["stride_lt", "tile_base", "n_tiles", "nb_ws"])
    def _score_kernel_sm90_ws(q_ptr, k_desc, lse_ptr, ws_ptr,
                              tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr, c1_start_ptr,
                              c1_len_ptr, stride_qt, stride_qh, stride_lt, stride_wh, stride_wr, tile_base, n_tiles,
                              nb_ws, qk_scale,
                              G: gl.constexpr, GP: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr,
                              KS1: gl.constexpr, ST1: gl.constexpr, R: gl.constexpr, L: gl.constexpr,
                              BS: gl.constexpr, LOCAL: gl.constexpr, INIT: gl.constexpr, STAGES: gl.constexpr,
                              CONSUMER_REGS: gl.constexpr):
        """One program per group of four query tiles of the chunk [tile_base, tile_base + n_tiles) (groups from
        tile_base on, the latest first) and KV head; see the comment above."""
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        M: gl.constexpr = GP * BLOCK_T
        grp = gl.cdiv(n_tiles, 4) - 1 - gl.program_id(0)  # heaviest (latest) groups first
        h = gl.program_id(1)
        t0 = tile_base + grp * 4
        t_end = tile_base + n_tiles
        seq = gl.load(tile_seq_ptr + t0)
        # the group's window tiles: its last tile of the sequence sees the most
        n_it_max = 0
        for c in gl.static_range(4):
            _, _, n_c = _ws_tile_windows(t0 + c, t_end, seq, tile_seq_ptr, tile_off_ptr, q_len_ptr, k_len_ptr, BLOCK_T,
                                      BLOCK_N, R, BS, LOCAL, INIT)
            n_it_max = gl.maximum(n_it_max, n_c)
        dt: gl.constexpr = q_ptr.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dt, [4, M, D], gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                                                element_bitwidth=16, rank=2))
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
        kbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(kbar.index(st), count=1)
            mbarrier.init(empty.index(st), count=4)
        args = (q_ptr, k_desc, lse_ptr, ws_ptr, q_smem, k_smem, kbar, empty, tile_seq_ptr, tile_off_ptr,
                q_start_ptr, q_len_ptr, k_len_ptr, c1_start_ptr, c1_len_ptr, stride_qt, stride_qh, stride_lt,
                stride_wh, stride_wr, tile_base, t0, t_end, seq, h, n_it_max, nb_ws, qk_scale)
        # the producer is the default partition (4 warps; one thread issues the copies), as in sparse_fwd_sm90.py
        gl.warp_specialize(
            [(_ws_score_producer, (args, G, GP, BLOCK_T, D, KS1, ST1, R, L, BS, LOCAL, INIT)),
             (_ws_score_consumer, (args, G, GP, BLOCK_T, D, KS1, ST1, R, L, BS, LOCAL, INIT, 0)),
             (_ws_score_consumer, (args, G, GP, BLOCK_T, D, KS1, ST1, R, L, BS, LOCAL, INIT, 1)),
             (_ws_score_consumer, (args, G, GP, BLOCK_T, D, KS1, ST1, R, L, BS, LOCAL, INIT, 2)),
             (_ws_score_consumer, (args, G, GP, BLOCK_T, D, KS1, ST1, R, L, BS, LOCAL, INIT, 3))],
            [4, 4, 4, 4], [CONSUMER_REGS] * 4)


def score_sm90_supported(q: torch.Tensor, k1: torch.Tensor, gp: int, r: int, l: int, decode: bool) -> bool:
    """Whether ``score_blocks_sm90`` can run on these inputs (else the Triton scoring kernel does): query tiles
    of ``128 / gp`` tokens (128 rows), and fine keys to describe (a TMA descriptor has no empty dimension)."""
    return (not decode and on_sm90(q) and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and k1.shape[0] > 0
            # G < 3 means 64-128 tokens a tile and 242+ registers: the Triton kernel takes those
            and 4 <= gp <= _ROWS and r >= 2 and _BLOCK_N % r == 0 and 1 <= l <= r + 1)


def score_blocks_sm90(q, k1, lse, ws, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len,
                      tile_base: int, n_tiles: int, nb_ws: int, qk_scale: float, g: int, gp: int, block_t: int,
                      kernel_size: int, kernel_stride: int, r: int, l: int, block_size: int, local_blocks: int,
                      init_blocks: int, one_sequence: bool = False):
    """Launch the sm90 scoring kernel on one chunk of query tiles (the arguments of the Triton kernel's prefill
    launch in ``selection._select_core``). The fine keys ``k1`` (rows, Hkv, d) are read through a TMA descriptor
    over their (rows, Hkv * d) view, one 64-window tile of one head at a time; tiles past the end read zeros.
    With ``WS_TILES`` (and ``gp >= _WS_MIN_GP``, ``d in _WS_HEAD_DIMS``) the warp-specialised kernel scores the
    chunk in groups of four tiles from ``tile_base`` on, and the one-tile kernel the tiles whose group starts in
    another sequence (none when the caller knows the tiles are of ``one_sequence``)."""
    if _PAIRS and _STAGES < 2:
        raise ValueError(f"score_sm90._PAIRS needs _STAGES >= 2 (two tiles in flight), got _STAGES={_STAGES}")
    hkv, d = k1.shape[1], k1.shape[2]
    k2d = k1.reshape(k1.shape[0], hkv * d)
    if k2d.stride(1) != 1 or k2d.stride(0) != hkv * d:
        k2d = k2d.contiguous()
    el = gl.bfloat16 if k1.dtype == torch.bfloat16 else gl.float16
    lay = gl.NVMMASharedLayout.get_default_for([_BLOCK_N, d], el)
    k_desc = TensorDescriptor(k2d, list(k2d.shape), list(k2d.stride()), [_BLOCK_N, d], lay)
    args = (q, k_desc, lse, ws, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len,
            q.stride(0), q.stride(1), lse.stride(1), ws.stride(0), ws.stride(1), tile_base, n_tiles, nb_ws, qk_scale)
    consts = dict(G=g, GP=gp, BLOCK_T=block_t, D=d, KS1=kernel_size, ST1=kernel_stride, R=r, L=l, BS=block_size,
                  LOCAL=local_blocks, INIT=init_blocks)
    if WS_TILES not in (0, 4):
        raise ValueError(f"score_sm90.WS_TILES: 0 (off) or 4 tiles a program, got {WS_TILES}")
    grouped = WS_TILES and gp >= _WS_MIN_GP and d in _WS_HEAD_DIMS
    if grouped:
        _score_kernel_sm90_ws[(triton.cdiv(n_tiles, 4), hkv)](
            *args, **consts, STAGES=_WS_STAGES, CONSUMER_REGS=_WS_CONSUMER_REGS, num_warps=4,
            maxnreg=_WS_MAXNREG)
        if one_sequence:
            return
    _score_kernel_sm90[(n_tiles, hkv)](*args, **consts, STAGES=_STAGES, PAIRS=_PAIRS, GROUP=4 if grouped else 0,
                                       num_warps=4)
