"""Public API: ``infllmv2_attention`` (the switch), ``select_blocks`` (stage 1), ``sparse_attention`` (stage 2),
``infllmv2_with_kvcache`` (one decode step against a static KV cache).

Layouts (as flash-attn): batched ``q (batch, seqlen_q, Hq, d)``, ``k, v (batch, seqlen_k, Hkv, d)``, or
packed ``(total, heads, d)`` with int32 ``cu_seqlens``. Queries are the LAST ``seqlen_q`` positions of
their sequence's keys (``seqlen_q <= seqlen_k``: prefill when equal, decoding / chunked prefill with a
cache otherwise), causal. Everything is validated here, so kernels never see bad input.

Backends: ``"reference"`` (ops/naive.py, materialises masks: tests and small inputs), ``"torch"``
(ops/torch_chunked.py, memory-bounded, any device), ``"triton"`` (ops/triton, CUDA, fp16/bf16) and
``"auto"`` (triton when it applies, torch otherwise).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import SparseConfig, as_sparse_config
from .ops import naive, torch_chunked
from .ops.reuse import once_per_forward

__all__ = ["infllmv2_attention", "select_blocks", "sparse_attention", "infllmv2_with_kvcache", "BACKENDS",
           "triton_available"]

BACKENDS = ("auto", "reference", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_HEAD_DIMS = (32, 64, 128)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check_tensor(name: str, x, ranks) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))}, got shape {tuple(x.shape)}")


def _autocast_inputs(fn):
    """Under autocast: ``fn`` on its floating tensor arguments cast to autocast's dtype, as SDPA does
    (RoPE leaves q/k in fp32 while v is bf16), with autocast off inside (each path chooses its own
    precision; autocast would recast their fp32 accumulation)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        if dev is None or not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*_autocast_cast(dev, args), **kwargs)
    return wrapper


def _autocast_cast(dev, xs):
    dt = torch.get_autocast_dtype(dev)
    return tuple(x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs)


def _check_qkv(q, k, v, packed: bool) -> None:
    rank = 3 if packed else 4
    layout = "(total, heads, head_dim) with cu_seqlens" if packed else "(batch, seqlen, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, (rank,))
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[-1]} and {k.shape[-1]} (layout {layout})")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be positive")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a positive multiple of the KV heads ({hkv})")
    if not packed:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
        if q.shape[1] > k.shape[1]:
            raise ValueError(f"q has more positions ({q.shape[1]}) than k ({k.shape[1]}): queries are the last "
                             "seqlen_q positions of the keys")


def _check_cu_seqlens(name: str, cu, total: int, device) -> list:
    _check_tensor(name, cu, (1,))
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (0)")
    values = once_per_forward(name, cu, None, cu.tolist)
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {values[-1]}")
    return values


def triton_available() -> bool:
    try:
        from .ops import triton as _  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if q.device.type != "cuda" and not _interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors, got device {q.device}")
        if q.shape[-1] not in _TRITON_HEAD_DIMS:
            raise ValueError(f"backend='triton' supports head_dim in {_TRITON_HEAD_DIMS}, got {q.shape[-1]}")
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package")
        return backend
    if backend == "auto":
        if (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
                and q.shape[-1] in _TRITON_HEAD_DIMS and triton_available()):
            return "triton"
        return "torch"
    return backend


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def _scale(softmax_scale, d) -> float:
    if softmax_scale is None:
        return d ** -0.5
    if (not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) or softmax_scale <= 0
            or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    return float(softmax_scale)


# --------------------------------------------------------------------------------------------------
# Packing: every backend works on the packed layout
# --------------------------------------------------------------------------------------------------
def _to_packed(q, k, v, cu_seqlens, cu_seqlens_k):
    """Returns packed q, k, v, host lists of q/k offsets, and a function restoring q's layout."""
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k needs cu_seqlens (packed layout)")
        _check_qkv(q, k, v, packed=False)
        b, sq, hq, d = q.shape
        sk = k.shape[1]
        offs_q = [i * sq for i in range(b + 1)]
        offs_k = [i * sk for i in range(b + 1)]
        return (q.reshape(b * sq, hq, d), k.reshape(b * sk, *k.shape[2:]), v.reshape(b * sk, *v.shape[2:]),
                offs_q, offs_k, lambda x: x.reshape(b, sq, *x.shape[1:]))
    _check_qkv(q, k, v, packed=True)
    offs_q = _check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k has {k.shape[0]} packed tokens but q has {q.shape[0]}: pass cu_seqlens_k")
        offs_k = offs_q
    else:
        offs_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], k.device)
        if len(offs_k) != len(offs_q):
            raise ValueError(f"cu_seqlens ({len(offs_q)}) and cu_seqlens_k ({len(offs_k)}) must have one length")
        for i in range(len(offs_q) - 1):
            if offs_q[i + 1] - offs_q[i] > offs_k[i + 1] - offs_k[i]:
                raise ValueError(f"sequence {i} has more queries than keys: queries are the last positions of keys")
    return q, k, v, offs_q, offs_k, lambda x: x


