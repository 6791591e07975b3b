"""Host synchronisations of an eager, left-padded decode step with ``InfLLMv2Cache`` (torch's sync debug mode counts
the synchronising calls), and whether a pageable host-to-device copy of a small tensor synchronises. GPU only.

    python3 benchmarks/count_decode_syncs.py

The model is ``tests/gpu/test_generation_gpu.py``'s small bf16 Llama (2 layers), rows of 2000 / 1490 / 700 tokens.
Each sync waits for the GPU's queue, which then idles while the host prepares the next layer.
"""
import sys
import warnings

import torch

ROOT = __import__("os").path.join(__import__("os").path.dirname(__file__), "..")
sys.path[:0] = [ROOT, ROOT + "/tests", ROOT + "/tests/gpu"]
from test_generation_gpu import CACHE, _left_padded, _model  # noqa: E402
from infllmv2.cache import InfLLMv2Cache  # noqa: E402


def count_syncs(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(x.message) for x in w)


print("pageable copy of a small host tensor:", count_syncs(lambda: torch.tensor([[1, 2, 3]], dtype=torch.int32).t().contiguous().to("cuda")), "sync warnings")
model = _model()
ids, mask = _left_padded([2000, 1490, 700])
cache = InfLLMv2Cache()
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask, **{CACHE: cache})
    tok = torch.full((3, 1), 5, device="cuda")
    for step in range(4):
        mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
        n = count_syncs(lambda: model(input_ids=tok, attention_mask=mask, **{CACHE: cache}))
        print(f"decode step {step}: {n} sync warnings ({model.config.num_hidden_layers} layers)")
