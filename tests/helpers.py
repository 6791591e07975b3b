"""Independent brute-force oracles (python loops over the SPEC's formulas) and input makers."""
from __future__ import annotations

import math

import torch

from infllmv2 import SparseConfig

SMALL = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, window_size=16, topk=3,
                     dense_len=-1)


def rand_qkv(n, hq, hkv, d, nk=None, dtype=torch.float64, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    lead = () if batch is None else (batch,)
    q = torch.randn(*lead, n, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(*lead, nk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(*lead, nk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def brute_block_scores(q, k, cfg: SparseConfig, scale):
    """SPEC stage 1 steps 1-6 with explicit loops. q (n, Hq, d), k (nk, Hkv, d) -> (Hkv, n, nb) float64."""
    n, hq, d = q.shape
    nk, hkv, _ = k.shape
    G = hq // hkv
    q, k = q.double(), k.double()
    lc, sc, B = cfg.kernel_size, cfg.kernel_stride, cfg.block_size

    def comp(kern, stride):
        m = (nk - kern) // stride + 1 if nk >= kern else 0
        return [k[j * stride:j * stride + kern].mean(0) for j in range(m)]

    fine, coarse = comp(lc, sc), comp(4 * lc, 4 * sc)
    nb = -(-nk // B)
    out = torch.zeros(hkv, n, nb, dtype=torch.float64)
    for i in range(n):
        t = nk - n + i
        vis = [j for j in range(len(fine)) if j * sc + lc <= t + 1]
        visc = [j for j in range(len(coarse)) if j * 4 * sc + 4 * lc <= t + 1]
        for h in range(hkv):
            S = [0.0] * len(fine)
            for gg in range(G):
                qi = q[i, h * G + gg]
                if not vis:
                    continue
                if cfg.lse_approx and visc:
                    lse = torch.logsumexp(torch.stack([scale * qi @ coarse[j][h] for j in visc]), 0)
                else:
                    lse = torch.logsumexp(torch.stack([scale * qi @ fine[j][h] for j in vis]), 0)
                for j in vis:
                    S[j] += math.exp(float(scale * qi @ fine[j][h] - lse))
            for b in range(nb):
                over = [S[j] for j in range(len(fine)) if j * sc < (b + 1) * B and j * sc + lc > b * B]
                out[h, i, b] = max(over) if over else 0.0
    return out


def brute_select(q, k, cfg: SparseConfig, scale):
    """SPEC stage 1 complete -> list over heads of list over tokens of sorted block lists."""
    scores = brute_block_scores(q, k, cfg, scale)
    hkv, n, nb = scores.shape
    nk = k.shape[0]
    res = []
    for h in range(hkv):
        rows = []
        for i in range(n):
            bq = (nk - n + i) // cfg.block_size
            forced = {b for b in range(nb) if b <= bq and (b < cfg.init_blocks or b >= bq - cfg.local_blocks)}
            cands = [b for b in range(cfg.init_blocks, max(cfg.init_blocks, bq - cfg.local_blocks))]
            cands.sort(key=lambda b: (-float(scores[h, i, b]), b))
            free = max(0, cfg.budget - len(forced))
            rows.append(sorted(forced | set(cands[:free])))
        res.append(rows)
    return res, scores


def masked_sdpa(q, k, v, mask, scale=None):
    """Dense attention under a boolean mask (Hkv, n, nk) through torch SDPA: the independent stage-2 oracle."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    G = hq // hkv
    m = mask.repeat_interleave(G, dim=0)  # (Hq, n, nk)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(G, 1).transpose(0, 1), v.repeat_interleave(G, 1).transpose(0, 1),
        attn_mask=m, scale=scale)
    return out.transpose(0, 1)


def mask_from_indices(idx, nk, B):
    """(Hkv, n, budget) -> (Hkv, n, nk) allowed-and-causal mask, built with loops."""
    hkv, n, _ = idx.shape
    m = torch.zeros(hkv, n, nk, dtype=torch.bool)
    for h in range(hkv):
        for i in range(n):
            t = nk - n + i
            for b in idx[h, i].tolist():
                if b >= 0:
                    m[h, i, b * B:min(nk, (b + 1) * B)] = True
            m[h, i, t + 1:] = False
    return m


TINY_VOCAB = 97  # the tiny random transformers models of the integration tests


def random_ids(n, batch=1, seed=1):
    """(batch, n) token ids of a tiny model, avoiding the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (batch, n), generator=g)


def cache_of(out):
    """The cache a transformers forward returned (its attribute name changed across versions)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def assert_selection_matches_by_score(q, k, cfg, got, scale, rtol, atol):
    """Selections compared by score (bf16 ties may pick other blocks): the reference block scores summed
    over the chosen blocks equal those of the reference selection. q (n, Hq, d), got (Hkv, n, budget)."""
    from infllmv2.ops import naive

    ref = naive.select_blocks(q.float(), k.float(), cfg, scale)
    sc = naive.block_scores(q.float(), k.float(), cfg, scale)
    nb = sc.shape[-1]
    scp = torch.cat([sc, sc.new_zeros(sc.shape[:-1] + (1,))], -1)
    sg = torch.gather(scp, -1, torch.where(got < 0, nb, got.long())).sum(-1)
    sr = torch.gather(scp, -1, torch.where(ref < 0, nb, ref.long())).sum(-1)
    torch.testing.assert_close(sg, sr, rtol=rtol, atol=atol)
    assert torch.equal((got >= 0).sum(-1), (ref >= 0).sum(-1))  # selection sizes agree exactly
    return ref
