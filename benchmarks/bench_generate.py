"""What a transformers user sees (issue 4): ``generate()`` on a MiniCPM4-8B-shaped ``LlamaForCausalLM``, dense (SDPA)
against the same model after ``infllmv2.enable(model)``.

Model: transformers' own Llama (hidden 4096, 32 layers, 32 query / 2 KV heads, head dim 128, intermediate 16384,
vocab 73448), random bf16 weights (transformers' initialisation), on one GPU; the same weights serve both paths
(``enable`` / ``disable`` switch the attention in place). InfLLM-V2 runs its default config. Measured, batch 1:

* ``*_ttft``: time to first token of ``generate()`` with its default cache (transformers' ``DynamicCache``; on an
  enabled model an ``InfLLMv2Cache``), from random token ids (``pattern: random``) or from input embeddings that
  follow BENCHMARKS.md's ``local`` random walk (``pattern: local``), at each length; timed on the second call
  (``first_call_ms``: the first, which at a new length also compiles the Triton kernels specialised on it, and runs
  SDPA in its default order);
* ``*_decode_eager``: the median decode step of that default (eager) generate loop, ``--eager-tokens`` steps;
* ``*_decode_compiled``: the median decode step with a static cache passed in (``StaticCache`` /
  ``InfLLMv2StaticCache`` of n + 1 + ``--new-tokens`` slots, reset between calls), whose decode steps transformers
  compiles (fullgraph, CUDA graphs), timed on the call after the one that compiles; the run asserts that both calls
  start from the prefill's token, and records how many new tokens agree (``replay_agree``).

The times come from a logits processor that changes nothing: it waits for the device and notes the time at each
step, as a streaming client needs each token on the host. The time-to-first-token calls and the compiled decode
steps run SDPA with cuDNN first in the backend priority, in both paths: the fastest dense prefill on the H200
(``bench_attention.py``), and the fastest dense kernel for a static cache's masked decode step (54.8 ms a step at 128K,
216 ms in SDPA's default order, ``results/generate_h200_decode*.json``). The eager decode steps keep SDPA's default
order: eager cuDNN builds a plan for every new key length, 1.9 ms of host time a layer
(``profile_generate_eager.py``). Writes ``generate_h200.json`` and
``generate_h200.md`` to ``--out-dir`` (rows also to ``generate_rows.jsonl`` as they come). ``--tiny``: a small model on
the CPU, whose check asserts that with a budget covering every sequence the enabled model generates the dense
model's tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import infllmv2  # noqa: E402
from bench_e2e import FULL_SHAPE, RowLog, random_walk  # noqa: E402
from infllmv2.models.transformers import ATTN_IMPLEMENTATION  # noqa: E402

TINY_SHAPE = dict(hidden=128, layers=2, hq=8, hkv=2, d=32, inter=256, vocab=112)
TINY_CONFIG = infllmv2.SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=32, topk=4,
                                    dense_len=128)


def build_model(shape, device, dtype):
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["hq"], num_key_value_heads=shape["hkv"],
        head_dim=shape["d"], max_position_embeddings=262144, rope_theta=1e6, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None  # every call generates exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def cache_kwarg(model):
    import inspect
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def sdpa_priority(device):
    """cuDNN first in SDPA's backend order for the calls inside (dense, and InfLLM-V2's own dense calls alike)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def prompt(model, n, pattern, device, shape):
    """generate() kwargs of an n-token prompt: random token ids (seed n) or the `local` random walk as embeddings."""
    if pattern == "local":
        x = random_walk(n, shape["hidden"], device, seed=n).to(model.dtype)[None]
        return dict(inputs_embeds=x, attention_mask=torch.ones(1, n, dtype=torch.long, device=device))
    g = torch.Generator(device=device).manual_seed(n)
    return dict(input_ids=torch.randint(3, shape["vocab"], (1, n), device=device, generator=g))


