"""The readable reference of InfLLM-V2: the executable form of SPEC.md.

Every function here works on ONE sequence with plain PyTorch ops and materialises whatever it
needs (score matrices, boolean masks): it is the oracle the fast paths are tested against, not a
path for long inputs. Shapes: ``n`` queries, ``nk`` keys (``nk >= n``; the queries are the last
``n`` positions, so token ``t = nk - n + i`` counts cached tokens too), ``Hq = G * Hkv`` heads.
Works in float32/float64 (and low precision, for the accuracy rule) on any device.
"""
from __future__ import annotations

import math

import torch

from ..config import SparseConfig

__all__ = [
    "compress_keys",
    "stage1_probabilities",
    "block_scores",
    "topk_blocks",
    "select_blocks",
    "selection_mask",
    "sparse_attention",
    "dense_attention",
    "infllmv2_attention",
]


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Mean-pool keys over full windows.

    k: (nk, H, d) -> (n1, H, d) with ``K1[j] = mean(k[j*stride : j*stride + kernel])`` and
    ``n1 = (nk - kernel) // stride + 1`` (0 when ``nk < kernel``).
    """
    nk = k.shape[0]
    if nk < kernel_size:
        return k.new_zeros((0,) + tuple(k.shape[1:]))
    windows = k.unfold(0, kernel_size, kernel_stride)  # (n1, H, d, kernel)
    return windows.mean(dim=-1)


def _visible(positions: torch.Tensor, n_keys: int, kernel: int, stride: int) -> torch.Tensor:
    """(n,) token positions -> (n, n_keys) bool: compressed key j is visible iff j*stride + kernel <= t + 1."""
    ends = torch.arange(n_keys, device=positions.device) * stride + kernel
    return ends[None, :] <= positions[:, None] + 1


def _masked_lse(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim restricted to ``visible``; -inf where nothing is visible."""
    return torch.logsumexp(logits.masked_fill(~visible, -math.inf), dim=-1)


def stage1_probabilities(q: torch.Tensor, k: torch.Tensor, config: SparseConfig, scale: float) -> torch.Tensor:
    """Group-summed stage-1 probabilities over the fine compressed keys (SPEC stage 1, steps 1-5).

    q: (n, Hq, d), k: (nk, Hkv, d) -> S: (Hkv, n, n1) float32 (float64 if the inputs are float64).
    """
    n, hq, d = q.shape
    nk, hkv, _ = k.shape
    g = hq // hkv
    ctype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(ctype), k.to(ctype)
    positions = torch.arange(nk - n, nk, device=q.device)

    k1 = compress_keys(kf, config.kernel_size, config.kernel_stride)  # (n1, Hkv, d)
    qg = qf.view(n, hkv, g, d)
    logits = scale * torch.einsum("nhgd,jhd->hgnj", qg, k1)  # (Hkv, G, n, n1)
    vis1 = _visible(positions, k1.shape[0], config.kernel_size, config.kernel_stride)  # (n, n1)
    lse = _masked_lse(logits, vis1)  # exact: (Hkv, G, n)
    if config.lse_approx:
        k2 = compress_keys(kf, config.coarse_kernel_size, config.coarse_kernel_stride)
        logits2 = scale * torch.einsum("nhgd,jhd->hgnj", qg, k2)
        vis2 = _visible(positions, k2.shape[0], config.coarse_kernel_size, config.coarse_kernel_stride)
        lse2 = _masked_lse(logits2, vis2)
        # A token that sees fine keys but no coarse key yet is normalised exactly.
        lse = torch.where(vis2.any(-1)[None, None, :], lse2, lse)
    probs = torch.exp(logits - lse[..., None]).masked_fill(~vis1, 0.0)  # rows with no fine key: all 0
    return probs.sum(dim=1)  # (Hkv, n, n1)


