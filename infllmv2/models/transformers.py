"""InfLLM-V2 as a ``transformers`` attention implementation.

``register()`` (run by ``import infllmv2``) adds the implementation ``"infllmv2"`` to transformers'
``AttentionInterface`` together with a mask function that never materialises an n x n mask: the
model's 2D padding mask (or ``None`` when nothing is padded) reaches the attention function, which
handles causality itself and turns padded rows into a packed varlen batch.

``enable(model, config)`` switches a (G)QA causal LM (Llama, Qwen2/Qwen3, Mistral, SmolLM2, ...) to
InfLLM-V2 in place with zero new parameters: it stores ``model.config.sparse_config`` (a MiniCPM4-style
dict) and sets the attention implementation. Forward, ``loss.backward()`` and ``generate()`` work;
each layer decides dense or sparse from its key length (KV cache included), so a sequence that
grows past ``dense_len`` while decoding switches to sparse at that step. With a plain transformers
cache, decoding recomputes the compressed keys from the cache at each step; with an
``infllmv2.cache.InfLLMv2Cache`` it keeps them and extends them incrementally (``_cached_attention``).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import torch

from ..attention import BACKENDS, _autocast_inputs, _resolve_backend, infllmv2_attention
from ..cache import filled_slots, lookup_layer, row_layout
from ..config import SparseConfig, as_sparse_config
from ..ops.reuse import once_per_forward

__all__ = ["ATTN_IMPLEMENTATION", "register", "enable", "disable", "infllmv2_attention_forward", "infllmv2_mask",
           "attention_modules", "sparse_config_of"]

ATTN_IMPLEMENTATION = "infllmv2"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------------
# Configuration stored on the model
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _parse_sparse_config(items: tuple) -> SparseConfig:
    return SparseConfig.from_dict(dict(items))


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def sparse_config_of(config: Any) -> SparseConfig:
    """The SparseConfig stored in a transformers config as ``sparse_config`` (dict as MiniCPM4 keeps it).

    Parsed once per distinct dict (cached), so the attention call does not re-validate it every layer.
    A missing ``sparse_config`` means the MiniCPM4 defaults.
    """
    raw = getattr(config, "sparse_config", None)
    if raw is None:
        return SparseConfig()
    if isinstance(raw, SparseConfig):  # stored back as its dict, which save_pretrained can write
        config.sparse_config = raw.to_dict()
        return raw
    if not isinstance(raw, dict):
        raise TypeError(f"config.sparse_config must be a dict (MiniCPM4 sparse_config) or a SparseConfig, "
                        f"got {type(raw).__name__}")
    try:
        return _parse_sparse_config(tuple(sorted((k, _freeze(v)) for k, v in raw.items())))
    except (TypeError, ValueError) as err:
        raise type(err)(f"invalid config.sparse_config {raw!r}: {err}") from None


def _layer_sparse_config(module) -> SparseConfig:
    """``sparse_config_of(module.config)``, remembered on the layer while the dict is unchanged (a plain
    comparison that torch.compile can trace, unlike the parsing)."""
    raw = getattr(module.config, "sparse_config", None)
    hit = module.__dict__.get("_infllmv2_parsed")
    if hit is not None and hit[0] == raw:
        return hit[1]
    config = sparse_config_of(module.config)
    # once a layer: a model loaded with attn_implementation="infllmv2" never went through enable()'s checks
    _check_supported(module.config, config, type(module).__name__)
    raw = getattr(module.config, "sparse_config", None)
    module._infllmv2_parsed = (dict(raw) if isinstance(raw, dict) else raw, config)
    return config


def _check_supported(cfg, sparse: SparseConfig, owner: str) -> None:
    """Refuse what InfLLM-V2 in a transformers model cannot run as asked: layers restricted to less than the causal
    prefix (it would widen them silently), and ``use_nope`` (the attention function gets post-RoPE q / k only)."""
    restricted = _restricted_attention(cfg)
    if restricted:
        raise ValueError(f"{owner} does not attend over the full causal prefix in every layer ({restricted}); "
                         "InfLLM-V2 replaces full causal attention: set config.sliding_window = None "
                         "(attention_chunk_size = None, layer_types all 'full_attention') first")
    if sparse.use_nope:
        raise ValueError("sparse_config use_nope=True needs pre-RoPE q / k for the selection, which transformers' "
                         "attention functions do not receive: set use_nope to False")


# --------------------------------------------------------------------------------------------------
# The attention function transformers calls
# --------------------------------------------------------------------------------------------------
def _segments_from_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int):
    """Packed sequences in one row (position ids restarting), as transformers detects them.

    Returns int32 cu_seqlens over the flattened (batch * seqlen) tokens, or None when every row is a
    single sequence.
    """
    if position_ids is None or not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    if position_ids.shape[-1] != seqlen:
        return None
    return once_per_forward("segments", position_ids, (batch, seqlen),
                            lambda: _segments(position_ids, batch, seqlen))


def _segments(position_ids: torch.Tensor, batch: int, seqlen: int):
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if int(starts.sum()) == batch:  # one sequence per row
        return None
    flat = torch.nonzero(starts.reshape(-1)).flatten().tolist() + [batch * seqlen]
    cu = torch.tensor(flat, dtype=torch.int32, device=position_ids.device)
    once_per_forward("cu_seqlens", cu, None, lambda: flat)  # what every layer's check of cu reads back
    return cu


@_autocast_inputs  # bf16 training: RoPE leaves q/k in fp32 and v in bf16; cast as SDPA does
def infllmv2_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function: query (b, Hq, s, d), key/value (b, Hkv, sk, d) (cache included).

    ``attention_mask`` is ``None`` or the 2D padding mask (b, L) that ``infllmv2_mask`` passes on
    (L <= sk; ``L < sk`` = unused static-cache slots). Returns ``(out (b, s, Hq, d), None)``.
    """
    if dropout:
        raise ValueError(f"infllmv2 attention does not support attention dropout (got {dropout}); "
                         "set config.attention_dropout = 0.0 (or model.eval())")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError("infllmv2 attention is causal only; this attention layer asked for non-causal attention")
    if kwargs.get("softcap") is not None:
        raise ValueError("infllmv2 attention does not support attention logit softcapping")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"infllmv2 attention replaces full attention; this layer uses a sliding window "
                         f"({kwargs['sliding_window']}): set config.sliding_window = None before enable()")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("infllmv2 attention does not support attention sinks")
    config = _layer_sparse_config(module)
    backend = kwargs.get("infllmv2_backend") or getattr(module, "_infllmv2_backend", "auto")

    q = query.transpose(1, 2)  # (b, s, Hq, d)
    k = key.transpose(1, 2)    # (b, sk, Hkv, d)
    v = value.transpose(1, 2)
    b, sq = q.shape[0], q.shape[1]

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"infllmv2 attention takes a 2D padding mask (batch, keys); got a {attention_mask.dim()}D "
                             f"mask of shape {tuple(attention_mask.shape)} (custom 4D masks are not supported)")
        mask = attention_mask.to(device=q.device, dtype=torch.bool)
        length = mask.shape[1]
        if mask.shape[0] != b or length > k.shape[1] or length < sq:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit batch {b}, {sq} queries "
                             f"and {k.shape[1]} keys")
        if length < k.shape[1]:  # static cache: slots past the mask are not filled yet
            k, v = k[:, :length], v[:, :length]
    else:
        mask = None

    observer = getattr(module, "_infllmv2_observer", None)
    cache_layer = lookup_layer(key, kwargs) if observer is None else None
    if attention_mask is not None and attention_mask.dtype == STATIC_SLOTS_DTYPE:
        if sq == 1 and getattr(cache_layer, "_infllmv2_static", False):
            out = _static_decode(cache_layer, q, k, v, mask, config, scaling, backend, attention_mask)
            if out is not None:
                return out, None
        # otherwise keep the filled slots only (a host sync): the queries are the last of them
        filled = once_per_forward("filled", attention_mask, tuple(mask.shape), lambda: int(torch.where(
            mask.any(0), torch.arange(1, mask.shape[1] + 1, device=mask.device), 0).amax()))
        k, v, mask = k[:, :filled], v[:, :filled], mask[:, :filled]
    if mask is not None and once_per_forward("mask_all", attention_mask, tuple(mask.shape), lambda: bool(mask.all())):
        mask = None
    if cache_layer is not None and attention_mask is None and sq == k.shape[1] \
            and _segments_from_position_ids(kwargs.get("position_ids"), b, sq) is not None:
        cache_layer = None  # packed sequences in a row: one sequence per row is what the cache tracks
    if cache_layer is None and observer is None and sq < k.shape[1]:
        _warn_plain_cache(config, k.shape[1])
    if cache_layer is not None:  # an InfLLMv2Cache: use (and extend) its compressed keys
        out = _cached_attention(cache_layer, q, k, v, mask, config, scaling, backend, attention_mask)
        if out is not None:
            return out, None
    if mask is not None:
        return _padded_attention(q, k, v, mask, config, scaling, backend, module), None

    if attention_mask is None and sq == k.shape[1]:
        cu = _segments_from_position_ids(kwargs.get("position_ids"), b, sq)
        if cu is not None:  # packed sequences in a row (e.g. DataCollatorWithFlattening)
            if observer is not None:
                observer(module, q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sq, *k.shape[2:]), cu, cu)
            out = infllmv2_attention(q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sq, *k.shape[2:]),
                                     v.reshape(b * sq, *v.shape[2:]), config, cu_seqlens=cu, softmax_scale=scaling,
                                     backend=backend)
            return out.reshape(b, sq, *out.shape[1:]), None
    if observer is not None:
        observer(module, q, k, None, None)
    return infllmv2_attention(q, k, v, config, softmax_scale=scaling, backend=backend), None


