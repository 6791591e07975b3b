"""Teacher-forced logits of an answer: one forward over prompt + answer against prefill + cached decode steps.

The sparse model must give the same logits either way (the decode step attends to the blocks the full forward's
row for that position attends to). Runs SmolLM2 (or any model) on RULER-style needles in code, per backend.

    python3 benchmarks/check_decode_consistency.py --model smollm2 --length 8000 --samples 4 --backends triton torch
    python3 benchmarks/check_decode_consistency.py --model smollm2 --length 8000 --samples 4 --backends triton \
        --selection    # and each layer's block choices at the answer's positions: prefill, decode, reference
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import infllmv2  # noqa: E402
from infllmv2.cache import InfLLMv2Cache  # noqa: E402
from infllmv2.evaluation import generate_sample, load_model_and_tokenizer  # noqa: E402


def answer_logits(model, prompt, answer, device):
    from infllmv2.demo import _cache_kwarg, _cache_name  # transformers 5 calls it `cache`, 4.x `past_key_values`

    ids = torch.tensor([list(prompt) + list(answer)], device=device)
    n = len(prompt)
    with torch.no_grad():
        full = model(ids).logits[0, n - 1:n - 1 + len(answer)].float()
        out = model(ids[:, :n], use_cache=True, **{_cache_name(model): InfLLMv2Cache()})
        steps = [out.logits[0, -1].float()]
        for i in range(len(answer) - 1):
            out = model(ids[:, n + i:n + i + 1], use_cache=True, **_cache_kwarg(model, out))
            steps.append(out.logits[0, -1].float())
    return full, torch.stack(steps)


def selection_agreement(model, prompt, answer, config, device):
    """Each layer's block choices for the answer's positions: the Triton prefill selection (one call over every row),
    the Triton decode step's (one call per position, ``return_block_indices``) and the float32 reference's. Returns
    counts of (layer, KV head, position) rows whose block sets differ, and for each differing row the reference
    score gap between the blocks only one side chose (relative to the row's top score: near 0 = a tie)."""
    from infllmv2 import select_blocks
    from infllmv2.ops import naive
    from infllmv2.ops.triton.decode import infllmv2_decode_triton

    captured = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        def observer(module, q, k, cu_q, cu_k, i=i):
            captured[i] = (q.detach(), k.detach())
        layer.self_attn._infllmv2_observer = observer
    ids = torch.tensor([list(prompt) + list(answer)], device=device)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for layer in layers:
            del layer.self_attn._infllmv2_observer
    n, m = ids.shape[1], len(answer)
    counts = {"rows": 0, "prefill_vs_reference": 0, "decode_vs_reference": 0, "decode_vs_prefill": 0}
    gaps = {"prefill_vs_reference": [], "decode_vs_reference": [], "decode_vs_prefill": []}
    for i in range(len(layers)):
        q, k = captured[i]  # (1, n, Hq, d), (1, n, Hkv, d)
        scale = layers[i].self_attn.scaling
        prefill = select_blocks(q, k, config, softmax_scale=scale, backend="triton")[:, n - m:].long()  # (Hkv, m, B)
        ref_scores = naive.block_scores(q[0, n - m:], k[0], config, scale)  # (Hkv, m, nb) float32
        reference = naive.topk_blocks(ref_scores, torch.arange(n - m, n, device=device), config).long()
        decode = []
        for t in range(n - m, n):
            _, idx = infllmv2_decode_triton(q[:, t], k[:, :t + 1], k[:, :t + 1],
                                            torch.tensor([t + 1], dtype=torch.int32, device=device), config,
                                            softmax_scale=scale, return_block_indices=True)
            decode.append(idx[:, 0].long())
        decode = torch.stack(decode, 1)  # (Hkv, m, B)
        sides = {"prefill_vs_reference": (prefill, reference), "decode_vs_reference": (decode, reference),
                 "decode_vs_prefill": (decode, prefill)}
        for h in range(k.shape[2]):
            for j in range(m):
                counts["rows"] += 1
                top = float(ref_scores[h, j].max())
                for name, (a, b) in sides.items():
                    sa, sb = set(a[h, j].tolist()) - {-1}, set(b[h, j].tolist()) - {-1}
                    if sa != sb:
                        counts[name] += 1
                        only_a, only_b = sorted(sa - sb), sorted(sb - sa)
                        gap = abs(float(ref_scores[h, j, only_a].max()) - float(ref_scores[h, j, only_b].max()))
                        gaps[name].append(round(gap / max(top, 1e-30), 5))
    return {**counts, "relative_score_gaps": {k: sorted(v)[-5:] for k, v in gaps.items()},
            "max_relative_gap": {k: max(v, default=0.0) for k, v in gaps.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--backends", nargs="+", default=["auto"])
    ap.add_argument("--selection", action="store_true",
                    help="also compare each layer's block choices at the answer's positions (Triton prefill, Triton "
                         "decode, float32 reference; CUDA)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load_model_and_tokenizer(args.model, device=device, dtype=dtype)
    cfg = infllmv2.SparseConfig(block_size=64, kernel_size=32, kernel_stride=16, window_size=512, topk=16, dense_len=-1)
    rows = []
    for backend in args.backends:
        infllmv2.enable(model, cfg, backend=backend)
        for seed in range(args.samples):
            s = generate_sample(args.task, tok, args.length, seed=seed, haystack="code")
            answer = tok.encode(s.answer_text)
            full, inc = answer_logits(model, s.input_ids, answer, device)
            idx = torch.arange(len(answer))
            target = torch.tensor(answer, device=device)
            row = {"backend": backend, "seed": seed, "answer": s.answers[0],
                   "max_logit_diff": [round(float(x), 3) for x in (full - inc).abs().amax(-1)],
                   "logp_full": [round(float(x), 2) for x in torch.log_softmax(full, -1)[idx, target]],
                   "logp_decode": [round(float(x), 2) for x in torch.log_softmax(inc, -1)[idx, target]],
                   "argmax_equal": int((full.argmax(-1) == inc.argmax(-1)).sum()), "tokens": len(answer)}
            if args.selection and backend in ("triton", "auto"):
                row["selection"] = selection_agreement(model, s.input_ids, answer, cfg, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"command": "python3 " + " ".join(sys.argv), "device": device, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
