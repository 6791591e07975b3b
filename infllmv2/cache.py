"""KV cache for InfLLM-V2 decoding: keys/values plus incrementally extended compressed keys.

SPEC "Decoding": per layer, keep the KV cache and the fine (kernel lc, stride sc) and coarse (4 lc, 4 sc)
compressed keys; keep a tail of raw keys and, whenever the tail holds a full window, append its mean
and drop one stride from the tail. The tail here is a view of the cache itself (the raw keys from
``count * stride`` on), so it costs no copy; the result equals compressing from scratch
(``infllmv2.ops.naive.compress_keys``) window for window.

* ``InfLLMv2Cache`` (a transformers ``DynamicCache``) for models switched by ``infllmv2.enable``:
  pass it to ``generate(..., past_key_values=InfLLMv2Cache())`` (or ``cache=``) or to ``forward``.
  Its layers (``InfLLMv2Layer``) build the compressed keys lazily, the first time a sequence of the batch
  reaches ``dense_len``, then extend them at every call. Rows of a padded batch (left padding as
  ``generate()`` makes it, or any 2D padding mask) are tracked separately: each row's compressed keys
  are those of its valid keys alone. The attention function (``models/transformers.py``) uses them: on
  CUDA a decode step calls the Triton decode kernel with ``k_fine``/``k_coarse``; elsewhere the torch
  path selects from them (``ops/torch_decode.py``). Chunked prefill (feeding a long prompt in pieces
  through the cache) gives the outputs of one pass. Its keys / values live in buffers with room to grow,
  written in place (``_append_in_room``), so that eager CUDA decode steps can replay a graph per layer.
* ``InfLLMv2StaticCache`` (a transformers ``StaticCache``): the same with preallocated keys/values (and
  compressed keys preallocated for ``max_cache_len``), for ``generate()`` with a static cache.
* ``StaticCompressedKeys``: the preallocated, CUDA-graph-capturable variant (gpt-fast style) for a
  static KV cache ``(batch, max_len, Hkv, d)`` with per-row lengths: a decode step appends at most one
  fine and one coarse key per row with fixed shapes and no host synchronisation. ``infllmv2_with_kvcache``
  (``attention.py``) takes one and keeps it up to date; ``append_windows`` is its write (on CUDA one launch of
  ``ops/triton/append.py`` for the new key / value and both kinds of windows).
"""
from __future__ import annotations

import inspect
import threading
from typing import List, Optional

import torch

from .config import SparseConfig

__all__ = ["InfLLMv2Cache", "InfLLMv2StaticCache", "InfLLMv2Layer", "PooledKeys", "StaticCompressedKeys",
           "append_windows", "compress_from_scratch"]

_LAST = threading.local()  # the layer whose update() ran last (fallback lookup by tensor identity)


def _store_dtype(keys: torch.Tensor) -> torch.dtype:
    """Compressed keys are pooled in fp32 (fp64 for fp64 keys); on CUDA fp16/bf16 they are stored in the
    keys' dtype, which the Triton kernels read, elsewhere in the pooling dtype (the torch path's)."""
    if keys.dtype == torch.float64:
        return torch.float64
    if keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16):
        return keys.dtype
    return torch.float32