_WARNED_PLAIN_CACHE = []


def _warn_plain_cache(config: SparseConfig, key_len: int) -> None:
    """Once a process: sparse attention over a cache that keeps no compressed keys pools all of them again at every
    step (correct, but slow at long lengths). generate() on a model loaded with attn_implementation="infllmv2"
    makes such a cache: ``enable`` is what makes it use ``InfLLMv2Cache``."""
    if _WARNED_PLAIN_CACHE or not config.is_sparse(key_len) or torch.compiler.is_compiling():
        return
    _WARNED_PLAIN_CACHE.append(True)
    warnings.warn("InfLLM-V2 attention is running over a KV cache that keeps no compressed keys, so every step pools "
                  "them again from all cached keys. Call infllmv2.enable(model) (generate() then uses "
                  "infllmv2.InfLLMv2Cache), or pass cache=infllmv2.InfLLMv2Cache() yourself.", stacklevel=3)


def _cached_attention(layer, q, k, v, mask, config, scaling, backend, attention_mask):
    """Attention with the compressed keys an ``InfLLMv2Cache`` layer keeps (None: not applicable here).

    q (b, sq, Hq, d), k/v (b, sk, Hkv, d) with the cache included; mask None or (b, sk) padding mask.
    CUDA decode steps run the Triton decode kernel given the cached compressed keys (a padded batch
    too when each row's keys are contiguous and end at the last slot, as generate()'s left padding);
    the torch backend runs each row through ``ops.torch_decode`` (decode and chunked prefill alike).
    Other cases (Triton prefill, holes in a padding mask) return None after updating the compressed
    keys, and the caller's path (which pools from scratch) runs.
    """
    resolved = _resolve_backend(backend, q)
    if resolved == "reference" or config.use_nope:
        return None
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    slots = layout = None
    if mask is not None:  # each row's filled slots on the device, and on the host (one read): once a forward
        slots, layout = once_per_forward("padded_rows", attention_mask, tuple(mask.shape), lambda: _rows_of(mask))
    # a static cache builds them at once, so that its decode steps never decide on the host
    state = layer.infllmv2_compressed(mask, config, length=sk, build=getattr(layer, "_infllmv2_static", False),
                                      layout=layout)
    if state is None:  # no row sparse yet (lazy): the plain path (dense) runs
        return None
    scale = d ** -0.5 if scaling is None else float(scaling)
    if resolved == "triton":
        if sq != 1 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return None  # prefill, or a decode step under autograd (the decode kernels have no backward)
        from ..ops.triton import infllmv2_decode_triton
        leftpad = lens = None
        if mask is not None:
            if any(first is None or n == 0 or first + n != sk for n, first in state.layout):
                return None
            # each row's keys end at the last slot: its length and first slot, as the device has them (a copy of
            # the host's layout would wait for the GPU's queue: torch syncs a pageable host-to-device copy)
            lens, leftpad, _ = slots
        k_fine, k_coarse = state.fine.data, state.coarse.data if state.coarse is not None else None
        q0 = q[:, 0]
        graph = _decode_graph(layer, q0, sk, lens, leftpad, config, scale, k_fine, k_coarse)
        if graph is not None:  # eager, the keys / values in a room that stays put: replay the layer's graph
            return graph(q0, sk if lens is None else lens, leftpad)[:, None]
        if lens is None:
            lens = torch.full((b,), sk, dtype=torch.int32, device=q.device)
        out = infllmv2_decode_triton(q0, k, v, lens, config, scale, k_fine=k_fine, k_coarse=k_coarse,
                                     cache_leftpad=leftpad)
        return out[:, None]
    from ..ops.torch_decode import attention_compressed
    out = q.new_zeros(q.shape)
    for i in range(b):
        if mask is None:
            qi, ki, vi, qsel = q[i], k[i], v[i], None
        else:
            pos = torch.nonzero(mask[i]).flatten()
            qsel = mask[i, sk - sq:]
            qi, ki, vi = q[i][qsel], k[i].index_select(0, pos), v[i].index_select(0, pos)
        if qi.shape[0] == 0:
            continue
        k1 = state.fine.rows(i)
        k2 = state.coarse.rows(i) if state.coarse is not None else None
        oi = attention_compressed(qi, ki, vi, k1, k2, config, scale)
        if qsel is None:
            out[i] = oi
        else:
            out[i, qsel] = oi
    return out


