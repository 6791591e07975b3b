"""Stage-1 log-sum-exp kernel for Hopper (sm90) in Gluon, Triton's explicit-layout dialect.

It computes what ``selection._lse_kernel`` computes for prefill: per query row (token x head of one KV head) the
base-2 log-sum-exp of ``qk_scale * q . K[j]`` over the visible coarse keys (``lse_approx``; rows that see no coarse
key yet: over their fine keys, the SPEC fallback) or over the fine keys (exact mode), in the same tile order and
with the same per-tile update, so the values agree with the Triton kernel's. What changes is the layout:

* a program takes 64 rows (half of a tile's heads) with its query rows in registers as the MMA's left operand;
* one key tile a step, each product waited for before its exponentials: pairing the tiles (the second tile's
  product beside the first one's exponentials, as the scoring kernel does) measured slower here, and was removed
  (its variants are at commit bd02baf);
* key tiles arrive by TMA into a ring of shared-memory slots, reloaded after a CTA barrier (a warp's
  ``warpgroup_mma_wait`` covers only its own slice of the product);
* the heaviest (latest) query tiles start first.

The launch settings (rows a program, warps, Q in registers or shared memory, ring slots) are in
``_SETTINGS`` / ``VARIANT``. Kept for the standard shape: 64 rows a program (half of a tile's heads), Q in registers,
two slots: 91 registers and 40 KB, five programs (20 warps) an SM. H200, interleaved, identical values
(``benchmarks/NOTES_selection.md``, "Fourteenth session"): 128K 2.76 -> 2.12 ms, 64K 0.80 -> 0.62 ms, 32K 0.253 ->
0.205 ms.

Gluon has no CPU interpreter, so this kernel runs on sm90 GPUs only; ``selection._select_core`` uses the Triton
kernel everywhere else (CPU interpreter, decoding, fp32, other GPUs), and the GPU tests compare the two.
"""
from __future__ import annotations

import torch

from .gluon_support import HAVE_GLUON, TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, on_sm90
from .gluon_support import cta_barrier as _cta_barrier
from .gluon_support import tma_load as _tma_load
from .gluon_support import warpgroup_mma, warpgroup_mma_wait

_ROWS = 128  # query rows of a tile (tokens x padded heads), as the Triton kernel's prefill tiles
_BLOCK_N = 64  # keys a product
# Launch settings per head dim: rows a program (128, or 64: each program takes half of a tile's heads), warps, Q as
# the register operand (else from shared memory), ring slots. H200, 128K, LSE kernel, interleaved, identical values
# (dev_selection.py --lse-variants; NOTES_selection.md, "Fourteenth session"): Triton kernel 2.76 ms; 128 rows, Q in
# shared memory, pairs: 2.81 (185 registers, two programs an SM), capped at 168 registers: 2.47 (three); 64 rows, Q in
# registers, pairs: 2.21 (127 registers, four); the same without pairs: 2.12 (91 registers, five: kept). The kernel is latency-bound like the scoring and forward kernels: programs an SM pay.
# d 64 reads Q from shared memory: Triton 3.6 miscompiled the register operand of the stage-2 forward there.
_SETTINGS = {128: dict(M=64, WARPS=4, Q_REGS=True, STAGES=2),
             64: dict(M=64, WARPS=4, Q_REGS=False, STAGES=2)}
VARIANT = {}  # overrides of the settings (dev_selection.py --lse-variants)


