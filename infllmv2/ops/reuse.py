"""Work done once a forward instead of once a layer.

Every layer of a forward gets the same position ids, mask and sequence offsets (the same tensor objects), and
everything derived from them alone is the same in every layer: the host's copy of the offsets (each read-back
waits for the queued GPU work, which then idles while the host prepares the layer) and the varlen layouts of the
Triton kernels (tens of small torch ops a layer, each costing host time: the fine-tuning forward of a small model
is bound by the host).
"""
from __future__ import annotations

import weakref

import torch

_PER_FORWARD: dict = {}  # what -> (weak references to the tensors, their versions, extra key, result)


def once_per_forward(what: str, tensors, extra, compute, device_result: bool = False):
    """``compute()`` for these tensor objects (a tensor or a tuple of them), reused while the same objects come back
    unchanged (same versions) with the same ``extra`` key. ``device_result``: the result holds device tensors made
    on the current stream, so it is reused on that stream only, and neither kept nor reused while a CUDA graph is
    being captured (its memory would belong to the graph)."""
    tensors = tensors if isinstance(tensors, tuple) else (tensors,)
    # an inference tensor has no version counter (an in-place change would go unseen); traced code keeps no state
    if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return compute()
    if device_result and tensors[0].is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return compute()
        extra = (extra, torch.cuda.current_stream(tensors[0].device).cuda_stream)
    versions = tuple(t._version for t in tensors)
    hit = _PER_FORWARD.get(what)
    if (hit is not None and len(hit[0]) == len(tensors) and all(r() is t for r, t in zip(hit[0], tensors))
            and hit[1] == versions and hit[2] == extra):
        return hit[3]
    result = compute()
    _PER_FORWARD[what] = (tuple(weakref.ref(t) for t in tensors), versions, extra, result)
    return result
