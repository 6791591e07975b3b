"""Where the host time of an eager decode call goes: each Triton launch taken apart, and a Python profile (H200).

    python3 benchmarks/profile_triton_launch.py [--n 32768] [--calls 200]

``profile_decode_host.py`` found an eager ``infllmv2_decode_triton`` call costing ~0.5 ms of host time on the
H200's host against 20 us of GPU time, and one small Triton launch 27 us. This records the Triton launches of one
decode call (MiniCPM4-8B layer, batch 1, n cached tokens, the default config, compressed keys given) and times each
over ``--calls`` repeats, the GPU kept busy by a sleep kernel so that only the host is measured:

* ``full_us``: ``kernel[grid](...)`` as our code calls it (``JITFunction.run``);
* ``binder_us``: the binder alone (the arguments' specialisation, which ``run`` computes on every call);
* ``direct_us``: the compiled kernel's launcher alone (``CompiledKernel.run`` with the bound arguments), what a
  launch costs once its compiled kernel is known.

Then a cProfile of ``--calls`` decode calls (top functions by own time) and of eager decode steps of a 4-layer Llama
(dense and ``infllmv2.enable``), to place the rest. Prints tables; JSON to ``$OUT/profile_triton_launch.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infllmv2 import SparseConfig  # noqa: E402
from profile_decode_host import decode_inputs  # noqa: E402
from infllmv2.ops.triton import infllmv2_decode_triton  # noqa: E402


def busy_host_us(fn, calls: int) -> float:
    """Host microseconds a call while the GPU is busy with a sleep kernel (the host never waits)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def top_functions(prof: cProfile.Profile, calls: int, limit: int = 25) -> list:
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append(dict(function=f"{os.path.basename(file)}:{line}:{name}", calls_per=round(nc / calls, 2),
                         own_us_per=round(tt / calls * 1e6, 2), cum_us_per=round(ct / calls * 1e6, 2)))
    rows.sort(key=lambda r: -r["own_us_per"])
    return rows[:limit]


def launches_of_decode(decode) -> list:
    """(JITFunction, args, kwargs) of every Triton launch of one decode call."""
    from triton.runtime.jit import JITFunction
    seen, orig = [], JITFunction.run

    def record(self, *args, **kwargs):
        seen.append((self, args, dict(kwargs)))
        return orig(self, *args, **kwargs)
    JITFunction.run = record
    try:
        decode()
        torch.cuda.synchronize()
    finally:
        JITFunction.run = orig
    return seen


def time_launch(fn, args, kwargs, calls: int) -> dict:
    from triton.runtime import driver
    row = dict(kernel=fn.__name__, n_args=len(args) + len(kwargs) - 2)
    row["full_us"] = round(busy_host_us(lambda: fn.run(*args, **kwargs), calls), 2)
    kernel = fn.run(*args, **kwargs)
    kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    kw.setdefault("debug", getattr(fn, "debug", None))
    try:
        device = driver.active.get_current_device()
        binder = fn.device_caches[device][-1]
        bound, _, _ = binder(*args, **kw)
        row["binder_us"] = round(busy_host_us(lambda: binder(*args, **kw), calls), 2)
        grid = kwargs["grid"]
        grid = grid(bound) if callable(grid) else grid
        g = tuple(grid) + (1,) * (3 - len(grid))
        stream = driver.active.get_current_stream(device)
        values = tuple(bound.values())
        launch = kernel.run
        row["direct_us"] = round(busy_host_us(lambda: launch(g[0], g[1], g[2], stream, kernel.function,
                                                             kernel.packed_metadata, None, None, None, *values),
                                              calls), 2)
        row["stream_device_us"] = round(busy_host_us(
            lambda: driver.active.get_current_stream(driver.active.get_current_device()), calls), 2)
    except Exception as err:  # Triton internals differ between versions: report, do not guess
        row["internals_error"] = f"{type(err).__name__}: {err}"
    return row


def eager_steps_profile(mode: str, n: int, steps: int, dev) -> dict:
    """cProfile of ``steps`` eager decode steps of a 4-layer Llama (this layer shape) after an n-token prefill."""
    import transformers

    import infllmv2
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                                   max_position_embeddings=n + steps + 64, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).to(device=dev, dtype=torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    if mode == "infllmv2":
        infllmv2.enable(model, SparseConfig().replace(dense_len=min(SparseConfig().dense_len, n // 2)))
    cache = infllmv2.InfLLMv2Cache() if mode == "infllmv2" else transformers.DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 512, (1, n), device=dev), past_key_values=cache, use_cache=True)
        tok = torch.ones(1, 1, dtype=torch.long, device=dev)

        def step():
            model(input_ids=tok, past_key_values=cache, use_cache=True)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall = busy_host_us(step, steps) / 4  # per layer
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        torch.cuda.synchronize()
    return dict(mode=mode, host_us_per_layer=round(wall, 2), top=top_functions(prof, steps * 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if args.n < 1 or args.calls < 1:
        raise SystemExit("--n and --calls must be positive")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton
    dev = torch.device("cuda")
    cfg, n = SparseConfig(), args.n
    q, k, v, lens, kf, kc = decode_inputs(n, dev, cfg)
    d = q.shape[-1]

    def decode():
        return infllmv2_decode_triton(q, k, v, lens, cfg, d ** -0.5, k_fine=kf, k_coarse=kc)

    res = dict(command="python3 benchmarks/profile_triton_launch.py " + " ".join(sys.argv[1:]), n=n,
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    res["decode_host_us"] = round(busy_host_us(decode, args.calls), 2)
    res["launches"] = [time_launch(fn, a, kw, args.calls) for fn, a, kw in launches_of_decode(decode)]
    prof = cProfile.Profile()
    torch.cuda._sleep(int(1e9))
    prof.enable()
    for _ in range(args.calls):
        decode()
    prof.disable()
    torch.cuda.synchronize()
    res["decode_profile"] = top_functions(prof, args.calls)
    res["eager_steps"] = [eager_steps_profile(m, n, 20, dev) for m in ("dense", "infllmv2")]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_triton_launch.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"decode call: {res['decode_host_us']} us of host time")
    print("| kernel | args | full us | binder us | direct us | device+stream us |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in res["launches"]:
        print(f"| {r['kernel']} | {r['n_args']} | {r['full_us']} | {r.get('binder_us', '-')} | "
              f"{r.get('direct_us', '-')} | {r.get('stream_device_us', r.get('internals_error', '-'))} |")
    for title, rows in [("decode call", res["decode_profile"])] + [
            (f"eager step, {e['mode']} ({e['host_us_per_layer']} us a layer)", e["top"]) for e in res["eager_steps"]]:
        print(f"\n{title}: own us a call (a layer) by function")
        for r in rows[:18]:
            print(f"  {r['own_us_per']:8.2f} {r['cum_us_per']:9.2f} x{r['calls_per']:<6} {r['function']}")


if __name__ == "__main__":
    main()