def _decode_graph(layer, q, sk, lens, leftpad, config, scale, k_fine, k_coarse):
    """The CUDA graph of this eager decode call (``ops/triton/decode.py``, ``DecodeGraph``), or None to launch it.

    A layer keeps one graph, over its keys / values in room to grow (``cache._append_in_room``) of which the
    first ``sk`` slots are filled, or over a static cache's ``sk`` slots (lens / leftpad say which are filled), and
    captures a new one the second step in a row the caches are where they are now: not at every step of a beam
    search, whose reordered caches move at every step. q (b, Hq, d); lens / leftpad (b,) int32 or None (every row
    ``sk`` keys from slot 0).
    """
    from ..ops.triton.decode import DecodeGraph, decode_graphs_apply
    room = layer.decode_room(sk) if decode_graphs_apply(q) else None
    if room is None:
        return None
    key = DecodeGraph.key_of(q, *room, config, scale, k_fine, k_coarse, leftpad)
    graph = layer.__dict__.get("_infllmv2_graph")
    if graph is not None and graph.key == key:
        return graph
    layer.__dict__.pop("_infllmv2_graph", None)  # captured on caches that moved
    graph = None
    if layer.__dict__.get("_infllmv2_graph_seen") == key:
        if lens is None:
            lens = torch.full((q.shape[0],), sk, dtype=torch.int32, device=q.device)
        graph = layer._infllmv2_graph = DecodeGraph(q, *room, lens, config, scale, k_fine, k_coarse, leftpad)
    layer._infllmv2_graph_seen = key
    return graph


