"""Offline training data for short-to-long adaptation (issue 5).

* ``ByteTokenizer``: byte-level tokenizer (256 byte ids + specials), no files, no network.
* ``source_roots`` / ``list_source_files`` / ``build_documents``: long documents built from local text
  (the interpreter's standard library, site-packages, or any directory), files grouped by folder and
  concatenated in sorted order (deterministic) until each document reaches ``min_chars``.
* ``pack_tokens``: documents -> fixed-length rows ``(n, seq_len)`` (EOS between documents).
* ``LengthBuckets``: the mix of document lengths of long-context fine-tuning (weights are fractions of
  training TOKENS); ``TrainingStream`` draws rows of ``seq_len`` tokens made of segments whose
  lengths follow the mix (``position_ids`` restart at each segment, so each segment is one sequence for
  both dense SDPA and InfLLM-V2), and mixes in RULER-style synthetic retrieval rows at ``ruler_ratio``.

Every row is a pure function of ``(seed, row index)``: any rank can build any row, and a resumed run
sees exactly the rows an uninterrupted run would have seen.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np

__all__ = ["ByteTokenizer", "TokenizerAdapter", "as_tokenizer", "load_tokenizer", "save_tokenizer",
           "check_tokenizer_fits", "source_roots", "list_source_files",
           "build_documents", "encode_documents", "pack_tokens", "LengthBuckets", "PAPER_BUCKETS",
           "TrainingStream", "Row"]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then specials: PAD 256, BOS 257, EOS 258.

    ``vocab_size`` is 259; models may use a larger embedding (``padded_vocab_size`` = 320, a multiple of 64).
    ``decode`` drops specials and replaces invalid UTF-8 sequences.
    """

    name = "byte"
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    padded_vocab_size = 320

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend({256: b"<pad>", 257: b"<s>", 258: b"</s>"}.get(i, b"<unk>"))
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class TokenizerAdapter:
    """Wraps a Hugging Face tokenizer with the ``encode``/``decode`` interface used here (no specials added)."""

    def __init__(self, hf_tokenizer):
        self.tok = hf_tokenizer
        self.name = getattr(hf_tokenizer, "name_or_path", type(hf_tokenizer).__name__)
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.pad_token_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TokenizerAdapter({self.name!r})"


def as_tokenizer(tokenizer):
    """Our interface for a tokenizer: ByteTokenizer / TokenizerAdapter pass through, HF tokenizers get wrapped."""
    if tokenizer is None:
        return ByteTokenizer()
    if isinstance(tokenizer, (ByteTokenizer, TokenizerAdapter)):
        return tokenizer
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # a transformers tokenizer
        return TokenizerAdapter(tokenizer)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"):
        return tokenizer
    raise TypeError(f"not a tokenizer: {type(tokenizer).__name__}")


BYTE_TOKENIZER_FILE = "infllmv2_tokenizer.json"  # marks a model folder that reads ByteTokenizer ids


def load_tokenizer(folder: str, tokenizer: str = "auto", arg: str = "--tokenizer"):
    """The tokenizer of a model folder. ``tokenizer``: "byte" (ours), a tokenizer folder, or "auto" (byte
    when the folder says so, else the folder's own transformers tokenizer)."""
    if tokenizer == "byte" or (tokenizer == "auto" and os.path.exists(os.path.join(folder, BYTE_TOKENIZER_FILE))):
        return ByteTokenizer()
    source = folder if tokenizer == "auto" else tokenizer
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{arg}: tokenizer folder not found: {source}")
    from transformers import AutoTokenizer

    try:
        return TokenizerAdapter(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as err:
        raise ValueError(f"{arg}: no tokenizer could be loaded from {source} ({str(err).splitlines()[0]}); "
                         f"pass {arg} byte or {arg} FOLDER (a folder holding the model's transformers tokenizer)"
                         ) from None


def save_tokenizer(tokenizer, folder: str) -> None:
    """Writes ``tokenizer`` beside a saved model, where ``load_tokenizer(folder)`` finds it."""
    tok = as_tokenizer(tokenizer)
    if isinstance(tok, ByteTokenizer):
        import json

        with open(os.path.join(folder, BYTE_TOKENIZER_FILE), "w") as fh:
            json.dump({"type": "byte", "vocab_size": ByteTokenizer.vocab_size}, fh)
    elif isinstance(tok, TokenizerAdapter):
        tok.tok.save_pretrained(folder)
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__}")


