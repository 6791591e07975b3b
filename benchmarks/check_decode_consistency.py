"""Teacher-forced logits of an answer: one forward over prompt + answer against prefill + cached decode steps.

The sparse model must give the same logits either way (the decode step attends to the blocks the full forward's
row for that position attends to). Runs SmolLM2 (or any model) on RULER-style needles in code, per backend.

    python3 benchmarks/check_decode_consistency.py --model smollm2 --length 8000 --samples 4 --backends triton torch
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
    ids = torch.tensor([list(prompt) + list(answer)], device=device)
    n = len(prompt)
    with torch.no_grad():
        full = model(ids).logits[0, n - 1:n - 1 + len(answer)].float()
        out = model(ids[:, :n], past_key_values=InfLLMv2Cache(), use_cache=True)
        steps, cache = [out.logits[0, -1].float()], out.past_key_values
        for i in range(len(answer) - 1):
            out = model(ids[:, n + i:n + i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[0, -1].float())
            cache = out.past_key_values
    return full, torch.stack(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--backends", nargs="+", default=["auto"])
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
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"command": "python3 " + " ".join(sys.argv), "device": device, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
