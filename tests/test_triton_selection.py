"""Triton stage-1 selection (infllmv2.ops.triton.selection) against the reference, per sequence.

Runs through the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1), at small
sizes: fp32 selections must equal ``naive.select_blocks`` exactly; bf16 selections are compared by
score (the reference block scores of the chosen set vs of the reference set), plus the structural
invariants (sizes, forced blocks present, no future block, sorted, -1 padding).
"""
from __future__ import annotations

import pytest
import torch

from infllmv2.config import SparseConfig
from infllmv2.ops import naive
from infllmv2.ops.triton.selection import compress_keys_varlen, select_blocks_triton

from helpers import assert_selection_matches_by_score

SMALL = dict(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=3, init_blocks=1, dense_len=-1)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _pack(lens_q, lens_k, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    return q, k, _cu(lens_q), _cu(lens_k)


def _structure(got, nk, cfg):
    """(Hkv, n, budget) for one sequence whose queries are the last n of nk keys."""
    hkv, n, budget = got.shape
    t = torch.arange(nk - n, nk)
    bq = t // cfg.block_size
    size = (got >= 0).sum(-1)
    assert torch.equal(size, torch.minimum(bq + 1, torch.tensor(budget)).expand(hkv, n)), "selection size"
    valid = got >= 0
    assert (got[valid] >= 0).all()
    assert (got <= bq[None, :, None]).all(), "future block selected"
    # sorted ascending, padding at the end
    first_pad = size[..., None]
    pos = torch.arange(budget)
    assert torch.equal(valid, pos[None, None, :] < first_pad)
    assert ((got[..., 1:] > got[..., :-1]) | ~valid[..., 1:]).all(), "not strictly ascending"
    for h in range(hkv):
        for i in range(n):
            sel = set(got[h, i][got[h, i] >= 0].tolist())
            b = bq[i].item()
            forced = {x for x in range(min(cfg.init_blocks, b + 1))} | set(range(max(0, b - cfg.local_blocks), b + 1))
            assert forced <= sel, f"forced blocks missing at token {i}"


@pytest.mark.parametrize("kernel,stride", [(16, 8), (32, 16), (64, 16)])
def test_compress_keys_varlen(kernel, stride):
    lens = [0, 5, 16, 100, 33]
    k = torch.randn(sum(lens), 3, 32)
    cu = _cu(lens)
    out, cuc = compress_keys_varlen(k, cu, kernel, stride)
    assert cuc.dtype == torch.int32 and cuc.shape == (len(lens) + 1,)
    for i in range(len(lens)):
        ref = naive.compress_keys(k[cu[i]:cu[i + 1]], kernel, stride)
        got = out[cuc[i]:cuc[i + 1]]
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compress_keys_varlen_bf16():
    lens = [70, 0, 40]
    k = torch.randn(sum(lens), 2, 64).to(torch.bfloat16)
    out, cuc = compress_keys_varlen(k, _cu(lens), 16, 8)
    assert out.dtype == torch.bfloat16
    cu = _cu(lens)
    for i in range(len(lens)):
        ref = naive.compress_keys(k[cu[i]:cu[i + 1]].float(), 16, 8)
        torch.testing.assert_close(out[cuc[i]:cuc[i + 1]].float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("lse_approx", [True, False])
@pytest.mark.parametrize("g,hkv,d", [(1, 2, 32), (3, 1, 32), (4, 2, 64)])
def test_select_fp32_exact(lse_approx, g, hkv, d):
    cfg = SparseConfig(lse_approx=lse_approx, **SMALL)
    # varlen: a long one, an empty one, one shorter than a window, len_q < len_k, awkward lengths
    lens_k = [261, 0, 11, 150, 97]
    lens_q = [261, 0, 11, 37, 1]
    q, k, cuq, cuk = _pack(lens_q, lens_k, g * hkv, hkv, d, torch.float32, seed=g + d)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    assert got.shape == (hkv, sum(lens_q), cfg.budget) and got.dtype == torch.int32
    for i in range(len(lens_k)):
        qs, ks = q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]]
        gi = got[:, cuq[i]:cuq[i + 1]]
        ref = naive.select_blocks(qs, ks, cfg, d ** -0.5)
        assert torch.equal(gi, ref), f"sequence {i}"
        _structure(gi, lens_k[i], cfg)


