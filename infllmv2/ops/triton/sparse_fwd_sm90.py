"""Stage-2 sparse attention forward for Hopper (sm90) in Gluon, Triton's explicit-layout dialect.

It computes what ``sparse_attention._sparse_fwd_kernel`` computes, in the same order (one program per (tile of T
tokens, KV head), 64 rows = the G heads of the T tokens, a loop over the union of the blocks the tile's tokens
selected, rows that did not select a block masked by a per-row -inf bias, causality on blocks that reach past the
tile's first token), so the outputs are the same, but lays the work out by hand:

* the query tile stays in registers as the left operand of ``Q K^T`` (Triton puts it in shared memory), so the
  64 x 64 product reads only K from shared memory;
* a ring of two K / V slots (TMA, separate barriers for K and V) instead of three.

That makes 72 KB of shared memory and 156 registers at d 128: three programs (12 warps) an SM instead of two. The
kernel is latency-bound (each step waits for its two products, and no pipe is saturated), so the third program is
what pays. H200, identical outputs, interleaved (``python3 benchmarks/dev_sparse_attention.py --fwd-variants ...``,
benchmarks/README.md, "Thirteenth session"): 128K ``local`` 36.2 -> 33.9 ms, ``random`` 73.1 -> 69.7 ms, 64K 16.7 ->
16.0 / 30.9 -> 29.1 ms. Lost there (NOTES_sparse_attention.md): FlashAttention-3's paired-block overlap of the
products with the softmaxes, ``P V`` left in flight across the loop's back edge (ptxas then serialises every MMA,
message C7514), the K slot reloaded right after its ``Q K^T``, and four programs an SM with Q in shared memory.

A slot is reloaded only after a CTA barrier: a warp's ``warpgroup_mma_wait`` covers its own slice of the product,
so without the barrier one warp's TMA could overwrite a slot another warp's slice still reads. At d 64 Q is read
from shared memory: Triton 3.6 miscompiles the register operand there (the loop reuses Q's registers for the row max
and P, NOTES_sparse_attention.md).

``_sparse_fwd_kernel_sm90_ws`` (d 128, the default there) is the warp-specialised form of the same loop: three such
tiles a program, one K / V stream over the union of their blocks (see its comment).

Gluon has no CPU interpreter, so these kernels run on sm90 GPUs only; ``sparse_attention._forward`` uses the Triton
kernel everywhere else, and the GPU tests compare each with it on the same inputs.
"""
from __future__ import annotations

import torch

from .gluon_support import HAVE_GLUON, TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, on_sm90
from .gluon_support import cta_barrier as _cta_barrier
from .gluon_support import tma_load as _tma_load
from .gluon_support import warpgroup_mma, warpgroup_mma_wait

_BLOCK_M = 64  # rows per program: one warpgroup's MMA M
# Launch settings per head dim: ring slots, the K slot reloaded right after its Q K^T (a second barrier a step),
# Q as a register operand. d 128: Q in registers and two slots (2 x (K + V) = 64 KB, 156 registers: three programs
# an SM). d 64 reads Q from shared memory (Triton 3.6 miscompiles the register operand there: see the docstring).
_SETTINGS = {128: dict(STAGES=2, EARLY_K=False, Q_REGS=True), 64: dict(STAGES=2, EARLY_K=False, Q_REGS=False)}
# The warp-specialised forward (d 128; at d 64 with G 3 it lost to the forward above, 8.3 against 5.2 ms at 64K):
# _WS_TILES consumer warpgroups of CONSUMER_REGS registers and a producer warpgroup share one program, one program an
# SM. The launch caps registers at _WS_MAXNREG (four warpgroups x 128 fill the SM's 64K registers); setmaxnreg then
# moves the producer's share to the consumers (3 x 160 + 32). STAGES K / V slots of 32 KB: 4 (197 KB with the
# layout-conversion scratch). H200, interleaved, outputs bitwise equal (NOTES_sparse_attention.md, "Sixteenth
# session"): 128K `local` 33.8 -> 32.3 ms, `random` 70.1 -> 66.3; 64K 15.7 -> 14.9 / 28.7 -> 27.8; 32K 7.24 -> 6.65
# / 11.67 -> 10.90, the union of the three tiles built beforehand included. Two consumers a program, three slots and
# Q in shared memory were each slower, and so was merging the three tiles' own unions in the kernel.
_WS_TILES = 3
_WS_SETTINGS = {128: dict(STAGES=4, CONSUMER_REGS=160)}
_WS_MAXNREG = 128
WS_VARIANT = {}  # overrides of _WS_SETTINGS (dev_sparse_attention.py --fwd-variants)
VARIANT = {}  # overrides of the settings, e.g. dict(STAGES=1, maxnreg=128) (dev_sparse_attention.py --fwd-variants)


