"""Triton compilations during eager ``generate()`` decode steps (GPU): a small transformers Llama with the
MiniCPM4-8B attention shape (32 query / 2 KV heads, head dim 128; 2 layers, hidden 1024), enabled with InfLLM-V2's
default config, generating from prompts that cross ``dense_len`` while decoding, that make the cache's room grow,
of new lengths in a process already warm, and as a left-padded batch; each case with the per-layer decode graphs
(the default) and with the chain launched at every call (``DECODE_GRAPHS`` off).

    PYTHONUNBUFFERED=1 python3 benchmarks/dev_decode_compiles.py

Compilations are counted with Triton's ``jit_cache_hook`` and attributed to the decode step they fall in (a logits
processor notes the count and the time at each step). Prints a table; writes ``$OUT/decode_compiles.json`` when OUT
is set. A compilation inside a decode step costs the step about a second: a serving process should see none after
its first requests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import infllmv2  # noqa: E402
import infllmv2.ops.triton.decode as decode_mod  # noqa: E402
from bench_generate import build_model  # noqa: E402

COMPILED: list = []
REPRS: dict = {}  # kernel name -> each compilation's launch options and arguments' specialisation (_describe)
SHAPE = dict(hidden=1024, layers=2, hq=32, hkv=2, d=128, inter=2048, vocab=1000)
# (name, prompt lengths of the batch (left-padded to the longest), new tokens)
CASES = [
    ("cross_dense_len", [7900], 600),  # dense prefill, the switch to sparse at step 292
    ("room_grows", [20000], 2800),     # the key / value room (an eighth more) fills at step 2500
    ("new_length_warm", [20037], 300),
    ("new_length_warm_2", [45001], 300),
    ("left_padded_b2", [30000, 27001], 300),
]


def _count(*args, **kwargs):
    name = getattr(kwargs.get("fn"), "name", "?")
    COMPILED.append(name)
    REPRS.setdefault(name, []).append(_describe(kwargs.get("compile") or {}))
    return None


def _describe(info: dict) -> list:
    """A compilation's launch options, then each argument as 'name type' with its specialisation: '/16' for an
    integer or pointer known divisible by 16, '=value' for a constexpr or an integer specialised as 1."""
    attrs = (info.get("configs") or [{}])[0] or {}
    consts = info.get("constants") or {}
    parts = [f"num_warps={info.get('num_warps')} num_stages={info.get('num_stages')}"]
    for i, (arg, ty) in enumerate((info.get("signature") or {}).items()):
        text = f"{arg} {ty}"
        if any(a[0] == "tt.divisibility" for a in attrs.get((i,), [])):
            text += " /16"
        if (i,) in consts:
            text += f" ={consts[(i,)]}"
        parts.append(text)
    return parts


def variants() -> dict:
    """Per kernel compiled more than once: what each compilation changed against the one before."""
    out = {}
    for name, reprs in REPRS.items():
        if len(reprs) > 1:
            out[name] = [sorted(set(b) - set(a)) for a, b in zip(reprs, reprs[1:])]
    return out


class StepNotes:
    """A logits processor that changes nothing: at each step it waits for the GPU and notes the time and the
    compilations so far."""

    def __init__(self):
        self.notes = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.notes.append((time.perf_counter(), len(COMPILED)))
        return scores


def run_case(model, lengths, new_tokens):
    from transformers import LogitsProcessorList
    n = max(lengths)
    g = torch.Generator(device="cuda").manual_seed(n)
    ids = torch.randint(3, SHAPE["vocab"], (len(lengths), n), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, : n - length] = 0
        ids[row, : n - length] = 0
    notes = StepNotes()
    start = len(COMPILED)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([notes]))
    prefill_compiles = notes.notes[0][1] - start
    steps = []
    for i, ((t_a, c_a), (t_b, c_b)) in enumerate(zip(notes.notes, notes.notes[1:]), start=1):
        steps.append({"step": i, "ms": (t_b - t_a) * 1e3, "compiled": COMPILED[c_a:c_b]})
    ms = sorted(s["ms"] for s in steps)
    with_compiles = [s for s in steps if s["compiled"]]
    return {"prompt_lengths": lengths, "new_tokens": new_tokens,
            "first_token_s": round(notes.notes[0][0] - t0, 3), "prefill_compiles": prefill_compiles,
            "decode_compiles": sum(len(s["compiled"]) for s in steps),
            "median_step_ms": round(ms[len(ms) // 2], 3), "max_step_ms": round(ms[-1], 1),
            "steps_with_compiles": [{"step": s["step"], "ms": round(s["ms"], 1), "compiled": s["compiled"]}
                                    for s in with_compiles],
            "slow_steps": [(s["step"], round(s["ms"], 1)) for s in steps if s["ms"] > 5 * ms[len(ms) // 2]][:20]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=[c[0] for c in CASES], help="names of the cases to run")
    args = ap.parse_args()
    triton.knobs.runtime.jit_cache_hook = _count
    model = build_model(SHAPE, "cuda", torch.bfloat16)
    infllmv2.enable(model)
    rows = []
    for graphs in (True, False):
        decode_mod.DECODE_GRAPHS = graphs
        for name, lengths, new_tokens in CASES:
            if name not in args.cases:
                continue
            row = {"case": name, "decode_graphs": graphs, **run_case(model, lengths, new_tokens)}
            rows.append(row)
            print(json.dumps(row))
    out = {"command": " ".join(["python3"] + sys.argv), "package": os.path.dirname(infllmv2.__file__),
           "gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "shape": SHAPE, "rows": rows,
           "variants": variants()}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_compiles.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(f"\n{'case':<20} {'graphs':>6} {'prefill':>7} {'decode':>6} {'median ms':>9} {'max ms':>8}  compiling steps")
    for r in rows:
        at = ", ".join(f"{s['step']}:{len(s['compiled'])}" for s in r["steps_with_compiles"])
        print(f"{r['case']:<20} {str(r['decode_graphs']):>6} {r['prefill_compiles']:>7} {r['decode_compiles']:>6} "
              f"{r['median_step_ms']:>9} {r['max_step_ms']:>8}  {at}")
    print("\nwhat each further compilation of a kernel changed:")
    for name, changes in out["variants"].items():
        print(f"  {name}: {changes}")


if __name__ == "__main__":
    main()
