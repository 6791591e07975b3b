"""InfLLM-V2 decoding cache (infllmv2/cache.py): incremental compressed keys, generate(), chunked
prefill, padded batches, the static variant. CPU, tiny random Llama."""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from infllmv2 import SparseConfig  # noqa: E402
from helpers import TINY_VOCAB, random_ids as _ids  # noqa: E402
from infllmv2.cache import InfLLMv2Cache, InfLLMv2StaticCache, StaticCompressedKeys, append_windows  # noqa: E402
from infllmv2.models.transformers import enable  # noqa: E402
from infllmv2.ops import naive, torch_decode  # noqa: E402

SPARSE = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, window_size=16, topk=2,
                      dense_len=-1)
VOCAB = TINY_VOCAB
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
CACHE_POSITION = "cache_position" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters


def _llama(layers=2, seed=0, head_dim=16):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                   max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def _left_padded(seqs, mask_len=None):
    """generate()'s layout: rows right-aligned in n = the longest prompt; the mask (``mask_len`` >= n columns,
    default n) marks each row's slots from its first token on, later slots included."""
    n = max(x.shape[1] for x in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), mask_len or n, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, n - x.shape[1]:], mask[i, n - x.shape[1]:] = x[0], 1
    return ids, mask, n


@contextlib.contextmanager
def _decode_kernel_calls():
    """Records the keyword arguments of every Triton decode-kernel call made inside the block."""
    from infllmv2.ops import triton as tri
    orig, calls = tri.infllmv2_decode_triton, []

    def spy(*a, **k):
        calls.append(k)
        return orig(*a, **k)
    tri.infllmv2_decode_triton = spy
    try:
        yield calls
    finally:
        tri.infllmv2_decode_triton = orig