class StepClock:
    """A logits processor that changes nothing: it waits for the device and notes the time each step's logits reach
    the sampling, as a streaming client needs each token on the host. The first note is the first token's."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def steps_ms(self):
        d = sorted((b - a) * 1e3 for a, b in zip(self.times, self.times[1:]))
        return d[len(d) // 2] if d else None


def generate_clocked(model, kw, new_tokens, device, **extra):
    """(time to first token ms, median decode step ms, output ids) of one generate() call."""
    from transformers import LogitsProcessorList
    clock = StepClock(device)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(**kw, max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]), **extra)
    sync(device)
    return (clock.times[0] - t0) * 1e3, clock.steps_ms(), out


def run(args):
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    lengths = args.lengths or ([192, 256] if args.tiny else [32768, 65536, 131072])
    decode_lengths = args.decode_lengths or ([256] if args.tiny else [32768, 131072])
    config = TINY_CONFIG if args.tiny else infllmv2.SparseConfig()
    os.makedirs(args.out_dir, exist_ok=True)
    log = RowLog(os.path.join(args.out_dir, "generate_rows.jsonl"), device)
    rows, errors, add, attempt = log.rows, log.errors, log.add, log.attempt

    t_start = time.perf_counter()
    # each (mode, length) compiles the decode step again (new cache tensors, another attention): allow them all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model = build_model(shape, device, dtype)
    ck = cache_kwarg(model)
    print(f"model built in {time.perf_counter() - t_start:.1f}s", flush=True)

    def use(mode):
        """dense: transformers' SDPA; infllmv2: ``enable`` (the same weights)."""
        return infllmv2.enable(model, config, backend="auto") if mode == "infllmv2" else infllmv2.disable(model)

    with torch.no_grad():
        # warm-up: each path's kernels compiled / autotuned on a sparse-length prompt
        warm = lengths[0] if args.tiny else 16384
        for mode in ("dense", "infllmv2"):
            use(mode)
            with sdpa_priority(device):
                model.generate(**prompt(model, warm, "random", device, shape), max_new_tokens=1)
            model.generate(**prompt(model, warm, "random", device, shape), max_new_tokens=2)
        sync(device)
        print(f"warm-up done at {time.perf_counter() - t_start:.1f}s", flush=True)

        # ---- the default (eager) decode loop, then the time to first token with cuDNN first (a prefill alone: cuDNN
        # builds an execution plan for each new key length, 1.9 ms of host time a layer in eager decode steps,
        # profile_generate_eager.py, so the decode steps keep SDPA's default order). The first call at a new length
        # also compiles the Triton kernels specialised on it: its time to first token is kept as first_call_ms
        for n in ([] if args.compiled_decode_only else lengths):
            for pattern in args.patterns:
                for mode in ("dense", "infllmv2"):
                    if mode == "dense" and pattern != args.patterns[0]:
                        continue  # dense time does not depend on the input

                    def one(mode=mode, pattern=pattern, n=n):
                        use(mode)
                        kw = prompt(model, n, pattern, device, shape)
                        t1, s1, _ = generate_clocked(model, kw, 1 + args.eager_tokens, device)
                        with sdpa_priority(device):
                            t2, _, _ = generate_clocked(model, kw, 1, device)
                        add(path=f"{mode}_ttft", n=n, batch=1, pattern=pattern if mode == "infllmv2" else None,
                            ms=t2, first_call_ms=t1)
                        add(path=f"{mode}_decode_eager", n=n, batch=1, pattern=pattern if mode == "infllmv2" else None,
                            ms=s1, new_tokens=args.eager_tokens)
                    attempt(f"{mode} ttft n={n} {pattern}", one)
            print(f"ttft n={n} done at {time.perf_counter() - t_start:.1f}s", flush=True)

        # ---- decode steps compiled by transformers, static caches passed in
        from transformers import StaticCache

        from infllmv2.cache import InfLLMv2StaticCache
        for n in ([] if args.no_compiled_decode else decode_lengths):
            for mode in ("dense", "infllmv2"):
                def one(mode=mode, n=n):
                    use(mode)
                    kw = prompt(model, n, "random", device, shape)
                    make = InfLLMv2StaticCache if mode == "infllmv2" else StaticCache
                    cache = make(config=model.config, max_cache_len=n + 1 + args.new_tokens)

                    def gen():
                        cache.reset()
                        with sdpa_priority(device):
                            return generate_clocked(model, kw, 1 + args.new_tokens, device, **{ck: cache})
                    _, _, first = gen()  # compiles the decode step
                    _, step_ms, again = gen()
                    new_first, new_again = first[0, -args.new_tokens - 1:], again[0, -args.new_tokens - 1:]
                    if new_first[0] != new_again[0]:  # the prefill's token: the reset cache starts afresh
                        raise AssertionError(f"{mode}: the reset static cache changed the prefill's token")
                    # later tokens may legitimately differ: the first call's early steps run before CUDA-graph
                    # capture, and this random model's near-tied logits flip on such rounding differences
                    add(path=f"{mode}_decode_compiled", n=n, batch=1, ms=step_ms, new_tokens=args.new_tokens,
                        compiled=device == "cuda" and not model.generation_config.disable_compile,
                        replay_agree=(new_first == new_again).float().mean().item())
                attempt(f"{mode} compiled decode n={n}", one)
            print(f"compiled decode n={n} done at {time.perf_counter() - t_start:.1f}s", flush=True)
        use("dense")

        if args.tiny:  # the enabled model with a budget covering every sequence generates the dense model's tokens
            def check():
                kw = prompt(model, max(lengths), "random", device, shape)
                infllmv2.disable(model)
                dense = model.generate(**kw, max_new_tokens=8)
                infllmv2.enable(model, config.replace(topk=64), backend="auto")
                if model.config._attn_implementation != ATTN_IMPLEMENTATION:
                    raise AssertionError("enable() did not switch the attention")
                sparse = model.generate(**kw, max_new_tokens=8)
                infllmv2.disable(model)
                if not torch.equal(dense, sparse):
                    raise AssertionError(f"covering budget: {sparse.tolist()} != dense {dense.tolist()}")
                print("tiny check: enabled model with a covering budget generates the dense tokens", flush=True)
            attempt("tiny check", check)
    return rows, errors, config


