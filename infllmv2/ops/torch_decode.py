"""The PyTorch path given precomputed compressed keys (the decoding cache keeps them).

``select_blocks_compressed`` (from ``torch_chunked``) takes the fine / coarse compressed keys instead of
recomputing them from all the keys: a decode step (or a chunk of a chunked prefill) then costs O(n1)
for scoring instead of O(nk) for re-pooling the whole cache. Semantics are those of the
reference (SPEC stage 1): the visibility rule is applied per query position, so passing compressed keys
that cover the whole sequence (as compressing from scratch would) gives the same selection.
All functions work on ONE sequence (queries = the last n of nk keys).
"""
from __future__ import annotations

import torch

from ..config import SparseConfig
from . import torch_chunked
from .torch_chunked import select_blocks_compressed

__all__ = ["select_blocks_compressed", "attention_compressed"]


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