def _check_compressed(cache, config, rows=None):
    """Every layer's compressed keys equal compressing the (valid) cached keys from scratch."""
    for layer in cache.layers:
        st = layer._infllmv2_state
        assert st is not None
        for i in range(layer.keys.shape[0]):
            keys = layer.keys[i].transpose(0, 1)  # (sk, Hkv, d)
            if rows is not None:
                keys = keys[rows[i]]
            for pk in st.kinds():
                ref = naive.compress_keys(keys.float(), pk.kernel, pk.stride)
                assert pk.count[i] == ref.shape[0]
                torch.testing.assert_close(pk.rows(i), ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
@torch.no_grad()  # as generate() runs: under grad mode the layers concatenate (autograd may hold the views)
def test_dynamic_layer_writes_in_place_with_room_and_equals_concatenation():
    """InfLLMv2Cache's layers keep their keys / values as prefix views of buffers with room and write new tokens in
    place (no copy of the cache a step); what they return equals DynamicCache's concatenation through growth,
    crop (a prefix view, overwritten by the next tokens), a batch reorder (new tensors, adopted) and reset."""
    from infllmv2 import cache as cache_mod
    ours, ref = InfLLMv2Cache(), transformers.DynamicCache()
    g = torch.Generator().manual_seed(0)

    def put(n, batch=2):
        k, v = torch.randn(batch, 2, n, 8, generator=g), torch.randn(batch, 2, n, 4, generator=g)  # d_v != d_k
        a, b = ours.update(k, v, 0), ref.update(k.clone(), v.clone(), 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        return a[0]

    first = put(300)
    layer = ours.layers[0]
    room = layer._infllmv2_room[0].shape[2]
    assert room == 300 + cache_mod._ROOM_MIN
    for _ in range(room - 300):  # decode steps fill the room: the storage stays where it is
        keys = put(1)
        assert keys.data_ptr() == first.data_ptr()
    assert layer.decode_room(keys.shape[2])[0].shape == (2, room, 2, 8)
    assert layer.decode_room(keys.shape[2] - 1) is None  # other lengths than the cached ones: no room view
    grown = put(1)  # full: a larger buffer, the old contents copied
    assert grown.data_ptr() != first.data_ptr() and layer._infllmv2_room[0].shape[2] > room
    ours.crop(-5), ref.crop(-5)
    put(3)  # written over the cropped slots
    idx = torch.tensor([1, 0])
    ours.batch_select_indices(idx), ref.batch_select_indices(idx)
    assert layer.decode_room(ours.get_seq_length()) is None  # the reordered keys are new tensors...
    adopted = put(2)  # ... adopted into new room
    assert adopted.data_ptr() == layer._infllmv2_room[0].data_ptr()
    for _ in range(3):
        put(1)
    before = ref.get_seq_length()
    ours.reset(), ref.reset()
    assert layer.__dict__.get("_infllmv2_room") is None
    emptied = ref.get_seq_length() == 0  # transformers 5 empties a reset cache; 4.x zeroes its keys in place
    assert ours.get_seq_length() == ref.get_seq_length() == (0 if emptied else before)
    put(7, batch=3 if emptied else 2)  # another batch size after the reset (5.x)
    assert ours.get_seq_length() == ref.get_seq_length() == (0 if emptied else before) + 7


@torch.no_grad()  # as generate() runs (under grad mode the caches concatenate: no room, no graph)
def test_decode_graph_captured_at_second_step_on_same_caches_and_again_after_they_move(monkeypatch):
    """The eager decode path's graph policy (models/transformers.py ``_decode_graph``), with a stand-in for the
    CUDA graph: none at the first step on a layer's caches, captured at the second, reused while keys are appended
    in room, captured again once the room grew or the compressed keys moved, never when the caches move at every
    step (a beam search's reorders)."""
    import infllmv2.ops.triton.decode as decode_mod
    from infllmv2.models.transformers import _decode_graph

    made = []

    class StandIn:
        key_of = staticmethod(decode_mod.DecodeGraph.key_of)  # what a graph is captured on: the real key

        def __init__(self, q, k, v, lens, config, scale, k_fine, k_coarse, leftpad=None):
            self.key = self.key_of(q, k, v, config, scale, k_fine, k_coarse, leftpad)
            made.append((k.shape[1], lens.tolist()))

    monkeypatch.setattr(decode_mod, "DecodeGraph", StandIn)
    monkeypatch.setattr(decode_mod, "decode_graphs_apply", lambda q: True)
    cache, g = InfLLMv2Cache(), torch.Generator().manual_seed(0)
    q, kf, kc = torch.randn(2, 4, 8, generator=g), torch.randn(2, 40, 2, 8), torch.randn(2, 10, 2, 8)

    def step(n=1):
        cache.update(torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g), 0)
        layer = cache.layers[0]
        return _decode_graph(layer, q, layer.keys.shape[2], None, None, SPARSE, 0.5, kf, kc)

    assert step(300) is None and not made  # first step on these caches: launched directly
    first = step()
    assert first is not None and made == [(300 + 256, [301, 301])]  # the whole room; the lengths of this step
    for _ in range(255):  # appended in room up to its last slot: the same graph
        assert step() is first
    assert step() is None and step() is not None and len(made) == 2  # the room grew: again at the second step
    kf = kf.clone()  # the compressed keys moved
    assert step() is None and step() is not None and len(made) == 3
    for _ in range(5):  # reordered before every step (new tensors, adopted into new room): never captured
        cache.reorder_cache(torch.tensor([1, 0]))
        assert step() is None
    assert len(made) == 3


def test_static_cache_eager_steps_read_the_layout_once_a_forward_and_graph_the_slots(monkeypatch):
    """Eager static-cache decode steps: the filled-slot layout (a host read) is read once a forward, not once a
    layer; a layer's decode graph (a stand-in here) is captured at the second step on its preallocated slots and
    serves every later step (the slots never move) until a reset drops it."""
    import infllmv2.ops.triton.decode as decode_mod
    from infllmv2.models import transformers as integration
    model = enable(_llama(layers=3), SPARSE.replace(dense_len=100), backend="torch")
    model.generation_config.eos_token_id = None
    model.generation_config.disable_compile = True
    reads = []
    real = integration._static_rows
    monkeypatch.setattr(integration, "_static_rows", lambda mask, check: reads.append(check) or real(mask, check))
    ids, cache = _ids(150, seed=3), InfLLMv2StaticCache(config=model.config, max_cache_len=170)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        static = model.generate(ids, **{CACHE: cache}, **kw)
        dynamic = model.generate(ids, **{CACHE: InfLLMv2Cache()}, **kw)
    assert reads == [True] * 5  # 5 decode steps of 3 layers
    assert torch.equal(static.sequences, dynamic.sequences)

    made = []

    class StandIn:
        key_of = staticmethod(decode_mod.DecodeGraph.key_of)

        def __init__(self, q, k, v, lens, config, scale, k_fine, k_coarse, leftpad=None):
            self.key = self.key_of(q, k, v, config, scale, k_fine, k_coarse, leftpad)
            made.append((k.data_ptr(), k.shape[1], v.data_ptr()))

    monkeypatch.setattr(decode_mod, "DecodeGraph", StandIn)
    monkeypatch.setattr(decode_mod, "decode_graphs_apply", lambda q: True)
    layer, q = cache.layers[1], torch.randn(1, 4, 16)
    st = layer._infllmv2_state
    lens, pad = torch.tensor([160], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)

    def step():
        return integration._decode_graph(layer, q, 170, lens, pad, SPARSE, 0.25, st.fine.data, st.coarse.data)

    assert step() is None and not made
    first = step()
    assert made == [(layer.keys.data_ptr(), 170, layer.values.data_ptr())]  # on all the slots, in place
    for _ in range(20):
        lens += 1
        assert step() is first
    assert layer.decode_room(171) is None  # past the slots
    cache.reset()
    assert layer.__dict__.get("_infllmv2_graph") is None


def test_filled_slots_and_row_layout_equal_a_python_reading_of_the_mask():
    """Per row: the count of valid slots, the first one (the length when none) and whether they are contiguous,
    on the device; row_layout reads them in one go. Random masks with holes, empty, full and single-slot rows."""
    from infllmv2.cache import filled_slots, row_layout
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 40, (1,), generator=g))
        mask = torch.rand(6, n, generator=g) < torch.rand(6, 1, generator=g)  # rows from empty to full
        a, b_ = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
        mask[0] = False
        mask[1], mask[2] = True, False
        mask[2, a:b_] = True  # one contiguous run (maybe empty)
        length = int(torch.randint(1, n + 1, (1,), generator=g)) if trial % 2 else None
        count, first, contiguous = filled_slots(mask, length)
        want = []
        for row in (mask if length is None else mask[:, :length]).tolist():
            idx = [j for j, x in enumerate(row) if x]
            c = not idx or idx == list(range(idx[0], idx[-1] + 1))
            want.append((len(idx), idx[0] if idx else len(row), c))
        assert count.dtype == first.dtype == torch.int32
        assert list(zip(count.tolist(), first.tolist(), contiguous.tolist())) == want
        got = row_layout(mask, n if length is None else length, 6)
        assert got == [(c, f if ok else None) for c, f, ok in want]