def _rows_of(mask: torch.Tensor):
    """A padding mask's ``filled_slots`` on the device and the host's ``row_layout`` read from them."""
    slots = filled_slots(mask)
    return slots, row_layout(mask, mask.shape[1], mask.shape[0], slots)


def _static_rows(mask: torch.Tensor, check: bool):
    """A static cache's (batch, slots) filled-slot mask -> (lens (batch,) int32, first filled slot (batch,) int32,
    whether every row is filled contiguously and not empty: a host read, only when ``check``)."""
    lens, leftpad, contiguous = filled_slots(mask)
    return lens, leftpad, bool((contiguous & (lens > 0)).all()) if check else True


def _static_decode(layer, q, k, v, mask, config, scaling, backend, attention_mask):
    """A decode step in a static cache with fixed shapes and no host synchronisation (torch.compile,
    CUDA graphs): the new key's compressed windows are appended on the device, then the Triton decode
    kernel or ``ops.torch_decode.decode_static`` runs (None: not applicable, the general path runs).

    q (b, 1, Hq, d), k/v (b, L, Hkv, d) the whole static cache, mask (b, L): the filled slots of each row,
    contiguous (generate()'s left padding; checked in eager mode only, once a forward: ``attention_mask``, the
    tensor every layer gets, keys that). The compressed keys were built at prefill; the state's host-side counts
    lag behind and catch up at the next eager update (which rewrites the same windows). Eagerly on CUDA the decode
    call replays the layer's CUDA graph (``_decode_graph``): a static cache's slots never move.
    """
    st = layer._infllmv2_state
    resolved = _resolve_backend(backend, q)
    if st is None or st.config != config or resolved == "reference" or config.use_nope:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # the decode kernels have no backward: the general (differentiable) path runs
    from ..cache import append_windows

    if not torch.compiler.is_compiling() and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        # eager: once a forward (one host read), and rows with holes in their mask take the general path
        lens, leftpad, contiguous = once_per_forward("static_rows", attention_mask, tuple(mask.shape),
                                                     lambda: _static_rows(mask, check=True))
        if not contiguous:
            return None
    else:  # traced code trusts the layout
        lens, leftpad, _ = _static_rows(mask, check=False)
    kinds = [(pk.kernel, pk.stride, pk.data) for pk in st.kinds()]
    append_windows(kinds, k, lens, leftpad, fused=resolved == "triton")
    fine, coarse = st.fine.data, st.coarse.data if st.coarse is not None else None
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if resolved == "triton":
        from ..ops.triton import infllmv2_decode_triton
        q0 = q[:, 0]
        graph = _decode_graph(layer, q0, k.shape[1], lens, leftpad, config, scale, fine, coarse)
        if graph is not None:  # eager: the layer's slots stay put, replay its graph
            return graph(q0, lens, leftpad)[:, None]
        out = infllmv2_decode_triton(q0, k, v, lens, config, scale, k_fine=fine, k_coarse=coarse,
                                     cache_leftpad=leftpad)
    else:
        from ..ops.torch_decode import decode_static
        out = decode_static(q[:, 0], k, v, lens, leftpad, fine, coarse, config, scale)
    return out[:, None]