def _cu(offs, device):
    """Host offsets as a device int32 tensor without a host synchronisation (a copy from pageable memory
    waits for the stream: after stage 1 was queued, that idled the GPU while the host prepared stage 2)."""
    n = len(offs)
    step = offs[1] - offs[0] if n > 1 else 0
    if all(offs[i] == i * step for i in range(n)):  # equal lengths: no copy at all
        return torch.arange(n, dtype=torch.int32, device=device) * step
    return _to_device(torch.tensor(offs, dtype=torch.int32), device)


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the device without a host synchronisation (through pinned memory)."""
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _select_packed(q, k, offs_q, offs_k, config, scale, backend, cu=None):
    """Stage 1 over a packed batch -> (Hkv, total_q, budget) int32. ``cu``: the offsets on the device, if made."""
    if backend == "triton":
        from .ops.triton.selection import select_blocks_compilable
        cu_q, cu_k = cu or (_cu(offs_q, q.device), _cu(offs_k, q.device))
        return select_blocks_compilable(q, k, config, cu_q, cu_k, _max_len(offs_q), _max_len(offs_k), scale,
                                        host_offsets=(offs_q, offs_k))
    impl = naive.select_blocks if backend == "reference" else torch_chunked.select_blocks
    out = torch.full((k.shape[1], q.shape[0], config.budget), -1, dtype=torch.int32, device=q.device)
    for i in range(len(offs_q) - 1):
        qs, ks = slice(offs_q[i], offs_q[i + 1]), slice(offs_k[i], offs_k[i + 1])
        if qs.stop > qs.start:
            out[:, qs] = impl(q[qs].detach(), k[ks].detach(), config, scale)
    return out


def _sparse_packed(q, k, v, idx, offs_q, offs_k, block_size, scale, backend, need_lse=True, cu=None):
    """Stage 2 over a packed batch -> (out (total_q, Hq, d), lse (Hq, total_q) or None when not needed)."""
    if backend == "triton":
        from .ops.triton import sparse_attention_triton
        cu_q, cu_k = cu or (_cu(offs_q, q.device), _cu(offs_k, q.device))
        return sparse_attention_triton(q, k, v, idx, block_size, cu_q, cu_k, _max_len(offs_q), _max_len(offs_k),
                                       scale)
    outs, lses = [], []
    for i in range(len(offs_q) - 1):
        qs, ks = slice(offs_q[i], offs_q[i + 1]), slice(offs_k[i], offs_k[i + 1])
        if backend == "reference":
            o, l = naive.sparse_attention(q[qs], k[ks], v[ks], idx[:, qs], block_size, scale)
        else:
            o, l = torch_chunked.sparse_attention(q[qs], k[ks], v[ks], idx[:, qs], block_size, scale,
                                                  return_lse=need_lse)
        outs.append(o)
        lses.append(None if l is None else l.float())
    lse = torch.cat(lses, dim=1) if lses and all(l is not None for l in lses) else None
    return torch.cat(outs), lse


def _max_len(offs) -> int:
    return max([b - a for a, b in zip(offs, offs[1:])], default=0)


def expand_kv_heads(k, v, hq: int):
    """(b, Hkv, n, d) keys/values repeated to ``hq`` heads, for SDPA calls with an ``attn_mask``: with a mask,
    ``enable_gqa=True`` sends CUDA to the math backend, which materialises fp32 scores (b, Hq, nq, nk)."""
    g = hq // k.shape[1]
    return (k, v) if g == 1 else (k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))


# SDPA's default order tries cuDNN first on Hopper, and cuDNN builds an execution plan for every new shape: 40-65 ms
# a forward on the H200 (as much again a backward), against 0.05-0.6 ms to run a decode step or a 4K document
# (benchmarks/dev_dense_docs.py). Calls whose shapes keep changing therefore leave cuDNN out (flash needs no plan):
# decode steps and chunks against a cache (a new key length at every step), a packed batch's documents (new
# lengths at every step) and prefills without gradients (inference: each prompt brings its own length). Batches of
# equal-length sequences in training keep SDPA's default: their shapes recur, and a planned cuDNN call is faster.
AVOID_CUDNN_PLANS = True  # benchmarks switch it off to measure what it saves
_NO_PLAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def no_cudnn_plans(x):
    """A context for SDPA calls on x's device whose shapes keep changing: cuDNN left out (on CUDA)."""
    return sdpa_kernel(_NO_PLAN_BACKENDS) if x.is_cuda and AVOID_CUDNN_PLANS else contextlib.nullcontext()


