"""Two GPUs in one process: every Triton path runs on its tensors' GPU, whichever GPU is current.

Triton launches on the current device and stream. A model moved to cuda:1 without ``torch.cuda.set_device``, or
split over GPUs with ``device_map``, must give what it gives on one GPU, with every kernel on the GPU that holds
its tensors (``ops.triton.selection.on_tensor_device``). Needs two GPUs (the device tool's nvidia-h200-x2).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
transformers = pytest.importorskip("transformers")

from infllmv2 import SparseConfig, infllmv2_attention, infllmv2_with_kvcache, select_blocks  # noqa: E402
from infllmv2.cache import InfLLMv2Cache, InfLLMv2StaticCache, StaticCompressedKeys  # noqa: E402
from test_generation_gpu import CACHE, _left_padded, _model  # noqa: E402  (its small bf16 Llama)

CONFIG = SparseConfig(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=128, topk=4,
                      dense_len=1024)


@pytest.fixture(autouse=True)
def _cuda0_current():
    before = torch.cuda.current_device()
    torch.cuda.set_device(0)
    yield
    torch.cuda.set_device(before)


def _kernels_by_device(prof) -> dict:
    """The names of the profiled kernels (and copies) by the GPU they ran on."""
    names = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names.setdefault(e.device_index, set()).add(e.name)
    return names


def _our_kernels_per_device(prof) -> dict:
    """How many of our Triton / Gluon kernels (named ``_..._kernel...``; torch's are ``void at::...``) ran on each
    GPU."""
    counts = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith("_") and "kernel" in e.name:
            counts[e.device_index] = counts.get(e.device_index, 0) + 1
    return counts


def _ops_on(dev: str, inputs: dict):
    """Prefill forward + backward, stage 1 alone, and three decode steps (cache write + decode) on ``dev``."""
    x = {name: t.to(dev) for name, t in inputs.items()}
    q, k, v = (x[n].requires_grad_() for n in ("q", "k", "v"))
    out = infllmv2_attention(q, k, v, CONFIG, cu_seqlens=x["cu"], max_seqlen=3000, backend="triton")
    out.backward(x["dout"])
    idx = select_blocks(q.detach(), k.detach(), CONFIG, cu_seqlens=x["cu"], backend="triton")
    kc, vc, lens, pad = x["k_cache"].clone(), x["v_cache"].clone(), x["lens"].clone(), x["pad"]
    ck = StaticCompressedKeys(*kc.shape, CONFIG, kc.dtype, kc.device)
    ck.prefill(kc, lens, pad)
    steps = []
    for t in range(3):
        steps.append(infllmv2_with_kvcache(x["q_dec"][:, t:t + 1], kc, vc, lens, CONFIG, k=x["k_dec"][:, t:t + 1],
                                           v=x["k_dec"][:, t:t + 1], compressed_keys=ck, cache_leftpad=pad,
                                           backend="triton"))
        lens += 1
    torch.cuda.synchronize(dev)
    return [t.detach().cpu() for t in (out, q.grad, k.grad, v.grad, idx, *steps, kc, *ck.buffers)]


def test_kernels_run_on_the_tensors_gpu_and_match_cuda0():
    g = torch.Generator().manual_seed(0)
    lens = [3000, 1100, 2500]  # all sparse (dense_len 1024)
    total, hq, hkv, d = sum(lens), 8, 2, 128
    b, max_len = 2, 4096
    inputs = dict(q=torch.randn(total, hq, d, generator=g), k=torch.randn(total, hkv, d, generator=g),
                  v=torch.randn(total, hkv, d, generator=g), dout=torch.randn(total, hq, d, generator=g),
                  k_cache=torch.randn(b, max_len, hkv, d, generator=g), v_cache=torch.randn(b, max_len, hkv, d,
                                                                                            generator=g),
                  q_dec=torch.randn(b, 3, hq, d, generator=g), k_dec=torch.randn(b, 3, hkv, d, generator=g))
    inputs = {n: t.bfloat16() for n, t in inputs.items()}
    inputs.update(cu=torch.tensor([0, 3000, 4100, 6600], dtype=torch.int32),
                  lens=torch.tensor([3000, 1500], dtype=torch.int32), pad=torch.tensor([50, 2000], dtype=torch.int32))
    on_cuda0 = _ops_on("cuda:0", inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        on_cuda1 = _ops_on("cuda:1", inputs)
    assert torch.cuda.current_device() == 0
    ran = _kernels_by_device(prof)
    assert ran.keys() == {1}, {dev: sorted(n)[:20] for dev, n in ran.items() if dev != 1}
    for i, (a, b_) in enumerate(zip(on_cuda0, on_cuda1)):  # same kernels on the same kind of GPU: bitwise,
        tol = 2e-2 if i in (2, 3) else 0  # but dk / dv sum in fp32 with atomics, in any order
        torch.testing.assert_close(a, b_, atol=tol, rtol=tol, msg=lambda m: f"result {i}: {m}")


def _generate(model, ids, mask, cache, steps=24):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True, **{CACHE: cache})


def test_model_on_cuda1_and_split_over_two_gpus_generates_as_on_cuda0():
    accelerate = pytest.importorskip("accelerate")
    model = _model()  # on cuda:0
    model.generation_config.disable_compile = True
    lengths = [2000, 1490, 700]  # sparse, turning sparse during decoding, dense
    ids, mask = _left_padded(lengths)
    ref = _generate(model, ids, mask, InfLLMv2Cache())
    ref_static = _generate(model, ids, mask, InfLLMv2StaticCache(config=model.config, max_cache_len=2048))

    model.to("cuda:1")  # the whole model on the GPU that is not current
    ids1, mask1 = ids.to("cuda:1"), mask.to("cuda:1")
    for dev in (0, 1):
        torch.cuda.synchronize(dev)  # the copies done before profiling
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        moved = _generate(model, ids1, mask1, InfLLMv2Cache())
    ran = _kernels_by_device(prof)
    assert ran.keys() == {1}, {dev: sorted(n)[:20] for dev, n in ran.items() if dev != 1}
    assert torch.equal(moved.sequences.cpu(), ref.sequences.cpu())

    # split: embeddings and layer 0 on cuda:0, layer 1 and the head on cuda:1 (accelerate's hooks move activations)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    model = accelerate.dispatch_model(model, device_map=device_map)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        split = _generate(model, ids, mask, InfLLMv2Cache())
    ours = _our_kernels_per_device(prof)  # one layer a GPU, each running the same kernels
    assert ours.keys() == {0, 1} and ours[0] == ours[1] > 0, ours
    split_static = _generate(model, ids, mask, InfLLMv2StaticCache(config=model.config, max_cache_len=2048))
    for got, want in ((split, ref), (split_static, ref_static)):
        assert torch.equal(got.sequences.cpu(), want.sequences.cpu())
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=0, rtol=0)
    assert torch.cuda.current_device() == 0