if HAVE_GLUON:
    @gluon.jit
    def _load_block(desc, smem, bar, ub_ptr, i, cnt, k0, h, D: gl.constexpr, BLOCK_N: gl.constexpr):
        """Union entry i's K (or V) block into ``smem`` (nothing past the union)."""
        if i < cnt:
            blk = gl.load(ub_ptr + i)
            mbarrier.expect(bar, desc.block_type.nbytes)
            _tma_load(desc, [(k0 + blk * BLOCK_N).to(gl.int32), h * D], bar, smem)

    @gluon.jit
    def _softmax_step(s, blk, bits, tok64, pos, pos0, m_i, l_i, scale_log2, BLOCK_N: gl.constexpr):
        """One block's scores ``s`` (raw q . k): the rows whose token did not select it (bit clear in ``bits``)
        get a -inf bias, keys past a row's position -inf on a block that reaches past the tile's first token;
        returns P (fp32), the row rescale factor and the new row max and sum."""
        bias = gl.where(((bits >> tok64) & 1) != 0, 0.0, float("-inf"))
        if (blk + 1) * BLOCK_N > pos0 + 1:
            kpos = blk * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
            s = gl.where(gl.expand_dims(kpos, 0) <= gl.expand_dims(pos, 1), s, float("-inf"))
        # the max of the raw scores, scaled per row (scale > 0): each exponent is one FMA
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale_log2 + bias)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * scale_log2 + gl.expand_dims(bias - m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _load_q_tile(q_ptr, q0, nq, h, stride_qt, stride_qh, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr,
                     BLOCK_M: gl.constexpr):
        """The query tile of the ``nq`` tokens from row ``q0`` and KV head ``h`` (row = token x G + head; rows past
        them read zeros)."""
        TPW_D: gl.constexpr = D // 8 if D // 8 < 32 else 32
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_l))
        tok = rows // G
        row_ok = (rows < T * G) & (tok < nq)
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_l))
        return gl.load(q_ptr + gl.expand_dims((q0 + tok).to(gl.int64) * stride_qt + (h * G + rows % G) * stride_qh, 1)
                       + gl.expand_dims(offs_d, 0), mask=gl.expand_dims(row_ok, 1), other=0.0)

    @gluon.jit
    def _store_tile(acc, m_i, l_i, o_ptr, r_ptr, lse_ptr, q0, nq, h, stride_ot, stride_oh, stride_rt, stride_rh,
                    stride_lse_h, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                    STORE_RESID: gl.constexpr):
        """The epilogue: O = acc / l, lse (natural log; -inf for rows that see nothing) and, for an exact
        delta = rowsum(dO * O) in the backward, the rounding residual of O."""
        o_l: gl.constexpr = acc.type.layout
        orow_l: gl.constexpr = gl.SliceLayout(1, o_l)
        l_o = gl.convert_layout(l_i, orow_l)
        has = l_o > 0.0
        l_safe = gl.where(has, l_o, 1.0)
        out = acc / gl.expand_dims(l_safe, 1)
        orows = gl.arange(0, BLOCK_M, layout=orow_l)
        otok = orows // G
        ohead = h * G + orows % G
        o_ok = (orows < T * G) & (otok < nq)
        oqrow = (q0 + otok).to(gl.int64)
        od = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
        out_lp = out.to(o_ptr.dtype.element_ty)
        omask = gl.expand_dims(o_ok, 1)
        gl.store(o_ptr + gl.expand_dims(oqrow * stride_ot + ohead * stride_oh, 1) + gl.expand_dims(od, 0), out_lp,
                 mask=omask)
        if STORE_RESID:
            gl.store(r_ptr + gl.expand_dims(oqrow * stride_rt + ohead * stride_rh, 1) + gl.expand_dims(od, 0),
                     (out - out_lp.to(gl.float32)).to(o_ptr.dtype.element_ty), mask=omask)
        m_o = gl.convert_layout(m_i, orow_l)
        lse = gl.where(has, (m_o + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(lse_ptr + ohead.to(gl.int64) * stride_lse_h + oqrow, lse, mask=o_ok)

    @gluon.jit(do_not_specialize=["stride_lse_h", "stride_u_h", "stride_u_t", "stride_cnt_h"])
    def _sparse_fwd_kernel_sm90(
        q_ptr, k_desc, v_desc, o_ptr, r_ptr, lse_ptr, ub_ptr, ubits_ptr, ucnt_ptr,
        tile_seq_ptr, tile_q0_ptr, tile_nq_ptr, tile_pos0_ptr, cu_k_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_rt, stride_rh, stride_lse_h, stride_u_h, stride_u_t,
        stride_cnt_h, scale_log2,
        G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr, STAGES: gl.constexpr,
        EARLY_K: gl.constexpr, Q_REGS: gl.constexpr,
    ):
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = 64
        pid_t = gl.program_id(0)
        h = gl.program_id(1)
        seq = gl.load(tile_seq_ptr + pid_t)
        if seq >= 0:
            q0 = gl.load(tile_q0_ptr + pid_t)
            nq = gl.load(tile_nq_ptr + pid_t)
            pos0 = gl.load(tile_pos0_ptr + pid_t)
            k0 = gl.load(cu_k_ptr + seq)
            ubase = h.to(gl.int64) * stride_u_h + pid_t.to(gl.int64) * stride_u_t
            ub_h = ub_ptr + ubase
            ubits_h = ubits_ptr + ubase
            cnt = gl.load(ucnt_ptr + h * stride_cnt_h + pid_t)

            s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BLOCK_N, 16])
            o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, D, 16])
            p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
            dt: gl.constexpr = q_ptr.dtype.element_ty

            # K / V ring, filled before the query tile is read so that the loads overlap it
            k_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, D], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, D], v_desc.layout)
            kbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            vbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for st in gl.static_range(STAGES):
                mbarrier.init(kbar.index(st), count=1)
                mbarrier.init(vbar.index(st), count=1)
            for st in gl.static_range(STAGES):
                _load_block(k_desc, k_smem.index(st), kbar.index(st), ub_h, st, cnt, k0, h, D, BLOCK_N)
                _load_block(v_desc, v_smem.index(st), vbar.index(st), ub_h, st, cnt, k0, h, D, BLOCK_N)

            q = _load_q_tile(q_ptr, q0, nq, h, stride_qt, stride_qh, G, T, D, BLOCK_M)
            if Q_REGS:  # kept in registers as the left operand of Q K^T (see the module docstring)
                q_op = gl.convert_layout(q, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
            else:  # from shared memory (d 64: Triton 3.6 miscompiles the register operand, see the docstring)
                q_op = gl.allocate_shared_memory(dt, [BLOCK_M, D],
                                                 gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                                      rank=2))
                q_op.store(q)
                fence_async_shared()
                _cta_barrier()

            srow_l: gl.constexpr = gl.SliceLayout(1, s_l)
            srows = gl.arange(0, BLOCK_M, layout=srow_l)
            stok = srows // G
            tok64 = stok.to(gl.int64)
            pos = pos0 + stok
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=srow_l)
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=srow_l)
            acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_l)
            zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)

            # One union block a step. Each product is waited for within the step (a product in flight across the loop's
            # back edge makes ptxas serialise every MMA, message C7514); the other programs on the SM fill the wait.
            for i in range(0, cnt):
                slot = i % STAGES
                phase = (i // STAGES) & 1
                if i > 0:
                    # step i - 1's slot is free once every warp has waited for its products (a warp's wait covers
                    # only its own slice of the warpgroup's product): a barrier, then reload the slot
                    _cta_barrier()
                    prev = (i - 1) % STAGES
                    if not EARLY_K:
                        _load_block(k_desc, k_smem.index(prev), kbar.index(prev), ub_h, i - 1 + STAGES, cnt, k0, h,
                                    D, BLOCK_N)
                    _load_block(v_desc, v_smem.index(prev), vbar.index(prev), ub_h, i - 1 + STAGES, cnt, k0, h, D,
                                BLOCK_N)
                blk = gl.load(ub_h + i)
                bits = gl.load(ubits_h + i)
                mbarrier.wait(kbar.index(slot), phase)
                s_t = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, ))
                if EARLY_K:  # a second barrier reloads the K slot a step earlier
                    _cta_barrier()
                    _load_block(k_desc, k_smem.index(slot), kbar.index(slot), ub_h, i + STAGES, cnt, k0, h, D,
                                BLOCK_N)
                p, alpha, m_i, l_i = _softmax_step(s, blk, bits, tok64, pos, pos0, m_i, l_i, scale_log2, BLOCK_N)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_l)), 1)
                mbarrier.wait(vbar.index(slot), phase)
                acc_t = warpgroup_mma(gl.convert_layout(p.to(dt), p_l), v_smem.index(slot), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_t, ))
            for st in gl.static_range(STAGES):
                mbarrier.invalidate(kbar.index(st))
                mbarrier.invalidate(vbar.index(st))

            _store_tile(acc, m_i, l_i, o_ptr, r_ptr, lse_ptr, q0, nq, h, stride_ot, stride_oh, stride_rt, stride_rh,
                        stride_lse_h, G, T, D, BLOCK_M, STORE_RESID)

    # ---------------------------------------------------------------------------------------------------------------
    # Warp-specialised variant: one program serves three consecutive 64-row tiles (one consumer warpgroup each), and
    # a producer warpgroup streams the union of all their blocks once through a ring of K / V slots. A consumer skips
    # the union entries none of its own tokens selected, so the tensor work stays that of its own tile's union while
    # the loads follow the union of the three tiles (neighbouring tiles share most blocks). Slots are handed back
    # through an `empty` barrier per slot that every consumer arrives at once per union entry, so no CTA-wide
    # barrier couples the warpgroups; a consumer that skips an entry still waits for its K first, which keeps every
    # consumer within STAGES entries of the producer (and mbarrier phases from aliasing).
    # ---------------------------------------------------------------------------------------------------------------

    @gluon.jit
    def _ws_producer(args, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr):
        (q_ptr, o_ptr, r_ptr, lse_ptr, k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, ub_h, ubits_h, cnt, k0, h,
         q0, nq, pos0, stride_qt, stride_qh, stride_ot, stride_oh, stride_rt, stride_rh, stride_lse_h,
         scale_log2) = args
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        for i in range(0, cnt):
            slot = i % STAGES
            # a slot is free once every consumer released its previous entry (a fresh barrier passes parity 1)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            row = (k0 + gl.load(ub_h + i) * BLOCK_N).to(gl.int32)
            mbarrier.expect(kbar.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [row, h * D], kbar.index(slot), k_smem.index(slot))
            mbarrier.expect(vbar.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [row, h * D], vbar.index(slot), v_smem.index(slot))

    @gluon.jit
    def _ws_consumer(args, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr,
                     WG: gl.constexpr):
        """Consumer warpgroup WG: rows = tokens WG*T .. WG*T + T - 1 of the program's tile (x G heads)."""
        (q_ptr, o_ptr, r_ptr, lse_ptr, k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, ub_h, ubits_h, cnt, k0, h,
         q0, nq, pos0, stride_qt, stride_qh, stride_ot, stride_oh, stride_rt, stride_rh, stride_lse_h,
         scale_log2) = args
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = 64
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        dt: gl.constexpr = q_ptr.dtype.element_ty
        nq_w = nq - WG * T
        pos0_w = pos0 + WG * T
        q0_w = q0 + WG * T
        q = _load_q_tile(q_ptr, q0_w, nq_w, h, stride_qt, stride_qh, G, T, D, BLOCK_M)
        # Q as the register operand of Q K^T. Triton 3.6 turns the conversion into a shared-memory copy that is
        # re-read at every product; Q in shared memory as the operand was slower (NOTES_sparse_attention.md)
        q_op = gl.convert_layout(q, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))

        srow_l: gl.constexpr = gl.SliceLayout(1, s_l)
        stok = gl.arange(0, BLOCK_M, layout=srow_l) // G
        tok64 = stok.to(gl.int64) + WG * T  # the row's bit in the union's token mask
        pos = pos0_w + stok
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=srow_l)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=srow_l)
        acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_l)
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)
        mine = ((1 << T) - 1) << (WG * T)
        for i in range(0, cnt):
            slot = i % STAGES
            phase = (i // STAGES) & 1
            bits = gl.load(ubits_h + i)
            # waiting for the K slot also when skipping keeps this warpgroup within STAGES entries of the others
            mbarrier.wait(kbar.index(slot), phase)
            if (bits & mine) != 0:
                blk = gl.load(ub_h + i)
                s_t = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, ))
                p, alpha, m_i, l_i = _softmax_step(s, blk, bits, tok64, pos, pos0_w, m_i, l_i, scale_log2, BLOCK_N)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_l)), 1)
                mbarrier.wait(vbar.index(slot), phase)
                acc_t = warpgroup_mma(gl.convert_layout(p.to(dt), p_l), v_smem.index(slot), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_t, ))
                # every warp's slice of the products is done before the slot is released
                _cta_barrier()
            mbarrier.arrive(empty.index(slot), count=1)

        _store_tile(acc, m_i, l_i, o_ptr, r_ptr, lse_ptr, q0_w, nq_w, h, stride_ot, stride_oh, stride_rt, stride_rh,
                    stride_lse_h, G, T, D, BLOCK_M, STORE_RESID)

    @gluon.jit
    def _ws_consumer0(args, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr):
        _ws_consumer(args, G, T, D, STORE_RESID, 0)

    @gluon.jit
    def _ws_consumer1(args, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr):
        _ws_consumer(args, G, T, D, STORE_RESID, 1)

    @gluon.jit
    def _ws_consumer2(args, G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr):
        _ws_consumer(args, G, T, D, STORE_RESID, 2)

    @gluon.jit(do_not_specialize=["stride_lse_h", "stride_u_h", "stride_u_t", "stride_cnt_h"])
    def _sparse_fwd_kernel_sm90_ws(
        q_ptr, k_desc, v_desc, o_ptr, r_ptr, lse_ptr, ub_ptr, ubits_ptr, ucnt_ptr,
        tile_seq_ptr, tile_q0_ptr, tile_nq_ptr, tile_pos0_ptr, cu_k_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_rt, stride_rh, stride_lse_h, stride_u_h, stride_u_t,
        stride_cnt_h, scale_log2,
        G: gl.constexpr, T: gl.constexpr, D: gl.constexpr, STORE_RESID: gl.constexpr, STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
    ):
        """T: tokens per consumer warpgroup (the plan's tiles hold 3 T). Tiles without a sequence have an empty
        union and no valid token, so every partition runs zero steps and stores nothing."""
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        pid_t = gl.program_id(0)
        h = gl.program_id(1)
        seq = gl.load(tile_seq_ptr + pid_t)
        q0 = gl.load(tile_q0_ptr + pid_t)
        nq = gl.load(tile_nq_ptr + pid_t)
        pos0 = gl.load(tile_pos0_ptr + pid_t)
        k0 = gl.load(cu_k_ptr + gl.maximum(seq, 0))
        ubase = h.to(gl.int64) * stride_u_h + pid_t.to(gl.int64) * stride_u_t
        cnt = gl.load(ucnt_ptr + h * stride_cnt_h + pid_t)
        dt: gl.constexpr = q_ptr.dtype.element_ty
        k_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, D], v_desc.layout)
        kbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(kbar.index(st), count=1)
            mbarrier.init(vbar.index(st), count=1)
            mbarrier.init(empty.index(st), count=3)
        args = (q_ptr, o_ptr, r_ptr, lse_ptr, k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, ub_ptr + ubase,
                ubits_ptr + ubase, cnt, k0, h, q0, nq, pos0, stride_qt, stride_qh, stride_ot, stride_oh, stride_rt,
                stride_rh, stride_lse_h, scale_log2)
        # The producer is the default partition (the kernel's num_warps = 4; one thread issues the copies): Triton 3.6
        # builds the default partition's body outside the module, where a reduction cannot find its number of warps.
        gl.warp_specialize([(_ws_producer, (args, G, T, D, STORE_RESID)),
                            (_ws_consumer0, (args, G, T, D, STORE_RESID)),
                            (_ws_consumer1, (args, G, T, D, STORE_RESID)),
                            (_ws_consumer2, (args, G, T, D, STORE_RESID))], [4, 4, 4], [CONSUMER_REGS] * 3)