def write_outputs(rows, errors, args, config, res=None):
    """generate_h200.json / .md in --out-dir; ``res``: a results JSON to re-render (--replot), its meta kept."""
    if res is None:
        import triton
        import transformers
        meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (tiny smoke test)",
                "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                "date": datetime.date.today().isoformat(),
                "command": "python3 benchmarks/bench_generate.py " + " ".join(sys.argv[1:])}
        res = dict(meta, model="tiny" if args.tiny else "transformers LlamaForCausalLM, MiniCPM4-8B shape, random bf16",
                   sparse_config=config.to_dict(), rows=rows, errors=errors)
        with open(os.path.join(args.out_dir, "generate_h200.json"), "w") as f:
            json.dump(res, f, indent=1)
    meta = res

    def pick(path, n, pattern=None, key="ms"):
        for r in rows:
            if r["path"] == path and r["n"] == n and r.get("pattern") == pattern:
                return r.get(key)
        return None

    def cell(ms, digits):
        return "-" if ms is None else f"{ms:.{digits}f}"

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    lines = [f"# transformers generate(), dense vs infllmv2.enable ({meta['gpu']}, torch {meta['torch']}, "
             f"transformers {meta.get('transformers')}, {meta['date']})", "", f"Command: `{meta['command']}`", "",
             f"{res['model']}, batch 1; InfLLM-V2 config {config.to_dict()}.", "",
             "## Time to first token (generate, default cache; first call in brackets)", "",
             "| n | dense ms | InfLLM-V2 random ms | speed-up | InfLLM-V2 local ms | speed-up |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n in sorted({r["n"] for r in rows if r["path"].endswith("_ttft")}):
        d, r_, l_ = pick("dense_ttft", n), pick("infllmv2_ttft", n, "random"), pick("infllmv2_ttft", n, "local")
        first = [pick("dense_ttft", n, key="first_call_ms"), pick("infllmv2_ttft", n, "random", "first_call_ms"),
                 pick("infllmv2_ttft", n, "local", "first_call_ms")]
        lines.append(f"| {n} | {cell(d, 0)} ({cell(first[0], 0)}) | {cell(r_, 0)} ({cell(first[1], 0)}) | "
                     f"{ratio(d, r_)} | {cell(l_, 0)} ({cell(first[2], 0)}) | {ratio(d, l_)} |")
    gqa = any(r["path"].startswith("dense_gqa") for r in rows)  # older runs: TRANSFORMERS_SDPA_FORCE_GQA=1 too
    lines += ["", "## One decode step (median over the call's steps, each waited for on the host)", "",
              "| n | loop | dense ms | " + ("dense, GQA kernels ms | " if gqa else "") + "InfLLM-V2 ms | speed-up |"
              + (" vs dense GQA |" if gqa else ""), "| --- " * (5 + 2 * gqa) + "|"]
    for kind, label in (("eager", "default cache, eager"), ("compiled", "static cache, compiled by transformers")):
        for n in sorted({r["n"] for r in rows if r["path"].endswith(f"_decode_{kind}")}):
            pat = "random" if kind == "eager" and "random" in args.patterns else None
            d, g, s_ = pick(f"dense_decode_{kind}", n), pick(f"dense_gqa_decode_{kind}", n), pick(
                f"infllmv2_decode_{kind}", n, pat if kind == "eager" else None)
            cells = [cell(d, 2)] + ([cell(g, 2)] if gqa else []) + [cell(s_, 2), ratio(d, s_)] + (
                [ratio(g, s_)] if gqa else [])
            lines.append(f"| {n} | {label} | " + " | ".join(cells) + " |")
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    with open(os.path.join(args.out_dir, "generate_h200.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tiny", action="store_true", help="small model on the CPU (smoke test with a correctness check)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths of the time to first token")
    p.add_argument("--decode-lengths", type=int, nargs="+", help="prompt lengths of the compiled decode steps")
    p.add_argument("--patterns", nargs="+", default=["random", "local"], choices=["random", "local"])
    p.add_argument("--compiled-decode-only", action="store_true", help="only the compiled decode steps")
    p.add_argument("--no-compiled-decode", action="store_true", help="no compiled decode steps (time to first token "
                   "and eager decode only)")
    p.add_argument("--new-tokens", type=int, default=32, help="compiled decode steps a call (median timed)")
    p.add_argument("--eager-tokens", type=int, default=8, help="eager decode steps a call (median timed)")
    p.add_argument("--replot", help="rewrite --out-dir's generate_h200.md from this results JSON (no GPU)")
    args = p.parse_args()
    if args.replot:
        os.makedirs(args.out_dir, exist_ok=True)
        res = json.load(open(args.replot))
        args.patterns = sorted({r["pattern"] for r in res["rows"] if r.get("pattern")}) or args.patterns
        write_outputs(res["rows"], res.get("errors", []), args, infllmv2.SparseConfig.from_dict(res["sparse_config"]),
                      res)
        return
    if args.compiled_decode_only and args.no_compiled_decode:
        p.error("--compiled-decode-only and --no-compiled-decode exclude each other")
    for name in ("new_tokens", "eager_tokens"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2 (a median of steps)")
    for name in ("lengths", "decode_lengths"):
        if any(n < 1 for n in getattr(args, name) or []):
            p.error(f"--{name.replace('_', '-')} must be positive")
    rows, errors, config = run(args)
    write_outputs(rows, errors, args, config)


if __name__ == "__main__":
    main()