def check_tokenizer_fits(tokenizer, model, arg: str = "--tokenizer") -> None:
    """A tokenizer with more ids than the model has embedding rows cannot be the model's (its ids would index out
    of range): refuse it, naming the argument. (A smaller one of another model passes this check: that is why
    ``load_tokenizer`` takes the model folder's own unless told otherwise.)"""
    tok = as_tokenizer(tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    if tok.vocab_size > rows:
        raise ValueError(f"{arg}: the tokenizer ({tok!r}) has {tok.vocab_size} ids but the model's embeddings have "
                         f"{rows} rows: pass the model's own tokenizer")


# --------------------------------------------------------------------------------------------------
# Documents from local text
# --------------------------------------------------------------------------------------------------
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "node_modules", ".venv", ".tox", ".mypy_cache"}


def source_roots(names: Optional[Sequence[str]] = None) -> List[str]:
    """Directories of text. ``names`` items: "stdlib", "site-packages" (purelib + platlib) or a path.

    Default: ["stdlib"]. A ``.jsonl`` file is a source too (``build_documents`` reads its records). Missing
    paths raise FileNotFoundError naming them.
    """
    names = ["stdlib"] if not names else list(names)
    paths = sysconfig.get_paths()
    roots: List[str] = []
    for name in names:
        if name == "stdlib":
            cands = [paths["stdlib"]]
        elif name in ("site-packages", "site_packages"):
            cands = sorted({paths["purelib"], paths["platlib"]})
        elif name.endswith(".jsonl") and os.path.isfile(name):
            cands = [name]
        else:
            if not os.path.isdir(name):
                raise FileNotFoundError(f"text directory (or .jsonl file) not found: {name}")
            cands = [name]
        for c in cands:
            c = os.path.abspath(c)
            if (os.path.isdir(c) or c.endswith(".jsonl")) and c not in roots:
                roots.append(c)
    return roots


def list_source_files(roots: Sequence[str], exts: Sequence[str] = (".py",), max_file_bytes: int = 1 << 20,
                      exclude_site_packages: bool = True) -> List[tuple]:
    """Sorted ``(root, relative path)`` of the text files under ``roots`` (deterministic walk).

    Files larger than ``max_file_bytes`` are skipped (generated tables). When a root is the stdlib,
    its ``site-packages`` folder is skipped unless ``exclude_site_packages`` is False (it has its own root).
    """
    exts = tuple(e if e.startswith(".") else "." + e for e in exts)
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                                 and not (exclude_site_packages and d in ("site-packages", "dist-packages")
                                          and os.path.abspath(dirpath) == os.path.abspath(root)))
            for fn in sorted(filenames):
                if fn.endswith(exts):
                    full = os.path.join(dirpath, fn)
                    try:
                        if os.path.getsize(full) > max_file_bytes:
                            continue
                    except OSError:
                        continue
                    out.append((root, os.path.relpath(full, root)))
    out.sort()
    return out


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def _jsonl_texts(path: str, field: str):
    """The ``field`` string of each line's JSON object (blank lines skipped); errors name the line."""
    import json

    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{number}: no string field {field!r} (--data-field names it)")
            yield record[field]


def build_documents(roots: Optional[Sequence[str]] = None, min_chars: int = 65536, exts: Sequence[str] = (".py",),
                    max_chars: Optional[int] = None, max_documents: Optional[int] = None,
                    field: str = "text") -> List[str]:
    """Long documents from the text files under ``roots`` (default: the interpreter's standard library).

    Folders: their files ending in ``exts``, in sorted order, each preceded by ``# File: <relative
    path>``. ``.jsonl`` files: the ``field`` text of each line's record, in order, after the folders'
    files. These pieces are concatenated until the document holds ``min_chars`` characters; then a new
    document starts, so every document but possibly the last one is at least ``min_chars`` long (the
    last short one is merged into the previous document). ``max_chars`` stops reading after that
    many characters in all; ``max_documents`` after that many documents. Deterministic.
    """
    if min_chars <= 0:
        raise ValueError(f"min_chars must be positive, got {min_chars}")
    roots = source_roots(None) if roots is None else list(roots)
    folders = [r for r in roots if os.path.isdir(r)]
    records = [r for r in roots if not os.path.isdir(r)]
    files = list_source_files(folders, exts)
    if not files and not records:
        raise FileNotFoundError(f"no {'/'.join(exts)} files under {roots}")

    def pieces():
        for root, rel in files:
            text = _read(os.path.join(root, rel))
            if text:
                yield f"# File: {rel}\n{text}\n"
        for path in records:
            for text in _jsonl_texts(path, field):
                yield text + "\n"

    docs: List[str] = []
    cur: List[str] = []
    cur_len = total = 0
    for piece in pieces():
        cur.append(piece)
        cur_len += len(piece)
        total += len(piece)
        if cur_len >= min_chars:
            docs.append("".join(cur))
            cur, cur_len = [], 0
            if max_documents is not None and len(docs) >= max_documents:
                break
        if max_chars is not None and total >= max_chars:
            break
    if cur and not (max_documents is not None and len(docs) >= max_documents):
        if docs and cur_len < min_chars:
            docs[-1] += "".join(cur)
        else:
            docs.append("".join(cur))
    return docs


