"""transformers integration: ``infllmv2.enable`` on tiny random Llama / Qwen2 / Qwen3 / Mistral models (CPU, float32)."""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import infllmv2  # noqa: E402
from infllmv2 import SparseConfig  # noqa: E402
from helpers import TINY_VOCAB, cache_of as _cache_of, random_ids as _ids  # noqa: E402
from infllmv2.models.transformers import ATTN_IMPLEMENTATION, disable, enable  # noqa: E402
from infllmv2.ops import naive  # noqa: E402

# Head dim 16, blocks of 16: a 200-token sequence has 13 blocks, each token sees 3 (topk 2 + 1 local).
SPARSE = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, window_size=16, topk=2,
                      dense_len=-1)
FULL = SPARSE.replace(topk=20)  # budget 21 blocks = 336 tokens: covers every sequence below
VOCAB = TINY_VOCAB
# The KV-cache argument of forward(): ``cache`` in recent transformers, ``past_key_values`` before.
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def _tiny(arch, seed=0, layers=2, **kw):
    """A tiny random causal LM of a transformers architecture (Llama, Qwen2, Qwen3, ...), 4 / 2 heads of 16."""
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **kw)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def _llama(layers=2, seed=0, **kw):
    return _tiny("Llama", seed, layers, **kw)


def _qwen2(seed=0):
    return _tiny("Qwen2", seed)


def _qwen3(seed=0):
    return _tiny("Qwen3", seed)


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(input_ids=ids, use_cache=False, **kw).logits


# --------------------------------------------------------------------------------------------------
# Registration, parameters, dense equivalence
# --------------------------------------------------------------------------------------------------
def test_import_registers_attention_and_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert infllmv2.enable is enable


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_enable_adds_no_parameters_and_stores_config(make):
    model = make()
    keys = list(model.state_dict())
    count = sum(p.numel() for p in model.parameters())
    buffers = sorted(n for n, _ in model.named_buffers())
    assert enable(model, SPARSE) is model
    assert list(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == count
    assert sorted(n for n, _ in model.named_buffers()) == buffers
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.sparse_config == SPARSE.to_dict()
    assert isinstance(model.config.sparse_config, dict)
    assert model.config.to_dict()["sparse_config"] == SPARSE.to_dict()  # serialisable as MiniCPM4 keeps it


def test_enable_accepts_minicpm4_dict_and_none():
    model = enable(_llama(), {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                              "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192})
    assert model.config.sparse_config["dense_len"] == 8192
    assert enable(_llama(), None).config.sparse_config == SparseConfig().to_dict()


@pytest.mark.parametrize("make", [_llama, _qwen2, _qwen3], ids=["llama", "qwen2", "qwen3"])
def test_budget_covering_sequence_equals_dense(make):
    model = make()
    ids = _ids(200, batch=2)
    ref = _logits(model, ids)
    eager = _logits(model.set_attn_implementation("eager") or model, ids)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)
    enable(model, FULL)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [_llama, _qwen2, _qwen3], ids=["llama", "qwen2", "qwen3"])
def test_sparse_differs_from_dense(make):
    model = make()
    ids = _ids(200)
    ref = _logits(model, ids)
    out = _logits(enable(model, SPARSE), ids)
    budget_tokens = SPARSE.budget * SPARSE.block_size
    # Positions within the budget see every past key: identical; later ones do not.
    torch.testing.assert_close(out[:, :budget_tokens], ref[:, :budget_tokens], atol=1e-5, rtol=1e-5)
    assert (out[:, budget_tokens:] - ref[:, budget_tokens:]).abs().max() > 1e-3


def test_dense_len_switch_in_forward():
    model = _llama()
    ids = _ids(200)
    ref = _logits(model, ids)
    enable(model, SPARSE.replace(dense_len=201))  # 200 keys < 201: dense
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    enable(model, SPARSE.replace(dense_len=200))  # 200 keys >= 200: sparse
    assert (_logits(model, ids) - ref).abs().max() > 1e-3


def test_disable_restores_dense():
    model = _llama()
    ids = _ids(200)
    ref = _logits(model, ids)
    enable(model, SPARSE)
    disable(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The enabled model is InfLLM-V2 in every layer
# --------------------------------------------------------------------------------------------------
def test_torch_backend_equals_reference_backend():
    ids = _ids(200, batch=2)
    fast = _logits(enable(_llama(), SPARSE, backend="torch"), ids)
    ref = _logits(enable(_llama(), SPARSE, backend="reference"), ids)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_equals_hand_computation_with_naive_reference():
    """Re-run the model layer by layer, with naive.infllmv2_attention in place of the attention."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _llama()
    ids = _ids(200)
    out = _logits(enable(model, SPARSE), ids)
    with torch.no_grad():
        inner = model.model
        h = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = inner.rotary_emb(h, pos)
        for layer in inner.layers:
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (1, ids.shape[1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o, _ = naive.infllmv2_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), SPARSE,
                                            attn.scaling)
            h = h + attn.o_proj(o.reshape(1, ids.shape[1], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        hand = model.lm_head(inner.norm(h))
    torch.testing.assert_close(out, hand, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Decoding with a KV cache
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _decode_logits(model, ids, prefill):
    """Prefill ``prefill`` tokens, then feed the rest one token at a time; logits of every fed position."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, logits = _cache_of(out), [out.logits]
    for i in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, i:i + 1], **{CACHE: cache}, use_cache=True)
        cache = _cache_of(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_prefill_then_decode_equals_full_forward_sparse(make):
    model = enable(make(), SPARSE)
    ids = _ids(200, batch=2)
    full = _logits(model, ids)
    stepped = _decode_logits(model, ids, prefill=180)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_generate_matches_stepwise_full_forwards_sparse():
    model = enable(_llama(), SPARSE)
    prompt = _ids(190)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    seq = gen.sequences
    assert seq.shape[1] == 198
    full = _logits(model, seq)
    for i, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, full[:, 189 + i], atol=1e-5, rtol=1e-5)