def test_select_reads_a_q_of_any_strides():
    """A q whose head dim is not unit-stride (a permuted view) selects what its contiguous copy selects: the kernels
    read the head dim as unit-stride, and such a q gave another selection, silently."""
    cfg = SparseConfig(**SMALL)
    q, k, cuq, cuk = _pack([150, 70], [150, 90], 4, 2, 32, torch.float32, seed=3)
    strided = q.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # same values, head dim with stride total * Hq
    assert strided.stride(-1) != 1 and torch.equal(strided, q)
    want = select_blocks_triton(q, k, cfg, cuq, cuk, 150, 150)
    assert torch.equal(select_blocks_triton(strided, k, cfg, cuq, cuk, 150, 150), want)


@pytest.mark.parametrize("run,lens", [(16, [64, 9, 40]), (1, [300, 64]), (4, [300, 64])])
def test_select_fp32_exact_scan_runs(run, lens, monkeypatch):
    """The top-k's output positions by a scan within runs of blocks, then over the runs: rows of fewer blocks (8)
    than the default run (16) scan in one run; runs of 1 (one scan over the row) and 4 over 32-block rows."""
    from infllmv2.ops.triton import selection
    monkeypatch.setattr(selection, "_TOPK_SCAN_RUN", run)
    cfg = SparseConfig(**SMALL)
    q, k, cuq, cuk = _pack(lens, lens, 4, 2, 32, torch.float32, seed=3)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens), max(lens))
    for i in range(len(lens)):
        ref = naive.select_blocks(q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], cfg, 32 ** -0.5)
        assert torch.equal(got[:, cuq[i]:cuq[i + 1]], ref), i


@pytest.mark.parametrize("lse_approx", [True, False])
def test_select_fp32_exact_long_rows(lse_approx):
    """Rows long enough that most key tiles are visible to every token of a query tile (the LSE kernel
    skips the per-row visibility mask there: coarse keys with lse_approx, fine keys without)."""
    cfg = SparseConfig(lse_approx=lse_approx, **SMALL)
    lens_k, lens_q = [1300], [300]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 2, 1, 16, torch.float32, seed=11)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, 300, 1300)
    assert torch.equal(got, naive.select_blocks(q, k, cfg, 16 ** -0.5))


def test_select_exact_ties_prefer_lower_blocks():
    """Keys repeating with the block period make every full window's compressed key, hence every candidate
    block's score, bitwise equal: the top-k must break the ties towards lower block indices, as the
    reference does. A second head mixes tied and untied scores (one period perturbed)."""
    cfg = SparseConfig(**SMALL)
    n, d = 230, 16
    g = torch.Generator().manual_seed(5)
    period = torch.randn(cfg.block_size, 2, d, generator=g)
    k = period.repeat(-(-n // cfg.block_size), 1, 1)[:n].clone()
    k[5 * cfg.block_size:6 * cfg.block_size, 1] += 0.5 * torch.randn(cfg.block_size, d, generator=g)
    q = torch.randn(n, 4, d, generator=g)
    cu = _cu([n])
    got = select_blocks_triton(q, k, cfg, cu, cu, n, n)
    ref = naive.select_blocks(q, k, cfg, d ** -0.5)
    assert torch.equal(got, ref)
    # head 0, last token: every candidate ties, so the lowest candidate blocks fill the free slots
    b = (n - 1) // cfg.block_size
    free = cfg.budget - cfg.init_blocks - (cfg.local_blocks + 1)
    expect = list(range(cfg.init_blocks + free)) + list(range(b - cfg.local_blocks, b + 1))
    assert got[0, -1].tolist() == expect


def test_select_fp32_exact_in_small_chunks(monkeypatch):
    """Many workspace chunks: each chunk's top-k row is only as wide as its queries' key blocks (bounded
    by the tile index and the longest key prefix), which must not cut off a sequence whose queries
    start late in its keys."""
    from infllmv2.ops.triton import selection
    monkeypatch.setattr(selection, "_WORKSPACE_BYTES", 2 * 4 * 4 * 20)  # 4 tiles x 4 tokens x 20 blocks x Hkv 2
    cfg = SparseConfig(**SMALL)
    lens_k = [130, 300, 7, 260]
    lens_q = [130, 20, 7, 64]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 4, 2, 16, torch.float32, seed=3)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k), block_m=16)
    for i in range(len(lens_k)):
        ref = naive.select_blocks(q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], cfg, 16 ** -0.5)
        assert torch.equal(got[:, cuq[i]:cuq[i + 1]], ref), f"sequence {i}"