def sparse_fwd_sm90_supported(q: torch.Tensor, block_size: int, block_m: int, tma: bool) -> bool:
    """Whether ``sparse_fwd_sm90`` can run: sm90, bf16 / fp16, d 64 / 128, blocks of 16-64 keys loaded as TMA
    boxes, 64-row tiles."""
    return (tma and on_sm90(q) and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and block_size in (16, 32, 64) and block_m == _BLOCK_M)


def _launch(kernel, q, k, v, out, resid, lse, plan, cu_k, block_size, scale_log2, store_resid, **launch):
    """Launch a forward kernel, one program per tile of the plan and KV head. K and V (total_k, Hkv, d) are read
    through TMA descriptors over their (total_k, Hkv * d) views, one block of one head at a time (rows past the end
    read zeros); ``launch``: the kernel's other constexprs and launch options."""
    hkv, d = k.shape[1], k.shape[2]
    el = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay = gl.NVMMASharedLayout.get_default_for([block_size, d], el)
    k_desc, v_desc = (TensorDescriptor(x, [x.shape[0], hkv * d], [x.stride(0), 1], [block_size, d], lay)
                      for x in (k, v))
    rs = (resid.stride(0), resid.stride(1)) if store_resid else (0, 0)
    kernel[(plan.n_tiles, hkv)](
        q, k_desc, v_desc, out, resid, lse, plan.ub, plan.ubits, plan.cnt,
        plan.tile_seq, plan.tile_q0, plan.tile_nq, plan.tile_pos0, cu_k,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), rs[0], rs[1], lse.stride(0), plan.ub.stride(0),
        plan.ub.stride(1), plan.cnt.stride(0), scale_log2,
        G=plan.G, D=d, STORE_RESID=store_resid, num_warps=4, **launch)