def _padded_attention(q, k, v, mask, config, scaling, backend, module):
    """Padded rows -> packed varlen batch of their valid tokens -> scattered back (zeros at padding).

    Row i keeps the keys where ``mask[i]`` is True; its queries (the last ``sq`` positions) that are
    valid are exactly the last valid keys, so each row runs as if alone (left padding as generate()
    makes it, right padding as in training).
    """
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    qmask = mask[:, sk - sq:]
    k_idx = torch.nonzero(mask.reshape(-1)).flatten()
    q_idx = torch.nonzero(qmask.reshape(-1)).flatten()
    k_counts = mask.sum(1).tolist()
    q_counts = qmask.sum(1).tolist()
    cu_k, cu_q = [0], [0]
    for nq, nk in zip(q_counts, k_counts):
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)
    cu_q = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
    qp = q.reshape(b * sq, hq, d).index_select(0, q_idx)
    kp = k.reshape(b * sk, *k.shape[2:]).index_select(0, k_idx)
    vp = v.reshape(b * sk, *v.shape[2:]).index_select(0, k_idx)
    observer = getattr(module, "_infllmv2_observer", None)
    if observer is not None:
        observer(module, qp, kp, cu_q, cu_k)
    out = infllmv2_attention(qp, kp, vp, config, cu_seqlens=cu_q, cu_seqlens_k=cu_k, softmax_scale=scaling,
                             backend=backend)
    full = out.new_zeros(b * sq, hq, out.shape[-1]).index_copy(0, q_idx, out)
    return full.reshape(b, sq, hq, -1)


