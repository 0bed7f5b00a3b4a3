"""Evaluate a model: perplexity on a text, HellaSwag-style multiple choice, or LAMBADA's last word.

    python scripts/evaluate.py gpt2 --text wiki.test.raw --context-length 1024 --stride 512
    python scripts/evaluate.py gpt2/124M --hellaswag hellaswag_val.jsonl --json
    python scripts/evaluate.py runs/my-run --lambada lambada_test.jsonl

MODEL is a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or 124M ... 1558M; fetched with
huggingface_hub into its cache, HF_HUB_OFFLINE=1 to stay offline), the directory the book's
gpt_download.py writes, a Hugging Face GPT-2 directory, a training run or step directory, or a
book .pth file.

--text FILE: mean loss and perplexity with sliding windows of --context-length tokens every
--stride tokens (Hugging Face's perplexity guide; the first window scores all its tokens, later
ones only their new ones). --hellaswag FILE: JSONL, one {"ctx", "endings", "label"} per line;
acc = lowest total loss over an ending's tokens, acc_norm = lowest mean loss per token.
--lambada FILE: JSONL with "text", or a text file with one passage per line; acc = greedy
decoding gives the last word exactly, perplexity of the last word. Progress goes to stderr, the
result to stdout (--json: one JSON object).

Exit codes: 0 done; 2 bad input (an option, a missing file, a file in the wrong shape, with its
line, or a model that cannot be loaded), checked before any scoring; 1 a failure while scoring;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchlib import doc_parser, run_cli  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "scripts"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PROG = "evaluate.py"


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("model", help="GPT-2 name, OpenAI (gpt_download.py) or Hugging Face directory, run, .pth")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--text", type=Path, metavar="FILE", help="perplexity of this UTF-8 text")
    mode.add_argument(
        "--hellaswag", type=Path, metavar="FILE", help="multiple choice, HellaSwag's JSONL form"
    )
    mode.add_argument(
        "--lambada", type=Path, metavar="FILE", help="last-word accuracy, JSONL or one per line"
    )
    p.add_argument(
        "--context-length", type=int, help="tokens per window / longest item (default: the model's)"
    )
    p.add_argument(
        "--stride", type=int, help="--text: tokens between window starts (default: half the window)"
    )
    p.add_argument(
        "--batch-size", type=int, default=4, help="sequences per forward pass (default: %(default)s)"
    )
    p.add_argument("--limit", type=int, help="score only the first N items (--hellaswag, --lambada)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class InputError(Exception):
    """Bad input found before scoring: exit code 2 with this message."""


def load_any(model: str):
    """(cfg, params) from a name or any path jaxgpt reads; InputError with the loader's reason."""
    import jaxgpt

    try:
        cfg, params = jaxgpt.load(model)
    except (FileNotFoundError, ValueError, ImportError) as e:  # every loader names what is wrong
        raise InputError(f"cannot load MODEL {model}: {e}") from None
    if reason := jaxgpt.not_a_language_model(params, model):
        raise InputError(reason)
    return cfg, params


def _read_inputs(args: argparse.Namespace):
    """The file's contents in the form its mode needs (checked line by line), before the model loads."""
    from jaxgpt.evaluate import read_lambada, read_multiple_choice

    for flag, value in (("--context-length", args.context_length), ("--stride", args.stride)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    file = args.text or args.hellaswag or args.lambada
    flag = "--text" if args.text else "--hellaswag" if args.hellaswag else "--lambada"
    if not file.is_file():
        raise InputError(f"{flag} {file}: no such file")
    if args.text:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--text {file}: not UTF-8 text ({e})") from None
        if not text.strip():
            raise InputError(f"--text {file}: the file is empty")
        return text
    items = read_multiple_choice(file) if args.hellaswag else read_lambada(file)
    return items[: args.limit] if args.limit else items


def _format(mode: str, result: dict) -> str:
    if mode == "text":
        return (
            f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
            f"({result['tokens']} tokens scored, {result['windows']} windows of {result['context_length']}, "
            f"stride {result['stride']})"
        )
    if mode == "hellaswag":
        return f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  ({result['items']} items)"
    return f"acc {result['acc']:.4f}  perplexity {result['perplexity']:.3f}  ({result['items']} passages)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxgpt.evaluate import EvalDataError, perplexity, score_lambada, score_multiple_choice

    try:
        data = _read_inputs(args)
        cfg, params = load_any(args.model)
        if args.context_length is not None and args.context_length > cfg.context_length:
            raise InputError(
                f"--context-length {args.context_length} is longer than the model's {cfg.context_length}"
            )
        if args.stride is not None and args.stride > (args.context_length or cfg.context_length):
            raise InputError(f"--stride {args.stride} is longer than the window (--context-length)")
    except (InputError, EvalDataError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2

    mode = "text" if args.text else "hellaswag" if args.hellaswag else "lambada"
    common = {
        "context_length": args.context_length,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
    }
    try:
        if mode == "text":
            result = perplexity(params, cfg, data, stride=args.stride, **common)
        elif mode == "hellaswag":
            result = score_multiple_choice(params, cfg, data, **common)
        else:
            result = score_lambada(params, cfg, data, **common)
    except ValueError as e:  # the text does not fit the model (vocabulary, too short, too long an item)
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"{PROG}: scoring failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = {"model": args.model, "task": mode, **result.to_dict()}
    print(json.dumps(summary) if args.json else _format(mode, summary))
    return 0


if __name__ == "__main__":
    run_cli(PROG, main)