def test_switch_to_sparse_while_decoding_one_layer():
    """One layer: each step's logits equal a full forward of the prefix (dense below dense_len, sparse from it)."""
    dense_len = 128
    model = _llama(layers=1)
    dense_model = copy.deepcopy(model)
    enable(model, SPARSE.replace(dense_len=dense_len))
    prompt = _ids(dense_len - 3)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    seq = gen.sequences
    switched = False
    for i, step_logits in enumerate(gen.logits):
        n = prompt.shape[1] + i  # keys seen by this step (the query included)
        prefix = seq[:, :n]
        torch.testing.assert_close(step_logits, _logits(model, prefix)[:, -1], atol=1e-5, rtol=1e-5)
        dense_step = _logits(dense_model, prefix)[:, -1]
        if n < dense_len:
            torch.testing.assert_close(step_logits, dense_step, atol=1e-5, rtol=1e-5)
        else:
            switched = True
            assert (step_logits - dense_step).abs().max() > 1e-4
    assert switched


def test_switch_to_sparse_while_decoding_decides_by_cache_length():
    """Two layers: from the same cache, a step runs dense below dense_len and sparse from it on."""
    dense_len = 128
    model = enable(_llama(), SPARSE.replace(dense_len=dense_len))
    prompt = _ids(dense_len - 3)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        out = model(input_ids=prompt, use_cache=True)
        cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        torch.testing.assert_close(out.logits[:, -1], gen.logits[0], atol=1e-5, rtol=1e-5)
        for i in range(1, 8):
            assert int(token) == int(gen.sequences[0, prompt.shape[1] + i - 1])
            n = prompt.shape[1] + i
            results = {}
            for name, dl in (("switch", dense_len), ("sparse", -1), ("dense", 10 ** 9)):
                model.config.sparse_config = SPARSE.replace(dense_len=dl).to_dict()
                results[name] = model(input_ids=token, **{CACHE: copy.deepcopy(cache)}, use_cache=True).logits[:, -1]
            model.config.sparse_config = SPARSE.replace(dense_len=dense_len).to_dict()
            step = model(input_ids=token, **{CACHE: cache}, use_cache=True)
            cache = _cache_of(step)
            torch.testing.assert_close(step.logits[:, -1], results["switch"], atol=0, rtol=0)
            torch.testing.assert_close(step.logits[:, -1], gen.logits[i], atol=1e-5, rtol=1e-5)
            expected = results["dense"] if n < dense_len else results["sparse"]
            torch.testing.assert_close(results["switch"], expected, atol=1e-6, rtol=1e-6)
            if n >= dense_len:
                assert (results["sparse"] - results["dense"]).abs().max() > 1e-4
            token = step.logits[:, -1:].argmax(-1)