# The dtype of the mask ``infllmv2_mask`` gives a static cache, which marks it apart from padding masks (bool).
STATIC_SLOTS_DTYPE = torch.uint8


def infllmv2_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
                  kv_offset: int = 0, mask_function: Optional[Callable] = None,
                  attention_mask: Optional[torch.Tensor] = None, device=None, cache_position=None,
                  **kwargs) -> Optional[torch.Tensor]:
    """Mask function for ``ALL_MASK_ATTENTION_FUNCTIONS``: no n x n mask, ever.

    Returns ``None`` when nothing is padded (causality is the attention function's job), else the 2D
    boolean padding mask (batch, keys). A static cache (whose ``q_offset`` is a tensor) gets the fixed-shape
    mask of its filled slots, (batch, kv_length) in ``STATIC_SLOTS_DTYPE``, built on the device: the
    queries are then the last filled slots, not the last slots.

    transformers 4.x passes the queries' slots (``cache_position``, a tensor) instead of q_length / q_offset, and
    no sign of a static cache: eagerly one host read tells (a static cache has slots past the queries); traced,
    the offset stays a tensor, as a static cache's.
    """
    if q_length is None:  # transformers 4.x
        if cache_position is None or kv_length is None:
            raise TypeError("infllmv2_mask needs q_length and kv_length, or transformers 4.x's cache_position")
        q_length, q_offset = cache_position.shape[0], cache_position[:1]
        if q_length == kv_length:  # the queries are every key (no cache, or a first step that fills it): no offset
            q_offset = 0
        elif not torch.compiler.is_compiling():
            filled = int(cache_position[-1]) + 1
            if filled >= kv_length:  # no empty slots: a dynamic cache (or a full static one)
                q_offset = filled - q_length
    if isinstance(q_offset, torch.Tensor):  # a static cache: (batch, kv_length) filled slots, no host sync
        mask = torch.arange(kv_length, device=q_offset.device) < q_offset + q_length
        mask = mask[None].expand(batch_size, -1)
        if attention_mask is not None:
            attention_mask = attention_mask[:, :kv_length].to(device=mask.device, dtype=torch.bool)
            mask = mask & torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[1]))
        return mask.to(STATIC_SLOTS_DTYPE)
    used = int(q_offset) + q_length if q_offset is not None else q_length  # filled slots (a static cache: < kv_length)
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:][:, :used]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask.to(torch.bool)
    if used < kv_length:  # static cache, no user mask: only the filled slots are keys
        return torch.ones(batch_size, used, dtype=torch.bool, device=device)
    return None


def register() -> None:
    """Register the attention implementation (and its mask function) ``"infllmv2"`` with transformers."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, infllmv2_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: the raw 2D mask is passed through anyway
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, infllmv2_mask)


# --------------------------------------------------------------------------------------------------
# enable / disable
# --------------------------------------------------------------------------------------------------
def _looks_like_attention(name: str, module: torch.nn.Module) -> bool:
    cls = type(module).__name__
    return cls.endswith("Attention") or cls.endswith("Attention2") or (
        name.rsplit(".", 1)[-1] in ("self_attn", "attn", "attention") and not isinstance(module, torch.nn.Linear))


def _is_projection(module) -> bool:
    """A linear map that says its sizes: ``nn.Linear``, peft's LoRA layers, quantised linears (the attention only
    needs the projections' outputs, whatever computes them)."""
    return (isinstance(module, torch.nn.Module) and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


def _transformers_model(model):
    """``model``, or the transformers model inside a wrapper that exposes it (peft's ``PeftModel``:
    ``get_base_model()``), so that ``enable(get_peft_model(model, ...))`` works as ``enable(model)`` does."""
    from transformers import PreTrainedModel

    get_base_model = getattr(model, "get_base_model", None)
    if not isinstance(model, PreTrainedModel) and callable(get_base_model):
        model = get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (or a peft model around one), "
                        f"got {type(model).__name__}")
    return model


