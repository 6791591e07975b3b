"""A/B of an eager decode step of transformers' Llama (MiniCPM4-8B shape, batch 1): what InfLLM-V2's step costs
over dense's, taken apart by switching pieces of it off.

    python3 benchmarks/ab_eager_step.py [--n 131072] [--steps 8] [--rounds 3] [--static] [--batch 4 --pad 1000]

Variants, interleaved over ``--rounds`` (each: ``--steps`` steps, each waited for, the median step kept):

* ``dense``: transformers' SDPA with its ``DynamicCache`` (SDPA's default backend order);
* ``infllmv2``: ``infllmv2.enable`` with ``InfLLMv2Cache``, as generate() runs it (each layer's decode call
  replayed from a CUDA graph, ``DecodeGraph``);
* ``infllmv2_no_graphs``: the same with the decode chain launched at every call (``DECODE_GRAPHS`` off, as before
  the twenty-sixth session);
* ``infllmv2_no_pdl``: launched at every call, without programmatic dependent launch;
* ``infllmv2_stub_decode``: the decode call replaced by an empty output (the rest of InfLLM-V2's attention
  function and cache kept): what everything but the decode call costs.

With ``--static``, the variants run static caches instead, eagerly (generate() with ``disable_compile``):
``dense_static`` (transformers' ``StaticCache``), ``infllmv2_static`` (``InfLLMv2StaticCache``, each layer's decode
call replayed from a CUDA graph) and ``infllmv2_static_no_graphs`` (launched at every call).

With ``--batch B`` (dynamic caches), every variant decodes a batch of B rows with generate()'s attention mask and
position ids. ``--pad P`` left-pads row i by i * P tokens (rows of n, n - P, ...) and adds ``dense_unpadded`` and
``infllmv2_unpadded``: the same batch with every row n tokens long, so that the cost of the padded rows' layout
(``cache.filled_slots``, read once a forward) shows as padded against unpadded.

"host returned at": when ``model(...)`` returned, before the wait (close to the step: the host is the bound).
Prints a table; JSON to ``$OUT/ab_eager_step.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infllmv2  # noqa: E402
import infllmv2.ops.triton as triton_ops  # noqa: E402
import infllmv2.ops.triton.decode as decode_mod  # noqa: E402
import infllmv2.ops.triton.selection as selection_mod  # noqa: E402
from bench_e2e import FULL_SHAPE  # noqa: E402
from bench_generate import build_model, cache_kwarg, prompt, sdpa_priority  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--static", action="store_true", help="static caches, eagerly (see the module doc)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (dynamic caches)")
    p.add_argument("--pad", type=int, default=0, help="left padding of row i: i * PAD tokens (needs --batch > 1)")
    args = p.parse_args()
    if args.batch < 1 or args.pad < 0 or (args.pad and args.batch < 2) or (args.static and args.batch > 1):
        p.error("--batch must be >= 1, --pad >= 0 and only with --batch > 1; --static runs batch 1")
    if args.pad * (args.batch - 1) >= args.n:
        p.error(f"--pad {args.pad} leaves row {args.batch - 1} empty at --n {args.n}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    model = build_model(FULL_SHAPE, "cuda", torch.bfloat16)
    ck = cache_kwarg(model)
    ids = prompt(model, args.n, "random", "cuda", FULL_SHAPE)["input_ids"].expand(args.batch, -1)
    full_mask = torch.ones(args.batch, args.n, dtype=torch.long, device="cuda")
    padded_mask = full_mask.clone()
    for i in range(args.batch):
        padded_mask[i, :i * args.pad] = 0  # left padding, as generate() lays out a batch of shorter prompts
    real_decode = triton_ops.infllmv2_decode_triton
    caches, masks = {}, {}
    transformers = __import__("transformers")
    slots = args.n + 2 * (2 + args.steps) * args.rounds + 8  # every timed step of every round
    with torch.no_grad():
        for mode in ("dense", "infllmv2") + (("dense_unpadded", "infllmv2_unpadded") if args.pad else ()):
            masks[mode] = padded_mask.clone() if not mode.endswith("_unpadded") else full_mask.clone()
            if mode.startswith("dense"):
                infllmv2.disable(model)
                caches[mode] = (transformers.StaticCache(config=model.config, max_cache_len=slots) if args.static
                                else transformers.DynamicCache())
            else:
                infllmv2.enable(model)
                caches[mode] = (infllmv2.InfLLMv2StaticCache(config=model.config, max_cache_len=slots) if args.static
                                else infllmv2.InfLLMv2Cache())
            with sdpa_priority("cuda"):
                model(input_ids=ids, logits_to_keep=1, **{ck: caches[mode]}, **_mask_kwargs(masks[mode], args))
        del ids
        torch.cuda.empty_cache()

        def setup(variant):
            selection_mod.DECODE_PDL = variant != "infllmv2_no_pdl"
            decode_mod.DECODE_GRAPHS = variant in ("infllmv2", "infllmv2_static", "infllmv2_unpadded")
            triton_ops.infllmv2_decode_triton = (
                (lambda q, *a, **k: torch.empty_like(q)) if variant == "infllmv2_stub_decode" else real_decode)
            dense = variant.startswith("dense")
            if dense:
                infllmv2.disable(model)
            else:
                infllmv2.enable(model)
            key = ("dense" if dense else "infllmv2") + ("_unpadded" if variant.endswith("_unpadded") else "")
            return caches[key], key

        variants = (["dense_static", "infllmv2_static", "infllmv2_static_no_graphs"] if args.static else
                    ["dense", "infllmv2", "dense_unpadded", "infllmv2_unpadded", "infllmv2_no_graphs"] if args.pad else
                    ["dense", "infllmv2", "infllmv2_no_graphs", "infllmv2_no_pdl", "infllmv2_stub_decode"])
        walls = {v: [] for v in variants}
        reserved = {}
        issue = {v: [] for v in variants}
        tok = torch.ones(args.batch, 1, dtype=torch.long, device="cuda")
        one = torch.ones(args.batch, 1, dtype=torch.long, device="cuda")
        for r in range(args.rounds):
            for v in variants:
                cache, key = setup(v)
                for i in range(2 + args.steps):
                    if args.batch > 1:  # the step's mask and positions, prepared outside the timed call
                        masks[key] = torch.cat([masks[key], one], 1)
                        extra = _mask_kwargs(masks[key], args, last=True)
                    else:
                        extra = {}
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(input_ids=tok, logits_to_keep=1, **{ck: cache}, **extra)
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    if i >= 2:
                        walls[v].append((time.perf_counter() - t0) * 1e3)
                        issue[v].append((t1 - t0) * 1e3)
                reserved.setdefault(v, torch.cuda.memory_reserved() / 2**20)
        setup("infllmv2")
    rows = [dict(variant=v, step_ms_median=round(statistics.median(w), 3), step_ms_min=round(min(w), 3),
                 issue_ms_median=round(statistics.median(issue[v]), 3),
                 reserved_mib_after_first_round=round(reserved[v], 1)) for v, w in walls.items()]
    res = dict(command="python3 benchmarks/ab_eager_step.py " + " ".join(sys.argv[1:]), n=args.n, static=args.static,
               batch=args.batch, pad=args.pad,
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, walls_ms=walls, issue_ms=issue)
    if os.environ.get("OUT"):
        name = ("ab_eager_step_static.json" if args.static else
                f"ab_eager_step_b{args.batch}_pad{args.pad}.json" if args.batch > 1 else "ab_eager_step.json")
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(res, f, indent=1)
    print("| variant | step ms (median) | min | host returned at ms | reserved MiB |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['step_ms_median']} | {r['step_ms_min']} | {r['issue_ms_median']} | "
              f"{r['reserved_mib_after_first_round']} |")


def _mask_kwargs(mask, args, last=False):
    """generate()'s attention mask and position ids (counted over the filled slots) for a batch; none at batch 1."""
    if args.batch == 1:
        return {}
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return dict(attention_mask=mask, position_ids=pos[:, -1:] if last else pos)


if __name__ == "__main__":
    main()