@pytest.mark.parametrize("tile", [8, 64])
def test_select_rows_per_topk_program(tile, monkeypatch):
    """The top-k programs hold `_SELECT_TILE` block scores: 8 gives one row per program (several programs per
    query tile), 64 several rows per program; both select what the reference does."""
    from infllmv2.ops.triton import selection
    monkeypatch.setattr(selection, "_SELECT_TILE", tile)
    cfg = SparseConfig(**SMALL)
    lens_k, lens_q = [300, 97], [300, 40]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 4, 2, 16, torch.float32, seed=13)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k), block_m=32)
    for i in range(len(lens_k)):
        ref = naive.select_blocks(q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], cfg, 16 ** -0.5)
        assert torch.equal(got[:, cuq[i]:cuq[i + 1]], ref), f"sequence {i}"


def test_select_default_pooling_geometry():
    """kernel 32 / stride 16 / block 64 (windows 4b-1 .. 4b+3), two init blocks, scale given."""
    cfg = SparseConfig(block_size=64, kernel_size=32, kernel_stride=16, window_size=64, topk=4, init_blocks=2,
                       dense_len=-1)
    lens = [700, 300]
    q, k, cuq, cuk = _pack([200, 300], lens, 4, 2, 32, torch.float32, seed=7)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, 300, 700, softmax_scale=0.3)
    for i in range(2):
        ref = naive.select_blocks(q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], cfg, 0.3)
        assert torch.equal(got[:, cuq[i]:cuq[i + 1]], ref)


@pytest.mark.parametrize("transposed", [False, True])
def test_select_bf16_by_score(transposed):
    cfg = SparseConfig(**SMALL)
    lens_k = [300, 64]
    lens_q = [300, 20]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 8, 2, 32, torch.bfloat16, seed=3)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, 300, 300, transposed=transposed)
    for i in range(2):
        qs, ks = q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]]
        gi = got[:, cuq[i]:cuq[i + 1]]
        _structure(gi, lens_k[i], cfg)
        assert_selection_matches_by_score(qs, ks, cfg, gi, 32 ** -0.5, rtol=2e-2, atol=1e-4)


def test_budget_covers_everything():
    """n <= budget * B: every past block selected."""
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=32, topk=8, dense_len=-1)
    n = 150
    q, k, cuq, cuk = _pack([n], [n], 2, 1, 32, torch.float32)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, n, n)
    bq = torch.arange(n) // 16
    for i in range(n):
        assert got[0, i][got[0, i] >= 0].tolist() == list(range(bq[i].item() + 1))


def test_bad_inputs():
    cfg = SparseConfig(**SMALL)
    q, k, cuq, cuk = _pack([20], [20], 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="Hq"):
        select_blocks_triton(q[:, :3], k, cfg, cuq, cuk, 20, 20)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        select_blocks_triton(q, k, cfg, cuq.long(), cuk, 20, 20)
    with pytest.raises(TypeError, match="k must have"):
        select_blocks_triton(q, k.double(), cfg, cuq, cuk, 20, 20)
    with pytest.raises(ValueError, match="head dim"):
        select_blocks_triton(q[..., :8], k[..., :8], cfg, cuq, cuk, 20, 20)
    with pytest.raises(ValueError, match="q must be"):
        select_blocks_triton(q[0], k, cfg, cuq, cuk, 20, 20)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        select_blocks_triton(q, k, cfg, cuq, cuk, 20, 10)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        select_blocks_triton(q, k, cfg, cuq, torch.tensor([0, 19], dtype=torch.int32), 20, 20)
    with pytest.raises(ValueError, match="len_q <= len_k"):
        select_blocks_triton(q, k[:10], cfg, cuq, torch.tensor([0, 10], dtype=torch.int32), 20, 20)
    # tile widths are powers of two: other block geometries are refused by name (an interpreter or compile error in
    # the kernel before); the torch backend runs them
    for bad in (dict(block_size=48, kernel_size=32, kernel_stride=16, window_size=48),
                dict(block_size=24, kernel_size=24, kernel_stride=12, window_size=24)):
        with pytest.raises(NotImplementedError, match="powers of two"):
            select_blocks_triton(q, k, SparseConfig(**{**SMALL, **bad}), cuq, cuk, 20, 20)
    # an empty batch is valid
    out = select_blocks_triton(q[:0], k[:0], cfg, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                               0, 0)
    assert out.shape == (2, 0, cfg.budget)


