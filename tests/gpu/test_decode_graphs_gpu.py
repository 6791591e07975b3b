"""Eager decode steps replayed from CUDA graphs (ops/triton/decode.py ``DecodeGraph``; cache.py's room to grow).

An enabled model's eager decode steps with ``InfLLMv2Cache`` on CUDA replay one graph per layer, captured again
(at the second step in a row on the same caches) when the caches move (the keys' room grows, the compressed keys
double). Teacher-forced over enough steps to cross those moves, a left-padded batch with a sparse row, a row
turning sparse and a dense row gives the logits of the same steps launched directly (``DECODE_GRAPHS`` off), and
the replays happen.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
transformers = pytest.importorskip("transformers")

import infllmv2.ops.triton as triton_ops  # noqa: E402
import infllmv2.ops.triton.decode as decode_mod  # noqa: E402
from infllmv2.cache import InfLLMv2Cache  # noqa: E402
from test_generation_gpu import CACHE, VOCAB, _left_padded, _model  # noqa: E402  (its small bf16 Llama)


def _run(model, ids, mask, tokens, graphs: bool):
    """Prefill, then teacher-forced decode steps feeding ``tokens``; returns each step's last logits."""
    saved = decode_mod.DECODE_GRAPHS
    decode_mod.DECODE_GRAPHS = graphs
    try:
        cache, out = InfLLMv2Cache(), []
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **{CACHE: cache})
            for t in range(tokens.shape[1]):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                o = model(input_ids=tokens[:, t:t + 1], attention_mask=mask, **{CACHE: cache})
                out.append(o.logits[:, -1].float())
        return torch.stack(out, 1), cache
    finally:
        decode_mod.DECODE_GRAPHS = saved


def test_eager_decode_graph_replays_equal_direct_launches_across_cache_moves(monkeypatch):
    model = _model()
    lengths, steps = [2000, 1490, 700], 300  # sparse, turning sparse, dense; 300 steps pass the room of 2000 + 256
    ids, mask = _left_padded(lengths)
    tokens = torch.randint(3, VOCAB, (len(lengths), steps), generator=torch.Generator().manual_seed(1)).cuda()

    captures, replays, launched = [], [], []
    init, call = decode_mod.DecodeGraph.__init__, decode_mod.DecodeGraph.__call__
    monkeypatch.setattr(decode_mod.DecodeGraph, "__init__", lambda self, *a, **k: (captures.append(1),
                                                                                     init(self, *a, **k))[1])
    monkeypatch.setattr(decode_mod.DecodeGraph, "__call__", lambda self, *a, **k: (replays.append(1),
                                                                                   call(self, *a, **k))[1])
    direct_call = triton_ops.infllmv2_decode_triton
    monkeypatch.setattr(triton_ops, "infllmv2_decode_triton", lambda *a, **k: (launched.append(1),
                                                                               direct_call(*a, **k))[1])
    direct, _ = _run(model, ids, mask, tokens, graphs=False)
    assert not captures and not replays and len(launched) == steps * model.config.num_hidden_layers
    launched.clear()
    graphed, cache = _run(model, ids, mask, tokens, graphs=True)
    layers = len(cache.layers)
    # a graph is captured the second step in a row the caches are where they were, and replayed until they move
    # (the room grows, the compressed keys double): one direct call a move, every other step replayed
    assert 2 * layers <= len(captures) <= 12 * layers
    assert len(launched) == len(captures) and len(replays) == steps * layers - len(launched)
    torch.testing.assert_close(graphed, direct, atol=3e-2, rtol=3e-2)
    assert (graphed.argmax(-1) == direct.argmax(-1)).float().mean() > 0.95
    # the graphs die with their cache; capturing for a new cache afterwards works (a shared pool handle did not)
    del cache
    again, _ = _run(model, ids, mask, tokens[:, :20], graphs=True)
    torch.testing.assert_close(again, direct[:, :20], atol=3e-2, rtol=3e-2)


def test_static_cache_eager_steps_replay_a_graph_a_layer(monkeypatch):
    """Eager decode steps with ``InfLLMv2StaticCache`` (generate() with ``disable_compile``): the slots never move,
    so each layer captures once (the second step) and replays every later step, with the direct launches' logits."""
    from infllmv2.cache import InfLLMv2StaticCache
    from test_generation_gpu import CACHE_POSITION
    model = _model()
    lengths, steps, max_len = [2000, 1490, 700], 40, 2048
    ids, mask0 = _left_padded(lengths)
    n = ids.shape[1]
    mask = torch.ones(len(lengths), max_len, dtype=torch.long, device="cuda")
    mask[:, :n] = mask0
    tokens = torch.randint(3, VOCAB, (len(lengths), steps), generator=torch.Generator().manual_seed(2)).cuda()
    captures, replays = [], []
    init, call = decode_mod.DecodeGraph.__init__, decode_mod.DecodeGraph.__call__
    monkeypatch.setattr(decode_mod.DecodeGraph, "__init__", lambda self, *a, **k: (captures.append(1),
                                                                                     init(self, *a, **k))[1])
    monkeypatch.setattr(decode_mod.DecodeGraph, "__call__", lambda self, *a, **k: (replays.append(1),
                                                                                   call(self, *a, **k))[1])

    def run(graphs):
        monkeypatch.setattr(decode_mod, "DECODE_GRAPHS", graphs)
        cache, out = InfLLMv2StaticCache(config=model.config, max_cache_len=max_len), []
        pos = (mask0.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, **{CACHE: cache})
            pos = pos[:, -1:]
            for t in range(steps):
                pos = pos + 1
                slot = {"cache_position": torch.tensor([n + t], device="cuda")} if CACHE_POSITION else {}
                o = model(input_ids=tokens[:, t:t + 1], attention_mask=mask, position_ids=pos, **{CACHE: cache}, **slot)
                out.append(o.logits[:, -1].float())
        return torch.stack(out, 1)

    direct = run(False)
    assert not captures and not replays
    graphed = run(True)
    layers = model.config.num_hidden_layers
    assert len(captures) == layers and len(replays) == (steps - 1) * layers
    torch.testing.assert_close(graphed, direct, atol=0, rtol=0)  # the same launches, captured