def attention_modules(model: torch.nn.Module) -> list:
    """The (G)QA self-attention modules of ``model``; raises ValueError when a layer is of another kind."""
    found, bad = [], []
    for name, module in model.named_modules():
        if all(_is_projection(getattr(module, p, None)) for p in _PROJECTIONS):
            found.append((name, module))
        elif _looks_like_attention(name, module) and not any(name.startswith(f + ".") for f, _ in found):
            bad.append(f"{name} ({type(module).__name__})")
    if bad:
        raise ValueError("InfLLM-V2 needs (G)QA self-attention layers with q_proj/k_proj/v_proj/o_proj; these "
                         f"attention layers are of another kind: {', '.join(bad[:4])}"
                         + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    if not found:
        raise ValueError(f"{type(model).__name__} has no (G)QA self-attention layer (modules with q_proj, k_proj, "
                         "v_proj and o_proj): InfLLM-V2 supports Llama/Qwen2/Qwen3/Mistral-style causal LMs")
    for name, module in found:
        cfg = getattr(module, "config", None)
        hq = getattr(cfg, "num_attention_heads", None)
        hkv = getattr(cfg, "num_key_value_heads", None) or hq
        head_dim = getattr(module, "head_dim", None)
        if cfg is None or hq is None or head_dim is None:
            raise ValueError(f"attention layer {name} ({type(module).__name__}) lacks config/num_attention_heads/"
                             "head_dim: not a transformers (G)QA attention layer")
        if hq % hkv:
            raise ValueError(f"attention layer {name}: num_attention_heads ({hq}) is not a multiple of "
                             f"num_key_value_heads ({hkv})")
        if module.q_proj.out_features != hq * head_dim or module.k_proj.out_features != hkv * head_dim \
                or module.v_proj.out_features != hkv * head_dim:
            raise ValueError(f"attention layer {name}: projections do not match (G)QA with {hq} query heads, {hkv} KV "
                             f"heads of dim {head_dim} (q_proj {module.q_proj.out_features}, k_proj "
                             f"{module.k_proj.out_features}, v_proj {module.v_proj.out_features})")
        if getattr(module, "is_causal", True) is False or getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"attention layer {name} is not causal self-attention: InfLLM-V2 is for causal LMs")
    return [m for _, m in found]


