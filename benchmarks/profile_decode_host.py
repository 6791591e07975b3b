"""Host time of one eager decode call, against its GPU time and against dense SDPA's (H200).

    python3 benchmarks/profile_decode_host.py [--lengths 32768 131072] [--calls 100]

An eager decode step (transformers' default generate loop) is bound by the host: the GPU works a few milliseconds
of a step that takes tens (``profile_generate_eager.py``). This times, for one MiniCPM4-8B-shaped layer (32 query /
2 KV heads, head dim 128, batch 1, a bf16 cache of n tokens with its compressed keys given, the default config):

* ``decode``: ``infllmv2_decode_triton`` as an eager caller runs it;
* ``decode_custom_op``: the same through its ``torch.library`` custom op (what every eager call paid before the
  op was kept for torch.compile only); ``decode_custom_op_triton_cdiv`` also with ``triton.cdiv`` on the host, as
  the code was before;
* ``dense_sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` in SDPA's default order;
* ``one_launch``: the decode chain's smallest kernel (the combine) launched alone: one Triton launch's host cost;
* ``decode_graph``: the call replayed from a CUDA graph (``DecodeGraph``), as eager decode steps with
  ``InfLLMv2Cache`` run it.

Method: a long ``torch.cuda._sleep`` first, so that the host issues ``--calls`` calls while the GPU is busy: the
host time a call is the issuing time over the calls; the GPU time a call is the CUDA-event time from the end of the
sleep to the end of the last call, over the calls (the GPU runs them back to back, the host being ahead). Prints a
table and JSON, and writes ``$OUT/profile_decode_host.json`` when OUT is set.

``--mock-launches`` runs on the CPU with every Triton launch replaced by a no-op: the host time of our own Python
alone (the decode variants only; no GPU time, no outputs to compare).

``--attention-functions`` adds, per length, the time spent inside each attention function transformers calls
during eager decode steps of a small Llama with this layer shape (4 layers, hidden 256, the default cache and
config; below 16K tokens ``dense_len`` is n / 2, so that the steps are sparse):
``sdpa_attention_function`` (transformers' SDPA wrapper) and ``infllmv2_attention_function`` (after
``infllmv2.enable``: the compressed-key update, then the decode call), mean and median. No synchronisation
inside, so on the GPU this too is host time. With ``--mock-launches`` SDPA returns an empty tensor instead of computing: both rows are then
Python alone, each path's own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infllmv2.ops.triton.decode as decode_mod  # noqa: E402
import infllmv2.ops.triton.selection as selection_mod  # noqa: E402
from infllmv2 import SparseConfig  # noqa: E402
from infllmv2.ops.triton import infllmv2_decode_triton  # noqa: E402
from infllmv2.ops.triton.decode import DecodeGraph  # noqa: E402


def decode_inputs(n: int, dev, cfg: SparseConfig):
    """One MiniCPM4-8B layer's decode call at batch 1 (32 query / 2 KV heads, head dim 128, bf16): q, an n-token
    cache k / v, its lengths and (random) fine / coarse compressed keys."""
    hq, hkv, d = 32, 2, 128
    g = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
    lens = torch.full((1,), n, dtype=torch.int32, device=dev)
    kf = torch.randn(1, (n - cfg.kernel_size) // cfg.kernel_stride + 1, hkv, d, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(1, (n - cfg.coarse_kernel_size) // cfg.coarse_kernel_stride + 1, hkv, d, device=dev,
                     dtype=torch.bfloat16)
    return q, k, v, lens, kf, kc


def timed(fn, calls: int) -> dict:
    """Host and GPU microseconds a call, the host kept ahead of the GPU by a sleep kernel."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # --mock-launches: the host's time alone
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return dict(host_us=round((time.perf_counter() - t0) / calls * 1e6, 2), gpu_us=None)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e9))  # ~1 s at the H200's clock: longer than the host needs to issue the calls
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) * 1e3 / calls
    return dict(host_us=round(host, 2), gpu_us=round(gpu, 2))