def dense_attention_sdpa(q, k, v, scale):
    """Dense causal attention of one batch of equal-length sequences through SDPA.

    q: (b, sq, Hq, d), k, v: (b, sk, Hkv, d); queries are the last sq positions.
    """
    sq, sk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    recurring = sq == sk and torch.is_grad_enabled()  # training batches: shapes that recur (see above)
    with contextlib.nullcontext() if recurring else no_cudnn_plans(q):
        if sq == sk:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
        elif sq == 1:
            out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=gqa)
        else:  # bottom-right aligned causal mask (SDPA's is_causal is top-left aligned)
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            out = F.scaled_dot_product_attention(qt, *expand_kv_heads(kt, vt, q.shape[2]), attn_mask=mask,
                                                 scale=scale)
    return out.transpose(1, 2)


# A packed batch's dense sequences run as a few right-padded SDPA batches rather than one call each (a call costs the
# host ~0.2 ms, and a row of the paper's length mix holds up to ~16 short documents). Right padding keeps causal
# attention exact: a query sees only earlier positions, never the padding after its sequence. Sequences are grouped
# longest first while the padded tokens stay within _PAD_SLACK of the real ones.
_PAD_SLACK = 1.25


def _dense_plan(offs_q, offs_k, ids, device):
    """How ``dense_documents`` runs the sequences ``ids`` -> (calls, take). calls: per SDPA call, a sequence id (its
    rows as they are) or (n, L, q_rows, k_rows), n sequences right-padded to L as gather indices (a padding slot
    repeats its sequence's last row). take: the rows of the calls' flattened outputs that are, in the order of
    ``ids``, the sequences' rows; None when that is all of them in order."""
    lens = {i: offs_q[i + 1] - offs_q[i] for i in ids}
    ids = [i for i in ids if lens[i] > 0]
    equal = [i for i in ids if offs_k[i + 1] - offs_k[i] == lens[i]]  # no cache: these can share a padded batch
    groups, group = [], []
    for i in sorted(equal, key=lambda i: -lens[i]):
        if group and (len(group) + 1) * lens[group[0]] > _PAD_SLACK * (sum(lens[j] for j in group) + lens[i]):
            groups.append(group)
            group = []
        group.append(i)
    groups += [group] if group else []
    shared = set(equal)
    groups += [[i] for i in ids if i not in shared]
    calls, start, base = [], {}, 0
    for group in groups:
        if len(group) == 1:
            calls.append(group[0])
            start[group[0]] = base
            base += lens[group[0]]
            continue
        n, L = len(group), lens[group[0]]
        rows = [torch.cat([torch.arange(offs[i], offs[i] + L).clamp_(max=offs[i + 1] - 1) for i in group])
                for offs in (offs_q, offs_k)]
        calls.append((n, L, *(_to_device(r, device) for r in rows)))
        start.update({i: base + j * L for j, i in enumerate(group)})
        base += n * L
    if calls == ids:  # each sequence alone, in the order asked: the outputs are already in place
        return calls, None
    take = torch.cat([torch.arange(start[i], start[i] + lens[i]) for i in ids])
    return calls, _to_device(take, device)


