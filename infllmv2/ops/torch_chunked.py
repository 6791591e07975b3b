"""Memory-bounded PyTorch path: stages 1 and 2 over query chunks, for long inputs where no kernel runs.

Nothing of size n x n or n x n/16 is ever built: stage 1 scores one chunk of queries at a time and
keeps only its (Hkv, chunk, budget) selection; stage 2 gathers, per chunk, the union of the blocks
its tokens selected and masks each token back to its own blocks, so the semantics stay per-token
exact while neighbouring tokens share the gathered keys. Stage 2 is a ``torch.autograd.Function``
that saves only (q, k, v, out, lse) and recomputes the probabilities chunk by chunk in backward,
as FlashAttention does. All functions work on ONE sequence (queries = last n of the nk keys).
"""
from __future__ import annotations

import math

import torch

from ..config import SparseConfig
from . import naive

__all__ = ["select_blocks", "select_blocks_compressed", "sparse_attention"]

_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_size(n_rows_per_token: int, n_keys: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, _CHUNK_ELEMENTS // max(1, n_rows_per_token * n_keys)))


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, config: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """Stage 1 for one sequence, chunked over queries.

    q: (n, Hq, d), k: (nk, Hkv, d) -> (Hkv, n, budget) int32, identical to ``naive.select_blocks``.
    """
    ctype = _compute_dtype(q.dtype)
    k1 = naive.compress_keys(k.to(ctype), config.kernel_size, config.kernel_stride)
    k2 = (naive.compress_keys(k.to(ctype), config.coarse_kernel_size, config.coarse_kernel_stride)
          if config.lse_approx else None)
    return select_blocks_compressed(q, k.shape[0], k1, k2, config, scale)


@torch.no_grad()
def select_blocks_compressed(q: torch.Tensor, nk: int, k1: torch.Tensor, k2: torch.Tensor | None,
                             config: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """Stage 1 from precomputed compressed keys (a decoding cache keeps them), chunked over queries.

    q: (n, Hq, d), the last n of nk positions; k1: (>= n1, Hkv, d) fine compressed keys (rows past
    ``(nk - lc) // sc + 1`` are ignored); k2: the coarse ones (needed when ``lse_approx``)
    -> (Hkv, n, budget) int32, as ``naive.select_blocks(q, k)`` over the nk keys.
    """
    n, hq, d = q.shape
    hkv = k1.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    ctype = _compute_dtype(q.dtype)
    B, lc, sc = config.block_size, config.kernel_size, config.kernel_stride
    nb = -(-nk // B)
    n1 = max(0, min(k1.shape[0], (nk - lc) // sc + 1)) if nk >= lc else 0
    k1 = k1[:n1].to(ctype)
    if config.lse_approx:
        if k2 is None:
            raise ValueError("config.lse_approx needs the coarse compressed keys k2")
        n2 = max(0, min(k2.shape[0], (nk - 4 * lc) // (4 * sc) + 1)) if nk >= 4 * lc else 0
        k2 = k2[:n2].to(ctype)
    ratio, halo = B // sc, lc // sc - 1  # fine keys per block, extra overlapping keys on the left
    out = torch.full((hkv, n, config.budget), -1, dtype=torch.int32, device=q.device)
    chunk = _chunk_size(hq, max(n1, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        pos = torch.arange(nk - n + start, nk - n + stop, device=q.device)
        last = nk - n + stop - 1
        m1 = max(0, min(n1, (last + 1 - lc) // sc + 1))  # fine keys visible to the chunk's last token
        qg = q[start:stop].to(ctype).view(-1, hkv, g, d)
        s = torch.zeros(hkv, stop - start, m1, dtype=ctype, device=q.device)
        if m1:
            logits = scale * torch.einsum("nhgd,jhd->hgnj", qg, k1[:m1])
            vis1 = naive._visible(pos, m1, lc, sc)
            lse = naive._masked_lse(logits, vis1)
            if config.lse_approx:
                m2 = max(0, min(k2.shape[0], (last + 1 - 4 * lc) // (4 * sc) + 1))
                if m2:
                    logits2 = scale * torch.einsum("nhgd,jhd->hgnj", qg, k2[:m2])
                    vis2 = naive._visible(pos, m2, 4 * lc, 4 * sc)
                    lse = torch.where(vis2.any(-1)[None, None], naive._masked_lse(logits2, vis2), lse)
            s = torch.exp(logits - lse[..., None]).masked_fill(~vis1, 0.0).sum(dim=1)
        # Max pooling onto blocks as a strided window: block b covers fine keys [b*ratio - halo, b*ratio + ratio - 1].
        width = nb * ratio + halo
        s = torch.nn.functional.pad(s, (halo, max(0, width - halo - s.shape[-1])))[..., :width]
        scores = s.unfold(-1, ratio + halo, ratio).amax(dim=-1)  # (Hkv, chunk, nb)
        out[:, start:stop] = naive.topk_blocks(scores, pos, config)
    return out


def _stage2_chunk(hq: int, nk: int, block_size: int, budget: int) -> int:
    """Queries per stage-2 chunk: small, so the union of the chunk's blocks stays close to one token's selection."""
    return _chunk_size(hq, min(nk, block_size * budget * 4), lo=16, hi=128)


def _chunk_union(idx: torch.Tensor, nb: int, block_size: int, nk: int, pos: torch.Tensor):
    """Union of the blocks a chunk selected (over tokens and heads) and each token's mask onto it.

    idx: (Hkv, c, budget) -> keys (U*B,) long token indices, mask (Hkv, c, U*B) bool.
    """
    hkv, c, _ = idx.shape
    sel = torch.zeros(hkv, c, nb + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, torch.where((idx < 0) | (idx >= nb), nb, idx.long()), True)  # past the sequence: nothing
    sel = sel[..., :nb]
    blocks = sel.any(dim=1).any(dim=0).nonzero().flatten()  # (U,)
    keys = (blocks[:, None] * block_size + torch.arange(block_size, device=idx.device)).flatten()
    mask = sel[..., blocks].repeat_interleave(block_size, dim=-1)
    mask &= (keys[None, :] <= pos[:, None])[None]  # causal; also drops the padding past nk
    valid = keys < nk
    return keys[valid], mask[..., valid]


class _SparseAttentionChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale):
        n, hq, d = q.shape
        nk, hkv, _ = k.shape
        g = hq // hkv
        ctype = _compute_dtype(q.dtype)
        nb = -(-nk // block_size)
        out = torch.empty(n, hq, d, dtype=ctype, device=q.device)
        lse = torch.empty(hkv, g, n, dtype=ctype, device=q.device)
        chunk = _stage2_chunk(hq, nk, block_size, block_indices.shape[-1])
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            pos = torch.arange(nk - n + start, nk - n + stop, device=q.device)
            keys, mask = _chunk_union(block_indices[:, start:stop], nb, block_size, nk, pos)
            qc = q[start:stop].to(ctype).view(-1, hkv, g, d)
            kc, vc = k[keys].to(ctype), v[keys].to(ctype)
            logits = scale * torch.einsum("nhgd,uhd->hgnu", qc, kc).masked_fill(~mask[:, None], -math.inf)
            m = torch.logsumexp(logits, dim=-1)
            p = torch.exp(logits - m.clamp_min(torch.finfo(ctype).min)[..., None])  # a token with no key: p = 0
            out[start:stop] = torch.einsum("hgnu,uhd->nhgd", p, vc).reshape(-1, hq, d)
            lse[..., start:stop] = m
        ctx.save_for_backward(q, k, v, block_indices, out, lse)
        ctx.block_size, ctx.scale, ctx.chunk = block_size, scale, chunk
        return out.to(q.dtype), lse.reshape(hq, n).float()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, block_indices, out, lse = ctx.saved_tensors
        block_size, scale, chunk = ctx.block_size, ctx.scale, ctx.chunk
        n, hq, d = q.shape
        nk, hkv, _ = k.shape
        g = hq // hkv
        ctype = out.dtype
        nb = -(-nk // block_size)
        dq = torch.zeros(n, hq, d, dtype=ctype, device=q.device)
        dk = torch.zeros(nk, hkv, d, dtype=ctype, device=q.device)
        dv = torch.zeros(nk, hkv, d, dtype=ctype, device=q.device)
        dout = dout.to(ctype)
        delta = (dout * out).sum(-1)  # (n, Hq): rowsum(dO * O)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            pos = torch.arange(nk - n + start, nk - n + stop, device=q.device)
            keys, mask = _chunk_union(block_indices[:, start:stop], nb, block_size, nk, pos)
            qc = q[start:stop].to(ctype).view(-1, hkv, g, d)
            kc, vc = k[keys].to(ctype), v[keys].to(ctype)
            doc = dout[start:stop].view(-1, hkv, g, d)
            logits = scale * torch.einsum("nhgd,uhd->hgnu", qc, kc).masked_fill(~mask[:, None], -math.inf)
            p = torch.exp(logits - lse[..., start:stop, None].clamp_min(torch.finfo(ctype).min))  # (Hkv, G, c, U)
            dp = torch.einsum("nhgd,uhd->hgnu", doc, vc)
            dc = delta[start:stop].view(-1, hkv, g).permute(1, 2, 0)[..., None]
            ds = p * (dp - dc)
            if dlse is not None:  # lse is an output too: d lse / d logits = p
                ds = ds + p * dlse[:, start:stop].to(ctype).view(hkv, g, -1)[..., None]
            dq[start:stop] = scale * torch.einsum("hgnu,uhd->nhgd", ds, kc).reshape(-1, hq, d)
            dk.index_add_(0, keys, scale * torch.einsum("hgnu,nhgd->uhd", ds, qc))
            dv.index_add_(0, keys, torch.einsum("hgnu,nhgd->uhd", p, doc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


@torch.no_grad()
def _sparse_attention_inference(q, k, v, block_indices, block_size, scale):
    """Forward only, no log-sum-exp: each chunk goes through SDPA (a fused CPU/GPU kernel) with the
    chunk's per-token mask over the union of its blocks. Same result as the autograd path."""
    n, hq, d = q.shape
    nk, hkv, _ = k.shape
    g = hq // hkv
    ctype = _compute_dtype(q.dtype)
    nb = -(-nk // block_size)
    out = torch.empty(n, hq, d, dtype=q.dtype, device=q.device)
    chunk = _stage2_chunk(hq, nk, block_size, block_indices.shape[-1])
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        pos = torch.arange(nk - n + start, nk - n + stop, device=q.device)
        keys, mask = _chunk_union(block_indices[:, start:stop], nb, block_size, nk, pos)
        qc = q[start:stop].to(ctype).view(-1, hkv, g, d).permute(1, 2, 0, 3)  # (Hkv, G, c, d)
        # (Hkv, G, U, d) views: SDPA broadcasting a size-1 head dimension took the CPU 2.6x longer
        kc = k[keys].to(ctype).transpose(0, 1)[:, None].expand(-1, g, -1, -1)
        vc = v[keys].to(ctype).transpose(0, 1)[:, None].expand(-1, g, -1, -1)
        o = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask[:, None], scale=scale)
        o = o.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)  # a token with no key: 0 (SDPA gives NaN)
        out[start:stop] = o.permute(2, 0, 1, 3).reshape(-1, hq, d).to(q.dtype)
    return out


def sparse_attention(q, k, v, block_indices, block_size: int, scale: float | None = None, return_lse: bool = True):
    """Stage 2 for one sequence, memory-bounded, differentiable in q, k, v.

    q: (n, Hq, d), k, v: (nk, Hkv, d), block_indices: (Hkv, n, budget) -> out (n, Hq, d), lse (Hq, n)
    (lse None when ``return_lse`` is False and no gradient is needed: the faster inference path).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not return_lse and not needs_grad:
        return _sparse_attention_inference(q, k, v, block_indices, block_size, scale), None
    return _SparseAttentionChunked.apply(q, k, v, block_indices, block_size, scale)