def _pool_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def compress_from_scratch(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Mean pooling over full windows of one sequence's keys (nk, H, d) -> (n, H, d), in fp32/fp64."""
    from .ops.naive import compress_keys
    return compress_keys(k.to(_pool_dtype(k.dtype)), kernel, stride)


class PooledKeys:
    """Compressed keys of one kind (kernel, stride) for a batch: ``data (batch, capacity, H, d)`` with
    ``count[i]`` valid rows for sequence i; grown by doubling."""

    def __init__(self, batch: int, heads: int, dim: int, kernel: int, stride: int, dtype, device,
                 capacity: Optional[int] = None):
        self.kernel, self.stride = kernel, stride
        self.data = torch.zeros(batch, max(1, capacity or 16), heads, dim, dtype=dtype, device=device)
        self.count = [0] * batch
        if capacity is not None and not torch.compiler.is_compiling():
            # preallocated (static cache): a fixed address, so CUDA graphs may capture steps that write it
            torch._dynamo.mark_static_address(self.data)

    def extend(self, row: int, tail: torch.Tensor) -> None:
        """``tail``: the row's raw keys from index ``count * stride`` to its end, (m, H, d). Appends the
        mean of every full window in it (SPEC: append the mean, drop one stride, repeat)."""
        if tail.shape[0] < self.kernel:
            return
        new = tail.to(_pool_dtype(tail.dtype)).unfold(0, self.kernel, self.stride).mean(-1)  # (nw, H, d)
        c, nw = self.count[row], new.shape[0]
        if c + nw > self.data.shape[1]:
            cap = max(2 * self.data.shape[1], c + nw)
            grown = self.data.new_zeros((self.data.shape[0], cap) + tuple(self.data.shape[2:]))
            grown[:, :self.data.shape[1]] = self.data
            self.data = grown
        self.data[row, c:c + nw] = new.to(self.data.dtype)
        self.count[row] = c + nw

    def rows(self, row: int) -> torch.Tensor:
        return self.data[row, :self.count[row]]

    def select(self, index: torch.Tensor) -> None:
        self.data = self.data.index_select(0, index.to(self.data.device))
        self.count = [self.count[i] for i in index.tolist()]


class _Compressed:
    """Per-layer state: fine + coarse pooled keys and, per row, how many valid keys were consumed."""

    def __init__(self, keys: torch.Tensor, config: SparseConfig, capacity: Optional[int] = None):
        b, h, _, d = keys.shape
        dt = _store_dtype(keys)
        self.config = config
        self.fine = PooledKeys(b, h, d, config.kernel_size, config.kernel_stride, dt, keys.device,
                               None if capacity is None else capacity // config.kernel_stride)
        self.coarse = (PooledKeys(b, h, d, config.coarse_kernel_size, config.coarse_kernel_stride, dt, keys.device,
                                  None if capacity is None else capacity // config.coarse_kernel_stride)
                       if config.lse_approx else None)
        self.seen = [0] * b
        self.layout = [(0, 0)] * b  # per row at the last update: (valid keys, first valid slot or None)

    def kinds(self):
        return (self.fine,) if self.coarse is None else (self.fine, self.coarse)


def filled_slots(mask: torch.Tensor, length: Optional[int] = None):
    """A (batch, slots) mask of the valid slots (the first ``length``) -> per row, on the mask's device, no host
    read: (count (batch,) int32, first valid slot (batch,) int32, ``length`` when none, whether the valid slots are
    contiguous (batch,) bool; an empty row counts as contiguous)."""
    m = (mask if length is None else mask[:, :length]).bool()
    n = m.shape[1]
    # first / last by min / max reductions: argmax on ties is not "the first index" in compiled CUDA code. int64
    # slots: with int32 ones inductor (torch 2.11) split the reduction over a cache of 131105 slots into a Triton
    # kernel that failed to compile (an int32 accumulator re-assigned int64; bench_generate.py, 128K)
    slot = torch.arange(n, dtype=torch.int64, device=m.device)
    count = m.sum(1, dtype=torch.int32)
    first = torch.where(m, slot, n).amin(1)
    last = torch.where(m, slot, -1).amax(1)
    return count, first.to(torch.int32), (count == 0) | (last - first + 1 == count)


def row_layout(mask: Optional[torch.Tensor], length: int, batch: int, slots: Optional[tuple] = None):
    """Per row: (number of valid keys, first valid index if the valid keys are contiguous else None). One host
    read (it waits for the GPU's queue) of ``filled_slots(mask, length)`` (or of ``slots``, those already made):
    the attention function reads it once a forward for every layer."""
    if mask is None:
        return [(length, 0)] * batch
    count, first, contiguous = filled_slots(mask, length) if slots is None else slots
    rows = torch.stack([count, first, contiguous.to(torch.int32)], 1).tolist()
    return [(n, f if c else None) for n, f, c in rows]


class InfLLMv2Layer:
    """Mixin state for a transformers cache layer: the compressed keys of its KV cache."""

    _infllmv2_state: Optional[_Compressed] = None

    def _infllmv2_register(self, kwargs) -> None:
        inner = kwargs.get("kwargs")
        if isinstance(inner, dict):  # the model passes the attention call's kwargs: hand it this layer
            inner["infllmv2_cache_layer"] = self
        _LAST.layer = self

    def infllmv2_compressed(self, mask: Optional[torch.Tensor], config: SparseConfig, length: Optional[int] = None,
                            build: bool = False, layout: Optional[list] = None) -> Optional[_Compressed]:
        """Bring the compressed keys up to date with the cached keys and return them.

        mask: None (every key valid) or the (batch, >= length) boolean padding mask; length: filled
        slots (default: all); layout: ``row_layout(mask, length, batch)`` where the caller has it. Returns None
        while no row has reached ``dense_len`` (lazy: nothing is built until a sequence turns sparse) unless
        ``build``.
        """
        keys = self.keys  # (b, Hkv, sk, d)
        if keys is None or keys.dim() != 4:
            return None
        b, _, sk, _ = keys.shape
        length = sk if length is None else length
        layout = row_layout(mask, length, b) if layout is None else layout
        st = self._infllmv2_state
        if st is not None and (st.config != config or len(st.seen) != b
                               or any(n < s or (s > 0 and first != old_first)
                                      for (n, first), s, (_, old_first) in zip(layout, st.seen, st.layout))
                               or (st.fine.data.is_inference() and not torch.is_inference_mode_enabled())):
            # config changed, the cache was cropped / reshaped, a row's keys start elsewhere (its padding changed:
            # the kept windows are of another set of keys), or its buffers were made under inference_mode and take
            # no in-place write outside it: rebuild from scratch
            st = None
        if st is None:
            if not build and not any(config.is_sparse(n) for n, _ in layout):
                self._infllmv2_state = None
                return None
            st = _Compressed(keys, config, getattr(self, "max_cache_len", None))  # static: preallocated
        for i, (n, first) in enumerate(layout):
            if n == st.seen[i]:
                continue
            pos = None if first is not None else torch.nonzero(mask[i, :length]).flatten()
            for pk in st.kinds():
                s = pk.count[i] * pk.stride  # the tail starts here
                if n - s < pk.kernel:
                    continue
                if pos is None:
                    tail = keys[i, :, first + s:first + n]
                else:
                    tail = keys[i].index_select(1, pos[s:n])
                pk.extend(i, tail.transpose(0, 1))
            st.seen[i] = n
        st.layout = layout
        self._infllmv2_state = st
        return st

    def _infllmv2_drop(self) -> None:
        self._infllmv2_state = None
        self.__dict__.pop("_infllmv2_graph", None)

    def _infllmv2_drop_room(self) -> None:
        """Forget the key / value room (``_append_in_room``) and the decode graph captured on it."""
        self._infllmv2_room = None
        self.__dict__.pop("_infllmv2_graph", None)

    def decode_room(self, length: int):
        """(k, v) as (batch, room, Hkv, d) views of the whole storage of the cached keys / values when the first
        ``length`` slots are the cached ones and it has room to grow in place (``_append_in_room``); else None."""
        room = self.__dict__.get("_infllmv2_room")
        if room is None or not _is_prefix(self.keys, room[0]) or not _is_prefix(self.values, room[1]):
            return None
        if self.keys.shape[2] != length:
            return None
        return room[0].transpose(1, 2), room[1].transpose(1, 2)


# spare slots of a dynamic layer's key / value storage: an eighth of its length, at least this many
_ROOM_MIN = 256


def _is_prefix(x: torch.Tensor, buf: torch.Tensor) -> bool:
    """x is buf[:, :, :n] (the same storage, strides and leading sizes)."""
    return (x.dim() == 4 and x.data_ptr() == buf.data_ptr() and x.stride() == buf.stride()
            and x.shape[:2] == buf.shape[:2] and x.shape[3] == buf.shape[3] and x.shape[2] <= buf.shape[2]
            and x.dtype == buf.dtype)


def _append_in_room(layer, k_new: torch.Tensor, v_new: torch.Tensor):
    """``DynamicLayer.update``'s concatenation without copying the cache at every step: the keys / values are
    views ``buf[:, :, :n]`` of buffers with spare room (an eighth more, at least ``_ROOM_MIN`` slots), written in
    place; a full buffer is replaced by a larger one. Their addresses then stay put between growths, so an eager
    decode step can replay a CUDA graph captured on them (``ops/triton/decode.py``, ``DecodeGraph``). Keys / values
    that another method replaced (crop keeps a prefix view; a batch reorder makes new tensors) are adopted into
    new buffers.

    Under grad mode the keys are concatenated as ``DynamicLayer`` does: a later in-place write would bump the
    version of earlier views that autograd saved (whenever anything downstream needs a gradient, the queries' alone
    included, whatever the keys' own requires_grad); so are traced ones (torch.compile: addresses are not
    traceable). Buffers
    made under ``torch.inference_mode`` are replaced outside it (no in-place write to an inference tensor there)."""
    keys, values = layer.keys, layer.values
    room = layer.__dict__.get("_infllmv2_room")
    n = keys.shape[-2] if keys.dim() == 4 else 0
    total = n + k_new.shape[-2]
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        layer._infllmv2_drop_room()
        return torch.cat([keys, k_new], dim=-2), torch.cat([values, v_new], dim=-2)
    fits = (room is not None and n > 0 and _is_prefix(keys, room[0]) and _is_prefix(values, room[1])
            and room[0].shape[:2] == k_new.shape[:2] and room[0].shape[3] == k_new.shape[3]
            and room[1].shape[3] == v_new.shape[3] and room[0].dtype == k_new.dtype
            and room[1].dtype == v_new.dtype and room[0].device == k_new.device and total <= room[0].shape[2]
            and (torch.is_inference_mode_enabled() or not room[0].is_inference()))
    if not fits:
        cap = total + max(_ROOM_MIN, total // 8)
        b, h = k_new.shape[:2]
        room = (k_new.new_empty((b, h, cap, k_new.shape[3])), v_new.new_empty((b, h, cap, v_new.shape[3])))
        if n > 0:
            room[0][:, :, :n] = keys
            room[1][:, :, :n] = values
        layer._infllmv2_drop_room()  # and the graph captured on the old storage
        layer._infllmv2_room = room
    room[0][:, :, n:total] = k_new
    room[1][:, :, n:total] = v_new
    return room[0][:, :, :total], room[1][:, :, :total]


def _mixed_layer_class():
    from transformers.cache_utils import DynamicLayer

    lazy_takes_values = len(inspect.signature(DynamicLayer.lazy_initialization).parameters) > 2

    class InfLLMv2DynamicLayer(InfLLMv2Layer, DynamicLayer):
        """transformers ``DynamicLayer`` + InfLLM-V2 compressed keys."""

        def update(self, key_states, value_states, *args, **kwargs):
            # transformers 5 marks it is_initialized, 4.x leaves keys None; its signature changed in 5 (values added)
            if not getattr(self, "is_initialized", self.keys is not None):
                self.lazy_initialization(*((key_states, value_states) if lazy_takes_values else (key_states,)))
            self.keys, self.values = _append_in_room(self, key_states, value_states)
            self._infllmv2_register(kwargs)
            return self.keys, self.values

        def reset(self):
            self._infllmv2_drop()
            self._infllmv2_drop_room()
            DynamicLayer.reset(self)

        def offload(self):  # the keys / values move off the device: so does their room
            self._infllmv2_drop_room()
            DynamicLayer.offload(self)

        def crop(self, tokens_to_remove):
            self._infllmv2_drop()
            DynamicLayer.crop(self, tokens_to_remove)

        def batch_repeat_interleave(self, repeats):
            self._infllmv2_drop()
            DynamicLayer.batch_repeat_interleave(self, repeats)

        def batch_select_indices(self, indices):
            self._infllmv2_drop()
            DynamicLayer.batch_select_indices(self, indices)

        def reorder_cache(self, beam_idx):
            st = self._infllmv2_state
            DynamicLayer.reorder_cache(self, beam_idx)
            if st is not None:
                for pk in st.kinds():
                    pk.select(beam_idx)
                st.seen = [st.seen[i] for i in beam_idx.tolist()]

    InfLLMv2DynamicLayer.__qualname__ = "InfLLMv2DynamicLayer"
    return InfLLMv2DynamicLayer


def _mixed_static_layer_class():
    from transformers.cache_utils import StaticLayer

    class InfLLMv2StaticLayer(InfLLMv2Layer, StaticLayer):
        """transformers ``StaticLayer`` + InfLLM-V2 compressed keys (preallocated for max_cache_len; decode
        steps append to them on the device, see ``models.transformers._static_decode``)."""

        _infllmv2_static = True

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = StaticLayer.update(self, key_states, value_states, *args, **kwargs)
            self._infllmv2_register(kwargs)
            return keys, values

        def decode_room(self, length: int):
            """(k, v) as (batch, length, Hkv, d) views of the first ``length`` preallocated slots (a decode step's
            lengths say which are filled): where an eager decode graph is captured (``_decode_graph``)."""
            if self.keys is None or self.keys.dim() != 4 or length > self.keys.shape[2]:
                return None
            return self.keys.transpose(1, 2)[:, :length], self.values.transpose(1, 2)[:, :length]

        def reset(self):
            self._infllmv2_drop()
            StaticLayer.reset(self)

        def crop(self, tokens_to_remove):
            self._infllmv2_drop()
            StaticLayer.crop(self, tokens_to_remove)

        def reorder_cache(self, beam_idx):
            self._infllmv2_drop()
            StaticLayer.reorder_cache(self, beam_idx)

    InfLLMv2StaticLayer.__qualname__ = "InfLLMv2StaticLayer"
    return InfLLMv2StaticLayer


_LAYER_CLASS = None
_STATIC_LAYER_CLASS = None


def _static_layer_class():
    global _STATIC_LAYER_CLASS
    if _STATIC_LAYER_CLASS is None:
        _STATIC_LAYER_CLASS = _mixed_static_layer_class()
    return _STATIC_LAYER_CLASS


def _layer_class():
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _mixed_layer_class()
    return _LAYER_CLASS


def lookup_layer(key: torch.Tensor, kwargs: dict):
    """The InfLLM-V2 cache layer whose keys the attention function got (None without such a cache)."""
    layer = kwargs.get("infllmv2_cache_layer")
    if layer is None:
        last = getattr(_LAST, "layer", None)
        if last is not None and last.keys is key:
            layer = last
    return layer


def __getattr__(name):  # InfLLMv2Cache needs transformers: build it on first use
    if name == "InfLLMv2DynamicLayer":
        return _layer_class()
    if name == "InfLLMv2StaticLayer":
        return _static_layer_class()
    if name == "InfLLMv2Cache":
        from transformers.cache_utils import Cache, DynamicCache

        class InfLLMv2Cache(DynamicCache):
            """A ``DynamicCache`` whose layers also keep InfLLM-V2's compressed keys (see module doc)."""

            def __init__(self, num_layers: Optional[int] = None, **_ignored):
                if num_layers is None:
                    Cache.__init__(self, layer_class_to_replicate=_layer_class())
                else:
                    Cache.__init__(self, layers=[_layer_class()() for _ in range(num_layers)])

        InfLLMv2Cache.__qualname__ = "InfLLMv2Cache"  # picklable as infllmv2.cache.InfLLMv2Cache
        globals()["InfLLMv2Cache"] = InfLLMv2Cache
        return InfLLMv2Cache
    if name == "InfLLMv2StaticCache":
        from transformers.cache_utils import Cache, StaticCache

        class InfLLMv2StaticCache(StaticCache):
            """A ``StaticCache`` (preallocated keys/values) whose layers also keep InfLLM-V2's compressed keys,
            preallocated for ``max_cache_len`` when first needed."""

            def __init__(self, config, max_cache_len: int, **_ignored):
                n = config.get_text_config(decoder=True).num_hidden_layers
                Cache.__init__(self, layers=[_static_layer_class()(max_cache_len=max_cache_len) for _ in range(n)])

        InfLLMv2StaticCache.__qualname__ = "InfLLMv2StaticCache"  # picklable as infllmv2.cache.InfLLMv2StaticCache
        globals()["InfLLMv2StaticCache"] = InfLLMv2StaticCache
        return InfLLMv2StaticCache
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------------
# Static (preallocated, CUDA-graph capturable) variant
# --------------------------------------------------------------------------------------------------
class StaticCompressedKeys:
    """Preallocated fine/coarse compressed keys of a static KV cache ``k_cache (batch, max_len, Hkv, d)``.

    ``fine (batch, max_len // sc, Hkv, d)`` and ``coarse`` hold, for row i with ``lens[i]`` keys, the
    first ``(lens[i] - lc) // sc + 1`` windows. ``prefill(k_cache, lens)`` fills them from scratch;
    ``append(k_cache, lens)`` -- call it after writing ONE new key per row, ``lens`` counting it -- adds
    the window that the new key completes (if any) with fixed shapes and no host synchronisation, so a
    decode step that includes it can be captured in a CUDA graph or compiled.
    """

    def __init__(self, batch: int, max_len: int, heads: int, dim: int, config: SparseConfig, dtype, device):
        self.config = config
        self.specs = [(config.kernel_size, config.kernel_stride)]
        if config.lse_approx:
            self.specs.append((config.coarse_kernel_size, config.coarse_kernel_stride))
        self.buffers = [torch.zeros(batch, max(1, max_len // s), heads, dim, dtype=dtype, device=device)
                        for _, s in self.specs]

    def narrow_batch(self, b: int) -> "StaticCompressedKeys":
        """A view of the first b rows (shares the buffers)."""
        new = object.__new__(StaticCompressedKeys)
        new.config, new.specs = self.config, self.specs
        new.buffers = [buf[:b] for buf in self.buffers]
        return new

    @property
    def fine(self) -> torch.Tensor:
        return self.buffers[0]

    @property
    def coarse(self) -> Optional[torch.Tensor]:
        return self.buffers[1] if len(self.buffers) > 1 else None

    def prefill(self, k_cache: torch.Tensor, lens: torch.Tensor, leftpad: Optional[torch.Tensor] = None) -> None:
        """Fill from scratch from row i's keys ``k_cache[i, leftpad[i] : leftpad[i] + lens[i]]`` (host loop)."""
        first = [0] * len(lens) if leftpad is None else leftpad.tolist()
        for (kern, s), buf in zip(self.specs, self.buffers):
            for i, n in enumerate(lens.tolist()):
                c = compress_from_scratch(k_cache[i, first[i]:first[i] + n], kern, s)
                buf[i, :c.shape[0]] = c.to(buf.dtype)

    def append(self, k_cache: torch.Tensor, lens: torch.Tensor, fused: bool = False, leftpad=None, new=None) -> None:
        """``append_windows`` for this cache's kinds (see there)."""
        append_windows(self.kinds(), k_cache, lens, leftpad, fused=fused, new=new)

    def kinds(self) -> list:
        """[(kernel, stride, buffer)] of the fine and (with ``lse_approx``) coarse compressed keys."""
        return [(kern, s, buf) for (kern, s), buf in zip(self.specs, self.buffers)]


def append_windows(kinds, k_cache: torch.Tensor, lens: torch.Tensor, leftpad: Optional[torch.Tensor] = None,
                   fused: bool = False, new: Optional[tuple] = None) -> None:
    """After ONE new key per row: write the window it completes (if any) into each kind's buffer.

    kinds: [(kernel, stride, buf (batch, n_max, H, d))] (may be empty); k_cache (batch, max_len, H, d); lens
    (batch,) keys per row, the new one counted (>= 1); leftpad (batch,) the slot of each row's first key (default
    0). ``new``: optional (k, v, v_cache), the new key and value (batch, H, d) and the value cache: first written
    at slot ``leftpad + lens - 1`` of k_cache and v_cache (a decode step's cache write). Fixed shapes, no host
    synchronisation (CUDA graphs, torch.compile). ``fused``: all of it in one Triton launch (at most two kinds,
    the fine and the coarse keys), where the torch path takes two index writes and several kernels a kind.
    """
    if fused:
        _append_triton(kinds, k_cache, lens, leftpad, new)
        return
    b = k_cache.shape[0]
    rows = torch.arange(b, device=k_cache.device)
    lens = lens.to(torch.long)
    first = torch.zeros_like(lens) if leftpad is None else leftpad.to(torch.long)
    if new is not None:
        k_new, v_new, v_cache = new
        slot = first + lens - 1
        k_cache[rows, slot] = k_new.to(k_cache.dtype)
        v_cache[rows, slot] = v_new.to(v_cache.dtype)
    for kern, s, buf in kinds:
        start = lens - kern                                   # the window ending at the new key
        done = (start >= 0) & (torch.remainder(start, s) == 0)
        pos = first[:, None] + start.clamp_min(0)[:, None] + torch.arange(kern, device=k_cache.device)[None, :]
        win = k_cache[rows[:, None], pos.clamp_max(k_cache.shape[1] - 1)]   # (b, kern, H, d)
        mean = win.to(_pool_dtype(k_cache.dtype)).mean(1).to(buf.dtype)
        j = torch.div(start.clamp_min(0), s, rounding_mode="floor").clamp_max(buf.shape[1] - 1)
        old = buf[rows, j]
        buf[rows, j] = torch.where(done[:, None, None], mean, old)


def _append_triton(kinds, k_cache: torch.Tensor, lens: torch.Tensor, leftpad: Optional[torch.Tensor],
                   new: Optional[tuple]) -> None:
    """Fused ``append_windows``: one launch, grid (batch, Hkv); a custom op when compiled (opaque to torch.compile)."""
    if len(kinds) > 2:
        raise ValueError(f"the fused append takes at most two kinds of compressed keys, got {len(kinds)}")
    if k_cache.stride(-1) != 1:
        raise ValueError("k_cache must be contiguous in its last dimension")
    k_new, v_new, v_cache = new if new is not None else (None, None, None)
    if v_cache is not None and v_cache.stride(-1) != 1:
        raise ValueError("v_cache must be contiguous in its last dimension")
    if k_new is not None:  # the kernel reads a row's head dim as one contiguous vector
        k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_new, v_new))
    # compiled: the custom op, opaque to torch.compile; eager: called directly (the op's dispatch costs host time)
    if torch.compiler.is_compiling():
        append = _append_windows_op
    else:
        from .ops.triton.append import append_token as append
    append([buf for _, _, buf in kinds], k_cache, lens.to(torch.int32),
           None if leftpad is None else leftpad.to(torch.int32),
           [kern for kern, _, _ in kinds], [stride for _, stride, _ in kinds], k_new, v_new, v_cache)


@torch.library.custom_op("infllmv2::append_windows", mutates_args=("bufs", "k_cache", "v_cache"))
def _append_windows_op(bufs: List[torch.Tensor], k_cache: torch.Tensor, lens: torch.Tensor,
                       leftpad: Optional[torch.Tensor], kernels: List[int], strides: List[int],
                       k_new: Optional[torch.Tensor], v_new: Optional[torch.Tensor],
                       v_cache: Optional[torch.Tensor]) -> None:
    from .ops.triton.append import append_token
    append_token(bufs, k_cache, lens, leftpad, kernels, strides, k_new, v_new, v_cache)


@_append_windows_op.register_fake
def _(bufs, k_cache, lens, leftpad, kernels, strides, k_new, v_new, v_cache) -> None:
    return None