def test_select_with_host_offsets_reads_nothing_back(monkeypatch):
    # given the layout as host lists, stage 1 checks and sizes everything on the host: it reads no tensor
    # back (on a GPU each read would stall the host until the queued work is done), and selects the same
    cfg = SparseConfig(**SMALL)
    lens_k, lens_q = [261, 0, 11, 150, 97], [261, 0, 11, 37, 1]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 4, 2, 32, torch.float32, seed=4)
    want = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    host = (cuq.tolist(), cuk.tolist())

    def no_read(*_):
        raise AssertionError("a tensor was read back to the host")
    for name in ("item", "tolist", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k), host_offsets=host)
    monkeypatch.undo()
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="len_q <= len_k"):  # the host check stands in for the device one
        select_blocks_triton(q[:20], k[:10], cfg, _cu([20]), _cu([10]), 20, 20, host_offsets=([0, 20], [0, 10]))
    with pytest.raises(ValueError, match="host_offsets"):
        select_blocks_triton(q, k, cfg, cuq, cuk, 300, 300, host_offsets=(host[0][:-1], host[1]))


def test_select_reads_the_layout_back_once(monkeypatch):
    # without host offsets, the call reads cu_seqlens back to the host once (one drain of the GPU's queue) and
    # checks and sizes everything from that; it used to take four synchronisations
    cfg = SparseConfig(**SMALL)
    lens_k, lens_q = [261, 0, 11, 150, 97], [261, 0, 11, 37, 1]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 4, 2, 32, torch.float32, seed=4)
    want = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k), host_offsets=(cuq.tolist(),
                                                                                              cuk.tolist()))
    reads = []
    tolist = torch.Tensor.tolist

    def counted(t):
        reads.append(t.numel())
        return tolist(t)

    def no_read(*_):
        raise AssertionError("a tensor was read back to the host")
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    for name in ("item", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, max(lens_q), max(lens_k))
    monkeypatch.undo()
    assert reads == [2 * len(cuq)]
    assert torch.equal(got, want)
    bad = cuk.clone()
    bad[2] = bad[1] - 1  # a negative key length: still refused, from the read-back copy
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        select_blocks_triton(q, k, cfg, cuq, bad, max(lens_q), max(lens_k))


@pytest.mark.parametrize("trans", [True, False])
def test_select_fp32_exact_several_head_major_row_groups(monkeypatch, trans):
    """Tiles wider than one row group (8-warp tiles of 256 rows on the GPU): rows are (token // TG, head,
    token % TG), and the group sum and pooling must still see each token's heads together and the tokens
    in order. Shrinking the group to 8 rows gives 4 groups of 2 tokens x 4 heads per 32-row tile here."""
    from infllmv2.ops.triton import selection
    monkeypatch.setattr(selection, "_GROUP_COLUMNS", 8)
    cfg = SparseConfig(**SMALL)
    lens_k, lens_q = [203, 90], [203, 31]
    q, k, cuq, cuk = _pack(lens_q, lens_k, 8, 2, 16, torch.float32, seed=21)
    got = select_blocks_triton(q, k, cfg, cuq, cuk, 203, 203, block_m=32, transposed=trans)
    for i in range(2):
        ref = naive.select_blocks(q[cuq[i]:cuq[i + 1]], k[cuk[i]:cuk[i + 1]], cfg, 16 ** -0.5)
        assert torch.equal(got[:, cuq[i]:cuq[i + 1]], ref), f"sequence {i}"


