"""Stage 1 of the PyTorch path given precomputed compressed keys (the decoding cache keeps them).

``select_blocks_compressed`` is ``torch_chunked.select_blocks`` with the fine / coarse compressed keys
passed in instead of recomputed from all the keys: a decode step (or a chunk of a chunked prefill) then
costs O(n1) for scoring instead of O(nk) for re-pooling the whole cache. Semantics are those of the
reference (SPEC stage 1): the visibility rule is applied per query position, so passing compressed keys
that cover the whole sequence (as compressing from scratch would) gives the same selection.
All functions work on ONE sequence (queries = the last n of nk keys).
"""
from __future__ import annotations

import torch

from ..config import SparseConfig
from . import naive, torch_chunked

__all__ = ["select_blocks_compressed", "attention_compressed"]


@torch.no_grad()
def select_blocks_compressed(q: torch.Tensor, nk: int, k1: torch.Tensor, k2: torch.Tensor | None,
                             config: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """q: (n, Hq, d), the last n of nk positions; k1: (>= n1, Hkv, d) fine compressed keys (rows past
    ``(nk - lc) // sc + 1`` are ignored); k2: coarse ones (needed when ``lse_approx``)
    -> (Hkv, n, budget) int32, as ``naive.select_blocks(q, k)`` where k are the nk keys."""
    n, hq, d = q.shape
    hkv = k1.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    ctype = torch_chunked._compute_dtype(q.dtype)
    B, lc, sc = config.block_size, config.kernel_size, config.kernel_stride
    nb = -(-nk // B)
    n1 = max(0, min(k1.shape[0], (nk - lc) // sc + 1)) if nk >= lc else 0
    k1 = k1[:n1].to(ctype)
    if config.lse_approx:
        if k2 is None:
            raise ValueError("config.lse_approx needs the coarse compressed keys k2")
        n2 = max(0, min(k2.shape[0], (nk - 4 * lc) // (4 * sc) + 1)) if nk >= 4 * lc else 0
        k2 = k2[:n2].to(ctype)
    ratio, halo = B // sc, lc // sc - 1
    out = torch.full((hkv, n, config.budget), -1, dtype=torch.int32, device=q.device)
    chunk = torch_chunked._chunk_size(hq, max(n1, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        pos = torch.arange(nk - n + start, nk - n + stop, device=q.device)
        last = nk - n + stop - 1
        m1 = max(0, min(n1, (last + 1 - lc) // sc + 1))
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
        width = nb * ratio + halo
        s = torch.nn.functional.pad(s, (halo, max(0, width - halo - s.shape[-1])))[..., :width]
        scores = s.unfold(-1, ratio + halo, ratio).amax(dim=-1)  # (Hkv, chunk, nb)
        out[:, start:stop] = naive.topk_blocks(scores, pos, config)
    return out


def attention_compressed(q, k, v, k1, k2, config: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """The switch for one sequence with precomputed compressed keys: q (n, Hq, d), k, v (nk, Hkv, d)
    -> out (n, Hq, d). Dense causal attention below ``dense_len``, else stage 1 from k1/k2 + stage 2
    (``torch_chunked.sparse_attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nk = k.shape[0]
    if not config.is_sparse(nk):
        from ..attention import dense_attention_sdpa
        return dense_attention_sdpa(q[None], k[None], v[None], scale)[0]
    idx = select_blocks_compressed(q.detach(), nk, k1, k2, config, scale)
    out, _ = torch_chunked.sparse_attention(q, k, v, idx, config.block_size, scale)
    return out
