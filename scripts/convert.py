"""Convert model weights between jaxgpt's training checkpoints, Hugging Face GPT-2 and the book's PyTorch.

    python scripts/convert.py runs/quickstart-.../ out/hf            # training checkpoint -> HF directory
    python scripts/convert.py runs/x/checkpoints/400 out/model.pth   # one checkpoint step -> book .pth
    python scripts/convert.py out/hf out/model.pth                   # HF directory -> book .pth
    python scripts/convert.py model.pth out/hf --n-heads 12          # book .pth -> HF directory
    python scripts/convert.py gpt2/124M out/model.pth                # the book's OpenAI download -> .pth

Sources: anything ``jaxgpt.load`` reads, recognised from the path: a run directory of
``scripts/train.py`` (its latest step) or one step directory, a Hugging Face directory
(config.json + model.safetensors), or the book's ``.pth`` (``torch.save(model.state_dict())`` or
the book's ``{"model_state_dict": ...}`` checkpoint; needs torch), the folder the book's
``gpt_download.py`` writes (gpt2/124M, read without TensorFlow) or a GPT-2 name. A classifier run
of ``scripts/finetune_classifier.py`` (a LoRA run with its adapters merged) converts to the book's
.pth with its chapter 6 head (``out_head = Linear(emb_dim, num_classes)``); Hugging Face's GPT-2
classes have no such head. Targets: a Hugging Face
directory (``GPT2LMHeadModel.from_pretrained`` loads it) or a book .pth file
(``GPTModel(cfg).load_state_dict(torch.load(path))``), chosen by ``--to`` or by the destination's
suffix (.pth/.pt: book, anything else: Hugging Face). There is no conversion *to* a training
checkpoint: ``scripts/generate.py`` reads all three directly. Files are written under a temporary
name and renamed, so a destination is never half written, and a failed conversion leaves nothing.

Exit codes: 0 done; 2 bad input (a missing, damaged or incompatible source, a destination that
exists or cannot be written), said in one line before anything is written; 1 a failure while
writing; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchlib import HintParser, doc_parser, number  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "convert.py"
BOOK_SUFFIXES = (".pth", ".pt")
TORCH_EXTRA = 'pip install "jaxgpt[reference]"'
_TARGETS = {"hf": "Hugging Face directory", "book": "book .pth file"}


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__, HintParser)
    p.add_argument(
        "src",
        help="training run/step directory, Hugging Face directory, book .pth file, the book's OpenAI "
        "download (gpt2/124M) or a GPT-2 name (gpt2, gpt2-medium, ...)",
    )
    p.add_argument("dst", help="output: a directory (Hugging Face) or a .pth file (book)")
    p.add_argument(
        "--to", choices=sorted(_TARGETS), help="output format (default: from the destination's suffix)"
    )
    p.add_argument(
        "--n-heads", type=number(int, 1), help="attention heads of a book .pth whose width matches no preset"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    return p


def destination_problem(dst: Path, to: str, force: bool) -> str | None:
    """Why ``dst`` cannot receive a ``to`` model, or None; looks, and writes nothing that stays."""
    if to == "hf" and dst.is_file():
        return f"{dst} is a file, but a Hugging Face model is a directory: give a directory or --to book"
    if to == "book" and dst.is_dir():
        return f"{dst} is a directory, but a book .pth is a file: give a file name ending in .pth"
    if dst.exists() and not force and (dst.is_file() or any(dst.iterdir())):
        return f"{dst} exists; pass --force to overwrite it"
    # The directory that will receive a new entry: dst itself for a Hugging Face directory that
    # exists, else the nearest existing ancestor.
    home = dst if to == "hf" and dst.is_dir() else dst.parent
    while not home.exists():
        home = home.parent
    if not home.is_dir():
        return f"{home} is a file, so {dst} cannot be created in it"
    try:
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as e:
        return f"cannot write to {home} ({e.strerror or e})"
    return None


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _needs_torch(src: str, to: str) -> str | None:
    """The message for a conversion that needs torch where it is missing, or None."""
    reading = Path(src).suffix in BOOK_SUFFIXES and Path(src).is_file()
    if not (reading or to == "book"):
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        action = "reading" if reading else "writing"
        return f"{action} a book .pth file needs torch, which is not installed: {TORCH_EXTRA}"
    return None


def _convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    to = args.to or ("book" if dst.suffix in BOOK_SUFFIXES else "hf")
    problem = destination_problem(dst, to, args.force) or _needs_torch(args.src, to)
    if problem:
        return _fail(problem, 2)

    import jaxgpt

    try:
        cfg, params = jaxgpt.load(args.src, n_heads=args.n_heads)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _fail(str(e), 2)
    try:
        if to == "hf":
            jaxgpt.save_hf_gpt2(cfg, params, dst)
        else:
            jaxgpt.save_book_state_dict(cfg, params, dst)
    except ValueError as e:  # a model the target format cannot express (e.g. Post-LN)
        return _fail(f"cannot write {dst} as a {_TARGETS[to]}: {e}", 2)
    except OSError as e:  # the disk filled, the directory went away: nothing was left behind
        return _fail(f"writing {dst} failed ({e.strerror or e}); nothing was written", 1)
    classes = jaxgpt.classifier_classes(params)
    head = f"{classes}-class head" if classes else f"{'tied' if cfg.tie_embeddings else 'untied'} head"
    print(
        f"{args.src} -> {_TARGETS[to]} {dst}  ({cfg.n_layers} layers, emb_dim {cfg.emb_dim}, "
        f"{cfg.n_heads} heads, vocab {cfg.vocab_size}, context {cfg.context_length}, {head})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _convert(args)
    except KeyboardInterrupt:  # the writes clean up after themselves on the way out
        return _fail("interrupted (Ctrl-C); nothing was written", 130)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up, before main's own handler
        print(f"{PROG}: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
