"""Convert model weights between jaxgpt's training checkpoints, Hugging Face GPT-2 and the book's PyTorch.

    python scripts/convert.py runs/quickstart-.../ out/hf            # training checkpoint -> HF directory
    python scripts/convert.py runs/x/checkpoints/400 out/model.pth   # one checkpoint step -> book .pth
    python scripts/convert.py out/hf out/model.pth                   # HF directory -> book .pth
    python scripts/convert.py model.pth out/hf --n-heads 12          # book .pth -> HF directory

Sources (detected from the path):
  training checkpoint  a run directory of ``scripts/train.py`` (latest step) or one step directory
  Hugging Face         a directory with config.json and model.safetensors (``save_pretrained``'s files)
  book .pth            ``torch.save(model.state_dict(), path)`` of ``llms_from_scratch``'s GPTModel, or
                       the book's ``{"model_state_dict": ...}`` checkpoint (needs torch)
Targets: a Hugging Face directory (``GPT2LMHeadModel.from_pretrained`` loads it) or a book .pth
file (``GPTModel(cfg).load_state_dict(torch.load(path))``), chosen by ``--to`` or by the
destination's suffix (.pth/.pt: book, anything else: Hugging Face). There is no conversion *to*
a training checkpoint: ``scripts/generate.py`` reads all three formats directly.

Exit codes: 0 done, 2 bad input (missing or incompatible source, existing destination).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

BOOK_SUFFIXES = (".pth", ".pt")


class ModelLoadError(Exception):
    """A model path that is missing, of an unknown format, or unreadable (message says which)."""


def detect_format(path: str | Path) -> str:
    """'hf', 'book' or 'checkpoint' for a model path; ModelLoadError if there is nothing there."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"no model at {path}: give a training run or step directory, "
            "a Hugging Face directory or a book .pth file"
        )
    if path.is_file():
        return "book"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "hf"
    return "checkpoint"


def load_model(path: str | Path, n_heads: int | None = None) -> tuple[Any, Any, str]:
    """(GPTConfig, params, format) from any supported model path, with errors a user can act on."""
    fmt = detect_format(path)
    try:
        if fmt == "hf":
            from jaxgpt.weights import load_hf_gpt2

            cfg, params = load_hf_gpt2(path)
        elif fmt == "book":
            from jaxgpt.weights import load_book_state_dict

            cfg, params = load_book_state_dict(path, n_heads=n_heads)
        else:
            from jaxgpt.checkpoint import load_checkpoint

            cfg, params = load_checkpoint(path)
    except ModelLoadError:
        raise
    except Exception as e:  # every loader names what is wrong; say which format was tried
        raise ModelLoadError(f"cannot load {path} as a {_FORMAT_NAMES[fmt]}: {e}") from e
    return cfg, params, fmt


_FORMAT_NAMES = {
    "hf": "Hugging Face GPT-2 directory",
    "book": "book .pth state dict",
    "checkpoint": "training checkpoint",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="training run/step directory, Hugging Face directory or book .pth file")
    p.add_argument("dst", help="output: a directory (Hugging Face) or a .pth file (book)")
    p.add_argument(
        "--to", choices=["hf", "book"], help="output format (default: from the destination's suffix)"
    )
    p.add_argument("--n-heads", type=int, help="attention heads of a book .pth whose width matches no preset")
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dst = Path(args.dst)
    to = args.to or ("book" if dst.suffix in BOOK_SUFFIXES else "hf")
    if dst.exists() and not args.force and (dst.is_file() or any(dst.iterdir())):
        print(f"convert.py: {dst} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        cfg, params, fmt = load_model(args.src, args.n_heads)
        if to == "hf":
            from jaxgpt.weights import save_hf_gpt2

            save_hf_gpt2(cfg, params, dst)
        else:
            from jaxgpt.weights import save_book_state_dict

            save_book_state_dict(cfg, params, dst)
    except (ModelLoadError, ValueError, ImportError) as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 2
    print(
        f"{_FORMAT_NAMES[fmt]} {args.src} -> {_FORMAT_NAMES[to if to == 'hf' else 'book']} {dst}  "
        f"({cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
        f"context {cfg.context_length}, {'tied' if cfg.tie_embeddings else 'untied'} head)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