def _assert_cached_grads_equal_dynamic_cache(model, ids):
    """The gradients through two cached forwards (30 tokens, then the rest) with an InfLLMv2Cache equal those with a
    DynamicCache (the trained parameters')."""
    grads = []
    for make in (transformers.DynamicCache, InfLLMv2Cache):
        model.zero_grad()
        cache = make()
        a = model(input_ids=ids[:, :30], **{CACHE: cache}).logits
        b = model(input_ids=ids[:, 30:], **{CACHE: cache}).logits
        (a.square().mean() + b.square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_dynamic_layer_room_keeps_autograd_and_inference_mode_working():
    """With grad, the cache concatenates (in-place writes would change views autograd saved): the gradients
    through two cached forwards equal DynamicCache's. A cache filled under inference_mode takes the next step
    outside it (its buffers are replaced, not written in place)."""
    model = enable(_llama(), SPARSE.replace(dense_len=-1), backend="torch")
    ids = _ids(40, seed=3)
    _assert_cached_grads_equal_dynamic_cache(model, ids)
    cache, ref_cache = InfLLMv2Cache(), InfLLMv2Cache()
    with torch.inference_mode():
        first = model(input_ids=ids[:, :30], **{CACHE: cache}).logits
    with torch.no_grad():
        torch.testing.assert_close(first, model(input_ids=ids[:, :30], **{CACHE: ref_cache}).logits)
        for t in range(30, 40):  # decode steps that complete new compressed windows
            out = model(input_ids=ids[:, t:t + 1], **{CACHE: cache}).logits
            torch.testing.assert_close(out, model(input_ids=ids[:, t:t + 1], **{CACHE: ref_cache}).logits)


def test_room_under_grad_mode_when_only_the_queries_need_gradients():
    """Only q_proj trained: the keys / values need no gradient, but attention saves their views for the queries'
    backward, and the next step's in-place write into the room bumped those views' version (backward failed).
    Under grad mode the cache concatenates, as DynamicCache: equal gradients."""
    model = enable(_llama(), SPARSE.replace(dense_len=-1), backend="torch")
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    _assert_cached_grads_equal_dynamic_cache(model, _ids(40, seed=4))


@pytest.mark.parametrize("change", ["more_padding", "less_padding"])
def test_compressed_keys_follow_a_row_whose_padding_changed(change):
    """A row whose first valid slot moves between calls (a caller that re-masks cached slots) while its count still
    grows: the kept windows were of the old set of keys; now they are rebuilt, equal to compressing the row's
    valid keys from scratch."""
    cache = InfLLMv2Cache()
    g = torch.Generator().manual_seed(5)
    cache.update(torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g), 0)
    masks = [torch.ones(1, 40, dtype=torch.bool), torch.ones(1, 60, dtype=torch.bool)]
    masks[0 if change == "less_padding" else 1][0, :8] = False
    layer = cache.layers[0]
    for step, mask in enumerate(masks):
        if step:
            cache.update(torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g), 0)
        n = layer.keys.shape[2]
        st = layer.infllmv2_compressed(mask, SPARSE.replace(dense_len=-1), length=n)
        valid = layer.keys[0].transpose(0, 1)[mask[0, :n]]
        for pk in st.kinds():
            torch.testing.assert_close(pk.rows(0), naive.compress_keys(valid, pk.kernel, pk.stride),
                                       atol=1e-6, rtol=1e-6)