def block_scores(q: torch.Tensor, k: torch.Tensor, config: SparseConfig, scale: float) -> torch.Tensor:
    """Max-pool the group scores onto key blocks (SPEC stage 1, step 6).

    q: (n, Hq, d), k: (nk, Hkv, d) -> (Hkv, n, nb) with ``nb = ceil(nk / B)``;
    ``score[h, t, b] = max S[h, t, j]`` over windows j that overlap block b (0 if none).
    """
    s = stage1_probabilities(q, k, config, scale)
    n1 = s.shape[-1]
    B, lc, sc = config.block_size, config.kernel_size, config.kernel_stride
    nb = -(-k.shape[0] // B)
    j = torch.arange(n1, device=q.device)
    b = torch.arange(nb, device=q.device)
    overlap = (j[None, :] * sc < (b[:, None] + 1) * B) & (j[None, :] * sc + lc > b[:, None] * B)  # (nb, n1)
    pooled = s[:, :, None, :].masked_fill(~overlap[None, None], 0.0).amax(dim=-1) if n1 else s.new_zeros(
        s.shape[:2] + (nb,))
    return pooled


def topk_blocks(scores: torch.Tensor, positions: torch.Tensor, config: SparseConfig) -> torch.Tensor:
    """Forced blocks + top-k (SPEC stage 1, steps 7-9).

    scores: (Hkv, n, nb), positions: (n,) token indices -> (Hkv, n, budget) int32 block indices,
    sorted ascending, padded with -1. Ties prefer the lower block index.
    """
    hkv, n, nb = scores.shape
    budget = config.budget
    bq = positions // config.block_size  # (n,)
    b = torch.arange(nb, device=scores.device)
    forced = (b[None, :] < config.init_blocks) | (
        (b[None, :] >= bq[:, None] - config.local_blocks) & (b[None, :] <= bq[:, None]))
    candidate = (b[None, :] >= config.init_blocks) & (b[None, :] < bq[:, None] - config.local_blocks)
    forced = forced & (b[None, :] <= bq[:, None])
    # Rank: forced first, then candidates by score (stable sort keeps lower index first on ties). A candidate's score
    # that overflowed to +inf stays below the forced blocks' +inf.
    finite = scores.double().clamp(max=torch.finfo(torch.float64).max)
    key = torch.where(candidate[None], finite, torch.tensor(-1.0, dtype=torch.float64, device=scores.device))
    key = torch.where(forced[None], torch.tensor(math.inf, dtype=torch.float64, device=scores.device), key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :budget]
    valid = torch.gather(forced[None].expand(hkv, -1, -1) | candidate[None], -1, order)
    idx = torch.where(valid, order, torch.full_like(order, nb + 1))
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx > nb, torch.full_like(idx, -1), idx)
    if idx.shape[-1] < budget:  # fewer blocks than the budget in the whole sequence
        idx = torch.cat([idx, idx.new_full((hkv, n, budget - idx.shape[-1]), -1)], dim=-1)
    return idx.to(torch.int32)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """Stage 1 for one sequence. q: (n, Hq, d), k: (nk, Hkv, d) -> (Hkv, n, budget) int32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nk = k.shape[0]
    positions = torch.arange(nk - q.shape[0], nk, device=q.device)
    with torch.no_grad():
        return topk_blocks(block_scores(q, k, config, scale), positions, config)


def selection_mask(block_indices: torch.Tensor, nk: int, block_size: int) -> torch.Tensor:
    """(Hkv, n, budget) block indices -> (Hkv, n, nk) bool: key u allowed iff selected and causal.
    Indices past the sequence's last block (a shorter sequence of a packed batch) select nothing, as -1."""
    hkv, n, _ = block_indices.shape
    nb = -(-nk // block_size)
    blocks = torch.zeros(hkv, n, nb + 1, dtype=torch.bool, device=block_indices.device)
    idx = torch.where((block_indices < 0) | (block_indices >= nb), nb, block_indices.long())
    blocks.scatter_(-1, idx, True)
    allowed = blocks[..., :nb].repeat_interleave(block_size, dim=-1)[..., :nk]
    positions = torch.arange(nk - n, nk, device=block_indices.device)
    causal = torch.arange(nk, device=block_indices.device)[None, :] <= positions[:, None]
    return allowed & causal[None]


def _masked_attention(q, k, v, mask, scale):
    """q (n, Hq, d), k/v (nk, Hkv, d), mask (Hkv, n, nk) -> out (n, Hq, d), lse (Hq, n) float32."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    ctype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = scale * torch.einsum("nhgd,uhd->hgnu", q.view(n, hkv, g, d).to(ctype), k.to(ctype))
    logits = logits.masked_fill(~mask[:, None], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # (Hkv, G, n)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # a row with no key (n/a when causal) -> 0
    out = torch.einsum("hgnu,uhd->nhgd", probs, v.to(ctype)).reshape(n, hq, d)
    return out.to(q.dtype), lse.reshape(hq, n)


def sparse_attention(q, k, v, block_indices, block_size: int, scale: float | None = None):
    """Stage 2: softmax attention over the selected blocks, causal.

    q: (n, Hq, d), k, v: (nk, Hkv, d), block_indices: (Hkv, n, budget) -> out (n, Hq, d), lse (Hq, n).
    Differentiable in q, k, v through plain autograd.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _masked_attention(q, k, v, selection_mask(block_indices, k.shape[0], block_size), scale)


def dense_attention(q, k, v, scale: float | None = None):
    """Ordinary causal attention (queries are the last n positions). Same shapes as sparse_attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n, nk = q.shape[0], k.shape[0]
    positions = torch.arange(nk - n, nk, device=q.device)
    mask = torch.arange(nk, device=q.device)[None, :] <= positions[:, None]
    return _masked_attention(q, k, v, mask[None].expand(k.shape[1], -1, -1), scale)


def infllmv2_attention(q, k, v, config: SparseConfig, scale: float | None = None):
    """The switch for one sequence: dense below ``dense_len`` (key length), stages 1 + 2 otherwise.

    q: (n, Hq, d), k, v: (nk, Hkv, d) -> out (n, Hq, d), lse (Hq, n).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not config.is_sparse(k.shape[0]):
        return dense_attention(q, k, v, scale)
    idx = select_blocks(q.detach(), k.detach(), config, scale)
    return sparse_attention(q, k, v, idx, config.block_size, scale)