def dense_documents(qp, kp, vp, offs_q, offs_k, ids, scale, reuse_key=None) -> torch.Tensor:
    """Dense causal attention of the packed sequences ``ids`` -> their rows' outputs, concatenated in that order.

    qp: (total_q, Hq, d), kp, vp: (total_k, Hkv, d); sequence i holds queries ``offs_q[i]:offs_q[i+1]`` (the last
    of its keys ``offs_k[i]:offs_k[i+1]``). reuse_key: the offset tensors, when every layer passes the same ones
    (the plan is then made once a forward).
    """
    def plan():
        return _dense_plan(offs_q, offs_k, ids, qp.device)

    calls, take = (plan() if reuse_key is None else
                   once_per_forward("dense_plan", reuse_key, (tuple(ids), str(qp.device)), plan, device_result=True))
    outs = []
    with no_cudnn_plans(qp):
        for call in calls:
            if isinstance(call, int):
                a, b, c, e = offs_q[call], offs_q[call + 1], offs_k[call], offs_k[call + 1]
                outs.append(dense_attention_sdpa(qp[None, a:b], kp[None, c:e], vp[None, c:e], scale)[0])
            else:
                n, L, q_rows, k_rows = call
                q, k, v = (x.index_select(0, r).view(n, L, *x.shape[1:])
                           for x, r in ((qp, q_rows), (kp, k_rows), (vp, k_rows)))
                outs.append(dense_attention_sdpa(q, k, v, scale).reshape(n * L, *qp.shape[1:]))
    if not outs:  # no query rows: an empty output, still in q's graph as a concatenation of empty pieces would be
        return qp[:0].clone()
    flat = torch.cat(outs) if len(outs) > 1 else outs[0]
    return flat if take is None else flat.index_select(0, take)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
@_autocast_inputs
def infllmv2_attention(q, k, v, config: Optional[SparseConfig] = None, *, cu_seqlens=None, cu_seqlens_k=None,
                       max_seqlen=None, softmax_scale=None, backend: str = "auto"):
    """InfLLM-V2 attention with the dense/sparse switch, causal, differentiable in q, k, v.

    q: (batch, seqlen_q, Hq, d), k, v: (batch, seqlen_k, Hkv, d)    -> (batch, seqlen_q, Hq, d)
    or packed q: (total_q, Hq, d), k, v: (total_k, Hkv, d) with int32 ``cu_seqlens`` (batch+1,)
    (and ``cu_seqlens_k`` when keys include a cache)                  -> (total_q, Hq, d)

    Per sequence: key length < ``config.dense_len`` runs dense causal attention, otherwise stage 1
    (block selection) + stage 2 (sparse attention). ``max_seqlen`` is accepted for flash-attn
    compatibility (the lengths are read from ``cu_seqlens``).
    """
    config = as_sparse_config(config)
    if config.use_nope:
        raise ValueError("config.use_nope=True needs pre-RoPE q/k: score them with select_blocks and call "
                         "sparse_attention (infllmv2_attention only sees post-RoPE q/k)")
    packed_in = cu_seqlens is not None
    qp, kp, vp, offs_q, offs_k, unpack = _to_packed(q, k, v, cu_seqlens, cu_seqlens_k)
    scale = _scale(softmax_scale, q.shape[-1])
    backend = _resolve_backend(backend, q)
    n_seq = len(offs_q) - 1
    sparse = [config.is_sparse(offs_k[i + 1] - offs_k[i]) for i in range(n_seq)]

    if not any(sparse):  # all dense: straight to SDPA (the short-input fast path)
        if not packed_in:
            return dense_attention_sdpa(q, k, v, scale)
        return dense_documents(qp, kp, vp, offs_q, offs_k, list(range(n_seq)), scale,
                               (cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k))

    if all(sparse):
        cu = None
        if backend == "triton":  # the caller's offsets where given (checked equal to offs_q / offs_k)
            cu = ((cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k) if packed_in
                  else (_cu(offs_q, qp.device), _cu(offs_k, qp.device)))
        idx = _select_packed(qp, kp, offs_q, offs_k, config, scale, backend, cu)
        out, _ = _sparse_packed(qp, kp, vp, idx, offs_q, offs_k, config.block_size, scale, backend, need_lse=False,
                                cu=cu)
        return unpack(out)

    # Mixed packed batch (only packed inputs have sequences of several lengths): run the sparse sequences as one
    # sub-batch, the dense ones through SDPA, then put the rows back in order. The sub-batch's rows and offsets and
    # that order follow from the offsets alone: made once a forward when every layer passes the same ones.
    offsets = (cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k)
    sparse_ids = [i for i in range(n_seq) if sparse[i]]
    dense_ids = [i for i in range(n_seq) if not sparse[i]]

    def sub_batch():
        rows = [_to_device(torch.cat([torch.arange(offs[i], offs[i + 1]) for i in sparse_ids]), qp.device)
                for offs in (offs_q, offs_k)]
        sub_q, sub_k = [0], [0]
        for i in sparse_ids:
            sub_q.append(sub_q[-1] + offs_q[i + 1] - offs_q[i])
            sub_k.append(sub_k[-1] + offs_k[i + 1] - offs_k[i])
        cu = (_cu(sub_q, qp.device), _cu(sub_k, qp.device)) if backend == "triton" else None
        # row r of the output is row order[r] of cat(sparse sub-batch's output, dense sequences' output)
        place, n_sparse, n_dense = [], 0, sub_q[-1]
        for i in range(n_seq):
            n = offs_q[i + 1] - offs_q[i]
            place.append(torch.arange(n_sparse, n_sparse + n) if sparse[i] else torch.arange(n_dense, n_dense + n))
            n_sparse, n_dense = (n_sparse + n, n_dense) if sparse[i] else (n_sparse, n_dense + n)
        return rows, sub_q, sub_k, cu, _to_device(torch.cat(place), qp.device)

    (q_rows, k_rows), sub_q, sub_k, cu, order = once_per_forward(
        "sparse_sub_batch", offsets, (config.dense_len, backend, str(qp.device)), sub_batch, device_result=True)
    # index_select: its backward adds into the rows (index_add_), where indexing's sorts the indices first
    qs, ks, vs = qp.index_select(0, q_rows), kp.index_select(0, k_rows), vp.index_select(0, k_rows)
    idx = _select_packed(qs, ks, sub_q, sub_k, config, scale, backend, cu)
    sparse_out, _ = _sparse_packed(qs, ks, vs, idx, sub_q, sub_k, config.block_size, scale, backend,
                                   need_lse=False, cu=cu)
    dense_out = dense_documents(qp, kp, vp, offs_q, offs_k, dense_ids, scale, offsets)
    return torch.cat([sparse_out, dense_out]).index_select(0, order)


