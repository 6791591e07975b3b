"""Work done once a forward (``infllmv2.ops.reuse``): the mechanism, and the Triton ops' varlen layouts built once for
all the layers of a forward (same offset tensors), rebuilt when the offsets change, with the same outputs."""
from __future__ import annotations

import importlib

import torch

from infllmv2.config import SparseConfig
from infllmv2.ops import reuse
from infllmv2.ops.triton import select_blocks_triton, sparse_attention_triton

S = importlib.import_module("infllmv2.ops.triton.selection")
SA = importlib.import_module("infllmv2.ops.triton.sparse_attention")


def _counting():
    calls = []
    return calls, (lambda value: (lambda: calls.append(value) or value))


def test_reused_while_the_same_tensors_come_back_unchanged(monkeypatch):
    monkeypatch.setattr(reuse, "_PER_FORWARD", {})
    calls, make = _counting()
    a, b = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    assert reuse.once_per_forward("x", (a, b), 1, make("first")) == "first"
    assert reuse.once_per_forward("x", (a, b), 1, make("again")) == "first"  # reused
    assert calls == ["first"]
    b.add_(0)  # an in-place change (same values) bumps the version: computed again
    assert reuse.once_per_forward("x", (a, b), 1, make("after b changed")) == "after b changed"
    assert reuse.once_per_forward("x", (a, b), 2, make("other extra")) == "other extra"
    a2 = a.clone()  # equal values, another object
    assert reuse.once_per_forward("x", (a2, b), 2, make("other object")) == "other object"
    assert reuse.once_per_forward("x", a2, 2, make("fewer tensors")) == "fewer tensors"
    assert reuse.once_per_forward("y", a2, 2, make("another kind")) == "another kind"
    assert reuse.once_per_forward("x", a2, 2, make("kinds are apart")) == "fewer tensors"
    with torch.inference_mode():  # no version counter: never reused
        c = torch.tensor([0, 1], dtype=torch.int32)
    assert reuse.once_per_forward("z", c, None, make("inference 1")) == "inference 1"
    assert reuse.once_per_forward("z", c, None, make("inference 2")) == "inference 2"
    assert calls == ["first", "after b changed", "other extra", "other object", "fewer tensors", "another kind",
                     "inference 1", "inference 2"]


def _layer_inputs(total, hkv, g, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total, hkv * g, d, generator=gen)
    k = torch.randn(total, hkv, d, generator=gen)
    v = torch.randn(total, hkv, d, generator=gen)
    return q, k, v


def test_triton_layouts_are_built_once_for_all_layers_and_again_when_the_offsets_change(monkeypatch):
    """Two "layers" (other q, k, v) over the same offset tensors: stage 1's compression layouts and query tiles and
    stage 2's tile table are built by the first layer only, and the second layer's selection and output equal those of
    a run that builds everything afresh. Offsets changed in place (the same tensor objects) are a new layout: built
    again, and the outputs are right for it."""
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=32, topk=3, init_blocks=1,
                       dense_len=-1)
    hkv, g, d = 2, 3, 32
    cu = torch.tensor([0, 90, 120, 230], dtype=torch.int32)
    builds = {"compress": 0, "tiles": 0, "tile_table": 0}
    for name, key in (("_compress_layout", "compress"), ("_tile_table", "tile_table")):
        mod = S if name == "_compress_layout" else SA
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _key=key, **k: builds.__setitem__(
            _key, builds[_key] + 1) or _real(*a, **k))
    real_tiles = reuse.once_per_forward

    def counting_reuse(what, tensors, extra, compute, device_result=False):
        if what == "query_tiles":
            def compute(_compute=compute):
                builds["tiles"] += 1
                return _compute()
        return real_tiles(what, tensors, extra, compute, device_result)

    for mod in (S, SA):
        monkeypatch.setattr(mod, "once_per_forward", counting_reuse)

    def layer(seed, offsets):
        q, k, v = _layer_inputs(offsets[-1], hkv, g, d, seed)
        lens = [b - a for a, b in zip(offsets, offsets[1:])]
        idx = select_blocks_triton(q, k, cfg, cu, cu, max(lens), max(lens), host_offsets=(offsets, offsets))
        return idx, sparse_attention_triton(q, k, v, idx, cfg.block_size, cu, cu, max(lens), max(lens))[0]

    def fresh(seed, offsets):  # everything built afresh: other offset tensors with the same values
        monkeypatch.setattr(reuse, "_PER_FORWARD", {})
        q, k, v = _layer_inputs(offsets[-1], hkv, g, d, seed)
        lens = [b - a for a, b in zip(offsets, offsets[1:])]
        c = torch.tensor(offsets, dtype=torch.int32)
        idx = select_blocks_triton(q, k, cfg, c, c.clone(), max(lens), max(lens), host_offsets=(offsets, offsets))
        return idx, sparse_attention_triton(q, k, v, idx, cfg.block_size, c, c.clone(), max(lens), max(lens))[0]

    monkeypatch.setattr(reuse, "_PER_FORWARD", {})
    offsets = cu.tolist()
    layer(0, offsets)
    idx, out = layer(1, offsets)
    assert builds == {"compress": 2, "tiles": 1, "tile_table": 1}  # fine and coarse keys' layouts, once each
    ref_idx, ref_out = fresh(1, offsets)
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
    # the same tensor objects, another layout (a new version): built again
    monkeypatch.setattr(reuse, "_PER_FORWARD", {})
    layer(0, offsets)
    builds.update(compress=0, tiles=0, tile_table=0)
    cu.copy_(torch.tensor([0, 40, 170, 230], dtype=torch.int32))
    offsets = cu.tolist()
    idx, out = layer(5, offsets)
    assert builds == {"compress": 2, "tiles": 1, "tile_table": 1}
    ref_idx, ref_out = fresh(5, offsets)
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)


def test_mixed_batch_sub_batch_made_once_for_all_layers(monkeypatch):
    """A packed batch of dense and sparse sequences: the sparse sub-batch's rows and offsets are made by the first
    layer only (their copies to the device once a forward), rebuilt when the offsets change in place, and every
    layer's output equals the reference sequence by sequence."""
    from infllmv2 import attention as A
    from infllmv2.ops import naive
    monkeypatch.setattr(reuse, "_PER_FORWARD", {})
    copies = []
    real = A._to_device
    monkeypatch.setattr(A, "_to_device", lambda t, dev: copies.append(t.numel()) or real(t, dev))
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=2, dense_len=60)
    cu = torch.tensor([0, 150, 187, 277], dtype=torch.int32)  # 150 sparse, 37 dense, 90 sparse

    def layer(seed):
        q, k, v = _layer_inputs(int(cu[-1]), 2, 2, 32, seed)
        out = A.infllmv2_attention(q, k, v, cfg, cu_seqlens=cu, backend="torch")
        for i in range(len(cu) - 1):
            s = slice(int(cu[i]), int(cu[i + 1]))
            torch.testing.assert_close(out[s], naive.infllmv2_attention(q[s], k[s], v[s], cfg)[0], atol=1e-5,
                                       rtol=1e-5)

    layer(0)
    assert len(copies) == 3  # the query and key rows of the sub-batch, the output's order
    layer(1)
    assert len(copies) == 3  # the second layer reused them
    cu.copy_(torch.tensor([0, 40, 200, 277], dtype=torch.int32))  # 40 dense, 160 and 77 sparse
    layer(2)
    assert copies[3:] == [237, 237, 277]
