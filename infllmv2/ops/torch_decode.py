"""The PyTorch path given precomputed compressed keys (the decoding cache keeps them).

``select_blocks_compressed`` (from ``torch_chunked``) takes the fine / coarse compressed keys instead of
recomputing them from all the keys: a decode step (or a chunk of a chunked prefill) then costs O(n1)
for scoring instead of O(nk) for re-pooling the whole cache. Semantics are those of the
reference (SPEC stage 1): the visibility rule is applied per query position, so passing compressed keys
that cover the whole sequence (as compressing from scratch would) gives the same selection.
``attention_compressed`` works on ONE sequence (queries = the last n of nk keys); ``decode_static`` on a
batch of single queries in a static cache, with fixed shapes (for torch.compile / CUDA graphs).
"""
from __future__ import annotations

import math

import torch

from ..config import SparseConfig
from . import naive, torch_chunked
from .torch_chunked import select_blocks_compressed

__all__ = ["select_blocks_compressed", "attention_compressed", "decode_static"]


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
    out, _ = torch_chunked.sparse_attention(q, k, v, idx, config.block_size, scale, return_lse=False)
    return out


def _select_static(qg, lens, k1, k2, config: SparseConfig, scale: float, nb: int) -> torch.Tensor:
    """Stage 1 for one query per row from the rows' compressed keys, fixed shapes (as
    ``torch_chunked.select_blocks_compressed`` for a single position per sequence).

    qg (b, Hkv, G, d) in the compute dtype, lens (b,) long, k1 (b, N1, Hkv, d), k2 (b, N2, Hkv, d) or None
    -> (b, Hkv, budget) int32 over ``nb`` blocks.
    """
    B, lc, sc = config.block_size, config.kernel_size, config.kernel_stride
    dev, ctype = qg.device, qg.dtype

    def logits_and_visible(keys, kernel, stride):
        ends = torch.arange(keys.shape[1], device=dev) * stride + kernel
        return scale * torch.einsum("bhgd,bjhd->bhgj", qg, keys.to(ctype)), ends[None] <= lens[:, None]

    logits, vis1 = logits_and_visible(k1, lc, sc)
    lse = naive._masked_lse(logits, vis1[:, None, None])
    if config.lse_approx:
        logits2, vis2 = logits_and_visible(k2, config.coarse_kernel_size, config.coarse_kernel_stride)
        lse = torch.where(vis2.any(-1)[:, None, None], naive._masked_lse(logits2, vis2[:, None, None]), lse)
    s = torch.exp(logits - lse[..., None]).masked_fill(~vis1[:, None, None], 0.0).sum(dim=2)  # (b, Hkv, N1)
    # Max pooling onto blocks as in torch_chunked: block j covers fine keys [j*ratio - halo, j*ratio + ratio - 1].
    ratio, halo = B // sc, lc // sc - 1
    width = nb * ratio + halo
    s = torch.nn.functional.pad(s, (halo, max(0, width - halo - s.shape[-1])))[..., :width]
    scores = s.unfold(-1, ratio + halo, ratio).amax(dim=-1)  # (b, Hkv, nb)
    return naive.topk_blocks(scores.transpose(0, 1), lens - 1, config).transpose(0, 1)


def _attend(qg, k, v, valid, scale):
    """qg (b, Hkv, G, d), k/v (b, Hkv, m, d), valid (b, Hkv, m) -> (b, Hkv, G, d)."""
    logits = scale * torch.einsum("bhgd,bhmd->bhgm", qg, k)
    p = torch.softmax(logits.masked_fill(~valid[:, :, None], -math.inf), dim=-1)
    # slots outside a row's keys may hold anything (a cache from torch.empty): 0 * nan would leak into the sum
    return torch.einsum("bhgm,bhmd->bhgd", p, v.masked_fill(~valid[..., None], 0.0))


def decode_static(q, k_cache, v_cache, lens, leftpad, k_fine, k_coarse, config: SparseConfig,
                  scale: float | None = None) -> torch.Tensor:
    """One decode step of a batch in a static cache: fixed shapes and no host synchronisation, so it
    compiles with ``torch.compile(fullgraph=True)`` (the PyTorch twin of ``ops.triton.infllmv2_decode_triton``).

    q (b, Hq, d), the newest token per row; k_cache, v_cache (b, L, Hkv, d), row i's keys in slots
    ``leftpad[i] : leftpad[i] + lens[i]`` (the newest included); k_fine (b, N1, Hkv, d) / k_coarse
    (b, N2, Hkv, d, or None without ``lse_approx``): each row's compressed keys (windows past its length
    are ignored). -> (b, Hq, d). Rows shorter than ``dense_len`` attend to all their keys; when some row
    may be dense (``dense_len > 0``) that is computed over all L slots and chosen per row.
    """
    b, hq, d = q.shape
    L, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    ctype = torch_chunked._compute_dtype(q.dtype)
    qg = q.to(ctype).view(b, hkv, hq // hkv, d)
    lens, leftpad = lens.long(), leftpad.long()
    kk, vv = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (b, Hkv, L, d)
    out = None
    if config.dense_len < 0 or L >= config.dense_len:  # some row may be sparse
        B = config.block_size
        idx = _select_static(qg, lens, k_fine, k_coarse, config, scale, -(-L // B)).long()  # (b, Hkv, budget)
        pos = (idx[..., None] * B + torch.arange(B, device=q.device)).flatten(2)  # row-relative key positions
        valid = (idx[..., None] >= 0).expand(-1, -1, -1, B).flatten(2) & (pos < lens[:, None, None])
        slots = (leftpad[:, None, None] + pos).clamp(0, L - 1)[..., None].expand(-1, -1, -1, d)
        out = _attend(qg, kk.gather(2, slots).to(ctype), vv.gather(2, slots).to(ctype), valid, scale)
    if config.dense_len > 0:  # some row may be dense
        slot = torch.arange(L, device=q.device)
        valid = (slot[None] >= leftpad[:, None]) & (slot[None] < (leftpad + lens)[:, None])
        dense = _attend(qg, kk.to(ctype), vv.to(ctype), valid[:, None].expand(-1, hkv, -1), scale)
        out = dense if out is None else torch.where((lens < config.dense_len)[:, None, None, None], dense, out)
    return out.reshape(b, hq, d).to(q.dtype)