def test_incremental_compressed_keys_equal_scratch_across_dense_len_switch():
    config = SPARSE.replace(dense_len=150)
    model = enable(_llama(), config)
    ids = _ids(200)
    cache = InfLLMv2Cache()
    with torch.no_grad():
        model(input_ids=ids[:, :120], **{CACHE: cache}, use_cache=True)
        assert all(layer._infllmv2_state is None for layer in cache.layers)  # lazy: still dense
        for t in range(120, 200):
            model(input_ids=ids[:, t:t + 1], **{CACHE: cache}, use_cache=True)
            if t + 1 >= 150:
                assert all(layer._infllmv2_state is not None for layer in cache.layers)
            if t + 1 in (150, 151, 167, 200):
                _check_compressed(cache, config)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_static_compressed_keys_equal_scratch(fused):
    config = SPARSE
    g = torch.Generator().manual_seed(0)
    b, n0, steps, h, d = 3, 37, 90, 2, 16
    k_cache = torch.randn(b, n0 + steps, h, d, generator=g)
    lens = torch.tensor([n0, n0 - 20, 5])
    sk = StaticCompressedKeys(b, n0 + steps, h, d, config, torch.float32, "cpu")
    sk.prefill(k_cache, lens)
    for _ in range(steps):
        lens = lens + 1
        sk.append(k_cache, lens, fused=fused)
    for i, n in enumerate(lens.tolist()):
        for (kern, s), buf in zip(sk.specs, sk.buffers):
            ref = naive.compress_keys(k_cache[i, :n], kern, s)
            torch.testing.assert_close(buf[i, :ref.shape[0]], ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_append_windows_left_padded_equal_scratch(fused):
    g = torch.Generator().manual_seed(1)
    b, max_len, h, d = 3, 140, 2, 16
    k_cache = torch.randn(b, max_len, h, d, generator=g)
    pad = torch.tensor([0, 20, 35])
    lens = 40 - pad  # every row's keys end at slot 40, as in a static cache
    kinds = [(16, 8, torch.zeros(b, max_len // 8, h, d)), (64, 32, torch.zeros(b, max_len // 32, h, d))]
    for kern, s, buf in kinds:
        for i in range(b):
            c = naive.compress_keys(k_cache[i, pad[i]:pad[i] + lens[i]], kern, s)
            buf[i, :c.shape[0]] = c
    for _ in range(90):
        lens = lens + 1
        append_windows(kinds, k_cache, lens, leftpad=pad, fused=fused)
    for kern, s, buf in kinds:
        for i in range(b):
            ref = naive.compress_keys(k_cache[i, pad[i]:pad[i] + lens[i]], kern, s)
            torch.testing.assert_close(buf[i, :ref.shape[0]], ref, atol=1e-6, rtol=1e-6)
            assert not buf[i, ref.shape[0]:].any()  # nothing written past the row's windows


def _left_padded_rows(lens, max_len, hq, hkv, d, config, seed=0):
    """Rows right-aligned in a static cache (garbage in the pad slots) and their compressed keys
    (garbage past each row's windows too, which must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    q = torch.randn(b, hq, d, generator=g)
    kc, vc = torch.randn(b, max_len, hkv, d, generator=g), torch.randn(b, max_len, hkv, d, generator=g)
    pad = torch.tensor([max_len - n for n in lens])
    bufs = []
    for kern, stride in ((config.kernel_size, config.kernel_stride),
                         (config.coarse_kernel_size, config.coarse_kernel_stride)):
        buf = torch.randn(b, max_len // stride, hkv, d, generator=g)
        for i, n in enumerate(lens):
            c = naive.compress_keys(kc[i, max_len - n:], kern, stride)
            buf[i, :c.shape[0]] = c
        bufs.append(buf)
    return q, kc, vc, torch.tensor(lens), pad, bufs[0], bufs[1] if config.lse_approx else None


@pytest.mark.parametrize("lse_approx", [True, False])
@pytest.mark.parametrize("dense_len", [-1, 150, 400])
def test_decode_static_equals_reference(lse_approx, dense_len):
    config = SPARSE.replace(lse_approx=lse_approx, dense_len=dense_len, topk=3)
    lens = [300, 1, 45, 200, 150, 149]
    q, kc, vc, sl, pad, kf, kco = _left_padded_rows(lens, 320, 6, 2, 16, config)
    out = torch_decode.decode_static(q, kc, vc, sl, pad, kf, kco, config, scale=0.3)
    for i, n in enumerate(lens):
        ref, _ = naive.infllmv2_attention(q[i:i + 1], kc[i, 320 - n:], vc[i, 320 - n:], config, scale=0.3)
        torch.testing.assert_close(out[i], ref[0], atol=1e-5, rtol=1e-5)


def test_decode_static_compiles_fullgraph():
    config = SPARSE.replace(dense_len=150)
    lens = [300, 77, 149]
    q, kc, vc, sl, pad, kf, kco = _left_padded_rows(lens, 320, 8, 2, 16, config, seed=1)
    eager = torch_decode.decode_static(q, kc, vc, sl, pad, kf, kco, config)
    compiled = torch.compile(torch_decode.decode_static, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, kc, vc, sl, pad, kf, kco, config), eager, atol=1e-5, rtol=1e-5)


def test_select_blocks_compressed_equals_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 16, generator=g), torch.randn(180, 2, 16, generator=g)
    k1 = naive.compress_keys(k, 16, 8)
    k2 = naive.compress_keys(k, 64, 32)
    assert torch.equal(torch_decode.select_blocks_compressed(q, 180, k1, k2, SPARSE),
                       naive.select_blocks(q, k, SPARSE))


def test_generate_with_cache_equals_without():
    model = enable(_llama(), SPARSE.replace(dense_len=170))
    prompt = _ids(160)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(prompt, **kw)
        cache = InfLLMv2Cache()
        cached = model.generate(prompt, **{CACHE: cache}, **kw)
    assert torch.equal(plain.sequences, cached.sequences)
    for a, b in zip(plain.logits, cached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(layer._infllmv2_state is not None for layer in cache.layers)  # built once past dense_len


def test_beam_search_with_cache_equals_plain_dynamic_cache():
    """Beam search reorders the cache at every step (new tensors, adopted into new room by the next update, and
    the compressed keys reordered with them): its beams equal those over transformers' DynamicCache, with which the
    attention pools the compressed keys from scratch at every step; so do the logits of distinct rows reordered
    at random before each step, whose compressed keys stay those of their rows."""
    model = enable(_llama(), SPARSE.replace(dense_len=150))
    prompt = _ids(140, seed=5)  # 40 new tokens: the beams' own keys fill compressed windows
    kw = dict(max_new_tokens=40, do_sample=False, num_beams=3, num_return_sequences=3, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(prompt, **{CACHE: transformers.DynamicCache()}, **kw)
        cache = InfLLMv2Cache()
        cached = model.generate(prompt, **{CACHE: cache}, **kw)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(plain.sequences_scores, cached.sequences_scores, atol=1e-5, rtol=1e-5)
    assert all(layer._infllmv2_state is not None for layer in cache.layers)  # sparse steps ran on the cache
    # rows that differ, reordered (with repeats, as beams are) before each step: the compressed keys follow the
    # rows (equal to compressing each row's cached keys from scratch) and the logits equal DynamicCache's
    g = torch.Generator().manual_seed(0)
    caches = (InfLLMv2Cache(), transformers.DynamicCache())
    ids = _ids(150, batch=3, seed=6)
    with torch.no_grad():
        for c in caches:
            model(input_ids=ids, **{CACHE: c})
        for _ in range(24):
            order = torch.randint(0, 3, (3,), generator=g)
            tok = torch.randint(3, VOCAB, (3, 1), generator=g)
            outs = []
            for c in caches:
                c.reorder_cache(order)
                outs.append(model(input_ids=tok, **{CACHE: c}).logits)
            torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    _check_compressed(caches[0], SPARSE.replace(dense_len=150))


def test_triton_decode_path_with_cache_equals_without():
    """backend='triton' (the interpreter here): decode steps call the Triton decode kernel with the cached
    fine/coarse keys; the result equals the plain path that pools the keys from scratch."""
    model = _llama(layers=1, seed=0, head_dim=32)  # head dim 32: the Triton kernels' smallest
    model.generation_config.eos_token_id = None
    enable(model, SPARSE.replace(dense_len=140), backend="triton")
    prompt = _ids(136)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(prompt, **kw)
        with _decode_kernel_calls() as calls:
            cached = model.generate(prompt, **{CACHE: InfLLMv2Cache()}, **kw)
    # steps at 140.. keys: the kernel, given the cached keys
    assert len(calls) >= 4 and all(k.get("k_fine") is not None for k in calls)
    assert torch.equal(plain.sequences, cached.sequences)
    for a, b in zip(plain.logits, cached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_triton_decode_step_under_autograd_takes_a_differentiable_path(static):
    """A cached decode step under autograd (backend='triton', the interpreter here; dynamic or static cache) does
    not run the decode kernels, which have no backward: its gradients equal those of the same step through the
    torch path."""
    grads = []
    for backend in ("triton", "torch"):
        model = enable(_llama(layers=1, seed=0, head_dim=32), SPARSE.replace(dense_len=140), backend=backend)
        prompt = _ids(150)
        cache = InfLLMv2StaticCache(config=model.config, max_cache_len=160) if static else InfLLMv2Cache()
        mask = torch.ones(1, 160 if static else 150, dtype=torch.long)  # a static cache: a mask over every slot
        mask[:, 150:] = 0
        pos = torch.arange(150)[None]
        with torch.no_grad():
            model(input_ids=prompt[:, :149], attention_mask=mask[:, :149] if not static else mask,
                  position_ids=pos[:, :149], **{CACHE: cache})
        with _decode_kernel_calls() as calls:
            logits = model(input_ids=prompt[:, 149:], attention_mask=mask if static else mask[:, :150],
                           position_ids=pos[:, 149:], **{CACHE: cache}).logits
        assert not calls
        logits.square().mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0] is not None and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_triton_decode_left_padded_batch_uses_kernel_and_equals_each_alone(monkeypatch):
    """A left-padded batch (generate()'s layout) decodes through the kernel with ``cache_leftpad``, given the
    cached compressed keys, and each row equals it generated alone. The rows' lengths and first slots come from
    the mask once a forward, not once a layer."""
    from infllmv2.models import transformers as integration
    model = _llama(layers=2, seed=1, head_dim=32)
    model.generation_config.eos_token_id = None
    enable(model, SPARSE.replace(dense_len=120), backend="triton")
    seqs = [_ids(150, seed=6), _ids(100, seed=7)]  # the second turns sparse mid-generation
    ids, mask, n = _left_padded(seqs)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    from infllmv2 import cache as cache_mod
    slots, real_slots = [], cache_mod.filled_slots  # the rows' lengths on the device, wherever they are made
    for module in (cache_mod, integration):
        monkeypatch.setattr(module, "filled_slots", lambda *a: slots.append(1) or real_slots(*a))
    rows, real_rows = [], integration.row_layout  # ... and read to the host
    monkeypatch.setattr(integration, "row_layout", lambda *a: rows.append(1) or real_rows(*a))
    with torch.no_grad():
        with _decode_kernel_calls() as calls:
            batched = model.generate(ids, attention_mask=mask, **{CACHE: InfLLMv2Cache()}, **kw)
        assert len(calls) == 5 * 2 and all(k.get("k_fine") is not None for k in calls)
        assert len(slots) == len(rows) == 6  # the prefill and 5 decode steps, of 2 layers each
        assert all(k["cache_leftpad"].tolist() == [0, 50] for k in calls)  # row 1's 50 pad slots, every layer
        for i, x in enumerate(seqs):
            alone = model.generate(x, **{CACHE: InfLLMv2Cache()}, **kw)
            assert torch.equal(batched.sequences[i, n:], alone.sequences[0, x.shape[1]:])
            for a, b in zip(batched.logits, alone.logits):
                torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_pass():
    model = enable(_llama(), SPARSE)
    ids = _ids(230)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = InfLLMv2Cache()
        pieces = []
        for a, b in ((0, 70), (70, 128), (128, 200), (200, 230)):
            pieces.append(model(input_ids=ids[:, a:b], **{CACHE: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    _check_compressed(cache, SPARSE)


def test_batched_decoding_different_lengths_equals_each_alone():
    model = enable(_llama(), SPARSE.replace(dense_len=130))  # rows turn sparse at different steps (or never)
    model.generation_config.eos_token_id = None  # run every step
    seqs = [_ids(170, seed=3), _ids(120, seed=4), _ids(40, seed=5)]
    ids, mask, n = _left_padded(seqs)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cache = InfLLMv2Cache()
        batched = model.generate(ids, attention_mask=mask, **{CACHE: cache}, **kw)
        for i, s in enumerate(seqs):
            alone = model.generate(s, **{CACHE: InfLLMv2Cache()}, **kw)
            assert torch.equal(batched.sequences[i, n:], alone.sequences[0, s.shape[1]:])
            for a, b in zip(batched.logits, alone.logits):
                torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4)
    full_mask = torch.cat([mask, torch.ones(len(seqs), 11, dtype=torch.long)], 1).bool()
    rows = [torch.nonzero(full_mask[i]).flatten() for i in range(len(seqs))]
    _check_compressed(cache, SPARSE.replace(dense_len=130), rows=rows)


def test_static_cache_equals_dynamic_cache():
    model = enable(_llama(), SPARSE.replace(dense_len=165))
    prompt = _ids(160)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(prompt, **{CACHE: InfLLMv2Cache()}, **kw)
        cache = InfLLMv2StaticCache(config=model.config, max_cache_len=200)
        static = model.generate(prompt, **{CACHE: cache}, **kw)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    n = static.sequences.shape[1] - 1  # the last token is not in the cache
    for layer in cache.layers:
        st = layer._infllmv2_state  # built at prefill, appended on the device at each decode step
        assert st is not None
        keys = layer.keys[0, :, :n].transpose(0, 1)
        for pk in st.kinds():
            ref = naive.compress_keys(keys.float(), pk.kernel, pk.stride)
            torch.testing.assert_close(pk.data[0, :ref.shape[0]], ref, atol=1e-6, rtol=1e-6)
            assert not pk.data[0, ref.shape[0]:].any()


def test_static_generate_with_chunked_prefill_uses_the_infllmv2_static_cache():
    """generate(cache_implementation="static", prefill_chunk_size=N): transformers 5 initialises its static cache
    before the prefill, which kept it (no compressed keys: every step pooled them again, with a warning to call
    enable()); now an InfLLMv2StaticCache initialised the same way, giving the dynamic cache's tokens. The second
    static call also failed on transformers 4.x (AttributeError: it reused its own cache, which had never run)."""
    import warnings

    model = enable(_llama(), SPARSE)
    prompt = _ids(150)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(prompt, **kw).sequences
        for extra in (dict(), dict(prefill_chunk_size=32)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model.generate(prompt, cache_implementation="static", **extra, **kw)
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            assert isinstance(cache, InfLLMv2StaticCache), (extra, type(cache))
            assert not [w for w in caught if "keeps no compressed keys" in str(w.message)]
            assert torch.equal(out.sequences, want), extra


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_cache_decode_step_compiles_fullgraph_and_equals_dynamic_cache(backend):
    """gpt-fast style: prefill eagerly into an InfLLMv2StaticCache, then decode with the whole model step under
    torch.compile(fullgraph=True): no graph break, no host sync, the tokens and logits of the dynamic cache.
    A left-padded batch whose rows turn sparse at different steps. On the Triton backend the fused append and
    the decode kernel are custom ops (here run by the interpreter inside the compiled step)."""
    config = SPARSE.replace(dense_len=165)
    model = enable(_llama(head_dim=32 if backend == "triton" else 16), config, backend=backend)
    model.generation_config.eos_token_id = None  # run every step
    seqs, steps, max_len = [_ids(160, seed=8), _ids(130, seed=9)], 8, 192
    ids, mask, n = _left_padded(seqs, max_len)  # fixed-shape mask: the prompt's slots + all later ones
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask[:, :n], **{CACHE: InfLLMv2Cache()}, max_new_tokens=steps + 1,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        cache = InfLLMv2StaticCache(config=model.config, max_cache_len=max_len)
        pos = (mask[:, :n].cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{CACHE: cache}).logits[:, -1]
        # transformers 4.x also needs the new token's slot (else it reads the cache's length, a host sync)
        slot = {"cache_position": torch.tensor([n])} if CACHE_POSITION else {}
        step = torch.compile(lambda tok, p, slot: model(input_ids=tok, attention_mask=mask, position_ids=p,
                                                        **{CACHE: cache}, **slot).logits[:, -1], fullgraph=True)
        pos = pos[:, -1:]
        for t in range(steps + 1):
            torch.testing.assert_close(logits, ref.logits[t], atol=1e-4, rtol=1e-4)
            tok = logits.argmax(-1, keepdim=True)
            assert torch.equal(tok[:, 0], ref.sequences[:, n + t])
            pos = pos + 1
            if t < steps:
                logits = step(tok, pos, slot)
                slot = {name: p + 1 for name, p in slot.items()}


def test_static_cache_mask_with_holes_equals_dynamic_cache():
    # a row whose mask has a hole is not a left-padded row: eager decoding takes the general path
    model = enable(_llama(), SPARSE.replace(dense_len=100))
    ids = _ids(150, seed=12)
    mask = torch.ones_like(ids)
    mask[:, 20:37] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, **{CACHE: InfLLMv2Cache()}, **kw)
        static = model.generate(ids, attention_mask=mask, **kw,
                                **{CACHE: InfLLMv2StaticCache(config=model.config, max_cache_len=170)})
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_triton_static_cache_decode_equals_dynamic_cache():
    """backend='triton' (the interpreter here): static-cache decode steps append with the fused kernel and
    decode with the Triton kernel (given the compressed keys and each row's left padding)."""
    model = _llama(layers=1, seed=2, head_dim=32)
    model.generation_config.eos_token_id = None
    enable(model, SPARSE.replace(dense_len=120), backend="triton")
    seqs = [_ids(140, seed=10), _ids(110, seed=11)]
    ids, mask, n = _left_padded(seqs)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, **{CACHE: InfLLMv2Cache()}, **kw)
        with _decode_kernel_calls() as calls:
            static = model.generate(ids, attention_mask=mask, **kw,
                                    **{CACHE: InfLLMv2StaticCache(config=model.config, max_cache_len=160)})
    assert len(calls) == 4 and all(k["k_fine"] is not None for k in calls)
    assert calls[0]["cache_leftpad"].tolist() == [0, 30]
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_static_compressed_key_update_compiles_fullgraph():
    """The decode-step update of the static compressed keys traces into one graph (torch.compile,
    fullgraph: no graph break, no host sync) and still equals compressing from scratch."""
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=2, dense_len=-1)
    b, max_len, h, d = 3, 160, 2, 16
    k = torch.randn(b, max_len, h, d)
    lens = torch.tensor([40, 77, 120])
    keys = StaticCompressedKeys(b, max_len, h, d, cfg, torch.float32, "cpu")
    keys.prefill(k, lens)
    step = torch.compile(keys.append, fullgraph=True)
    for _ in range(20):
        lens = lens + 1
        step(k, lens)
    for r in range(b):
        n = int(lens[r])
        for buf, (kern, s) in zip(keys.buffers, keys.specs):
            ref = naive.compress_keys(k[r, :n], kern, s)
            torch.testing.assert_close(buf[r, :ref.shape[0]], ref)