def encode_documents(docs: Sequence[str], tokenizer=None) -> np.ndarray:
    """One int32 stream: the documents' tokens, each followed by EOS."""
    tok = as_tokenizer(tokenizer)
    parts = []
    eos = np.array([tok.eos_token_id], dtype=np.int32)
    for d in docs:
        ids = tok.encode_np(d) if hasattr(tok, "encode_np") else np.asarray(tok.encode(d), dtype=np.int32)
        parts.append(ids)
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack_tokens(stream: np.ndarray, seq_len: int, drop_last: bool = True, pad_id: int = ByteTokenizer.pad_token_id
                ) -> np.ndarray:
    """Cut a token stream into rows ``(n, seq_len)``; the tail is dropped (or padded with ``pad_id``)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream = np.asarray(stream, dtype=np.int32)
    n = len(stream) // seq_len
    rows = stream[:n * seq_len].reshape(n, seq_len)
    if not drop_last and len(stream) % seq_len:
        tail = np.full(seq_len, pad_id, dtype=np.int32)
        rest = stream[n * seq_len:]
        tail[:len(rest)] = rest
        rows = np.concatenate([rows, tail[None]])
    return rows


# --------------------------------------------------------------------------------------------------
# Length buckets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LengthBuckets:
    """Mix of segment lengths: bucket i covers lengths in ``(bounds[i], bounds[i+1]]`` tokens; a row draws bucket i
    with probability ``weights[i]`` (``TrainingStream``). Its last segment is clipped to the row, so it can land in a
    lower bucket: the longest buckets get somewhat less than their weight of the tokens (the paper's mix at 32K:
    0.33 / 0.33 / 0.18 / 0.16 of the tokens for weights 0.3 / 0.3 / 0.2 / 0.2). Bounds may be absolute (ints) or,
    via ``relative(...)``, fractions of the row length.
    """

    bounds: tuple
    weights: tuple

    def __post_init__(self):
        if len(self.bounds) != len(self.weights) + 1 or not self.weights:
            raise ValueError("LengthBuckets needs len(bounds) == len(weights) + 1 >= 2")
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:])) or self.bounds[0] < 0:
            raise ValueError(f"bucket bounds must be increasing and >= 0, got {self.bounds}")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"bucket weights must be >= 0 with a positive sum, got {self.weights}")

    @property
    def probs(self) -> np.ndarray:
        w = np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()

    def scaled(self, seq_len: int) -> "LengthBuckets":
        """Bounds given as fractions (all <= 1) -> token counts for rows of ``seq_len``."""
        if max(self.bounds) <= 1.0:
            b = [int(round(x * seq_len)) for x in self.bounds]
            for i in range(1, len(b)):  # keep strictly increasing after rounding
                b[i] = max(b[i], b[i - 1] + 1)
            return LengthBuckets(tuple(b), self.weights)
        return self

    def bucket_of(self, length: int) -> int:
        for i in range(len(self.weights)):
            if self.bounds[i] < length <= self.bounds[i + 1]:
                return i
        raise ValueError(f"length {length} lies in no bucket {self.bounds}")

    @classmethod
    def parse(cls, spec: str) -> "LengthBuckets":
        """``"0-0.125:0.3,0.125-0.375:0.25,..."`` (fractions of the row length) or absolute ``"0-4096:0.3,..."``."""
        bounds, weights = [], []
        for item in spec.split(","):
            try:
                rng, w = item.split(":")
                lo, hi = (float(x) for x in rng.split("-"))
                w = float(w)
            except ValueError:
                raise ValueError(f"bad bucket {item!r} in {spec!r}; expected LO-HI:WEIGHT") from None
            if bounds and abs(bounds[-1] - lo) > 1e-12:
                raise ValueError(f"buckets must be contiguous: {item!r} does not start at {bounds[-1]}")
            if not bounds:
                bounds.append(lo)
            bounds.append(hi)
            weights.append(w)
        if max(bounds) > 1.0:
            bounds = [int(b) for b in bounds]
        return cls(tuple(bounds), tuple(weights))

    def to_spec(self) -> str:
        return ",".join(f"{self.bounds[i]}-{self.bounds[i + 1]}:{self.weights[i]}" for i in range(len(self.weights)))


# Long-context fine-tuning mix, as fractions of the fine-tuning length (at 32K: 0-4K, 4-12K, 12-24K, 24-32K).
# The weights approximate the paper's description of its long-context data (mostly short and mid-length
# documents, a minority at full length); they are a default, change them with --buckets.
PAPER_BUCKETS = LengthBuckets((0.0, 0.125, 0.375, 0.75, 1.0), (0.3, 0.3, 0.2, 0.2))


# --------------------------------------------------------------------------------------------------
# Training rows
# --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    input_ids: np.ndarray     # (seq_len,) int64
    position_ids: np.ndarray  # (seq_len,) int64, restarting at each segment
    labels: np.ndarray        # (seq_len,) int64, -100 where no loss (the first token of each segment)
    segments: list            # lengths of the segments
    kind: str                 # "text" | "ruler"


MIN_RULER_LEN = 512  # shortest segment a RULER training sample goes into


class TrainingStream:
    """Deterministic rows of ``seq_len`` tokens: row ``i`` depends on ``(seed, i)`` only.

    tokens: the int32 token stream (``encode_documents``). buckets: ``None`` = each row is one segment
    of ``seq_len`` (pretraining), else a ``LengthBuckets`` (absolute or relative bounds): each row draws
    one bucket (bucket weights are row fractions, close to token fractions) and is filled with segments whose
    lengths are uniform in the bucket (the last one clipped to the row). ruler_ratio: fraction of rows made of
    RULER-style retrieval samples (see ``infllmv2.evaluation.training_sample``), lengths from the same
    bucket draw.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, buckets: Optional[LengthBuckets] = None,
                 ruler_ratio: float = 0.0, tokenizer=None, ruler_tasks: Optional[Sequence[str]] = None,
                 min_segment: int = 16, min_ruler_len: int = MIN_RULER_LEN):
        tokens = np.asarray(tokens, dtype=np.int32)
        if seq_len <= 1:
            raise ValueError(f"seq_len must be > 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than one row ({seq_len}); "
                             "point the data at more text")
        if not 0.0 <= ruler_ratio <= 1.0:
            raise ValueError(f"ruler_ratio must lie in [0, 1], got {ruler_ratio}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.buckets = buckets.scaled(seq_len) if buckets is not None else None
        self.ruler_ratio = ruler_ratio
        self.tokenizer = as_tokenizer(tokenizer)
        self.ruler_tasks = list(ruler_tasks) if ruler_tasks else None
        self.min_segment = min_segment
        self.min_ruler_len = min_ruler_len

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, 0x5EED])

    def segment_lengths(self, rng: np.random.Generator) -> List[int]:
        L = self.seq_len
        if self.buckets is None:
            return [L]
        b = int(rng.choice(len(self.buckets.weights), p=self.buckets.probs))
        lo = max(int(self.buckets.bounds[b]) + 1, self.min_segment)
        hi = max(min(int(self.buckets.bounds[b + 1]), L), lo)
        out, left = [], L
        while left > 0:
            n = int(rng.integers(lo, hi + 1))
            n = min(n, left)
            if left - n < self.min_segment and left - n > 0:  # no tiny tail segment: extend this one
                n = left
            out.append(n)
            left -= n
        return out

    def row(self, index: int) -> Row:
        rng = self._rng(index)
        segs = self.segment_lengths(rng)
        ruler = self.ruler_ratio > 0 and rng.random() < self.ruler_ratio
        ids, pos, labels = [], [], []
        for n in segs:
            seg = None
            if ruler and n >= self.min_ruler_len:
                from .evaluation import training_sample  # generators live with the evaluation suite
                try:
                    seg = np.asarray(training_sample(self.tokenizer, n, seed=int(rng.integers(1 << 31)),
                                                     tasks=self.ruler_tasks, filler_tokens=self.tokens), dtype=np.int64)
                except ValueError:  # too short for every task: plain text
                    seg = None
            if seg is None:
                start = int(rng.integers(0, len(self.tokens) - n + 1))
                seg = self.tokens[start:start + n].astype(np.int64)
            ids.append(seg)
            pos.append(np.arange(n, dtype=np.int64))
            lab = seg.copy()
            lab[0] = -100
            labels.append(lab)
        return Row(np.concatenate(ids), np.concatenate(pos), np.concatenate(labels), segs, "ruler" if ruler else "text")

    def batch(self, indices: Sequence[int]):
        """Rows ``indices`` as torch tensors ``input_ids, position_ids, labels`` of shape (len, seq_len)."""
        import torch

        rows = [self.row(int(i)) for i in indices]
        return {k: torch.from_numpy(np.stack([getattr(r, k) for r in rows]))
                for k in ("input_ids", "position_ids", "labels")}

    @property
    def packs_rows(self) -> bool:
        """Whether a row may hold several sequences (position ids restarting at each)."""
        return self.buckets is not None

    def describe(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "tokens": int(len(self.tokens)),
                "buckets": self.buckets.to_spec() if self.buckets else None, "ruler_ratio": self.ruler_ratio}