def attention_function_us(mode: str, n: int, steps: int, dev, mock: bool) -> float:
    """Mean microseconds inside the attention function transformers calls, per call, over ``steps`` eager decode
    steps of a 4-layer Llama (32 query / 2 KV heads, head dim 128) after an n-token prefill."""
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import infllmv2
    import infllmv2.models.transformers as integration

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                                   max_position_embeddings=max(n + steps + 16, 4096), pad_token_id=0)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    model = transformers.LlamaForCausalLM(cfg).to(device=dev, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    if mode == "infllmv2":  # on the CPU the prefill takes the torch path; the decode steps are forced to Triton's
        # the default config; sparse from n / 2 on below 16K (short runs, as the tests make)
        config = SparseConfig().replace(dense_len=min(SparseConfig().dense_len, n // 2))
        infllmv2.enable(model, config, backend="torch" if mock else "auto")
    cache = infllmv2.InfLLMv2Cache() if mode == "infllmv2" else transformers.DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 512, (1, n), device=dev), past_key_values=cache, use_cache=True)
    name = integration.ATTN_IMPLEMENTATION if mode == "infllmv2" else "sdpa"
    inner = ALL_ATTENTION_FUNCTIONS[name]
    spent = []

    def timed_inner(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    saved_sdpa, saved_backend = torch.nn.functional.scaled_dot_product_attention, integration._resolve_backend
    if mock and mode == "dense":
        torch.nn.functional.scaled_dot_product_attention = lambda q, *a, **k: torch.empty_like(q)
    if mock and mode == "infllmv2":
        integration._resolve_backend = lambda backend, q: "triton"
    ALL_ATTENTION_FUNCTIONS[name] = timed_inner
    try:
        nxt, mask = torch.ones(1, 1, dtype=torch.long, device=dev), torch.ones(1, n, dtype=torch.long, device=dev)
        for i in range(steps + 5):
            if i == 5:
                spent.clear()  # the first steps warm up
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            with torch.no_grad():
                model(input_ids=nxt, attention_mask=mask, position_ids=torch.tensor([[n + i]], device=dev),
                      past_key_values=cache, use_cache=True)
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = inner
        torch.nn.functional.scaled_dot_product_attention = saved_sdpa
        integration._resolve_backend = saved_backend
    spent.sort()
    return sum(spent) / len(spent) * 1e6, spent[len(spent) // 2] * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--calls", type=int, default=100, help="calls a measurement (host ahead of the GPU)")
    ap.add_argument("--mock-launches", action="store_true", help="CPU: Triton launches as no-ops (our Python alone)")
    ap.add_argument("--attention-functions", action="store_true", help="also the time inside transformers' SDPA "
                    "attention function and InfLLM-V2's during eager decode steps of a small Llama")
    ap.add_argument("--steps", type=int, default=40, help="decode steps of --attention-functions")
    args = ap.parse_args()
    if args.calls < 1 or min(args.lengths) < 1 or args.steps < 1:
        raise SystemExit("--calls, --steps and --lengths must be positive")
    import triton
    import torch.nn.functional as F

    if args.mock_launches:
        if torch.cuda.is_available():
            raise SystemExit("--mock-launches is for a machine without a GPU")
        if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels would run, interpreted, instead of the no-op
            raise SystemExit("--mock-launches needs TRITON_INTERPRET unset")
        import triton.runtime.jit
        triton.runtime.jit.JITFunction.run = lambda self, *a, **k: None
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --mock-launches)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SparseConfig()
    rows = []
    for n in args.lengths:
        q, k, v, lens, kf, kc = decode_inputs(n, dev, cfg)
        hq, d = q.shape[1:]
        scale = d ** -0.5

        def decode():
            return infllmv2_decode_triton(q, k, v, lens, cfg, scale, k_fine=kf, k_coarse=kc)

        def decode_custom_op():
            return decode_mod._decode_op(q, k, v, lens, None, kf, kc, scale, *selection_mod.config_args(cfg))

        qd, kd, vd = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)  # (b, H, s, d) as transformers passes

        def dense_sdpa():
            return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

        n_split = 8
        o_part = torch.zeros((1, hq, n_split, d), dtype=torch.float32, device=dev)
        lse_part = torch.zeros((1, hq, n_split), dtype=torch.float32, device=dev)
        out = torch.empty_like(q)

        def one_launch():
            decode_mod._decode_combine_kernel[(1, hq)](
                o_part, lse_part, out, n_split, d, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), SPLIT_P=n_split, BLOCK_D=d,
                num_warps=decode_mod._DECODE_COMBINE_WARPS)

        variants = dict(decode=decode) if args.mock_launches else dict(decode=decode, dense_sdpa=dense_sdpa,
                                                                        one_launch=one_launch)
        if not args.mock_launches:  # the eager path's replay: copies in, one graph launch, the output copied out
            graph = DecodeGraph(q, k, v, lens, cfg, scale, kf, kc)
            variants["decode_graph"] = lambda: graph(q, n)
        for name, fn in variants.items():
            rows.append(dict(n=n, variant=name, **timed(fn, args.calls)))
        # the code as it was: the custom op on every call, triton.cdiv on the host
        saved = selection_mod.cdiv, decode_mod.cdiv
        selection_mod.cdiv = decode_mod.cdiv = triton.cdiv
        try:
            rows.append(dict(n=n, variant="decode_custom_op_triton_cdiv", **timed(decode_custom_op, args.calls)))
        finally:
            selection_mod.cdiv, decode_mod.cdiv = saved
        rows.append(dict(n=n, variant="decode_custom_op", **timed(decode_custom_op, args.calls)))
        if not args.mock_launches:
            torch.testing.assert_close(decode(), decode_custom_op(), rtol=0, atol=0)  # the same computation
            torch.testing.assert_close(graph(q, n), decode(), rtol=0, atol=0)
        if args.attention_functions:
            for mode in ("dense", "infllmv2"):
                mean, median = attention_function_us(mode, n, args.steps, dev, args.mock_launches)
                rows.append(dict(n=n, variant=("sdpa" if mode == "dense" else mode) + "_attention_function",
                                 host_us=round(mean, 2), host_us_median=round(median, 2), gpu_us=None))
    res = dict(command="python3 benchmarks/profile_decode_host.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, cpu=platform.processor()
               or platform.machine(), torch=torch.__version__, triton=triton.__version__, rows=rows)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_decode_host.json"), "w") as f:
            json.dump(res, f, indent=1)
    print("\n| n | variant | host us | GPU us |\n| --- | --- | --- | --- |")
    for r in rows:
        gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
        median = f" (median {r['host_us_median']:.1f})" if "host_us_median" in r else ""
        print(f"| {r['n']} | {r['variant']} | {r['host_us']:.1f}{median} | {gpu} |")


if __name__ == "__main__":
    main()