def sparse_fwd_sm90(q, k, v, out, resid, lse, plan, cu_k, block_size: int, scale_log2: float, store_resid: bool):
    """Launch the sm90 forward (the arguments of the Triton forward's launch in ``sparse_attention._forward``;
    ``plan`` is its ``_Plan``)."""
    _launch(_sparse_fwd_kernel_sm90, q, k, v, out, resid, lse, plan, cu_k, block_size, scale_log2,
            store_resid, T=plan.T, **{**_SETTINGS[k.shape[2]], **VARIANT})


def sparse_fwd_sm90_ws_tiles(q: torch.Tensor, block_size: int, T: int, block_m: int, tma: bool) -> int:
    """Row tiles per program of the warp-specialised forward for this call (``T`` tokens, ``block_m`` rows a row
    tile), or 0 where it does not run: sm90, bf16 / fp16, d 128, blocks of 16-64 keys loaded as TMA boxes, 64-row
    tiles, and the program's tokens within the union's 64-bit token mask."""
    if q.shape[-1] not in _WS_SETTINGS or not sparse_fwd_sm90_supported(q, block_size, block_m, tma):
        return 0
    return _WS_TILES if T * _WS_TILES <= 64 else 0


def sparse_fwd_sm90_ws(q, k, v, out, resid, lse, plan, cu_k, block_size: int, scale_log2: float, store_resid: bool):
    """Launch the warp-specialised sm90 forward: the arguments of ``sparse_fwd_sm90``, with ``plan`` built for
    tiles of ``_WS_TILES`` row tiles (``_Plan(..., wgs=3)``)."""
    if plan.wgs != _WS_TILES:
        raise ValueError(f"plan: built for {plan.wgs} row tiles a tile, the kernel takes {_WS_TILES}")
    settings = {**_WS_SETTINGS[k.shape[2]], **WS_VARIANT}
    maxnreg = settings.pop("maxnreg", _WS_MAXNREG)
    _launch(_sparse_fwd_kernel_sm90_ws, q, k, v, out, resid, lse, plan, cu_k, block_size, scale_log2,
            store_resid, T=plan.T // plan.wgs, maxnreg=maxnreg, **settings)