def _restricted_attention(cfg) -> Optional[str]:
    """What keeps some layer of this config from full causal attention (sliding windows, Llama 4's chunks), or None:
    InfLLM-V2 attends over the whole causal prefix, so it would silently widen such layers."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        other = sorted({str(t) for t in layer_types} - {"full_attention"})
        return f"layer_types {other}" if other else None
    if getattr(cfg, "attention_chunk_size", None):
        return f"chunked attention (attention_chunk_size={cfg.attention_chunk_size})"
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    if getattr(cfg, "sliding_window", None) is not None:
        return f"sliding-window attention (sliding_window={cfg.sliding_window})"
    return None


def enable(model, config=None, *, backend: str = "auto"):
    """Switch a transformers causal LM with (G)QA attention to InfLLM-V2, in place; returns ``model``.

    model: a transformers ``PreTrainedModel``, or a peft model around one (LoRA on the projections included).
    config: a ``SparseConfig`` or a MiniCPM4 ``sparse_config`` dict; ``None`` = the ``sparse_config`` the model's
    config already holds (a model saved after ``enable``, a MiniCPM4 config), else the MiniCPM4 defaults.
    Stored as ``model.config.sparse_config`` (a dict, as MiniCPM4 stores it). No parameter is added.
    backend: "auto" | "reference" | "torch" | "triton", used by every attention layer.
    """
    wrapper, model = model, _transformers_model(model)
    sparse = as_sparse_config(config) if config is not None else sparse_config_of(model.config)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("InfLLM-V2 supports decoder-only causal LMs, not encoder-decoder models")
    modules = attention_modules(model)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
                         "so InfLLM-V2 cannot be plugged in")
    configs = {id(model.config): model.config}
    for m in modules:
        configs.setdefault(id(m.config), m.config)
    for cfg in configs.values():
        _check_supported(cfg, sparse, type(model).__name__)
        dropout = getattr(cfg, "attention_dropout", 0.0) or 0.0
        if dropout:
            raise ValueError(f"config.attention_dropout = {dropout}: InfLLM-V2 has no attention dropout, set it to 0.0")

    register()
    for cfg in configs.values():
        cfg.sparse_config = sparse.to_dict()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for cfg in configs.values():  # also sub-configs set_attn_implementation did not reach
        if getattr(cfg, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            cfg._attn_implementation = ATTN_IMPLEMENTATION
    for m in modules:
        m._infllmv2_backend = backend
        _layer_sparse_config(m)  # parsed now, so that a compiled first forward does not trace the parsing
        if m.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"could not set the attention implementation of {type(m).__name__} to infllmv2")
    _generate_with_infllmv2_cache(model)
    return wrapper


def _generate_with_infllmv2_cache(model) -> None:
    """Make ``generate()`` use InfLLM-V2's caches (compressed keys kept, not re-pooled each step).

    Only a cache generate() creates itself is replaced: a plain DynamicCache by an ``InfLLMv2Cache``, and
    ``cache_implementation="static"``'s StaticCache by an ``InfLLMv2StaticCache`` of the same length. A cache
    the user passes, or another ``cache_implementation``, is left alone. ``disable()`` undoes it.
    """
    if hasattr(type(model), "_prepare_cache_for_generation"):  # else: users pass cache=InfLLMv2Cache()
        model._prepare_cache_for_generation = _PrepareInfLLMv2Cache(model)


class _PrepareInfLLMv2Cache:
    """Instance override of ``_prepare_cache_for_generation`` (a module-level class, so models still pickle)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values"))
        result = type(self.model)._prepare_cache_for_generation(self.model, generation_config, model_kwargs, *args,
                                                                **kwargs)
        if user_cache:
            return result
        from transformers import DynamicCache, StaticCache
        from transformers.cache_utils import StaticLayer

        from ..cache import InfLLMv2Cache, InfLLMv2StaticCache
        for name in ("cache", "past_key_values"):
            made = model_kwargs.get(name)
            if type(made) is DynamicCache and generation_config.cache_implementation in (None, "dynamic"):
                model_kwargs[name] = InfLLMv2Cache()
            # full-attention layers only (no sliding ones)
            elif type(made) is StaticCache and all(type(layer) is StaticLayer for layer in made.layers):
                max_len = made.get_max_length() if hasattr(made, "get_max_length") else made.get_max_cache_shape()
                cache = InfLLMv2StaticCache(config=self.model.config.get_text_config(decoder=True),
                                            max_cache_len=max_len)
                if _cache_initialized(made):  # a chunked prefill's cache, initialised early: so is this one
                    if not hasattr(cache, "early_initialization"):
                        continue
                    keys = [layer.keys for layer in made.layers]
                    cache.early_initialization(batch_size=keys[0].shape[0], num_heads=[k.shape[1] for k in keys],
                                               head_dim=[k.shape[-1] for k in keys], dtype=keys[0].dtype,
                                               device=keys[0].device)
                model_kwargs[name] = cache
                if self.model.__dict__.get("_cache") is made:  # transformers 4.x reuses it at the next call
                    self.model._cache = cache
        return result


def _cache_initialized(cache) -> bool:
    flag = getattr(cache, "is_initialized", None)  # transformers 5
    return any(layer.keys is not None for layer in cache.layers) if flag is None else flag  # 4.x: keys None


def disable(model, attn_implementation: str = "sdpa"):
    """Switch an enabled model back to dense attention (``sparse_config`` is kept); returns ``model``."""
    wrapper, model = model, _transformers_model(model)
    model.__dict__.pop("_prepare_cache_for_generation", None)  # generate() creates its usual cache again
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    for m in attention_modules(model):
        if m.config._attn_implementation != attn_implementation:
            m.config._attn_implementation = attn_implementation
    return wrapper