def test_static_cache_generate_equals_dynamic_cache():
    """A static cache hands the attention unfilled slots: only the filled ones count as keys."""
    model = enable(_llama(), SPARSE)
    prompt = _ids(150)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(prompt, **kw)
        static = model.generate(prompt, cache_implementation="static", **kw)
    # generate()'s own caches become InfLLM-V2's (compressed keys kept, not re-pooled at every step)
    assert type(dynamic.past_key_values).__name__ == "InfLLMv2Cache"
    assert type(static.past_key_values).__name__ == "InfLLMv2StaticCache"
    cache = static.past_key_values  # what generate() sized its StaticCache to (the method's name before 5.x)
    assert (cache.get_max_length() if hasattr(cache, "get_max_length") else cache.get_max_cache_shape()) == 150 + 6 - 1
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def test_training_backward_gives_finite_gradients():
    model = enable(_llama(), SPARSE).train()
    ids = _ids(200, batch=2)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert torch.isfinite(loss)
    loss.backward()
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            grad = getattr(layer.self_attn, name).weight.grad
            assert grad is not None, f"layer {i} {name} has no gradient"
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"layer {i} {name}"


def test_training_gradients_equal_dense_when_budget_covers():
    ids = _ids(120)
    grads = []
    for sparse in (None, FULL):
        model = _llama().train()
        if sparse is not None:
            enable(model, sparse)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed_rows"])