@_autocast_inputs
def select_blocks(q, k, config: Optional[SparseConfig] = None, *, cu_seqlens=None, cu_seqlens_k=None,
                  softmax_scale=None, backend: str = "auto"):
    """Stage 1 alone: which blocks each token sees (no gradients).

    q: (batch, seqlen_q, Hq, d), k: (batch, seqlen_k, Hkv, d) -> (Hkv, batch * seqlen_q, budget) int32
    or packed q: (total_q, Hq, d), k: (total_k, Hkv, d) + cu_seqlens -> (Hkv, total_q, budget) int32.
    Indices are relative to each sequence's first key, sorted ascending, padded with -1; all G query
    heads of a KV head share them. (Pass pre-RoPE q/k here for ``use_nope``.)
    """
    config = as_sparse_config(config)
    qp, kp, _, offs_q, offs_k, _ = _to_packed(q, k, k, cu_seqlens, cu_seqlens_k)
    scale = _scale(softmax_scale, q.shape[-1])
    backend = _resolve_backend(backend, q)
    with torch.no_grad():
        return _select_packed(qp.detach(), kp.detach(), offs_q, offs_k, config, scale, backend)


@_autocast_inputs
def sparse_attention(q, k, v, block_indices, *, block_size: int = 64, cu_seqlens=None, cu_seqlens_k=None,
                     softmax_scale=None, backend: str = "auto", return_lse: bool = False):
    """Stage 2 alone: causal softmax attention of each token over its selected blocks.

    q: (batch, seqlen_q, Hq, d) or packed (total_q, Hq, d); k, v likewise with Hkv heads;
    block_indices: (Hkv, total_q, budget) int (as ``select_blocks`` returns; -1 = padding).
    Returns out shaped like q (and lse (Hq, total_q) float32 if ``return_lse``). Differentiable in q, k, v.
    """
    qp, kp, vp, offs_q, offs_k, unpack = _to_packed(q, k, v, cu_seqlens, cu_seqlens_k)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    _check_tensor("block_indices", block_indices, (3,))
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_indices must be int32 or int64, got {block_indices.dtype}")
    if block_indices.device != q.device:
        raise ValueError(f"block_indices must be on {q.device}, got {block_indices.device}")
    if block_indices.shape[0] != kp.shape[1] or block_indices.shape[1] != qp.shape[0]:
        raise ValueError(f"block_indices must have shape (Hkv={kp.shape[1]}, total_q={qp.shape[0]}, budget), "
                         f"got {tuple(block_indices.shape)}")
    max_blocks = -(-_max_len(offs_k) // block_size)
    lo, hi = torch.stack(torch.aminmax(block_indices)).tolist() if block_indices.numel() else (-1, -1)  # one read
    if hi >= max_blocks or lo < -1:
        raise ValueError(f"block_indices must lie in [-1, {max_blocks - 1}] (blocks of the longest sequence)")
    scale = _scale(softmax_scale, q.shape[-1])
    backend = _resolve_backend(backend, q)
    out, lse = _sparse_packed(qp, kp, vp, block_indices.to(torch.int32).contiguous(), offs_q, offs_k, block_size,
                              scale, backend)
    return (unpack(out), lse) if return_lse else unpack(out)


def _check_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, compressed_keys, cache_leftpad, config):
    _check_tensor("q", q, (4,))
    b, sq, hq, d = q.shape
    if sq < 1:
        raise ValueError(f"q must be (batch, seqlen_q >= 1, Hq, d), got {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x, (4,))
        if x.shape[0] != b or x.shape[3] != d or x.shape != k_cache.shape:
            raise ValueError(f"{name} must be (batch={b}, max_len, Hkv, d={d}) like k_cache, got {tuple(x.shape)}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must have q's dtype {q.dtype} and device {q.device}, got {x.dtype} {x.device}")
    hkv = k_cache.shape[2]
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a positive multiple of k_cache's ({hkv})")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new token's key and value) or both left out")
    for name, x in (("k", k), ("v", v)):
        if x is not None:
            _check_tensor(name, x, (4,))
            if tuple(x.shape) != (b, sq, hkv, d) or x.device != q.device:
                raise ValueError(f"{name} must be (batch={b}, seqlen_q={sq}, Hkv={hkv}, d={d}) on {q.device}, got "
                                 f"{tuple(x.shape)} on {x.device}")
            if x.dtype != k_cache.dtype:  # written into the cache: a cast would hide a mismatch
                raise TypeError(f"{name} must have the caches' dtype {k_cache.dtype}, got {x.dtype}")
    for name, x in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)):
        if x is None and name == "cache_leftpad":
            continue
        if not isinstance(x, torch.Tensor) or x.shape != (b,) or x.dtype != torch.int32 or x.device != q.device:
            raise ValueError(f"{name} must be a (batch={b},) int32 tensor on {q.device}, got "
                             f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    if compressed_keys is not None:
        from .cache import StaticCompressedKeys
        if not isinstance(compressed_keys, StaticCompressedKeys):
            raise TypeError(f"compressed_keys must be an infllmv2.cache.StaticCompressedKeys, got "
                            f"{type(compressed_keys).__name__}")
        want = [(config.kernel_size, config.kernel_stride)]
        if config.lse_approx:
            want.append((config.coarse_kernel_size, config.coarse_kernel_stride))
        if list(compressed_keys.specs) != want:
            raise ValueError(f"compressed_keys hold windows {compressed_keys.specs}, config asks for {want}")
        for buf, (_, stride) in zip(compressed_keys.buffers, compressed_keys.specs):
            if buf.shape[0] != b or buf.shape[2:] != k_cache.shape[2:] or buf.device != q.device:
                raise ValueError(f"compressed_keys buffers must be (batch={b}, n, Hkv={hkv}, d={d}) on {q.device}, "
                                 f"got {tuple(buf.shape)} on {buf.device}")
            if buf.shape[1] < max(1, k_cache.shape[1] // stride):  # windows past it would overwrite its last row
                raise ValueError(f"compressed_keys were made for a cache of {buf.shape[1] * stride} slots, k_cache "
                                 f"has {k_cache.shape[1]}: make them with max_len={k_cache.shape[1]}")
    # the cache's extent, read on the host unless a graph is being captured or compiled (then trusted)
    if not torch.compiler.is_compiling() and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        n = cache_seqlens.long() + (0 if k is None else sq)  # keys after the call; the first query sees n - sq + 1
        first = torch.zeros_like(n) if cache_leftpad is None else cache_leftpad.long()
        if bool(((n < sq) | (first < 0) | (first + n > k_cache.shape[1])).any()):  # one host read
            raise ValueError(f"every row needs seqlen_q={sq} to max_len={k_cache.shape[1]} keys in the cache, from "
                             "slot cache_leftpad (the new tokens counted): check cache_seqlens and cache_leftpad")


def infllmv2_with_kvcache(q, k_cache, v_cache, cache_seqlens, config: Optional[SparseConfig] = None, *, k=None,
                          v=None, compressed_keys=None, cache_leftpad=None, softmax_scale=None,
                          backend: str = "auto"):
    """Decoding against a static KV cache, as flash-attn's ``flash_attn_with_kvcache``.

    q: (batch, seqlen_q, Hq, d), the newest tokens of each row (one when decoding; a few to verify a speculative
    draft); k_cache, v_cache: (batch, max_len, Hkv, d), row i's keys in slots
    ``cache_leftpad[i] : cache_leftpad[i] + cache_seqlens[i]`` (cache_leftpad default 0); cache_seqlens: (batch,)
    int32, the keys already in the cache.
    k, v: optional (batch, seqlen_q, Hkv, d), the new tokens' keys and values: written into k_cache / v_cache in
    place from slot ``cache_leftpad + cache_seqlens`` on (the caller then adds seqlen_q to its lengths), their
    completed compressed windows appended to ``compressed_keys``, and attended to. Without k / v the queries are the
    last seqlen_q of the cached keys. Query t sees the keys up to its own position (causal).
    compressed_keys: the cache's ``infllmv2.cache.StaticCompressedKeys`` (each row's fine / coarse compressed
    keys, kept up to date here when k is given): each step then costs O(selected keys); None compresses the
    whole cache at every call.
    -> (batch, seqlen_q, Hq, d). Per query: fewer keys than ``config.dense_len`` attend to all of them, otherwise to
    the selected blocks (SPEC stage 1 + 2). Each token is one decode step (on CUDA: one launch for its cache write,
    then the decode kernels). Fixed shapes, no host synchronisation under ``torch.compile`` or CUDA graph capture
    (eagerly the lengths are checked on the host). backend: "auto" (Triton on CUDA for fp16 / bf16 and head dims
    32 / 64 / 128), "triton", or "torch" ("reference" runs the torch path too).
    """
    config = as_sparse_config(config)
    if config.use_nope:
        raise ValueError("config.use_nope=True needs pre-RoPE keys for the selection, which a KV cache of "
                         "post-RoPE keys does not hold")
    _check_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, compressed_keys, cache_leftpad, config)
    scale = _scale(softmax_scale, q.shape[-1])
    backend = _resolve_backend(backend, q)
    if backend == "triton" and compressed_keys is not None and any(b.dtype != q.dtype for b in compressed_keys.buffers):
        raise ValueError(f"compressed_keys must hold q's dtype {q.dtype} for the Triton kernels, got "
                         f"{[b.dtype for b in compressed_keys.buffers]}")  # checked before anything is written
    from .cache import StaticCompressedKeys, append_windows
    sq = q.shape[1]
    if backend != "triton" and compressed_keys is None:  # the torch path needs them: from scratch (host loop)
        b, max_len, hkv, d = k_cache.shape
        compressed_keys = StaticCompressedKeys(b, max_len, hkv, d, config, k_cache.dtype, k_cache.device)
        compressed_keys.prefill(k_cache, cache_seqlens, cache_leftpad)  # new tokens' windows are appended below
    kinds = compressed_keys.kinds() if compressed_keys is not None else []
    fine, coarse = (compressed_keys.fine, compressed_keys.coarse) if compressed_keys is not None else (None, None)
    if backend == "triton":
        from .ops.triton import infllmv2_decode_triton

        def decode_one(qt, lens):
            return infllmv2_decode_triton(qt, k_cache, v_cache, lens, config, scale, k_fine=fine, k_coarse=coarse,
                                          cache_leftpad=cache_leftpad)
    else:
        from .ops.torch_decode import decode_static
        leftpad = cache_leftpad if cache_leftpad is not None else torch.zeros_like(cache_seqlens)

        def decode_one(qt, lens):
            return decode_static(qt, k_cache, v_cache, lens, leftpad, fine, coarse, config, scale)
    outs = []
    for t in range(sq):  # token t: its key / value written, then its query over the keys up to it
        lens = cache_seqlens + (t + 1 if k is not None else t + 1 - sq)
        if k is not None:
            append_windows(kinds, k_cache, lens, cache_leftpad, fused=backend == "triton",
                           new=(k[:, t], v[:, t], v_cache))
        outs.append(decode_one(q[:, t], lens))
    return outs[0][:, None] if sq == 1 else torch.stack(outs, 1)  # one token: a view, no copy kernel