if HAVE_GLUON:
    from .score_sm90 import load_query_rows

    @gluon.jit
    def _lse_update(s, m, l, qk_scale, j0, t, MASKED: gl.constexpr, BLOCK_N: gl.constexpr, KS: gl.constexpr,
                    ST: gl.constexpr):
        """Online (max, sum) in base 2 after one key tile's raw products ``s``: as ``selection._lse_step``."""
        if MASKED:
            j = j0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
            vis = gl.expand_dims(j * ST + KS, 0) <= gl.expand_dims(t + 1, 1)
            s = gl.where(vis, s, float("-inf"))
        m_new = gl.maximum(m, gl.max(s, 1) * qk_scale)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * gl.exp2(m - m_safe) + gl.sum(gl.exp2(s * qk_scale - gl.expand_dims(m_safe, 1)), 1)
        return m_new, l

    @gluon.jit
    def _load_tile(desc, smem, bars, g, n_it, i, c_start, h, D: gl.constexpr, STAGES: gl.constexpr):
        """Key tile i of the pass (ring position g) into its slot, if the pass has it."""
        if i < n_it:
            slot = g % STAGES
            mbarrier.expect(bars.index(slot), desc.block_type.nbytes)
            _tma_load(desc, [c_start + i * desc.block_type.shape[0], h * D], bars.index(slot), smem.index(slot))

    @gluon.jit
    def _lse_pass(q_op, desc, smem, bars, g0, c_start, n_vis, n_all, t, h, qk_scale, s_l: gl.constexpr,
                  M: gl.constexpr, D: gl.constexpr, KS: gl.constexpr, ST: gl.constexpr, STAGES: gl.constexpr):
        """(max, sum) over keys [0, n_vis) of one kind (row t sees key j iff j * ST + KS <= t + 1; keys below
        n_all are visible to every row). ``g0``: key tiles through the ring before this pass; returns the count
        after it. The ring is free on entry."""
        BLOCK_N: gl.constexpr = desc.block_type.shape[0]
        n_it = gl.cdiv(n_vis, BLOCK_N)
        n_full = gl.minimum(n_all // BLOCK_N, n_it)  # tiles without a masked key (as the Triton kernel splits)
        for st in gl.static_range(STAGES):
            _load_tile(desc, smem, bars, g0 + st, n_it, st, c_start, h, D, STAGES)
        rl: gl.constexpr = gl.SliceLayout(1, s_l)
        m = gl.full([M], float("-inf"), gl.float32, layout=rl)
        l = gl.zeros([M], gl.float32, layout=rl)
        zero = gl.zeros([M, BLOCK_N], gl.float32, layout=s_l)
        for i in range(0, n_it):
            gi = g0 + i
            mbarrier.wait(bars.index(gi % STAGES), (gi // STAGES) & 1)
            acc = warpgroup_mma(q_op, smem.index(gi % STAGES).permute((1, 0)), zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            _cta_barrier()
            _load_tile(desc, smem, bars, gi + STAGES, n_it, i + STAGES, c_start, h, D, STAGES)
            if i < n_full:
                m, l = _lse_update(s, m, l, qk_scale, i * BLOCK_N, t, False, BLOCK_N, KS, ST)
            else:
                m, l = _lse_update(s, m, l, qk_scale, i * BLOCK_N, t, True, BLOCK_N, KS, ST)
        return m, l, g0 + n_it

    @gluon.jit
    def _n_visible(t, count, KS: gl.constexpr, ST: gl.constexpr):
        """Keys (windows of KS every ST keys) wholly inside a prefix of t + 1 keys, at most count."""
        return gl.minimum(count, gl.where(t + 1 >= KS, (t + 1 - KS) // ST + 1, 0))

    @gluon.jit(do_not_specialize=["stride_lt", "n_tiles"])
    def _lse_kernel_sm90(q_ptr, k1_desc, k2_desc, lse_ptr,
                         tile_seq_ptr, tile_off_ptr, q_start_ptr, q_len_ptr, k_len_ptr,
                         c1_start_ptr, c1_len_ptr, c2_start_ptr, c2_len_ptr,
                         stride_qt, stride_qh, stride_lt, n_tiles, qk_scale,
                         G: gl.constexpr, GP: gl.constexpr, D: gl.constexpr,
                         KS1: gl.constexpr, ST1: gl.constexpr, KS2: gl.constexpr, ST2: gl.constexpr,
                         LSE_APPROX: gl.constexpr, M: gl.constexpr, WARPS: gl.constexpr, Q_REGS: gl.constexpr,
                         STAGES: gl.constexpr):
        BLOCK_N: gl.constexpr = k1_desc.block_type.shape[0]
        BLOCK_T: gl.constexpr = 128 // GP  # tokens of a tile (rows head x BLOCK_T + token)
        tile = n_tiles - 1 - gl.program_id(0)  # heaviest (latest) tiles first
        h = gl.program_id(1)
        row0 = gl.program_id(2) * M  # the program's rows of the tile
        seq = gl.load(tile_seq_ptr + tile)
        off = gl.load(tile_off_ptr + tile)
        qs = gl.load(q_start_ptr + seq)
        ql = gl.load(q_len_ptr + seq)
        kl = gl.load(k_len_ptr + seq)
        t_min = kl - ql + off
        t_max = kl - ql + gl.minimum(off + BLOCK_T, ql) - 1

        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        dt: gl.constexpr = q_ptr.dtype.element_ty
        smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, D], k1_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(bars.index(st), count=1)

        # the query rows
        q = load_query_rows(q_ptr, qs, ql, off, h, row0, stride_qt, stride_qh, G, BLOCK_T, M, D, WARPS)
        if Q_REGS:
            q_op = gl.convert_layout(q, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
        else:
            q_op = gl.allocate_shared_memory(dt, [M, D], gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                                              element_bitwidth=16, rank=2))
            q_op.store(q)
            fence_async_shared()
            _cta_barrier()

        rl: gl.constexpr = gl.SliceLayout(1, s_l)
        srows = row0 + gl.arange(0, M, layout=rl)
        stok = off + srows % BLOCK_T
        sg = srows // BLOCK_T
        svalid = (stok < ql) & (sg < G)
        t = kl - ql + stok
        c1s = gl.load(c1_start_ptr + seq)
        c1n = gl.load(c1_len_ptr + seq)
        if LSE_APPROX:
            c2s = gl.load(c2_start_ptr + seq)
            c2n = gl.load(c2_len_ptr + seq)
            m, l, gcount = _lse_pass(q_op, k2_desc, smem, bars, 0, c2s, _n_visible(t_max, c2n, KS2, ST2),
                                     _n_visible(t_min, c2n, KS2, ST2), t, h, qk_scale, s_l, M, D, KS2, ST2, STAGES)
            part = gl.where(l > 0, m + gl.log2(gl.where(l > 0, l, 1.0)), float("-inf"))
            if t_min + 1 < KS2:
                # rows that see no coarse key yet: exact over their fine keys
                _cta_barrier()  # every warp is done with the ring
                m1, l1, gcount = _lse_pass(q_op, k1_desc, smem, bars, gcount, c1s, _n_visible(t_max, c1n, KS1, ST1),
                                           _n_visible(t_min, c1n, KS1, ST1), t, h, qk_scale, s_l, M, D, KS1, ST1,
                                           STAGES)
                part1 = gl.where(l1 > 0, m1 + gl.log2(gl.where(l1 > 0, l1, 1.0)), float("-inf"))
                part = gl.where(t + 1 < KS2, part1, part)
        else:
            m, l, gcount = _lse_pass(q_op, k1_desc, smem, bars, 0, c1s, _n_visible(t_max, c1n, KS1, ST1),
                                     _n_visible(t_min, c1n, KS1, ST1), t, h, qk_scale, s_l, M, D, KS1, ST1, STAGES)
            part = gl.where(l > 0, m + gl.log2(gl.where(l > 0, l, 1.0)), float("-inf"))
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(st))
        gl.store(lse_ptr + (qs + stok).to(gl.int64) * stride_lt + h * G + sg, part, mask=svalid)


def lse_sm90_supported(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, gp: int, decode: bool) -> bool:
    """Whether ``lse_sm90`` can run on these inputs (else the Triton LSE kernel does): prefill tiles of 128 rows, and
    fine and coarse keys to describe (a TMA descriptor has no empty dimension)."""
    return (not decode and on_sm90(q) and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and gp <= _ROWS and k1.shape[0] > 0 and k2.shape[0] > 0)


def _key_desc(k: torch.Tensor, d: int):
    """A TMA descriptor over the compressed keys' (rows, Hkv * d) view: one tile of _BLOCK_N keys of one head."""
    k2d = k.reshape(k.shape[0], k.shape[1] * d)
    if k2d.stride(1) != 1 or k2d.stride(0) != k.shape[1] * d:
        k2d = k2d.contiguous()
    el = gl.bfloat16 if k.dtype == torch.bfloat16 else gl.float16
    lay = gl.NVMMASharedLayout.get_default_for([_BLOCK_N, d], el)
    return TensorDescriptor(k2d, list(k2d.shape), list(k2d.stride()), [_BLOCK_N, d], lay)


def lse_sm90(q, k1, k2, lse, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len, c2_start, c2_len,
             n_tiles: int, qk_scale: float, g: int, gp: int, ks1: int, st1: int, ks2: int, st2: int, approx: bool):
    """Launch the sm90 LSE kernel (the arguments of the Triton kernel's prefill launch in
    ``selection._select_core``; ``lse`` is (1, total_q, Hq)). Key tiles past the end of ``k1`` / ``k2`` read zeros."""
    d = q.shape[-1]
    k1_desc = _key_desc(k1, d)
    k2_desc = _key_desc(k2, d) if approx else k1_desc
    s = {**_SETTINGS[d], **VARIANT}
    maxnreg = s.pop("maxnreg", None)
    _lse_kernel_sm90[(n_tiles, k1.shape[1], _ROWS // s["M"])](
        q, k1_desc, k2_desc, lse, tile_seq, tile_off, q_start, q_len, k_len, c1_start, c1_len, c2_start, c2_len,
        q.stride(0), q.stride(1), lse.stride(1), n_tiles, qk_scale,
        G=g, GP=gp, D=d, KS1=ks1, ST1=st1, KS2=ks2, ST2=st2, LSE_APPROX=approx, num_warps=s["WARPS"],
        **({"maxnreg": maxnreg} if maxnreg else {}), **s)
