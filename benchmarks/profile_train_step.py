"""Where a fine-tuning step of `infllmv2 train` spends its time: SmolLM2-135M's shape, dense against InfLLM-V2 (GPU).

    python3 benchmarks/profile_train_step.py [--seq-len 8192] [--micro-batch 4] [--steps 12] [--arms dense infllmv2]

A LlamaForCausalLM with SmolLM2-135M's shape (random weights: the timing does not depend on them), float32 master
weights under bf16 autocast, AdamW, and the rows `infllmv2 train --buckets paper --ruler-ratio 0.3 --data stdlib`
makes (byte ids, so no tokenizer file is needed), run as `train.py`'s loop runs them. For each arm: the time of each
part of a step (making the rows on the host, forward, backward, optimizer), measured with the GPU drained around
each part, then a profile of two steps: the GPU's busy time against the wall time and the kernels that take the
most of it. Prints JSON and writes it to ``$OUT/profile_train_step.json`` when OUT is set.

``--attention-host`` also times, during the timed steps' forwards, the host time spent inside the arm's attention
function (transformers' ``sdpa`` one, or InfLLM-V2's after ``enable``): no synchronisation inside, so this is the
host's share of the forward that the attention takes (``attention_host_ms`` a forward).

``--host-breakdown N`` (InfLLM-V2 arm) also times N forwards over rows already seen (nothing compiles) with
wall-clock timers around the pieces of the attention path (``HOST_PIECES``, all Triton launches (the Gluon kernels'
included), all Gluon launches with their descriptors):
each piece's host time a forward, inclusive of what it calls, and its calls. A piece's time may include waits inside
torch (the allocator, a full launch queue), so it bounds what removing the piece would save.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
               tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5)


COMPILES: dict = {}  # Triton kernel name -> compilations seen by the hook below


def _count_compile(*args, **kwargs):
    """triton.knobs.runtime.jit_cache_hook: called at each cache miss, before compiling; returning None compiles."""
    fn = kwargs.get("fn")
    name = getattr(fn, "name", None) or str(getattr(fn, "jit_function", fn))
    COMPILES[name] = COMPILES.get(name, 0) + 1
    return None


# The run's default InfLLM-V2 config: 1536 visible tokens a query, always sparse (what the SmolLM2 adaptation ran)
RUN_SPARSE = dict(block_size=64, kernel_size=32, kernel_stride=16, window_size=512, topk=16, dense_len=-1)


def make_model(arm: str, seq_len: int, device, sparse: dict = RUN_SPARSE):
    from transformers import LlamaConfig, LlamaForCausalLM

    from infllmv2 import SparseConfig, enable
    from infllmv2.train import set_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SMOLLM2, max_position_embeddings=max(seq_len, 8192)))
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)
    if arm == "infllmv2":
        enable(model, SparseConfig(**sparse))
    elif arm == "dense":  # as `infllmv2 train --attention dense` runs packed rows (padded SDPA batches)
        set_attention(model, "dense", SparseConfig(**sparse), packed_rows=True)
    model.config.use_cache = False
    return model.train()


def host_timed(fn, on: list, record):
    """``fn`` with its host time (wall clock, no synchronisation) passed to ``record`` at each call while ``on[0]``."""
    def wrapper(*a, **k):
        if not on[0]:
            return fn(*a, **k)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            record(time.perf_counter() - t)
    return wrapper


# (module, function) pieces of InfLLM-V2's attention path that --host-breakdown times
HOST_PIECES = [("infllmv2.attention", "infllmv2_attention"), ("infllmv2.attention", "_select_packed"),
               ("infllmv2.attention", "_sparse_packed"), ("infllmv2.attention", "dense_attention_sdpa"),
               ("infllmv2.ops.triton.selection", "select_blocks_triton"),
               ("infllmv2.ops.triton.selection", "_compress_core"), ("infllmv2.ops.triton.selection", "_select_core"),
               ("infllmv2.ops.triton.sparse_attention", "_forward"),
               ("infllmv2.ops.triton.sparse_attention", "_tile_table"),
               ("infllmv2.ops.triton.sparse_attention", "_tile_unions")]


def host_breakdown(model, batch, n: int) -> dict:
    """Host time a forward of each piece of HOST_PIECES, of all Triton launches and of all Gluon launches, over n
    forwards of ``batch`` (timers around each call, inclusive of what it calls; every module binding of a piece is
    wrapped, then restored)."""
    import importlib

    import triton.runtime.jit

    from infllmv2.ops.triton import gluon_support
    totals, on = {}, [False]

    def timed(name, fn):
        def record(seconds):
            e = totals.setdefault(name, [0.0, 0])
            e[0] += seconds
            e[1] += 1
        return host_timed(fn, on, record)

    saved = []  # (owner, attribute, original)
    for mod_name, fn_name in HOST_PIECES:
        orig = getattr(importlib.import_module(mod_name), fn_name)
        wrapper = timed(f"{mod_name.split('.')[-1]}.{fn_name}", orig)
        for m in list(sys.modules.values()):  # the modules that imported it by name too
            if m is not None and getattr(m, fn_name, None) is orig:
                saved.append((m, fn_name, orig))
                setattr(m, fn_name, wrapper)
    for owner, attr, name in ((triton.runtime.jit.JITFunction, "run", "Triton launches"),
                              (gluon_support.GluonKernel, "__call__", "Gluon launches")):
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        torch.cuda.synchronize()
        on[0] = True
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(**batch, use_cache=False)
        host = time.perf_counter() - t0
        on[0] = False
        torch.cuda.synchronize()
    finally:
        for owner, attr, orig in saved:
            setattr(owner, attr, orig)
    pieces = {k: dict(ms_a_forward=round(1e3 * t / n, 2), calls_a_forward=c / n, us_a_call=round(1e6 * t / c, 1))
              for k, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])}
    return dict(forwards=n, forward_host_ms=round(1e3 * host / n, 1), pieces=pieces)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="timed steps an arm (after 3 warm-up steps)")
    ap.add_argument("--arms", nargs="+", default=["dense", "infllmv2"], choices=["dense", "dense_sdpa", "infllmv2"],
                    help="dense: as `infllmv2 train --attention dense` runs packed rows since the thirty-second "
                         "session (the sequences in a few right-padded SDPA batches); dense_sdpa: transformers' "
                         "SDPA over the packed rows (its block-diagonal masks), the dense arm before")
    ap.add_argument("--attention-host", action="store_true",
                    help="also time the host inside the attention function during the timed forwards")
    ap.add_argument("--host-breakdown", type=int, default=0, metavar="N",
                    help="also time N forwards with timers around the pieces of InfLLM-V2's attention path")
    ap.add_argument("--sparse-config", default=None, metavar="JSON",
                    help="InfLLM-V2 config fields (JSON object) in place of the run's default (window 512, top-16, "
                         "always sparse); '{}' gives MiniCPM4's defaults (dense below 8192 tokens)")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also profile two forward passes on the host with cProfile and keep the top N functions")
    args = ap.parse_args()
    if min(args.seq_len, args.micro_batch, args.steps) <= 0:
        raise SystemExit("--seq-len, --micro-batch and --steps must be positive")
    try:
        sparse = RUN_SPARSE if args.sparse_config is None else dict(json.loads(args.sparse_config))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--sparse-config must be a JSON object of SparseConfig fields: {e}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from infllmv2.data import ByteTokenizer, TrainingStream, build_documents, encode_documents, source_roots
    from infllmv2.train import TrainConfig, _buckets

    dev = torch.device("cuda")
    import triton
    triton.knobs.runtime.jit_cache_hook = _count_compile
    tc = TrainConfig()
    tok = ByteTokenizer()
    docs = build_documents(source_roots(["stdlib"]), min_chars=tc.doc_min_chars, max_chars=tc.data_max_chars,
                           exts=[".py"])
    stream = TrainingStream(encode_documents(docs, tok), args.seq_len, seed=0, buckets=_buckets("paper"),
                            ruler_ratio=0.3, tokenizer=tok)
    out = dict(command="python3 benchmarks/profile_train_step.py " + " ".join(sys.argv[1:]),
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, seq_len=args.seq_len,
               micro_batch=args.micro_batch, sparse_config=sparse, arms={})
    for arm in args.arms:
        model = make_model(arm, args.seq_len, dev, sparse)
        attention_s = []  # host seconds inside the attention function, one entry a call of the current forward
        attention_steps = []  # (host seconds inside it, calls) for each timed forward
        timing_attention = [False]
        if args.attention_host:
            from transformers import AttentionInterface
            name = model.config._attn_implementation
            inner = AttentionInterface._global_mapping[name]
            AttentionInterface._global_mapping[name] = host_timed(inner, timing_attention, attention_s.append)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8)
        parts = {"rows": [], "forward": [], "forward_host": [], "backward": [], "optimizer": [], "step": []}
        compiles_per_step = []
        row = 0

        def step(timed):
            nonlocal row
            t0 = time.perf_counter()
            batch = {k: v.to(dev) for k, v in stream.batch(range(row, row + args.micro_batch)).items()}
            row += args.micro_batch
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            timing_attention[0] = timed
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss
            timing_attention[0] = False
            if timed and args.attention_host:
                attention_steps.append((sum(attention_s), len(attention_s)))
                attention_s.clear()
            t_host = time.perf_counter()  # the forward's host time (it includes any wait for the GPU inside)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            loss.backward()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            if timed:
                for k, v in (("rows", t1 - t0), ("forward", t2 - t1), ("forward_host", t_host - t1),
                             ("backward", t3 - t2), ("optimizer", t4 - t3), ("step", t4 - t0)):
                    parts[k].append(v)
            return float(loss)

        for _ in range(3):
            step(False)
        for _ in range(args.steps):
            before = sum(COMPILES.values())
            step(True)
            compiles_per_step.append(sum(COMPILES.values()) - before)
        res = {k: round(1e3 * sum(v) / len(v), 1) for k, v in parts.items()}
        # Triton compiles a kernel again for each new specialisation of its integer arguments (== 1, % 16): steps
        # whose row layout brings a new one pay for the compilation
        quiet = [t for t, c in zip(parts["step"], compiles_per_step) if c == 0]
        res["steps_without_compiles"] = len(quiet)
        res["step_ms_without_compiles"] = round(1e3 * sum(quiet) / len(quiet), 1) if quiet else None
        res["step_ms_each"] = [round(1e3 * t, 1) for t in parts["step"]]
        res["compiles_each_step"] = compiles_per_step
        res["compiles_by_kernel"] = dict(sorted(COMPILES.items(), key=lambda kv: -kv[1]))
        COMPILES.clear()
        res["tokens_per_s"] = round(args.micro_batch * args.seq_len / (res["step"] / 1e3))
        if args.attention_host:
            AttentionInterface._global_mapping[name] = inner
            # over the steps without a compilation (a compile inside the attention function would count as host time)
            quiet_att = [a for a, c in zip(attention_steps, compiles_per_step) if c == 0]
            quiet_fwd = [t for t, c in zip(parts["forward_host"], compiles_per_step) if c == 0]
            if quiet_att:
                res["forward_host_ms_without_compiles"] = round(1e3 * sum(quiet_fwd) / len(quiet_fwd), 1)
                res["attention_host_ms"] = round(1e3 * sum(a for a, _ in quiet_att) / len(quiet_att), 1)
                res["attention_host_us_a_call"] = round(1e6 * sum(a for a, _ in quiet_att)
                                                        / sum(n for _, n in quiet_att), 1)
                res["attention_calls_a_forward"] = quiet_att[0][1]
        # a profile of two steps as train.py runs them (no drains between the parts)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                batch = {k: v.to(dev) for k, v in stream.batch(range(row, row + args.micro_batch)).items()}
                row += args.micro_batch
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batch, use_cache=False).loss
                loss.backward()
                float(loss)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t > 0 and e.device_type.name == "CUDA":
                kernels[e.key] = kernels.get(e.key, 0.0) + t / 1e3 / 2  # ms a step
        busy = sum(kernels.values())
        res["profiled_ms_per_step"] = round(1e3 * wall / 2, 1)
        res["gpu_busy_ms_per_step"] = round(busy, 1)
        res["top_kernels_ms_per_step"] = {k[:90]: round(v, 2) for k, v in
                                          sorted(kernels.items(), key=lambda kv: -kv[1])[:18]}
        if args.host_breakdown and arm == "infllmv2":
            batch = {k: v.to(dev) for k, v in stream.batch(range(row - args.micro_batch, row)).items()}
            res["host_breakdown"] = host_breakdown(model, batch, args.host_breakdown)
        if args.cprofile:  # the host's time by Python function over two forward passes (no drains)
            import cProfile
            import io
            import pstats
            pr = cProfile.Profile()
            batch = {k: v.to(dev) for k, v in stream.batch(range(row, row + args.micro_batch)).items()}
            torch.cuda.synchronize()
            pr.enable()
            t0 = time.perf_counter()
            for _ in range(2):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batch, use_cache=False).loss
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(args.cprofile)
            res["cprofile_forward_ms"] = round(1e3 * wall / 2, 1)
            res["cprofile_tottime"] = buf.getvalue()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(args.cprofile)
            res["cprofile_cumulative"] = buf.getvalue()
        out["arms"][arm] = res
        model = opt = None  # freed before the next arm
        torch.cuda.empty_cache()
    text = json.dumps(out, indent=1)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_train_step.json"), "w") as fh:
            fh.write(text)
    print("| arm | rows | forward (host) | backward | optimizer | step (ms) | tokens/s | GPU busy / profiled step "
          "(ms) | steps without compiles: n, ms | compiles |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm, r in out["arms"].items():
        print(f"| {arm} | {r['rows']} | {r['forward']} ({r['forward_host']}) | {r['backward']} | {r['optimizer']} | "
              f"{r['step']} | "
              f"{r['tokens_per_s']} | {r['gpu_busy_ms_per_step']} / {r['profiled_ms_per_step']} | "
              f"{r['steps_without_compiles']}, {r['step_ms_without_compiles']} | {sum(r['compiles_each_step'])} |")


if __name__ == "__main__":
    main()