@pytest.mark.parametrize("search", [None, (1, 0.2, 0), (1000, 0.45, 0)])
@pytest.mark.parametrize("case", ["rounded_keys", "zero_queries", "peaked"])
def test_select_fp32_exact_on_tied_and_skewed_scores(case, search, monkeypatch):
    """The top-k threshold search (clamped interpolation steps, halving steps, brackets snapped to keys; the
    default and two extremes: halving and snapping at every step, or snapping with no halving; counts by the sign
    of key - threshold) on score rows with many exact ties (integer keys; all-zero queries, where every candidate
    ties) and on very peaked rows, where interpolating the count is a poor guess: the selection must still be the
    reference's."""
    from infllmv2.ops.triton import selection
    if search is not None:
        monkeypatch.setattr(selection, "_TOPK_SEARCH", search)
    cfg = SparseConfig(**dict(SMALL, topk=5))
    g = torch.Generator().manual_seed(3)
    n = 520
    k = torch.randn(n, 2, 16, generator=g)
    q = torch.randn(n, 8, 16, generator=g)
    if case == "rounded_keys":
        k = k.round()
    elif case == "zero_queries":
        q = q * 0
    else:
        q = q * 20
    cu = _cu([n])
    got = select_blocks_triton(q, k, cfg, cu, cu, n, n)
    assert torch.equal(got, naive.select_blocks(q, k, cfg, 16 ** -0.5))


@pytest.mark.parametrize("bad", [0.0, -0.125, float("nan"), True, "0.1"])
def test_triton_entry_points_refuse_a_non_positive_softmax_scale(bad):
    # the kernels take each row's max over the unscaled scores and scale it afterwards: only a positive scale gives
    # the max of the scaled scores, so anything else is refused by name instead of giving wrong attention
    from infllmv2.ops.triton import infllmv2_decode_triton, sparse_attention_triton
    cfg = SparseConfig(**SMALL)
    q, k, cu_q, cu_k = _pack([40], [40], 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="softmax_scale"):
        select_blocks_triton(q, k, cfg, cu_q, cu_k, 40, 40, softmax_scale=bad)
    idx = torch.full((2, 40, cfg.budget), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="softmax_scale"):
        sparse_attention_triton(q, k, k, idx, 16, cu_q, cu_k, 40, 40, softmax_scale=bad)
    with pytest.raises(ValueError, match="softmax_scale"):
        infllmv2_decode_triton(q[:2], k[None].expand(2, -1, -1, -1).contiguous(), k[None].expand(2, -1, -1, -1)
                               .contiguous(), torch.tensor([40, 30], dtype=torch.int32), cfg, softmax_scale=bad)


def test_launchers_run_on_their_tensors_gpu(monkeypatch):
    """Triton launches on the current device: each launcher makes its first tensor's GPU current (a layer on
    cuda:1 with cuda:0 current, e.g. a model split by ``device_map``). CPU-checked with fake CUDA tensors; the
    launches themselves on two GPUs: tests/gpu/test_multi_gpu_gpu.py."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from infllmv2.ops.triton import append, decode, selection, sparse_attention
    current, switches = [0], []

    class device_context:  # stands in for torch.cuda.device
        def __init__(self, dev):
            self.dev = torch.device(dev)

        def __enter__(self):
            switches.append(self.dev.index)
            current.insert(0, self.dev.index)

        def __exit__(self, *exc):
            current.pop(0)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_context)
    seen = []
    launcher = selection.on_tensor_device(lambda *args, **kw: (seen.append(current[0]), "result")[1])
    with FakeTensorMode():
        on1, on0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    assert launcher("not a tensor", on1, on0, x=on0) == "result"  # the first tensor argument decides
    assert launcher(on0, on1) == "result"
    assert launcher(torch.empty(2), on1) == "result"  # CPU tensors (the interpreter): nothing to switch
    assert seen == [1, 0, 0] and switches == [1] and current == [0]

    guarded = [selection._compress_core, selection._select_core, sparse_attention._forward, sparse_attention._backward,
               decode._decode, decode.DecodeGraph.__init__, append.append_token]  # every path to a kernel launch
    for fn in guarded:
        assert fn.__code__ is launcher.__code__, f"{fn.__qualname__} launches on the current device"