def test_compiled_training_step_equals_eager(packed):
    """torch.compile(model) (aot_eager: dynamo's graphs and autograd, no codegen) over an enabled model trains as
    the eager model does: loss and gradients, packed sequences in a row (position ids restarting) included."""
    ids = _ids(200, batch=2)
    pos = torch.cat([torch.arange(120), torch.arange(80)])[None].expand(2, -1) if packed else None
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = enable(_llama(), SPARSE).train()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        losses = []
        for _ in range(2):  # the second call runs the compiled graphs as they are
            model.zero_grad()
            loss = run(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
            loss.backward()
            losses.append(loss.detach())
        results.append((torch.stack(losses), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    if packed:  # the packing was honoured: the same tokens as one sequence a row give another loss
        model = enable(_llama(), SPARSE)
        assert (model(input_ids=ids, labels=ids, use_cache=False).loss - eager_loss[0]).abs() > 1e-4


def test_bf16_autocast_training_matches_sdpa_when_budget_covers():
    # Under autocast RoPE leaves q/k in fp32 while v is bf16: attention must cast them as SDPA does.
    ids = _ids(120)
    out = []
    for sparse in (None, FULL):
        model = _llama().train()
        if sparse is not None:
            enable(model, sparse, backend="torch")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        out.append((loss.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], atol=2e-2, rtol=2e-2)
    cos = torch.nn.functional.cosine_similarity(out[1][1].flatten(), out[0][1].flatten(), dim=0)
    assert cos > 0.98, f"q_proj gradient cosine {cos:.4f}"


def test_attention_dropout_is_rejected():
    with pytest.raises(ValueError, match="attention_dropout"):
        enable(_llama(attention_dropout=0.1), SPARSE)


# --------------------------------------------------------------------------------------------------
# Padding and packing
# --------------------------------------------------------------------------------------------------
def _left_padded(seqs, pad=0):
    n = max(s.shape[1] for s in seqs)
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - s.shape[1]:] = s[0]
        mask[i, n - s.shape[1]:] = 1
    return ids, mask


def test_left_padded_batch_equals_each_sequence_alone():
    model = enable(_llama(), SPARSE)
    seqs = [_ids(200, seed=3), _ids(150, seed=4), _ids(40, seed=5)]
    ids, mask = _left_padded(seqs)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = _logits(model, ids, attention_mask=mask, position_ids=position_ids)
    for i, s in enumerate(seqs):
        alone = _logits(model, s)
        torch.testing.assert_close(batched[i, ids.shape[1] - s.shape[1]:], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batched[i]).all()


def test_right_padded_batch_equals_each_sequence_alone():
    model = enable(_llama(), SPARSE)
    seqs = [_ids(200, seed=3), _ids(150, seed=4)]
    ids = torch.zeros(2, 200, dtype=torch.long)
    mask = torch.zeros(2, 200, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :s.shape[1]], mask[i, :s.shape[1]] = s[0], 1
    batched = _logits(model, ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(batched[i, :s.shape[1]], _logits(model, s)[0], atol=1e-5, rtol=1e-5)


def test_padded_batch_full_budget_equals_sdpa():
    model = _llama()
    seqs = [_ids(200, seed=3), _ids(150, seed=4)]
    ids, mask = _left_padded(seqs)
    ref = _logits(model, ids, attention_mask=mask)
    out = _logits(enable(model, FULL), ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_left_padded_generate_equals_each_sequence_alone():
    model = enable(_llama(), SPARSE.replace(dense_len=150))  # the short prompt crosses dense_len while decoding
    seqs = [_ids(200, seed=3), _ids(146, seed=4)]
    ids, mask = _left_padded(seqs)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        for i, s in enumerate(seqs):
            alone = model.generate(s, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
            assert torch.equal(batched.sequences[i, ids.shape[1]:], alone.sequences[0, s.shape[1]:])
            for a, b in zip(batched.logits, alone.logits):
                torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4)


def test_packed_sequences_by_position_ids_equal_each_alone():
    model = enable(_llama(), SPARSE)
    seqs = [_ids(120, seed=6), _ids(90, seed=7)]
    ids = torch.cat(seqs, dim=1)
    position_ids = torch.cat([torch.arange(120), torch.arange(90)])[None]
    packed = _logits(model, ids, position_ids=position_ids)
    torch.testing.assert_close(packed[:, :120], _logits(model, seqs[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 120:], _logits(model, seqs[1]), atol=1e-5, rtol=1e-5)


def test_no_square_mask_is_built():
    """The mask function hands the attention None (no padding) or the 2D padding mask, never n x n."""
    model = enable(_llama(), SPARSE)
    seen = []
    attn = model.model.layers[0].self_attn
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping[ATTN_IMPLEMENTATION]

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return fn(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
    try:
        ids = _ids(200, batch=2)
        _logits(model, ids)
        _logits(model, ids, attention_mask=torch.ones_like(ids))
        mask = torch.ones_like(ids)
        mask[1, :10] = 0
        _logits(model, ids, attention_mask=mask)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, fn)
    assert attn is model.model.layers[0].self_attn
    assert seen[:2] == [None, None] and seen[-1] == (2, 200)
    assert all(s is None or len(s) == 2 for s in seen)


def test_mask_function_reads_transformers_4_and_5_arguments_alike():
    """transformers 5 passes q_length / q_offset (a tensor offset for a static cache), 4.x the queries' slots
    (cache_position) and nothing that names the cache: both give the same mask, a dynamic cache's (no empty slots)
    None or its 2D padding mask, a static cache's the STATIC_SLOTS_DTYPE mask of its filled slots."""
    from infllmv2.models.transformers import STATIC_SLOTS_DTYPE, infllmv2_mask
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, :2] = 0
    for user_mask in (None, pad):
        # dynamic cache: 5 cached keys, 3 new queries
        v5 = infllmv2_mask(2, 3, 8, q_offset=5, attention_mask=user_mask)
        v4 = infllmv2_mask(batch_size=2, cache_position=torch.arange(5, 8), kv_length=8, attention_mask=user_mask)
        if user_mask is None:
            assert v5 is None and v4 is None
        else:
            assert v4.dtype == torch.bool and torch.equal(v4, v5) and torch.equal(v4, pad.bool())
        # static cache of 16 slots: 5 filled, 1 new query
        v5 = infllmv2_mask(2, 1, 16, q_offset=torch.tensor(5), attention_mask=user_mask)
        v4 = infllmv2_mask(batch_size=2, cache_position=torch.tensor([5]), kv_length=16, attention_mask=user_mask)
        want = (torch.arange(16) < 6).expand(2, -1).clone()
        if user_mask is not None:
            want[:, :8] &= pad.bool()
        assert v4.dtype == v5.dtype == STATIC_SLOTS_DTYPE and torch.equal(v4, v5) and torch.equal(v4.bool(), want)
    with pytest.raises(TypeError, match="cache_position"):
        infllmv2_mask(batch_size=2, kv_length=8)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_config_dict_key_is_rejected():
    with pytest.raises(ValueError, match="unknown keys.*block_sz"):
        enable(_llama(), {"block_sz": 64})


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        enable(_llama(), {"block_size": 60})
    with pytest.raises(TypeError, match="SparseConfig"):
        enable(_llama(), 3)


def test_invalid_sparse_config_on_model_is_reported_at_run_time():
    model = enable(_llama(), SPARSE)
    model.config.sparse_config = {"block_size": 0}
    with pytest.raises(ValueError, match="sparse_config.*block_size"):
        _logits(model, _ids(40))


def test_non_gqa_model_is_rejected():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    with pytest.raises(ValueError, match=r"\(G\)QA"):
        enable(transformers.GPT2LMHeadModel(cfg), SPARSE)


def _lora(model, seed=0):
    """peft LoRA on every projection, A and B random (peft's default B = 0 would leave the outputs unchanged)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


@pytest.mark.parametrize("order", ["enable_then_lora", "lora_then_enable"])
def test_peft_lora_model_runs_infllmv2_as_its_merged_weights_do(order):
    ids = _ids(200, batch=2)
    peft_model = _lora(enable(_llama(), SPARSE)) if order == "enable_then_lora" else enable(_lora(_llama()), SPARSE)
    assert peft_model.get_base_model().config._attn_implementation == ATTN_IMPLEMENTATION
    out = _logits(peft_model, ids)
    # the same weights merged into plain linears (an independent model: no LoRA layers) give the same logits
    merged = enable(copy.deepcopy(peft_model).merge_and_unload(), SPARSE)
    assert all(type(m.q_proj) is torch.nn.Linear for m in infllmv2.models.transformers.attention_modules(merged))
    torch.testing.assert_close(out, _logits(merged, ids), atol=1e-5, rtol=1e-5)
    # and they are sparse: dense attention over the same weights differs
    assert (out - _logits(disable(merged), ids)).abs().max() > 1e-3
    generated = peft_model.generate(input_ids=ids[:1, :150], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(generated, enable(merged, SPARSE).generate(input_ids=ids[:1, :150], max_new_tokens=4,
                                                                          do_sample=False))


def test_peft_lora_gradients_equal_dense_when_budget_covers():
    ids = _ids(200, batch=2)
    grads = {}
    for mode in ("infllmv2", "sdpa"):
        peft_model = _lora(_llama())
        if mode == "infllmv2":
            enable(peft_model, FULL)
        peft_model.train()
        peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads[mode] = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for n, p in peft_model.named_parameters() if n in frozen)
    assert grads["infllmv2"].keys() == grads["sdpa"].keys() and any("lora_A" in n for n in grads["sdpa"])
    for name, grad in grads["sdpa"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads["infllmv2"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_enable_without_a_config_keeps_the_one_the_model_was_saved_with(tmp_path):
    model = enable(_llama(), SPARSE)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation != ATTN_IMPLEMENTATION  # transformers does not save it
    enable(reloaded)
    assert reloaded.config.sparse_config == SPARSE.to_dict()
    ids = _ids(200)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-6, rtol=1e-6)
    assert enable(_llama()).config.sparse_config == SparseConfig().to_dict()  # none stored: MiniCPM4's


def test_a_model_loaded_with_the_attention_name_warns_once_that_its_cache_keeps_no_compressed_keys(tmp_path,
                                                                                                  monkeypatch):
    import warnings

    from infllmv2.models import transformers as integration
    monkeypatch.setattr(integration, "_WARNED_PLAIN_CACHE", [])
    enable(_llama(), SPARSE).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    loaded.generation_config.eos_token_id = None
    prompt, kw = _ids(150), dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="keeps no compressed keys") as record:
        plain = loaded.generate(prompt, **kw)  # transformers' DynamicCache: correct, pooled again every step
        loaded.generate(prompt, **kw)
    assert sum("compressed keys" in str(w.message) for w in record) == 1  # once a process
    monkeypatch.setattr(integration, "_WARNED_PLAIN_CACHE", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        enabled = enable(loaded).generate(prompt, **kw)  # InfLLMv2Cache: no warning
        enable(_llama(), SPARSE.replace(dense_len=1000)).generate(prompt, **{CACHE: transformers.DynamicCache()},
                                                                  **kw)  # dense at this length: nothing pooled
    assert torch.equal(plain, enabled)


def test_non_model_is_rejected():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable(torch.nn.Linear(2, 2), SPARSE)


def test_sliding_window_model_is_rejected():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64)
    with pytest.raises(ValueError, match="sliding"):
        enable(transformers.MistralForCausalLM(cfg), SPARSE)
    cfg.sliding_window = None
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = _ids(150)
    ref = _logits(model, ids)
    torch.testing.assert_close(_logits(enable(model, FULL), ids), ref, atol=1e-5, rtol=1e-5)


def test_chunked_attention_model_is_rejected():
    """Llama 4's chunked attention layers (each token sees its own chunk of attention_chunk_size) were widened to
    the whole prefix silently: the logits changed past the first chunk even with a budget covering every key."""
    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip("this transformers has no Llama 4")
    cfg = transformers.Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, attention_chunk_size=32,
                                        max_position_embeddings=1024, pad_token_id=0)
    with pytest.raises(ValueError, match="chunked_attention|attention_chunk_size"):
        enable(transformers.Llama4ForCausalLM(cfg), FULL)
    # loaded with attn_implementation="infllmv2" (no enable()): the attention function refuses it at the first call
    cfg.sparse_config = FULL.to_dict()
    model = transformers.Llama4ForCausalLM._from_config(cfg, attn_implementation="infllmv2").eval()
    with pytest.raises(ValueError, match="chunked_attention|attention_chunk_size"):
        model(input_ids=_ids(40), use_cache=False)


def test_use_nope_is_refused_by_enable_and_at_the_first_call():
    """use_nope needs pre-RoPE q / k, which transformers' attention functions never get: refused by enable(), and
    by the attention function of a model that carries it in its config (every forward raised, dense ones too)."""
    with pytest.raises(ValueError, match="use_nope"):
        enable(_llama(), SPARSE.replace(use_nope=True))
    model = _llama()
    model.config.sparse_config = SPARSE.replace(use_nope=True).to_dict()
    model.set_attn_implementation("infllmv2")
    with pytest.raises(ValueError, match="use_nope"):
        _logits(model, _ids(20))


def test_a_sparse_config_object_on_the_config_runs_and_saves(tmp_path):
    """config.sparse_config may hold a SparseConfig (not only MiniCPM4's dict): it runs, and save_pretrained writes
    it as the dict (it failed: a SparseConfig is not JSON serializable)."""
    model = _llama()
    model.config.sparse_config = SPARSE
    model.set_attn_implementation("infllmv2")
    ids = _ids(150)
    out = _logits(model, ids)
    model.save_pretrained(tmp_path / "m")
    loaded = enable(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval())
    assert loaded.config.sparse_config == SPARSE.to_dict()
    torch.testing.assert_close(_logits(loaded, ids), out)


def test_4d_mask_is_rejected():
    model = enable(_llama(), SPARSE)
    ids = _ids(40)
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2D padding mask"):
        _logits(model, ids, attention_mask=mask)


def test_generate_defaults_to_the_infllmv2_cache():
    from infllmv2.cache import InfLLMv2Cache

    model = enable(_llama(), SPARSE)
    ids = _ids(150)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0)
    assert isinstance(_cache_of(out), InfLLMv2Cache)
    explicit = transformers.DynamicCache()
    plain = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, **{CACHE: explicit})
    torch.testing.assert_close(out.sequences, plain)  # a cache the user passes is kept, and tokens agree
    disable(model)
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert type(_cache_of(out)) is transformers.DynamicCache


def test_enabled_model_pickles(tmp_path):
    model = enable(_llama(), SPARSE)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    ids = _ids(120)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def test_layout_is_read_back_once_per_forward(monkeypatch):
    # every layer gets the same position ids: the packed layout is read back to the host once a forward (each
    # read waits for the GPU), and read again when the ids change in place
    from infllmv2.models import transformers as integration
    model = enable(_llama(layers=3), SPARSE)
    calls = []
    real = integration._segments
    monkeypatch.setattr(integration, "_segments", lambda *a: calls.append(1) or real(*a))
    reads = []  # host reads of a one-dimensional int32 tensor: the offsets each layer checks
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.dtype == torch.int32 and t.dim() == 1)
                        or real_tolist(t))
    ids = torch.cat([_ids(120, seed=6), _ids(90, seed=7)], dim=1)
    pos = torch.cat([torch.arange(120), torch.arange(90)])[None]
    packed = _logits(model, ids, position_ids=pos)
    assert len(calls) == 1
    assert reads.count(True) == 0  # the layers check the offsets _segments made on the host: no read back
    pos[0, 120:] = torch.arange(120, 210)  # in place: one sequence again
    whole = _logits(model, ids, position_ids=pos)
    assert len(calls) == 2
    torch.testing.assert_close(whole, _logits(model, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 120:], _logits(model, ids[:, 120:]), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# transformers' Trainer
# --------------------------------------------------------------------------------------------------
def test_trainer_with_flattened_batches_trains_each_sequence_as_alone(tmp_path):
    """transformers.Trainer with DataCollatorWithFlattening (several sequences packed into one row, position ids
    restarting) on an enabled model: the logged loss of the first step is the token-weighted loss of each sequence
    run alone, sparse; the step updates the weights."""
    pytest.importorskip("accelerate")
    model = enable(_llama(initializer_range=0.3), SPARSE, backend="torch")  # large weights: context matters
    lengths = [120, 75, 97]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item() for s in seqs]
    expected = sum(loss * (n - 1) for loss, n in zip(alone, lengths)) / sum(n - 1 for n in lengths)
    packed = model(input_ids=torch.tensor([sum(seqs, [])]), labels=torch.tensor([sum(seqs, [])])).loss.item()
    assert abs(packed - expected) > 1e-2  # the same tokens as one sequence would give another loss

    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3,
                                          learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=[{"input_ids": s} for s in seqs],
                                   data_collator=transformers.DataCollatorWithFlattening())
    trainer.train()
    logged = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    assert logged == pytest.approx(expected, abs=2e-4)  # Trainer logs the loss to 4 decimals
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
